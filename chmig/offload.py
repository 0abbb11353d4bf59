"""The offload daemon: a drop-in for Cloud Hypervisor's reference ``offload_daemon``, and safer.

A VMM snapshots a VM by migrating it *locally* to the daemon, and restores it
by receiving a local migration from it (Cloud Hypervisor's ``docs/snapshot_restore.md``,
"Offload Snapshot and Restore").  The daemon speaks the protocol of
:mod:`chmig.protocol` through the message layer (:mod:`chmig.channel`), so
traces and fuzzers see every message::

    snapshot (daemon = receiver)            restore (daemon = sender)
    VMM                   daemon            daemon                 VMM
     |-- Start ------------->|               |-- Start ------------->|
     |-- MemoryFd × slots -->|  keeps fds    |-- MemoryFd × slots -->|  memfds filled from memory-<slot>
     |-- Config ------------>|  the slots    |-- Config ------------>|     (empty with --ondemand)
     |-- State ------------->|               |== Fault conn(s) ====>|  --ondemand, before State
     |-- Complete[Paused] -->|  write+fsync  |-- State ------------->|
     |<----------------- Ok -|  then answer  |-- Complete[Paused] -->|  --resume: Complete
                                             |<== PageFault ========|  written into the memfd, Ok len 0

Files (Cloud Hypervisor's names and layout): ``memory-<slot>`` (the slot's
bytes, which start at the slot's ``file_offset`` in its memory fd; sparse),
``migration_config.json`` and ``state.json`` (the Config and State payloads,
byte for byte).  Of the Config only ``memory_manager_data.guest_ram_mappings``
is read, so a real Cloud Hypervisor VM's snapshot works too.

Safer than the reference daemon, which writes in place with no checksum
(:mod:`chmig.snapshot_dir`): the snapshot is written into a temporary
directory and renamed into place only after every file and the directory are
fsynced — and before the completion is answered, since the VM may be gone
right after; ``manifest.json`` holds a SHA-256 per 2 MiB chunk of each memory
file; an eager restore refuses a snapshot whose digests do not match, and an
on-demand restore checks each chunk the first time it serves from it and fails
loudly.  It also never writes a page into a memfd twice: once served, a page
may be the guest's, and a second request for it (a fault racing a pull) must
not overwrite what the guest wrote since.
"""

from __future__ import annotations

import argparse
import bisect
import logging
import os
import queue
import re
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import protocol as p
from .channel import Channel, IncomingRequest, Observers
from .errors import ChmigError, MigrationError, PeerError, ProtocolError, UsageError
from .trace import TraceWriter
from .snapshot_dir import (
    CHUNK_SIZE,
    ChunkVerifier,
    Manifest,
    SnapshotError,
    SnapshotWriter,
    lock_socket,
    open_memory_file,
    read_exactly_at,
    read_json_file,
    verify_directory,
    write_all_at,
)
from .threads import ThreadGroup
from .transport import ConnectionClosed, Listener, Url, connect, listen
from .units import MiB, PAGE_SIZE

log = logging.getLogger(__name__)

MIGRATION_CONFIG_FILE = "migration_config.json"
STATE_FILE = "state.json"


def memory_file(slot: int) -> str:
    """The file that holds one slot's bytes (``memory-<slot>``)."""
    return f"memory-{slot}"


def is_snapshot_file(name: str) -> bool:
    """A file of the daemon's snapshot format (an earlier snapshot at the target may be replaced, nothing else)."""
    return name in (MIGRATION_CONFIG_FILE, STATE_FILE) or re.fullmatch(r"memory-[0-9]+", name) is not None


def _memfd(size: int, name: str) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close_all(fds: object) -> None:
    for fd in list(fds):  # type: ignore[call-overload]
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Snapshot: the daemon receives a local migration and writes it to disk
# ---------------------------------------------------------------------------------------------


@dataclass
class SnapshotResult:
    """What a snapshot wrote, for the one-line summary."""

    directory: Path
    slots: int = 0
    memory_bytes: int = 0
    data_bytes: int = 0
    write_ms: float = 0.0
    completion: str = ""

    def summary(self) -> str:
        rate = self.memory_bytes / MiB / (self.write_ms / 1000) if self.write_ms else 0.0
        return (f"snapshot of {self.slots} slot(s), {self.memory_bytes // MiB} MiB of RAM ({self.data_bytes // MiB} "
                f"MiB of data) written to {self.directory} in {self.write_ms:.0f} ms ({rate:.0f} MiB/s); "
                f"the VMM sent {self.completion}")


