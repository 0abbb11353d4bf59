"""The postcopy pager (the destination's end of the Fault connections), fuzzed in process against a hostile source.

    python -m fuzz.pager --cases N --seed S [--only INDEX ...]

:class:`chmig.postcopy.PostcopyPager` asks the source for the pages a postcopy
destination does not have yet (``Channel.request_page``) and puts them in
place with userfaultfd.  Each case builds a real guest memory of a few MiB
(one or two zones, each private or shared: one or two slots), one to three
socket pairs as Fault connections ``fault-0`` .. ``fault-2``, and a pager with
a random prefetch (256K, 1M, 2M, an odd page-aligned size, ``page``, sometimes
``off``) and a short ``fault_response_timeout_s``; it registers and starts the
pager, and plays the source on the other ends of the sockets.  Nothing faults
here (there is no vCPU), so the pager is driven by its background pull alone:
that is the surface fuzzed.

The source answers each PageFault request validly (Ok + exactly the range's
bytes, every 8 bytes derived from their own guest address; for shared memory
sometimes Ok with length 0 after writing the pattern into the memfd itself, as
the offload daemon does), except for one mutation per case at one request of
one connection: Error; an invalid or unknown status; Ok with length 0 for
memory it did not write, length ± 1, a huge length; Ok and a short payload then
a close; Ok and part of the payload then silence; a garbage header; silence;
a close (FIN) or a reset (RST) instead of an answer; extra bytes after a valid
answer; a duplicated answer; valid answers sent oddly (trickled in slow
pieces, the header split byte by byte); garbage on, a close or a reset of the
urgent connection that nothing uses here.  Per case it checks:

* every request the pager sends is a well-formed PageFault for a page-aligned,
  non-empty range inside one slot, at most ``prefetch`` bytes, never for a page
  it asked for before; unused connections carry no request at all;
* the pager ends within a bound: whole (every page present, each asked for
  once) if every answer it read was valid, otherwise failed with one clear
  line in ``pager.error`` naming the connection (no newline, at most 1000
  characters, never an internal error or a traceback, and nothing logged as
  a bug).  A pager that watches its idle connections may also fail on bytes
  nobody asked for (extra bytes, a duplicate) or on the idle urgent
  connection closed or spoken on, before it reads them as an answer;
* after :meth:`~chmig.postcopy.PostcopyPager.close` (guest memory is read only
  then: see the GIL pitfall in :mod:`chmig.postcopy`) every page the bitmap
  says is present holds exactly the valid pattern, and every other page holds
  zeros or the pattern: never a byte of a mutated answer;
* no fd is left open and no ``postcopy*`` thread is left running.

One mutation cannot be detected by any destination: a duplicated answer read
as the answer to the *next* request of the same length (a response carries no
address).  The fuzzer knows when that happened; the pages of that next range
may then hold the duplicated bytes, and the case counts as "duplicate
accepted" in the summary, not as a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import random
import re
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from chmig import protocol as p
from chmig.channel import Channel
from chmig.memory import GuestMemory, ZoneConfig
from chmig.postcopy import OFF, PAGE as PAGE_STRATEGY, PostcopyPager, Prefetch
from chmig.transport import Connection

from .common import BugLog, Resources

Report = Callable[[str], None]

PAGE = p.PAGE_SIZE
#: The pager's patience with a silent source here (the product's default is 10 s).
RESPONSE_TIMEOUT_S = 0.5
#: How long a case may take to end (whole or failed), and how long the fuzzer's own threads wait.
BOUND_S = 15.0
#: The largest guest memory a case builds (the pattern is computed once for it).
MAX_MEMORY = 6 << 20
#: Every 8 bytes of a valid page hold their guest address plus this (so no valid word is zero).
SALT = 0x5A5A_0000_0000_0001
_PATTERN = b""

#: One mutation per case.  Fatal ones must fail the pager once it reads them.
FATAL = ("error", "status", "ok-zero", "length-1", "length+1", "huge", "short-close", "stall-mid-page", "garbage",
         "silence", "close", "reset")
#: Fatal if the pager reads the next answer on that connection; it may also notice the bytes unasked.
CONDITIONAL = ("extra", "duplicate")
#: Valid answers sent oddly: the pager must become whole.
HARMLESS = ("slow", "split-header")
#: The kinds answered by :meth:`_Source._mutate` at the planned request.
MUTATING = FATAL + CONDITIONAL + HARMLESS
KIND_WEIGHTS = {"valid": 8, **{kind: 6 for kind in FATAL}, "extra": 6, "duplicate": 6, "slow": 4,
                "split-header": 4, "idle-urgent": 4, "off": 2}
KINDS = tuple(KIND_WEIGHTS)


def pattern(gpa: int, length: int) -> bytes:
    """The valid bytes of ``[gpa, gpa+length)``."""
    global _PATTERN
    if not _PATTERN:
        _PATTERN = struct.pack(f"<{MAX_MEMORY // 8}Q", *((a + SALT) & (2**64 - 1) for a in range(0, MAX_MEMORY, 8)))
    return _PATTERN[gpa: gpa + length]


# ---------------------------------------------------------------------------------------------
# A case
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What case ``index`` of ``seed`` does (all drawn from its own random stream)."""

    index: int
    kind: str
    zones: list[ZoneConfig]
    prefetch: str
    connections: int
    #: The connection and the request number (0-based, on that connection) the mutation answers.
    target: int = 0
    at: int = 0
    #: Per-mutation details (lengths, byte counts), drawn up front.
    detail: dict = field(default_factory=dict)
    #: Share of valid answers to shared memory given as "written into the memfd, Ok 0".
    written_share: float = 0.0

    def describe(self) -> str:
        zones = " + ".join(f"{z.size // 1024}K {'shared' if z.shared else 'private'}" for z in self.zones)
        where = f" at request {self.at} of fault-{self.target}" if self.kind in MUTATING else ""
        if self.kind == "idle-urgent":
            where = f" ({self.detail['idle']} on fault-0)"
        return (f"{self.kind}{where}; memory {zones}; prefetch {self.prefetch}; "
                f"{self.connections} connection(s)")


