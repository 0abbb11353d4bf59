"""A fault-injecting proxy that speaks the migration protocol (test tooling, kept out of the package).

:class:`FaultProxy` sits between a source and a destination, on loopback TCP or
on UNIX sockets.  It relays every connection of a migration — the main one and
each additional one (``connections=N`` workers) — and parses both directions
into protocol messages with :mod:`chmig.protocol`: request headers and their
payloads, Memory tables followed by the bytes they announce, responses (each
matched to the request it answers), the 2-byte role that opens an additional
connection, and the memfd a MemoryFd carries as SCM_RIGHTS on a UNIX socket
(received with ``socket.recv_fds`` and passed on with ``socket.send_fds``, so
local migration works through it).

At one chosen message (a :class:`Point`: by name, connection, the request a
response answers, the header's length, the n-th match, and an optional condition) it performs one
:class:`Action` instead of forwarding the message:

* ``fin``   — shut both sides of that connection down (each peer sees EOF);
* ``half``  — forward the first half of the message's bytes, then close both sides;
* ``rst``   — SO_LINGER 0 and close: each TCP peer gets a reset (a UNIX peer sees the close);
* ``stall`` — stop forwarding on that connection in both directions, keep its sockets open until
  :meth:`FaultProxy.close` (a partition that heals with the connection gone);
* ``error`` — a request is swallowed (its memfd closed, its data read and dropped) and answered
  with a Response of status Error toward whoever sent it; a response is replaced by Error.

Everything else passes through unchanged, message by message, and the proxy
keeps a transcript (:attr:`FaultProxy.seen`).  It only ever connects to the
target it was given (``tcp:127.0.0.1:PORT`` or a ``unix:`` path) and only
listens on 127.0.0.1 or a UNIX path.  Its threads are named, started by
:meth:`FaultProxy.start` (the acceptor, which starts two relay threads per
connection) and stopped and joined by :meth:`FaultProxy.close`.
"""

from __future__ import annotations

import collections
import enum
import fnmatch
import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from chmig import protocol as p
from chmig.transport import Url, parse_url

log = logging.getLogger(__name__)

#: Guest memory is relayed in pieces of at most this size.
CHUNK = 1 << 20
#: More fds than this on one read would be a sender bug; the kernel would truncate them.
MAX_FDS = 16

SOURCE = "source"
DESTINATION = "destination"
#: Directions of a message, named after where it goes.
TO_DESTINATION = "to-destination"
TO_SOURCE = "to-source"


class Action(enum.Enum):
    """What the proxy does at the chosen message (see the module docstring)."""

    FIN = "fin"
    HALF = "half"
    RST = "rst"
    STALL = "stall"
    ERROR = "error"


@dataclass(frozen=True)
class Seen:
    """One message as the proxy saw it, before it decided what to do with it."""

    #: ``time.monotonic()`` when the message (header and counted payload) was read.
    time: float
    #: ``main``, ``memory-0`` ..., named like the destination names them (by order of their roles).
    connection: str
    direction: str
    #: ``role``, ``request`` or ``response``.
    kind: str
    #: A command (``Memory``), a status (``Ok``) or a role (``PrecopyMemory``).
    name: str
    #: For a response: the command of the request it answers, in order on its connection.
    answers: str | None
    #: The header's length field.
    length: int
    #: Bytes that follow uncounted: a Memory table's data, a PageFault answer's page.
    data: int
    #: File descriptors that came with it (a MemoryFd's memfd).
    fds: int

    def __str__(self) -> str:
        what = f"{self.name} to {self.answers}" if self.answers else self.name
        extra = f", {self.data} bytes of data" if self.data else ""
        extra += f", {self.fds} fd" if self.fds else ""
        return f"{self.connection} {self.direction}: {what} (length {self.length}{extra})"


