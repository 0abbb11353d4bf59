"""A KVM virtual machine running the chmig guest: vCPU threads, pause/resume, dirty log, state.

One named thread per vCPU runs ``KVM_RUN`` (which releases the GIL) and handles
the exits: COM1 output, the guest's report ports, pacing, HLT.  Pausing sets
``immediate_exit`` and signals every vCPU thread, so each leaves ``KVM_RUN``
promptly; a thread parks only after an ``EINTR`` exit, because re-entering
``KVM_RUN`` with ``immediate_exit`` set is what completes a pending port I/O
(otherwise a saved RIP would still point at the ``out`` instruction).

The whole VM can be captured as one JSON document (:meth:`Vm.capture_state`)
and rebuilt in another process from that document plus the memory
(:meth:`Vm.restore_state`): the operation every migration and restore needs.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from . import guest
from .errors import KvmError, StuckThreadError, UsageError, VmError
from .kvm import (
    KVM_EXIT_HLT,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_IN,
    KVM_MEM_LOG_DIRTY_PAGES,
    Kvm,
    Vcpu,
)
from .jsonlimits import JsonRefused, get_bool, get_int, get_list, get_number, get_object, get_str
from .memory import GuestMemory, ZoneConfig
from .options import U32_MAX, OptionParser
from .protocol import DEFAULT_LIMITS, MemoryRangeTable
from .units import MiB, PAGE_SIZE

log = logging.getLogger(__name__)

COM1_BASE = 0x3F8
COM1_LSR = COM1_BASE + 5
#: Line status: transmitter holding register empty and transmitter idle.
LSR_IDLE = 0x60
#: Signal that kicks a vCPU thread out of KVM_RUN (its handler does nothing).
KICK_SIGNAL = signal.SIGUSR1
#: How long an idle guest's HLT waits before the VMM lets it continue.
HLT_WAIT_S = 0.05

WORKLOADS = ("verify", "counter", "idle")

# Cloud Hypervisor's keys for each VM option (vmm/src/config.rs: CpusConfig::parse, MemoryConfig::parse and
# its memory-zone parser), in its order, split into what a chmig VM has and what it has nothing to apply to.
# The unsupported ones are refused by name (OptionParser.add_unsupported), never silently ignored.
CPUS_SUPPORTED = ("boot",)
CPUS_UNSUPPORTED = ("max", "topology", "kvm_hyperv", "max_phys_bits", "affinity", "features", "nested",
                    "core_scheduling", "profile")
MEMORY_SUPPORTED = ("size", "shared")
MEMORY_UNSUPPORTED = ("file", "mergeable", "hotplug_method", "hotplug_size", "hotplugged_size", "hugepages",
                      "hugepage_size", "prefault", "reserve", "thp")
ZONE_SUPPORTED = ("id", "size", "shared")
ZONE_UNSUPPORTED = ("file", "hugepages", "hugepage_size", "host_numa_node", "hotplug_size", "hotplugged_size",
                    "prefault", "reserve", "mergeable")
#: Cloud Hypervisor's default guest RAM (DEFAULT_MEMORY_MB), for ``--memory`` and for each ``--memory-zone``.
DEFAULT_MEMORY = 512 * MiB
#: ``SerialConfig::SYNTAX``, then what chmig refuses.
SERIAL_SYNTAX = ('Control serial port: "off|null|pty|tty|file=<path>|socket=<path>" '
                 "(chmig: pty and socket= are not supported; null, the default, discards the output)")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """What the guest runs: ``verify`` (default), ``counter`` or ``idle``."""

    kind: str = "verify"
    #: Share of its pages each vCPU rewrites per verify round.
    dirty_percent: int = 10
    #: Cap on the guest's page writes in MiB/s (0 = no cap), enforced by the VMM.
    dirty_rate: float = 0.0

    @classmethod
    def parse(cls, text: str | None) -> Workload:
        if not text:
            return cls()
        kind, _, rest = text.partition(",")
        if kind not in WORKLOADS:
            raise UsageError(f"--workload: unknown workload {kind!r} (choose from {', '.join(WORKLOADS)})")
        options = OptionParser("--workload").add_all(("dirty_percent", "dirty_rate")).parse(rest)
        workload = cls(kind)
        workload.dirty_percent = options.integer("dirty_percent", workload.dirty_percent)
        workload.dirty_rate = options.number("dirty_rate", workload.dirty_rate)
        workload.validate()
        return workload

    def validate(self) -> None:
        if self.kind not in WORKLOADS:
            raise UsageError(f"unknown workload {self.kind!r}")
        if not 0 <= self.dirty_percent <= 100:
            raise UsageError(f"dirty_percent must be 0..100, got {self.dirty_percent}")
        if self.dirty_rate < 0:
            raise UsageError(f"dirty_rate must be >= 0, got {self.dirty_rate}")

    def to_json(self) -> dict:
        return {"kind": self.kind, "dirty_percent": self.dirty_percent, "dirty_rate": self.dirty_rate}

    @classmethod
    def from_json(cls, data: dict) -> Workload:
        """A peer's workload, every field of its exact type (raises JsonRefused or UsageError)."""
        workload = cls(get_str(data, "kind", "workload"), get_int(data, "dirty_percent", "workload", high=100),
                       get_number(data, "dirty_rate", "workload", 0, 1 << 20))
        workload.validate()
        return workload


