"""Cloud Hypervisor's live-migration wire protocol, version 0 — the format and the rules, no I/O.

Rules of this module (after h11's ``_state.py``):

* Every protocol rule lives in this file, in tables: the main connection's
  state machine (:data:`RECEIVER_TRANSITIONS`, which the source follows too,
  through :class:`SourceMachine`), what each additional connection may carry
  (:data:`CONNECTION_RULES`), and which answers may carry a payload
  (:func:`check_response`).  No other module decides on its own whether a
  message is allowed; it asks this one.  ``docs.py`` draws every table into
  ``docs/protocol.md``, so the pictures cannot drift from the code.
* Every struct that crosses the wire is encoded and decoded here, to exactly
  the bytes Cloud Hypervisor's ``vm-migration/src/protocol.rs`` produces; only
  the message layer (:mod:`chmig.channel`) calls these encoders on real
  connections.
* Nothing here touches a socket, a file or guest memory, so all of it can be
  tested with plain bytes.
* Every limit a hostile peer could abuse is a field of :class:`Limits`.

Framing
-------
All integers are little-endian.  Every message is a 16-byte header followed by
``length`` bytes of payload::

    Request   u16 command | u8[6] command_headers | u64 length
    Response  u16 status  | u8[6] padding (zero)  | u64 length
    MemoryRange           u64 gpa                 | u64 length
    ConnectionRole        u16 role   (first 2 bytes of an additional connection)

A Response answers every Request.

Remote migration (one main connection)::

    Source                                   Destination
      |--- Start (version in headers) -------->|
      |<-------------------------------- Ok ---|
      |--- Config (JSON) --------------------->|   builds the VM, allocates RAM
      |<-------------------------------- Ok ---|
      |    dirty logging on                    |
      |--- Memory (table, then bytes) -------->|   iteration 0, 1, 2, ...
      |<-------------------------------- Ok ---|
      |    pause; final Memory                 |
      |--- State (JSON) ---------------------->|   restores vCPUs and devices
      |<-------------------------------- Ok ---|
      |--- Complete | CompletePaused --------->|   resumes (or leaves paused)
      |<-------------------------------- Ok ---|

Local migration (``local=on``, UNIX socket, shared memory) sends one MemoryFd
per RAM slot (4-byte slot number + the memfd as SCM_RIGHTS) between Start and
Config, and no Memory at all.

With ``connections=N > 1`` the sender opens N additional connections (as Cloud
Hypervisor does) that each announce :attr:`ConnectionRole.PRECOPY_MEMORY` and
carry only Memory requests, in tables of at most 64 MiB; the main connection then
carries control only.
A postcopy Fault connection announces :attr:`ConnectionRole.FAULT` and carries
PageFault requests from the destination to the source.

Version 1 (chmig, beyond Cloud Hypervisor) adds the Discard command (a hybrid
migration's switch to postcopy) and postcopy recovery: the Start of a migration
that can recover carries a 16-byte token, and when a Fault connection broke the source opens
new ones that announce :attr:`ConnectionRole.FAULT_RECOVERY` and prove the token
(:class:`RecoveryHello`) before they carry PageFault again::

    Source                                   Destination (vCPUs wait on missing pages)
      |--- role FaultRecovery, token, attempt ->|  wrong token: closed, nothing else
      |<------------------ PageFault (again) ---|  the faults that were in flight
      |--- Ok + bytes ------------------------->|
"""

from __future__ import annotations

import enum
import hmac
import struct
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Iterator, NamedTuple, Sequence

from .errors import InternalError, ProtocolError
from .jsonlimits import JsonRefused, loads_bounded
from .units import GiB, KiB, MiB, PAGE_SIZE  # noqa: F401 - re-exported: the protocol's vocabulary

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

#: The protocol version chmig speaks (Cloud Hypervisor's ``CURRENT_PROTOCOL_VERSION``).
PROTOCOL_VERSION = 0
#: The newest version chmig speaks: version 0 plus what a migration beyond Cloud Hypervisor's needs
#: (:data:`COMMAND_SINCE_VERSION`).  A chmig sender says version 0 unless its migration needs one of them, so
#: every flow Cloud Hypervisor has stays byte for byte Cloud Hypervisor's.
NEWEST_PROTOCOL_VERSION = 1

#: A receiver accepts the newest version and the one before it (saturating at 0), as Cloud Hypervisor's does.
SUPPORTED_VERSIONS = range(max(NEWEST_PROTOCOL_VERSION - 1, 0), NEWEST_PROTOCOL_VERSION + 1)

HEADER_SIZE = 16
MEMORY_RANGE_SIZE = 16
ROLE_SIZE = 2
#: Version 1: the migration token, Start's payload and the proof a recovering Fault connection brings.
TOKEN_SIZE = 16
#: Version 1: what follows the role of a FaultRecovery connection (:class:`RecoveryHello`).
RECOVERY_HELLO_SIZE = TOKEN_SIZE + 8
#: MemoryFd's payload: the u32 slot number (the fd itself travels as SCM_RIGHTS).
MEMORY_FD_PAYLOAD_SIZE = 4

#: With several connections, memory travels in tables of at most this many bytes.
PRECOPY_CHUNK_SIZE = 64 * MiB
#: A postcopy destination pulls the pages no fault asked for in PageFault ranges of this size (tunable in
#: these bounds; Cloud Hypervisor asks for one 4 KiB page per idle loop, chmig's ``prefetch=page``).
PREFETCH_MIN_BYTES = 256 * KiB
PREFETCH_MAX_BYTES = 2 * MiB
PREFETCH_DEFAULT_BYTES = 1 * MiB
#: Fault connections a chmig source opens for postcopy: one for urgent faults, one for the pull.
DEFAULT_FAULT_CONNECTIONS = 2

_HEADER = struct.Struct("<H6sQ")
_RANGE = struct.Struct("<QQ")
_ROLE = struct.Struct("<H")
_RECOVERY_HELLO = struct.Struct(f"<{TOKEN_SIZE}sI4x")
_SLOT = struct.Struct("<I")
_U64_MAX = (1 << 64) - 1


