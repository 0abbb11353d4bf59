"""Migration statistics, like Cloud Hypervisor's migration context: shown in ``vm.info`` and logged."""

from __future__ import annotations

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
    #: Postcopy (:class:`chmig.postcopy.PostcopyStats`): faults, the pull, latency, time until whole.
    postcopy: Any = None
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
        mib = self.total_bytes / MiB
        rate = mib / seconds if seconds > 0 else 0.0
        parts.append(f"{mib:.1f} MiB moved ({rate:.0f} MiB/s overall)")
        if self.postcopy is not None:
            parts.append(self.postcopy.summary())
        return ", ".join(parts)
