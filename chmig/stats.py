"""Migration statistics, like Cloud Hypervisor's migration context: shown in ``vm.info`` and logged."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .units import MiB


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@dataclass
class Iteration:
    """One precopy iteration (0 = everything populated, then dirty pages, last = paused)."""

    iteration: int
    bytes: int
    ranges: int
    duration_ms: float = 0.0
    bandwidth_mib_s: float = 0.0
    #: How fast the guest dirtied memory while the previous iteration ran.
    dirty_rate_mib_s: float = 0.0
    #: How long sending this iteration's bytes would take at the last bandwidth.
    estimated_downtime_ms: float | None = None
    final: bool = False


@dataclass
class Progress:
    """What the sender is doing right now: shown live by ``vm.info`` (``migration.progress``) while it runs.

    The sender updates it in place; readers (the API thread) take a snapshot
    with :meth:`to_json`.  ``iteration_sent`` grows as the bytes of the
    iteration go out (see :meth:`sent`), from whichever memory connection
    carries them, so a progress line moves within a long iteration.
    """

    #: ``precopy`` (an iteration while the VM runs), ``final`` (the paused last iteration), ``state`` (State
    #: and Complete), ``postcopy`` (the destination runs the VM and pulls the rest from here).
    phase: str = "precopy"
    iteration: int = 0
    #: Bytes of the iteration in flight, and how many of them have gone out so far.
    iteration_bytes: int = 0
    iteration_sent: int = 0
    #: Of the last finished iteration (0 before the first one ended).
    bandwidth_mib_s: float = 0.0
    #: How fast the guest dirtied memory while the previous iteration ran.
    dirty_rate_mib_s: float = 0.0
    #: What sending the iteration in flight would cost as downtime, at the last bandwidth (None: unknown yet).
    estimated_downtime_ms: float | None = None

    def __post_init__(self) -> None:
        # Memory workers report bytes concurrently; a lock per piece (each one at least a page, usually MiBs,
        # written by a system call) costs nothing next to the write.
        self._lock = threading.Lock()

    def begin(self, phase: str, iteration: int, iteration_bytes: int, *, dirty_rate_mib_s: float = 0.0,
              estimated_downtime_ms: float | None = None) -> None:
        """A new iteration (or phase) starts: its size, and the estimates it was decided on."""
        with self._lock:
            self.phase = phase
            self.iteration = iteration
            self.iteration_bytes = iteration_bytes
            self.iteration_sent = 0
            self.dirty_rate_mib_s = dirty_rate_mib_s
            self.estimated_downtime_ms = estimated_downtime_ms

    def sent(self, nbytes: int) -> None:
        """``nbytes`` more of the iteration went out (called by the threads that write memory)."""
        with self._lock:
            self.iteration_sent += nbytes

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class MigrationStats:
    """Everything measured about one migration, on either side."""

    role: str  # "source" or "destination"
    mode: str = "precopy"  # precopy | local | postcopy
    url: str = ""
    connections: int = 1
    status: str = "running"  # running | completed | failed | cancelled | abandoned | unknown (see send.py)
    error: str | None = None
    total_time_ms: float = 0.0
    total_bytes: int = 0
    iterations: list[Iteration] = field(default_factory=list)
    #: Source: pause → Complete acknowledged, and its parts.
    downtime_ms: float | None = None
    final_iteration_ms: float | None = None
    state_capture_ms: float | None = None
    send_state_ms: float | None = None
    complete_ms: float | None = None
    #: Destination: State received → restored, and the resume on Complete.
    restore_ms: float | None = None
    resume_ms: float | None = None
    downtime_goal_ms: int | None = None
    #: Hybrid (``memory_mode=hybrid``): when precopy switched to postcopy (ms since the start) and why
    #: (``timeout_s``, ``postcopy_after_s``, ``operator``), the bytes precopy had sent by then, and the pages
    #: discarded at the switch (the destination counts those it dropped).  None: no switch.
    switch_after_ms: float | None = None
    switched_by: str | None = None
    precopy_bytes: int | None = None
    pages_discarded: int | None = None
    #: Postcopy (:class:`chmig.postcopy.PostcopyStats`): faults, the pull, latency, time until whole.
    postcopy: Any = None
    #: While a send runs: what it is doing right now (None before its first iteration and once it ended).
    progress: Progress | None = None
    started_at: float = field(default_factory=time.time)
    _begin: float = field(default_factory=time.monotonic, repr=False)

    def elapsed(self) -> float:
        return time.monotonic() - self._begin

    def finish(self, status: str, error: str | None = None) -> None:
        self.status = status
        self.error = error
        self.total_time_ms = _ms(self.elapsed())

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_begin"}
        data["iterations"] = [asdict(iteration) for iteration in self.iterations]
        data["postcopy"] = self.postcopy.to_json() if self.postcopy is not None else None
        progress = self.progress
        data["progress"] = progress.to_json() if progress is not None and self.status == "running" else None
        if self.status == "running":
            data["total_time_ms"] = _ms(self.elapsed())
        return data

    def summary(self) -> str:
        """The one log line a migration leaves behind."""
        seconds = (self.total_time_ms or _ms(self.elapsed())) / 1000
        head = f"migration ({self.role}, {self.mode}) {self.status} after {seconds:.2f} s"
        if self.error:
            return f"{head}: {self.error}"
        parts = [head]
        if self.downtime_ms is not None:
            goal = f" (goal {self.downtime_goal_ms} ms)" if self.downtime_goal_ms else ""
            parts.append(f"downtime {self.downtime_ms:.1f} ms{goal}")
        if self.iterations:
            parts.append(f"{len(self.iterations)} iterations")
        if self.switch_after_ms is not None:
            parts.append(f"switched to postcopy after {self.switch_after_ms / 1000:.2f} s ({self.switched_by})")
        if self.pages_discarded is not None:
            parts.append(f"{self.pages_discarded} pages discarded")
        mib = self.total_bytes / MiB
        rate = mib / seconds if seconds > 0 else 0.0
        parts.append(f"{mib:.1f} MiB moved ({rate:.0f} MiB/s overall)")
        if self.postcopy is not None:
            parts.append(self.postcopy.summary())
        return ", ".join(parts)
