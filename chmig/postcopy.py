"""Postcopy on the destination: the VM runs at once, and its memory follows.

Sequence (Cloud Hypervisor's postcopy, with chmig's pull)::

    Source                                          Destination
      |--- Start, Config --------------------------->|  builds the VM; its RAM stays empty
      |    pause (no memory is sent)                 |
      |=== Fault connections (role Fault) ==========>|  handed to the migration (``fault_tx``)
      |--- State ----------------------------------->|  userfaultfd on all RAM, then restore
      |--- Complete -------------------------------->|  vCPUs run; each first touch faults
      |<== PageFault page ============== fault-0 ====|  a guest fault: one page, urgent
      |=== Ok 4096, the page =======================>|  UFFDIO_COPY wakes the vCPU
      |<== PageFault 1 MiB ============= fault-1 ====|  the pull: pages nobody asked for yet
      |=== Ok 1 MiB, the bytes =====================>|  UFFDIO_COPY (pages already there are kept)
      |    ...                                       |
      |<== every Fault connection closed ============|  every page present: the VM is whole
      source retires its VM                          userfaultfd unregistered

Two pools of connections
------------------------
Cloud Hypervisor's handler is one thread on one Fault connection that asks
for one 4 KiB page per idle loop turn; a guest fault waits behind that
traffic, and pulling 1 GiB takes 262,144 round trips.  chmig pulls the
missing pages in ranges of ``prefetch`` bytes (256 KiB to 2 MiB), and with two
or more Fault connections keeps the first (``fault-0``) for the guest's urgent
faults only, while the others stream ranges concurrently.  With one connection
(as from a Cloud Hypervisor source) urgent faults go between ranges.
``prefetch=page`` is Cloud Hypervisor's strategy (the benchmark's baseline);
``prefetch=off`` pulls nothing (the VM is whole once the guest touched every page).

Which pages are present
-----------------------
:class:`PresentPages` has one byte per guest page, set once the page was
copied in.  Nothing else writes guest RAM in postcopy (nothing populates it),
so the bitmap is exactly what the kernel has.  The pull skips present pages;
and ``UFFDIO_COPY`` refuses (EEXIST) to overwrite a page that became present
meanwhile — a page the guest may already have written is never overwritten.

The GIL pitfall
---------------
A Python thread that touches a registered page that is not present yet
blocks in the kernel *with the GIL held*; the fault thread then can never run
to resolve that fault, and the process deadlocks.  So, until a page is
present, only code that releases the GIL may touch it: vCPUs inside
``KVM_RUN``, and kernel-side copies (``recv_into``, ioctls).  Everything else
— ``vm.info``, the guest's counters, capturing state — asks
:meth:`~chmig.memory.GuestMemory.readable` first (the bitmap) and keeps the
values it had when a page is not here yet; a second migration or a snapshot
waits until the VM is whole.  ``tests/test_postcopy.py`` reads ``vm.info`` in
a loop during postcopy to prove it.

Page sources
------------
The pager asks a :class:`PageSource` for pages: a Fault connection
(:class:`~chmig.channel.Channel`, whose ``request_page`` is the PageFault
round trip), or a snapshot file (:class:`chmig.snapshot.FileSource`, Cloud
Hypervisor's ``memory_restore_mode=ondemand`` restore, which checks each
chunk against the snapshot's manifest before it answers).  Only a connection
has a peer that can go away between requests, so only its socket is watched
while it is idle (:func:`watch_fd`).  A source that fails — a source that
died, a corrupt chunk — fails the pager the same way.

When a Fault connection breaks
------------------------------
Once the VM runs here, the source holds the only copy of every page not yet
pulled.  A broken or silent Fault connection (``fault_response_timeout_s``)
fails the pager: it records the reason, and its owner (:mod:`chmig.vmm`) stops
the VM, reports the failure in ``vm.info`` and the log, and ends the process
with a non-zero status.  The source keeps its paused VM and memory.

Unless the migration is recoverable (protocol version 1: the source's Start
carried a token, and ``recovery_s`` > 0): then a broken connection ends the
source's current *attempt* instead — every connection of it is reset and
closed — and the fault thread waits up to ``recovery_s`` for the next one
(FaultRecovery connections that proved the token, :meth:`PostcopyPager.arrive`),
its vCPUs blocked in the kernel meanwhile.  The bitmap says which pages still
live on the source; the faults that were in flight are asked again first, and
the pull walks from the first missing page again.  A source that answered
Error or broke the protocol still fails the pager at once.
"""

from __future__ import annotations

import bisect
import errno
import logging
import math
import os
import random
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from . import protocol as p
from .channel import Channel
from .errors import ChmigError, PostcopyError, ProtocolError, StuckThreadError, TransportError, UffdError, UsageError
from .memory import GuestMemory
from .options import parse_size
from .threads import ThreadGroup
from .units import KiB, MiB, PAGE_SIZE
from . import uffd as u

log = logging.getLogger(__name__)

#: Pull strategies: ranges of ``prefetch`` bytes, Cloud Hypervisor's one page per idle loop, or no pull.
BATCHED, PAGE, OFF = "batched", "page", "off"
#: Fault latencies kept for the percentiles (a uniform sample beyond this many faults).
LATENCY_SAMPLES = 65536