def _limit(default: int | float, doc: str) -> Any:
    """A field of :class:`Limits` with its explanation (drawn into docs/protocol.md)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class Limits:
    """Every bound on what a peer may make chmig read, allocate, open or wait for.

    Each is checked *before* the work it bounds: a header's length before its
    payload is read, a count before the next item is kept.
    """

    max_config_bytes: int = _limit(64 * MiB, "largest Config payload (JSON)")
    max_state_bytes: int = _limit(64 * MiB, "largest State payload (JSON)")
    max_table_bytes: int = _limit(16 * MiB, "largest MemoryRangeTable in one Memory request (1 Mi ranges)")
    max_page_fault_bytes: int = _limit(1 * GiB, "largest range one PageFault may ask for")
    max_connections: int = _limit(128, "additional connections per migration (connections=N, N in 1..128)")
    max_slots: int = _limit(512, "RAM slots of one VM, and so MemoryFd requests of one migration")
    max_guest_ram: int = _limit(16 * 1024 * GiB, "guest RAM the offload daemon accepts in a Config (its memfds and "
                                "chunk bitmaps grow with it)")
    max_cpuid_entries: int = _limit(256, "entries of common_cpuid in a Config (KVM_MAX_CPUID_ENTRIES)")
    role_timeout_s: float = _limit(10.0, "wait for the 2-byte role of an additional connection")
    fault_connection_wait_s: float = _limit(30.0, "wait of a postcopy destination for the source's Fault connection")
    max_fault_connections: int = _limit(16, "Fault connections a chmig source opens for postcopy (fault_connections=N)")
    fault_response_timeout_s: float = _limit(10.0, "postcopy destination: silence while waiting for a page (vCPUs "
                                                   "wait meanwhile; then the connection counts as broken)")
    max_recovery_s: float = _limit(3600.0, "longest postcopy_recovery_s either side accepts (a recovering "
                                           "destination's vCPUs wait that long)")
    workers_finish_s: float = _limit(5.0, "wait at State for the memory connections to close (the source closed "
                                          "them before sending State; below paused_response_timeout_s)")
    first_request_timeout_s: float = _limit(10.0, "silence of a new main connection before its first request "
                                                  "(then it is dropped and the receiver keeps listening)")
    stall_timeout_s: float = _limit(60.0, "silence inside a message, or before Config, before the peer is given up")
    response_timeout_s: float = _limit(60.0, "source: silence while waiting for an answer, the VM running")
    paused_response_timeout_s: float = _limit(10.0, "source: silence while waiting for an answer, the VM paused")
    local_completion_rate: int = _limit(32 * MiB, "source, local migration: the slowest rate (bytes/s) at which the "
                                        "destination may store guest RAM before it answers the completion (an offload "
                                        "daemon writes and fsyncs it all first): the wait grows with the RAM")
    max_json_containers: int = _limit(100_000, "objects and arrays in one Config or State (a real one has hundreds)")
    max_json_values: int = _limit(2_000_000, "values in one Config or State, counted by their separators")


DEFAULT_LIMITS = Limits()


# --------------------------------------------------------------------------
# Enumerations
# --------------------------------------------------------------------------


class Command(enum.IntEnum):
    """Request commands, with Cloud Hypervisor's numbers."""

    INVALID = 0
    START = 1
    CONFIG = 2
    STATE = 3
    MEMORY = 4
    #: Finish and resume the VM on the destination (the source VM was running).
    COMPLETE = 5
    ABANDON = 6
    MEMORY_FD = 7
    #: Finish and leave the VM paused (the source VM was paused).
    COMPLETE_PAUSED = 8
    #: Ask the source for a page (postcopy, on the Fault connection).
    PAGE_FAULT = 9
    #: Protocol version 1 (chmig): the pages whose copy on the destination is stale (hybrid precopy→postcopy).
    DISCARD = 10

    @property
    def wire_name(self) -> str:
        """The name Cloud Hypervisor uses (``CompletePaused``), for messages."""
        return "".join(part.capitalize() for part in self.name.split("_"))


class Status(enum.IntEnum):
    """Response statuses."""

    INVALID = 0
    OK = 1
    ERROR = 2


class ConnectionRole(enum.IntEnum):
    """First two bytes of an additional connection."""

    INVALID = 0
    PRECOPY_MEMORY = 1
    FAULT = 2
    #: Protocol version 1: a Fault connection that replaces broken ones (:class:`RecoveryHello` follows).
    FAULT_RECOVERY = 3

    @property
    def wire_name(self) -> str:
        """Cloud Hypervisor's name (``PrecopyMemory``)."""
        return "".join(part.capitalize() for part in self.name.split("_"))

    def encode(self) -> bytes:
        return _ROLE.pack(self.value)

    @classmethod
    def decode(cls, data: bytes) -> ConnectionRole:
        if len(data) != ROLE_SIZE:
            raise ProtocolError(
                f"connection role must be {ROLE_SIZE} bytes, got {len(data)}",
                where="connection role",
            )
        (value,) = _ROLE.unpack(data)
        try:
            return cls(value)
        except ValueError:
            raise ProtocolError(f"unknown connection role: {value}", where="connection role") from None


# --------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------


def _check_header_size(data: bytes, what: str) -> None:
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"{what} header must be {HEADER_SIZE} bytes, got {len(data)}", where=what)


@dataclass(frozen=True)
class Request:
    """A 16-byte request header; ``length`` counts the payload that follows."""

    command: Command
    length: int = 0
    command_headers: bytes = bytes(6)

    def encode(self) -> bytes:
        return _HEADER.pack(self.command, self.command_headers, self.length)

    @classmethod
    def decode(cls, data: bytes) -> Request:
        _check_header_size(data, "request")
        value, headers, length = _HEADER.unpack(data)
        try:
            command = Command(value)
        except ValueError:
            raise ProtocolError(
                f"received request with unknown command {value}", where="request header"
            ) from None
        return cls(command, length, headers)

    # The constructors Cloud Hypervisor's sender uses.
    @classmethod
    def start(cls, version: int = PROTOCOL_VERSION, token: bool = False) -> Request:
        """Start carries the sender's protocol version in ``command_headers[0:2]``; from version 1 on, a
        migration that can recover sends its token as the payload (:func:`start_payload_sizes`)."""
        length = TOKEN_SIZE if token else 0
        if length not in start_payload_sizes(version):
            raise InternalError(f"a Start of protocol version {version} carries no token", where="Start")
        return cls(Command.START, length, struct.pack("<H4x", version))

    @classmethod
    def config(cls, length: int) -> Request:
        return cls(Command.CONFIG, length)

    @classmethod
    def state(cls, length: int) -> Request:
        return cls(Command.STATE, length)

    @classmethod
    def memory(cls, table_length: int) -> Request:
        """``table_length`` is the table's size; the memory bytes follow uncounted."""
        return cls(Command.MEMORY, table_length)

    @classmethod
    def memory_fd(cls) -> Request:
        return cls(Command.MEMORY_FD, MEMORY_FD_PAYLOAD_SIZE)

    @classmethod
    def complete(cls) -> Request:
        return cls(Command.COMPLETE)

    @classmethod
    def complete_paused(cls) -> Request:
        return cls(Command.COMPLETE_PAUSED)

    @classmethod
    def abandon(cls) -> Request:
        return cls(Command.ABANDON)

    @classmethod
    def page_fault(cls) -> Request:
        return cls(Command.PAGE_FAULT, MEMORY_RANGE_SIZE)

    @classmethod
    def discard(cls, table_length: int) -> Request:
        """Version 1: a MemoryRangeTable of ``table_length`` bytes follows (no data)."""
        return cls(Command.DISCARD, table_length)

    @property
    def sender_version(self) -> int:
        """The version field of a Start request (bytes 2..6 of the headers are ignored)."""
        return int.from_bytes(self.command_headers[0:2], "little")

    def check_sender_version(self) -> int:
        """Protocol step *Start*: accept the current or previous version, else raise."""
        version = self.sender_version
        if version not in SUPPORTED_VERSIONS:
            supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
            raise ProtocolError(
                f"migration protocol version {version} doesn't match supported versions: {supported}",
                where="Start",
            )
        return version


