"""What a wire case sends: messages built from the recording, extra connections, and the case itself.

A case is a main stream (a :class:`~fuzz.common.Rope`, with the fds to pass at given offsets), the extra
connections to open before given main requests (:class:`Probe`, :class:`Worker`), and how the stream
ends.  Everything a case will send is decided when it is built, from ``(seed, index)`` alone, so a case
replays the same way every time (``--only INDEX``).
"""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from chmig import protocol as p

from .common import MiB, PAGE, Recording, Rope
from .model import FdSpec, Planned, ReferenceReceiver, Verdict, plan_worker

_ZEROS = bytes(MiB)
#: The most guest-memory bytes one built Memory request carries (the rest of a huge announced range is left out).
MAX_DATA = 64 * MiB


def zeros(n: int) -> Rope:
    """``n`` zero bytes without allocating them (views of one shared MiB)."""
    whole, rest = divmod(n, MiB)
    return Rope([_ZEROS] * whole + [memoryview(_ZEROS)[:rest]])


def header(command: int, length: int = 0, headers: bytes = bytes(6)) -> bytes:
    """A request header with any values at all (the fuzzer's own encoder: it must be able to lie)."""
    return struct.pack("<H6sQ", command & 0xFFFF, headers, length & (2**64 - 1))


def table_bytes(ranges: list[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack("<QQ", gpa & (2**64 - 1), length & (2**64 - 1)) for gpa, length in ranges)


@dataclass
class Message:
    """One request as the case sends it: its bytes and where its header and payload end."""

    name: str
    rope: Rope
    #: End of header + payload (a Memory request's table) inside ``rope``; the data follows.
    payload_end: int = p.HEADER_SIZE
    #: fds passed with the first payload byte (MemoryFd).
    fds: list[FdSpec] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rope)


