"""The message layer: every protocol message of every migration passes through a :class:`Channel`.

A Channel is one :class:`~chmig.transport.Connection` seen as a stream of
protocol messages.  It offers the operations both sides use — send a request
and expect Ok, read the next request checked against the rules, answer, move
memory, pass a MemoryFd, ask for a page and serve page requests — and it is
the only code outside :mod:`chmig.protocol` that encodes or decodes a Request,
a Response or a connection role.  (A test greps the package for that.)

Every message, sent or received, on every connection of a migration is
reported to the :class:`Observers` registered on that migration as one
:class:`Message`: connection name (``main``, ``memory-3``, ``fault-0``),
direction, command or status, length, a payload summary and the header bytes.
Whatever shows the protocol — the self-check's printed trace today, trace
files and walkthroughs later — reads it from there, so none re-implements it.

Guest memory is never copied by Python: the sender hands ``sendall`` a
``memoryview`` of the guest mapping, the receiver ``recv_into``s straight into
one, and every range of a table is checked against guest RAM before a single
byte of data is read.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

from . import protocol as p
from .errors import ChmigError, PeerError, PeerSilent, ProtocolError, TransportError, VmError
from .transport import Connection, ConnectionClosed
from .units import MiB

log = logging.getLogger(__name__)

#: A Memory request's live progress moves at least every this many bytes (``send_memory``).
PROGRESS_STEP = 16 * MiB

SENT = "sent"
RECEIVED = "received"

#: How far ahead of the arriving data the receiver faults guest memory in (MADV_POPULATE_WRITE).
POPULATE_AHEAD = 16 * p.MiB
#: Config and State payloads are read (and their buffer grown) this much at a time.
PAYLOAD_STEP = 1 * p.MiB


@dataclass(frozen=True)
class Message:
    """One protocol message as it passed one connection, as observers see it."""

    #: Wall-clock time (``time.time()``): a sent message is reported just before it is written, a
    #: received one once it was read whole, so across both ends every "sent" comes before its "received".
    time: float
    #: Which end saw it: ``source`` or ``destination``.
    side: str
    #: ``main``, ``memory-N`` or ``fault-N`` (:data:`chmig.protocol.CONNECTION_RULES`).
    connection: str
    #: :data:`SENT` or :data:`RECEIVED`, from ``side``'s point of view.
    direction: str
    #: ``request``, ``response`` or ``role``.
    kind: str
    #: The command (``Start``), status (``Ok``) or role (``PrecopyMemory``).
    name: str
    #: The header's length field (for Memory: the table's size; the data follows uncounted).
    length: int
    #: What the payload held, in a few words (ranges and sizes, slot and fd, the page asked for).
    summary: str
    #: The header as it was on the wire: 16 bytes (2 for a role).
    header: bytes
    #: Bytes of guest memory the message moves, asks for or drops: a Memory request's ranges (the data after
    #: its table), a PageFault's range, the bytes that follow a PageFault's Ok inline, a Discard's ranges; else 0.
    data: int = 0

    def to_json(self) -> dict:
        """The message as one line of a trace file (:mod:`chmig.trace`)."""
        return {"time": self.time, "side": self.side, "connection": self.connection, "direction": self.direction,
                "kind": self.kind, "name": self.name, "length": self.length, "data": self.data,
                "summary": self.summary, "header": self.header.hex()}


Observer = Callable[[Message], None]


class Observers:
    """The observers registered on one migration (thread-safe: every connection reports here)."""

    def __init__(self, *observers: Observer) -> None:
        self._lock = threading.Lock()
        self._observers: list[Observer] = list(observers)

    def add(self, observer: Observer) -> None:
        with self._lock:
            self._observers.append(observer)

    def remove(self, observer: Observer) -> None:
        with self._lock:
            self._observers.remove(observer)

    def notify(self, message: Message) -> None:
        with self._lock:
            observers = list(self._observers)
        for observer in observers:
            try:
                observer(message)
            except Exception:  # a broken trace must not break the migration it watches
                log.exception("observer %r failed on %s %s", observer, message.direction, message.name)


class MessageLog:
    """An observer that keeps every message in order (tests, the self-check, walkthroughs)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.messages: list[Message] = []

    def __call__(self, message: Message) -> None:
        with self._lock:
            self.messages.append(message)

    def lines(self, side: str | None = None) -> list[tuple[str, str, str]]:
        """``(connection, direction, name)`` of each message (of one side, if given)."""
        with self._lock:
            return [(m.connection, m.direction, m.name) for m in self.messages if side in (None, m.side)]