class SnapshotReceiver:
    """``offload snapshot``: take one local migration on ``socket_path`` and write it to ``output_dir``.

    The daemon is the receiver of the protocol: the main connection follows
    :class:`~chmig.protocol.ReceiverMachine`, with the daemon's own refusals
    (:func:`~chmig.protocol.check_offload_snapshot_request`).  Every failure
    answers Error, removes the partial snapshot and raises; an Abandon is
    answered Ok and raises too (the VMM keeps its VM; there is no snapshot).
    """

    def __init__(self, socket_path: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                 observers: Observers | None = None, limits: p.Limits = p.DEFAULT_LIMITS) -> None:
        self.socket_path = os.fspath(socket_path)
        self.output_dir = Path(output_dir)
        self.observers = observers if observers is not None else Observers()
        self.limits = limits
        self.machine = p.ReceiverMachine(limits)
        self.memory_fds: dict[int, int] = {}
        self.mappings: list[p.SlotMapping] = []
        self.result = SnapshotResult(self.output_dir.absolute())
        self.listener: Listener | None = None
        self._writer: SnapshotWriter | None = None

    def run(self, on_listening: Callable[[str], None] | None = None) -> SnapshotResult:
        """Lock the socket, listen, receive one snapshot, write it; the lock is held until the end."""
        lock = lock_socket(self.socket_path)
        try:
            # The lock is ours: a socket file at the path belongs to a daemon that died.
            try:
                if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                    os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            self._writer = SnapshotWriter(self.output_dir, is_snapshot_file)
            try:
                self.listener = listen(Url.unix(self.socket_path))
                if on_listening is not None:
                    on_listening(self.socket_path)
                log.info("offload daemon: listening on %s for a snapshot into %s", self.socket_path, self.output_dir)
                channel = self._accept()
                with channel:
                    self._receive(channel)
            except BaseException:
                self._writer.abort()
                raise
            finally:
                if self.listener is not None:
                    self.listener.close()
                _close_all(self.memory_fds.values())
                self.memory_fds.clear()
        finally:
            os.close(lock)
        return self.result

    def stop(self) -> None:
        """Stop waiting (from another thread or a signal handler)."""
        if self.listener is not None:
            self.listener.abort()

    def _accept(self) -> Channel:
        assert self.listener is not None
        conn = self.listener.accept()
        log.info("offload daemon: the VMM connected (%s)", conn.peer)
        channel = Channel(conn, side=p.Side.DESTINATION, observers=self.observers, limits=self.limits)
        channel.stall_timeout = self.limits.stall_timeout_s
        return channel

    def _admit(self, request: p.Request) -> None:
        self.machine.begin(request)
        try:
            p.check_offload_snapshot_request(request)
        except ProtocolError:
            self.machine.fail()
            raise

    def _receive(self, channel: Channel) -> None:
        while not self.machine.finished:
            state = self.machine.state
            try:
                incoming = channel.read_request(self._admit, p.offload_snapshot_idle_timeout(state, self.limits))
            except ConnectionClosed:
                self.machine.fail()
                raise MigrationError(f"the VMM closed the connection in state {state.value}: no snapshot",
                                     where="snapshot") from None
            except ChmigError as exc:
                self._refuse(channel, exc)
                raise
            try:
                SNAPSHOT_STEPS[incoming.command](self, incoming)
            except ChmigError as exc:
                self._refuse(channel, exc)
                raise
            except OSError as exc:
                self._refuse(channel, exc)
                raise SnapshotError(f"{exc.strerror or exc}", where=incoming.command.wire_name) from exc
            self.machine.commit()
            if self.machine.state is not p.ReceiverState.COMPLETED:
                channel.answer_ok()
                continue
            try:
                channel.answer_ok()
            except ChmigError as exc:  # the snapshot is complete and in place: that is what counts
                log.warning("the snapshot is complete, but the VMM did not take the Ok (%s): it reports the "
                            "migration's outcome as unknown", exc)
        if self.machine.state is p.ReceiverState.ABORTED:
            raise MigrationError("the VMM abandoned the snapshot: nothing was written", where="snapshot")

    def _refuse(self, channel: Channel, exc: BaseException) -> None:
        if not self.machine.finished:
            self.machine.fail()
        log.error("answering Error: %s", exc)
        channel.answer_error(exc.message if isinstance(exc, ChmigError) else str(exc))

    # -- the steps -----------------------------------------------------------------------------

    def on_start(self, incoming: IncomingRequest) -> None:
        """Protocol step *Start*."""

    def on_memory_fd(self, incoming: IncomingRequest) -> None:
        """Protocol step *MemoryFd*: keep the slot's memory fd until the completion."""
        assert incoming.slot is not None and incoming.fd is not None
        try:
            p.check_memory_fd(incoming.slot, self.memory_fds, self.limits)
        except ProtocolError:
            os.close(incoming.fd)
            raise
        self.memory_fds[incoming.slot] = incoming.fd

    def on_config(self, incoming: IncomingRequest) -> None:
        """Protocol step *Config*: the slots (nothing else of it); the payload is kept byte for byte."""
        document = p.decode_json_payload(incoming.payload, "Config", self.limits)
        self.mappings = p.parse_slot_mappings(document, self.limits)
        assert self._writer is not None
        self._writer.write_file(MIGRATION_CONFIG_FILE, incoming.payload)

    def on_state(self, incoming: IncomingRequest) -> None:
        """Protocol step *State*: kept byte for byte (checked to be JSON)."""
        p.decode_json_payload(incoming.payload, "State", self.limits)
        assert self._writer is not None
        self._writer.write_file(STATE_FILE, incoming.payload)

    def on_complete(self, incoming: IncomingRequest) -> None:
        """Protocol step *Complete* / *CompletePaused*: write every slot, fsync, put the snapshot in place —
        all before the Ok, because the VMM may drop the VM (and its memory) right after it."""
        p.check_slots_covered(self.mappings, self.memory_fds)
        assert self._writer is not None
        begin = time.monotonic()
        for mapping in self.mappings:
            fd = self.memory_fds[mapping.slot]
            have = os.fstat(fd).st_size
            if have < mapping.file_offset + mapping.size:
                raise ProtocolError(f"the memory fd of slot {mapping.slot} has {have} bytes, the slot needs "
                                    f"{mapping.file_offset + mapping.size}", where="Complete")
            self.result.data_bytes += self._writer.write_memory(
                memory_file(mapping.slot), [(fd, mapping.file_offset, mapping.size)], mapping.size)
            self.result.memory_bytes += mapping.size
        self._writer.commit()
        self.result.write_ms = round((time.monotonic() - begin) * 1000, 3)
        self.result.slots = len(self.mappings)
        self.result.completion = incoming.command.wire_name

    def on_abandon(self, incoming: IncomingRequest) -> None:
        """Protocol step *Abandon*: answered Ok; nothing is kept."""
        log.warning("the VMM abandoned the snapshot")


