"""Owned threads: every thread has a name, an owner that stops and joins it, and a deadline.

A :class:`ThreadGroup` belongs to one owner (a migration, an acceptor, the
VMM).  The owner starts threads through it, each with a *stopper*: how to make
that thread return — set an event, shut a socket down, abort a listener, close
an fd.  :meth:`ThreadGroup.close` calls every stopper and joins every thread
by one deadline.  A thread still alive after it is *reported* — logged and
raised as :class:`~chmig.errors.StuckThreadError` naming it — never silently
left behind.  No constructor in chmig starts a thread; owners call ``start``.

Threads are daemon threads so that a stuck one, once reported, cannot also
keep the process from exiting.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from .errors import StuckThreadError

log = logging.getLogger(__name__)

Stopper = Callable[[], None]


class ThreadGroup:
    """Threads started, stopped and joined together by one owner."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: Set by :meth:`stop`; threads that loop can wait on it instead of sleeping.
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stoppers: list[Stopper] = []

    def start(self, name: str, target: Callable[..., Any], *args: Any, stopper: Stopper | None = None) -> threading.Thread:
        """Start ``target(*args)`` in a thread called ``name``; ``stopper`` makes it return."""
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            if self.stopping.is_set():
                raise RuntimeError(f"{self.name}: cannot start {name}: the group is stopping")
            # Started under the lock, so wait() never sees a thread that is listed but not yet started.
            thread.start()
            # Forget the ones that ended: a long-lived group (an acceptor) must not grow per connection.
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            if stopper is not None:
                self._stoppers.append(stopper)
        return thread

    def add_stopper(self, stopper: Stopper) -> None:
        """One more way to stop the group (e.g. a connection opened before its thread starts)."""
        with self._lock:
            self._stoppers.append(stopper)
        if self.stopping.is_set():
            _call(stopper, self.name)

    def release(self, stopper: Stopper) -> None:
        """Forget ``stopper``: what it would stop was handed to another owner (e.g. a Fault connection)."""
        with self._lock:
            if stopper in self._stoppers:
                self._stoppers.remove(stopper)

    def alive(self) -> list[str]:
        """Names of the threads still running."""
        with self._lock:
            return [t.name for t in self._threads if t.is_alive()]

    def stop(self) -> None:
        """Tell every thread to stop (idempotent; does not wait)."""
        self.stopping.set()
        with self._lock:
            stoppers = list(self._stoppers)
        for stopper in stoppers:
            _call(stopper, self.name)

    def wait(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds for the threads to end by themselves; return those still running."""
        deadline = time.monotonic() + timeout
        current = threading.current_thread()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            if thread is not current:
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
        return [t.name for t in threads if t.is_alive() and t is not current]

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for every thread; raise StuckThreadError naming any left."""
        stuck = self.wait(timeout)
        if stuck:
            message = f"{len(stuck)} thread(s) did not stop within {timeout:g} s: {', '.join(stuck)}"
            log.error("%s: %s", self.name, message)
            raise StuckThreadError(message, where=self.name)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every thread and join them by one deadline (raises StuckThreadError as :meth:`join`)."""
        self.stop()
        self.join(timeout)


def _call(stopper: Stopper, group: str) -> None:
    try:
        stopper()
    except Exception as exc:  # a stopper of an already-closed resource: nothing left to stop
        log.debug("%s: stopper %r: %s", group, stopper, exc)