@dataclass(frozen=True)
class Response:
    """A 16-byte response header; ``length`` counts a payload (only PageFault answers carry one)."""

    status: Status
    length: int = 0

    def encode(self) -> bytes:
        return _HEADER.pack(self.status, bytes(6), self.length)

    @classmethod
    def decode(cls, data: bytes) -> Response:
        _check_header_size(data, "response")
        value, _padding, length = _HEADER.unpack(data)
        try:
            status = Status(value)
        except ValueError:
            raise ProtocolError(
                f"received response with unknown status {value}", where="response header"
            ) from None
        return cls(status, length)

    @classmethod
    def ok(cls, length: int = 0) -> Response:
        return cls(Status.OK, length)

    @classmethod
    def error(cls) -> Response:
        return cls(Status.ERROR)

    @property
    def is_ok(self) -> bool:
        return self.status is Status.OK


# --------------------------------------------------------------------------
# Memory ranges
# --------------------------------------------------------------------------


class MemoryRange(NamedTuple):
    """``length`` bytes of guest memory starting at guest-physical ``gpa``.

    A named tuple, not a dataclass: a peer's table may hold a million of them,
    and tuples cost a third of the memory and time to build.
    """

    gpa: int
    length: int

    @property
    def end(self) -> int:
        return self.gpa + self.length

    def encode(self) -> bytes:
        return _RANGE.pack(self.gpa, self.length)

    @classmethod
    def decode(cls, data: bytes) -> MemoryRange:
        if len(data) != MEMORY_RANGE_SIZE:
            raise ProtocolError(
                f"memory range must be {MEMORY_RANGE_SIZE} bytes, got {len(data)}", where="memory range"
            )
        gpa, length = _RANGE.unpack(data)
        if gpa + length > _U64_MAX + 1:
            raise ProtocolError(
                f"memory range {gpa:#x}+{length:#x} wraps past the end of the address space",
                where="memory range",
            )
        return cls(gpa, length)


def check_page_fault_range(rng: MemoryRange, limits: Limits = DEFAULT_LIMITS) -> None:
    """Protocol step *PageFault*: the range must be non-empty, page aligned and at most 1 GiB."""
    if rng.length == 0:
        raise ProtocolError("page fault for an empty range", where="PageFault")
    if rng.length > limits.max_page_fault_bytes:
        raise ProtocolError(
            f"page fault for {rng.length} bytes exceeds the limit of {limits.max_page_fault_bytes}",
            where="PageFault",
        )
    if rng.gpa % PAGE_SIZE or rng.length % PAGE_SIZE:
        raise ProtocolError(
            f"page fault range {rng.gpa:#x}+{rng.length:#x} is not page aligned", where="PageFault"
        )


class PackedRanges(Sequence[MemoryRange]):
    """A received table's ranges, kept as the wire bytes and unpacked as they are read.

    A peer's table may hold a million ranges: as Python objects they would cost
    eight times the 16 MiB they take on the wire.  Read-only.
    """

    def __init__(self, data: bytes | bytearray) -> None:
        self._data = data  # owned: nobody else writes it

    def __len__(self) -> int:
        return len(self._data) // MEMORY_RANGE_SIZE

    def __getitem__(self, index: int | slice) -> MemoryRange | list[MemoryRange]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]  # type: ignore[misc]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return MemoryRange._make(_RANGE.unpack_from(self._data, index * MEMORY_RANGE_SIZE))

    def __iter__(self) -> Iterator[MemoryRange]:
        return map(MemoryRange._make, _RANGE.iter_unpack(self._data))

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, (list, PackedRanges)) else NotImplemented

    def wire(self) -> bytes:
        return bytes(self._data)