SNAPSHOT_STEPS = {
    p.Command.START: SnapshotReceiver.on_start,
    p.Command.MEMORY_FD: SnapshotReceiver.on_memory_fd,
    p.Command.CONFIG: SnapshotReceiver.on_config,
    p.Command.STATE: SnapshotReceiver.on_state,
    p.Command.COMPLETE: SnapshotReceiver.on_complete,
    p.Command.COMPLETE_PAUSED: SnapshotReceiver.on_complete,
    p.Command.ABANDON: SnapshotReceiver.on_abandon,
}


# ---------------------------------------------------------------------------------------------
# Restore: the daemon sends a local migration from disk
# ---------------------------------------------------------------------------------------------


class SnapshotImage:
    """A snapshot directory opened for a restore: Config and State bytes, and one memory file per slot.

    Opening checks that every file is there with the size the manifest (if
    any) and the Config say, before anything is sent.
    """

    def __init__(self, directory: str | os.PathLike[str], limits: p.Limits = p.DEFAULT_LIMITS) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise SnapshotError("no such snapshot directory", where=str(self.directory))
        self.manifest = Manifest.load(self.directory)
        self.config = read_json_file(self.directory, MIGRATION_CONFIG_FILE, self.manifest)
        self.state = read_json_file(self.directory, STATE_FILE, self.manifest)
        try:
            self.mappings = p.parse_slot_mappings(p.decode_json_payload(self.config, "Config", limits), limits)
        except ProtocolError as exc:
            raise SnapshotError(f"{MIGRATION_CONFIG_FILE}: {exc.message}", where=str(self.directory)) from None
        self.files: dict[int, tuple[int, ChunkVerifier]] = {}
        try:
            for mapping in self.mappings:
                self.files[mapping.slot] = open_memory_file(self.directory, memory_file(mapping.slot),
                                                            self.manifest, mapping.size)
        except BaseException:
            self.close()
            raise
        if self.manifest is None:
            log.warning("%s has no manifest.json (a snapshot by Cloud Hypervisor's daemon?): restoring it "
                        "unverified", self.directory)

    @property
    def verified(self) -> bool:
        return self.manifest is not None

    def close(self) -> None:
        _close_all(fd for fd, _ in self.files.values())
        self.files.clear()


