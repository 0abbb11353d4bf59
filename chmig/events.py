"""``--event-monitor path=FILE|fd=N``: Cloud Hypervisor's event stream, so scripts wait on events, not sleeps.

Cloud Hypervisor (``event_monitor/src/lib.rs``) reports what its VMM does —
``vmm starting``, ``vm booted``, ``vm paused``, ``vm migration-receive-ready``
... — as JSON objects written to a file or an inherited fd, each one
serde_json's pretty printing of::

    {"timestamp": {"secs": S, "nanos": N}, "source": "vm", "event": "paused", "properties": null}

followed by a blank line.  The timestamp is the time since the monitor started
(a Rust ``Duration``), ``properties`` a string→string map or ``null``.  chmig
writes the same bytes (Python's ``json.dumps(indent=2)`` is serde_json's
pretty printer for these values), so a tool written for Cloud Hypervisor's
event file reads chmig's.

Why a thread and a bounded queue: events are emitted from the API thread, the
migration thread and the vCPU owner while they hold locks or sit between two
protocol steps; a slow reader of a FIFO must never stall any of them.  So
:meth:`EventMonitor.emit` only formats the event and appends it to a bounded
queue (it never blocks and never raises), and one named thread
(``event-monitor``, as in Cloud Hypervisor) writes.  A full queue or a failed
write loses events — logged once — but never the VMM.  Like Cloud Hypervisor,
the file is made non-blocking; the writer waits for a full pipe with
``select`` on it and on a wake-up pipe, so :meth:`EventMonitor.close` can
always end it.

Every event is also logged (``INFO``), with or without a monitor, as Cloud
Hypervisor logs ``Event: source = ... event = ...``.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import logging
import os
import select
import threading
import time
from typing import Callable, Mapping

from .errors import StuckThreadError, UsageError
from .options import OptionError, OptionParser
from .threads import ThreadGroup

log = logging.getLogger(__name__)

#: Events waiting for the writer before new ones are dropped (Cloud Hypervisor's channel is unbounded; a
#: reader that stopped reading must not make this process grow without end).
QUEUE_LIMIT = 4096

#: How long :meth:`EventMonitor.close` lets the writer finish what is queued before it gives up on a reader
#: that does not read (a FIFO nobody drains).
CLOSE_TIMEOUT_S = 5.0

#: What emitters outside the VMM (the sender, the receiver) are given: ``hook(event, properties)`` for a
#: ``"vm"`` event.  They never import the VMM, and a caller that passes none gets :func:`no_events`.
EventHook = Callable[[str, "Mapping[str, str] | None"], None]


def no_events(event: str, properties: Mapping[str, str] | None = None) -> None:
    """The :data:`EventHook` of a migration nobody watches (tests, fuzzers driving a Sender directly)."""


def format_event(elapsed_ns: int, source: str, event: str, properties: Mapping[str, str] | None) -> bytes:
    """One event exactly as Cloud Hypervisor writes it: serde_json's pretty JSON, then a blank line."""
    secs, nanos = divmod(max(0, elapsed_ns), 1_000_000_000)
    document = {
        "timestamp": {"secs": secs, "nanos": nanos},
        "source": source,
        "event": event,
        "properties": None if properties is None else {str(k): str(v) for k, v in properties.items()},
    }
    # serde_json writes UTF-8 as is (no \u escapes) and indents by two spaces, with ": " and no trailing
    # spaces: what json.dumps gives with indent=2 and ensure_ascii=False.
    text = json.dumps(document, indent=2, ensure_ascii=False)
    return text.encode("utf-8", errors="replace") + b"\n\n"


def parse_event_monitor(spec: str) -> tuple[str | None, int | None]:
    """``path=FILE`` or ``fd=N`` (Cloud Hypervisor's rules) → (path, fd); ``fd`` wins when both are given.

    A bare value (``--event-monitor /tmp/events``) is refused naming both
    forms: Cloud Hypervisor refuses it too (its parser sees an unknown option).
    """
    what = "--event-monitor"
    parser = OptionParser(what).add("path").add("fd")
    try:
        parser.parse(spec)
    except OptionError as exc:
        if exc.key and "=" not in spec:
            raise UsageError(f"path or fd required (path=FILE or fd=N), got {spec!r}", where=what) from None
        raise
    if parser.is_set("fd"):
        fd = parser.integer("fd", minimum=0, maximum=2**31 - 1)
        if fd is None:
            raise UsageError("fd= needs a file descriptor number (fd=N)", where=what)
        return None, fd
    if parser.is_set("path"):
        path = parser.get("path")
        if not path:
            raise UsageError("path= needs a file name (path=FILE)", where=what)
        return path, None
    raise UsageError("path or fd required (path=FILE or fd=N)", where=what)