@dataclass
class MemoryRangeTable:
    """A list of ranges that travels as one Memory payload: n × 16 bytes."""

    ranges: list[MemoryRange] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ranges)

    def __iter__(self) -> Iterator[MemoryRange]:
        return iter(self.ranges)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def append(self, rng: MemoryRange) -> None:
        self._unpack()
        self.ranges.append(rng)

    def extend(self, other: Iterable[MemoryRange]) -> None:
        self._unpack()
        self.ranges.extend(other)

    def merged(self) -> MemoryRangeTable:
        """The same pages, each once: ranges sorted and overlapping or touching ones joined (two dirty-log reads
        joined into one Discard must not name a page twice)."""
        out: list[MemoryRange] = []
        for rng in sorted(self.ranges):
            if not rng.length:
                continue
            if out and rng.gpa <= out[-1].end:
                if rng.end > out[-1].end:
                    out[-1] = MemoryRange(out[-1].gpa, rng.end - out[-1].gpa)
            else:
                out.append(rng)
        return MemoryRangeTable(out)

    def _unpack(self) -> None:
        """A received (packed) table becomes a plain list before it is changed."""
        if isinstance(self.ranges, PackedRanges):
            self.ranges = list(self.ranges)

    @property
    def byte_length(self) -> int:
        """The table's size on the wire (the Memory request's ``length``)."""
        return MEMORY_RANGE_SIZE * len(self.ranges)

    @property
    def total_bytes(self) -> int:
        """How many bytes of guest memory follow the table (``effective_size``)."""
        return sum(r.length for r in self.ranges)

    def encode(self) -> bytes:
        if isinstance(self.ranges, PackedRanges):
            return self.ranges.wire()
        return b"".join(_RANGE.pack(r.gpa, r.length) for r in self.ranges)

    @classmethod
    def decode(cls, data: bytes) -> MemoryRangeTable:
        if len(data) % MEMORY_RANGE_SIZE:
            raise ProtocolError(
                f"memory range table of {len(data)} bytes is not a multiple of {MEMORY_RANGE_SIZE}",
                where="Memory",
            )
        ranges = PackedRanges(data)
        for gpa, length in ranges:
            if gpa + length > _U64_MAX + 1:
                raise ProtocolError(
                    f"memory range {gpa:#x}+{length:#x} wraps past the end of the address space",
                    where="Memory",
                )
        return cls(ranges)  # type: ignore[arg-type]

    @classmethod
    def from_dirty_bitmap(
        cls, bitmap: bytes | Iterable[int], start_addr: int, page_size: int = PAGE_SIZE
    ) -> MemoryRangeTable:
        """Turn a KVM dirty bitmap into ranges, merging adjacent dirty pages.

        ``bitmap`` is either raw bytes (as ``KVM_GET_DIRTY_LOG`` fills them) or
        an iterable of u64 words; bit *b* of word *w* is page ``64*w + b``.
        """
        if isinstance(bitmap, (bytes, bytearray, memoryview)):
            raw = bytes(bitmap)
            raw += bytes(-len(raw) % 8)
            words: Iterable[int] = (w for (w,) in struct.iter_unpack("<Q", raw))
        else:
            words = bitmap
        ranges: list[MemoryRange] = []
        run_start = -1  # first page of the run being built, or -1
        run_end = -1
        for word_index, word in enumerate(words):
            base = 64 * word_index
            while word:
                low = (word & -word).bit_length() - 1
                shifted = word >> low
                # Length of the run of ones starting at bit `low`.
                ones = ((shifted + 1) & ~shifted).bit_length() - 1
                first, last = base + low, base + low + ones
                if first == run_end:
                    run_end = last
                else:
                    if run_start >= 0:
                        ranges.append(
                            MemoryRange(start_addr + run_start * page_size, (run_end - run_start) * page_size)
                        )
                    run_start, run_end = first, last
                word = (shifted >> ones) << (low + ones) if low + ones < 64 else 0
        if run_start >= 0:
            ranges.append(MemoryRange(start_addr + run_start * page_size, (run_end - run_start) * page_size))
        return cls(ranges)

    def partition(self, chunk_size: int) -> Iterator[MemoryRangeTable]:
        """Split into tables of at most ``chunk_size`` bytes each; a range may be split.

        Produces the same chunks as Cloud Hypervisor's ``MemoryRangeTableIterator``:
        it takes ranges from the *end* of the table and, when a range does not
        fit, takes the range's tail and leaves its head for the next chunk.  Each
        chunk lists its ranges in ascending order.  Callers must not rely on the
        order of the chunks.
        """
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        chunk: list[MemoryRange] = []
        room = chunk_size
        for rng in reversed(self.ranges):
            gpa, length = rng.gpa, rng.length
            while length:
                take = min(length, room)
                length -= take
                chunk.append(MemoryRange(gpa + length, take))
                room -= take
                if room == 0:
                    yield MemoryRangeTable(chunk[::-1])
                    chunk, room = [], chunk_size
        if chunk:
            yield MemoryRangeTable(chunk[::-1])


def decode_json_payload(payload: bytes, what: str, limits: Limits = DEFAULT_LIMITS) -> object:
    """Config or State JSON, parsed at a cost bounded by its size: finite numbers, bounded nesting and counts."""
    try:
        return loads_bounded(payload, max_containers=limits.max_json_containers, max_values=limits.max_json_values)
    except JsonRefused as exc:
        raise ProtocolError(f"malformed {what}: {exc}", where=what) from None


def encode_memory_fd_slot(slot: int) -> bytes:
    """MemoryFd's 4-byte payload."""
    return _SLOT.pack(slot)


def check_discard_table(table: MemoryRangeTable) -> None:
    """Protocol step *Discard*: every range page aligned and not empty (then the receiver checks it is RAM)."""
    for rng in table:
        if not rng.length or rng.gpa % PAGE_SIZE or rng.length % PAGE_SIZE:
            raise ProtocolError(f"range {rng.gpa:#x}+{rng.length:#x} is not whole pages", where="Discard")


def check_memory_before_state(memory_mode: str, memory_bytes: int, memory_fds: bool) -> None:
    """Protocol step *State*, precopy: guest memory came first (Memory bytes, or MemoryFds in a local migration).

    A VM that ran has pages; restoring its State into empty RAM would run a wreck.  (A postcopy source sends
    none: its pages come over the Fault connections after State.)
    """
    if memory_mode == "precopy" and not memory_fds and memory_bytes == 0:
        raise ProtocolError("State came before any memory: a precopy source sends the guest's pages first "
                            "(if the source migrates by postcopy, receive with memory_mode=postcopy)", where="State")


def completion_timeout(local: bool, memory_bytes: int, limits: Limits = DEFAULT_LIMITS) -> float:
    """How long a paused source waits for the answer to Complete / CompletePaused.

    A local migration's destination may be an offload daemon, which must read,
    write and fsync all of guest RAM *before* it answers (the VM may be gone
    right after): it gets ``paused_response_timeout_s`` plus the RAM at
    ``local_completion_rate``.  Any other destination only resumes a VM.
    """
    wait = limits.paused_response_timeout_s
    if local:
        wait += memory_bytes / limits.local_completion_rate
    return wait


def check_memory_fd(slot: int, received: Collection[int], limits: Limits = DEFAULT_LIMITS) -> None:
    """Protocol step *MemoryFd*: one per slot, at most ``max_slots`` of them."""
    if slot in received:
        raise ProtocolError(f"a second MemoryFd for slot {slot}", where="MemoryFd")
    if len(received) >= limits.max_slots:
        raise ProtocolError(f"more than {limits.max_slots} MemoryFd requests", where="MemoryFd")


def decode_memory_fd_slot(data: bytes) -> int:
    if len(data) != MEMORY_FD_PAYLOAD_SIZE:
        raise ProtocolError(
            f"MemoryFd payload must be {MEMORY_FD_PAYLOAD_SIZE} bytes, got {len(data)}", where="MemoryFd"
        )
    return _SLOT.unpack(data)[0]


# --------------------------------------------------------------------------
# The receiver's state machine
# --------------------------------------------------------------------------


class ReceiverState(enum.Enum):
    """Where the receiving side of the main connection is."""

    ESTABLISHED = "Established"
    STARTED = "Started"
    MEMORY_FDS_RECEIVED = "MemoryFdsReceived"
    CONFIGURED = "Configured"
    STATE_RECEIVED = "StateReceived"
    COMPLETED = "Completed"
    ABORTED = "Aborted"


_S = ReceiverState
_C = Command

