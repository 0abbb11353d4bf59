"""The destination side of a migration: the receiver state machine, on the wire.

Until the sender is found, every connection is a candidate made ready on a
thread of its own (:class:`SenderCandidates`: TLS handshake, first bytes);
the first ready one is read as the main connection.  The main connection is
read one request at a time through a
:class:`~chmig.channel.Channel`.  For each header the
:class:`~chmig.protocol.ReceiverMachine` decides — before any payload is read
or anything allocated — whether the command is allowed now; the message layer
then reads the payload; the step function for the command hands the parsed
payload to the socket-free :class:`~chmig.destination.Destination`; then Ok is
answered.  Any error answers Error and aborts: the half-built VM is discarded.

After Config, an :class:`Acceptor` takes additional connections on the same
listener, reads each one's role (10 s) and hands it to the handler for that
role: ``PrecopyMemory`` connections become memory workers (Memory only, each
answered Ok); a ``Fault`` connection is put on :attr:`Receiver.fault_connections`
for the migration to take, as Cloud Hypervisor's ``fault_tx`` does.

This module builds no VMM and serves no API: :mod:`chmig.vmm` drives it.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from . import protocol as p
from . import apiconfig
from .channel import Channel, IncomingRequest, Observers
from .destination import Destination
from .errors import (
    ChmigError,
    InternalError,
    ListenerAborted,
    MigrationError,
    PostcopyError,
    ProtocolError,
    StuckThreadError,
    TransportError,
    VmError,
)
from .events import EventHook, no_events
from .memory import GuestMemory
from .postcopy import PostcopyPager, PostcopyStats, Prefetch
from .stats import MigrationStats
from .threads import ThreadGroup
from .transport import Connection, ConnectionClosed, Listener
from .vm import Vm

log = logging.getLogger(__name__)

# ``ReceiveOptions`` (Cloud Hypervisor's ``VmReceiveMigrationData``) lives with the other request structs in
# apiconfig.py, so that a client can build and check a request without the VM stack; re-exported here.
ReceiveOptions = apiconfig.ReceiveOptions


# ---------------------------------------------------------------------------------------------
# Additional connections: one acceptor, one handler per role
# ---------------------------------------------------------------------------------------------

#: A role's handler owns the channel it is given; it returns True when it handed the channel on to
#: another owner (which then stops and closes it), so the acceptor's thread group forgets it.
RoleHandler = Callable[[Channel], bool | None]


def accepting(listener: Listener, what: str) -> Iterator[Connection]:
    """Every connection ``listener`` accepts, until its owner aborts it; a failed accept (a peer gone before
    it was accepted) is one log line, and the next is awaited.

    A TLS connection comes before its handshake: the thread that takes it runs it (:func:`handshake`), so a
    peer that stalls there holds up nobody else."""
    while True:
        try:
            yield listener.accept(handshake=False)
        except ListenerAborted:
            return
        except TransportError as exc:
            log.warning("%s refused: %s", what, exc)


def handshake(conn: Connection, what: str) -> bool:
    """The TLS handshake :func:`accepting` left to the connection's thread; False (one log line, the connection
    closed) when it failed."""
    try:
        conn.complete_handshake()
        return True
    except ListenerAborted as exc:  # the listener's owner stopped it: not the peer's doing
        log.debug("%s from %s dropped: %s", what, conn.peer, exc)
    except TransportError as exc:
        log.warning("%s refused: %s", what, exc)
    except Exception as exc:  # noqa: BLE001 — a bug, but one connection's: it is refused, the migration goes on
        log.error("%s from %s refused: its TLS handshake failed unexpectedly: %r", what, conn.peer, exc)
    conn.close()
    return False


class Heard:
    """Connections not yet past their first words (handshake, role, hello), numbered in arrival order.

    At most ``cap`` at once: one more evicts the oldest, so strangers can neither
    make their owner hear them without end nor keep the real peer out by staying
    silent.  Not thread-safe: its owner holds its own lock around every call.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._connections: dict[int, Connection] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._connections)

    def add(self, conn: Connection) -> tuple[int, Connection | None]:
        """Hear ``conn``: its number, and the oldest one it evicted (the caller shuts that down), if any."""
        number, self._next = self._next, self._next + 1
        evicted = self._connections.pop(next(iter(self._connections))) if len(self) >= self.cap else None
        self._connections[number] = conn
        return number, evicted

    def forget(self, number: int) -> bool:
        """Connection ``number`` got past its first words (or failed to): False if it had been evicted."""
        return self._connections.pop(number, None) is not None


def _first_bytes_within(conn: Connection, timeout: float) -> bool:
    """Did ``conn`` send something (or its end) within ``timeout`` seconds?"""
    if conn.is_tls and conn.socket.pending():  # bytes that came with the handshake are already decrypted
        return True
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLRDHUP)
    return bool(poller.poll(timeout * 1000))


