"""The source side of a migration: precopy over one or many connections, or local by memfd.

Sequence (remote precopy, as Cloud Hypervisor's ``send_migration``)::

    connect ─ Start ─ Config ─ dirty logging on
    iteration 0: every populated page            ┐ VM running;
    iteration n: pages dirtied during n-1        ┘ until converged
    pause ─ final iteration ─ State ─ Complete | CompletePaused

Convergence (``is_precopy_converged``), checked *before* each iteration is sent:
nothing is dirty; or the estimated time to send what is dirty, at the bandwidth
of the previous iteration, fits ``downtime_ms``; or ``timeout_s`` has passed —
then ``timeout_strategy=cancel`` stops the migration and keeps the VM on the
source, ``ignore`` finishes anyway.  The dirty table that converged becomes part
of the final (paused) iteration.

Until the destination acknowledged Complete, any failure leaves the source as
it was: dirty logging off, the VM resumed if it was running, the API serving.

While it runs, the sender keeps ``stats.progress`` current (the phase, the
iteration in flight and how much of it went out, the last bandwidth and dirty
rate, the estimated downtime) for ``vm.info``'s live progress, and reports
Cloud Hypervisor's events of a migration (``migration-memory-iteration`` after
each iteration sent while the VM runs, ``pausing``/``paused``, the resume of a
rollback, ``postcopy-migration-completed``) through the ``on_event`` hook it is
given: this module does not know the VMM or its event monitor.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time

from . import protocol as p
from .apiconfig import SendOptions
from .channel import Channel, Observers
from .errors import (
    ChmigError,
    ConvergenceError,
    MigrationError,
    PeerError,
    PostcopyError,
    VmError,
)
from .events import EventHook, no_events
from .memory import GuestMemory
from .postcopy import PostcopyStats, PresentPages, SourceLost, connection_broke
from .stats import Iteration, MigrationStats, Progress
from .threads import ThreadGroup
from .transport import connect
from .units import MiB
from .vm import Vm, VmState

log = logging.getLogger(__name__)

#: Chunks queued per worker connection before the producer waits (Cloud Hypervisor: 64).
QUEUED_CHUNKS_PER_WORKER = 64

# ``SendOptions`` (Cloud Hypervisor's ``VmSendMigrationData``) lives with the other request structs in
# apiconfig.py, so that a client can build and check a request without the VM stack; re-exported here.


# ---------------------------------------------------------------------------------------------
# Memory over N worker connections
# ---------------------------------------------------------------------------------------------


class MemorySender:
    """Sends memory tables, over the main connection or over N ``PrecopyMemory`` workers.

    With workers, :meth:`send` cuts the table into chunks of at most 64 MiB and
    puts them on a bounded queue (the producer waits when it is full); each
    worker thread sends a chunk and waits for its Ok.  :meth:`send` returns once
    every chunk is acknowledged (``queue.join``: the gate at the end of each
    iteration) and raises if any worker failed.  After a failure the workers
    drain the queue without sending, so nobody waits for a chunk that will
    never be acknowledged.
    """

    def __init__(self, main: Channel, memory: GuestMemory, options: SendOptions, observers: Observers,
                 limits: p.Limits = p.DEFAULT_LIMITS, progress: Progress | None = None) -> None:
        self.main = main
        self.limits = limits
        self.memory = memory
        #: Told the bytes each connection has written (the live progress of ``vm.info``), if there is one.
        self.progress = progress.sent if progress is not None else None
        self.options = options
        self.observers = observers
        self.workers: list[Channel] = []
        self.threads = ThreadGroup("migrate-send-memory")
        self._queue: queue.Queue[p.MemoryRangeTable | None] = queue.Queue(
            maxsize=QUEUED_CHUNKS_PER_WORKER * options.connections)
        self._error: BaseException | None = None

    def open(self) -> None:
        """Open the worker connections (``connections > 1``) and start one thread each."""
        if self.options.connections <= 1:
            return
        tls = self.options.tls()
        try:
            for n in range(self.options.connections):
                if self.threads.stopping.is_set():
                    raise MigrationError("the migration was cancelled", where="memory connections")
                conn = connect(self.options.url, tls)
                channel = Channel(conn, side=p.Side.SOURCE, name=f"memory-{n}", observers=self.observers)
                self.workers.append(channel)
                self.threads.add_stopper(channel.shutdown)
                channel.set_nodelay()
                channel.set_timeout(self.limits.response_timeout_s)
                channel.send_role(p.ConnectionRole.PRECOPY_MEMORY)
            for channel in self.workers:
                self.threads.start(f"migrate-send-{channel.name}", self._worker, channel)
        except BaseException:
            self.close()
            raise
        log.info("sending memory over %d connections", len(self.workers))

    def send(self, table: p.MemoryRangeTable) -> int:
        """Send ``table`` and wait until all of it is acknowledged; return its bytes."""
        if not table:
            return 0
        if not self.workers:
            return self.main.send_memory(self.memory, table, self.progress)
        for chunk in table.partition(p.PRECOPY_CHUNK_SIZE):
            if self._error is not None:
                break
            self._queue.put(chunk)
        self._queue.join()
        if self._error is not None:
            raise MigrationError(f"a memory connection failed: {self._error}", where="Memory")
        return table.total_bytes

    def _worker(self, channel: Channel) -> None:
        while True:
            chunk = self._queue.get()
            try:
                if chunk is None:  # the owner is closing
                    return
                if self._error is None:
                    channel.send_memory(self.memory, chunk, self.progress)
            except BaseException as exc:  # reported to the producer, which raises it
                log.error("%s: %s", threading.current_thread().name, exc)
                if self._error is None:
                    self._error = exc
                    # Wake the other workers out of their sends: the migration has failed, nobody may
                    # wait for their chunks.
                    self.threads.stop()
            finally:
                self._queue.task_done()

    def close(self) -> None:
        """End the workers (a None each; a socket shutdown first unless all went well) and join them."""
        if self._error is not None or self._queue.unfinished_tasks:
            self.threads.stop()
        for _ in self.threads.alive():
            self._queue.put(None)
        try:
            self.threads.join(timeout=30)
        finally:
            for channel in self.workers:
                channel.close()
            self.workers.clear()


# ---------------------------------------------------------------------------------------------
# Postcopy: serving pages over Fault connections
# ---------------------------------------------------------------------------------------------

#: Postcopy recovery: TCP keepalive of a recoverable Fault connection (idle s, interval s, probes).
RECOVERY_KEEPALIVE = (2, 1, 3)
#: ... and the pause between reconnection attempts, doubling up to the most.
RECONNECT_FIRST_DELAY_S = 0.2
RECONNECT_MAX_DELAY_S = 1.0
#: ... and the shortest a connect may wait near the deadline.
RECONNECT_MIN_CONNECT_S = 1.0


class PostcopyUnknown(PostcopyError):
    """Postcopy ended without telling whether the destination has every page (see :meth:`FaultServer.wait`)."""


class FaultServer:
    """The source's end of postcopy: ``fault_connections`` Fault connections, one thread each.

    Each thread answers PageFaults from guest memory (checked ranges, no
    Python copy; :meth:`chmig.channel.Channel.serve_page_faults`) until the
    destination closes its connection.  A connection the destination never
    uses and closes is normal (Cloud Hypervisor's takes only one).  :meth:`wait`
    returns when every connection has ended, and raises the first failure.

    A destination closes its Fault connections when it has every page — or
    when it died.  On the wire the two look the same (a killed process's
    sockets close cleanly), so the source keeps a bitmap of the pages it
    served: connections that all closed while some page was never asked for
    are a failure, and the VM stays here.

    Recovery (``token`` agreed at Start, ``options.recovery_s`` > 0): a
    connection that *breaks* (reset, timed out — not a clean close) ends the
    current attempt.  The thread that saw it first shuts the attempt's other
    connections and opens ``fault_connections`` new ones as the next attempt
    (role FaultRecovery, the token, the attempt number), retrying until
    ``recovery_s`` has passed; the destination asks again for what it lacks.
    Every connection of the attempt closed cleanly with pages never asked for
    is taken as a break too (a proxy may pass a reset on as a clean close).
    """

    def __init__(self, memory: GuestMemory, options: SendOptions, observers: Observers, stats: PostcopyStats,
                 migration_stats: MigrationStats, limits: p.Limits = p.DEFAULT_LIMITS,
                 token: bytes | None = None) -> None:
        self.memory = memory
        #: The migration token of a version-1 Start; None: this postcopy cannot recover.
        self.token = token if options.recovery_s else None
        self.migration_stats = migration_stats
        self.options = options
        self.observers = observers
        self.stats = stats
        self.limits = limits
        self.channels: list[Channel] = []
        self.threads = ThreadGroup("migrate-send-faults")
        self.errors: list[str] = []
        #: Which pages the destination has asked for (and so has).
        self.served = PresentPages(memory.ram_ranges())
        self._lock = threading.Lock()
        self._ended = threading.Condition(self._lock)
        self._running = 0
        #: 0: the connections opened before State; each recovery's set is the next attempt.
        self._attempt = 0
        self._attempt_of: dict[int, int] = {}
        #: Connections of each attempt still being served.
        self._open_of_attempt: dict[int, int] = {}

    def already_there(self, sent: p.MemoryRangeTable, discarded: p.MemoryRangeTable) -> None:
        """Hybrid: the destination has every page precopy sent (``sent``: the source's populated pages) except
        the ``discarded`` ones; it asks only for the rest."""
        for table, mark in ((sent, self.served.mark), (discarded, self.served.unmark)):
            for rng in table:
                for gpa, length in self.memory.split(rng):
                    mark(gpa, length)

    def open(self) -> None:
        """Open the Fault connections (role Fault, TCP_NODELAY) and start serving each at once."""
        try:
            opened = self._connect_all(attempt=0)
            with self._lock:
                self._running = len(opened)
            for channel in opened:
                self.threads.start(f"migrate-send-{channel.name}", self._serve, channel)
        except BaseException:
            self.close()
            raise
        self.stats.fault_connections = len(self.channels)
        log.info("postcopy: serving pages over %d Fault connection(s)%s", len(self.channels),
                 f"; recoverable for {self.options.recovery_s} s" if self.token else "")

    def _connect_all(self, attempt: int, deadline: float | None = None) -> list[Channel]:
        """Open ``fault_connections`` connections of ``attempt``: role Fault first, FaultRecovery (the token, the
        attempt) after a break, each connect bounded by ``deadline`` too.  All of them or none (a failure closes
        those already open)."""
        tls = self.options.tls()
        opened: list[Channel] = []
        try:
            for n in range(self.options.fault_connections):
                timeout = self.limits.paused_response_timeout_s
                if deadline is not None:
                    timeout = min(timeout, max(RECONNECT_MIN_CONNECT_S, deadline - time.monotonic()))
                conn = connect(self.options.url, tls, timeout=timeout)
                name = f"fault-{n}" if attempt == 0 else f"recovery-{attempt}-{n}"
                channel = Channel(conn, side=p.Side.SOURCE, name=name, observers=self.observers, limits=self.limits)
                opened.append(channel)
                channel.set_nodelay()
                if self.token is not None:
                    # A link that dies silently must break the connection in seconds, not after CH's 2 minutes.
                    conn.set_keepalive(*RECOVERY_KEEPALIVE)
                if attempt == 0:
                    channel.send_role(p.ConnectionRole.FAULT)
                else:
                    assert self.token is not None
                    channel.send_recovery(p.RecoveryHello(self.token, attempt))
                # The destination may stay silent between requests for as long as it likes; inside one, not.
                channel.stall_timeout = self.limits.stall_timeout_s
        except BaseException:
            for channel in opened:
                channel.close()
            raise
        with self._lock:
            for channel in opened:
                self.channels.append(channel)
                self._attempt_of[id(channel)] = attempt
            self._open_of_attempt[attempt] = len(opened)
        for channel in opened:
            self.threads.add_stopper(channel.shutdown)
        return opened

    def _serve(self, channel: Channel) -> None:
        try:
            while True:
                try:
                    served = channel.serve_page_faults(self.memory, on_served=self._count)
                except BaseException as exc:
                    self._connection_ended(channel)
                    if not (self.token is not None and connection_broke(exc)) or self.threads.stopping.is_set():
                        raise
                    cause: BaseException = exc
                else:
                    last = self._connection_ended(channel)
                    with self._lock:
                        replaced = self._attempt_of.get(id(channel)) != self._attempt
                    if replaced:  # this side shut it: a newer attempt replaces it
                        log.info("postcopy: %s ended after %d pages: attempt %d replaces it", channel.name, served,
                                 self._attempt)
                        return
                    log.info("postcopy: the destination closed %s after %d pages", channel.name, served)
                    with self._lock:
                        failed = bool(self.errors)  # another connection failed for real: no recovery for that
                    if not (last and self.token is not None and not self.served.whole) or failed or \
                            self.threads.stopping.is_set():
                        return
                    # Every connection closed cleanly with pages never asked for.  A destination that gives up
                    # resets its connections, but a proxy or a middlebox on the way may turn a reset into a clean
                    # close: a recoverable migration reconnects (a destination that is gone refuses it).
                    cause = SourceLost(f"the destination closed every Fault connection with {self.served.missing} "
                                       "pages never asked for", where="postcopy")
                replacement = self._recover(channel, cause)
                if replacement is None:  # another thread recovers this attempt; this one is done
                    return
                channel.close()  # the broken one: this thread serves the replacement from now on
                channel = replacement
        except BaseException as exc:  # reported by wait(); the other connections go on
            message = f"{channel.name}: {exc}"
            log.error("postcopy: %s", message)
            with self._lock:
                self.errors.append(message)
        finally:
            channel.close()
            with self._lock:
                self._running -= 1
                self._ended.notify_all()

    def _connection_ended(self, channel: Channel) -> bool:
        """``channel`` is no longer served; True if it was the last one of the current attempt."""
        with self._lock:
            attempt = self._attempt_of.get(id(channel), -1)
            left = self._open_of_attempt.get(attempt, 0) - 1
            self._open_of_attempt[attempt] = left
            return attempt == self._attempt and left <= 0

    def _recover(self, broken: Channel, exc: BaseException) -> Channel | None:
        """``broken`` broke: if it is of the current attempt, end that attempt (shut its other connections) and
        connect the next one, retrying until ``recovery_s``; return this thread's new connection (the others get
        threads of their own).  None: an earlier break already started the attempt that replaces it."""
        with self._lock:
            if self._attempt_of.get(id(broken)) != self._attempt:
                return None
            self._attempt += 1
            siblings = [c for c in self.channels if self._attempt_of.get(id(c)) == self._attempt - 1]
        for channel in siblings:
            if channel is not broken:
                channel.reset()  # its thread ends (an older attempt); the destination sees every one break
        cause = exc.message if isinstance(exc, ChmigError) else repr(exc)
        log.warning("postcopy: %s broke (%s); reconnecting for up to %d s (postcopy_recovery_s)", broken.name,
                    cause, self.options.recovery_s)
        began = time.monotonic()
        deadline = began + self.options.recovery_s
        delay = RECONNECT_FIRST_DELAY_S
        while True:
            with self._lock:
                attempt = self._attempt
            try:
                first, *others = self._connect_all(attempt, deadline)
                break
            except ChmigError as failure:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PostcopyError(f"{broken.name} broke ({cause}), and reconnecting failed for "
                                        f"{self.options.recovery_s} s (postcopy_recovery_s); last: {failure}",
                                        where="postcopy") from None
                log.info("postcopy: reconnecting (attempt %d) failed: %s; again in %.1f s", attempt, failure, delay)
                if self.threads.stopping.wait(min(delay, remaining)):  # the last try comes at the deadline
                    raise
                delay = min(delay * 2, RECONNECT_MAX_DELAY_S)
                with self._lock:
                    self._attempt += 1  # a half-made attempt must never mix with the next one
        for channel in others:
            with self._lock:
                self._running += 1
            try:
                self.threads.start(f"migrate-send-{channel.name}", self._serve, channel)
            except RuntimeError:  # stopping: the group takes no new thread (close() closes the connection)
                with self._lock:
                    self._running -= 1
                    self._ended.notify_all()
        if self.threads.stopping.is_set():
            raise PostcopyError("serving pages was stopped while reconnecting", where="postcopy")
        duration = time.monotonic() - began
        self.stats.recovered(attempt=attempt, cause=cause, duration_ms=round(duration * 1000, 1))
        log.info("postcopy: reconnected (attempt %d) after %.0f ms", attempt, duration * 1000)
        return first

    def _count(self, page: p.MemoryRange) -> None:
        for gpa, length in self.memory.split(page):
            self.served.mark(gpa, length)
        with self._lock:
            self.stats.pages_served += page.length // p.PAGE_SIZE
            self.migration_stats.total_bytes += page.length

    def wait(self) -> None:
        """Block until the destination has closed every Fault connection; raise the first failure."""
        with self._ended:
            self._ended.wait_for(lambda: self._running == 0)
        self.threads.join(timeout=10)
        if self.served.whole and self.errors:
            # Every page went out, but a connection ended in an error, not a clean close: the destination may
            # have failed on the last pages (it resets its connections when it gives up).  Not knowing, keep
            # this copy: it must not run here (the destination may), nor be thrown away.
            raise PostcopyUnknown(f"every page was served, but {self.errors[0]}: the destination probably has "
                                  "the whole VM and runs it; this VM stays here, paused — check the destination "
                                  "before you resume or drop it", where="postcopy")
        if self.errors:
            raise PostcopyError(f"a Fault connection failed ({self.errors[0]})", where="postcopy")
        if not self.served.whole:  # (every connection closed cleanly)
            raise PostcopyError(f"the destination closed every Fault connection with {self.served.missing} of "
                                f"{self.served.total} pages never asked for: it cannot have the whole VM (did it "
                                "fail?)", where="postcopy")

    def stop(self) -> None:
        """Shut every Fault connection down (the migration failed before Complete, or the VMM is exiting)."""
        self.threads.stop()

    def close(self) -> None:
        self.threads.stop()
        try:
            self.threads.join(timeout=10)
        finally:
            for channel in self.channels:
                channel.close()


# ---------------------------------------------------------------------------------------------
# The migration
# ---------------------------------------------------------------------------------------------


class Sender:
    """One outgoing migration of ``vm``; :meth:`run` either hands the VM over or leaves it be."""

    def __init__(self, vm: Vm, options: SendOptions, stats: MigrationStats,
                 observers: Observers | None = None, limits: p.Limits = p.DEFAULT_LIMITS,
                 on_event: EventHook | None = None) -> None:
        self.vm = vm
        #: Cloud Hypervisor's ``vm`` events of the migration (iterations, the pause, postcopy's end), for the
        #: VMM's event monitor; this module does not know where they go.
        self.on_event: EventHook = on_event or no_events
        self.options = options
        self.stats = stats
        self.observers = observers if observers is not None else Observers()
        self.limits = limits
        #: Version 0 (Cloud Hypervisor's) unless the migration needs version 1 (hybrid's Discard, recovery).
        self.machine = p.SourceMachine(version=options.protocol_version)
        #: Version 1, a migration that can recover: the token sent with Start, which a FaultRecovery connection
        #: proves.  None: no token (version 0, or ``postcopy_recovery_s=0``): the destination will not wait.
        self.token = (secrets.token_bytes(p.TOKEN_SIZE) if self.machine.version >= 1 and options.recovery_s
                      else None)
        #: Hybrid: an operator asked to switch to postcopy (``vm.migration-start-postcopy``): at the end of the
        #: iteration in flight.  ``_precopy_over`` (under ``_phase_lock``) says why such a request is too late.
        self._switch_requested = threading.Event()
        self._phase_lock = threading.Lock()
        self._precopy_over: str | None = None
        self.was_running = vm.state == VmState.RUNNING
        self.paused_by_us = False
        #: Complete (or CompletePaused) went out: the point of no return (see :meth:`_roll_back`).
        self.complete_sent = False
        #: ... and its Ok came back: the destination owns the VM.
        self.handed_over = False
        self.downtime_begin = time.monotonic()
        self.channel: Channel | None = None
        self.memory_sender: MemorySender | None = None
        self.fault_server: FaultServer | None = None
        self._cancelled = threading.Event()
        self._cancel_lock = threading.Lock()

    @property
    def cancelled(self) -> bool:
        """An operator (or the VMM shutting down) cancelled this migration."""
        return self._cancelled.is_set()

    def run(self) -> None:
        """Migrate; on failure before hand-over, leave the VM as it was and raise."""
        options = self.options
        conn = connect(options.url, options.tls())
        self.channel = Channel(conn, side=p.Side.SOURCE, observers=self.observers)
        try:
            # A small final iteration stalled 44 ms on Nagle + delayed ACK without this (bench/precopy.py).
            self.channel.set_nodelay()
            # A destination that goes silent must not hold the VM here: every answer has a bound.
            self.channel.set_timeout(self.limits.response_timeout_s)
            if self._cancelled.is_set():
                raise MigrationError("the migration was cancelled", where="send")
            self._migrate()
        except BaseException as exc:
            self._roll_back(exc)
            if self._cancelled.is_set() and not isinstance(exc, ConvergenceError):
                raise MigrationError(f"the migration was cancelled ({exc})", where="send") from exc
            raise
        finally:
            if self.memory_sender is not None:
                self.memory_sender.close()
            if self.fault_server is not None:
                self.fault_server.close()
            self.channel.close()

    def cancel(self) -> None:
        """Stop the migration from another thread: every connection is shut; run() rolls back and raises.

        Too late once Complete was sent (the point of no return): then nothing is done.
        """
        with self._cancel_lock:
            if self.complete_sent:
                log.warning("not cancelling: Complete was already sent")
                return
            self._cancelled.set()
        if self.channel is not None:
            self.channel.shutdown()
        memory_sender = self.memory_sender
        if memory_sender is not None:
            memory_sender.threads.stop()
        if self.fault_server is not None:
            self.fault_server.stop()

    @property
    def serving_postcopy(self) -> bool:
        """The destination has the VM (or may) and pulls its pages from here: they exist nowhere else."""
        return self.fault_server is not None and self.complete_sent

    def abort_postcopy(self) -> None:
        """The VMM is exiting while the destination still pulls pages from here: stop serving them.

        The destination's VM then fails (it reports so); this one stays paused until the process ends.
        """
        server = self.fault_server
        if server is not None and self.complete_sent:
            log.error("postcopy: the VMM is exiting while the destination still needs pages from here; its VM "
                      "will fail")
            server.stop()

    def _request_ok(self, request: p.Request, payload: bytes = b"") -> None:
        """One step of the main connection, as the table allows it: send, require Ok, move on."""
        assert self.channel is not None
        self.machine.check_send(request.command)
        self.channel.request_ok(request, payload)
        self.machine.acknowledged(request.command)

    def _start(self) -> None:
        """Protocol step *Start*, with the version this migration needs (0 unless hybrid or recoverable postcopy)
        and, from version 1 on, the migration token."""
        version = self.machine.version
        try:
            self._request_ok(p.Request.start(version, token=self.token is not None), self.token or b"")
        except PeerError as exc:
            if version == p.PROTOCOL_VERSION:
                raise
            needs = ("memory_mode=hybrid" if self.options.memory_mode == "hybrid"
                     else f"postcopy_recovery_s={self.options.recovery_s}")
            instead = ("migrate with memory_mode=precopy or postcopy to it" if self.options.memory_mode == "hybrid"
                       else "migrate without postcopy_recovery_s (or with 0) to it")
            raise MigrationError(f"the destination refused protocol version {version}, which {needs} needs: it "
                                 f"speaks only version {p.PROTOCOL_VERSION} (Cloud Hypervisor, or an older chmig) "
                                 f"— {instead}", where="Start") from exc

    def _migrate(self) -> None:
        vm = self.vm
        self._start()
        if self.options.local:
            self._send_memory_fds()
        config = json_bytes(vm.migration_config())
        self._request_ok(p.Request.config(len(config)), config)
        if self.options.local:
            self._pause()
        elif self.options.memory_mode == "postcopy":
            self._pause()
            self._open_fault_server(None)
        else:
            assert self.channel is not None
            self.stats.progress = Progress()
            self.memory_sender = MemorySender(self.channel, vm.memory, self.options, self.observers, self.limits,
                                              self.stats.progress)
            if self.cancelled:  # cancel() may have run before the memory sender existed
                raise MigrationError("the migration was cancelled", where="send")
            self.memory_sender.open()
            discarded = self._precopy()
            if discarded is not None:  # hybrid switched: the rest comes by postcopy (converged: all came already)
                self._open_fault_server(discarded)
        self._enter("state")
        capture_begin = time.monotonic()
        state = json_bytes(vm.capture_state())
        self.stats.state_capture_ms = _ms_since(capture_begin)
        send_begin = time.monotonic()
        try:
            self._request_ok(p.Request.state(len(state)), state)
        except PeerError as exc:
            if self.options.memory_mode != "hybrid":
                raise
            raise MigrationError(f"the destination refused State ({exc.message}): one that receives by precopy "
                                 "refuses the Fault connections a hybrid migration opens — receive with "
                                 "memory_mode=postcopy; otherwise see the destination's log", where="State") from exc
        self.stats.send_state_ms = _ms_since(send_begin)
        complete_begin = time.monotonic()
        complete = p.Request.complete() if self.was_running else p.Request.complete_paused()
        self.machine.check_send(complete.command)
        assert self.channel is not None
        self.channel.set_timeout(p.completion_timeout(self.options.local, vm.memory.total_size, self.limits))
        with self._cancel_lock:
            if self.cancelled:
                raise MigrationError("the migration was cancelled", where="Complete")
            self.complete_sent = True  # from here on the destination may be running the VM
        try:
            self.channel.request_ok(complete)
        except PeerError as exc:
            if self.fault_server is None:
                raise
            # Postcopy: the destination answered Error to Complete (its pager failed already, the pull starts
            # at State): it does not run the VM, so this one may run again.
            with self._cancel_lock:
                self.complete_sent = False
            raise PostcopyError(f"the destination refused Complete ({exc.message}): the VM stays here",
                                where="Complete") from exc
        except ChmigError as exc:
            if self.fault_server is None:
                raise
            # The destination may be running the VM and pulling its pages: serve them anyway, and let the Fault
            # connections tell (every page asked for and a clean close: it has the VM).
            log.warning("postcopy: Complete was sent but not acknowledged (%s); serving pages anyway", exc)
            self._serve_postcopy(self.fault_server)
            self.handed_over = True
            return
        self.machine.acknowledged(complete.command)
        self.handed_over = True
        self.stats.complete_ms = _ms_since(complete_begin)
        self.stats.downtime_ms = _ms_since(self.downtime_begin)
        if self.fault_server is not None:
            self._serve_postcopy(self.fault_server)

    def _open_fault_server(self, discarded: p.MemoryRangeTable | None) -> None:
        """Open the Fault connections (before State) and serve pages from now on.

        ``discarded``: hybrid — the destination has every page precopy sent except these; a plain postcopy (None)
        sent none.  The served-page bitmap starts from that, so the source knows when the destination is whole.
        """
        self.stats.postcopy = PostcopyStats(role="source", status="serving", strategy="", prefetch_bytes=0)
        self.fault_server = FaultServer(self.vm.memory, self.options, self.observers, self.stats.postcopy,
                                        self.stats, self.limits, token=self.token)
        if discarded is not None:
            self.fault_server.already_there(self.vm.memory.populated_table(), discarded)
        if self.cancelled:
            raise MigrationError("the migration was cancelled", where="send")
        self.fault_server.open()

    def start_postcopy(self) -> None:
        """An operator's ``migration-start-postcopy``: a hybrid migration switches at the next iteration."""
        if self.options.memory_mode != "hybrid":
            raise VmError(f"the migration in progress is {self.options.memory_mode}, not hybrid: only "
                          "memory_mode=hybrid can switch to postcopy")
        with self._phase_lock:
            if self._precopy_over is not None:
                raise VmError(f"too late to switch: precopy has {self._precopy_over}")
            log.info("hybrid: an operator asked to switch to postcopy (at the end of the iteration in flight)")
            self._switch_requested.set()

    def _end_precopy(self, how: str) -> bool:
        """Precopy's iterations end (``converged``, ``switched to postcopy``); False if an operator's switch came
        first (then it is honoured)."""
        with self._phase_lock:
            if how != "switched to postcopy" and self._switch_requested.is_set():
                return False
            self._precopy_over = how
            return True

    def _serve_postcopy(self, server: FaultServer) -> None:
        """After Complete: the destination runs the VM and pulls its memory from here until it closes every
        Fault connection.  A failure now cannot be rolled back: this VM stays paused with all its memory."""
        assert self.channel is not None and self.stats.postcopy is not None
        self.channel.close()  # the main connection has nothing more to say
        self._enter("postcopy")
        try:
            server.wait()
        except PostcopyUnknown:
            self.stats.postcopy.status = "unknown"
            raise
        except PostcopyError as exc:
            self.stats.postcopy.status = "failed"
            raise PostcopyError(f"failed after the hand-over: {exc.message}; the destination's VM "
                                "cannot go on, and this VM stays here, paused, with all its memory",
                                where="postcopy") from None
        self.stats.postcopy.status = "served"
        self.on_event("postcopy-migration-completed", None)  # the destination has every page

    def _send_memory_fds(self) -> None:
        """Local migration: one MemoryFd (slot number + memfd as SCM_RIGHTS) per slot.

        Each slot sends the file that backs it: its zone's memfd, or its own when
        the slots of a zone came as separate files (either way the slot's bytes
        are at its ``file_offset``).
        """
        memory = self.vm.memory
        if not memory.shared:
            raise MigrationError("local migration requires shared memory (memory shared=on)", where="MemoryFd")
        assert self.channel is not None
        for region in memory.regions:
            self.machine.check_send(p.Command.MEMORY_FD)
            self.channel.send_memory_fd(region.mapping.slot, region.fd)
            self.machine.acknowledged(p.Command.MEMORY_FD)
        self.stats.mode = "local"

    def _enter(self, phase: str) -> None:
        """The live progress moves on to ``phase`` (no iteration runs in it)."""
        progress = self.stats.progress
        if progress is None:  # local or postcopy: no iteration ran before
            self.stats.progress = progress = Progress()
        progress.begin(phase, progress.iteration, 0)

    def _pause(self) -> None:
        self.downtime_begin = time.monotonic()
        if self.vm.state == VmState.RUNNING:
            self.on_event("pausing", None)
            self.vm.pause()
            self.paused_by_us = True
            self.on_event("paused", None)
        # The guest is down now: a silent destination gets much less time before we roll back.
        paused = self.limits.paused_response_timeout_s
        assert self.channel is not None
        self.channel.set_timeout(paused)
        if self.memory_sender is not None:
            for worker in self.memory_sender.workers:
                worker.set_timeout(paused)

    def _precopy(self) -> p.MemoryRangeTable | None:
        """Iterations while the VM runs, then the paused final iteration (``do_memory_migration``).

        Hybrid: when precopy does not converge by ``timeout_s`` or ``postcopy_after_s``, or an operator asks,
        switch instead of the final iteration: pause, read the dirty log once more, and Discard those pages on
        the destination (postcopy brings them).  Returns the discarded pages (None: no switch).
        """
        vm = self.vm
        assert self.memory_sender is not None
        vm.start_dirty_log()
        bandwidth = 0.0  # bytes per second, of the last iteration
        last_log_read = time.monotonic()
        number = 0
        while True:
            if self.cancelled:
                raise MigrationError("the migration was cancelled", where=f"precopy iteration {number}")
            begin = time.monotonic()
            if number == 0:
                table = vm.memory.populated_table()
                dirty_rate = 0.0
            else:
                table = vm.dirty_table()
                dirty_rate = table.total_bytes / max(begin - last_log_read, 1e-6)
            last_log_read = begin
            estimated = table.total_bytes / bandwidth if bandwidth else None
            if self._switch_requested.is_set():  # an operator's switch wins, converging or not
                self._end_precopy("switched to postcopy")
                return self._switch(table, "operator")
            if self._converged(table, estimated):
                if self._end_precopy("converged"):
                    break
                self._end_precopy("switched to postcopy")
                return self._switch(table, "operator")
            reason = self._switch_reason()
            if reason is not None:
                self._end_precopy("switched to postcopy")
                return self._switch(table, reason)
            transfer_begin = time.monotonic()
            self._progress("precopy", number, table, dirty_rate, estimated)
            self.machine.check_send(p.Command.MEMORY)  # on whichever connection, Memory belongs after Config
            self.memory_sender.send(table)
            duration = time.monotonic() - transfer_begin
            bandwidth = table.total_bytes / max(duration, 1e-6)
            self._record(number, table, duration, bandwidth, dirty_rate, estimated)
            # Cloud Hypervisor's event after each iteration sent while the VM runs (not the final one): lets
            # management software follow the migration forward.
            self.on_event("migration-memory-iteration", {"id": str(number)})
            number += 1
        remaining = table
        self._pause()
        final_begin = time.monotonic()
        final = vm.dirty_table()
        final_dirty_rate = final.total_bytes / max(final_begin - last_log_read, 1e-6)
        final.extend(remaining)
        vm.stop_dirty_log()
        self._progress("final", number, final, final_dirty_rate,
                       final.total_bytes / bandwidth if bandwidth else None)
        self.machine.check_send(p.Command.MEMORY)
        self.memory_sender.send(final)
        # Close the workers now: the destination waits for them to end before it restores State.
        self.memory_sender.close()
        duration = time.monotonic() - final_begin
        self.stats.final_iteration_ms = round(duration * 1000, 3)
        self._record(number, final, duration, final.total_bytes / max(duration, 1e-6), final_dirty_rate,
                     final.total_bytes / bandwidth if bandwidth else None, final=True)
        return None

    def _switch_reason(self) -> str | None:
        """Hybrid, precopy not converging: should it switch to postcopy now?  (None: go on iterating.)"""
        if self.options.memory_mode != "hybrid":
            return None
        elapsed = self.stats.elapsed()
        if self.options.postcopy_after_s is not None and elapsed >= self.options.postcopy_after_s:
            return "postcopy_after_s"
        if elapsed >= self.options.timeout_s:
            return "timeout_s"
        return None

    def _switch(self, unsent: p.MemoryRangeTable, reason: str) -> p.MemoryRangeTable:
        """Hybrid's switch: pause, the dirty log one last time, Discard those pages (and ``unsent``, the
        iteration that was not sent) on the destination; postcopy brings them after State."""
        assert self.memory_sender is not None
        self._pause()
        switch_begin = time.monotonic()
        stale = self.vm.dirty_table()
        stale.extend(unsent)
        stale = stale.merged()  # two dirty-log reads: a page written before and after the second is named once
        self.vm.stop_dirty_log()
        self.memory_sender.close()  # the destination's memory connections end before State
        self.stats.switched_by = reason
        self.stats.switch_after_ms = round(self.stats.elapsed() * 1000, 3)
        self.stats.precopy_bytes = self.stats.total_bytes
        self.stats.pages_discarded = stale.total_bytes // p.PAGE_SIZE
        log.info("hybrid: precopy did not converge (%s); switching to postcopy after %.1f s: %d pages to discard",
                 reason, self.stats.switch_after_ms / 1000, self.stats.pages_discarded)
        self.on_event("migration-switching-to-postcopy", {"reason": reason})
        self._enter("switch")
        assert self.channel is not None
        most = self.limits.max_table_bytes // p.MEMORY_RANGE_SIZE
        ranges = list(stale)
        for first in range(0, max(len(ranges), 1), most):  # an empty table too: the destination learns of it
            chunk = p.MemoryRangeTable(ranges[first:first + most])
            self.machine.check_send(p.Command.DISCARD)
            # The destination drops the pages one range at a time while the VM is paused: give it time per range.
            self.channel.set_timeout(self.limits.paused_response_timeout_s + len(chunk) * DISCARD_S_PER_RANGE)
            try:
                self.channel.send_discard(chunk)
            except PeerError as exc:
                raise MigrationError(f"the destination refused Discard ({exc.message}): a destination that receives "
                                     "by precopy refuses it — a hybrid migration needs one that receives by postcopy "
                                     "(chmig receive --memory-mode postcopy, or receive-migration "
                                     "...,memory_mode=postcopy); otherwise see the destination's log",
                                     where="Discard") from exc
            self.machine.acknowledged(p.Command.DISCARD)
        self.channel.set_timeout(self.limits.paused_response_timeout_s)
        self.stats.final_iteration_ms = _ms_since(switch_begin)
        return stale

    def _progress(self, phase: str, number: int, table: p.MemoryRangeTable, dirty_rate: float,
                  estimated: float | None) -> None:
        """An iteration starts: the live progress shows its size and the estimates it was decided on."""
        if self.stats.progress is not None:
            self.stats.progress.begin(phase, number, table.total_bytes,
                                      dirty_rate_mib_s=round(dirty_rate / MiB, 1),
                                      estimated_downtime_ms=None if estimated is None else round(estimated * 1000, 3))

    def _converged(self, table: p.MemoryRangeTable, estimated_s: float | None) -> bool:
        if not table:
            log.debug("precopy: nothing left to transfer")
            return True
        if estimated_s is not None and estimated_s * 1000 <= self.options.downtime_ms:
            log.debug("precopy: target downtime can be met: %.1f ms", estimated_s * 1000)
            return True
        if self.stats.elapsed() >= self.options.timeout_s and self.options.memory_mode != "hybrid":
            if self.options.timeout_strategy == "cancel":
                raise ConvergenceError(
                    f"precopy did not converge within {self.options.timeout_s} s "
                    f"(estimated downtime {estimated_s * 1000 if estimated_s else float('inf'):.0f} ms, "
                    f"goal {self.options.downtime_ms} ms)",
                    where="precopy",
                )
            log.info("precopy: timeout of %d s reached, finishing anyway (timeout_strategy=ignore)",
                     self.options.timeout_s)
            return True
        return False

    def _record(self, number: int, table: p.MemoryRangeTable, duration: float, bandwidth: float,
                dirty_rate: float, estimated: float | None, final: bool = False) -> None:
        iteration = Iteration(
            iteration=number,
            bytes=table.total_bytes,
            ranges=len(table),
            duration_ms=round(duration * 1000, 3),
            bandwidth_mib_s=round(bandwidth / MiB, 1),
            dirty_rate_mib_s=round(dirty_rate / MiB, 1),
            estimated_downtime_ms=None if estimated is None else round(estimated * 1000, 3),
            final=final,
        )
        self.stats.iterations.append(iteration)
        self.stats.total_bytes += table.total_bytes
        if self.stats.progress is not None:
            self.stats.progress.bandwidth_mib_s = iteration.bandwidth_mib_s
        log.debug("precopy iteration %s", iteration)

    @property
    def outcome_unknown(self) -> bool:
        """Complete went out but its answer never came: the destination may or may not run the VM."""
        return self.complete_sent and not self.handed_over

    def _roll_back(self, exc: BaseException) -> None:
        """The migration failed: leave the source as it was — unless Complete was already sent.

        **The point of no return is sending Complete.**  Before it, the
        destination never runs the VM, so the source turns dirty logging off
        and resumes the VM if it paused it.  After it, the destination may have
        resumed the VM even though its Ok was lost: resuming here too would run
        one VM twice (over TCP, two diverging copies; locally, two guests on the
        same memfds corrupting each other).  So the VM stays paused, the
        outcome is reported as unknown, and only an operator's explicit
        ``resume`` (after checking the destination) runs it here again.
        """
        if self.handed_over:
            return
        try:
            self.vm.stop_dirty_log()
        except Exception as stop_error:  # keep the original error; this one is only logged
            log.warning("could not turn dirty logging off: %s", stop_error)
        if self.complete_sent:
            log.error("migration outcome unknown: %s was sent but not acknowledged (%s); the VM may be running "
                      "on the destination, so it stays paused here — resume it only if the destination "
                      "does not have it", "Complete" if self.was_running else "CompletePaused", exc)
            return
        if isinstance(exc, ConvergenceError) and self.channel is not None:
            try:  # a healthy connection: tell the destination to drop its half-built VM
                self._request_ok(p.Request.abandon())
            except ChmigError as abandon_error:
                log.info("the destination did not take the Abandon: %s", abandon_error)
        if self.paused_by_us and self.vm.state == VmState.PAUSED:
            self.on_event("resuming", None)
            self.vm.resume()
            self.on_event("resumed", None)
        log.warning("migration failed, the VM stays here (%s): %s", self.vm.state, exc)


#: The destination drops discarded pages one range at a time (an madvise each) while the VM is paused: the
#: answer to a Discard may take this much longer per range than an answer's usual bound.
DISCARD_S_PER_RANGE = 20e-6


def json_bytes(document: dict) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _ms_since(begin: float) -> float:
    return round((time.monotonic() - begin) * 1000, 3)


def new_stats(options: SendOptions) -> MigrationStats:
    """The statistics of an outgoing migration, before it starts (shown by ``vm.info`` while it runs)."""
    return MigrationStats(role="source", url=options.destination_url, connections=options.connections,
                          mode="local" if options.local else options.memory_mode,
                          downtime_goal_ms=options.downtime_ms)


def send_migration(sender: Sender) -> MigrationStats:
    """Run ``sender`` to the end and record the outcome; the caller retires the VM unless preserve_source."""
    stats = sender.stats
    try:
        sender.run()
    except BaseException as exc:
        if sender.outcome_unknown:
            status = "unknown"
            message = (f"Complete was sent but not acknowledged ({exc}); the VM may be running on the "
                       "destination, so it stays paused here until an operator resumes it")
        elif isinstance(exc, PostcopyUnknown):
            status, message = "unknown", str(exc)
        else:
            status = "cancelled" if isinstance(exc, ConvergenceError) or sender.cancelled else "failed"
            message = str(exc)
        stats.finish(status, message)
        log.warning(stats.summary())
        if sender.outcome_unknown:
            raise MigrationError(message, where="Complete") from exc
        raise
    stats.finish("completed")
    log.info(stats.summary())
    if sender.options.preserve_source:
        log.info("preserve_source=on: the source VM stays here, paused")
    return stats