#: The whole receiver state machine: (state, command) → next state.
#: Abandon is allowed in every non-final state and leads to Aborted (answered Ok).
#: Anything not in this table is a protocol error: the receiver answers Error and aborts.
RECEIVER_TRANSITIONS: dict[tuple[ReceiverState, Command], ReceiverState] = {
    (_S.ESTABLISHED, _C.START): _S.STARTED,
    (_S.STARTED, _C.MEMORY_FD): _S.MEMORY_FDS_RECEIVED,
    (_S.MEMORY_FDS_RECEIVED, _C.MEMORY_FD): _S.MEMORY_FDS_RECEIVED,
    (_S.STARTED, _C.CONFIG): _S.CONFIGURED,
    (_S.MEMORY_FDS_RECEIVED, _C.CONFIG): _S.CONFIGURED,
    (_S.CONFIGURED, _C.MEMORY): _S.CONFIGURED,
    (_S.CONFIGURED, _C.DISCARD): _S.CONFIGURED,
    (_S.CONFIGURED, _C.STATE): _S.STATE_RECEIVED,
    (_S.STATE_RECEIVED, _C.COMPLETE): _S.COMPLETED,
    (_S.STATE_RECEIVED, _C.COMPLETE_PAUSED): _S.COMPLETED,
}

FINAL_STATES = frozenset({_S.COMPLETED, _S.ABORTED})

#: Commands that exist only from a protocol version on: the version the Start of the migration named must be
#: at least this (Cloud Hypervisor speaks version 0 and knows none of them).
COMMAND_SINCE_VERSION: dict[Command, int] = {
    _C.DISCARD: 1,
}

#: Commands whose request carries no payload: ``length`` must be 0.  (Start's depends on the version.)
_NO_PAYLOAD = frozenset({_C.COMPLETE, _C.COMPLETE_PAUSED, _C.ABANDON})


def start_payload_sizes(version: int) -> tuple[int, ...]:
    """Start's payload: none in version 0 (Cloud Hypervisor's); in version 1 none (this migration will not
    recover) or the 16-byte migration token (a FaultRecovery connection proves it)."""
    return (0, TOKEN_SIZE) if version >= 1 else (0,)


def next_receiver_state(state: ReceiverState, command: Command, version: int = NEWEST_PROTOCOL_VERSION
                        ) -> ReceiverState:
    """Is ``command`` allowed in ``state`` of a migration that speaks ``version``, and where does it lead?"""
    since = COMMAND_SINCE_VERSION.get(command, 0)
    if since > version:
        raise ProtocolError(f"{command.wire_name} needs protocol version {since}, but this migration's Start said "
                            f"version {version}", where=state.value)
    if state in FINAL_STATES:
        raise ProtocolError(
            f"can't handle command {command.wire_name}: the migration is already {state.value}",
            where=state.value,
        )
    if command is _C.ABANDON:
        return _S.ABORTED
    try:
        return RECEIVER_TRANSITIONS[(state, command)]
    except KeyError:
        raise ProtocolError(
            f"can't handle command {command.wire_name} in receive state {state.value}", where=state.value
        ) from None


def accepted_next(state: ReceiverState, version: int = NEWEST_PROTOCOL_VERSION) -> list[Command]:
    """The commands the receiver accepts in ``state`` of a migration that speaks ``version`` (besides Abandon)."""
    return [command for (from_state, command) in RECEIVER_TRANSITIONS
            if from_state is state and COMMAND_SINCE_VERSION.get(command, 0) <= version]


#: What each command is for, in one sentence: the walkthrough and ``trace show`` narrate each request with it,
#: and ``docs/protocol.md``'s command table is drawn from it.  (Where it goes in the state machine is the
#: transition table's business, not this one's.)
COMMAND_PURPOSE: dict[Command, str] = {
    _C.INVALID: "never valid: the receiver refuses it",
    _C.START: "opens the migration and names the protocol version the source speaks",
    _C.CONFIG: "the VM's configuration and RAM layout as JSON: the receiver builds the VM and its guest RAM "
               "(an offload daemon keeps it as migration_config.json)",
    _C.STATE: "the vCPUs' registers and the devices' state as JSON: the receiver restores them into its VM (an "
              "offload daemon keeps them as state.json)",
    _C.MEMORY: "a table of guest-physical ranges, then the bytes of every range: the receiver writes them into "
               "guest RAM in place",
    _C.COMPLETE: "the hand-over: the receiver resumes the VM, and from its Ok on the VM lives there (an offload "
                 "daemon answers once the snapshot is on disk)",
    _C.ABANDON: "the source gives up: the receiver drops what it built and answers Ok",
    _C.MEMORY_FD: "a RAM slot's memfd, passed as SCM_RIGHTS with its 4-byte slot number: the receiver maps "
                  "the same memory, so nothing is copied",
    _C.COMPLETE_PAUSED: "the hand-over of a paused VM: the receiver keeps it paused",
    _C.PAGE_FAULT: "the destination asks for a range it does not have yet (postcopy): the source answers Ok with "
                   "the bytes inline, or with length 0 once it wrote them into the shared memfd",
    _C.DISCARD: "version 1, the switch of a hybrid migration to postcopy: the pages the guest wrote since they "
                "were sent; the receiver drops its stale copies, and they will come by PageFault",
}

#: What an Ok to a request on an additional connection means (on the main connection an Ok moves the state
#: machine, which says it all).  PageFault's Ok says it by its length (:func:`check_response`).
OK_MEANS: dict[Command, str] = {
    _C.MEMORY: "the bytes of every range are in the receiver's guest RAM",
    _C.PAGE_FAULT: "the page's bytes follow inline: the destination copies them in (UFFDIO_COPY), which wakes any "
                   "vCPU that waited for them (a range of the background pull wakes none)",
}
#: ... and a PageFault's Ok of length 0.
OK_PAGE_IN_SHARED_MEMORY = ("length 0: the source wrote the page into the shared memfd; the destination maps it "
                            "(UFFDIO_CONTINUE)")


#: What each request's payload is, for the command table (``docs.py``).
COMMAND_PAYLOAD: dict[Command, str] = {
    _C.INVALID: "—",
    _C.START: "`command_headers[0:2]` = the sender's protocol version; version 0: none; version 1: none, or the "
              "16-byte migration token of a migration that can recover (random; a FaultRecovery connection proves "
              "it)",
    _C.CONFIG: 'JSON `{"vm_config", "common_cpuid", "memory_manager_data": {"guest_ram_mappings": [...]}}`',
    _C.STATE: "JSON: vCPUs and devices",
    _C.MEMORY: "a MemoryRangeTable (`length` = 16·n), then the bytes of every range, uncounted",
    _C.COMPLETE: "none",
    _C.ABANDON: "none",
    _C.MEMORY_FD: "4 bytes: slot (u32); the memfd rides along as SCM_RIGHTS",
    _C.COMPLETE_PAUSED: "none",
    _C.PAGE_FAULT: "one MemoryRange (on a Fault connection)",
    _C.DISCARD: "a MemoryRangeTable (`length` = 16·n), no data (protocol version 1 only)",
}