class OnDemandSlot:
    """One slot of an on-demand restore: its memfd, empty at first, filled chunk by chunk from its file."""

    #: Chunks share this many locks (a lock per chunk would be one per 2 MiB of RAM).
    LOCKS = 64

    def __init__(self, mapping: p.SlotMapping, memfd: int, disk: int, verifier: ChunkVerifier) -> None:
        self.mapping = mapping
        self.memfd = memfd
        self.disk = disk
        self.verifier = verifier
        chunks = -(-mapping.size // CHUNK_SIZE)
        #: One byte per 2 MiB chunk: written already.  A written page may be the guest's now: never written again.
        self.served = bytearray(chunks)
        #: One byte per chunk: asked from by the VMM (a VMM done with the restore has asked from every one).
        self.asked = bytearray(chunks)
        self._locks = [threading.Lock() for _ in range(self.LOCKS)]

    def place(self, offset: int, length: int) -> int:
        """Make ``[offset, offset+length)`` of the slot present in the memfd; return the pages written.

        Each 2 MiB chunk the range touches is read from the file once, checked
        against the manifest on those very bytes, and written whole: later
        requests in the chunk find it served (no second read of the file, so
        nothing unverified is ever written).  Writes use ``pwrite``, never a
        mapping: the kernel keeps a page locked until its bytes are in, so a VMM
        that maps it (``UFFDIO_CONTINUE``) meanwhile waits for them.  A chunk's
        lock makes a second request for it wait, then find it served.
        """
        written = 0
        first, last = offset // CHUNK_SIZE, (offset + length - 1) // CHUNK_SIZE
        self.asked[first : last + 1] = b"\x01" * (last + 1 - first)
        buffer: memoryview | None = None
        for index in range(first, last + 1):
            if self.served[index]:
                continue
            with self._locks[index % self.LOCKS]:
                if self.served[index]:
                    continue  # served while this one waited
                if buffer is None:
                    buffer = memoryview(bytearray(CHUNK_SIZE))
                start = index * CHUNK_SIZE
                chunk = buffer[: min(CHUNK_SIZE, self.mapping.size - start)]
                read_exactly_at(self.disk, chunk, start, memory_file(self.mapping.slot))
                self.verifier.check_bytes(index, chunk)
                write_all_at(self.memfd, chunk, self.mapping.file_offset + start)
                self.served[index] = 1
                written += len(chunk) // PAGE_SIZE
        return written

    def close(self) -> None:
        """Nothing to release: the memfd and the file belong to the restore."""


@dataclass
class RestoreResult:
    """What a restore did, for the one-line summary."""

    directory: Path
    ondemand: bool
    resume: bool
    verified: bool = False
    slots: int = 0
    memory_bytes: int = 0
    copied_bytes: int = 0
    handed_over_ms: float = 0.0
    pages_served: int = 0
    page_faults: int = 0
    fault_connections: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        how = "on demand" if self.ondemand else "eagerly"
        text = (f"restored {self.slots} slot(s), {self.memory_bytes // MiB} MiB of RAM, {how} from {self.directory} "
                f"({'verified' if self.verified else 'unverified: no manifest'}); VM "
                f"{'resumed' if self.resume else 'left paused'} after {self.handed_over_ms:.0f} ms")
        if self.ondemand:
            text += (f"; {self.page_faults} PageFault(s), {self.pages_served} page(s) written, over "
                     f"{self.fault_connections} Fault connection(s)")
        else:
            text += f"; {self.copied_bytes // MiB} MiB of data copied"
        return text


class RestoreSender:
    """``offload restore``: send the snapshot in ``input_dir`` to a VMM listening on ``socket_path``.

    The daemon is the source of a local migration: Start, one MemoryFd per
    slot (a memfd of ``file_offset + size`` bytes), Config, State, then
    Complete (``resume``) or CompletePaused.  ``ondemand``: the memfds start
    empty, ``fault_connections`` Fault connections are opened before State,
    and each PageFault is served by writing the range into the memfd and
    answering Ok with length 0; :meth:`run` returns once the VMM has closed
    every Fault connection, having asked for every page.  A Complete whose
    Ok is lost is served anyway (the VMM may be running the VM): the Fault
    connections tell whether it had it.
    """

    def __init__(self, socket_path: str | os.PathLike[str], input_dir: str | os.PathLike[str], *,
                 resume: bool = False, ondemand: bool = False, fault_connections: int = 1,
                 observers: Observers | None = None, limits: p.Limits = p.DEFAULT_LIMITS) -> None:
        if not 1 <= fault_connections <= limits.max_fault_connections:
            raise UsageError(f"--fault-connections must be 1..{limits.max_fault_connections}")
        self.url = Url.unix(os.fspath(socket_path))
        self.input_dir = Path(input_dir)
        self.resume = resume
        self.ondemand = ondemand
        self.fault_connections = fault_connections
        self.observers = observers if observers is not None else Observers()
        self.limits = limits
        self.machine = p.SourceMachine()
        self.threads = ThreadGroup("offload-restore")
        self.slots: list[OnDemandSlot] = []
        self.result = RestoreResult(self.input_dir.absolute(), ondemand, resume)
        self._ended: queue.Queue[BaseException | None] = queue.Queue()
        self._count_lock = threading.Lock()
        #: The first page this daemon could not serve (answered Error): why a VMM then refuses State or Complete.
        self._serve_failure: ChmigError | None = None

    def run(self) -> RestoreResult:
        image = SnapshotImage(self.input_dir, self.limits)
        memfds: dict[int, int] = {}
        try:
            self.result.verified = image.verified
            self.result.slots = len(image.mappings)
            self.result.memory_bytes = sum(m.size for m in image.mappings)
            # Eager: every memfd is filled, and every chunk verified on the bytes copied, before the VMM sees
            # anything; a corrupt snapshot is refused before it connects.
            for mapping in image.mappings:
                memfds[mapping.slot] = self._memfd_for(image, mapping)
            self._migrate(image, memfds)
        except BaseException:
            self.threads.stop()
            raise
        finally:
            try:
                self.threads.close(timeout=10)  # first: a serving thread may still be writing into a memfd
            finally:
                _close_all(memfds.values())
                for slot in self.slots:
                    slot.close()
                image.close()
        return self.result

    def _memfd_for(self, image: SnapshotImage, mapping: p.SlotMapping) -> int:
        """The memfd for one slot: ``file_offset + size`` bytes, the slot's bytes at ``file_offset`` (or none yet)."""
        memfd = _memfd(mapping.file_offset + mapping.size, f"offload-slot-{mapping.slot}")
        try:
            disk, verifier = image.files[mapping.slot]
            if self.ondemand:
                self.slots.append(OnDemandSlot(mapping, memfd, disk, verifier))
            else:
                self.result.copied_bytes += verifier.copy_verified(memfd, mapping.file_offset)
        except BaseException:
            os.close(memfd)
            raise
        return memfd

    def _request_ok(self, channel: Channel, request: p.Request, payload: bytes = b"") -> None:
        self.machine.check_send(request.command)
        channel.request_ok(request, payload)
        self.machine.acknowledged(request.command)

    def _migrate(self, image: SnapshotImage, memfds: dict[int, int]) -> None:
        begin = time.monotonic()
        with Channel(connect(self.url), side=p.Side.SOURCE, observers=self.observers, limits=self.limits) as channel:
            channel.set_timeout(self.limits.response_timeout_s)
            self._request_ok(channel, p.Request.start())
            for mapping in image.mappings:
                self.machine.check_send(p.Command.MEMORY_FD)
                channel.send_memory_fd(mapping.slot, memfds[mapping.slot])
                self.machine.acknowledged(p.Command.MEMORY_FD)
            self._request_ok(channel, p.Request.config(len(image.config)), image.config)
            if self.ondemand:
                self._open_fault_connections()
            try:
                self._request_ok(channel, p.Request.state(len(image.state)), image.state)
            except ChmigError as exc:
                if self.ondemand:
                    if self._serve_failure is not None:
                        raise self._refused_for(self._serve_failure, "State") from exc
                    raise MigrationError(f"{exc.message} (an on-demand restore needs a VMM receiving with "
                                         "memory_mode=postcopy)", where="State") from exc
                if isinstance(exc, PeerError):
                    raise MigrationError(f"{exc.message} (a VMM receiving with memory_mode=postcopy waits for "
                                         "pages on demand: restore with --ondemand)", where="State") from exc
                raise
            try:
                self._request_ok(channel, p.Request.complete() if self.resume else p.Request.complete_paused())
            except PeerError as exc:  # refused: the VMM does not run the VM
                if self._serve_failure is not None:
                    raise self._refused_for(self._serve_failure, "Complete") from exc
                raise
            except ChmigError as exc:
                if not self.ondemand:
                    raise MigrationError(f"Complete was sent but not acknowledged ({exc}): the VMM may be running "
                                         "the VM", where="Complete") from exc
                # The VMM may have taken Complete and run the VM, whose pages are only here: serve them anyway,
                # and let the Fault connections tell (every page asked for, every connection closed cleanly).
                log.warning("offload daemon: Complete was sent but not acknowledged (%s); serving pages anyway", exc)
        self.result.handed_over_ms = round((time.monotonic() - begin) * 1000, 3)
        log.info("offload daemon: the VMM has the VM (%s)", "resumed" if self.resume else "paused")
        if self.ondemand:
            self._wait_for_fault_connections()

    # -- on demand -------------------------------------------------------------------------------

    @staticmethod
    def _refused_for(failure: ChmigError, step: str) -> MigrationError:
        """The VMM refused ``step`` because a page could not be served (its pull starts at State): say why."""
        return MigrationError(f"serving pages failed: {failure} (so the VMM refused {step})", where="on-demand restore")

    def _open_fault_connections(self) -> None:
        """Open the Fault connections (before State: the VMM takes them when it handles State)."""
        starts = sorted((slot.mapping.gpa, slot) for slot in self.slots)
        self._slot_starts = [gpa for gpa, _ in starts]
        self._by_gpa = [slot for _, slot in starts]
        for number in range(self.fault_connections):
            channel = Channel(connect(self.url), side=p.Side.SOURCE, name=f"fault-{number}",
                              observers=self.observers, limits=self.limits)
            try:
                channel.send_role(p.ConnectionRole.FAULT)
                self.threads.start(f"offload-fault-{number}", self._serve, channel, stopper=channel.reset)
            except BaseException:
                channel.close()
                raise
            self.result.fault_connections += 1

    def _serve(self, channel: Channel) -> None:
        """One Fault connection's thread: serve until the VMM closes it."""
        error: BaseException | None = None
        try:
            with channel:
                channel.serve_page_faults_in_place(self._place)
        except BaseException as exc:
            error = exc
            log.error("offload daemon: %s: %s", channel.name, exc)
        self._ended.put(error)

    def _place(self, page: p.MemoryRange) -> None:
        """Put ``page`` (which may span adjacent slots) into the memfds; the range must be guest RAM."""
        gpa, end = page.gpa, page.end
        pieces = []
        while gpa < end:
            index = bisect.bisect_right(self._slot_starts, gpa) - 1
            slot = self._by_gpa[index] if index >= 0 else None
            if slot is None or gpa >= slot.mapping.end:
                raise ProtocolError(f"PageFault {page.gpa:#x}+{page.length:#x} is not within any slot",
                                    where="PageFault")
            stop = min(end, slot.mapping.end)
            pieces.append((slot, gpa - slot.mapping.gpa, stop - gpa))
            gpa = stop
        try:
            written = sum(slot.place(offset, length) for slot, offset, length in pieces)
        except OSError as exc:  # answered Error like any failure to serve (the memfd cannot take the page)
            failure = SnapshotError(f"cannot serve {page.gpa:#x}+{page.length:#x}: {exc.strerror or exc}",
                                    where="on-demand restore")
            self._serve_failure = self._serve_failure or failure
            raise failure from None
        except ChmigError as exc:  # (kept before the Error is answered: the VMM refuses only after it)
            self._serve_failure = self._serve_failure or exc
            raise
        with self._count_lock:
            self.result.page_faults += 1
            self.result.pages_served += written

    def _wait_for_fault_connections(self) -> None:
        """Until the VMM has closed every Fault connection; each page must have been asked for by then (a VMM
        that closes its connections before it has the whole VM has failed, or was cut off)."""
        for _ in range(self.result.fault_connections):
            error = self._ended.get()
            if error is not None:
                self.threads.stop()  # the VM cannot go on; the other connections end too
                self.result.errors.append(str(error))
        if self.result.errors:
            raise MigrationError(f"serving pages failed: {self.result.errors[0]}", where="on-demand restore")
        missing = sum(slot.asked.count(0) for slot in self.slots)
        if missing:  # every connection closed cleanly, yet memory was never asked for: the VMM is not whole
            total = sum(len(slot.asked) for slot in self.slots)
            raise MigrationError(f"the VMM closed every Fault connection with {missing} of {total} 2 MiB chunks never "
                                 "asked from: it cannot have the whole VM (did it fail, or shut it down?)",
                                 where="on-demand restore")


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


TRACE_HELP = ("write every message of the migration to FILE as it passes, one JSON object a line; read it with "
              "`chmig trace show FILE [--mermaid OUT]`")


def add_arguments(offload: argparse.ArgumentParser) -> None:
    """``chmig offload snapshot|restore|verify`` with the reference daemon's flags."""
    modes = offload.add_subparsers(dest="mode", metavar="MODE", required=True)
    snapshot = modes.add_parser("snapshot", help="receive a snapshot from a VMM (send-migration local=on) and "
                                                 "write it to a directory")
    snapshot.add_argument("--socket", required=True, help="UNIX socket to listen on (locked by SOCKET.lock)")
    snapshot.add_argument("--output-dir", required=True, help="directory to write the snapshot into")
    snapshot.add_argument("--trace", metavar="FILE", help=TRACE_HELP)
    restore = modes.add_parser("restore", help="send a snapshot to a VMM listening with receive-migration")
    restore.add_argument("--socket", required=True, help="the UNIX socket the VMM listens on")
    restore.add_argument("--input-dir", required=True, help="directory to read the snapshot from")
    restore.add_argument("--resume", action="store_true", help="resume the VM (Complete) instead of leaving it "
                                                               "paused (CompletePaused)")
    restore.add_argument("--ondemand", action="store_true",
                         help="send empty memory and serve pages on demand (the VMM receives with "
                              "memory_mode=postcopy); exit 0 once the VMM has asked from all memory and closed "
                              "its Fault connections")
    restore.add_argument("--fault-connections", type=int, default=1, metavar="N",
                         help="--ondemand: Fault connections to open (default 1, as the reference daemon; more "
                              "lets a chmig VMM pull in the background while faults are served)")
    restore.add_argument("--trace", metavar="FILE", help=TRACE_HELP)
    verify = modes.add_parser("verify", help="check a snapshot's files against its manifest")
    verify.add_argument("--input-dir", required=True, help="the snapshot directory")


def main_offload(args: argparse.Namespace) -> int:
    """``chmig offload``: one snapshot, one restore or one verification, then exit (non-zero on failure)."""
    if args.mode == "verify":
        for line in verify_directory(args.input_dir):
            print(f"chmig offload verify: {line}")
        print(f"chmig offload verify: {args.input_dir} is intact")
        return 0
    trace = TraceWriter(args.trace) if args.trace else None  # before the daemon starts: a bad FILE is exit 2
    observers = Observers(trace) if trace is not None else None
    try:
        if args.mode == "snapshot":
            receiver = SnapshotReceiver(args.socket, args.output_dir, observers=observers)
            result = receiver.run(on_listening=lambda path: print(f"chmig offload: listening on {path}", flush=True))
            print(f"chmig offload: {result.summary()}", flush=True)
            return 0
        sender = RestoreSender(args.socket, args.input_dir, resume=args.resume, ondemand=args.ondemand,
                               fault_connections=args.fault_connections, observers=observers)
        restored = sender.run()
        print(f"chmig offload: {restored.summary()}", flush=True)
        return 0
    finally:
        if trace is not None:
            trace.close()


__all__ = ["MIGRATION_CONFIG_FILE", "STATE_FILE", "RestoreSender", "SnapshotImage", "SnapshotReceiver",
           "add_arguments", "main_offload", "memory_file"]