@dataclass(frozen=True)
class Point:
    """Which message to act on: the ``nth`` message that matches every given field.

    ``connection`` is a name or a glob (``memory-*``); ``answers`` picks a
    response by the request it answers; ``when`` is asked about each message
    that matches the other fields (e.g. "the source VM is paused now"), and
    only messages for which it holds are counted.
    """

    name: str
    connection: str | None = None
    answers: str | None = None
    nth: int = 1
    when: Callable[[], bool] | None = field(default=None, compare=False)
    #: Shown instead of the generated description (e.g. "the final Memory").
    label: str | None = field(default=None, compare=False)
    #: Only a message whose header's length field is this (e.g. a PageFault answer of one page).
    length: int | None = None

    def matches(self, seen: Seen) -> bool:
        """The static part of the match (``when`` and ``nth`` are the proxy's business)."""
        if seen.name != self.name:
            return False
        if self.connection is not None and not fnmatch.fnmatchcase(seen.connection, self.connection):
            return False
        if self.length is not None and seen.length != self.length:
            return False
        return self.answers is None or seen.answers == self.answers

    def __str__(self) -> str:
        if self.label:
            return self.label
        what = f"{self.name} to {self.answers}" if self.answers else self.name
        what += f" of length {self.length}" if self.length is not None else ""
        where = f" on {self.connection}" if self.connection else ""
        return f"{_ordinal(self.nth)} {what}{where}"


@dataclass(frozen=True)
class Fault:
    """One action at one point."""

    point: Point
    action: Action

    def __str__(self) -> str:
        return f"{self.action.value} at {self.point}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class _Eof(Exception):
    """The peer closed (or reset) the connection; ``pieces`` is what came of the message first."""

    def __init__(self, pieces: list[tuple[bytes, list[int]]]) -> None:
        super().__init__("end of stream")
        self.pieces = pieces


@dataclass
class _Message:
    """A message read up to the end of its counted payload; ``data`` more bytes follow on the socket."""

    seen: Seen
    #: The bytes read so far, each piece with the fds that arrived with it.
    head: list[tuple[bytes, list[int]]]
    data: int

    @property
    def head_size(self) -> int:
        return sum(len(piece) for piece, _ in self.head)


class _Link:
    """One relayed connection: the socket to the source, the socket to the destination, two threads."""

    def __init__(self, number: int, client: socket.socket, upstream: socket.socket, unix: bool) -> None:
        self.number = number
        self.name = p.MAIN_CONNECTION if number == 0 else f"conn-{number}"
        self.sockets = {SOURCE: client, DESTINATION: upstream}
        self.unix = unix
        #: Who sends requests on it: the source, except on a (postcopy) Fault connection.
        self.requester = SOURCE
        #: Set once the role of an additional connection is known (or will never be).
        self.role_known = threading.Event()
        if number == 0:
            self.role_known.set()
        #: Requests forwarded and not answered yet, oldest first: responses answer them in order.
        self.pending: collections.deque[str] = collections.deque()
        #: ``open``, ``cut`` (an action closed it: the relays end quietly) or ``stalled``.
        self.state = "open"
        self.lock = threading.Lock()
        #: One writer at a time per socket: a relay forwarding and an injected Error answer.
        self.write_locks = {SOURCE: threading.Lock(), DESTINATION: threading.Lock()}
        self.threads: dict[str, threading.Thread] = {}
        #: Both relay threads are running: neither acts before it can join its partner.
        self.running = threading.Event()
        #: Fds held back by a stall; closed with the link.
        self.held_fds: list[int] = []
        self._ended = 0
        self._closed = False

    def other(self, side: str) -> str:
        return DESTINATION if side == SOURCE else SOURCE

    def shutdown(self, how: int = socket.SHUT_RDWR) -> None:
        for sock in self.sockets.values():
            try:
                sock.shutdown(how)
            except OSError:
                pass  # already shut, or the peer is gone: nothing left to wake

    def relay_ended(self) -> None:
        """A relay thread is done; the second one closes both sockets (so a reset goes out only then)."""
        with self.lock:
            self._ended += 1
            last = self._ended == 2
        if last:
            self.close()

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._closed = True
            fds, self.held_fds = self.held_fds, []
        for sock in self.sockets.values():
            sock.close()
        for fd in fds:
            os.close(fd)