@dataclass(frozen=True)
class Prefetch:
    """How the destination pulls the pages no fault asked for (``prefetch=`` option)."""

    strategy: str = BATCHED
    #: The size of each background PageFault range (one page for ``page``).
    range_bytes: int = p.PREFETCH_DEFAULT_BYTES

    @classmethod
    def parse(cls, text: str | None) -> Prefetch:
        """``page``, ``off``, or a size from 256K to 2M (``1M``, ``524288``)."""
        if text is None or text == "":
            return cls()
        value = text.strip().lower()
        if value in (PAGE, OFF):
            return cls(value, PAGE_SIZE)
        try:
            size = parse_size(value.upper(), "prefetch")
        except UsageError:
            raise UsageError(f"prefetch must be page, off or a size from 256K to 2M, got {text!r}") from None
        if not p.PREFETCH_MIN_BYTES <= size <= p.PREFETCH_MAX_BYTES or size % PAGE_SIZE:
            raise UsageError(f"prefetch must be page, off or a page-aligned size from 256K to 2M, got {text!r}")
        return cls(BATCHED, size)

    def __str__(self) -> str:
        return self.strategy if self.strategy != BATCHED else f"{self.range_bytes // KiB}K"


# ---------------------------------------------------------------------------------------------
# Which pages are here
# ---------------------------------------------------------------------------------------------


class PresentPages:
    """One byte per guest page, 1 once the page is present; the pull's cursor walks it.

    Guest RAM may have holes (the 32-bit hole), so each slot has its own run of
    the bitmap.  Marking is done under a lock (the count of present pages must
    be exact); reading is a C-level ``bytearray.find``.
    """

    def __init__(self, regions: list[tuple[int, int]]) -> None:
        """``regions``: ``(gpa, size)`` of every slot, sorted by gpa."""
        self._gpas = [gpa for gpa, _ in regions]
        self._bases: list[int] = []
        self._ends: list[int] = []
        total = 0
        for _, size in regions:
            self._bases.append(total)
            total += size // PAGE_SIZE
            self._ends.append(total)
        self.total = total
        self._bits = bytearray(total)
        self._present = 0
        self._lock = threading.Lock()

    @property
    def present(self) -> int:
        return self._present

    @property
    def missing(self) -> int:
        return self.total - self._present

    @property
    def whole(self) -> bool:
        return self._present == self.total

    def _index(self, gpa: int, length: int) -> tuple[int, int]:
        """The bitmap indexes ``[start, stop)`` of a range that lies in one slot."""
        slot = bisect.bisect_right(self._gpas, gpa) - 1
        if slot < 0:
            raise ProtocolError(f"{gpa:#x} is not guest RAM", where="postcopy")
        start = self._bases[slot] + (gpa - self._gpas[slot]) // PAGE_SIZE
        stop = start + (length + PAGE_SIZE - 1) // PAGE_SIZE
        if stop > self._ends[slot]:
            raise ProtocolError(f"range {gpa:#x}+{length:#x} is not inside one slot of guest RAM", where="postcopy")
        return start, stop

    def is_present(self, gpa: int, length: int = PAGE_SIZE) -> bool:
        start, stop = self._index(gpa, length)
        return self._bits.find(0, start, stop) < 0

    def mark(self, gpa: int, length: int) -> int:
        """Record ``[gpa, gpa+length)`` as present; return how many of its pages were not before."""
        start, stop = self._index(gpa, length)
        with self._lock:
            new = self._bits.count(0, start, stop)
            self._bits[start:stop] = b"\x01" * (stop - start)
            self._present += new
        return new

    def unmark(self, gpa: int, length: int) -> int:
        """Record ``[gpa, gpa+length)`` as missing again (a hybrid migration's discarded pages); return how many
        of its pages were present."""
        start, stop = self._index(gpa, length)
        with self._lock:
            gone = (stop - start) - self._bits.count(0, start, stop)
            self._bits[start:stop] = bytes(stop - start)
            self._present -= gone
        return gone

    def next_missing(self, cursor: int, max_pages: int) -> tuple[p.MemoryRange, int] | None:
        """The first run of missing pages at or after page ``cursor`` (at most ``max_pages``, one slot).

        Returns the range and the cursor after it, or None when no page after
        ``cursor`` is missing.
        """
        start = self._bits.find(0, cursor)
        if start < 0:
            return None
        slot = bisect.bisect_right(self._bases, start) - 1
        limit = min(start + max_pages, self._ends[slot])
        stop = self._bits.find(1, start, limit)
        if stop < 0:
            stop = limit
        gpa = self._gpas[slot] + (start - self._bases[slot]) * PAGE_SIZE
        return p.MemoryRange(gpa, (stop - start) * PAGE_SIZE), stop


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass
class PostcopyStats:
    """What postcopy did, on either side; shown under ``migration.postcopy`` in ``vm.info``."""

    role: str = "destination"
    #: ``batched``, ``page`` or ``off`` (destination), and the size of a background range.
    strategy: str = BATCHED
    prefetch_bytes: int = p.PREFETCH_DEFAULT_BYTES
    fault_connections: int = 0
    #: ``pulling`` (destination) / ``serving`` (source), then ``whole``/``served``, ``failed`` or ``stopped``.
    status: str = "pulling"
    error: str | None = None
    pages_total: int = 0
    #: Pages already here when userfaultfd was registered (none in plain postcopy).
    pages_present_at_start: int = 0
    #: Pages brought in because a guest fault asked for them, and by the background pull.
    pages_faulted: int = 0
    pages_pulled: int = 0
    #: Source: pages answered, over all Fault connections.
    pages_served: int = 0
    #: Fault messages read from userfaultfd (two vCPUs on one page are two).
    faults: int = 0
    #: From State (userfaultfd registered) until every page was present.
    whole_after_ms: float | None = None
    #: Total time vCPUs waited for their faults to be resolved ("postcopy blocktime" in QEMU), measured from
    #: the moment the fault thread read each fault: a lower bound (the time a fault spent queued in the kernel
    #: before that — e.g. behind a pull range on a single connection — is not seen).  The fault latencies are
    #: measured the same way.
    blocktime_ms: float = 0.0
    #: Every postcopy recovery (protocol version 1): on the destination ``attempt``, ``cause``,
    #: ``began_after_ms``, ``duration_ms`` and ``pages_rerequested`` (faults and pull ranges that were in flight
    #: on the broken connections, asked again); on the source ``attempt``, ``cause`` and ``duration_ms``.
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    #: The migration's statistics, whose ``total_bytes`` grows with every page brought in.
    counts_bytes_into: Any = field(default=None, repr=False)
    _latencies_us: list[float] = field(default_factory=list, repr=False)
    _sorted: list[float] | None = field(default=None, repr=False)
    _max_us: float = field(default=0.0, repr=False)
    _random: random.Random = field(default_factory=lambda: random.Random(0), repr=False)
    _begin: float = field(default_factory=time.monotonic, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, faulted: int = 0, pulled: int = 0) -> None:
        """Pages that became present through a fault or the pull (threads count concurrently)."""
        with self._lock:
            self.pages_faulted += faulted
            self.pages_pulled += pulled
            if self.counts_bytes_into is not None:
                self.counts_bytes_into.total_bytes += (faulted + pulled) * PAGE_SIZE

    def record_fault(self, latency_s: float) -> None:
        """One fault resolved ``latency_s`` after the fault thread read it.

        The percentiles come from a uniform sample of at most
        :data:`LATENCY_SAMPLES` faults (reservoir sampling): a VM of 64 GiB
        faults millions of times, and ``vm.info`` must stay cheap.  The count,
        the maximum and the blocktime are exact.
        """
        latency_us = latency_s * 1e6
        with self._lock:
            self.faults += 1
            self.blocktime_ms += latency_s * 1000
            self._max_us = max(self._max_us, latency_us)
            if len(self._latencies_us) < LATENCY_SAMPLES:
                self._latencies_us.append(latency_us)
            else:
                slot = self._random.randrange(self.faults)
                if slot < LATENCY_SAMPLES:
                    self._latencies_us[slot] = latency_us
            self._sorted = None

    def latency_us(self) -> dict[str, float]:
        with self._lock:
            if self._sorted is None:
                self._sorted = sorted(self._latencies_us)
            values, most = self._sorted, self._max_us
        return {"p50": round(percentile(values, 0.50), 1), "p90": round(percentile(values, 0.90), 1),
                "p99": round(percentile(values, 0.99), 1), "max": round(most, 1)}

    def recovered(self, **recovery: Any) -> None:
        """One recovery ended (the source reconnected)."""
        with self._lock:
            self.recoveries.append(recovery)

    def became_whole(self) -> None:
        self.whole_after_ms = round((time.monotonic() - self._begin) * 1000, 3)
        self.status = "whole"

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            data = {k: v for k, v in self.__dict__.items() if not k.startswith("_") and k != "counts_bytes_into"}
            data["recoveries"] = [dict(recovery) for recovery in self.recoveries]
        data["blocktime_ms"] = round(self.blocktime_ms, 3)
        if self.role == "destination":
            data["fault_latency_us"] = self.latency_us()
        return data

    def summary(self) -> str:
        if self.role == "source":
            return f"postcopy {self.status}: {self.pages_served} pages served over {self.fault_connections} connections"
        lat = self.latency_us()
        whole = f"whole after {self.whole_after_ms:.0f} ms" if self.whole_after_ms is not None else self.status
        return (f"postcopy {whole}: {self.pages_faulted} pages on demand, {self.pages_pulled} pulled "
                f"({self.strategy}, {self.prefetch_bytes // KiB} KiB ranges, {self.fault_connections} connections); "
                f"fault latency p50 {lat['p50']:.0f} µs, p99 {lat['p99']:.0f} µs, max {lat['max']:.0f} µs; "
                f"vCPUs blocked {self.blocktime_ms:.1f} ms")