#: How long the receiver lets the main connection stay silent between requests, by state (a field of
#: :class:`Limits`, or None: as long as it takes).  In Configured the source may be sending all of its
#: memory over other connections for as long as precopy runs, so only a dead peer (TCP keepalive) or
#: an operator's cancel ends that wait.
RECEIVER_IDLE_TIMEOUTS: dict[ReceiverState, str | None] = {
    _S.ESTABLISHED: "first_request_timeout_s",
    _S.STARTED: "stall_timeout_s",
    _S.MEMORY_FDS_RECEIVED: "stall_timeout_s",
    _S.CONFIGURED: None,
    _S.STATE_RECEIVED: "stall_timeout_s",
}


def receiver_idle_timeout(state: ReceiverState, limits: Limits = DEFAULT_LIMITS) -> float | None:
    """How long the main connection may be silent before the next request, in ``state``."""
    name = RECEIVER_IDLE_TIMEOUTS.get(state)
    return None if name is None else float(getattr(limits, name))


def check_request_length(request: Request, limits: Limits = DEFAULT_LIMITS) -> None:
    """Reject a header whose ``length`` the receiver must not read or allocate."""
    cmd, length = request.command, request.length
    where = cmd.wire_name
    if cmd in _NO_PAYLOAD and length:
        raise ProtocolError(f"{where} carries no payload, but length is {length}", where=where)
    if cmd is _C.START and length not in start_payload_sizes(request.sender_version):
        allowed = " or ".join(str(size) for size in start_payload_sizes(request.sender_version))
        raise ProtocolError(f"Start of protocol version {request.sender_version} carries {allowed} bytes, but length "
                            f"is {length}", where=where)
    if cmd is _C.CONFIG and length > limits.max_config_bytes:
        raise ProtocolError(
            f"config of {length} bytes exceeds the limit of {limits.max_config_bytes}", where=where
        )
    if cmd is _C.STATE and length > limits.max_state_bytes:
        raise ProtocolError(f"state of {length} bytes exceeds the limit of {limits.max_state_bytes}", where=where)
    if cmd in (_C.MEMORY, _C.DISCARD):
        if length % MEMORY_RANGE_SIZE:
            raise ProtocolError(
                f"memory range table of {length} bytes is not a multiple of {MEMORY_RANGE_SIZE}", where=where
            )
        if length > limits.max_table_bytes:
            raise ProtocolError(
                f"memory range table of {length} bytes exceeds the limit of {limits.max_table_bytes}",
                where=where,
            )
    if cmd is _C.MEMORY_FD and length != MEMORY_FD_PAYLOAD_SIZE:
        raise ProtocolError(f"MemoryFd payload must be {MEMORY_FD_PAYLOAD_SIZE} bytes, got {length}", where=where)
    if cmd is _C.PAGE_FAULT and length != MEMORY_RANGE_SIZE:
        raise ProtocolError(f"PageFault payload must be {MEMORY_RANGE_SIZE} bytes, got {length}", where=where)