class SenderCandidates:
    """Whoever connects before the sender was found, each made ready on a thread of its own.

    A candidate's thread runs its TLS handshake and waits (at most
    ``first_request_timeout_s``) for its first bytes; then it is offered by
    :meth:`next_ready`, in the order candidates became ready, to be read as the
    main connection.  One that says nothing or fails its handshake is closed
    with one log line.  No candidate holds up another: a port scanner that
    stays silent, or a stranger stalling its handshake, costs the real sender
    nothing (Cloud Hypervisor takes its first connection as the sender).  At
    most ``max_connections`` are heard at once; one more evicts the oldest.
    """

    def __init__(self, listener: Listener, limits: p.Limits = p.DEFAULT_LIMITS) -> None:
        self.listener = listener
        self.limits = limits
        self.threads = ThreadGroup("migrate-receive-candidates")
        self._lock = threading.Lock()
        #: Candidates still getting ready.
        self._waiting = Heard(limits.max_connections)
        self._ready: collections.deque[Connection] = collections.deque()
        self._ready_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def next_ready(self, deadline: float | None) -> Connection:
        """Accept until a candidate is ready (its first bytes or its end are there) and return it (the caller
        owns it).  Raises TransportError at the deadline for a ready sender (or on a failed accept),
        ListenerAborted after an abort."""
        while True:
            with self._lock:
                if self._ready:
                    return self._ready.popleft()
                waiting = len(self._waiting)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TransportError("no sender in time" + (f" ({waiting} connection(s) accepted had not said "
                                                             "anything yet)" if waiting else ""),
                                     where=str(self.listener.address))
            try:
                conn = self.listener.accept_or_wake(self._ready_fd, timeout=remaining, handshake=False)
            except ListenerAborted:
                raise
            except TransportError:
                if deadline is not None and time.monotonic() >= deadline:
                    continue  # said above, with the candidates still quiet
                raise
            if conn is None:
                os.eventfd_read(self._ready_fd)
            else:
                self._admit(conn)

    def _admit(self, conn: Connection) -> None:
        with self._lock:
            number, evicted = self._waiting.add(conn)
        try:
            self.threads.start(f"migrate-receive-candidate-{number}", self._get_ready, conn, number,
                               stopper=conn.shutdown)
        except RuntimeError:  # closing
            with self._lock:
                self._waiting.forget(number)
            conn.close()
        if evicted is not None:
            log.warning("ignoring a connection from %s: %d newer ones came before it said anything", evicted.peer,
                        self.limits.max_connections)
            try:
                evicted.shutdown()  # its thread wakes and closes it
            except ChmigError as exc:
                log.warning("shutting %s down: %s", evicted.peer, exc)

    def _get_ready(self, conn: Connection, number: int) -> None:
        """A candidate's thread: the handshake, then its first bytes; offered if both came in time."""
        offered = False
        try:
            shaken = handshake(conn, "connection")  # a failure is logged, and the connection closed
            spoke = shaken and _first_bytes_within(conn, self.limits.first_request_timeout_s)
            with self._lock:
                mine = self._waiting.forget(number)  # not evicted
                offered = spoke and mine and not self.threads.stopping.is_set()
                if offered:
                    self._ready.append(conn)
                    self.threads.release(conn.shutdown)  # the one who takes it owns it
                    os.eventfd_write(self._ready_fd, 1)  # under the lock: close() closes the fd under it
            if shaken and not spoke and mine and not self.threads.stopping.is_set():
                log.warning("ignoring a connection from %s that sent no request within %g s "
                            "(first_request_timeout_s)", conn.peer, self.limits.first_request_timeout_s)
        finally:
            if not offered:
                with self._lock:
                    self._waiting.forget(number)
                self.threads.release(conn.shutdown)
                conn.close()

    def close(self) -> None:
        """Stop and join every candidate's thread; close the candidates nobody took."""
        self.threads.stop()
        try:
            self.threads.join(timeout=10)
        except StuckThreadError as exc:  # reported; the sender's connection, if found, is not theirs
            log.error("%s", exc)
        finally:
            with self._lock:
                left, self._ready = list(self._ready), collections.deque()
                os.close(self._ready_fd)
            for conn in left:
                conn.close()