@dataclass
class VmConfig:
    """A VM's configuration; :meth:`to_json` gives Cloud Hypervisor's ``vm_config`` shape."""

    cpus: int = 1
    zones: list[ZoneConfig] = field(default_factory=lambda: [ZoneConfig("mem0", 512 << 20, True)])
    workload: Workload = field(default_factory=Workload)

    @classmethod
    def from_args(cls, cpus: str | None, memory: str | None, zones: list[str], workload: str | None) -> VmConfig:
        """``--cpus``, ``--memory``, ``--memory-zone`` (repeatable) and ``--workload``, by Cloud Hypervisor's rules.

        Each option takes CH's whole key set (``vmm/src/config.rs``): the keys
        a chmig VM has are read as CH reads them, the others are refused by
        name.  Two deliberate differences: memory is ``shared=on`` unless told
        otherwise (a chmig VM can then always migrate locally), and
        ``--memory-zone`` may be given with a non-zero ``--memory size``
        (the main zone and the extra zones are each their own KVM slot);
        ``--memory size=0`` leaves only the zones, as in CH.
        """
        config = cls(workload=Workload.parse(workload))
        options = cpus_parser().parse(cpus or "")
        config.cpus = options.integer("boot", 1, maximum=U32_MAX)  # CH: u32
        options = memory_parser().parse(memory or "")
        main_zone = ZoneConfig("mem0", options.size("size", DEFAULT_MEMORY), options.toggle("shared", True))
        config.zones = [main_zone] if main_zone.size else []
        for text in zones:
            options = memory_zone_parser().parse(text)
            zone_id = options.get("id")
            if zone_id is None:  # CH: ParseMemoryZoneIdMissing
                raise UsageError("id is required: expected id=NAME[,size=SIZE][,shared=on|off]",
                                 where="--memory-zone")
            config.zones.append(ZoneConfig(zone_id, options.size("size", DEFAULT_MEMORY),
                                           options.toggle("shared", True)))
        config.validate()
        return config

    def validate(self) -> None:
        if not 1 <= self.cpus <= guest.MAX_VCPUS:
            raise UsageError(f"boot vCPUs must be 1..{guest.MAX_VCPUS}, got {self.cpus}")
        if not self.zones:
            raise UsageError("the VM has no memory")
        ids = [z.id for z in self.zones]
        if len(set(ids)) != len(ids):
            raise UsageError("memory zone ids must be unique")
        for zone in self.zones:
            if zone.size <= 0 or zone.size % (2 << 20):
                raise UsageError(f"memory zone {zone.id!r}: size must be a positive multiple of 2 MiB")
        if self.zones[0].size < 2 << 20:
            raise UsageError("the first memory zone must be at least 2 MiB (the guest program lives there)")
        self.workload.validate()

    def to_json(self) -> dict:
        main, *extra = self.zones
        return {
            "cpus": {"boot_vcpus": self.cpus, "max_vcpus": self.cpus},
            "memory": {
                "size": main.size,
                "shared": main.shared,
                "zones": [{"id": z.id, "size": z.size, "shared": z.shared} for z in extra],
            },
            "workload": self.workload.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict) -> VmConfig:
        """Validate a peer's ``vm_config`` before anything is allocated."""
        try:
            memory = get_object(data, "memory", "vm_config")
            zones = [ZoneConfig("mem0", get_int(memory, "size", "memory"),
                                get_bool(memory, "shared", "memory", default=True))]
            for zone in get_list(memory, "zones", "memory", max_items=DEFAULT_LIMITS.max_slots, default=[]):
                zones.append(ZoneConfig(get_str(zone, "id", "memory zone"), get_int(zone, "size", "memory zone"),
                                        get_bool(zone, "shared", "memory zone", default=True)))
            cpus = get_int(get_object(data, "cpus", "vm_config"), "boot_vcpus", "cpus", high=guest.MAX_VCPUS)
            config = cls(cpus, zones, Workload.from_json(get_object(data, "workload", "vm_config")))
            config.validate()
        except JsonRefused as exc:
            raise VmError(f"malformed vm_config: {exc}", where="VM config") from None
        except UsageError as exc:
            raise VmError(f"unacceptable vm_config: {exc.message}", where="VM config") from None
        return config