class ReceiverMachine:
    """The receiver's protocol state, advanced one request at a time (sans I/O).

    The receive loop calls :meth:`begin` with each request header *before*
    reading its payload (so nothing is read or allocated for a command that is
    not allowed), does the work of the step, then calls :meth:`commit`.  Any
    failure in between is reported with :meth:`fail`, which moves to Aborted.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.state = _S.ESTABLISHED
        #: The protocol version the sender's Start named (until Start: the oldest, 0).
        self.version = PROTOCOL_VERSION
        self._pending: ReceiverState | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def begin(self, request: Request) -> ReceiverState:
        """Validate ``request`` against the table and the limits; return the state it leads to."""
        try:
            target = next_receiver_state(self.state, request.command, self.version)
            if request.command is _C.START:
                self.version = request.check_sender_version()
            check_request_length(request, self.limits)
        except ProtocolError:
            self.fail()
            raise
        self._pending = target
        return target

    def commit(self) -> ReceiverState:
        """The step succeeded: move to the state :meth:`begin` announced."""
        if self._pending is None:
            raise RuntimeError("commit() without begin()")
        self.state, self._pending = self._pending, None
        return self.state

    def fail(self) -> None:
        """The step failed (Error was or will be answered): the migration is aborted."""
        self._pending = None
        self.state = _S.ABORTED


class SourceMachine:
    """The source's side of the same table: it may send what the receiver accepts now.

    Both ends agree on one state: the receiver's state after the last Ok.  The
    source asks :meth:`check_send` before it writes a request (sending anything
    else would be a bug in chmig, not the peer's fault) and calls
    :meth:`acknowledged` once the request was answered Ok.
    """

    def __init__(self, version: int = PROTOCOL_VERSION) -> None:
        self.state = _S.ESTABLISHED
        #: The version this source's Start names: 0 unless its migration needs a newer command.
        self.version = version

    def check_send(self, command: Command) -> ReceiverState:
        """May the source send ``command`` now?  Returns the state Ok will lead to."""
        try:
            return next_receiver_state(self.state, command, self.version)
        except ProtocolError as exc:
            raise InternalError(f"the source tried to send {command.wire_name}: {exc.message}",
                                where="source") from None

    def acknowledged(self, command: Command) -> ReceiverState:
        """The destination answered ``command`` with Ok: both sides move on."""
        self.state = self.check_send(command)
        return self.state


# --------------------------------------------------------------------------
# Additional connections
# --------------------------------------------------------------------------


class Side(enum.Enum):
    """The two ends of a migration."""

    SOURCE = "source"
    DESTINATION = "destination"


@dataclass(frozen=True)
class ConnectionRule:
    """What one kind of additional connection is for and may carry."""

    role: ConnectionRole
    #: How its connections are named in traces: ``memory-0``, ``fault-1``.
    name: str
    #: Who sends the requests on it (the other side answers them).  The source opens every connection.
    requester: Side
    #: The only commands allowed on it; anything else is answered Error and ends the connection.
    commands: frozenset[Command]
    purpose: str
    #: The protocol version the migration must speak for this role (a Start of an older one never allows it).
    since_version: int = 0
    #: What follows the role before the first request (:data:`RECOVERY_HELLO_SIZE` bytes, or nothing).
    hello_size: int = 0


#: Every kind of additional connection (``ReceiveAdditionalConnections`` in Cloud Hypervisor).
#: The main connection carries everything else and follows :data:`RECEIVER_TRANSITIONS`.
CONNECTION_RULES: dict[ConnectionRole, ConnectionRule] = {
    ConnectionRole.PRECOPY_MEMORY: ConnectionRule(
        ConnectionRole.PRECOPY_MEMORY, "memory", Side.SOURCE, frozenset({_C.MEMORY}),
        "precopy memory in tables of at most 64 MiB (connections=N); EOF between requests ends it",
    ),
    ConnectionRole.FAULT: ConnectionRule(
        ConnectionRole.FAULT, "fault", Side.DESTINATION, frozenset({_C.PAGE_FAULT}),
        "postcopy: the destination asks for pages, the source answers them; the destination closes it",
    ),
    ConnectionRole.FAULT_RECOVERY: ConnectionRule(
        ConnectionRole.FAULT_RECOVERY, "recovery", Side.DESTINATION, frozenset({_C.PAGE_FAULT}),
        "version 1, postcopy after a Fault connection broke: the role, then the migration token and the "
        "attempt number (24 bytes); a wrong token is closed unanswered; then as a Fault connection",
        since_version=1, hello_size=RECOVERY_HELLO_SIZE,
    ),
}

#: The name of the main connection in traces.
MAIN_CONNECTION = "main"


def connection_rule(role: ConnectionRole) -> ConnectionRule:
    """The rule for ``role``; Invalid (or any role without a rule) is a protocol error."""
    try:
        return CONNECTION_RULES[role]
    except KeyError:
        raise ProtocolError(f"connection role {role.wire_name} is not allowed", where="connection role") from None


def check_connection_request(role: ConnectionRole, request: Request, limits: Limits = DEFAULT_LIMITS) -> None:
    """Is ``request`` allowed on a connection that announced ``role``?  (Checked before any payload.)"""
    rule = connection_rule(role)
    if request.command not in rule.commands:
        allowed = ", ".join(sorted(c.wire_name for c in rule.commands))
        raise ProtocolError(
            f"only {allowed} requests are allowed on {role.wire_name} connections, got {request.command.wire_name}",
            where=f"{rule.name} connection",
        )
    check_request_length(request, limits)


class RecoveryHello(NamedTuple):
    """Version 1: what a FaultRecovery connection says after its role — the migration's token (Start's payload)
    and which attempt of the source it belongs to (1, 2, …: a newer attempt replaces every older connection)::

        u8[16] token | u32 attempt | u8[4] zero
    """

    token: bytes
    attempt: int

    def encode(self) -> bytes:
        if len(self.token) != TOKEN_SIZE:
            raise InternalError(f"a migration token is {TOKEN_SIZE} bytes, not {len(self.token)}", where="recovery")
        return _RECOVERY_HELLO.pack(self.token, self.attempt)

    @classmethod
    def decode(cls, data: bytes) -> RecoveryHello:
        if len(data) != RECOVERY_HELLO_SIZE:
            raise ProtocolError(f"a recovery hello is {RECOVERY_HELLO_SIZE} bytes, got {len(data)}", where="recovery")
        token, attempt = _RECOVERY_HELLO.unpack(data)
        if attempt == 0:
            raise ProtocolError("recovery attempt 0 (the first attempt is 1)", where="recovery")
        return cls(token, attempt)


def check_recovery(hello: RecoveryHello, token: bytes | None) -> None:
    """Does a FaultRecovery connection belong to this migration?  Only its token says so: compared in constant
    time, and refused when the migration agreed none (a version-0 Start, or recovery switched off)."""
    if token is None:
        raise ProtocolError("this migration cannot recover (its Start agreed no token)", where="recovery")
    if not hmac.compare_digest(hello.token, token):
        raise ProtocolError("wrong migration token: not this migration's source", where="recovery")


def check_response(command: Command, response: Response, requested: int = 0) -> None:
    """Only a PageFault's Ok carries a payload: 0 bytes (written into shared memory) or the whole range."""
    if command is _C.PAGE_FAULT and response.is_ok:
        if response.length not in (0, requested):
            raise ProtocolError(
                f"answer to a PageFault for {requested} bytes carries {response.length}", where="PageFault"
            )
    elif response.length:
        raise ProtocolError(
            f"answer to {command.wire_name} carries a payload of {response.length} bytes", where=command.wire_name
        )


# --------------------------------------------------------------------------
# The offload daemon (Cloud Hypervisor's ``offload_daemon``)
# --------------------------------------------------------------------------
#
# The daemon is a local-migration peer: on snapshot it is the receiver (the
# table above, with the refusals below), on restore the sender (the source's
# side of the same table).  Of the Config it reads only the slots.


class SlotMapping(NamedTuple):
    """One ``memory_manager_data.guest_ram_mappings`` entry, as far as the offload daemon needs it."""

    slot: int
    gpa: int
    size: int
    #: Where the slot's bytes start in its memory fd.
    file_offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


#: Commands the snapshot daemon refuses although the receiver table allows them, and why.
OFFLOAD_SNAPSHOT_REFUSED: dict[Command, str] = {
    _C.MEMORY: "the offload daemon takes guest memory only as MemoryFds (send-migration ...,local=on)",
    _C.DISCARD: "a snapshot takes the memory it was given (MemoryFds): nothing to discard (no hybrid migration to a "
                "daemon)",
}

_U64_MAX = (1 << 64) - 1


def offload_snapshot_idle_timeout(state: ReceiverState, limits: Limits = DEFAULT_LIMITS) -> float:
    """How long the snapshot daemon lets the VMM be silent before the next request, in ``state``.

    As a receiver's (:data:`RECEIVER_IDLE_TIMEOUTS`), except in Configured: a
    receiver waits there as long as precopy runs over other connections, but
    the daemon takes memory only as MemoryFds, so a silent VMM is stuck there
    as anywhere else.
    """
    idle = receiver_idle_timeout(state, limits)
    return limits.stall_timeout_s if idle is None else idle


def check_offload_snapshot_request(request: Request) -> None:
    """May the snapshot daemon take ``request``?  (After the state machine allowed it, before its payload.)"""
    reason = OFFLOAD_SNAPSHOT_REFUSED.get(request.command)
    if reason is not None:
        raise ProtocolError(reason, where=request.command.wire_name)