class Acceptor:
    """Accepts additional connections and dispatches each by its role (``ReceiveAdditionalConnections``).

    Each accepted connection gets its own thread, which reads the 2-byte role
    within ``limits.role_timeout_s`` and calls the handler for that role with a
    :class:`~chmig.channel.Channel` named after it (``memory-0``, ``fault-0``).
    The handler owns the channel from then on.  A connection with a bad or
    late role is dropped with one log line and does not affect the migration.
    """

    def __init__(self, listener: Listener, handlers: dict[p.ConnectionRole, RoleHandler], threads: ThreadGroup,
                 observers: Observers, limits: p.Limits = p.DEFAULT_LIMITS) -> None:
        self.listener = listener
        self.handlers = handlers
        self.threads = threads
        self.observers = observers
        self.limits = limits
        self._lock = threading.Lock()
        self._accepted = 0
        self._open = 0
        self._per_role: dict[p.ConnectionRole, int] = {}
        #: Notified after every accept and every role read or refused (see :meth:`settle`).
        self._progress = threading.Condition(self._lock)
        #: Accepted connections that have not announced their role yet.
        self._unannounced = 0

    def start(self) -> None:
        self.threads.start("migrate-receive-accept", self._accept_loop, stopper=self.listener.abort)

    def _accept_loop(self) -> None:
        for conn in accepting(self.listener, "additional connection"):
            with self._lock:
                # Connections that ended (probes, finished workers) give their place back.
                if self._open >= self.limits.max_connections:
                    log.warning("dropping %s: more than %d additional connections open", conn.peer,
                                self.limits.max_connections)
                    conn.close()
                    continue
                number = self._accepted
                self._accepted += 1
                self._open += 1
                self._unannounced += 1
                self._progress.notify_all()
            try:
                self.threads.start(f"migrate-receive-conn-{number}", self._dispatch, conn, stopper=conn.shutdown)
            except RuntimeError:  # the group is stopping: this connection came too late
                self._announced()
                conn.close()
                return

    def settle(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until every connection the peer opened has been accepted and has said
        its role (or was dropped for not saying it).

        A postcopy source opens all its Fault connections before it sends
        State, so when State arrives they are in the listener's queue at the
        latest; the destination takes them all (the first is kept for urgent
        faults).  Accepts and roles notify, so this sleeps only while
        something is on its way (a connection still inside its TLS handshake
        counts as on its way).
        """
        deadline = time.monotonic() + timeout
        with self._progress:
            while self.listener.pending() or self._unannounced:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._progress.wait(remaining)  # every accept and every role read notifies

    def _announced(self) -> None:
        """One accepted connection has said its role, or was dropped."""
        with self._progress:
            self._unannounced -= 1
            self._progress.notify_all()

    def _dispatch(self, conn: Connection) -> None:
        """Read the role, then hand the connection to its handler (which owns it from then on)."""
        try:
            self._serve(conn)
        finally:
            self.threads.release(conn.shutdown)
            with self._lock:
                self._open -= 1

    def _serve(self, conn: Connection) -> None:
        if not handshake(conn, "additional connection"):
            self._announced()
            return
        channel = Channel(conn, side=p.Side.DESTINATION, name="unannounced", observers=self.observers,
                          limits=self.limits)
        channel.stall_timeout = self.limits.stall_timeout_s
        try:
            role = channel.read_role(self.limits.role_timeout_s, naming=self._name)
            handler = self.handlers.get(role)
            if handler is None:
                raise ProtocolError(f"connection role {role.wire_name} is not expected here", where="connection role")
        except ChmigError as exc:
            log.warning("dropping additional connection %s: %s", conn.peer, exc.message)
            conn.close()
            self._announced()
            return
        except BaseException:
            self._announced()
            raise
        try:
            conn.set_nodelay()
        except ChmigError as exc:
            log.warning("dropping additional connection %s: %s", conn.peer, exc.message)
            conn.close()
            self._announced()
            return
        if role is p.ConnectionRole.FAULT:
            handler(channel)  # queued before it counts as announced: settle() then finds it there
            self._announced()
            return
        self._announced()
        handler(channel)

    def _name(self, role: p.ConnectionRole) -> str:
        """``memory-0``, ``memory-1``, ``fault-0`` ...: numbered per role, in the order roles arrive."""
        rule = p.connection_rule(role)
        with self._lock:
            index = self._per_role.get(role, 0)
            self._per_role[role] = index + 1
        return f"{rule.name}-{index}"


class RecoveryAcceptor:
    """The listener a recoverable postcopy keeps after State (protocol version 1), owned by the pager.

    A connection that announces FaultRecovery and proves the migration's token
    (:func:`chmig.protocol.check_recovery`) within ``role_timeout_s`` (role and
    hello together) goes to ``arrive`` with its attempt; anything else — another
    role, a wrong token, a silent or truncated hello — is closed unanswered with
    one log line and changes nothing.  At most ``max_fault_connections``
    connections are heard at once: one more evicts the oldest still unproven,
    so strangers can neither make it open threads without end nor keep the real
    source out by staying silent — not even inside a TLS handshake, which each
    connection runs on its own thread (bounded by the listener's handshake
    timeout) before its role.
    """

    def __init__(self, listener: Listener, token: bytes, arrive: Callable[[int, Channel], None],
                 observers: Observers, limits: p.Limits = p.DEFAULT_LIMITS) -> None:
        self.listener = listener
        self.token = token
        self.arrive = arrive
        self.observers = observers
        self.limits = limits
        self.threads = ThreadGroup("postcopy-recovery")
        self._lock = threading.Lock()
        #: Connections still saying who they are.
        self._unproven = Heard(limits.max_fault_connections)

    def start(self) -> None:
        self.threads.start("postcopy-recovery-accept", self._accept_loop, stopper=self.listener.abort)

    def _accept_loop(self) -> None:
        for conn in accepting(self.listener, "recovery connection"):
            with self._lock:
                number, evicted = self._unproven.add(conn)
                if evicted is not None:
                    evicted.shutdown()  # its thread reads the end and refuses it
            if evicted is not None:
                log.warning("evicted %s: %d connections were already saying who they are", evicted.peer,
                            self.limits.max_fault_connections)
            try:
                self.threads.start(f"postcopy-recovery-conn-{number}", self._prove, conn, number,
                                   stopper=conn.shutdown)
            except RuntimeError:  # closing
                conn.close()
                return

    def _prove(self, conn: Connection, number: int) -> None:
        """Role FaultRecovery, then the right token: the connection goes to the pager; else it is closed."""
        if not handshake(conn, "recovery connection"):
            self._forget(number, conn)
            return
        channel = Channel(conn, side=p.Side.DESTINATION, name="unannounced", observers=self.observers,
                          limits=self.limits)
        deadline = time.monotonic() + self.limits.role_timeout_s
        try:
            role = channel.read_role(self.limits.role_timeout_s, naming=lambda role: f"recovery-{number}")
            if role is not p.ConnectionRole.FAULT_RECOVERY:
                raise ProtocolError(f"connection role {role.wire_name} is not expected after State (only "
                                    f"{p.ConnectionRole.FAULT_RECOVERY.wire_name})", where="connection role")
            hello = channel.read_recovery_hello(max(0.001, deadline - time.monotonic()))
            p.check_recovery(hello, self.token)
            conn.set_nodelay()
        except ChmigError as exc:
            log.warning("refusing a recovery connection from %s: %s", conn.peer, exc.message)
            self._forget(number, conn)
            conn.close()
            return
        except BaseException:
            self._forget(number, conn)
            raise
        if not self._forget(number, conn):  # evicted just as it proved the token: it was shut down already
            log.warning("refusing a recovery connection from %s: evicted while it said who it is", conn.peer)
            conn.close()
            return
        log.info("postcopy: %s from %s proved the migration's token (attempt %d)", channel.name, conn.peer,
                 hello.attempt)
        self.arrive(hello.attempt, channel)

    def _forget(self, number: int, conn: Connection) -> bool:
        """``conn`` said who it is (or failed to): False if the accept loop had evicted it meanwhile."""
        self.threads.release(conn.shutdown)
        with self._lock:
            return self._unproven.forget(number)

    def close(self) -> None:
        """Stop listening (a source that reconnects now is refused) and join the threads."""
        self.threads.stop()
        try:
            self.threads.join(timeout=10)
        finally:
            self.listener.close()



class MemoryWorkers:
    """The handler of ``PrecopyMemory`` connections: Memory requests straight into guest RAM."""

    def __init__(self, memory: GuestMemory, stats: MigrationStats, populate: bool,
                 limits: p.Limits = p.DEFAULT_LIMITS) -> None:
        self.memory = memory
        self.stats = stats
        self.populate = populate
        self.limits = limits
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, channel: Channel) -> None:
        """Serve one worker connection until the sender closes it (EOF between requests)."""
        role = p.ConnectionRole.PRECOPY_MEMORY
        carried = False
        try:
            while True:
                try:
                    incoming = channel.read_request(lambda r: p.check_connection_request(role, r, self.limits))
                except ConnectionClosed:
                    return
                assert incoming.table is not None
                received = channel.receive_memory(self.memory, incoming.table, self.populate)
                with self._lock:
                    self.stats.total_bytes += received
                    if not carried:  # the statistics count the connections that really carried memory
                        carried = True
                        self.stats.connections += 1
                channel.answer_ok()
        except ChmigError as exc:
            log.error("dropping additional connection %s (%s): %s", channel.name, channel.peer, exc)
            # Any failure after the role counts, even on a first request: a lost chunk must fail State.
            # (Probes that fail before announcing a role never get here.)
            self._failed(str(exc))
            channel.answer_error(exc.message)
        except Exception as exc:
            log.exception("bug in chmig on %s; answering Error", channel.name)
            self._failed(f"internal error on {channel.name}: {exc!r}")
            channel.answer_error("internal error")
        finally:
            channel.close()

    def _failed(self, error: str) -> None:
        with self._lock:
            self.errors.append(error)


# ---------------------------------------------------------------------------------------------
# The main connection
# ---------------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """One incoming migration over ``listener``; :meth:`run` returns the VM or raises."""

    listener: Listener
    serial_spec: str = "off"
    limits: p.Limits = p.DEFAULT_LIMITS
    populate: bool = True
    #: ``precopy`` or ``postcopy`` (both sides must agree, as in Cloud Hypervisor).
    memory_mode: str = "precopy"
    prefetch: Prefetch = field(default_factory=Prefetch)
    #: Postcopy: how long to wait for a source whose Fault connections all broke (0: fail at once).  Only a
    #: version-1 source can reconnect: its Start carried the token it proves then.
    recovery_s: float = 0.0
    stats: MigrationStats = field(default_factory=lambda: MigrationStats(role="destination"))
    observers: Observers = field(default_factory=Observers)
    #: Cloud Hypervisor's ``vm`` events of the receive (the sender connected, the VM restored and resumed),
    #: for the VMM's event monitor; this module does not know where they go.
    on_event: EventHook = no_events
    destination: Destination = field(init=False)
    machine: p.ReceiverMachine = field(init=False)
    #: Fault connections handed over by the acceptor (postcopy takes them from here).
    fault_connections: queue.Queue[Channel] = field(init=False)

    def __post_init__(self) -> None:
        self.destination = Destination(self.serial_spec, self.limits)
        self.machine = p.ReceiverMachine(self.limits)
        self.fault_connections = queue.Queue()
        self.threads = ThreadGroup("migrate-receive")
        self.workers: MemoryWorkers | None = None
        self.acceptor: Acceptor | None = None
        #: Postcopy: the pager that brings the memory in after Complete (its owner takes it with the VM).
        self.pager: PostcopyPager | None = None
        self.channel: Channel | None = None
        self._cancelled = threading.Event()
        self._cancel_lock = threading.Lock()
        self._completing = False
        #: A hybrid source switched to postcopy (Discard came): its Fault connections follow.
        self._switched = False
        #: The migration token of a version-1 Start (what a recovering source proves).
        self.token: bytes | None = None

    @property
    def vm(self) -> Vm | None:
        return self.destination.vm

    @property
    def memory(self) -> GuestMemory | None:
        return self.destination.memory

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, accept_timeout: float | None = None) -> Vm:
        """Accept the sender's main connection and follow the protocol to Completed; the caller owns the VM."""
        self.stats.url = str(self.listener.address)
        try:
            channel, first = self._accept_sender(accept_timeout)
        except BaseException as exc:
            self.discard()
            self.stats.finish("cancelled" if self._cancelled.is_set() else "failed", str(exc))
            raise
        self.channel = channel
        self.on_event("migration-receive-started", None)
        if self._cancelled.is_set():
            channel.shutdown()
        self.stats._begin = time.monotonic()
        try:
            with channel:
                self._handle(channel, first)
                while not self.machine.finished:
                    self._step(channel)
        except BaseException as exc:
            self.discard()
            if self._cancelled.is_set():
                cancelled = MigrationError("the migration was cancelled on the destination", where="receive")
                self.stats.finish("cancelled", str(cancelled))
                log.error(self.stats.summary())
                raise cancelled from exc
            self.stats.finish("failed", str(exc))
            log.error(self.stats.summary())
            raise
        if self.machine.state is p.ReceiverState.ABORTED:
            self.discard()
            self.stats.finish("abandoned", "the sender abandoned the migration")
            log.warning(self.stats.summary())
            raise MigrationError("the sender abandoned the migration", where="receive")
        self._close_fault_connections()
        self.stats.restore_ms = self.destination.restore_ms
        self.stats.resume_ms = self.destination.resume_ms
        self.stats.finish("completed")
        log.info(self.stats.summary())
        return self.destination.take()

    def _accept_sender(self, accept_timeout: float | None) -> tuple[Channel, IncomingRequest]:
        """Accept connections until one brings a first request; keep listening after empty or failed ones.

        Every connection is a candidate (:class:`SenderCandidates`), made ready
        on its own thread: a port probe (connect and close), a peer that says
        nothing within ``first_request_timeout_s``, a half header or a failed
        TLS handshake is logged in one line and dropped, and none of them holds
        up the real sender.  A first request the protocol refuses (not Start)
        ends the migration, as any protocol error does.
        """
        deadline = None if accept_timeout is None else time.monotonic() + accept_timeout
        candidates = SenderCandidates(self.listener, self.limits)
        try:
            while True:
                try:
                    conn = candidates.next_ready(deadline)
                except ListenerAborted:
                    raise MigrationError("the migration was cancelled before a sender connected",
                                         where="receive") from None
                except TransportError as exc:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise
                    log.warning("ignoring a failed connection attempt: %s", exc)
                    continue
                if self._cancelled.is_set():  # others may still be ready: none is read after a cancel
                    conn.close()
                    raise MigrationError("the migration was cancelled before a sender connected", where="receive")
                channel = Channel(conn, side=p.Side.DESTINATION, observers=self.observers, limits=self.limits)
                try:
                    # Small requests and responses must not wait for Nagle and delayed ACKs (44 ms a time here).
                    conn.set_nodelay()
                    channel.stall_timeout = self.limits.stall_timeout_s
                    first = self._read_request(channel)
                except ProtocolError:
                    channel.close()
                    raise
                except (TransportError, ConnectionClosed) as exc:
                    log.warning("ignoring a connection from %s that sent no request: %s", conn.peer, exc.message)
                    channel.close()
                    continue
                except BaseException:
                    channel.close()
                    raise
                log.info("incoming migration from %s", conn.peer)
                return channel, first
        finally:
            candidates.close()

    def _read_request(self, channel: Channel) -> IncomingRequest:
        """The next request of the main connection, admitted by the state machine (Error answered if not)."""
        try:
            return channel.read_request(self.machine.begin, p.receiver_idle_timeout(self.machine.state, self.limits))
        except ProtocolError as exc:
            self.machine.fail()
            log.error("answering Error: %s", exc)
            channel.answer_error(exc.message)
            raise

    def _step(self, channel: Channel) -> None:
        """One request of the main connection: admit, read, do the step, answer."""
        state = self.machine.state
        try:
            incoming = self._read_request(channel)
        except ConnectionClosed:
            self.machine.fail()
            raise MigrationError(f"the sender closed the connection in state {state.value}", where="receive") from None
        except ChmigError as exc:
            if not self.machine.finished:
                self.machine.fail()
                log.error("answering Error: %s", exc)
                channel.answer_error(exc.message)
            raise
        self._handle(channel, incoming)

    def _handle(self, channel: Channel, incoming: IncomingRequest) -> None:
        """Do the step for an admitted request, then answer Ok (or Error, and abort)."""
        step = incoming.command.wire_name
        try:
            STEPS[incoming.command](self, channel, incoming)
            self.machine.commit()
        except ChmigError as exc:
            self.machine.fail()
            log.error("answering Error: %s", exc)
            channel.answer_error(exc.message)
            raise
        except OSError as exc:  # a resource of this host failed (mapping, KVM): ours, not the peer's
            self.machine.fail()
            log.error("answering Error: %s: %s", step, exc)
            channel.answer_error(str(exc))
            raise MigrationError(f"{exc}", where=step) from exc
        except Exception as exc:
            self.machine.fail()
            log.exception("bug in chmig while handling %s; answering Error", step)
            channel.answer_error("internal error")
            raise InternalError(f"while handling {step}: {exc!r}", where="receive") from exc
        if self.machine.state is not p.ReceiverState.COMPLETED:
            channel.answer_ok()
            return
        # The destination's point of no return: the VM may already be running here (and, in a local
        # migration, writing the shared memory), so a lost Ok must not throw it away.
        try:
            channel.answer_ok()
        except ChmigError as exc:
            log.warning("could not answer Ok to %s (%s): the VM is kept here; the source will report the "
                        "outcome as unknown", step, exc)

    # -- the steps -----------------------------------------------------------------------------------

    def on_start(self, channel: Channel, incoming: IncomingRequest) -> None:
        """Protocol step *Start*: the version (and the length of the token that comes with version 1) was checked
        by the state machine."""
        log.debug("migration protocol version %d", incoming.request.sender_version)
        self.token = incoming.payload or None

    def on_memory_fd(self, channel: Channel, incoming: IncomingRequest) -> None:
        """Protocol step *MemoryFd* (local migration): a slot number and its memfd."""
        assert incoming.slot is not None and incoming.fd is not None
        self.destination.add_memory_fd(incoming.slot, incoming.fd)

    def _hand_over_fault_connection(self, channel: Channel) -> bool:
        """A Fault connection waits here for the migration to take it (``fault_tx`` in Cloud Hypervisor)."""
        self.fault_connections.put(channel)
        return True

    def on_config(self, channel: Channel, incoming: IncomingRequest) -> None:
        """Protocol step *Config*: build the VM; from now on accept additional connections."""
        vm = self.destination.configure(incoming.payload)
        self.stats.mode = self.destination.mode
        # Like Cloud Hypervisor, accept workers even if the sender may use only the main connection.
        self.workers = MemoryWorkers(vm.memory, self.stats, self.populate, self.limits)
        handlers: dict[p.ConnectionRole, RoleHandler] = {
            p.ConnectionRole.PRECOPY_MEMORY: self.workers,
            p.ConnectionRole.FAULT: self._hand_over_fault_connection,
        }
        self.acceptor = Acceptor(self.listener, handlers, self.threads, self.observers, self.limits)
        self.acceptor.start()
        if self.memory_mode == "postcopy":
            self.stats.mode = "postcopy"
            # Which pages are here is read from the kernel at State (a hybrid source sends some first): a huge
            # page filled around one received page must not make its other 511 look received.
            vm.memory.no_huge_pages()

    def on_memory(self, channel: Channel, incoming: IncomingRequest) -> None:
        """Protocol step *Memory* on the main connection (single-connection precopy)."""
        assert self.memory is not None and incoming.table is not None
        self.stats.total_bytes += channel.receive_memory(self.memory, incoming.table, self.populate)

    def on_discard(self, channel: Channel, incoming: IncomingRequest) -> None:
        """Protocol step *Discard* (version 1; a hybrid migration switching to postcopy): drop the stale pages.

        Every range is checked (page aligned, inside guest RAM) before any page is dropped; the dropped pages
        are missing from now on, so after State the pager asks the source for them like any other.
        """
        if self.memory_mode != "postcopy":
            raise ProtocolError("this destination receives by precopy, and a hybrid migration switching to "
                                "postcopy needs one that receives by postcopy (memory_mode=postcopy)",
                                where="Discard")
        if self.destination.mode == "local":  # the pages are the source's own memfds: never drop them
            raise ProtocolError("a local migration (MemoryFd) has nothing to discard", where="Discard")
        assert self.memory is not None and incoming.table is not None
        p.check_discard_table(incoming.table)
        for rng in incoming.table:
            try:
                for _ in self.memory.split(rng):
                    pass
            except VmError as exc:
                raise ProtocolError(f"range {rng.gpa:#x}+{rng.length:#x} is not inside guest RAM",
                                    where="Discard") from exc
        for rng in incoming.table:
            self.memory.discard(rng)
        self.stats.mode = "hybrid"
        self.stats.pages_discarded = (self.stats.pages_discarded or 0) + incoming.table.total_bytes // p.PAGE_SIZE
        self._switched = True

    def on_state(self, channel: Channel, incoming: IncomingRequest) -> None:
        """Protocol step *State*: every worker is done; restore vCPUs and devices, VM paused.

        Postcopy: first take the Fault connections (at most 30 s for the
        first) and register guest RAM with userfaultfd; after the restore the
        pager's threads start (they may pull while the VM is still paused).
        """
        # A version-0 source receives by postcopy as this destination does.  A version-1 one may be hybrid: it
        # switched (Discard) or opened its Fault connections (recoverable postcopy), or its precopy converged.
        postcopy = self.memory_mode == "postcopy" and (self.machine.version == p.PROTOCOL_VERSION or self._switched
                                                       or self._fault_connection_came())
        faults = self._take_fault_connections() if postcopy else []
        self._finish_workers()
        if self.workers is not None and self.workers.errors:
            for fault in faults:
                fault.close()
            raise MigrationError(f"an additional connection failed: {self.workers.errors[0]}", where="State")
        faults += self._queued_fault_connections()
        if not postcopy:
            if self.memory_mode == "postcopy":  # a hybrid source whose precopy converged
                self.stats.mode = "hybrid"
            if faults:
                for fault in faults:
                    fault.close()
                raise ProtocolError("the source opened a Fault connection: it migrates by postcopy (or hybrid), "
                                    "but this destination receives by precopy (receive with memory_mode=postcopy: "
                                    "it takes a postcopy or a hybrid source)", where="State")
            self.destination.restore(incoming.payload, ready=self._ready_to_restore)
            self.on_event("restored", None)
            return
        assert self.memory is not None
        if self.stats.total_bytes:  # precopy came first: a hybrid migration (whether it discarded or not)
            self.stats.mode = "hybrid"
        recoverable = bool(self.recovery_s) and self.token is not None
        self.pager = PostcopyPager(self.memory, faults, self.prefetch, self.limits,
                                   PostcopyStats(role="destination", counts_bytes_into=self.stats),
                                   shared_with_source=self.destination.mode == "local",
                                   memory_arrived=self.stats.total_bytes > 0,
                                   recovery_s=self.recovery_s if recoverable else 0.0)
        self.stats.postcopy = self.pager.stats
        if recoverable:
            # The port stays open for the source's FaultRecovery connections until the VM is whole.
            assert self.token is not None
            acceptor = RecoveryAcceptor(self.listener.take_over(), self.token, self.pager.arrive, self.observers,
                                        self.limits)
            self.pager.recovery_listener = acceptor
            acceptor.start()
        self.pager.register()
        # Faults are served before the restore: loading a real guest's state may touch its RAM (kvmclock).
        self.pager.start()
        self.on_event("restoring", None)
        self.destination.restore(incoming.payload)
        self.on_event("restored", None)

    def _check_memory_arrived(self) -> None:
        p.check_memory_before_state(self.memory_mode, self.stats.total_bytes, self.destination.mode == "local")

    def _ready_to_restore(self) -> None:
        """Precopy's last check before the State is loaded; only then does the restore begin (its event)."""
        self._check_memory_arrived()
        self.on_event("restoring", None)

    def _fault_connection_came(self) -> bool:
        """Has the source opened a Fault connection (before State, as it does when it serves by postcopy)?"""
        if self.acceptor is not None:
            self.acceptor.settle(self.limits.workers_finish_s)
        return not self.fault_connections.empty()

    def _take_fault_connections(self) -> list[Channel]:
        """Postcopy: the first Fault connection (at most ``fault_connection_wait_s``), then those queued with it."""
        try:
            first = self.fault_connections.get(timeout=self.limits.fault_connection_wait_s)
        except queue.Empty:
            raise PostcopyError(f"no Fault connection within {self.limits.fault_connection_wait_s:g} s: is the "
                                "source migrating with memory_mode=postcopy?", where="State") from None
        if self.acceptor is not None:  # the others came with it (the source opens them all before State)
            self.acceptor.settle(self.limits.workers_finish_s)
        return [first]

    def _queued_fault_connections(self) -> list[Channel]:
        """Every Fault connection handed over so far (the acceptor has stopped), in the order they came."""
        channels = []
        while True:
            try:
                channels.append(self.fault_connections.get_nowait())
            except queue.Empty:
                return channels

    def on_complete(self, channel: Channel, incoming: IncomingRequest) -> None:
        """Protocol step *Complete*: resume the VM (from here on it is never discarded, see :meth:`cancel`)."""
        self._pass_point_of_no_return("Complete")
        self.on_event("resuming", None)
        self.destination.complete(resume=True)
        self.on_event("resumed", None)

    def on_complete_paused(self, channel: Channel, incoming: IncomingRequest) -> None:
        """Protocol step *CompletePaused*: the VM stays paused, as it was on the source."""
        self._pass_point_of_no_return("CompletePaused")
        self.destination.complete(resume=False)

    def _pass_point_of_no_return(self, step: str) -> None:
        """From here on a cancel is refused and the VM is never discarded (unless a cancel came first).

        Postcopy that already failed (the pull starts at State) refuses Complete instead: the source can
        still take its VM back, and resume it.
        """
        if self.pager is not None and self.pager.stats.status == "failed":
            raise PostcopyError(f"postcopy failed before Complete: {self.pager.error}", where=step)
        with self._cancel_lock:
            if self._cancelled.is_set():
                raise MigrationError("the migration was cancelled on the destination", where=step)
            self._completing = True

    def on_abandon(self, channel: Channel, incoming: IncomingRequest) -> None:
        """Protocol step *Abandon*: answered Ok; the loop then discards the VM."""
        log.info("the sender abandoned the migration")

    # -- threads and the end ----------------------------------------------------------------------------

    def _finish_workers(self) -> None:
        """Stop accepting, then give the sender's memory connections time to end (it closes them)."""
        self.listener.abort()
        stuck = self.threads.wait(self.limits.workers_finish_s)
        if stuck:
            log.warning("memory connections still open at State after %.0f s: %s", self.limits.workers_finish_s,
                        ", ".join(stuck))
        self._close_threads()

    def _close_threads(self) -> None:
        """Stop the acceptor and every connection thread (a thread that does not stop is an error)."""
        try:
            self.threads.close(timeout=10)
        except StuckThreadError as exc:
            raise MigrationError(str(exc), where="receive") from None

    def _close_fault_connections(self) -> None:
        """Close the Fault connections nobody took (Cloud Hypervisor closes an unused one when the receive ends)."""
        while True:
            try:
                self.fault_connections.get_nowait().close()
            except queue.Empty:
                return

    def cancel(self) -> None:
        """Stop this migration from another thread: the listener and every connection are shut.

        Too late once Complete arrived: the VM may be running here already.
        """
        with self._cancel_lock:
            if self._completing:
                log.warning("not cancelling: Complete has arrived, the VM is this destination's now")
                return
            self._cancelled.set()
        self.threads.stop()
        self.listener.abort()
        if self.channel is not None:
            self.channel.shutdown()

    def discard(self) -> None:
        """Throw the half-built VM away and stop every thread this migration started."""
        try:
            self._close_threads()
        except Exception as exc:  # the VM must be discarded whatever went wrong with the threads
            log.error("discarding the migration: %s", exc)
        finally:
            self._close_fault_connections()
            if self.pager is not None:
                self.pager.stop("the migration failed before Complete")
                try:
                    self.pager.close()
                except ChmigError as exc:
                    log.error("discarding the migration: %s", exc)
                self.pager = None
            self.destination.discard()


#: Which step function handles which command (the state machine already allowed it).
STEPS: dict[p.Command, Callable[[Receiver, Channel, IncomingRequest], None]] = {
    p.Command.START: Receiver.on_start,
    p.Command.MEMORY_FD: Receiver.on_memory_fd,
    p.Command.CONFIG: Receiver.on_config,
    p.Command.MEMORY: Receiver.on_memory,
    p.Command.DISCARD: Receiver.on_discard,
    p.Command.STATE: Receiver.on_state,
    p.Command.COMPLETE: Receiver.on_complete,
    p.Command.COMPLETE_PAUSED: Receiver.on_complete_paused,
    p.Command.ABANDON: Receiver.on_abandon,
}