class MemoryTarget(Protocol):
    """What the data path needs of guest memory (:class:`chmig.memory.GuestMemory` is one)."""

    def split(self, rng: p.MemoryRange) -> Iterator[tuple[int, int]]:
        """Cut a range into pieces that each lie in one mapping; raise if any part is outside RAM."""

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of one piece, without copying."""

    def populate_range(self, gpa: int, length: int) -> None:
        """Fault a piece in before data lands there (may do nothing)."""


@dataclass
class IncomingRequest:
    """A request as :meth:`Channel.read_request` delivers it: header and decoded payload.

    The data bytes of a Memory request are *not* read yet (they go straight into
    guest memory with :meth:`Channel.receive_memory`).  A MemoryFd's ``fd`` is
    owned by whoever takes the request: close it or hand it on.
    """

    request: p.Request
    #: Config or State: the JSON bytes.
    payload: bytes = b""
    #: Memory: the range table (already checked for wrap-around; not yet against guest RAM).
    table: p.MemoryRangeTable | None = None
    #: MemoryFd: the slot and the file descriptor that came with it.
    slot: int | None = None
    fd: int | None = None
    #: PageFault: the range asked for.
    page: p.MemoryRange | None = None

    @property
    def command(self) -> p.Command:
        return self.request.command


def _request_summary(request: p.Request, payload: bytes = b"", table: p.MemoryRangeTable | None = None,
                     slot: int | None = None, fd: int | None = None, page: p.MemoryRange | None = None,
                     total: int | None = None) -> str:
    """A few words on the payload; ``total`` is the table's byte count when the caller has it (a sum over a
    million ranges is worth doing once)."""
    command = request.command
    if command is p.Command.START:
        token = ", migration token" if request.length else ""
        return f"protocol version {request.sender_version}{token}"
    if command in (p.Command.MEMORY, p.Command.DISCARD) and table is not None:
        if not table:
            return "empty table"
        first = table.ranges[0]
        more = f" … {len(table) - 1} more" if len(table) > 1 else ""
        total = table.total_bytes if total is None else total
        what = "follow" if command is p.Command.MEMORY else "to drop"
        return f"{len(table)} ranges, {total} bytes {what}: {first.gpa:#x}+{first.length:#x}{more}"
    if command is p.Command.MEMORY_FD:
        return f"slot {slot}, fd {fd}"
    if command is p.Command.PAGE_FAULT and page is not None:
        return f"page {page.gpa:#x}+{page.length:#x}"
    if command in (p.Command.CONFIG, p.Command.STATE):
        head = payload[:32].decode("utf-8", errors="replace")
        return f"{len(payload)} bytes of JSON: {head}{'…' if len(payload) > 32 else ''}"
    return ""


def _data_bytes(incoming: IncomingRequest) -> int:
    """The guest memory a received request moves (Memory) or asks for (PageFault)."""
    if incoming.table is not None:
        return incoming.table.total_bytes
    if incoming.page is not None:
        return incoming.page.length
    return 0


def _status_name(status: p.Status) -> str:
    return status.name.capitalize()


class Channel:
    """One connection of a migration, spoken in protocol messages, reported to the observers."""

    def __init__(self, conn: Connection, *, side: p.Side | str, name: str = p.MAIN_CONNECTION,
                 observers: Observers | None = None, limits: p.Limits = p.DEFAULT_LIMITS) -> None:
        self.conn = conn
        self.side = side.value if isinstance(side, p.Side) else side
        self.name = name
        self.observers = observers if observers is not None else Observers()
        self.limits = limits
        #: How long the peer may stay silent once a message has begun (None: forever).
        self.stall_timeout: float | None = None

    def __repr__(self) -> str:
        return f"<Channel {self.side} {self.name} {self.conn.peer}>"

    @property
    def peer(self) -> str:
        return self.conn.peer

    def _emit(self, direction: str, kind: str, name: str, length: int, summary: str, header: bytes,
              data: int = 0) -> None:
        self.observers.notify(Message(time.time(), self.side, self.name, direction, kind, name, length, summary,
                                      header, data))

    # -- the requesting side -----------------------------------------------------------------------

    def send_role(self, role: p.ConnectionRole) -> None:
        """Announce what this additional connection is for (its first 2 bytes)."""
        wire = role.encode()
        self._emit(SENT, "role", role.wire_name, 0, "", wire)
        self.conn.write_all(wire)

    def send_recovery(self, hello: p.RecoveryHello) -> None:
        """Version 1: announce a FaultRecovery connection and prove the migration's token, in one write."""
        wire = p.ConnectionRole.FAULT_RECOVERY.encode()
        # The token is the migration's secret: traces and logs get the attempt, never the token.
        self._emit(SENT, "role", p.ConnectionRole.FAULT_RECOVERY.wire_name, p.RECOVERY_HELLO_SIZE,
                   f"attempt {hello.attempt}, token", wire)
        self.conn.write_all(wire + hello.encode())

    def send_request(self, request: p.Request, payload: bytes = b"") -> None:
        """One request and its payload (Config/State JSON; never guest memory) in one write."""
        header = request.encode()
        self._emit(SENT, "request", request.command.wire_name, request.length, _request_summary(request, payload),
                   header)
        self.conn.write_all(header + payload)

    def read_response(self, command: p.Command, requested: int = 0) -> p.Response:
        """The answer to ``command``, checked: only a PageFault's Ok may carry bytes."""
        header = self.conn.read_exact(p.HEADER_SIZE, what=f"response to {command.wire_name}")
        response = p.Response.decode(header)
        self._emit(RECEIVED, "response", _status_name(response.status), response.length, "", header,
                   response.length)
        p.check_response(command, response, requested)
        return response

    def expect_ok(self, command: p.Command) -> p.Response:
        """Read the answer to ``command``; anything but Ok stops the migration."""
        response = self.read_response(command)
        if not response.is_ok:
            raise PeerError(f"the {'destination' if self.side == 'source' else 'peer'} answered "
                            f"{_status_name(response.status)}", where=command.wire_name)
        return response

    def request_ok(self, request: p.Request, payload: bytes = b"") -> None:
        """Send one request and require Ok (Start, Config, State, Complete ...)."""
        self.send_request(request, payload)
        self.expect_ok(request.command)

    def send_memory(self, memory: MemoryTarget, table: p.MemoryRangeTable,
                    progress: Callable[[int], None] | None = None) -> int:
        """Protocol step *Memory* (sender): header, table, then every range's bytes; wait for Ok.

        ``progress`` is told the bytes written so far, at least every :data:`PROGRESS_STEP` (a big range is
        written in steps of that size) and at the end — in batches, because a dirty table may hold a million
        one-page ranges and the send path must not pay a call per page.
        """
        self._send_table(p.Request.memory(table.byte_length), table)
        unreported = 0
        for rng in table:
            for gpa, length in memory.split(rng):
                with memory.view(gpa, length) as view:
                    if progress is None or length <= PROGRESS_STEP:
                        self.conn.write_all(view)
                        continue
                    for start in range(0, length, PROGRESS_STEP):
                        self.conn.write_all(view[start:start + PROGRESS_STEP])
                        progress(min(PROGRESS_STEP, length - start))
                    unreported -= length  # reported piece by piece above
            if progress is not None:
                unreported += rng.length
                if unreported >= PROGRESS_STEP:
                    progress(unreported)
                    unreported = 0
        if progress is not None and unreported:
            progress(unreported)
        self.expect_ok(p.Command.MEMORY)
        return table.total_bytes

    def send_discard(self, table: p.MemoryRangeTable) -> None:
        """Protocol step *Discard* (version 1, sender): the table of stale pages; wait for Ok."""
        self._send_table(p.Request.discard(table.byte_length), table)
        self.expect_ok(p.Command.DISCARD)

    def _send_table(self, request: p.Request, table: p.MemoryRangeTable) -> None:
        """A Memory or Discard header and its range table, in one write (a Memory's data follows separately)."""
        header = request.encode()
        total = table.total_bytes
        self._emit(SENT, "request", request.command.wire_name, request.length,
                   _request_summary(request, table=table, total=total), header, total)
        self.conn.write_all(header + table.encode())

    def send_memory_fd(self, slot: int, fd: int) -> None:
        """Protocol step *MemoryFd* (local migration): the slot number with its memfd as SCM_RIGHTS; wait for Ok."""
        request = p.Request.memory_fd()
        header = request.encode()
        self._emit(SENT, "request", "MemoryFd", request.length, _request_summary(request, slot=slot, fd=fd), header)
        self.conn.write_all(header)
        self.conn.send_fds(p.encode_memory_fd_slot(slot), [fd])
        self.expect_ok(p.Command.MEMORY_FD)

    def request_page(self, page: p.MemoryRange, into: memoryview | None) -> int:
        """Protocol step *PageFault* (destination, on a Fault connection): ask for ``page``.

        The source answers Ok with the page's bytes, which land in ``into``
        (``recv_into``, no copy), or Ok with length 0 when it wrote the page
        into shared memory itself.  Returns the number of bytes that came inline.
        """
        p.check_page_fault_range(page, self.limits)
        request = p.Request.page_fault()
        header = request.encode()
        self._emit(SENT, "request", "PageFault", request.length, _request_summary(request, page=page), header,
                   page.length)
        self.conn.write_all(header + page.encode())
        response = self.read_response(p.Command.PAGE_FAULT, page.length)
        if not response.is_ok:
            raise PeerError("the source answered Error", where=f"PageFault {page.gpa:#x}+{page.length:#x}")
        if response.length:
            if into is None or len(into) != page.length:
                raise ProtocolError("the page came inline, but there is no place for it", where="PageFault")
            self.conn.read_exact_into(into, what=f"page {page.gpa:#x}")
        return response.length

    # -- the answering side ------------------------------------------------------------------------

    def read_role(self, timeout: float, naming: Callable[[p.ConnectionRole], str] | None = None) -> p.ConnectionRole:
        """The 2-byte role of an additional connection, within ``timeout`` seconds.

        ``naming`` gives the connection its name from its role (``memory-3``)
        before the role is reported, so every message on it carries that name.
        """
        self.conn.set_timeout(timeout)
        wire = self.conn.read_exact(p.ROLE_SIZE, what="connection role")
        try:
            role = p.ConnectionRole.decode(wire)
        except ProtocolError:
            self._emit(RECEIVED, "role", f"unknown role {int.from_bytes(wire, 'little')}", 0, "refused", wire)
            raise
        self.conn.set_timeout(self.stall_timeout)
        if naming is not None:
            self.name = naming(role)
        self._emit(RECEIVED, "role", role.wire_name, 0, "", wire)
        return role

    def read_recovery_hello(self, timeout: float) -> p.RecoveryHello:
        """Version 1: the token and attempt a FaultRecovery connection sends after its role, within ``timeout``."""
        self.conn.set_timeout(timeout)
        try:
            hello = p.RecoveryHello.decode(self.conn.read_exact(p.RECOVERY_HELLO_SIZE, what="recovery hello"))
        finally:
            self.conn.set_timeout(self.stall_timeout)
        return hello  # (the role's message stands for both: the token never goes to a trace)

    def read_request(self, admit: Callable[[p.Request], object],
                     idle_timeout: float | None = None) -> IncomingRequest:
        """The next request, admitted by ``admit`` *before* its payload is read, then its payload.

        ``admit`` is the rule for this connection: the receiver state machine's
        ``begin`` on the main connection, :func:`chmig.protocol.check_connection_request`
        on an additional one; it raises ProtocolError to refuse.  Raises
        :class:`~chmig.transport.ConnectionClosed` only when the peer closed the
        connection cleanly between requests (a close inside a request is a
        TransportError), and :class:`~chmig.errors.PeerSilent` when no request
        began within ``idle_timeout`` seconds (None: wait forever).  Inside the
        request the peer may be silent for at most :attr:`stall_timeout`.
        """
        header = self._read_header(idle_timeout)
        try:
            request = p.Request.decode(header)
        except ProtocolError as exc:
            self._emit(RECEIVED, "request", f"unknown command {int.from_bytes(header[:2], 'little')}",
                       int.from_bytes(header[8:], "little"), f"refused: {exc.message}", header)
            raise
        try:
            admit(request)
        except ProtocolError as exc:
            self._emit(RECEIVED, "request", request.command.wire_name, request.length, f"refused: {exc.message}",
                       header)
            raise
        incoming = self._read_payload(request)
        data = _data_bytes(incoming)
        self._emit(RECEIVED, "request", request.command.wire_name, request.length,
                   _request_summary(request, incoming.payload, incoming.table, incoming.slot, incoming.fd,
                                    incoming.page, total=data), header, data)
        return incoming

    def _read_header(self, idle_timeout: float | None) -> bytes:
        """The first byte may take ``idle_timeout``; the rest of the header only ``stall_timeout``."""
        header = bytearray(p.HEADER_SIZE)
        self.conn.set_timeout(idle_timeout)
        try:
            self.conn.read_exact_into(memoryview(header)[:1], what="request header")
        except ConnectionClosed as exc:
            raise ConnectionClosed("the peer closed the connection between requests", where=self.peer) from exc
        except TransportError as exc:
            if isinstance(exc.__cause__, TimeoutError):
                raise PeerSilent(f"no request for {idle_timeout:g} s", where=self.peer) from exc
            raise
        finally:
            self.conn.set_timeout(self.stall_timeout)
        try:
            self.conn.read_exact_into(memoryview(header)[1:], what="request header")
        except ConnectionClosed as exc:
            raise TransportError("the connection closed inside a request header", where=self.peer) from exc
        return bytes(header)

    def _read_payload(self, request: p.Request) -> IncomingRequest:
        try:
            return self._read_payload_of(request)
        except ConnectionClosed as exc:  # the header came, its payload did not: data lost, not an ending
            raise TransportError(f"the connection closed before the payload of {request.command.wire_name} "
                                 f"({request.length} bytes)", where=self.peer) from exc

    def _read_payload_of(self, request: p.Request) -> IncomingRequest:
        command, length = request.command, request.length
        if command in (p.Command.MEMORY, p.Command.DISCARD):
            raw = bytearray(length)  # kept as the table's storage: no second copy
            self.conn.read_exact_into(raw, what="memory range table")
            table = p.MemoryRangeTable.decode(raw)
            return IncomingRequest(request, table=table)
        if command is p.Command.MEMORY_FD:
            data, fds = self.conn.recv_fds(p.MEMORY_FD_PAYLOAD_SIZE, maxfds=1)
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                raise ProtocolError("MemoryFd arrived without a file descriptor", where="MemoryFd")
            try:
                slot = p.decode_memory_fd_slot(data)
            except ProtocolError:
                os.close(fds[0])
                raise
            return IncomingRequest(request, slot=slot, fd=fds[0])
        if command is p.Command.PAGE_FAULT:
            page = p.MemoryRange.decode(self.conn.read_exact(length, what="PageFault range"))
            return IncomingRequest(request, page=page)
        return IncomingRequest(request, payload=self._read_growing(length, command.wire_name))

    def _read_growing(self, length: int, what: str) -> bytes:
        """``length`` bytes, allocated as they arrive: a 64 MiB header followed by nothing costs nothing."""
        payload = bytearray()
        while len(payload) < length:
            start = len(payload)
            payload.extend(bytes(min(PAYLOAD_STEP, length - start)))
            with memoryview(payload) as view:  # received in place: no copy per step
                self.conn.read_exact_into(view[start:], what=what)
        return bytes(payload)

    def answer(self, response: p.Response, summary: str = "") -> None:
        header = response.encode()
        self._emit(SENT, "response", _status_name(response.status), response.length, summary, header,
                   response.length)
        self.conn.write_all(header)

    def answer_ok(self) -> None:
        self.answer(p.Response.ok())

    def answer_error(self, reason: str = "") -> None:
        """Answer Error; a peer that already went away is no reason for a second error."""
        try:
            self.answer(p.Response.error(), reason)
        except Exception as exc:  # the first error is the one that matters
            log.debug("%s: could not answer Error: %s", self, exc)

    def receive_memory(self, memory: MemoryTarget, table: p.MemoryRangeTable, populate: bool = True) -> int:
        """Protocol step *Memory* (receiver): check the table against guest RAM, then receive the bytes in place.

        Two passes over the table (check all, then receive) instead of one list
        of pieces: a table of a million ranges must not cost a second copy.
        """
        for rng in table:
            try:
                for _ in memory.split(rng):
                    pass
            except VmError as exc:
                raise ProtocolError(f"range {rng.gpa:#x}+{rng.length:#x} is not inside guest RAM",
                                    where="Memory") from exc
        for gpa, length in (piece for rng in table for piece in memory.split(rng)):
            # Populate only a window ahead of the data actually arriving: a table that covers all of RAM,
            # followed by no data, must not commit all of RAM.
            for offset in range(0, length, POPULATE_AHEAD):
                window = min(POPULATE_AHEAD, length - offset)
                if populate:
                    memory.populate_range(gpa + offset, window)
                with memory.view(gpa + offset, window) as view:
                    self.conn.read_exact_into(view, what=f"memory at {gpa + offset:#x}")
        return table.total_bytes

    def serve_page_faults(self, memory: MemoryTarget,
                          on_served: Callable[[p.MemoryRange], None] | None = None) -> int:
        """The source's end of a Fault connection: answer PageFaults until the destination closes it.

        Each range is checked (non-empty, page aligned, at most 1 GiB, inside
        guest RAM) before anything is read from memory; a bad one is answered
        Error and ends the connection.  Returns the number of pages served
        (``on_served`` hears of each range answered, as it goes).
        """

        def answer_inline(page: p.MemoryRange) -> None:
            try:
                pieces = list(memory.split(page))
            except VmError as exc:
                self.answer_error(str(exc))
                raise ProtocolError(f"page {page.gpa:#x}+{page.length:#x} refused: {exc}",
                                    where="PageFault") from None
            self.answer(p.Response.ok(page.length), f"{page.length} bytes follow")
            for gpa, length in pieces:
                with memory.view(gpa, length) as view:
                    self.conn.write_all(view)
            if on_served is not None:
                on_served(page)

        return self._serve_page_faults(answer_inline)

    def serve_page_faults_in_place(self, place: Callable[[p.MemoryRange], None]) -> int:
        """The source's end of a Fault connection on *shared* memory: ``place`` writes each page into the
        memfd the destination maps, then Ok with length 0 tells it to map the page (``UFFDIO_CONTINUE``).

        ``place`` raises ProtocolError for a range it refuses and any other
        ChmigError when it cannot serve (a corrupt snapshot): either is
        answered Error and ends the connection.  Returns the pages served.
        """

        def answer_in_place(page: p.MemoryRange) -> None:
            try:
                place(page)
            except ChmigError as exc:
                self.answer_error(exc.message)
                if isinstance(exc, ProtocolError):
                    raise ProtocolError(f"page {page.gpa:#x}+{page.length:#x} refused: {exc.message}",
                                        where="PageFault") from None
                raise
            self.answer(p.Response.ok(), "written into shared memory")

        return self._serve_page_faults(answer_in_place)

    def _serve_page_faults(self, answer_page: Callable[[p.MemoryRange], None]) -> int:
        """Read PageFaults (each checked before anything is served) and answer each with ``answer_page``."""
        served = 0
        while True:
            try:
                incoming = self.read_request(lambda r: p.check_connection_request(p.ConnectionRole.FAULT, r,
                                                                                  self.limits))
            except ConnectionClosed:
                return served
            except ProtocolError as exc:
                self.answer_error(exc.message)
                raise
            page = incoming.page
            assert page is not None
            try:
                p.check_page_fault_range(page, self.limits)
            except ProtocolError as exc:
                self.answer_error(exc.message)
                raise ProtocolError(f"page {page.gpa:#x}+{page.length:#x} refused: {exc.message}",
                                    where="PageFault") from None
            answer_page(page)
            served += page.length // p.PAGE_SIZE

    # -- lifecycle ---------------------------------------------------------------------------------

    def set_nodelay(self) -> None:
        self.conn.set_nodelay()

    def set_timeout(self, seconds: float | None) -> None:
        """Bound the silence of every later read and write (the source's answer waits)."""
        self.stall_timeout = seconds
        self.conn.set_timeout(seconds)

    def shutdown(self) -> None:
        """Wake a thread blocked on this channel (from any thread)."""
        self.conn.shutdown()

    def reset(self) -> None:
        """Abort: wake a thread blocked on this channel; closing it then sends a reset, not a clean end."""
        self.conn.reset()

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