def cpus_parser() -> OptionParser:
    """``--cpus``: CH's keys (``CpusConfig::parse``); only ``boot`` is supported."""
    return OptionParser("--cpus").add_all(CPUS_SUPPORTED).add_unsupported(*CPUS_UNSUPPORTED)


def memory_parser() -> OptionParser:
    """``--memory``: CH's keys (``MemoryConfig::parse``); ``size`` and ``shared`` are supported."""
    parser = OptionParser("--memory")
    for key in ("size", "file", "mergeable", "hotplug_method", "hotplug_size", "hotplugged_size", "shared",
                "hugepages", "hugepage_size", "prefault", "reserve", "thp"):  # CH's order
        if key in MEMORY_SUPPORTED:
            parser.add(key)
        else:
            parser.add_unsupported(key)
    return parser


def memory_zone_parser() -> OptionParser:
    """``--memory-zone``: CH's keys; ``id``, ``size`` and ``shared`` are supported."""
    parser = OptionParser("--memory-zone")
    for key in ("id", "size", "file", "shared", "hugepages", "hugepage_size", "host_numa_node", "hotplug_size",
                "hotplugged_size", "prefault", "reserve", "mergeable"):  # CH's order
        if key in ZONE_SUPPORTED:
            parser.add(key)
        else:
            parser.add_unsupported(key)
    return parser


# ---------------------------------------------------------------------------------------------
# Serial console
# ---------------------------------------------------------------------------------------------


def parse_serial(spec: str) -> tuple[str, str | None]:
    """``--serial`` by CH's ``SerialConfig::parse``: the mode (``off``, ``null``, ``tty``, ``file``) and file path.

    CH's flags ``off``, ``pty``, ``tty``, ``null`` and keys ``file=``,
    ``socket=``; when several are given the first of that order wins, as in
    CH.  ``pty`` and ``socket=`` are refused by name: a chmig VMM has no pseudo
    terminal or socket for its serial port.
    """
    parser = (OptionParser("--serial").add_valueless("off")
              .add_unsupported("pty", valueless=True, reason="chmig's serial port has no pseudo terminal")
              .add_valueless("tty").add_valueless("null").add("file")
              .add_unsupported("socket", reason="chmig's serial port has no socket"))
    parser.parse(spec)
    for mode in ("off", "tty", "null"):
        if parser.is_set(mode):
            return mode, None
    if parser.is_set("file"):
        path = parser.get("file")
        if path is None:  # CH: ConsoleFileMissing
            raise UsageError("file needs a path: file=PATH", where="--serial")
        return "file", path
    if parser.is_set("socket"):  # only an empty "socket=" gets here
        raise UsageError("socket is a Cloud Hypervisor option that chmig does not support (chmig's serial port "
                         "has no socket)", where="--serial")
    # CH: ParseConsoleInvalidModeGiven
    raise UsageError(f"expected off, null, tty or file=PATH, got {spec!r}", where="--serial")