def parse_slot_mappings(config: object, limits: Limits = DEFAULT_LIMITS) -> list[SlotMapping]:
    """The slots of a Config document: ``memory_manager_data.guest_ram_mappings`` (slot, gpa, size, file_offset).

    Only those four fields are read, so a Cloud Hypervisor VM's Config works
    as well as chmig's.  Every value is checked: unsigned integers in range,
    page-aligned, non-empty, slots unique, guest ranges not overlapping, at most
    ``max_slots`` of them.
    """
    where = "Config"
    try:
        entries = config["memory_manager_data"]["guest_ram_mappings"]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ProtocolError("Config has no memory_manager_data.guest_ram_mappings", where=where) from None
    if not isinstance(entries, list) or not entries:
        raise ProtocolError("guest_ram_mappings must be a non-empty list", where=where)
    if len(entries) > limits.max_slots:
        raise ProtocolError(f"more than {limits.max_slots} guest RAM slots", where=where)
    mappings = []
    for entry in entries:
        values = []
        for name, high in (("slot", 0xFFFF_FFFF), ("gpa", _U64_MAX), ("size", _U64_MAX), ("file_offset", _U64_MAX)):
            value = entry.get(name) if isinstance(entry, dict) else None
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
                raise ProtocolError(f"guest_ram_mappings entry needs {name} as an integer in 0..{high}", where=where)
            values.append(value)
        mapping = SlotMapping(*values)
        if not mapping.size or (mapping.gpa | mapping.size | mapping.file_offset) % PAGE_SIZE:
            raise ProtocolError(f"slot {mapping.slot}: gpa, size and file_offset must be page-aligned, size > 0",
                                where=where)
        if mapping.end > _U64_MAX or mapping.file_offset + mapping.size > _U64_MAX:
            raise ProtocolError(f"slot {mapping.slot} goes beyond 2^64", where=where)
        mappings.append(mapping)
    total = sum(m.size for m in mappings)
    if total > limits.max_guest_ram:
        raise ProtocolError(f"guest RAM of {total} bytes is more than the {limits.max_guest_ram} accepted", where=where)
    if len({m.slot for m in mappings}) != len(mappings):
        raise ProtocolError("two guest_ram_mappings entries have the same slot", where=where)
    ordered = sorted(mappings, key=lambda m: m.gpa)
    for before, after in zip(ordered, ordered[1:]):
        if after.gpa < before.end:
            raise ProtocolError(f"slots {before.slot} and {after.slot} overlap", where=where)
    return mappings


def check_slots_covered(mappings: Iterable[SlotMapping], memory_fd_slots: Collection[int]) -> None:
    """Snapshot completion: exactly one MemoryFd came for every slot of the Config."""
    expected = {m.slot for m in mappings}
    missing = sorted(expected - set(memory_fd_slots))
    if missing:
        raise ProtocolError(f"no MemoryFd for slot {missing[0]} (local migration sends one per slot)",
                            where="Complete")
    extra = sorted(set(memory_fd_slots) - expected)
    if extra:
        raise ProtocolError(f"a MemoryFd for slot {extra[0]}, which the Config does not have", where="Complete")


# --------------------------------------------------------------------------
# The tables, drawn (docs.py puts these into docs/protocol.md)
# --------------------------------------------------------------------------


def _versioned(command: Command) -> str:
    """A command's name, with the protocol version it needs when that is not 0: ``Discard (v1)``."""
    since = COMMAND_SINCE_VERSION.get(command, 0)
    return f"{command.wire_name} (v{since})" if since else command.wire_name


def receiver_state_diagram() -> str:
    """The receiver state machine as a mermaid ``stateDiagram-v2``, drawn from the table."""
    lines = ["stateDiagram-v2", "    direction TB", f"    [*] --> {_S.ESTABLISHED.value}"]
    for (state, command), target in RECEIVER_TRANSITIONS.items():
        lines.append(f"    {state.value} --> {target.value}: {_versioned(command)}")
    lines.append(f"    note right of {_S.ABORTED.value}: Abandon (from any state), or any error")
    lines.append(f"    {_S.COMPLETED.value} --> [*]")
    lines.append(f"    {_S.ABORTED.value} --> [*]")
    return "\n".join(lines)


def command_table() -> str:
    """Every :class:`Command` with its number, payload and purpose, as a Markdown table."""
    rows = ["| command | value | payload | what it is for |", "|---|---|---|---|"]
    for command in Command:
        rows.append(f"| {command.wire_name} | {command.value} | {COMMAND_PAYLOAD[command]} | "
                    f"{COMMAND_PURPOSE[command]} |")
    return "\n".join(rows)


def connection_rules_table() -> str:
    """:data:`CONNECTION_RULES` (and the main connection) as a Markdown table."""
    rows = [
        "| connection | announced by | requests sent by | commands | purpose |",
        "|---|---|---|---|---|",
        f"| `{MAIN_CONNECTION}` | (first connection, no role) | source | as the state machine allows | "
        "the control flow: Start … Complete |",
    ]
    for rule in CONNECTION_RULES.values():
        commands = ", ".join(sorted(c.wire_name for c in rule.commands))
        since = f", v{rule.since_version}" if rule.since_version else ""
        rows.append(f"| `{rule.name}-N` | role {rule.role.wire_name} ({rule.role.value}{since}) | "
                    f"{rule.requester.value} | {commands} | {rule.purpose} |")
    return "\n".join(rows)


def offload_refusals_table() -> str:
    """:data:`OFFLOAD_SNAPSHOT_REFUSED` as a Markdown table."""
    rows = ["| command | the snapshot daemon answers Error, because |", "|---|---|"]
    for command, reason in OFFLOAD_SNAPSHOT_REFUSED.items():
        rows.append(f"| {command.wire_name} | {reason} |")
    return "\n".join(rows)


def limits_table(limits: Limits = DEFAULT_LIMITS) -> str:
    """Every field of :class:`Limits` with its default, as a Markdown table."""
    import dataclasses

    rows = ["| limit | default | bounds |", "|---|---|---|"]
    for f in dataclasses.fields(limits):
        value = getattr(limits, f.name)
        if isinstance(value, int) and value >= MiB and value % MiB == 0:
            shown = f"{value // GiB} GiB" if value % GiB == 0 else f"{value // MiB} MiB"
        elif f.name.endswith("_s"):
            shown = f"{value:g} s"
        else:
            shown = f"{value:,}"
        rows.append(f"| `{f.name}` | {shown} | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)


def idle_timeouts_table(limits: Limits = DEFAULT_LIMITS) -> str:
    """:data:`RECEIVER_IDLE_TIMEOUTS` as a Markdown table."""
    rows = ["| receiver state | the main connection may be silent before the next request |", "|---|---|"]
    for state, name in RECEIVER_IDLE_TIMEOUTS.items():
        shown = "as long as it takes" if name is None else f"`{name}` ({getattr(limits, name):g} s)"
        rows.append(f"| {state.value} | {shown} |")
    return "\n".join(rows)


def source_sequence_diagram() -> str:
    """What the source may send in each state (the same table, seen from the source), as Mermaid."""
    lines = ["stateDiagram-v2", "    direction LR", f"    [*] --> {_S.ESTABLISHED.value}"]
    for (state, command), target in RECEIVER_TRANSITIONS.items():
        lines.append(f"    {state.value} --> {target.value}: send {_versioned(command)}, Ok")
    lines.append(f"    note right of {_S.ABORTED.value}: send Abandon (any state), or an Error answer")
    return "\n".join(lines)
