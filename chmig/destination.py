"""Building a VM from a migration's parts — MemoryFds, Config, memory, State, Complete — with no socket.

:class:`Destination` does the work of each destination step on payloads that
were already read and parsed: the JSON bytes of Config and State, the slot
and file descriptor of a MemoryFd.  The receiver (:mod:`chmig.receive`) feeds
it from the main connection; a restore from a snapshot directory can feed it
from files, in the same order, with the same checks.

Everything a peer sends is validated before anything is allocated.  A bad
input raises :class:`~chmig.errors.ProtocolError` (the peer's fault); a
failure of this host (an fd that cannot be mapped, KVM refusing) raises
:class:`~chmig.errors.MigrationError` naming the step.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from . import protocol as p
from .errors import ChmigError, KvmError, MigrationError, ProtocolError, VmError
from .jsonlimits import U32_MAX, JsonRefused, get_int
from .memory import GuestMemory, GuestRamMapping, host_available_memory, validate_layout
from .vm import Serial, Vm, VmConfig

log = logging.getLogger(__name__)


class Destination:
    """One VM being built from incoming parts; :meth:`complete` hands it over, :meth:`discard` drops it."""

    def __init__(self, serial_spec: str = "off", limits: p.Limits = p.DEFAULT_LIMITS) -> None:
        self.serial_spec = serial_spec
        self.limits = limits
        self.vm: Vm | None = None
        #: MemoryFds received so far, by slot (owned here until Config hands them to the zones).
        self.memory_fds: dict[int, int] = {}
        #: "local" when the memory arrived as MemoryFds, else "precopy".
        self.mode = "precopy"
        #: How long restoring State and resuming took (for the statistics).
        self.restore_ms: float | None = None
        self.resume_ms: float | None = None

    @property
    def memory(self) -> GuestMemory | None:
        return self.vm.memory if self.vm is not None else None

    def add_memory_fd(self, slot: int, fd: int) -> None:
        """Step *MemoryFd*: keep ``fd`` (owned from now on) as the backing of ``slot``."""
        try:
            p.check_memory_fd(slot, self.memory_fds, self.limits)
        except ProtocolError:
            os.close(fd)
            raise
        self.memory_fds[slot] = fd

    def configure(self, payload: bytes) -> Vm:
        """Step *Config*: validate the whole document, then allocate memory and build the (paused) VM."""
        document = p.decode_json_payload(payload, "Config", self.limits)
        try:
            config = VmConfig.from_json(document["vm_config"])
            mappings = [GuestRamMapping.from_json(m) for m in document["memory_manager_data"]["guest_ram_mappings"]]
            cpuid = self._check_cpuid(document.get("common_cpuid"))
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            raise ProtocolError(f"malformed Config: {exc!r}", where="Config") from None
        except VmError as exc:
            raise ProtocolError(f"unacceptable Config: {exc.message}", where="Config") from None
        try:
            validate_layout(config.zones, mappings, self.limits.max_slots)
        except VmError as exc:
            raise ProtocolError(exc.message, where="Config") from None
        fds_by_zone, fds_by_slot = self._memory_fds_by_zone(config, mappings)
        handed_over = [*fds_by_zone.values(), *fds_by_slot.values()]
        try:
            if not handed_over:
                self._check_fits_host(sum(z.size for z in config.zones))
            serial = Serial(self.serial_spec)
        except BaseException:
            for fd in handed_over:
                os.close(fd)
            raise
        try:
            memory = GuestMemory.adopt(config.zones, mappings, fds_by_zone, slot_fds=fds_by_slot)
        except BaseException as exc:
            serial.close()
            if isinstance(exc, VmError):
                raise ProtocolError(exc.message, where="Config") from None
            if isinstance(exc, OSError):
                raise MigrationError(f"cannot map guest memory: {exc}", where="Config") from None
            raise
        try:
            self.vm = Vm(config, memory, serial, cpuid=cpuid)
        except KvmError as exc:
            raise MigrationError(f"cannot build the VM: {exc}", where="Config") from None
        self.mode = "local" if handed_over else "precopy"
        return self.vm

    @staticmethod
    def _check_fits_host(size: int) -> None:
        """Refuse RAM this host cannot give now, before allocating any (memory handed over as fds is not ours)."""
        available = host_available_memory()
        if available is not None and size > available:
            raise MigrationError(f"guest RAM of {size >> 20} MiB does not fit this host "
                                 f"({available >> 20} MiB available)", where="Config")

    def _check_cpuid(self, entries: object) -> list[dict] | None:
        if entries is None:
            return None
        limit = self.limits.max_cpuid_entries
        if not isinstance(entries, list) or len(entries) > limit:
            raise ProtocolError(f"common_cpuid must be a list of at most {limit} entries", where="Config")
        try:
            return [{k: get_int(entry, k, "common_cpuid entry", high=U32_MAX, default=0)
                     for k in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")} for entry in entries]
        except JsonRefused as exc:
            raise ProtocolError(f"malformed {exc}", where="Config") from None

    def _memory_fds_by_zone(self, config: VmConfig,
                            mappings: list[GuestRamMapping]) -> tuple[dict[str, int], dict[int, int]]:
        """Match MemoryFds (by slot) to zones: one fd per zone whose slots all came as one file (the duplicates
        are closed), else one fd per slot (Cloud Hypervisor's offload daemon sends one memfd per slot).

        Every slot of a shared zone needs its MemoryFd.
        Returns ``(fds by zone id, fds by slot)``, owned by the caller from then on.
        """
        if not self.memory_fds:
            return {}, {}
        slots = {m.slot: m for m in mappings}
        by_zone: dict[str, int] = {}
        by_slot: dict[int, int] = {}
        try:
            given: dict[str, dict[int, int]] = {}
            for slot, fd in self.memory_fds.items():
                if slot not in slots:
                    raise ProtocolError(f"MemoryFd for slot {slot}, which the Config does not have", where="Config")
                given.setdefault(slots[slot].zone_id, {})[slot] = fd
            for zone in config.zones:
                fds = given.get(zone.id)
                if not fds:
                    raise ProtocolError(f"local migration without a MemoryFd for zone {zone.id!r}", where="Config")
                if not zone.shared:
                    raise ProtocolError(f"zone {zone.id!r} is private, but arrived as a MemoryFd", where="Config")
                # Every slot needs its own MemoryFd (the sender sends one per slot): a slot without one would
                # read zeros from somebody else's file.
                missing = [m.slot for m in sorted(mappings, key=lambda m: m.slot)
                           if m.zone_id == zone.id and m.slot not in fds]
                if missing:
                    raise ProtocolError(f"no MemoryFd for slot {missing[0]} of zone {zone.id!r} (a local migration "
                                        "sends one per slot)", where="Config")
                files = {(stat.st_dev, stat.st_ino) for stat in map(os.fstat, fds.values())}
                if len(files) == 1:
                    # One file sent once per slot: the zone maps it once, as it would its own memfd.
                    first, *duplicates = sorted(fds)
                    for slot in duplicates:
                        os.close(self.memory_fds.pop(slot))
                    by_zone[zone.id] = fds[first]
                    continue
                by_slot.update(fds)
        except BaseException:
            self._close_memory_fds()
            raise
        # From here on the caller owns the fds.
        self.memory_fds = {}
        return by_zone, by_slot

    def fill_from_file(self, gpa: int, length: int, fd: int, offset: int) -> None:
        """Memory from a file instead of a connection (a restore): ``length`` bytes at ``offset`` into RAM.

        The range is checked against guest RAM first; ``preadv`` reads straight
        into the guest mapping, so Python copies nothing.
        """
        memory = self._require_vm("memory").memory
        try:
            pieces = list(memory.split(p.MemoryRange(gpa, length)))
        except VmError as exc:
            raise ProtocolError(exc.message, where="memory") from None
        for piece_gpa, piece_length in pieces:
            done = 0
            with memory.view(piece_gpa, piece_length) as view:
                while done < piece_length:
                    got = os.preadv(fd, [view[done:]], offset + (piece_gpa - gpa) + done)
                    if got == 0:
                        raise MigrationError(f"the file ends before {length} bytes at offset {offset}",
                                             where="memory")
                    done += got

    def restore(self, payload: bytes, ready: Callable[[], None] | None = None) -> None:
        """Step *State*: restore vCPUs and devices into the new VM, which stays paused.

        ``ready`` is the caller's last check, once the document is known to be
        well formed (e.g. that memory arrived).  A State that KVM refuses to
        load counts as the peer's fault: the document described vCPUs this
        host's KVM cannot take.
        """
        begin = time.monotonic()
        vm = self._require_vm("State")
        state = p.decode_json_payload(payload, "State", self.limits)
        if not isinstance(state, dict):
            raise ProtocolError("State must be a JSON object", where="State")
        if ready is not None:
            ready()
        try:
            vm.restore_state(state)
        except (KvmError, VmError) as exc:
            raise ProtocolError(f"unusable State: {exc}", where="State") from None
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            raise ProtocolError(f"malformed State: {exc!r}", where="State") from None
        vm.start(paused=True)
        self.restore_ms = round((time.monotonic() - begin) * 1000, 3)

    def complete(self, resume: bool) -> Vm:
        """Step *Complete* (``resume``) or *CompletePaused*: the VM is ready to hand over."""
        vm = self._require_vm("Complete")
        if resume:
            begin = time.monotonic()
            vm.resume()
            self.resume_ms = round((time.monotonic() - begin) * 1000, 3)
        return vm

    def take(self) -> Vm:
        """Hand the finished VM to its new owner; this Destination forgets it."""
        vm = self._require_vm("hand-over")
        self.vm = None
        return vm

    def _require_vm(self, step: str) -> Vm:
        if self.vm is None:
            raise MigrationError("no VM was configured", where=step)
        return self.vm

    def _close_memory_fds(self) -> None:
        for fd in self.memory_fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.memory_fds.clear()

    def discard(self) -> None:
        """Throw the half-built VM (and its memory) away, and close any MemoryFd not yet used."""
        if self.vm is not None:
            try:
                self.vm.close()
            except ChmigError as exc:
                log.warning("discarding the VM: %s", exc)
            self.vm = None
        self._close_memory_fds()