class Serial:
    """COM1's transmit side: bytes from the guest, written out a line at a time.

    ``spec`` is ``--serial``'s value (:func:`parse_serial`): ``null`` (CH's
    default) and ``off`` discard the output — chmig's COM1 is write-only, so
    "no device" and "a device writing nowhere" look the same to the guest —
    ``tty`` writes it to standard output, ``file=PATH`` appends it to PATH.
    """

    def __init__(self, spec: str = "null") -> None:
        self.spec = spec
        self.mode, path = parse_serial(spec)
        self._out: BinaryIO | None = None
        if self.mode == "tty":
            self._out = sys.stdout.buffer
        elif self.mode == "file" and path is not None:
            try:
                self._out = open(path, "ab", buffering=0)
            except OSError as exc:
                raise UsageError(f"cannot open {path}: {exc.strerror}", where="--serial") from None
        self._line = bytearray()
        self._lock = threading.Lock()

    def put(self, byte: int) -> None:
        if self._out is None:
            return
        with self._lock:
            self._line.append(byte)
            if byte == 0x0A or len(self._line) >= 256:
                self._out.write(bytes(self._line))
                self._out.flush()
                self._line.clear()

    def close(self) -> None:
        if self._out is not None and self.mode == "file":
            self._out.close()


# ---------------------------------------------------------------------------------------------
# The VM
# ---------------------------------------------------------------------------------------------


class VmState:
    CREATED = "Created"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"


def _ignore_kick(signum: int, frame: object) -> None:
    """The kick's handler only has to exist: its delivery makes KVM_RUN return EINTR."""


def install_kick_handler() -> None:
    """Install the vCPU kick handler; Python allows that only on the main thread.

    It is installed when this module is first imported (on the main thread in
    every chmig process), because a VM may later be built on any thread — a
    migration arriving through the API builds it on a request thread — and a
    kick without a handler would kill the process (SIGUSR1's default action).
    """
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        if threading.current_thread() is not threading.main_thread():
            raise VmError("the vCPU kick handler must be installed from the main thread before a VM is built")
        signal.signal(KICK_SIGNAL, _ignore_kick)


if threading.current_thread() is threading.main_thread():
    install_kick_handler()