class EventMonitor:
    """Where the VMM's events go: a file or an inherited fd, written by one owned thread; or nowhere.

    ``EventMonitor()`` is the null monitor (events are only logged), so every
    part of the VMM emits without checking whether anyone listens.
    :meth:`open` builds one from the ``--event-monitor`` value.
    """

    def __init__(self, fd: int | None = None, *, owns_fd: bool = True, name: str = "") -> None:
        self.name = name
        self._fd = fd
        self._owns_fd = owns_fd
        #: The monitor's start: every timestamp is the time since then (Cloud Hypervisor's ``Instant``).
        self._start_ns = time.monotonic_ns()
        self._cond = threading.Condition()
        self._pending: collections.deque[bytes] = collections.deque()
        self._closing = False
        self._dropped = 0
        self._broken = False
        self.threads = ThreadGroup("event-monitor")
        self._wake_r = self._wake_w = -1
        if fd is not None:
            # The fd stays blocking: O_NONBLOCK belongs to the open file description, which an inherited fd
            # shares with others (``fd=3 3>&1`` is standard output too).  The writer waits in poll instead
            # (see _write), where close() can wake it.
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def start(self) -> EventMonitor:
        """Start the writer thread (events emitted before wait for it); nothing to start without a file."""
        if self._fd is not None:
            self.threads.start("event-monitor", self._writer, self._fd, stopper=self._abort)
        return self

    @classmethod
    def open(cls, spec: str | None) -> EventMonitor:
        """The monitor ``--event-monitor spec`` asks for (``None``: the null monitor).

        ``path=FILE`` is created or truncated, as Cloud Hypervisor opens it (a
        FIFO blocks here until its reader opens it: a script reading events is
        then sure to see the first one).  ``fd=N`` must be an open, writable
        descriptor this process inherited; the monitor owns it from now on.
        """
        if spec is None:
            return cls()
        path, fd = parse_event_monitor(spec)
        if fd is not None:
            try:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            except OSError:
                raise UsageError(f"fd={fd} is not an open file descriptor", where="--event-monitor") from None
            if flags & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
                raise UsageError(f"fd={fd} is not open for writing", where="--event-monitor")
            # Standard output or error stay open for the rest of the process (the CLI still prints there).
            return cls(fd, owns_fd=fd > 2, name=f"fd={fd}").start()
        assert path is not None
        try:
            opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise UsageError(f"cannot open {path}: {exc.strerror}", where="--event-monitor") from None
        try:
            return cls(opened, name=path).start()
        except BaseException:
            os.close(opened)
            raise

    @property
    def active(self) -> bool:
        """Whether events go anywhere beyond the log."""
        return self._fd is not None

    def emit(self, source: str, event: str, properties: Mapping[str, str] | None = None) -> None:
        """Report ``source``/``event``; never blocks, never raises (a lost event is logged, once)."""
        try:
            elapsed = time.monotonic_ns() - self._start_ns
            if properties:
                shown = ", ".join(f"{key} = {value}" for key, value in properties.items())
                log.info("Event: source = %s event = %s %s", source, event, shown)
            else:
                log.info("Event: source = %s event = %s", source, event)
            if self._fd is None:
                return
            data = format_event(elapsed, source, event, properties)
            with self._cond:
                if self._closing:
                    log.debug("event %s/%s after the monitor closed: not written", source, event)
                    return
                if len(self._pending) >= QUEUE_LIMIT:
                    self._dropped += 1
                    if self._dropped == 1:
                        log.warning("event monitor %s: %d events are waiting for the reader; dropping new ones",
                                    self.name, QUEUE_LIMIT)
                    return
                self._pending.append(data)
                self._cond.notify()
        except Exception:  # an event must never break what it reports on
            log.exception("event %s/%s could not be reported", source, event)

    # -- the writer thread ------------------------------------------------------------------------------

    def _writer(self, fd: int) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:  # closing, and everything is written
                    return
                data = self._pending.popleft()
            if self._broken:
                continue  # drained without writing, so close() does not wait for a dead file
            if not self._write(fd, data):
                return

    def _write(self, fd: int, data: bytes) -> bool:
        """Write all of ``data``; False when aborted.  A write error is logged once and the file given up.

        Each write waits in poll until the file takes more (a pipe whose reader is behind) or until close()
        gives up on it, then writes at most ``PIPE_BUF`` bytes: a pipe that polls writable takes that many
        without blocking, so the writer never sleeps where close() cannot wake it.
        """
        view = memoryview(data)
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        poller.register(self._wake_r, select.POLLIN)
        while view:
            try:
                ready = dict(poller.poll())
                if ready.get(self._wake_r):
                    return False
                events = ready.get(fd, 0)
                if not events & select.POLLOUT:  # nothing else wakes poll for fd: it failed or hung up
                    code = errno.EBADF if events & select.POLLNVAL else errno.EPIPE
                    raise OSError(code, os.strerror(code))
                written = os.write(fd, view[:select.PIPE_BUF])
                view = view[written:]
            except InterruptedError:
                continue
            except OSError as exc:
                self._broken = True
                reason = "its reader went away" if exc.errno == errno.EPIPE else exc.strerror
                log.warning("event monitor %s: cannot write events (%s); no more events are written",
                            self.name, reason)
                return True
        return True

    def _abort(self) -> None:
        """Wake a writer waiting for a full pipe: close() gave up on its reader."""
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:  # the pipe is full: the writer is being woken already
                pass

    # -- the end ----------------------------------------------------------------------------------------

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Write what is queued (by ``timeout``), end the writer thread, and close the file (idempotent)."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        if self._fd is None:
            return
        stuck: list[str] = []
        try:
            if self.threads.wait(timeout):  # (nothing to wait for if start() was never called)
                with self._cond:
                    lost = len(self._pending) + 1
                log.warning("event monitor %s: the reader took no events for %g s; %d not written",
                            self.name, timeout, lost)
            self.threads.close(timeout=2)
        except StuckThreadError as exc:
            stuck = self.threads.alive()
            log.error("event monitor: %s", exc)
        finally:
            if self._dropped:
                log.warning("event monitor %s: %d events were dropped (the reader was behind)", self.name,
                            self._dropped)
            if not stuck:  # a writer still inside write() must not find its fd reused by another file
                if self._owns_fd:
                    os.close(self._fd)
                os.close(self._wake_r)
                os.close(self._wake_w)
            self._fd = None