def make_plan(seed: int, index: int) -> Plan:
    rng = random.Random(f"chmig-pager-fuzz:{seed}:{index}")
    kind = rng.choices(KINDS, weights=[KIND_WEIGHTS[k] for k in KINDS])[0]
    # Sizes in pages: one zone of 512..1280 pages, or two of 200..700 (at least 2 MiB in all, the minimum).
    if rng.random() < 0.5:
        sizes = [rng.randrange(512, 1281)]
    else:
        sizes = [rng.randrange(200, 701), rng.randrange(200, 701)]
        if sum(sizes) < 512:
            sizes[1] = 512 - sizes[0]
    zones = [ZoneConfig(f"mem{i}", pages * PAGE, rng.random() < 0.5) for i, pages in enumerate(sizes)]
    prefetch = rng.choice(["256K", "1M", "2M", PAGE_STRATEGY, str(rng.randrange(64, 513) * PAGE)])
    connections = rng.choice([1, 1, 2, 2, 3])
    if kind == "off":
        prefetch = OFF
    if kind == "idle-urgent":  # an urgent connection nothing uses: two or more, batched
        connections = max(connections, 2)
        if prefetch == PAGE_STRATEGY:
            prefetch = "1M"
    plan = Plan(index, kind, zones, prefetch, connections,
                written_share=rng.choice([0.0, 0.3, 1.0]) if any(z.shared for z in zones) else 0.0)
    pulling = pulling_connections(plan)
    if pulling:
        plan.target = rng.choice(pulling)
    total = sum(sizes)
    range_pages = Prefetch.parse(prefetch).range_bytes // PAGE
    per_connection = max(1, total // range_pages // max(1, len(pulling)))
    plan.at = rng.choice([0, 1, 2, rng.randrange(per_connection), rng.randrange(min(per_connection, 8))])
    plan.detail = {
        "status": rng.choice([0, 3, 4, 255, 256, 0xFFFF, rng.randrange(3, 1 << 16)]),
        "huge": rng.choice([1 << 31, 1 << 32, (1 << 63) + PAGE, (1 << 64) - 1]),
        "fraction": rng.random(),
        "garbage": rng.randbytes(16),
        "extra": rng.choice([2, 3, 15, 16, 17, 64]),
        "extra-error": rng.random() < 0.3,
        "pieces": rng.randrange(2, 5),
        "pause": rng.choice([0.02, 0.05, 0.08, 0.12]),
        "idle": rng.choice(["close", "garbage", "reset"]),
    }
    return plan


def pulling_connections(plan: Plan) -> list[int]:
    """The connections the pager sends requests on (none with ``off``; the first only with ``page`` or one)."""
    if plan.prefetch == OFF:
        return []
    if plan.prefetch == PAGE_STRATEGY or plan.connections == 1:
        return [0]
    return list(range(1, plan.connections))


@dataclass
class Outcome:
    index: int
    kind: str
    ok: bool
    detail: str = ""
    #: whole, failed, stopped or "did not end".
    end: str = ""
    duplicate_accepted: bool = False


class _Source:
    """The hostile source: one thread per Fault connection the pager pulls on."""

    def __init__(self, plan: Plan, memory: GuestMemory, socks: list[socket.socket], rng: random.Random,
                 range_bytes: int) -> None:
        self.plan = plan
        self.memory = memory
        self.socks = socks
        self.rng = rng
        self.range_bytes = range_bytes
        self.lock = threading.Lock()
        self.problems: list[str] = []
        self.requested: set[int] = set()
        self.requests = [0] * len(socks)
        #: Per connection: the pager has read (or is reading) an answer it must fail on.
        self.fatal_on = [False] * len(socks)
        self.mutated = False
        #: gpa of a range whose pages may hold the duplicated answer's bytes -> those bytes.
        self.duplicate: tuple[int, bytes] | None = None
        self.threads: list[threading.Thread] = []
        self.slots = [(r.gpa, r.end, r) for r in memory.regions]

    @property
    def fatal_read(self) -> bool:
        return any(self.fatal_on)

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    def start(self, pulling: list[int]) -> None:
        for n in range(len(self.socks)):
            thread = threading.Thread(target=self._serve, args=(n, n in pulling), name=f"fuzz-pager-source-{n}",
                                      daemon=True)
            thread.start()
            self.threads.append(thread)

    # -- reading requests ----------------------------------------------------------------------------

    def _read(self, sock: socket.socket, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            try:
                chunk = sock.recv(n - len(data))
            except OSError:  # a reset, or our own close after a mutation
                break
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def _request(self, n: int, wire: bytes) -> p.MemoryRange | None:
        """Check one PageFault request; None (and a problem) if the pager sent something wrong."""
        try:
            request = p.Request.decode(wire[:16])
        except p.ProtocolError as exc:
            self.problem(f"fault-{n}: the pager sent a header that is no request: {exc}")
            return None
        if request.command is not p.Command.PAGE_FAULT or request.length != 16:
            self.problem(f"fault-{n}: the pager sent {request.command.wire_name} with length {request.length}")
            return None
        gpa, length = struct.unpack("<QQ", wire[16:])
        if length == 0 or gpa % PAGE or length % PAGE or length > self.range_bytes:
            self.problem(f"fault-{n}: bad range {gpa:#x}+{length:#x} (prefetch {self.range_bytes} bytes)")
            return None
        if not any(start <= gpa and gpa + length <= end for start, end, _ in self.slots):
            self.problem(f"fault-{n}: range {gpa:#x}+{length:#x} is not inside one slot")
            return None
        pages = set(range(gpa, gpa + length, PAGE))
        with self.lock:
            again = pages & self.requested
            self.requested |= pages
        if again:
            self.problem(f"fault-{n}: asked again for page {min(again):#x}")
            return None
        return p.MemoryRange(gpa, length)

    # -- answering ------------------------------------------------------------------------------------

    def _valid(self, rng: p.MemoryRange, allow_written: bool = True) -> bytes:
        """A valid answer: the bytes inline, or (shared memory) written into the memfd and Ok 0."""
        region = next(r for start, end, r in self.slots if start <= rng.gpa < end)
        if allow_written and region.zone.config.shared and self.rng.random() < self.plan.written_share:
            offset = region.mapping.file_offset + rng.gpa - region.gpa
            # Kernel-side (pwrite on the memfd): never a touch of the registered mapping from Python.
            os.pwrite(region.fd, pattern(rng.gpa, rng.length), offset)
            return p.Response.ok(0).encode()
        return p.Response.ok(rng.length).encode() + pattern(rng.gpa, rng.length)

    def _serve(self, n: int, pulling: bool) -> None:
        sock = self.socks[n]
        sock.settimeout(BOUND_S)
        plan = self.plan
        k = 0
        pending: str | None = None  # "extra" or "duplicate": what it does depends on the next request
        last: p.MemoryRange | None = None
        try:
            while True:
                wire = self._read(sock, 32)
                if not wire:
                    return
                if len(wire) < 32:
                    self.problem(f"fault-{n}: a request of {len(wire)} bytes, then the end")
                    return
                if not pulling:
                    self.problem(f"fault-{n}: a request on a connection the pager must not use")
                    return
                if self.fatal_on[n]:
                    self.problem(f"fault-{n}: the pager sent another request after a {plan.kind} it must fail on")
                    return
                rng = self._request(n, wire)
                if rng is None:
                    return
                with self.lock:
                    self.requests[n] += 1
                if pending == "extra":
                    self.fatal_on[n] = True  # its answer starts with the extra bytes
                    sock.sendall(self._valid(rng, allow_written=False))
                elif pending == "duplicate":
                    assert last is not None
                    if rng.length == last.length:
                        # Undetectable: the duplicate was read as this range's answer.
                        self.duplicate = (rng.gpa, pattern(last.gpa, last.length))
                        return  # close: the pager fails on its next answer, or is whole already
                    self.fatal_on[n] = True  # a length that does not match: the pager must refuse it
                elif n == plan.target and k == plan.at and plan.kind in MUTATING:
                    self.mutated = True
                    if plan.kind in FATAL:
                        self.fatal_on[n] = True
                    if not self._mutate(n, sock, rng):
                        return
                else:
                    sock.sendall(self._valid(rng))
                pending = plan.kind if self.mutated and k == plan.at and n == plan.target and \
                    plan.kind in CONDITIONAL else None
                last = rng
                k += 1
        except OSError:
            return  # the pager shut the connection down (it failed or is whole)
        finally:
            sock.close()

    def _mutate(self, n: int, sock: socket.socket, rng: p.MemoryRange) -> bool:
        """Answer ``rng`` with the plan's mutation; False when this connection is done (closed)."""
        kind, d = self.plan.kind, self.plan.detail
        ok = p.Response.ok(rng.length).encode()
        data = pattern(rng.gpa, rng.length)
        if kind == "error":
            sock.sendall(p.Response.error().encode())
        elif kind == "status":
            sock.sendall(struct.pack("<H6sQ", d["status"], bytes(6), rng.length) + data)
        elif kind == "ok-zero":  # nothing was written into the memory: there is no page to map
            sock.sendall(p.Response.ok(0).encode())
        elif kind in ("length-1", "length+1"):
            length = rng.length - 1 if kind == "length-1" else rng.length + 1
            sock.sendall(p.Response.ok(length).encode() + pattern(rng.gpa, rng.length + 8)[:length])
        elif kind == "huge":
            sock.sendall(p.Response.ok(d["huge"]).encode() + data)
        elif kind == "short-close":
            sock.sendall(ok + data[: int(d["fraction"] * rng.length)])
            return False
        elif kind == "stall-mid-page":
            sock.sendall(ok + data[: int(d["fraction"] * rng.length)])
        elif kind == "garbage":
            sock.sendall(d["garbage"])
        elif kind == "silence":
            pass
        elif kind == "close":
            return False
        elif kind == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        elif kind == "extra":
            if d["extra-error"]:
                extra = p.Response.error().encode()
            else:  # an unknown status in the first two bytes, whatever follows
                extra = struct.pack("<H", 0x5A5A) + self.rng.randbytes(d["extra"] - 2)
            sock.sendall(ok + data + extra)
        elif kind == "duplicate":
            sock.sendall(ok + data)
            try:
                sock.sendall(ok + data)
            except OSError:
                # The pager stopped reading inside the duplicate.  If it asked for another range first, it read
                # the duplicate as that range's answer, of another length (the same one would have been read
                # whole), and had to refuse it; if it did not, it was whole and closed.
                wire = self._read(sock, 32)
                if len(wire) == 32 and self._request(n, wire) is not None:
                    self.fatal_on[n] = True
                return False
        elif kind == "slow":  # valid, in pieces, each pause well below the pager's patience
            wire = ok + data
            cuts = sorted(self.rng.randrange(1, len(wire)) for _ in range(d["pieces"] - 1))
            for start, end in zip([0, *cuts], [*cuts, len(wire)]):
                sock.sendall(wire[start:end])
                time.sleep(d["pause"])
        elif kind == "split-header":
            for i in range(16):
                sock.sendall(ok[i: i + 1])
            sock.sendall(data)
        return True

    def join(self) -> None:
        for thread in self.threads:
            thread.join(BOUND_S)
            if thread.is_alive():
                self.problem(f"the fuzzer's {thread.name} did not end")


def run_case(seed: int, index: int, bug_log: BugLog) -> Outcome:
    plan = make_plan(seed, index)
    rng = random.Random(f"chmig-pager-fuzz-answers:{seed}:{index}")
    fds_before = len(os.listdir("/proc/self/fd"))
    bug_log.records.clear()
    problems: list[str] = []
    memory = GuestMemory.create(plan.zones)
    pairs = [socket.socketpair() for _ in range(plan.connections)]
    channels = [Channel(Connection(ours, peer=f"fuzz-source-{n}", is_unix=True), side=p.Side.DESTINATION,
                        name=f"fault-{n}") for n, (ours, _) in enumerate(pairs)]
    theirs = [pair[1] for pair in pairs]
    prefetch = Prefetch.parse(plan.prefetch)
    limits = dataclasses.replace(p.DEFAULT_LIMITS, fault_response_timeout_s=RESPONSE_TIMEOUT_S)
    end = "did not end"
    source: _Source | None = None
    try:
        # The fuzzer holds the memfds, as an offload daemon would: it may write pages into them and answer Ok 0.
        pager = PostcopyPager(memory, channels, prefetch, limits=limits, shared_with_source=True)
        source = _Source(plan, memory, theirs, rng, prefetch.range_bytes)
        try:
            pager.register()
            source.start(pulling_connections(plan))
            pager.start()
            if plan.kind == "idle-urgent":  # the urgent connection carries nothing here: whatever it gets is moot
                _idle_urgent(plan, theirs[0])
            if plan.kind == "off":
                if pager.wait(0.3):
                    problems.append(f"prefetch=off, no fault, yet the pager ended: {pager.stats.status}")
            elif not pager.wait(BOUND_S):
                problems.append(f"the pager did not end within {BOUND_S:g} s")
            end = pager.stats.status if pager.done.is_set() else end
        except Exception as exc:  # register() and start() must not fail here
            problems.append(f"the pager raised {exc!r}")
        finally:
            try:
                pager.close()
            except Exception as exc:  # judged: close must never fail here
                problems.append(f"close() raised {exc!r}")
            source.join()
        if plan.kind == "off":
            end = pager.stats.status  # "stopped" by close()
        # From here on nothing is registered: guest memory may be read.
        problems += source.problems
        problems += _judge(plan, pager, source, end)
        problems += _check_memory(memory, pager, source)
    finally:
        for channel in channels:
            channel.close()
        for sock in theirs:
            sock.close()
        memory.close()
    problems += [f"chmig logged a bug: {line}" for line in bug_log.records]
    leftover = [t.name for t in threading.enumerate() if t.name.startswith(("postcopy", "fuzz-pager"))]
    if leftover:
        problems.append(f"threads left running: {', '.join(leftover)}")
    fds_after = len(os.listdir("/proc/self/fd"))
    if fds_after != fds_before:
        problems.append(f"fds {fds_before} -> {fds_after}")
    mutated = source is not None and source.mutated
    kind = plan.kind if plan.kind in ("valid", "off", "idle-urgent") or mutated else "valid (not reached)"
    detail = "; ".join(problems)
    if problems:
        detail = f"{plan.describe()}: {detail}"
    accepted = source is not None and source.duplicate is not None
    return Outcome(index, kind, not problems, detail[:4000], end, duplicate_accepted=accepted)


def _idle_urgent(plan: Plan, idle: socket.socket) -> None:
    """Garbage on, a close or a reset of the urgent connection, which nothing uses without a vCPU."""
    action = plan.detail["idle"]
    if action == "garbage":
        idle.sendall(plan.detail["garbage"] * 4)
        return
    if action == "reset":
        idle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    idle.shutdown(socket.SHUT_RDWR)


def _judge(plan: Plan, pager: PostcopyPager, source: _Source, end: str) -> list[str]:
    """How the pager ended, against what it read."""
    problems: list[str] = []
    error = pager.error
    if plan.kind == "off":
        if sum(source.requests):
            problems.append(f"prefetch=off sent {sum(source.requests)} requests")
        if end != "stopped" or pager.present.present:
            problems.append(f"prefetch=off ended {end} with {pager.present.present} pages present")
        return problems
    if end == "did not end":
        return problems  # reported already
    if source.fatal_read:
        if end != "failed":
            problems.append(f"the pager read a {plan.kind} answer and ended {end}, not failed")
    elif end != "whole" and not _may_fail_unread(plan, source, error):
        problems.append(f"every answer the pager read was valid, yet it ended {end}: {error}")
    if end == "whole":
        if not pager.present.whole or error is not None:
            problems.append(f"whole, but {pager.present.missing} pages missing, error {error!r}")
        if len(source.requested) != pager.present.total:
            problems.append(f"whole after asking for {len(source.requested)} of {pager.present.total} pages")
        if pager.stats.pages_pulled != pager.present.total:
            problems.append(f"whole, but pages_pulled is {pager.stats.pages_pulled} of {pager.present.total}")
    elif end == "failed":
        if not error:
            problems.append("failed without an error")
        else:
            if "\n" in error or "\r" in error:
                problems.append(f"a multi-line error: {error[:300]!r}")
            if len(error) > 1000:
                problems.append(f"an error of {len(error)} characters: {error[:200]!r}...")
            if "internal error" in error or "Traceback" in error:
                problems.append(f"a bug behind the failure: {error[:300]}")
            if not re.search(r"\bfault-\d\b", error):
                problems.append(f"the error does not name its connection: {error[:300]}")
        if pager.stats.status != "failed" or pager.stats.error != error:
            problems.append(f"stats say {pager.stats.status} / {pager.stats.error!r}")
    return problems


def _may_fail_unread(plan: Plan, source: _Source, error: str | None) -> bool:
    """Whether the pager may fail though it read no bad answer: bytes nobody asked for, or a close, on a
    connection with no request in flight.

    A pager may watch its idle Fault connections (a source that died, or speaks unasked, is noticed even
    while nothing faults): then the extra bytes after a valid answer, a duplicated answer, or the idle urgent
    connection closed or spoken on fail it before it asks for anything else — or not, if it was whole first.
    """
    if plan.kind == "idle-urgent":
        return error is not None and "fault-0" in error
    if plan.kind in CONDITIONAL and source.mutated:
        return error is not None and f"fault-{plan.target}" in error
    return False


def _check_memory(memory: GuestMemory, pager: PostcopyPager, source: _Source) -> list[str]:
    """After close: present pages hold the valid pattern; the others zeros or the pattern (never mutated bytes)."""
    problems: list[str] = []
    zero = bytes(PAGE)
    duplicate_gpa, duplicate_bytes = source.duplicate if source.duplicate else (-1, b"")
    for region in memory.regions:
        data = memory.read(region.gpa, region.size)
        for offset in range(0, region.size, PAGE):
            gpa = region.gpa + offset
            page = data[offset: offset + PAGE]
            valid = pattern(gpa, PAGE)
            if duplicate_gpa <= gpa < duplicate_gpa + len(duplicate_bytes):
                at = gpa - duplicate_gpa
                if page in (valid, zero, duplicate_bytes[at: at + PAGE]):
                    continue
            present = pager.present.is_present(gpa)
            if present and page != valid:
                problems.append(f"present page {gpa:#x} does not hold the valid pattern "
                                f"({'zeros' if page == zero else 'other bytes'})")
            elif not present and page not in (zero, valid):
                problems.append(f"missing page {gpa:#x} holds bytes that are neither zeros nor the pattern")
            if len(problems) >= 3:
                return problems
    return problems


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _watching_chmig_log(verbose: bool) -> Iterator[BugLog]:
    """Catch what chmig logs as a bug; unless ``verbose``, keep its expected "postcopy failed" lines quiet."""
    bug_log = BugLog()
    logger = logging.getLogger("chmig")
    saved = (logger.level, logger.propagate)
    logger.addHandler(bug_log)
    if not verbose:  # every failing case logs "postcopy failed": expected here, and thousands of lines
        logger.setLevel(logging.ERROR)  # a bug is logged at ERROR ("bug in chmig", with its traceback)
        logger.propagate = False
    try:
        yield bug_log
    finally:
        logger.removeHandler(bug_log)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def play(seed: int, indexes: Iterable[int], verbose: bool = False) -> Iterator[Outcome]:
    """The outcome of each case, in order (a case that raises is a failed outcome, not an exception)."""
    pattern(0, 0)
    with _watching_chmig_log(verbose) as bug_log:
        for index in indexes:
            try:
                yield run_case(seed, index, bug_log)
            except Exception as exc:  # the harness itself: still a failure to look at, with the case to replay
                yield Outcome(index, make_plan(seed, index).kind, False, f"the case raised {exc!r}")


def run(cases: int, seed: int, report: Report, only: list[int] | None = None, verbose: bool = False) -> int:
    """Run ``cases`` cases (or just ``only``); print a summary; return the number of failures."""
    pattern(0, 0)
    resources = Resources()
    begin = time.monotonic()
    kinds: dict[str, list[int]] = {}
    failures = 0
    duplicates = 0
    for outcome in play(seed, only if only is not None else range(cases), verbose):
        counts = kinds.setdefault(outcome.kind, [0, 0, 0, 0])
        counts[0] += 1
        counts[2 if outcome.end == "whole" else 3] += outcome.end in ("whole", "failed")
        duplicates += outcome.duplicate_accepted
        if not outcome.ok:
            counts[1] += 1
            failures += 1
            report(f"pager: FAILED case {outcome.index} (seed {seed}, --only {outcome.index}): {outcome.detail}")
    leaked, counts = resources.compare("pager", report)
    failures += leaked
    report(f"pager: {sum(c[0] for c in kinds.values())} cases in {time.monotonic() - begin:.1f} s, "
           f"{failures} failures; {counts}; "
           f"{duplicates} duplicated answers accepted as the next range's (undetectable: responses carry no address)")
    report(f"  {'kind':<22} {'cases':>6} {'failed':>7} {'whole':>6} {'pager failed':>13}")
    for kind, (count, failed, whole, pager_failed) in sorted(kinds.items()):
        report(f"  {kind:<22} {count:>6} {failed:>7} {whole:>6} {pager_failed:>13}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.pager", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", type=int, nargs="+")
    parser.add_argument("-v", "--verbose", action="store_true", help="let chmig's log through")
    args = parser.parse_args()
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(threadName)s %(name)s: %(message)s")
    return 1 if run(args.cases, args.seed, lambda line: print(line, flush=True), args.only, args.verbose) else 0


if __name__ == "__main__":
    sys.exit(main())