class Vm:
    """A KVM VM with its memory, vCPUs and the chmig guest's devices."""

    def __init__(self, config: VmConfig, memory: GuestMemory, serial: Serial, cpuid: list[dict] | None = None) -> None:
        """Build the VM around ``memory`` and ``serial``, which it owns from now on (closed even if this fails)."""
        self.config = config
        self.memory = memory
        self.serial = serial
        self.vcpus: list[Vcpu] = []
        self.kvm: Kvm | None = None
        self.vmfd = None
        try:
            install_kick_handler()
            self.kvm = Kvm()
            self.cpuid = cpuid if cpuid is not None else self.kvm.supported_cpuid()
            self.vmfd = self.kvm.create_vm()
            self.vmfd.set_identity_map_addr(0xFFFBC000)
            self.vmfd.set_tss_addr(0xFFFBD000)
            self._dirty_logging = False
            self._register_slots()
            for index in range(config.cpus):
                vcpu = self.vmfd.create_vcpu(index)
                self.vcpus.append(vcpu)
                vcpu.set_cpuid2(self.cpuid)
            self.msr_indices = self.kvm.msr_index_list()
        except BaseException:
            self._release()
            raise
        self.state = VmState.CREATED
        self.failure: str | None = None
        self.status = [dict.fromkeys(("rounds", "errors", "last_error_gpa", "ticks", "last_error_kind"), 0)
                       for _ in range(config.cpus)]
        self._cond = threading.Condition()
        self._want_running = False
        self._stopping = False
        self._parked: set[int] = set()
        self._threads: list[threading.Thread] = []
        self._pace_next = [0.0] * config.cpus
        self.on_stop: Callable[[Vm], None] | None = None
        self._halted = False

    # -- construction ------------------------------------------------------------------------

    def _register_slots(self) -> None:
        flags = KVM_MEM_LOG_DIRTY_PAGES if self._dirty_logging else 0
        for region in self.memory.regions:
            self.vmfd.set_user_memory_region(region.mapping.slot, region.gpa, region.size, region.host_address, flags)

    def boot(self) -> None:
        """Write the guest program and its page tables, and point every vCPU at its entry."""
        w = self.config.workload
        guest.build_boot_image(self.memory.write, self.memory.ram_ranges(), self.config.cpus, w.kind, w.dirty_percent)
        for index, vcpu in enumerate(self.vcpus):
            guest.setup_long_mode(vcpu, index, w.kind)

    def start(self, paused: bool = False) -> None:
        """Start the vCPU threads; they run the guest unless ``paused``."""
        if self._threads:
            raise VmError("the VM was already started")
        self._want_running = not paused
        # Set before the threads run: a vCPU that fails at once must be able to say Shutdown.
        self.state = VmState.PAUSED if paused else VmState.RUNNING
        for vcpu in self.vcpus:
            vcpu.immediate_exit = paused
            thread = threading.Thread(target=self._vcpu_loop, args=(vcpu,), name=f"vcpu{vcpu.index}", daemon=True)
            self._threads.append(thread)
            thread.start()
        if paused:
            self._wait_parked()

    # -- pause / resume / shutdown -----------------------------------------------------------

    def pause(self) -> None:
        if self.state == VmState.PAUSED:
            return
        if self.state != VmState.RUNNING:
            raise VmError(f"cannot pause a VM that is {self.state}" + (f" ({self.failure})" if self.failure else ""))
        with self._cond:
            self._want_running = False
            for vcpu in self.vcpus:
                vcpu.immediate_exit = True
            self._cond.notify_all()
        self._kick_all()
        self._wait_parked()
        self.state = VmState.PAUSED

    def resume(self) -> None:
        if self.state == VmState.RUNNING:
            return
        if self.state != VmState.PAUSED:
            raise VmError(f"cannot resume a VM that is {self.state}")
        with self._cond:
            for vcpu in self.vcpus:
                vcpu.immediate_exit = False
            self._want_running = True
            self._cond.notify_all()
        self.state = VmState.RUNNING

    def shutdown(self) -> None:
        """Stop every vCPU thread and join them; one that does not stop within 10 s is reported."""
        if self.state == VmState.SHUTDOWN and not self._threads:
            return
        self._tell_vcpus_to_stop()
        deadline = time.monotonic() + 10
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive() and t is not threading.current_thread()]
        self._threads.clear()
        self.state = VmState.SHUTDOWN
        if stuck:
            log.error("vCPU threads did not stop within 10 s: %s", ", ".join(stuck))
            raise StuckThreadError(f"vCPU threads did not stop within 10 s: {', '.join(stuck)}", where="VM")

    def close(self) -> None:
        """Stop the vCPUs and release everything the VM owns: KVM fds, guest memory, serial (idempotent)."""
        try:
            self.shutdown()
        finally:
            self._release()

    def _release(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.vmfd is not None:
            self.vmfd.close()
        if self.kvm is not None:
            self.kvm.close()
        self.memory.close()
        self.serial.close()

    def _kick_all(self) -> None:
        for thread in self._threads:
            if thread.ident is not None and thread.is_alive() and thread is not threading.current_thread():
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass

    def _wait_parked(self) -> None:
        with self._cond:
            alive = lambda: {i for i, t in enumerate(self._threads) if t.is_alive()}  # noqa: E731
            if not self._cond.wait_for(lambda: alive() <= self._parked, timeout=10):
                raise VmError("vCPUs did not stop within 10 s")

    # -- the vCPU thread -----------------------------------------------------------------------

    def _vcpu_loop(self, vcpu: Vcpu) -> None:
        park_allowed = True
        try:
            while True:
                if park_allowed:
                    with self._cond:
                        while not self._want_running and not self._stopping:
                            self._parked.add(vcpu.index)
                            self._cond.notify_all()
                            self._cond.wait()
                        if self._stopping:
                            return
                        self._parked.discard(vcpu.index)
                reason = vcpu.run()
                # Park only after an EINTR exit: that KVM_RUN completed any pending I/O.
                park_allowed = reason == KVM_EXIT_INTR
                if not park_allowed:
                    self._handle_exit(vcpu, reason)
        except Exception as exc:  # a vCPU failure stops the VM; the owner sees self.failure
            self.failure = f"vCPU {vcpu.index}: {exc}"
            log.error("vCPU %d stopped the VM: %s", vcpu.index, exc)
            with self._cond:
                self._stopping = True
                self._want_running = False
                self._cond.notify_all()
            self.state = VmState.SHUTDOWN
            self._kick_all()
        finally:
            with self._cond:
                self._parked.add(vcpu.index)
                self._cond.notify_all()
            if self.on_stop is not None and self.failure is not None and not self._halted:
                self.on_stop(self)

    def _handle_exit(self, vcpu: Vcpu, reason: int) -> None:
        if reason == KVM_EXIT_IO:
            direction, size, port, count, data = vcpu.io_exit()
            if direction == KVM_EXIT_IO_IN:
                data[:] = bytes([LSR_IDLE if port == COM1_LSR else 0xFF]) * len(data)
                return
            value = int.from_bytes(data[:size], "little")
            self._port_out(vcpu, port, value, bytes(data))
        elif reason == KVM_EXIT_HLT:
            with self._cond:
                self._cond.wait_for(lambda: not self._want_running or self._stopping, timeout=HLT_WAIT_S)
        else:
            raise KvmError(f"unexpected exit: {vcpu.describe_exit()}", where=f"vCPU {vcpu.index}")

    def _port_out(self, vcpu: Vcpu, port: int, value: int, raw: bytes) -> None:
        if port == COM1_BASE:
            for byte in raw:
                self.serial.put(byte)
        elif port == guest.PORT_ROUND or port == guest.PORT_TICK:
            self._refresh_status(vcpu.index)
        elif port == guest.PORT_ERROR:
            status = self._refresh_status(vcpu.index)
            log.error(
                "guest vCPU %d: %s at gpa %#x (round %d, %d errors so far)",
                vcpu.index,
                guest.ERROR_KINDS.get(status.get("last_error_kind", 0), "unknown error"),
                status.get("last_error_gpa", 0),
                status.get("rounds", 0),
                status.get("errors", 0),
            )
        elif port == guest.PORT_PACE:
            self._pace(vcpu.index, value * PAGE_SIZE)
        elif port >= COM1_BASE and port < COM1_BASE + 8:
            pass  # other UART registers: the guest only transmits
        else:
            log.debug("vCPU %d: write of %#x to unknown port %#x ignored", vcpu.index, value, port)

    def _refresh_status(self, index: int) -> dict:
        if not self.memory.readable(guest.status_addr(index), guest.STATUS_SIZE):
            # Postcopy has not brought this page in yet: the counters from State stand (reading it here
            # would block this thread with the GIL held — see chmig.postcopy).
            return self.status[index]
        status = guest.read_status(self.memory.read, index)
        self.status[index].update({k: status[k] for k in self.status[index] if k in status})
        return self.status[index]

    def _pace(self, index: int, written: int) -> None:
        rate = self.config.workload.dirty_rate
        if rate <= 0:
            return
        per_vcpu = rate * (1 << 20) / self.config.cpus
        now = time.monotonic()
        self._pace_next[index] = max(self._pace_next[index], now) + written / per_vcpu
        delay = self._pace_next[index] - now
        if delay > 0:
            with self._cond:
                self._cond.wait_for(lambda: not self._want_running or self._stopping, timeout=delay)

    def halt(self, reason: str, wait_s: float = 2.0) -> None:
        """Stop the vCPUs for good because the VM cannot go on (postcopy lost its source).

        The vCPUs are told to stop and kicked, and given ``wait_s`` to leave
        (a kick interrupts a vCPU waiting for a page on Linux ≥ 6.x); one still
        waiting for a page is released when the userfaultfd closes, and
        :meth:`shutdown` joins them all.
        """
        self._halted = True  # a decision of the VMM, not a vCPU failure: on_stop is not called
        self.failure = reason
        self._tell_vcpus_to_stop()
        deadline = time.monotonic() + wait_s
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _tell_vcpus_to_stop(self) -> None:
        """Every vCPU thread leaves KVM_RUN and returns (for good); nobody waits here."""
        with self._cond:
            self._stopping = True
            self._want_running = False
            for vcpu in self.vcpus:
                vcpu.immediate_exit = True
            self._cond.notify_all()
        self._kick_all()

    # -- dirty logging ---------------------------------------------------------------------------

    def start_dirty_log(self) -> None:
        """Turn on ``KVM_MEM_LOG_DIRTY_PAGES`` on every slot (clears earlier logs)."""
        self._dirty_logging = True
        self._register_slots()

    def stop_dirty_log(self) -> None:
        if self._dirty_logging:
            self._dirty_logging = False
            self._register_slots()

    def dirty_table(self) -> MemoryRangeTable:
        """Pages the guest wrote since the last call (reading the log clears it)."""
        table = MemoryRangeTable()
        for region in self.memory.regions:
            bitmap = self.vmfd.get_dirty_log(region.mapping.slot, region.size)
            table.extend(MemoryRangeTable.from_dirty_bitmap(bitmap, region.gpa, PAGE_SIZE))
        return table

    # -- state --------------------------------------------------------------------------------------

    def capture_state(self) -> dict:
        """The whole VM (vCPUs, devices, guest counters) as a JSON document; the VM must be paused."""
        if self.state not in (VmState.PAUSED, VmState.CREATED):
            raise VmError(f"state can only be captured from a paused VM, this one is {self.state}")
        self.refresh_status()
        return {
            "version": 1,
            "vcpus": [vcpu.get_state(self.msr_indices) for vcpu in self.vcpus],
            "devices": {
                "serial": {"port": COM1_BASE},
                "guest": {"vcpus": [dict(s) for s in self.status]},
            },
        }

    def restore_state(self, state: dict) -> None:
        """Load a captured document into this (created, never run) VM."""
        if self.state != VmState.CREATED:
            raise VmError(f"state can only be restored into a new VM, this one is {self.state}")
        try:
            vcpus = state["vcpus"]
            counters = state["devices"]["guest"]["vcpus"]
        except (KeyError, TypeError) as exc:
            raise VmError(f"malformed VM state: missing {exc}", where="VM state") from None
        if (not isinstance(vcpus, list) or not isinstance(counters, list) or len(vcpus) != len(self.vcpus)
                or len(counters) != len(self.vcpus)):
            raise VmError(
                f"state describes {len(vcpus) if isinstance(vcpus, list) else '?'} vCPUs, the VM has {len(self.vcpus)}",
                where="VM state",
            )
        for vcpu, vcpu_state in zip(self.vcpus, vcpus):
            vcpu.set_state(vcpu_state)
        try:
            for mine, theirs in zip(self.status, counters):
                for key in mine:
                    mine[key] = get_int(theirs, key, "guest counters", default=0)
        except JsonRefused as exc:
            raise VmError(f"malformed VM state: {exc}", where="VM state") from None

    def refresh_status(self) -> None:
        """Re-read every vCPU's status block from guest memory (the guest updates it before reporting)."""
        if self.state in (VmState.RUNNING, VmState.PAUSED):
            for index in range(self.config.cpus):
                self._refresh_status(index)

    def info(self) -> dict:
        self.refresh_status()
        guest_info = {
            "workload": self.config.workload.kind,
            "rounds": sum(s["rounds"] for s in self.status),
            "errors": sum(s["errors"] for s in self.status),
            "last_error_gpa": max((s["last_error_gpa"] for s in self.status if s["errors"]), default=0),
            "ticks": sum(s["ticks"] for s in self.status),
            "vcpus": [dict(s) for s in self.status],
        }
        info = {"state": self.state, "config": self.config.to_json(), "guest": guest_info,
                "memory_actual_size": self.memory.total_size}
        if self.failure:
            info["error"] = self.failure
        return info

    def migration_config(self) -> dict:
        """Cloud Hypervisor's ``VmMigrationConfig``: what the destination needs to build this VM."""
        return {
            "vm_config": self.config.to_json(),
            "common_cpuid": self.cpuid,
            "memory_manager_data": {"guest_ram_mappings": [m.to_json() for m in self.memory.mappings]},
        }