class FaultProxy:
    """Relays one migration between ``target`` and whoever connects to :attr:`url`, with one optional fault.

    ``probe`` is called once when the fault fires (e.g. to read the source VM's
    state at that moment; its result is :attr:`at_fire`).  ``rate`` paces the
    memory data toward the destination to that many bytes per second (a slower
    link, so that a precopy takes several iterations).
    """

    def __init__(self, target: str, listen: str = "tcp:127.0.0.1:0", fault: Fault | None = None,
                 probe: Callable[[], str] | None = None, rate: float | None = None) -> None:
        self.target = _checked_url(target, "target")
        self.listen_url = _checked_url(listen, "listen address")
        self.fault = fault
        self.probe = probe
        self.rate = rate
        #: Set once the fault fired (after the probe ran, just before the action).
        self.fired = threading.Event()
        self.fired_at: float | None = None
        self.fired_message: Seen | None = None
        self.at_fire: str | None = None
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._matches = 0
        self._claimed = False
        self._role_counts: dict[p.ConnectionRole, int] = {}
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        #: Notified whenever an accepted connection has reached the target (or failed to); guards
        #: ``_connecting``, the connections accepted but not yet connected upstream.
        self._accepted = threading.Condition()
        self._connecting = 0
        self._paced_bytes = 0
        self._paced_since = 0.0
        self._listener = self._bind()
        self.url = self._public_url()

    # -- set-up and tear-down -----------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        if self.listen_url.is_unix:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.listen_url.path)
        else:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.listen_url.host, self.listen_url.port))
        listener.listen(64)
        # The acceptor wakes up now and then to see whether close() was called: shutting a listening
        # UNIX socket down does not reliably wake a blocked accept() (nor a select on it).
        listener.settimeout(0.2)
        return listener

    def _public_url(self) -> str:
        if self.listen_url.is_unix:
            return f"unix:{self.listen_url.path}"
        return f"tcp:127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> FaultProxy:
        self._paced_since = time.monotonic()
        self._start_thread("faultproxy-accept", self._accept_loop)
        return self

    def close(self) -> None:
        """End every stall, shut every connection down, join every thread (a stuck one is an error)."""
        self._stop.set()
        with self._accepted:
            self._accepted.notify_all()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.running.set()
            link.role_known.set()
            link.shutdown()
        deadline = time.monotonic() + 15
        stuck = []
        for thread in self._all_threads():
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
        self._listener.close()
        if self.listen_url.is_unix:
            try:
                os.unlink(self.listen_url.path)
            except FileNotFoundError:
                pass
        for link in links:
            link.close()
        if stuck:
            raise RuntimeError(f"fault proxy threads did not stop: {', '.join(stuck)}")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _all_threads(self) -> Iterator[threading.Thread]:
        # Relay threads are added by the acceptor, which comes first: once it is joined the list is complete.
        index = 0
        while True:
            with self._lock:
                if index >= len(self._threads):
                    return
                thread = self._threads[index]
            index += 1
            yield thread

    def _start_thread(self, name: str, target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        with self._lock:  # listed once started, so close() never joins a thread that has not begun
            self._threads.append(thread)
        return thread

    def reset_stalled(self) -> int:
        """End every stalled connection now, with a reset toward both peers; return how many there were.

        The partition heals with the connection gone.  :meth:`close` ends a stall with a FIN and then, when
        the stalled message's bytes are still unread, a reset as the socket closes: which of the two a
        reading peer sees first is a race.  This makes it a reset, always.  The link's relays stay parked
        until :meth:`close`.
        """
        with self._lock:
            links = [link for link in self._links if link.state == "stalled"]
        for link in links:
            for sock in link.sockets.values():
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            # SHUT_RD sends nothing and wakes a relay blocked reading, which then parks (the link is
            # stalled): the close is the sockets' last use, and sends the resets.
            link.shutdown(socket.SHUT_RD)
            link.close()
        return len(links)

    # -- the report ---------------------------------------------------------------------------------

    def transcript(self) -> str:
        with self._lock:
            seen = list(self.seen)
        start = seen[0].time if seen else 0.0
        return "\n".join(f"  {m.time - start:8.3f}s {m}" for m in seen)

    # -- accepting ----------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        number = 0
        while not self._stop.is_set():
            try:
                if not _readable(self._listener, 0.2):
                    continue
                with self._accepted:  # accepted and counted at once: _after_earlier_connects never misses one
                    client, _ = self._listener.accept()
                    self._connecting += 1
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._stop.is_set():
                    log.error("fault proxy: accept failed: %s", exc)
                return
            try:
                client.settimeout(None)
                try:
                    upstream = self._connect()
                except OSError as exc:
                    log.warning("fault proxy: cannot reach %s: %s", self.target, exc)
                    client.close()
                    continue
            finally:
                with self._accepted:
                    self._connecting -= 1
                    self._accepted.notify_all()
            link = _Link(number, client, upstream, self.listen_url.is_unix)
            number += 1
            with self._lock:
                if self._stop.is_set():
                    link.close()
                    return
                self._links.append(link)
            # Both threads exist before either runs: the first one renames both once the role is known.
            for side in (SOURCE, DESTINATION):
                name = f"faultproxy-{link.name}-{'up' if side == SOURCE else 'down'}"
                link.threads[side] = threading.Thread(target=self._relay, args=(link, side), name=name, daemon=True)
            for thread in link.threads.values():
                thread.start()
                with self._lock:
                    self._threads.append(thread)
            link.running.set()

    def _connect(self) -> socket.socket:
        if self.target.is_unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(10)
                sock.connect(self.target.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((self.target.host, self.target.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        return sock

    # -- relaying -----------------------------------------------------------------------------------

    def _relay(self, link: _Link, side: str) -> None:
        """Relay what ``side`` sends, message by message, acting at the chosen one."""
        src, out = link.sockets[side], link.other(side)
        link.running.wait()
        try:
            if not link.unix:
                src.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if link.number and side == SOURCE:
                try:
                    if not self._relay_role(link):
                        return
                finally:
                    link.role_known.set()
            link.role_known.wait()
            carries_requests = side == link.requester
            while not self._stop.is_set():
                message = self._read_message(link, src, side, carries_requests)
                if message is None:  # the peer closed between messages: pass the close on
                    self._hold_if_stalled(link)
                    if link.state == "open":
                        _shutdown(link.sockets[out], socket.SHUT_WR)
                    return
                if self._hold_if_stalled(link, message):
                    return
                action = self._check(message.seen)
                if action is None:
                    self._forward(link, src, out, message)
                elif not self._act(link, side, message, action):
                    return
        except _Eof as eof:  # closed or reset inside a message: pass on what came, then the close
            if link.state == "open" and not self._stop.is_set():
                try:
                    with link.write_locks[out]:
                        self._send_pieces(link, out, eof.pieces)
                except OSError:
                    pass
                self._end_both(link)
            _drop_fds(eof.pieces)
            self._hold_if_stalled(link)
        except OSError as exc:
            if link.state == "open" and not self._stop.is_set():
                log.info("fault proxy: %s %s: %s", link.name, side, exc)
                self._end_both(link)
            self._hold_if_stalled(link)
        except p.ProtocolError as exc:  # the proxy cannot follow this stream: end the connection
            log.error("fault proxy: %s from the %s: %s", link.name, side, exc)
            self._end_both(link)
        finally:
            link.relay_ended()

    def _end_both(self, link: _Link) -> None:
        with link.lock:
            if link.state == "open":
                link.state = "cut"
        link.shutdown()

    def _hold_if_stalled(self, link: _Link, message: _Message | None = None) -> bool:
        """A stalled connection forwards nothing more: hold ``message`` (and its fds) until close()."""
        if link.state != "stalled":
            return False
        if message is not None:
            with link.lock:
                for _, fds in message.head:
                    link.held_fds.extend(fds)
                    fds.clear()
        self._stop.wait()
        return True

    def _relay_role(self, link: _Link) -> bool:
        """An additional connection's first 2 bytes: name the connection after its role, then forward them."""
        src = link.sockets[SOURCE]
        try:
            pieces = self._read_exact(link, src, p.ROLE_SIZE)
        except _Eof as eof:
            if eof.pieces:
                raise
            _shutdown(link.sockets[DESTINATION], socket.SHUT_WR)
            return False
        role = p.ConnectionRole.decode(_joined(pieces))
        rule = p.connection_rule(role)
        if rule.hello_size:  # FaultRecovery (version 1): the token and attempt follow the role, one message
            pieces += self._read_exact(link, src, rule.hello_size)
        with self._lock:
            index = self._role_counts.get(role, 0)
            self._role_counts[role] = index + 1
        link.name = f"{rule.name}-{index}"
        link.requester = SOURCE if rule.requester is p.Side.SOURCE else DESTINATION
        for side, thread in link.threads.items():
            thread.name = f"faultproxy-{link.name}-{'up' if side == SOURCE else 'down'}"
        message = _Message(self._record(link, TO_DESTINATION, "role", role.wire_name, None, 0, 0, 0), pieces, 0)
        action = self._check(message.seen)
        if action is None:
            self._forward(link, src, DESTINATION, message)
            return True
        return self._act(link, SOURCE, message, action)

    def _read_message(self, link: _Link, src: socket.socket, side: str, requests: bool) -> _Message | None:
        """The next message's header and counted payload; None if the peer closed before its first byte."""
        try:
            head = self._read_exact(link, src, p.HEADER_SIZE)
        except _Eof as eof:
            if eof.pieces:
                raise
            return None
        direction = TO_DESTINATION if side == SOURCE else TO_SOURCE
        header = _joined(head)
        data = 0
        answers = None
        try:
            if requests:
                request = p.Request.decode(header)
                name, length = request.command.wire_name, request.length
                head += self._read_exact(link, src, length) if length else []
                if request.command is p.Command.MEMORY:
                    data = p.MemoryRangeTable.decode(_joined(head)[p.HEADER_SIZE:]).total_bytes
            else:
                response = p.Response.decode(header)
                name, length = response.status.name.capitalize(), response.length
                data = length  # only a PageFault's answer carries bytes: the page, streamed like memory
                with link.lock:
                    answers = link.pending.popleft() if link.pending else None
        except _Eof as eof:
            raise _Eof(head + eof.pieces) from None
        fds = sum(len(f) for _, f in head)
        return _Message(self._record(link, direction, "request" if requests else "response", name, answers,
                                     length, data, fds), head, data)

    def _record(self, link: _Link, direction: str, kind: str, name: str, answers: str | None, length: int,
                data: int, fds: int) -> Seen:
        seen = Seen(time.monotonic(), link.name, direction, kind, name, answers, length, data, fds)
        with self._lock:
            self.seen.append(seen)
        return seen

    def _check(self, seen: Seen) -> Action | None:
        """Is ``seen`` the chosen message?  Then probe, mark the fault fired, and return its action."""
        fault = self.fault
        if fault is None or self._claimed or not fault.point.matches(seen):
            return None
        if fault.point.when is not None and not fault.point.when():
            return None
        with self._lock:
            if self._claimed:
                return None
            self._matches += 1
            if self._matches < fault.point.nth:
                return None
            self._claimed = True
            self.fired_message = seen
        if self.probe is not None:
            try:
                self.at_fire = self.probe()
            except Exception as exc:  # the probe is a report, not a reason to stop relaying
                self.at_fire = f"probe failed: {exc}"
        self.fired_at = time.monotonic()
        self.fired.set()
        log.info("fault proxy: %s at %s", fault.action.value, seen)
        return fault.action

    # -- forwarding ----------------------------------------------------------------------------------

    def _forward(self, link: _Link, src: socket.socket, out: str, message: _Message) -> None:
        """Pass ``message`` on whole: its head, then its data straight from the socket."""
        if out == DESTINATION:
            self._after_earlier_connects()
        with link.write_locks[out]:
            if message.seen.kind == "request":
                with link.lock:
                    link.pending.append(message.seen.name)
            self._send_pieces(link, out, message.head)
            self._pump(link, src, out, message.data, pace=message.seen.kind == "request")

    def _after_earlier_connects(self) -> None:
        """Wait until every connection the source opened before now has reached the target.

        Over a network a connection the source opened (its connect returned) reaches the destination before
        data the source sends afterwards on another one.  Through the proxy, which accepts and connects
        upstream on its own thread, it may not: State could overtake a Fault connection opened before it.
        """
        deadline = time.monotonic() + 5
        with self._accepted:
            while not self._stop.is_set() and time.monotonic() < deadline:
                if not self._connecting and not _readable(self._listener, 0):
                    return
                # The acceptor takes it within 0.2 s (its select) and notifies once it is connected upstream.
                self._accepted.wait(max(0.0, deadline - time.monotonic()))

    def _send_pieces(self, link: _Link, out: str, pieces: list[tuple[bytes, list[int]]]) -> None:
        """Send bytes as they came, each fd attached to the same bytes it arrived with; our copies are closed."""
        sock = link.sockets[out]
        try:
            for data, fds in pieces:
                if fds:
                    sent = socket.send_fds(sock, [data], fds)
                    sock.sendall(data[sent:])
                elif data:
                    sock.sendall(data)
        finally:
            _drop_fds(pieces)

    def _pump(self, link: _Link, src: socket.socket, out: str | None, count: int, pace: bool = False) -> None:
        """Move ``count`` bytes from ``src`` to ``out`` (or drop them if ``out`` is None)."""
        while count:
            data, fds = self._recv(link, src, min(count, CHUNK))
            if not data:
                _close_fds(fds)
                raise _Eof([])
            count -= len(data)
            if out is None:
                _close_fds(fds)
                continue
            self._send_pieces(link, out, [(data, fds)])
            if pace and self.rate:
                self._pace(len(data))

    def _pace(self, moved: int) -> None:
        with self._lock:
            self._paced_bytes += moved
            ahead = self._paced_bytes / self.rate - (time.monotonic() - self._paced_since)
        if ahead > 0:
            time.sleep(ahead)  # pacing the link is the point here

    def _read_exact(self, link: _Link, src: socket.socket, count: int) -> list[tuple[bytes, list[int]]]:
        """Exactly ``count`` bytes, never more: the next bytes may carry another message's fds."""
        pieces: list[tuple[bytes, list[int]]] = []
        got = 0
        while got < count:
            try:
                data, fds = self._recv(link, src, count - got)
            except OSError:
                raise _Eof(pieces) from None
            if not data:
                _close_fds(fds)
                raise _Eof(pieces)
            pieces.append((data, fds))
            got += len(data)
        return pieces

    def _recv(self, link: _Link, src: socket.socket, count: int) -> tuple[bytes, list[int]]:
        if link.unix:  # fds may come with any byte on a UNIX socket: always ask for them
            data, fds, flags, _ = socket.recv_fds(src, count, MAX_FDS)
            if flags & socket.MSG_CTRUNC:
                _close_fds(fds)
                raise OSError(f"more than {MAX_FDS} fds in one message")
            return data, fds
        return src.recv(count), []

    # -- the faults ----------------------------------------------------------------------------------

    def _act(self, link: _Link, side: str, message: _Message, action: Action) -> bool:
        """Do ``action`` to ``message``, read from ``side``; True if the relay goes on afterwards."""
        src, out = link.sockets[side], link.other(side)
        if action is Action.FIN:
            _drop_fds(message.head)
            self._cut(link, reset=False)
            return False
        if action is Action.RST:
            _drop_fds(message.head)
            self._cut(link, reset=True)
            return False
        if action is Action.HALF:
            half = (message.head_size + message.data) // 2
            with link.write_locks[out]:
                try:
                    self._send_pieces(link, out, _prefix(message.head, half))
                    self._pump(link, src, out, max(0, half - message.head_size))
                finally:
                    _drop_fds(message.head)  # what the half did not carry
            self._cut(link, reset=False)
            return False
        if action is Action.STALL:
            with link.lock:
                link.state = "stalled"
            self._hold_if_stalled(link, message)
            return False
        assert action is Action.ERROR
        _drop_fds(message.head)
        if message.seen.kind == "request":
            # Swallowed: the data is read and dropped, and the requester hears Error instead of the peer.
            self._pump(link, src, None, message.data)
            with link.write_locks[side]:
                link.sockets[side].sendall(p.Response.error().encode())
        else:
            self._pump(link, src, None, message.data)
            with link.write_locks[out]:
                link.sockets[out].sendall(p.Response.error().encode())
        return True

    def _cut(self, link: _Link, reset: bool) -> None:
        """End both sides of ``link``: with FIN now, or (``reset``) with RST when the last relay closes it."""
        with link.lock:
            link.state = "cut"
        if not reset:
            link.shutdown(socket.SHUT_RDWR)
            return
        for sock in link.sockets.values():
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        # SHUT_RD wakes the other relay (its read returns EOF) without sending anything; the close of
        # the last relay then sends the reset.  A relay blocked writing is not woken by it: then FIN.
        link.shutdown(socket.SHUT_RD)
        partner = link.threads.get(link.other(_side_of(link)))
        if partner is not None and partner is not threading.current_thread():
            partner.join(2)
            if partner.is_alive():
                link.shutdown(socket.SHUT_RDWR)


def _readable(sock: socket.socket, timeout: float) -> bool:
    """Is ``sock`` readable (a listener: a connection waits) within ``timeout`` seconds?"""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _side_of(link: _Link) -> str:
    """Which side's relay the calling thread is."""
    current = threading.current_thread()
    for side, thread in link.threads.items():
        if thread is current:
            return side
    return SOURCE


def _prefix(pieces: list[tuple[bytes, list[int]]], size: int) -> list[tuple[bytes, list[int]]]:
    """The first ``size`` bytes of ``pieces``; an fd goes along only with the piece it came with.

    The fd lists are shared with ``pieces``, so sending the prefix (which closes and clears them)
    leaves exactly the fds it did not carry in ``pieces``.
    """
    out: list[tuple[bytes, list[int]]] = []
    for data, fds in pieces:
        if size <= 0:
            break
        out.append((data[:size], fds))
        size -= len(data)
    return out


def _joined(pieces: list[tuple[bytes, list[int]]]) -> bytes:
    return b"".join(data for data, _ in pieces)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _drop_fds(pieces: list[tuple[bytes, list[int]]]) -> None:
    """Close the fds still held by ``pieces`` and forget them (so nothing closes an fd twice)."""
    for _, fds in pieces:
        _close_fds(fds)
        fds.clear()


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


def _checked_url(text: str, what: str) -> Url:
    """Only loopback TCP or UNIX paths: this proxy must never send anything anywhere else."""
    url = parse_url(text)
    if not url.is_unix and url.host != "127.0.0.1":
        raise ValueError(f"the fault proxy's {what} must be tcp:127.0.0.1:PORT or unix:PATH, got {text}")
    return url
