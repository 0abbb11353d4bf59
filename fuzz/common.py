"""What every fuzzer here shares: byte ropes, one recorded real migration, /proc probes, the summary.

The recording is the ground truth the wire fuzzer mutates: a real ``chmig run`` source migrates a real
guest through :class:`RecordingProxy` into a real ``chmig receive``; the proxy keeps every byte of every
connection, and :func:`split_requests` cuts the source's stream into messages with :mod:`chmig.protocol`
(the same decoders the receiver uses, so the recording is read exactly as the receiver read it).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from chmig import protocol as p

log = logging.getLogger("fuzz")

Report = Callable[[str], None]

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096

# ---------------------------------------------------------------------------------------------
# Ropes: mutated 20 MiB streams without copying them
# ---------------------------------------------------------------------------------------------


class Rope:
    """An immutable byte string made of shared segments.

    A replayed migration carries ~16 MiB of guest memory; every case mutates it somewhere.  Copying it per
    case would cost time and, worse, show up in the peak RSS the in-process target measures, so a mutation
    builds a new rope that shares the untouched segments with the recording.
    """

    __slots__ = ("parts", "_starts", "length")

    def __init__(self, parts: Iterable[bytes | bytearray | memoryview | Rope] = ()) -> None:
        flat: list[memoryview] = []
        for part in parts:
            if isinstance(part, Rope):
                flat.extend(part.parts)
            elif len(part):
                flat.append(memoryview(part).cast("B"))
        self.parts: tuple[memoryview, ...] = tuple(flat)
        starts, total = [], 0
        for part in self.parts:
            starts.append(total)
            total += len(part)
        self._starts = starts
        self.length = total

    def __len__(self) -> int:
        return self.length

    def __add__(self, other: Rope | bytes) -> Rope:
        return Rope([self, other])

    def chunks(self, start: int = 0, end: int | None = None) -> Iterator[memoryview]:
        """The bytes of ``[start, end)`` as views into the segments (no copy)."""
        end = self.length if end is None else min(end, self.length)
        if start >= end:
            return
        index = bisect.bisect_right(self._starts, start) - 1
        while start < end and index < len(self.parts):
            base = self._starts[index]
            part = self.parts[index]
            lo, hi = start - base, min(len(part), end - base)
            yield part[lo:hi]
            start = base + hi
            index += 1

    def slice(self, start: int, end: int | None = None) -> Rope:
        return Rope(self.chunks(max(0, start), end))

    def read(self, start: int, n: int) -> bytes:
        """A copy of ``n`` bytes at ``start`` (short at the end): for headers, tables and JSON."""
        return b"".join(bytes(c) for c in self.chunks(start, start + n))

    def replace(self, start: int, end: int, data: bytes | Rope) -> Rope:
        return Rope([self.slice(0, start), data, self.slice(end)])

    def tobytes(self) -> bytes:
        return b"".join(bytes(c) for c in self.parts)


# ---------------------------------------------------------------------------------------------
# Splitting a recorded stream into messages, with chmig.protocol's own decoders
# ---------------------------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One request of a recorded source stream: where it lies and what it carried."""

    request: p.Request
    start: int
    #: End of header + payload (for Memory: the table); the data follows up to ``end``.
    payload_end: int
    end: int
    table: p.MemoryRangeTable | None = None

    @property
    def command(self) -> p.Command:
        return self.request.command


def split_requests(stream: bytes) -> list[RecordedRequest]:
    """Cut a source→destination stream into requests (header, payload, and a Memory request's data)."""
    out: list[RecordedRequest] = []
    offset = 0
    while offset < len(stream):
        request = p.Request.decode(stream[offset:offset + p.HEADER_SIZE])
        payload_end = offset + p.HEADER_SIZE + request.length
        table = None
        end = payload_end
        if request.command is p.Command.MEMORY:
            table = p.MemoryRangeTable.decode(stream[offset + p.HEADER_SIZE:payload_end])
            end = payload_end + table.total_bytes
        if end > len(stream):
            raise ValueError(f"recorded stream ends inside {request.command.wire_name} at {offset}")
        out.append(RecordedRequest(request, offset, payload_end, end, table))
        offset = end
    return out


def split_responses(stream: bytes) -> list[p.Response]:
    return [p.Response.decode(stream[i:i + p.HEADER_SIZE]) for i in range(0, len(stream), p.HEADER_SIZE)]


# ---------------------------------------------------------------------------------------------
# The recording proxy
# ---------------------------------------------------------------------------------------------