# ---------------------------------------------------------------------------------------------
# The pager
# ---------------------------------------------------------------------------------------------


class PageSource(Protocol):
    """Where the pager gets pages: a Fault connection (:class:`~chmig.channel.Channel` is one as it is), or a
    snapshot file (:class:`chmig.snapshot.FileSource`, an on-demand restore).

    ``request_page`` fills ``into`` (exactly ``page.length`` bytes) and returns
    how many bytes came inline, or returns 0 when the source wrote the page
    into memory it shares with this VM; it raises to fail the pager.
    ``reset`` must make a thread blocked in ``request_page`` return (it is
    the thread's stopper), and say "not a clean end" to a peer; ``close``
    releases the source.
    """

    name: str

    def request_page(self, page: p.MemoryRange, into: memoryview | None) -> int: ...

    def set_timeout(self, seconds: float | None) -> None: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


def watch_fd(source: PageSource) -> int | None:
    """The fd the fault thread watches while ``source`` is idle, or None when nothing can happen on it unasked.

    A Fault connection has a peer that may die or misbehave between requests:
    its socket is watched (:func:`_unasked`).  A file has no peer.
    """
    return source.conn.fileno() if isinstance(source, Channel) else None


def _names_its_connection(source: PageSource | None, exc: BaseException) -> bool:
    """Whether a failure's message should be prefixed with the Fault connection it came from.

    PostcopyErrors name their connection already; a source that is not a
    connection (a snapshot file) raises errors that name the file.
    """
    return isinstance(source, Channel) and not isinstance(exc, PostcopyError)


class SourceLost(PostcopyError):
    """A Fault connection broke (closed, reset, silent too long) — not a source that broke the protocol.  With
    recovery (protocol version 1) the pager then waits for the source to reconnect."""


def connection_broke(exc: BaseException) -> bool:
    """Did a Fault connection break, as a cut link breaks it (what recovery is for)?  A source that answered
    Error or sent what the protocol forbids did not: that fails postcopy at once."""
    return isinstance(exc, (SourceLost, TransportError))


