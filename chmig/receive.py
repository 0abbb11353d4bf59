"""The destination side of a migration: the receiver state machine driving a real VM.

The main connection is read one request at a time.  For each header the
:class:`~chmig.protocol.ReceiverMachine` decides — before any payload is read
or anything allocated — whether the command is allowed now; then the step
function for the command does its work; then Ok is answered.  Any error answers
Error and aborts: the half-built VM is discarded.

After Config, an accept thread takes additional connections on the same
listener.  Each gets its own thread, which reads the 2-byte role within 10 s;
``PrecopyMemory`` connections may then send only Memory requests, each
answered Ok.  At most 128 are accepted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from . import protocol as p
from .errors import ChmigError, KvmError, MigrationError, ProtocolError, TransportError, UsageError
from .memory import GuestMemory, GuestRamMapping, validate_layout
from .stats import MigrationStats
from .transfer import receive_memory
from .transport import ConnectionClosed, Connection, Listener, TlsConfig, listen, parse_url
from .vm import Serial, Vm, VmConfig

log = logging.getLogger(__name__)


@dataclass
class ReceiveOptions:
    """``VmReceiveMigrationData``."""

    receiver_url: str
    tls_dir: str | None = None
    memory_mode: str = "precopy"
    #: Fault in each range with MADV_POPULATE_WRITE just before its data arrives (see bench/precopy.py).
    populate: bool = True

    @classmethod
    def from_api(cls, body: dict) -> ReceiveOptions:
        options = cls(**body)
        try:
            parse_url(options.receiver_url)
        except TransportError as exc:
            raise UsageError(f"receiver_url {exc}") from None
        if options.memory_mode.lower() != "precopy":
            raise MigrationError("memory_mode=postcopy is not implemented yet", where="receive-migration")
        return options

    def tls(self) -> TlsConfig | None:
        return TlsConfig.from_dir(self.tls_dir, role="server") if self.tls_dir else None


class AdditionalConnections:
    """The accept thread and one thread per worker connection (``ReceiveAdditionalConnections``)."""

    def __init__(self, listener: Listener, memory: GuestMemory, limits: p.Limits, stats: MigrationStats,
                 populate: bool = True) -> None:
        self.listener = listener
        self.populate = populate
        self.memory = memory
        self.limits = limits
        self.stats = stats
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._conns: list[Connection] = []
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept_loop, name="migrate-receive-accept")
        self._accepter.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except TransportError as exc:
                if "aborted" in str(exc):
                    return
                log.warning("additional connection refused: %s", exc)
                continue
            with self._lock:
                if len(self._threads) >= self.limits.max_connections:
                    log.warning("dropping %s: more than %d additional connections", conn.peer,
                                self.limits.max_connections)
                    conn.close()
                    continue
                n = len(self._threads)
                thread = threading.Thread(target=self._serve, args=(conn,), name=f"migrate-receive-memory-{n}")
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: Connection) -> None:
        speaks_requests = False  # until the role is known, there is nobody to answer Error to
        try:
            conn.set_timeout(p.ROLE_HEADER_TIMEOUT_S)
            role = p.ConnectionRole.decode(conn.read_exact(p.ROLE_SIZE, what="connection role"))
            if role is not p.ConnectionRole.PRECOPY_MEMORY:
                raise ProtocolError(f"connection role {role.name} is not supported here", where=conn.peer)
            conn.set_timeout(None)
            conn.set_nodelay()
            speaks_requests = True
            while True:
                try:
                    header = conn.read_exact(p.HEADER_SIZE, what="request header")
                except ConnectionClosed:
                    return  # the sender is done with this connection
                request = p.Request.decode(header)
                if request.command is not p.Command.MEMORY:
                    raise ProtocolError(
                        f"only Memory requests are allowed on additional connections, got {request.command.wire_name}",
                        where=conn.peer,
                    )
                p.check_request_length(request, self.limits)
                received = receive_memory(conn, self.memory, request, self.populate)
                with self._lock:
                    self.stats.total_bytes += received
                conn.write_all(p.Response.ok().encode())
        except ChmigError as exc:
            log.error("dropping additional connection %s: %s", conn.peer, exc)
            with self._lock:
                self.errors.append(str(exc))
            if speaks_requests:
                try:
                    conn.write_all(p.Response.error().encode())
                except ChmigError:
                    pass
        finally:
            conn.close()

    def finish(self, timeout: float = 30.0) -> None:
        """Stop accepting and wait for the workers (the sender closes them after the last iteration)."""
        self.listener.abort()
        self._accepter.join()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            thread.join(max(0.0, deadline - time.monotonic()))
        self.close()

    def close(self) -> None:
        """Cut every worker connection (a blocked reader wakes with an error) and join the threads."""
        self.listener.abort()
        if self._accepter.is_alive():
            self._accepter.join()
        for conn in list(self._conns):
            conn.shutdown()
        for thread in list(self._threads):
            thread.join(timeout=10)


@dataclass
class Receiver:
    """One incoming migration over ``listener``; :meth:`run` returns the VM or raises."""

    listener: Listener
    serial_spec: str = "off"
    limits: p.Limits = p.DEFAULT_LIMITS
    populate: bool = True
    stats: MigrationStats = field(default_factory=lambda: MigrationStats(role="destination"))
    vm: Vm | None = None
    memory: GuestMemory | None = None
    memory_fds: dict[int, int] = field(default_factory=dict)
    connections: AdditionalConnections | None = None
    machine: p.ReceiverMachine = field(init=False)

    def __post_init__(self) -> None:
        self.machine = p.ReceiverMachine(self.limits)

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, accept_timeout: float | None = None) -> Vm:
        """Accept the main connection and follow the protocol to Completed."""
        self.stats.url = str(self.listener.address)
        conn = self.listener.accept(timeout=accept_timeout)
        # Small requests and responses must not wait for Nagle and delayed ACKs (44 ms a time here).
        conn.set_nodelay()
        log.info("incoming migration from %s", conn.peer)
        self.stats._begin = time.monotonic()
        try:
            with conn:
                while not self.machine.finished:
                    self._step(conn)
        except BaseException as exc:
            self.discard()
            self.stats.finish("failed", str(exc))
            log.error(self.stats.summary())
            raise
        if self.machine.state is p.ReceiverState.ABORTED:
            self.discard()
            self.stats.finish("abandoned", "the sender abandoned the migration")
            log.warning(self.stats.summary())
            raise MigrationError("the sender abandoned the migration", where="receive")
        self.stats.finish("completed")
        log.info(self.stats.summary())
        assert self.vm is not None
        return self.vm

    def _step(self, conn: Connection) -> None:
        try:
            header = conn.read_exact(p.HEADER_SIZE, what="request header")
        except ConnectionClosed:
            raise MigrationError(
                f"the sender closed the connection in state {self.machine.state.value}", where="receive"
            ) from None
        try:
            request = p.Request.decode(header)
            self.machine.begin(request)
            try:
                STEPS[request.command](self, conn, request)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                # e.g. a MemoryFd that cannot be mapped: still one clear error, never a crash
                raise MigrationError(f"{exc!r}", where=request.command.wire_name) from exc
            self.machine.commit()
        except ChmigError as exc:
            self.machine.fail()
            log.error("answering Error: %s", exc)
            try:
                conn.write_all(p.Response.error().encode())
            except ChmigError:
                pass
            raise
        conn.write_all(p.Response.ok().encode())

    # -- the steps -----------------------------------------------------------------------------------

    def on_start(self, conn: Connection, request: p.Request) -> None:
        """Protocol step *Start*: the version was checked by the state machine."""
        log.debug("migration protocol version %d", request.sender_version)

    def on_memory_fd(self, conn: Connection, request: p.Request) -> None:
        """Protocol step *MemoryFd* (local migration): a slot number and its memfd."""
        data, fds = conn.recv_fds(p.MEMORY_FD_PAYLOAD_SIZE, maxfds=1)
        slot = p.decode_memory_fd_slot(data)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("MemoryFd arrived without a file descriptor", where="MemoryFd")
        if slot in self.memory_fds:
            os.close(fds[0])
            raise ProtocolError(f"a second MemoryFd for slot {slot}", where="MemoryFd")
        if len(self.memory_fds) >= 512:
            os.close(fds[0])
            raise ProtocolError("too many MemoryFd requests", where="MemoryFd")
        self.memory_fds[slot] = fds[0]

    def on_config(self, conn: Connection, request: p.Request) -> None:
        """Protocol step *Config*: validate everything, then allocate memory and build the VM."""
        payload = conn.read_exact(request.length, what="Config")
        try:
            document = json.loads(payload)
            config = VmConfig.from_json(document["vm_config"])
            mappings = [GuestRamMapping.from_json(m) for m in document["memory_manager_data"]["guest_ram_mappings"]]
            cpuid = _check_cpuid(document.get("common_cpuid"))
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"malformed Config: {exc!r}", where="Config") from None
        validate_layout(config.zones, mappings)
        fds_by_zone = self._zone_fds(config, mappings)
        memory = GuestMemory.adopt(config.zones, mappings, fds_by_zone)
        self.memory_fds.clear()  # now owned by the zones
        self.memory = memory
        self.vm = Vm(config, memory, Serial(self.serial_spec), cpuid=cpuid)
        self.stats.mode = "local" if fds_by_zone else "precopy"
        # Like Cloud Hypervisor, accept workers even if the sender may use only the main connection.
        self.connections = AdditionalConnections(self.listener, memory, self.limits, self.stats, self.populate)

    def _zone_fds(self, config: VmConfig, mappings: list[GuestRamMapping]) -> dict[str, int]:
        """Match MemoryFds (by slot) to zones: every slot of a shared zone needs one, and one file."""
        if not self.memory_fds:
            return {}
        by_zone: dict[str, int] = {}
        slots = {m.slot: m for m in mappings}
        for slot, fd in self.memory_fds.items():
            if slot not in slots:
                raise ProtocolError(f"MemoryFd for slot {slot}, which the Config does not have", where="Config")
            zone = slots[slot].zone_id
            if zone in by_zone:
                if os.fstat(by_zone[zone]).st_ino != os.fstat(fd).st_ino:
                    raise ProtocolError(f"slots of zone {zone!r} arrived as different files", where="Config")
                os.close(fd)
            else:
                by_zone[zone] = fd
        self.memory_fds = {}
        for zone in config.zones:
            if zone.id not in by_zone:
                raise ProtocolError(f"local migration without a MemoryFd for zone {zone.id!r}", where="Config")
            if not zone.shared:
                raise ProtocolError(f"zone {zone.id!r} is private, but arrived as a MemoryFd", where="Config")
        return by_zone

    def on_memory(self, conn: Connection, request: p.Request) -> None:
        """Protocol step *Memory* on the main connection (single-connection precopy)."""
        assert self.memory is not None
        self.stats.total_bytes += receive_memory(conn, self.memory, request, self.populate)

    def on_state(self, conn: Connection, request: p.Request) -> None:
        """Protocol step *State*: every worker is done; restore vCPUs and devices, VM paused."""
        payload = conn.read_exact(request.length, what="State")
        begin = time.monotonic()
        if self.connections is not None:
            self.connections.finish()
            if self.connections.errors:
                raise MigrationError(f"an additional connection failed: {self.connections.errors[0]}",
                                     where="State")
        try:
            state = json.loads(payload)
        except ValueError as exc:
            raise ProtocolError(f"State is not JSON: {exc}", where="State") from None
        assert self.vm is not None
        try:
            self.vm.restore_state(state)
        except KvmError as exc:
            raise ProtocolError(f"unusable State: {exc}", where="State") from None
        except MigrationError:
            raise
        except Exception as exc:  # a hostile document must not crash the receiver
            raise ProtocolError(f"malformed State: {exc!r}", where="State") from None
        self.vm.start(paused=True)
        self.stats.restore_ms = round((time.monotonic() - begin) * 1000, 3)

    def on_complete(self, conn: Connection, request: p.Request) -> None:
        """Protocol step *Complete*: resume the VM."""
        assert self.vm is not None
        begin = time.monotonic()
        self.vm.resume()
        self.stats.resume_ms = round((time.monotonic() - begin) * 1000, 3)

    def on_complete_paused(self, conn: Connection, request: p.Request) -> None:
        """Protocol step *CompletePaused*: the VM stays paused, as it was on the source."""

    def on_abandon(self, conn: Connection, request: p.Request) -> None:
        """Protocol step *Abandon*: answered Ok; the loop then discards the VM."""
        log.info("the sender abandoned the migration")

    # -- the end -----------------------------------------------------------------------------------------

    def discard(self) -> None:
        """Throw the half-built VM away and stop every thread this migration started."""
        if self.connections is not None:
            self.connections.close()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        for fd in self.memory_fds.values():
            os.close(fd)
        self.memory_fds.clear()


#: Which step function handles which command (the state machine already allowed it).
STEPS: dict[p.Command, Callable[[Receiver, Connection, p.Request], None]] = {
    p.Command.START: Receiver.on_start,
    p.Command.MEMORY_FD: Receiver.on_memory_fd,
    p.Command.CONFIG: Receiver.on_config,
    p.Command.MEMORY: Receiver.on_memory,
    p.Command.STATE: Receiver.on_state,
    p.Command.COMPLETE: Receiver.on_complete,
    p.Command.COMPLETE_PAUSED: Receiver.on_complete_paused,
    p.Command.ABANDON: Receiver.on_abandon,
}


def _check_cpuid(entries: object) -> list[dict] | None:
    if entries is None:
        return None
    if not isinstance(entries, list) or len(entries) > 1024:
        raise ProtocolError("common_cpuid must be a list of at most 1024 entries", where="Config")
    checked = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ProtocolError("common_cpuid entries must be objects", where="Config")
        checked.append({k: int(entry.get(k, 0)) & 0xFFFFFFFF
                        for k in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")})
    return checked


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def receive_into_vmm(vmm, options: ReceiveOptions) -> None:  # noqa: ANN001 - Vmm (import cycle)
    """``vm.receive-migration`` on an empty VMM: on success the VMM owns the VM."""
    with listen(parse_url(options.receiver_url), options.tls()) as listener:
        receiver = Receiver(listener, serial_spec=vmm.serial_spec, populate=options.populate)
        vmm.migration = receiver.stats
        vm = receiver.run()
    vmm.adopt(vm)


def main_receive(args: argparse.Namespace) -> int:
    """``chmig receive --listen URL``: wait for one migration, then run the VM it brought."""
    from .vmm import Vmm, start_api, wait_for_exit

    Serial(args.serial).close()  # a bad --serial is an error before anything listens
    tls = TlsConfig.from_dir(args.tls_dir, role="server") if args.tls_dir else None
    vmm = Vmm(args.serial)
    vmm.exit_on_vm_failure = not args.api_socket
    server = start_api(vmm, args.api_socket)
    try:
        with listen(parse_url(args.listen), tls) as listener:
            log.info("waiting for a migration on %s", listener.address)
            print(f"chmig receive: listening on {listener.address}", flush=True)
            receiver = Receiver(listener, serial_spec=args.serial)
            vmm.migration = receiver.stats
            vm = receiver.run()
        vmm.adopt(vm)
        print(f"chmig receive: {receiver.stats.summary()}", flush=True)
        if args.exit_after_migration:
            vmm.exit_event.set()
    except BaseException:
        if server is not None:
            server.stop()
        raise
    return wait_for_exit(vmm, server)