class RecordingProxy:
    """A loopback TCP proxy that relays every connection to ``target`` and keeps both directions' bytes."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        #: One (source→destination, destination→source) pair of buffers per connection, in accept order.
        self.connections: list[tuple[bytearray, bytearray]] = []
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept, name="fuzz-record-accept", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target, timeout=30)
                upstream.settimeout(None)
            except OSError:
                return
            up, down = bytearray(), bytearray()
            with self._lock:
                self.connections.append((up, down))
                self._sockets += [client, upstream]
                for src, dst, buf, name in ((client, upstream, up, "up"), (upstream, client, down, "down")):
                    thread = threading.Thread(target=self._relay, args=(src, dst, buf), daemon=True,
                                              name=f"fuzz-record-{name}-{len(self.connections)}")
                    self._threads.append(thread)
                    thread.start()

    @staticmethod
    def _relay(src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                buf += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)  # pass the end of this direction on, as the peer saw it
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threads = list(self._threads)
        for thread in threads:
            thread.join(10)
        self._accepter.join(10)
        for sock in self._sockets:
            sock.close()


# ---------------------------------------------------------------------------------------------
# The recorded migration, and the normalized replay built from it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One ``guest_ram_mappings`` entry of the recorded Config."""

    slot: int
    gpa: int
    size: int
    zone_id: str
    file_offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass
class Recording:
    """A real migration's main connection, both directions, and what it moved.

    ``image`` is the guest memory as the destination had it at State (every Memory request applied in
    order), ``populated`` the page runs any Memory request covered: together they let the fuzzer send the
    same VM again as a normalized stream (one Start, one Config, a fixed number of Memory requests, one
    State, one Complete), whose shape does not depend on how many precopy iterations the recording took.
    """

    up: bytes
    down: bytes
    requests: list[RecordedRequest]
    responses: list[p.Response]
    config: bytes
    state: bytes
    slots: list[Slot]
    zones: dict[str, int]
    #: zone id → its memory at State (the zones are laid out by file offset, as the receiver maps them).
    image: dict[str, bytearray]
    populated: list[tuple[int, int]]
    source: str = ""

    @property
    def ram_size(self) -> int:
        return sum(self.zones.values())

    def commands(self) -> list[str]:
        return [r.command.wire_name for r in self.requests]

    def slot_of(self, gpa: int) -> Slot:
        for slot in self.slots:
            if slot.gpa <= gpa < slot.end:
                return slot
        raise ValueError(f"gpa {gpa:#x} is not in the recorded RAM")

    def memory_view(self, gpa: int, length: int) -> memoryview:
        slot = self.slot_of(gpa)
        offset = slot.file_offset + gpa - slot.gpa
        return memoryview(self.image[slot.zone_id])[offset:offset + length]

    # -- persistence ---------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "main-up.bin").write_bytes(self.up)
        (directory / "main-down.bin").write_bytes(self.down)
        (directory / "meta.json").write_text(json.dumps({"source": self.source, "commands": self.commands()}))

    @classmethod
    def load(cls, directory: Path) -> Recording:
        meta = json.loads((directory / "meta.json").read_text())
        return cls.parse((directory / "main-up.bin").read_bytes(), (directory / "main-down.bin").read_bytes(),
                         source=meta.get("source", str(directory)))

    @classmethod
    def parse(cls, up: bytes, down: bytes, source: str = "") -> Recording:
        """Split both directions and rebuild the memory image; refuse a recording that is not a whole migration."""
        requests = split_requests(up)
        responses = split_responses(down)
        commands = [r.command for r in requests]
        if len(responses) != len(requests) or not all(r.is_ok for r in responses):
            raise ValueError(f"the recording is not a successful migration: {len(requests)} requests, "
                             f"responses {[r.status.name for r in responses]}")
        if commands[:2] != [p.Command.START, p.Command.CONFIG] or commands[-2:] != [p.Command.STATE,
                                                                                    p.Command.COMPLETE]:
            raise ValueError(f"unexpected recorded sequence {[c.wire_name for c in commands]}")
        config_req, state_req = requests[1], requests[-2]
        config = up[config_req.start + p.HEADER_SIZE:config_req.payload_end]
        state = up[state_req.start + p.HEADER_SIZE:state_req.payload_end]
        document = json.loads(config)
        slots = [Slot(int(m["slot"]), int(m["gpa"]), int(m["size"]), str(m["zone_id"]), int(m["file_offset"]))
                 for m in document["memory_manager_data"]["guest_ram_mappings"]]
        memory = document["vm_config"]["memory"]
        zones = {"mem0": int(memory["size"])}
        zones.update({str(z["id"]): int(z["size"]) for z in memory.get("zones", [])})
        image = {zone: bytearray(size) for zone, size in zones.items()}
        pages: set[int] = set()
        recording = cls(up, down, requests, responses, config, state, slots, zones, image, [], source)
        for request in requests:
            if request.table is None:
                continue
            at = request.payload_end
            for rng in request.table:
                # A range may span adjacent slots: copy slot by slot.
                gpa, left = rng.gpa, rng.length
                while left:
                    slot = recording.slot_of(gpa)
                    n = min(left, slot.end - gpa)
                    offset = slot.file_offset + gpa - slot.gpa
                    image[slot.zone_id][offset:offset + n] = up[at:at + n]
                    pages.update(range(gpa // PAGE, (gpa + n + PAGE - 1) // PAGE))
                    at, gpa, left = at + n, gpa + n, left - n
        recording.populated = _runs(sorted(pages))
        return recording


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page numbers → (gpa, length) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page * PAGE:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE)
        else:
            runs.append((page * PAGE, PAGE))
    return runs


#: The source the brief asks for: one vCPU, 16 MiB, the self-verifying workload.
SOURCE_ARGS = ("--cpus", "boot=1", "--memory", "size=16M", "--workload", "verify")


def record_migration(workdir: Path, report: Report | None = None) -> Recording:
    """Migrate a real guest between two real chmig processes through a :class:`RecordingProxy`."""
    from chmig.harness import Processes
    from chmig.transport import parse_url

    workdir.mkdir(parents=True, exist_ok=True)
    procs = Processes(workdir, verbose=False)
    proxy: RecordingProxy | None = None
    begin = time.monotonic()
    try:
        source = procs.run(*SOURCE_ARGS)
        source.wait_rounds(2, timeout=60)  # the guest has touched its memory: iteration 0 is not empty
        dest, url = procs.receive("tcp:127.0.0.1:0")
        address = parse_url(url)
        proxy = RecordingProxy((address.host, address.port))
        stats = source.call("PUT", "vm.send-migration", {"destination_url": proxy.url}, timeout=120)
        dest.wait_for(lambda info: info.get("state") == "Running", timeout=30, what="the received VM running")
    finally:
        if proxy is not None:
            proxy.close()
        procs.stop_all()
    if proxy is None or not proxy.connections:
        raise RuntimeError("the recording proxy saw no connection")
    up, down = proxy.connections[0]
    recording = Recording.parse(bytes(up), bytes(down), source=f"recorded {time.strftime('%Y-%m-%d %H:%M:%S')}")
    log.debug("recorded: %s", " ".join(recording.commands()))
    if report is not None:
        iterations = len(stats.get("iterations", []))
        report(f"recorded a real migration in {time.monotonic() - begin:.1f} s: {len(recording.requests)} requests "
               f"({iterations} precopy iterations), {len(up) / MiB:.1f} MiB from the source, "
               f"{sum(n for _, n in recording.populated) / MiB:.1f} MiB of guest memory populated")
    return recording


def load_or_record(directory: Path | None, workdir: Path, report: Report | None = None) -> Recording:
    """The recording saved in ``directory`` (made and saved there if missing), or a fresh one."""
    if directory is not None and (directory / "meta.json").exists():
        recording = Recording.load(directory)
        if report is not None:
            report(f"replaying the recording in {directory} ({recording.source})")
        return recording
    recording = record_migration(workdir / "recording", report)
    target = directory if directory is not None else workdir / "recording"
    recording.save(target)
    recording.source = str(target)
    return recording


# ---------------------------------------------------------------------------------------------
# /proc probes: what a case may leak
# ---------------------------------------------------------------------------------------------


class Resources:
    """This process's open fds and threads when made; :meth:`compare` says whether a run of in-process cases
    left any behind."""

    def __init__(self) -> None:
        self.fds = len(os.listdir("/proc/self/fd"))
        self.threads = threading.active_count()

    def compare(self, name: str, report: Callable[[str], None]) -> tuple[int, str]:
        """(1 if something was left behind — reported as a failure of fuzzer ``name`` — else 0,
        ``fds A -> B, threads C -> D``)."""
        fds, threads = len(os.listdir("/proc/self/fd")), threading.active_count()
        counts = f"fds {self.fds} -> {fds}, threads {self.threads} -> {threads}"
        if fds == self.fds and threads == self.threads:
            return 0, counts
        report(f"{name}: FAILED: {counts}")
        return 1, counts


def open_fds(pid: int | str = "self") -> dict[int, str]:
    """fd → what it points to (``readlink``), for the leak report."""
    fds: dict[int, str] = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            fds[int(name)] = os.readlink(f"{base}/{name}")
        except OSError:  # closed meanwhile (the listdir's own fd)
            pass
    return fds


def child_pids(pid: int | str = "self") -> set[int]:
    """Children of every thread of ``pid``."""
    children: set[int] = set()
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/children") as f:
                children.update(int(c) for c in f.read().split())
        except OSError:
            pass
    return children


def status_kib(field_name: str, pid: int | str = "self") -> int:
    """A ``VmRSS``/``VmHWM`` style field of /proc/PID/status, in KiB (0 if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (``clear_refs`` 5), so a case's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def host_memory() -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes."""
    values = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values.get("MemAvailable", values["MemTotal"])


# ---------------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------------


@dataclass
class KindStats:
    cases: int = 0
    failures: int = 0
    seconds: float = 0.0
    slowest: float = 0.0
    #: Bytes: the peak RSS of a receiver process (VmHWM of the whole process) ...
    process_rss: int = 0
    #: ... and the growth of this process's peak RSS during an in-process case (the receiver's share).
    inprocess_rss: int = 0
    process: int = 0


@dataclass
class Summary:
    """Cases and failures per mutation kind, peak RSS, elapsed: printed at the end of a run."""

    title: str
    begin: float = field(default_factory=time.monotonic)
    kinds: dict[str, KindStats] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def add(self, kind: str, seconds: float, failed: bool, peak_rss: int, process: bool) -> None:
        stats = self.kinds.setdefault(kind, KindStats())
        stats.cases += 1
        stats.failures += failed
        stats.seconds += seconds
        stats.slowest = max(stats.slowest, seconds)
        if process:
            stats.process_rss = max(stats.process_rss, peak_rss)
        else:
            stats.inprocess_rss = max(stats.inprocess_rss, peak_rss)
        stats.process += process

    @property
    def failures(self) -> int:
        return sum(k.failures for k in self.kinds.values())

    def table(self) -> str:
        rows = [f"{self.title}: {sum(k.cases for k in self.kinds.values())} cases, {self.failures} failures, "
                f"{time.monotonic() - self.begin:.1f} s",
                f"  {'kind':<20} {'cases':>6} {'(proc)':>6} {'fail':>5} {'mean s':>7} {'max s':>6} "
                f"{'proc peak':>10} {'in-proc +':>10}"]
        for name in sorted(self.kinds):
            k = self.kinds[name]
            rows.append(f"  {name:<20} {k.cases:>6} {k.process:>6} {k.failures:>5} {k.seconds / k.cases:>7.3f} "
                        f"{k.slowest:>6.2f} {k.process_rss / MiB:>8.1f}Mi {k.inprocess_rss / MiB:>8.1f}Mi")
        rows.append("  (proc peak: peak RSS of a receiver process, ru_maxrss; "
                    "in-proc +: growth of this process's VmHWM in a case)")
        return "\n".join(rows)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def unclear(line: str, limit: int = 1000) -> str | None:
    """Why an error line is not a clear one for an operator (None if it is)."""
    if not line.strip():
        return "empty error message"
    if "\n" in line.strip():
        return "error message spans several lines"
    if _CONTROL.search(line):
        return f"control characters in the error message: {line[:200]!r}"
    if len(line) > limit:
        return f"error message of {len(line)} characters (more than {limit}): {line[:200]!r}…"
    if "Traceback" in line or "internal error" in line or "bug in chmig" in line:
        return f"an internal error, not a refusal: {line[:300]!r}"
    return None


class BugLog(logging.Handler):
    """Collects what chmig logs as its own bug (``bug in chmig`` or a traceback) during a case."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "bug in chmig" in record.getMessage():
            self.records.append(f"{record.name}: {record.getMessage()}"[:500])


def standalone_main(prog: str, doc: str | None, run: Callable[..., int]) -> int:
    """``python -m fuzz.NAME --cases N --seed S [--only I ...]`` for a fuzzer with ``run(cases, seed, report, only)``."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", type=int, nargs="+")
    args = parser.parse_args()
    return 1 if run(args.cases, args.seed, lambda line: print(line, flush=True), args.only) else 0