#: What the fault thread watches for on an idle Fault connection: the source said something, or went away.
_PEER_SPOKE = select.POLLIN | select.POLLRDHUP


def _unasked(channel: Channel, events: int) -> PostcopyError | None:
    """Why an idle Fault connection became readable (see :meth:`PostcopyPager._fault_loop`); None if it did not
    really (a peek finds nothing to read and no end)."""
    try:
        # The raw socket under TLS too: only "is anything there, or the end" matters here.
        peeked = socket.socket.recv(channel.conn.socket, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        return SourceLost(f"the source's end of {channel.name} failed: {exc.strerror} (did it fail?)",
                          where="postcopy")
    if not peeked:
        return SourceLost(f"the source closed {channel.name} (did it fail?)", where="postcopy")
    return PostcopyError(f"the source sent bytes on {channel.name} that nobody asked for", where="postcopy")


class _PageBuffer:
    """Where one thread receives pages before UFFDIO_COPY puts them in place (pinned: never resized)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.address = u.address_of(self.data)

    def view(self, length: int) -> memoryview:
        return memoryview(self.data)[:length]


class PostcopyPager:
    """Resolves guest faults through the source and pulls the rest; owns the userfaultfd, the page sources
    (Fault connections, or a snapshot file's readers) and its threads.

    Life: :meth:`register` (before State is restored), :meth:`start` (threads),
    then the owner waits in :meth:`wait` until the VM is whole or postcopy
    failed, and calls :meth:`close`.

    Recovery (``recovery_s`` > 0, protocol version 1): when a Fault connection
    breaks (:func:`connection_broke`), the fault thread resets every connection
    of the source's current attempt and waits up to ``recovery_s`` for the
    source to reconnect (:meth:`arrive`, from the listener kept for it); the
    vCPUs that fault meanwhile stay blocked in the kernel.  The first
    connection of the newer attempt resolves the faults that were in flight
    (:attr:`_unresolved`), the others pull; the pull starts over from the first
    missing page.  Only the fault thread adopts connections and ends attempts.
    """

    def __init__(self, memory: GuestMemory, sources: Sequence[PageSource], prefetch: Prefetch = Prefetch(),
                 limits: p.Limits = p.DEFAULT_LIMITS, stats: PostcopyStats | None = None, *,
                 shared_with_source: bool = False, memory_arrived: bool = False, recovery_s: float = 0.0) -> None:
        """``shared_with_source``: the shared zones' memfds came from the peer (MemoryFd), which may answer a
        PageFault by writing the page into them (length 0; MINOR mode, ``UFFDIO_CONTINUE``).
        ``memory_arrived``: some pages came before State (hybrid): find out which are present.
        ``recovery_s``: how long to wait for a source whose connections broke to reconnect (0: fail at once)."""
        if not sources:
            raise PostcopyError("postcopy needs at least one page source (a Fault connection)", where="postcopy")
        self.memory = memory
        # Cloud Hypervisor's strategy uses one connection, as Cloud Hypervisor does; the others stay unused.
        self.sources = list(sources[:1]) if prefetch.strategy == PAGE else list(sources)
        self.unused = list(sources[1:]) if prefetch.strategy == PAGE else []
        self.prefetch = prefetch
        self.limits = limits
        self.stats = stats if stats is not None else PostcopyStats()
        self.stats.strategy = prefetch.strategy
        self.stats.prefetch_bytes = prefetch.range_bytes
        self.stats.fault_connections = len(self.sources)
        self.present = PresentPages(memory.ram_ranges())
        self.stats.pages_total = self.present.total
        self.shared_with_source = shared_with_source
        self.memory_arrived = memory_arrived
        self.uffd: u.Userfaultfd | None = None
        self.threads = ThreadGroup("postcopy")
        #: Set once the VM is whole, or postcopy failed or was stopped.
        self.done = threading.Event()
        self.error: str | None = None
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        #: Fault connections nobody uses any more wait here for the fault thread to watch them (``_idle_fd``).
        self._idle: list[PageSource] = []
        self._idle_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._cursor = 0
        self._cursor_lock = threading.Lock()
        self._end_lock = threading.Lock()
        self._closed = False
        # Host address → guest address, for the fault addresses userfaultfd reports.
        spans = sorted((r.host_address, r.size, r.gpa, r.zone.config.shared) for r in memory.regions)
        self._host_starts = [span[0] for span in spans]
        self._spans = spans
        self.recovery_s = recovery_s
        #: The connections of the source's current attempt (0: the first ones; a recovery's are 1, 2, …).
        self._live: list[PageSource] = list(self.sources)
        self._attempt = 0
        #: Recovery connections handed over by the listener (:meth:`arrive`), with their attempt; the fault thread
        #: takes them (``_arrival_fd``).  A pull thread whose connection broke says so the same way (``_lost``).
        self._arrivals: list[tuple[int, Channel]] = []
        self._lost: str | None = None
        self._arrival_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        #: The fault thread's pages not resolved yet: (host page, waiting vCPUs, minor); asked again after a
        #: recovery.  Only the fault thread touches it.
        self._unresolved: list[tuple[int, int, bool]] = []
        self._unresolved_read_at = 0.0
        #: Pages of the pull ranges in flight, per source (re-requested if their connection breaks).
        self._pulling: dict[int, int] = {}
        #: Sources a pull thread uses (it closes them when it leaves them); the fault thread owns the others.
        self._pullers: set[int] = set()
        #: Whatever keeps the listener for recovering sources (closed with the pager).
        self.recovery_listener: Any = None

    # -- set-up --------------------------------------------------------------------------------

    def register(self) -> None:
        """Register every slot with userfaultfd, before State.

        MISSING mode everywhere; MINOR too on shared memory whose memfd the
        peer holds (it may write pages into it).  Never MINOR otherwise: a
        page of our own memfd that the kernel reclaimed would come back as a
        minor fault on a page the bitmap calls present.
        """
        for source in self.unused:
            source.close()
        shared = any(zone.config.shared for zone in self.memory.zones.values())
        minor = shared and self.shared_with_source
        features = (u.UFFD_FEATURE_MISSING_SHMEM if shared else 0) | (u.UFFD_FEATURE_MINOR_SHMEM if minor else 0)
        self.uffd = u.Userfaultfd(features)
        for host, size, gpa, is_shared in self._spans:
            mode = u.UFFDIO_REGISTER_MODE_MISSING | (u.UFFDIO_REGISTER_MODE_MINOR if is_shared and minor else 0)
            self.uffd.register(host, size, mode)
        if self.memory_arrived:
            # Pages that came before State (hybrid precopy→postcopy) never fault.  Only then: an unreadable
            # pagemap reads as "all present", which must never make an empty VM whole.
            for rng in self.memory.populated_table(strict=True):
                for gpa, length in self.memory.split(rng):
                    self.present.mark(gpa, length)
        self.stats.pages_present_at_start = self.present.present
        self.memory.present = self.present
        for source in self.sources:
            source.set_timeout(self.limits.fault_response_timeout_s)
        log.info("postcopy: userfaultfd on %d MiB of guest RAM (%d pages missing), %d page source(s) (%s), "
                 "prefetch %s", self.memory.total_size // MiB, self.present.missing, len(self.sources),
                 ", ".join(source.name for source in self.sources), self.prefetch)

    def start(self) -> None:
        """Start the fault thread (and the pull threads); from now on faults are resolved."""
        self.stats._begin = time.monotonic()
        if self.present.whole:
            self._became_whole()
            return
        urgent, *pullers = self.sources
        pull_on_urgent = not pullers and self.prefetch.strategy != OFF
        if self.prefetch.strategy == OFF:
            self._idle.extend(pullers)  # never used: watched from the start
        else:
            with self._cursor_lock:  # before any thread runs: a recovery must know who closes what
                self._pullers.update(id(source) for source in pullers)
        try:
            self.threads.start("postcopy-faults", self._fault_loop, urgent, pull_on_urgent, stopper=urgent.reset)
            if self.prefetch.strategy != OFF:
                for source in pullers:
                    self.threads.start(f"postcopy-pull-{source.name}", self._pull_loop, source,
                                       stopper=source.reset)
        except RuntimeError:
            # A thread already started has failed, and stopping the group refused the rest: the pager has
            # ended with that failure (``error``), which its owner handles like any other.
            if not self.done.is_set():
                raise

    # -- addresses -----------------------------------------------------------------------------

    def _locate(self, host: int) -> tuple[int, bool]:
        """The guest address of a host address inside guest RAM, and whether its memory is shared."""
        index = bisect.bisect_right(self._host_starts, host) - 1
        if index >= 0:
            start, size, gpa, shared = self._spans[index]
            if host < start + size:
                return gpa + (host - start), shared
        raise PostcopyError(f"userfaultfd reported a fault at {host:#x}, outside guest RAM", where="postcopy")

    def _host_of(self, gpa: int) -> tuple[int, bool]:
        region = self.memory.region_of(gpa, PAGE_SIZE)
        return region.host_address + (gpa - region.gpa), region.zone.config.shared

    # -- the threads ---------------------------------------------------------------------------

    def _fault_loop(self, source: PageSource, pull_too: bool) -> None:
        """The fault thread: resolve every guest fault through ``source``; with one connection, pull between.

        With recovery, a broken connection makes it wait for the source's next attempt and go on over that.
        """
        # Sized for a pull range whatever ``pull_too`` says: after a recovery this may be the only connection.
        buffer = _PageBuffer(self.prefetch.range_bytes)
        current: PageSource | None = source
        try:
            while current is not None:
                try:
                    self._serve_faults(current, buffer, pull_too)
                    return
                except BaseException as exc:
                    if not (self.recovery_s and isinstance(current, Channel) and connection_broke(exc)):
                        raise
                    current = None  # given up: a failure from here on is the recovery's, not this connection's
                    recovered = self._recover(exc)
                    if recovered is None:  # stopped meanwhile
                        return
                    current, pull_too = recovered
        except BaseException as exc:  # the pager fails; its owner stops the VM
            self._fail(exc, current)

    def _serve_faults(self, source: PageSource, buffer: _PageBuffer, pull_too: bool) -> None:
        """Resolve faults over ``source`` (first those a broken connection left unresolved) until the VM is whole
        or the pager stops; raise when ``source`` or another connection of its attempt broke."""
        assert self.uffd is not None
        poller = select.poll()
        poller.register(self.uffd.fileno(), select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        poller.register(self._idle_fd, select.POLLIN)
        poller.register(self._arrival_fd, select.POLLIN)
        # Fault connections with no request in flight: the source must stay silent on them, so anything
        # readable there means it closed (it died) or broke the protocol.  This is how a dead source is
        # noticed while the guest does not fault and nothing is pulled.
        idle: dict[int, Channel] = {}
        pulling = pull_too
        if self._unresolved:  # a recovery: the faults that were in flight are asked again first
            self._resolve_unresolved(source, buffer)
        for idle_source in [source, *self._idle_sources(take=True)]:
            self._watch_idle(poller, idle, idle_source)
        while not self.done.is_set():
            # Poll without waiting while there is something to pull, so faults still go first.
            ready = dict(poller.poll(0 if pulling else None))
            if ready.get(self._stop_fd):
                return
            if ready.get(self._arrival_fd):
                os.eventfd_read(self._arrival_fd)
                if self._lost is not None:
                    raise SourceLost(self._lost, where="postcopy")
                if self._adopt_more(source):
                    pulling = False  # a pull thread of its own pulls now: this connection is for faults
            if ready.get(self._idle_fd):
                os.eventfd_read(self._idle_fd)
                for idle_source in self._idle_sources(take=True):
                    self._watch_idle(poller, idle, idle_source)
            for fd, idle_source in list(idle.items()):
                if ready.get(fd):
                    problem = _unasked(idle_source, ready[fd])
                    if problem is not None:
                        raise problem
                    # Readable with nothing there: do not spin on it (the requests on it still fail
                    # cleanly if the source is gone).
                    log.warning("postcopy: %s polled readable (events %#x) with nothing to read: no longer "
                                "watched", idle_source.name, ready[fd])
                    poller.unregister(fd)
                    del idle[fd]
            faults = self.uffd.read_faults()
            if faults:
                self._resolve(source, buffer, faults, time.monotonic())
            elif pulling:
                pulling = self._pull_one(source, buffer)

    # -- recovery (protocol version 1) -----------------------------------------------------------

    def arrive(self, attempt: int, channel: Channel) -> None:
        """A FaultRecovery connection whose token was right (from the listener's thread): the fault thread
        adopts it if its attempt is the newest."""
        channel.set_timeout(self.limits.fault_response_timeout_s)
        with self._cursor_lock:
            taken = not self.done.is_set()
            if taken:
                self._arrivals.append((attempt, channel))
        if not taken:
            log.info("postcopy: %s came after the end; closed", channel.name)
            channel.close()
            return
        os.eventfd_write(self._arrival_fd, 1)

    @staticmethod
    def _close_stale(channel: Channel, attempt: int) -> None:
        log.info("postcopy: %s belongs to an older attempt (%d); closed", channel.name, attempt)
        channel.close()

    def _take_arrivals(self) -> list[tuple[int, Channel]]:
        with self._cursor_lock:
            arrivals, self._arrivals = self._arrivals, []
        return arrivals

    def _adopt_more(self, urgent: PageSource) -> bool:
        """Arrivals while connections work: more of the current attempt pull; a newer attempt means the source
        found its connections broken before this side did (it replaced them all): recover now.  True when a
        pull thread started."""
        arrivals = self._take_arrivals()
        newest = max((attempt for attempt, _ in arrivals), default=0)
        if newest > self._attempt:
            with self._cursor_lock:
                self._arrivals[:0] = arrivals  # for _recover to adopt
            os.eventfd_write(self._arrival_fd, 1)
            raise SourceLost(f"the source reconnected (attempt {newest}): it found its connections broken",
                             where="postcopy")
        started = False
        for attempt, channel in arrivals:
            if attempt < self._attempt:
                self._close_stale(channel, attempt)
            else:
                started |= self._add_puller(channel)
        return started

    def _add_puller(self, channel: Channel) -> bool:
        """One more connection of the current attempt: it pulls (or, with no pull, is only watched).  True when
        a pull thread started on it."""
        if self.prefetch.strategy == PAGE:  # Cloud Hypervisor's strategy: one connection
            log.info("postcopy: %s not needed (prefetch=page uses one connection); closed", channel.name)
            channel.close()
            return False
        with self._cursor_lock:
            self._live.append(channel)
            self.sources.append(channel)
        if self.prefetch.strategy == OFF:
            self._hand_to_fault_thread(channel)
            return False
        with self._cursor_lock:
            self._pullers.add(id(channel))
        try:
            self.threads.start(f"postcopy-pull-{channel.name}", self._pull_loop, channel, stopper=channel.reset)
        except RuntimeError:  # stopping: close() resets and closes it with the others
            with self._cursor_lock:
                self._pullers.discard(id(channel))
            return False
        return True

    def _recover(self, exc: BaseException) -> tuple[Channel, bool] | None:
        """Every connection of the current attempt is given up; wait (at most ``recovery_s``) for the source's
        next attempt.  Returns its first connection (urgent faults) and whether it must pull too, or None if the
        pager was stopped meanwhile; raises PostcopyError at the deadline."""
        with self._cursor_lock:
            broken, self._live = self._live, []
            self._idle.clear()
            self._lost = None
            self._cursor = 0  # the pull ranges in flight are missing still: walk from the start again
            rerequested = len(self._unresolved) + sum(self._pulling.values())
            self._pulling.clear()
            mine = [source for source in broken if id(source) not in self._pullers]
        for source in broken:
            source.reset()  # the source's end breaks too: it reconnects all of them, as one attempt
        for source in mine:
            # Closed now, so that the reset reaches the source even on a connection it still thinks works (its
            # side may see nothing wrong: a stall this side timed out).  A pull thread closes its own.
            source.close()
        began = time.monotonic()
        cause = exc.message if isinstance(exc, ChmigError) else repr(exc)
        self._set_status("recovering")
        log.warning("postcopy: %s; waiting up to %g s for the source to reconnect (postcopy_recovery_s), %d "
                    "page(s) to ask again; faulting vCPUs wait", cause, self.recovery_s, rerequested)
        poller = select.poll()
        poller.register(self._stop_fd, select.POLLIN)
        poller.register(self._arrival_fd, select.POLLIN)
        deadline = began + self.recovery_s
        while True:
            # Arrivals queued before this wait (their wake-up may have been taken with the break's) come first.
            arrivals = self._take_arrivals()
            if not arrivals:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise PostcopyError(f"{cause}, and the source did not reconnect within {self.recovery_s:g} s "
                                        "(postcopy_recovery_s)", where="postcopy")
                ready = dict(poller.poll(remaining * 1000))
                if ready.get(self._stop_fd) or self.done.is_set():
                    return None
                if ready.get(self._arrival_fd):
                    os.eventfd_read(self._arrival_fd)
                continue
            if self.done.is_set():
                for _, channel in arrivals:
                    channel.close()
                return None
            newest = max((attempt for attempt, _ in arrivals), default=0)
            for attempt, channel in arrivals:
                if attempt < newest or attempt <= self._attempt:
                    self._close_stale(channel, attempt)
            if newest <= self._attempt:
                continue
            first, *more = [channel for attempt, channel in arrivals if attempt == newest]
            self._attempt = newest
            with self._cursor_lock:
                self._live = [first]
                self.sources.append(first)
            self.threads.add_stopper(first.reset)  # it serves the fault thread now, which stop() must wake
            pull_threads = [self._add_puller(channel) for channel in more]
            duration = time.monotonic() - began
            self._set_status("pulling")
            self.stats.recovered(attempt=newest, cause=cause,
                                 began_after_ms=round((began - self.stats._begin) * 1000, 1),
                                 duration_ms=round(duration * 1000, 1), pages_rerequested=rerequested)
            log.info("postcopy: recovered over %s (attempt %d) after %.0f ms; asking again for %d page(s)",
                     first.name, newest, duration * 1000, rerequested)
            return first, not any(pull_threads) and self.prefetch.strategy != OFF

    def _set_status(self, status: str) -> None:
        """``recovering`` / ``pulling`` — never over the end's ``whole``, ``failed`` or ``stopped``."""
        with self._end_lock:
            if not self.done.is_set():
                self.stats.status = status

    def _connection_lost(self, source: PageSource, exc: BaseException) -> bool:
        """A pull thread's connection broke: with recovery, tell the fault thread (True); the thread ends."""
        if not (self.recovery_s and isinstance(source, Channel) and connection_broke(exc)):
            return False
        with self._cursor_lock:
            current = source in self._live
            if current and self._lost is None:
                self._lost = f"{source.name}: {exc}"
        if current:
            os.eventfd_write(self._arrival_fd, 1)  # the fault thread looks at _lost when woken
        else:
            log.debug("postcopy: %s of an earlier attempt ended: %s", source.name, exc)
        return True

    @staticmethod
    def _watch_idle(poller: select.poll, idle: dict[int, Channel], source: PageSource) -> None:
        """Watch an idle source for a peer that speaks unasked (:func:`watch_fd`; only a connection has one)."""
        fd = watch_fd(source)
        if fd is not None and isinstance(source, Channel):
            idle[fd] = source
            poller.register(fd, _PEER_SPOKE)

    def _pull_loop(self, source: PageSource) -> None:
        """A pull thread: stream missing ranges over ``source`` until none is left."""
        buffer = _PageBuffer(self.prefetch.range_bytes)
        try:
            while not self.done.is_set() and self._pull_one(source, buffer):
                pass
        except BaseException as exc:
            if not self._connection_lost(source, exc):
                self._fail(exc, source)
            self._leave(source)
            return
        with self._cursor_lock:
            self._pullers.discard(id(source))
            superseded = source not in self._live
        if superseded:  # a recovery replaced it while it finished its last range
            source.reset()
            source.close()
        else:
            self._hand_to_fault_thread(source)

    def _leave(self, source: PageSource) -> None:
        """A pull thread ends on a failure: if a recovery replaced its connection, the thread closes it (the
        reset then reaches the source); otherwise the pager's end closes it with the others."""
        with self._cursor_lock:
            self._pullers.discard(id(source))
            superseded = self.recovery_s and source not in self._live and not self.done.is_set()
        if superseded:
            source.reset()
            source.close()

    def _hand_to_fault_thread(self, source: PageSource) -> None:
        """Nothing is left to pull over ``source``: the fault thread watches it from now on."""
        with self._cursor_lock:
            self._idle.append(source)
        os.eventfd_write(self._idle_fd, 1)

    def _idle_sources(self, take: bool) -> list[PageSource]:
        with self._cursor_lock:
            # A connection of an earlier attempt was reset on purpose: watching it would report it broken.
            sources = [source for source in self._idle if source in self._live]
            if take:
                self._idle.clear()
        return sources

    def _resolve(self, source: PageSource, buffer: _PageBuffer, faults: list[u.PageFault], read_at: float) -> None:
        """Resolve a batch of faults: each page once, however many vCPUs wait on it."""
        waiting: dict[int, int] = {}
        minor: set[int] = set()
        for fault in faults:
            page = fault.address & ~(PAGE_SIZE - 1)
            waiting[page] = waiting.get(page, 0) + 1
            if fault.minor:
                minor.add(page)
        # Resolved in order, and forgotten only once resolved: what a broken connection leaves is asked again.
        self._unresolved = [(page, count, page in minor) for page, count in waiting.items()]
        self._unresolved.reverse()
        self._unresolved_read_at = read_at
        self._resolve_unresolved(source, buffer)

    def _resolve_unresolved(self, source: PageSource, buffer: _PageBuffer) -> None:
        assert self.uffd is not None
        read_at = self._unresolved_read_at
        while self._unresolved:
            page, count, is_minor = self._unresolved[-1]
            gpa, shared = self._locate(page)
            if is_minor and self.present.is_present(gpa):
                # Ours already, and the kernel unmapped it: only map it again.  A wake alone would bring the
                # same fault back.
                self.uffd.continue_range(page, PAGE_SIZE)
            elif is_minor:
                # In the memfd's page cache, but not known to be whole: the peer may be writing it right now
                # (through its own mapping the page is visible before its bytes are).  Ask the peer, whose
                # answer comes once the page is written, then map it (_fetch: Ok with length 0, CONTINUE).
                self.stats.count(faulted=self._fetch(source, buffer, p.MemoryRange(gpa, PAGE_SIZE), page, shared))
                self._check_whole()
            elif self.present.is_present(gpa):
                # Resolved meanwhile (a pull, another vCPU's fault): make sure the waiter runs.
                self.uffd.wake(page, PAGE_SIZE)
            else:
                self.stats.count(faulted=self._fetch(source, buffer, p.MemoryRange(gpa, PAGE_SIZE), page, shared))
                self._check_whole()
            self._unresolved.pop()
            latency = time.monotonic() - read_at
            for _ in range(count):
                self.stats.record_fault(latency)

    def _pull_one(self, source: PageSource, buffer: _PageBuffer) -> bool:
        """Pull the next missing range over ``source``; False when nothing is left to pull."""
        with self._cursor_lock:
            if self.recovery_s and source not in self._live:
                # A recovery gave this connection up: a range taken now would skip the pull's restart.
                raise SourceLost(f"{source.name} was replaced by the source's next attempt", where="postcopy")
            found = self.present.next_missing(self._cursor, self.prefetch.range_bytes // PAGE_SIZE)
            if found is None:
                return False
            rng, self._cursor = found
            self._pulling[id(source)] = rng.length // PAGE_SIZE
        host, shared = self._host_of(rng.gpa)
        self.stats.count(pulled=self._fetch(source, buffer, rng, host, shared))
        with self._cursor_lock:
            self._pulling.pop(id(source), None)
        self._check_whole()
        return True

    def _fetch(self, source: PageSource, buffer: _PageBuffer, rng: p.MemoryRange, host: int, shared: bool) -> int:
        """One PageFault round trip, then put the bytes in place; return how many pages became present."""
        assert self.uffd is not None
        inline = source.request_page(rng, buffer.view(rng.length))
        if inline:
            self.uffd.copy(host, buffer.address, rng.length)
        elif shared and self.shared_with_source:
            # The peer wrote the page into the shared memfd itself (the offload daemon's on-demand restore).
            try:
                self.uffd.continue_range(host, rng.length)
            except UffdError as exc:
                if getattr(exc, "errno", None) != errno.EFAULT:
                    raise
                raise ProtocolError("the source answered Ok with no bytes (it wrote the page into the shared "
                                    "memory), but the page is not there", where=f"PageFault {rng.gpa:#x}") from None
        else:
            raise ProtocolError("the source answered a PageFault with no bytes, but it does not share this guest "
                                "memory: it cannot have written the page", where=f"PageFault {rng.gpa:#x}")
        return self.present.mark(rng.gpa, rng.length)

    def _check_whole(self) -> None:
        if self.present.whole:
            self._became_whole()

    # -- the end -------------------------------------------------------------------------------

    def _became_whole(self) -> None:
        with self._end_lock:
            if self.done.is_set():
                return
            self.stats.became_whole()
            log.info("postcopy: the VM is whole (%d pages on demand, %d pulled, %.0f ms)",
                     self.stats.pages_faulted, self.stats.pages_pulled, self.stats.whole_after_ms or 0)
            self.done.set()
        os.eventfd_write(self._stop_fd, 1)

    def _fail(self, exc: BaseException, source: PageSource | None = None) -> None:
        """The first failure ends postcopy; later ones (threads woken by the shutdown) are only logged."""
        where = f" on {source.name}" if source is not None else ""
        reason = f"{exc}" if isinstance(exc, ChmigError) else f"internal error: {exc!r}"
        with self._end_lock:
            if self.done.is_set():
                log.debug("postcopy: after the end%s: %s", where, reason)
                return
            named = _names_its_connection(source, exc)
            self.error = f"Fault connection{where}: {reason}" if named else reason
            self.stats.status = "failed"
            self.stats.error = self.error
            self.done.set()
        if not isinstance(exc, ChmigError):
            log.error("postcopy: bug in chmig", exc_info=exc)
        log.error("postcopy failed%s: %s (%d pages were not brought in)", where, reason, self.present.missing)
        os.eventfd_write(self._stop_fd, 1)
        self.threads.stop()

    def stop(self, reason: str) -> None:
        """End postcopy from outside (the VMM shuts down, the migration failed before Complete)."""
        with self._end_lock:
            if self.done.is_set():
                return
            self.error = reason
            self.stats.status = "stopped"
            self.stats.error = reason
            self.done.set()
        os.eventfd_write(self._stop_fd, 1)
        self.threads.stop()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the VM is whole or postcopy failed; True when it ended."""
        return self.done.wait(timeout)

    def close(self) -> None:
        """Join the threads, close the Fault connections (the source then finishes), unregister userfaultfd.

        After a failure the VM must have been stopped first: closing the
        userfaultfd wakes every vCPU still waiting for a page (it would find an
        empty page).
        """
        if self._closed:
            return
        self._closed = True
        if not self.done.is_set():
            self.stop("postcopy was closed before it ended")
        if self.recovery_listener is not None:  # no source reconnects to a pager that ended
            self.recovery_listener.close()
        stuck: StuckThreadError | None = None
        # Whole: the threads end by themselves (the stop eventfd, nothing left to pull); their stoppers would
        # reset the connections, which tells the source something went wrong.
        if self.stats.status != "whole" or self.threads.wait(10):
            try:
                self.threads.close(timeout=10)
            except StuckThreadError as exc:
                stuck = exc
        for source in self.sources:
            if not self.present.whole:
                source.reset()  # not a clean end: the source must not take it for "every page is here"
            source.close()
        for source in self.unused:
            source.close()
        for _, channel in self._take_arrivals():
            channel.close()
        self.memory.present = None if self.present.whole else self.present
        if self.uffd is not None:
            if self.present.whole:
                for host, size, _, _ in self._spans:
                    try:
                        self.uffd.unregister(host, size)
                    except ChmigError as exc:
                        log.warning("postcopy: %s", exc)
            self.uffd.close()
        os.close(self._stop_fd)
        os.close(self._idle_fd)
        os.close(self._arrival_fd)
        if stuck is not None:
            raise stuck