class Builder:
    """Messages of a migration, built from the recording (its Config, State and guest memory)."""

    def __init__(self, recording: Recording) -> None:
        self.rec = recording
        self.config_doc: dict = json.loads(recording.config)
        self.state_doc: dict = json.loads(recording.state)
        # The populated memory in ranges of at most 1 MiB, dealt into four tables: a stable shape whatever
        # the recording's iterations were.
        ranges: list[tuple[int, int]] = []
        for gpa, length in recording.populated:
            for at in range(gpa, gpa + length, MiB):
                ranges.append((at, min(MiB, gpa + length - at)))
        per = max(1, -(-len(ranges) // 4))
        self.tables: list[list[tuple[int, int]]] = [ranges[i:i + per] for i in range(0, len(ranges), per)]

    # -- single messages ----------------------------------------------------------------------------

    def raw(self, name: str, command: int, payload: bytes | Rope = b"", length: int | None = None,
            headers: bytes = bytes(6)) -> Message:
        size = len(payload) if length is None else length
        return Message(name, Rope([header(command, size, headers), payload]), p.HEADER_SIZE + len(payload))

    def start(self, version: int = 0, rest: bytes = bytes(4)) -> Message:
        return self.raw("Start", 1, headers=struct.pack("<H", version & 0xFFFF) + rest)

    def config(self, payload: bytes | None = None) -> Message:
        return self.raw("Config", 2, self.rec.config if payload is None else payload)

    def state(self, payload: bytes | None = None) -> Message:
        return self.raw("State", 3, self.rec.state if payload is None else payload)

    def complete(self, paused: bool = False) -> Message:
        return self.raw("CompletePaused" if paused else "Complete", 8 if paused else 5)

    def abandon(self) -> Message:
        return self.raw("Abandon", 6)

    def memory_fd(self, slot: int, fds: list[FdSpec]) -> Message:
        message = self.raw("MemoryFd", 7, struct.pack("<I", slot & 0xFFFFFFFF))
        message.fds = list(fds)
        return message

    def data(self, gpa: int, length: int) -> Rope:
        """The bytes of a range: the recorded guest memory where there is some, zeros elsewhere."""
        parts: list[Rope | memoryview] = []
        end = gpa + length
        while gpa < end:
            slot = next((s for s in self.rec.slots if s.gpa <= gpa < s.end), None)
            if slot is None:
                nxt = min([s.gpa for s in self.rec.slots if s.gpa > gpa] + [end])
                parts.append(zeros(nxt - gpa))
                gpa = nxt
                continue
            n = min(end, slot.end) - gpa
            parts.append(self.rec.memory_view(gpa, n))
            gpa += n
        return Rope(parts)

    def _inside(self, gpa: int, length: int) -> bool:
        return any(s.gpa <= gpa and gpa + length <= s.end for s in self.rec.slots)

    def memory(self, ranges: list[tuple[int, int]], data: Rope | None = None, name: str = "Memory") -> Message:
        """A Memory request: header, table, then every range's bytes (``data`` overrides them).

        The data stops after :data:`MAX_DATA` bytes: a table may announce 2^64 bytes, and the stream then
        simply ends inside them.
        """
        table = table_bytes(ranges)
        if data is None:
            parts, room = [], MAX_DATA
            small = len(ranges) > 1000  # many small ranges: one buffer, not a million views
            buffer = bytearray()
            for gpa, length in ranges:
                if room <= 0:
                    break
                n = min(length, room)
                if not n:
                    continue
                if small and n <= PAGE and self._inside(gpa, n):
                    buffer += self.rec.memory_view(gpa, n)
                else:
                    if buffer:
                        parts.append(bytes(buffer))
                        buffer.clear()
                    parts.append(self.data(gpa, n))
                room -= n
            parts.append(bytes(buffer))
            data = Rope(parts)
        return Message(name, Rope([header(4, len(table)), table, data]), p.HEADER_SIZE + len(table))

    # -- whole migrations ---------------------------------------------------------------------------

    def precopy(self, config: bytes | None = None, state: bytes | None = None) -> list[Message]:
        """Start, Config, the memory in four Memory requests, State, Complete."""
        return [self.start(), self.config(config), *[self.memory(t) for t in self.tables], self.state(state),
                self.complete()]

    def recorded(self) -> list[Message]:
        """The recorded stream itself, every precopy iteration as it was sent."""
        up = self.rec.up
        out = []
        for r in self.rec.requests:
            out.append(Message(r.command.wire_name, Rope([memoryview(up)[r.start:r.end]]), r.payload_end - r.start))
        return out

    def local(self, fds: dict[int, list[FdSpec]], config: bytes | None = None) -> list[Message]:
        """Local migration: Start, one MemoryFd per slot (the given fds), Config, State, Complete."""
        return [self.start(), *[self.memory_fd(slot, f) for slot, f in fds.items()], self.config(config),
                self.state(), self.complete()]

    def memfd(self, size: int | None = None, image: bool = True, identity: str = "memfd-0",
              seals: tuple[str, ...] = ()) -> FdSpec:
        """A memfd holding the recorded guest memory: what a real local source hands over."""
        mappable = "write" not in seals and "future_write" not in seals
        return FdSpec("memfd" + (f"+{'+'.join(seals)}" if seals else ""), self.rec.ram_size if size is None else size,
                      mappable, identity, image, seals)

    def config_with(self, mutate: Any) -> bytes:
        """The recorded Config document, changed by ``mutate(document)``, as JSON."""
        document = copy.deepcopy(self.config_doc)
        mutate(document)
        return json.dumps(document).encode()

    def two_zone_config(self, extra: int = 4 * MiB, shared: bool = True) -> tuple[bytes, list[tuple[int, int]]]:
        """The recorded Config plus a second zone right after the first: two slots, adjacent.

        Returns the payload and the slots' (gpa, end), for range cases at slot boundaries.
        """
        size = self.rec.ram_size

        def add(document: dict) -> None:
            document["vm_config"]["memory"]["zones"] = [{"id": "extra", "size": extra, "shared": shared}]
            document["memory_manager_data"]["guest_ram_mappings"].append(
                {"slot": 1, "gpa": size, "size": extra, "zone_id": "extra", "virtio_mem": False, "file_offset": 0})

        return self.config_with(add), [(0, size), (size, size + extra)]


def flatten(messages: list[Message]) -> tuple[Rope, dict[int, list[FdSpec]], list[int]]:
    """One stream from messages: the rope, the fds by the offset of the byte carrying them, message starts."""
    fds: dict[int, list[FdSpec]] = {}
    starts: list[int] = []
    at = 0
    for message in messages:
        starts.append(at)
        if message.fds:
            fds[at + p.HEADER_SIZE] = list(message.fds)
        at += len(message)
    return Rope([m.rope for m in messages]), fds, starts


# ---------------------------------------------------------------------------------------------
# Extra connections
# ---------------------------------------------------------------------------------------------


@dataclass
class Probe:
    """Connections that are not part of the migration and must not affect it.

    ``role`` is what each sends first (any bytes: a bad role, half a role, nothing); ``late`` sends it only
    after that many seconds (past the receiver's role timeout); ``fault`` ones announce role Fault and are
    kept open until the migration ended, when the receiver must close them.
    """

    label: str
    role: bytes
    count: int = 1
    #: The receiver must hang up on it promptly (a bad or late role); we wait for that.
    expect_drop: bool = False
    late: float | None = None
    #: Keep it open until the end of the case (then the receiver must have closed it).
    keep: bool = False
    hold: float = 0.0
    rst: bool = False

    def plan(self, model: ReferenceReceiver) -> None:
        """Probes do not touch the migration."""


@dataclass
class Worker:
    """A ``PrecopyMemory`` connection: its role, then Memory requests (or whatever the case puts there)."""

    label: str
    stream: Rope
    role: bytes = struct.pack("<H", 1)
    #: fin (close between or inside requests, as the stream ends), rst, or hold (open until State).
    ending: str = "fin"
    #: Connect (and send the role) at this earlier main offset, before the acceptor runs.
    early: int | None = None
    #: Send only the first half of the last request, let the main connection go on (State), and send the rest
    #: this many seconds later: a worker still busy when State arrives.
    finish_later: float | None = None
    planned: list[Planned] = field(default_factory=list)

    def plan(self, model: ReferenceReceiver) -> None:
        self.planned = plan_worker(model, self.stream)
        failed: bool | None = False
        if any(x.verdict is Verdict.ERROR for x in self.planned):
            failed = True  # refused on the worker: the migration must fail at State
        elif self.planned and not self.planned[-1].complete:
            failed = True  # the worker ended inside a request: memory was lost
        elif any(x.verdict is Verdict.EITHER for x in self.planned) or self.ending == "rst":
            failed = None
        if failed:
            model.worker_failed = True
        elif failed is None and model.worker_failed is False:
            model.worker_failed = None
        if self.data and model.memory_arrived is False:
            model.memory_arrived = None  # counted once the worker's requests were taken: not decidable here

    @property
    def data(self) -> int:
        return sum(x.data for x in self.planned)


Action = Probe | Worker


@dataclass
class Case:
    """One fuzz case: everything it sends, decided from (seed, index)."""

    index: int
    kind: str
    detail: str
    transport: str  # "tcp" | "unix"
    stream: Rope
    fds_at: dict[int, list[FdSpec]] = field(default_factory=dict)
    #: Extra connections, by the main-stream offset before which they start.
    hooks: dict[int, list[Action]] = field(default_factory=dict)
    #: How our end of the main connection ends: fin, rst, shut (half-close, then wait for the receiver's
    #: close), hold (wait, then fin).
    ending: str = "fin"
    #: Can a real receiver process (default limits: 10 s role timeout, 30 s for workers at State) run it fast?
    process_ok: bool = True
    #: Receiver limits for the in-process target (short timeouts keep timeout cases fast).
    limits: dict[str, float] = field(default_factory=dict)
    #: Verdicts a mutation decided for payloads it wrote (see :class:`fuzz.model.Context`).
    payload_verdicts: dict[str, tuple[Verdict, str]] = field(default_factory=dict)
    #: Filled when planned.
    planned: list[Planned] = field(default_factory=list)

    def actions(self) -> list[Action]:
        return [a for offset in sorted(self.hooks) for a in self.hooks[offset]]

    def all_fds(self) -> list[FdSpec]:
        return [fd for fds in self.fds_at.values() for fd in fds]
