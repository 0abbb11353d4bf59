"""The wire fuzzer: a recorded real migration, replayed mutated from a raw socket against a real receiver.

Recording
    One real migration (``chmig run --cpus boot=1 --memory size=16M --workload verify`` into
    ``chmig receive``) passes through :class:`fuzz.common.RecordingProxy`, once per run (or loaded with
    ``--recording DIR``).  Its Config, State and guest memory become the building blocks of every case
    (:class:`fuzz.scenario.Builder`); the raw stream is replayed too.

Replay
    A case (:mod:`fuzz.mutations`, chosen from ``(seed, index)`` alone) is a main stream, fds to pass with
    given bytes, extra connections to open before given requests, and an ending.  The reference receiver
    (:mod:`fuzz.model`) frames the stream and judges every request before anything is sent; the
    :class:`Driver` then plays it in lock-step like a source — send one request as the receiver will read
    it, read its answer — and every answer is checked against its verdict.

Targets
    ``process``: a fresh ``python -m chmig -v --log-file F receive --listen URL --serial off`` per case.
    ``inprocess``: :class:`chmig.receive.Receiver` on a thread of this process (short role and worker
    timeouts), with fd, thread, child and peak-RSS accounting around the case.

Checks (every case): answers match verdicts (never an Ok to a forbidden request, never an Error to a valid
one, no answer after an Error); the receiver gives up within ``--bound`` seconds with one clear error (exit 1
and exactly one ``chmig receive: error:`` line for the process) or completes and keeps serving; no
traceback in its log; peak RSS within budget; nothing leaked in-process.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from chmig import protocol as p
from chmig.errors import ChmigError, InternalError, StuckThreadError
from chmig.receive import Receiver
from chmig.transport import listen, parse_url

from .common import (MiB, Recording, Report, Rope, Summary, child_pids, host_memory, load_or_record, open_fds,
                     reset_peak_rss, status_kib, unclear)
from .model import Context, FdSpec, Planned, ReferenceReceiver, Verdict
from .mutations import Env, build, choose_kind
from .scenario import Builder, Case, Probe, Worker

log = logging.getLogger("fuzz.wire")

#: Seconds the receiver has to give up once the peer is gone (and to answer any one request).
BOUND_S = 15.0
#: How far ahead of the data the receiver may populate guest memory (chmig.channel.POPULATE_AHEAD).
POPULATE_WINDOW = 16 * MiB
#: RSS a receiver may use besides guest memory and payloads: the interpreter, chmig, KVM's mappings.
BASE_RSS = 64 * MiB
#: In-process receivers get short timeouts so cases that wait for them stay fast.
INPROCESS_LIMITS = {"role_timeout_s": 1.0, "workers_finish_s": 2.0}
F_SEAL_FUTURE_WRITE = 0x0010
_SEALS = {"seal": fcntl.F_SEAL_SEAL, "shrink": fcntl.F_SEAL_SHRINK, "grow": fcntl.F_SEAL_GROW,
          "write": fcntl.F_SEAL_WRITE, "future_write": F_SEAL_FUTURE_WRITE}


# ---------------------------------------------------------------------------------------------
# Sockets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    transport: str
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, url: str) -> Address:
        parsed = parse_url(url)
        if parsed.is_unix:
            return cls("unix", path=parsed.path)
        return cls("tcp", parsed.host, parsed.port)


def connect(address: Address, timeout: float) -> socket.socket:
    if address.transport == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address.path)
        except OSError:
            sock.close()
            raise
        return sock
    sock = socket.create_connection((address.host, address.port), timeout=timeout)
    # A source sets TCP_NODELAY too: a header and a small table written apart must not wait 40 ms for an ACK.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the peer's next read fails with ECONNRESET."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


@dataclass
class Answer:
    """What came back for one request: 16 bytes, or how the connection ended instead."""

    kind: str  # "answer" | "closed" | "reset" | "timeout" | "partial"
    data: bytes = b""


def read_answer(sock: socket.socket, timeout: float) -> Answer:
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < p.HEADER_SIZE:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(p.HEADER_SIZE - len(data))
        except TimeoutError:
            return Answer("timeout", data)
        except ConnectionResetError:
            return Answer("reset", data)
        except OSError as exc:
            return Answer("reset", data) if data == b"" else Answer("partial", data + str(exc).encode())
        if not chunk:
            return Answer("closed" if not data else "partial", data)
        data += chunk
    return Answer("answer", data)


def wait_closed(sock: socket.socket, timeout: float) -> str | None:
    """Wait for the peer to close; None if it did, else what happened instead."""
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return f"still open after {timeout:g} s"
        except OSError:
            return None
        if not chunk:
            return None
        return f"sent {len(chunk)} more bytes ({chunk[:16].hex()})"


# ---------------------------------------------------------------------------------------------
# File descriptors to pass
# ---------------------------------------------------------------------------------------------


class FdFactory:
    """Creates the fds a case passes (one per distinct FdSpec) and closes them after the case."""

    def __init__(self, builder: Builder, workdir: Path) -> None:
        self.builder = builder
        self.workdir = workdir
        self.fds: dict[FdSpec, int] = {}
        self._extra: list[int] = []
        self._sockets: list[socket.socket] = []

    def get(self, spec: FdSpec) -> int:
        if spec not in self.fds:
            self.fds[spec] = self._make(spec)
        return self.fds[spec]

    def _image(self, fd: int, size: int) -> None:
        image = self.builder.rec.image.get("mem0", b"")
        os.pwrite(fd, memoryview(image)[:min(len(image), size)], 0)

    def _make(self, spec: FdSpec) -> int:
        kind = spec.kind
        if kind.startswith("memfd"):
            fd = os.memfd_create("fuzz-guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, spec.size)
            if spec.image:
                self._image(fd, spec.size)
            seals = 0
            for name in spec.seals:
                seals |= _SEALS[name]
            if seals:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            return fd
        if kind == "pipe":
            r, w = os.pipe()
            self._extra.append(w)
            return r
        if kind == "socket":
            a, b = socket.socketpair()
            self._sockets.append(b)
            return a.detach()
        if kind == "devnull":
            return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        if kind == "directory":
            return os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if kind in ("readonly", "regular"):
            path = self.workdir / f"ram-{kind}"
            with open(path, "wb") as f:
                f.truncate(spec.size)
            fd = os.open(path, (os.O_RDONLY if kind == "readonly" else os.O_RDWR) | os.O_CLOEXEC)
            if spec.image and kind == "regular":
                self._image(fd, spec.size)
            return fd
        raise ValueError(f"unknown fd kind {kind}")

    def close(self) -> None:
        for fd in [*self.fds.values(), *self._extra]:
            try:
                os.close(fd)
            except OSError:
                pass
        for sock in self._sockets:
            sock.close()
        self.fds.clear()
        self._extra.clear()
        self._sockets.clear()


# ---------------------------------------------------------------------------------------------
# Playing a case
# ---------------------------------------------------------------------------------------------


@dataclass
class Played:
    """How the main connection went."""

    completed: bool = False
    abandoned: bool = False
    answers: int = 0
    #: Sockets kept open to the end (Fault probes, workers holding at State): the receiver must close them.
    kept: list[tuple[str, socket.socket, bool]] = field(default_factory=list)


class Driver:
    """Plays one case against a receiver at ``address``, in lock-step like a source, checking every answer."""

    def __init__(self, case: Case, address: Address, fds: FdFactory, failures: list[str], trace: list[str],
                 bound: float) -> None:
        self.case = case
        self.address = address
        self.fds = fds
        self.failures = failures
        self.trace = trace
        self.bound = bound
        self.played = Played()
        self.ran: set[int] = set()
        #: Workers finishing from threads of their own (joined before the case is judged).
        self.later: list[threading.Thread] = []

    # -- helpers ---------------------------------------------------------------------------------

    def fail(self, text: str) -> None:
        self.failures.append(text)
        self.trace.append(f"  !! {text}")

    def send(self, sock: socket.socket, stream: Rope, start: int, end: int,
             fds_at: dict[int, list[FdSpec]]) -> str | None:
        """Send ``stream[start:end]``, the fds riding on their bytes; None, or why the peer stopped reading."""
        sock.settimeout(self.bound)
        cuts = sorted(o for o in fds_at if start <= o < end)
        at = start
        try:
            for cut in [*cuts, end]:
                for chunk in stream.chunks(at, cut):
                    sock.sendall(chunk)
                at = cut
                if cut < end:
                    carried = stream.read(cut, min(4, end - cut))
                    fds = [self.fds.get(spec) for spec in fds_at[cut]]
                    sent = socket.send_fds(sock, [carried], fds)
                    if sent < len(carried):
                        sock.sendall(carried[sent:])
                    at = cut + len(carried)
            return None
        except TimeoutError:
            return f"the receiver stopped reading for {self.bound:g} s"
        except OSError as exc:
            return f"send: {exc.strerror or exc}"

    def check(self, label: str, planned: Planned, answer: Answer) -> str:
        """Judge one answer against its verdict: 'ok', 'error' (the connection ends), or 'gone'."""
        what = f"{label}: {planned.describe()} [{planned.verdict.value}: {planned.reason}]"
        if answer.kind == "timeout":
            self.fail(f"{what}: no answer within {self.bound:g} s")
            return "gone"
        if answer.kind != "answer":
            self.trace.append(f"  {what} -> connection {answer.kind}")
            if planned.verdict is Verdict.OK:
                self.fail(f"{what}: the receiver hung up on a valid request")
            return "gone"
        status, padding, length = struct.unpack("<H6sQ", answer.data)
        name = {1: "Ok", 2: "Error"}.get(status, f"status {status}")
        self.trace.append(f"  {what} -> {name}")
        self.played.answers += 1
        if status not in (1, 2):
            self.fail(f"{what}: answered with status {status}")
            return "gone"
        if length or padding != bytes(6):
            self.fail(f"{what}: the answer carries length {length} / padding {padding.hex()}")
        if status == 1 and planned.verdict is Verdict.ERROR:
            self.fail(f"{what}: answered Ok to a request the protocol forbids")
        if status == 2 and planned.verdict is Verdict.OK:
            self.fail(f"{what}: answered Error to a valid request")
        return "ok" if status == 1 else "error"

    def after_error(self, label: str, sock: socket.socket) -> None:
        """After an Error the receiver must say nothing more and close."""
        problem = wait_closed(sock, self.bound)
        if problem is not None:
            self.fail(f"{label}: after answering Error the receiver {problem}")

    # -- extra connections -------------------------------------------------------------------------

    def connect_worker(self, worker: Worker) -> socket.socket | None:
        try:
            sock = connect(self.address, self.bound)
            sock.sendall(worker.role)
            return sock
        except OSError as exc:
            self.fail(f"{worker.label}: cannot connect: {exc}")
            return None

    def run_worker(self, worker: Worker, sock: socket.socket | None) -> None:
        sock = sock or self.connect_worker(worker)
        if sock is None:
            return
        self.trace.append(f"  {worker.label}: {len(worker.planned)} requests, ending {worker.ending}")
        for n, planned in enumerate(worker.planned):
            if worker.finish_later is not None and n == len(worker.planned) - 1 and planned.complete:
                self.finish_later(worker, sock, planned)
                return
            problem = self.send(sock, worker.stream, planned.start, planned.end, {})
            if not planned.complete:
                self.trace.append(f"  {worker.label}: stops inside {planned.describe()}")
                break
            outcome = self.check(worker.label, planned, read_answer(sock, self.bound))
            if outcome == "error":
                self.after_error(worker.label, sock)
            if outcome != "ok":
                if problem and planned.verdict is Verdict.OK:
                    self.fail(f"{worker.label}: {problem}")
                break
        if worker.ending == "hold":
            self.played.kept.append((worker.label, sock, False))
        elif worker.ending == "rst":
            reset(sock)
        else:
            sock.close()

    def finish_later(self, worker: Worker, sock: socket.socket, planned: Planned) -> None:
        """Send half of ``planned`` now and the rest from a thread ``worker.finish_later`` s later, then its
        answer is checked as any other: the main connection meanwhile sends State, which must wait for it."""
        half = planned.start + (planned.end - planned.start) // 2
        self.send(sock, worker.stream, planned.start, half, {})
        self.trace.append(f"  {worker.label}: half of {planned.describe()} sent, the rest in {worker.finish_later} s")

        def rest() -> None:
            time.sleep(worker.finish_later or 0)
            problem = self.send(sock, worker.stream, half, planned.end, {})
            outcome = self.check(worker.label, planned, read_answer(sock, self.bound))
            if outcome == "ok" or problem is None:
                sock.close()
            else:
                self.fail(f"{worker.label}: {problem}")
                sock.close()

        thread = threading.Thread(target=rest, name=f"fuzz-{worker.label}-later", daemon=True)
        thread.start()
        self.later.append(thread)

    def run_probe(self, probe: Probe) -> None:
        socks: list[socket.socket] = []
        try:
            for _ in range(probe.count):
                socks.append(connect(self.address, self.bound))
        except OSError as exc:
            self.fail(f"{probe.label}: cannot connect ({len(socks)} open): {exc}")
        if probe.late:
            time.sleep(probe.late)
        for sock in socks:
            try:
                sock.sendall(probe.role)
            except OSError:
                pass  # a late role may find the connection already dropped
        self.trace.append(f"  probe: {probe.label} x{len(socks)}")
        if probe.keep:
            self.played.kept.extend((probe.label, s, True) for s in socks)
            return
        if probe.expect_drop:
            for sock in socks:
                answer = read_answer(sock, self.bound)
                if answer.kind == "answer":
                    self.fail(f"{probe.label}: the receiver answered {answer.data.hex()} instead of dropping it")
                elif answer.kind == "timeout":
                    self.fail(f"{probe.label}: not dropped within {self.bound:g} s")
        elif probe.hold:
            time.sleep(probe.hold)
        for sock in socks:
            reset(sock) if probe.rst else sock.close()

    def run_hooks(self, hooks: list[tuple[int, list]], early: list[Worker], at: int,
                  early_socks: dict[int, socket.socket | None]) -> None:
        for worker in early:
            if worker.early is not None and worker.early <= at and id(worker) not in early_socks:
                early_socks[id(worker)] = self.connect_worker(worker)
                self.trace.append(f"  {worker.label}: connected early")
        while hooks and hooks[0][0] <= at:
            for action in hooks.pop(0)[1]:
                if isinstance(action, Worker):
                    self.ran.add(id(action))
                    self.run_worker(action, early_socks.get(id(action)))
                else:
                    self.run_probe(action)

    # -- the main connection ---------------------------------------------------------------------------

    def play(self) -> Played:
        case = self.case
        stream = case.stream
        hooks = sorted(case.hooks.items())
        early = [a for a in case.actions() if isinstance(a, Worker) and a.early is not None]
        early_socks: dict[int, socket.socket | None] = {}
        try:
            sock = connect(self.address, self.bound)
        except OSError as exc:
            self.fail(f"cannot connect to the receiver: {exc}")
            return self.played
        sent_to = 0
        diverged = False
        try:
            for planned in case.planned:
                self.run_hooks(hooks, early, planned.start, early_socks)
                end = min(planned.end, len(stream))
                problem = self.send(sock, stream, planned.start, end, case.fds_at)
                sent_to = end
                if not planned.complete:
                    self.trace.append(f"  main: stream ends inside {planned.describe()} ({planned.reason})")
                    break
                outcome = self.check("main", planned, read_answer(sock, self.bound))
                if outcome == "ok" and planned.command in (5, 8):
                    self.played.completed = True
                if outcome == "ok" and planned.command == 6:
                    self.played.abandoned = True
                if outcome == "error":
                    self.after_error("main", sock)
                if outcome == "ok" and planned.verdict is Verdict.ERROR:
                    diverged = True  # the receiver took what it must refuse: the rest of the plan means nothing
                    break
                if outcome != "ok":
                    if problem and planned.verdict is Verdict.OK:
                        self.fail(f"main: {problem}")
                    break
                if planned.final:
                    break
            if sent_to < len(stream) and not self.played.completed and not diverged:
                self.send(sock, stream, sent_to, len(stream), {})  # the rest, for whoever still reads
        finally:
            self.end_main(sock)
            for thread in self.later:
                thread.join(self.bound + 5)
        for worker in early:  # connected early, but the migration ended before its turn
            leftover = early_socks.get(id(worker))
            if leftover is not None and id(worker) not in self.ran:
                leftover.close()
        return self.played

    def end_main(self, sock: socket.socket) -> None:
        ending = "fin" if self.played.completed else self.case.ending
        if ending == "rst":
            reset(sock)
            return
        if ending == "shut":
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            # The receiver may answer the request we left unfinished with Error; never with Ok.
            answer = read_answer(sock, self.bound)
            if answer.kind == "answer":
                status = struct.unpack("<H", answer.data[:2])[0]
                self.trace.append(f"  main: after our half-close: status {status}")
                if status != 2:
                    self.fail(f"main: after our half-close the receiver answered status {status}")
                answer = read_answer(sock, self.bound)
            if answer.kind == "timeout":
                self.fail(f"main: after our half-close the receiver kept the connection open {self.bound:g} s")
            elif answer.kind == "answer":
                self.fail(f"main: after our half-close the receiver sent {answer.data.hex()}")
        elif ending == "hold":
            time.sleep(0.3)
        sock.close()

    def finish_kept(self) -> None:
        """Sockets kept open: the receiver must have closed its ends once the migration ended."""
        for label, sock, must_close in self.played.kept:
            if must_close:
                problem = wait_closed(sock, self.bound)
                if problem is not None:
                    self.fail(f"{label}: after the migration ended the receiver's end is {problem}")
            sock.close()
        self.played.kept.clear()


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


class _Capture(logging.Handler):
    """Keeps the in-process receiver's log records (a traceback in them is a failure)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class InProcessTarget:
    """A :class:`chmig.receive.Receiver` on a thread of this process, with leak accounting around each case."""

    name = "inprocess"

    def __init__(self, workdir: Path, sockdir: Path, limits: p.Limits) -> None:
        self.workdir = workdir
        self.sockdir = sockdir
        self.limits = limits
        self.capture = _Capture()
        self.thread_errors: list[str] = []
        self._old_hook = threading.excepthook
        self._logger = logging.getLogger("chmig")
        self._saved = (self._logger.level, self._logger.propagate)

    def __enter__(self) -> InProcessTarget:
        self._logger.addHandler(self.capture)
        self._logger.setLevel(logging.INFO)
        self._logger.propagate = False  # the receiver's refusals are expected; keep them off stderr

        def hook(args: threading.ExceptHookArgs) -> None:
            name = args.thread.name if args.thread else "?"
            self.thread_errors.append(f"uncaught {args.exc_type.__name__} in thread {name}: {args.exc_value}")

        threading.excepthook = hook
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self.capture)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]
        threading.excepthook = self._old_hook

    def baseline(self) -> dict:
        gc_settle()
        return {"fds": open_fds(), "threads": {t.ident for t in threading.enumerate()},
                "children": child_pids(), "rss": status_kib("VmRSS") * 1024}

    def start(self, case: Case) -> Address:
        self.capture.records.clear()
        self.thread_errors.clear()
        url = "tcp:127.0.0.1:0" if case.transport == "tcp" else f"unix:{self.sockdir}/rx-{case.index}.sock"
        self.listener = listen(parse_url(url))
        self.receiver = Receiver(self.listener, serial_spec="off", limits=self.limits)
        self.vm = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"fuzz-receiver-{case.index}", daemon=True)
        self.thread.start()
        return Address.parse(str(self.listener.address))

    def _run(self) -> None:
        try:
            self.vm = self.receiver.run(accept_timeout=BOUND_S)
        except BaseException as exc:  # judged in finish()
            self.error = exc

    def finish(self, played: Played, failures: list[str], bound: float) -> None:
        self.thread.join(bound)
        if self.thread.is_alive():
            failures.append(f"the receiver did not give up within {bound:g} s of the peer's end")
            self.receiver.cancel()
            self.thread.join(10)
            if self.thread.is_alive():
                failures.append("the receiver thread is stuck even after cancel()")
        if self.vm is not None:
            if not played.completed:
                failures.append("run() returned a VM, but no Complete was answered Ok")
            self.vm.close()
        elif played.completed:
            failures.append(f"Complete was answered Ok, but run() raised {self.error!r}")
        error = self.error
        if error is not None and not played.completed:
            if not isinstance(error, ChmigError) or isinstance(error, (InternalError, StuckThreadError)):
                failures.append(f"run() raised {type(error).__name__}: {str(error)[:300]}")
            else:
                problem = unclear(str(error))
                if problem:
                    failures.append(problem)
            if self.receiver.vm is not None:
                failures.append("the half-built VM was not discarded")
        self.listener.close()
        for record in self.capture.records:
            if record.exc_info or "bug in chmig" in record.getMessage():
                text = logging.Formatter().format(record)
                failures.append(f"traceback in the receiver's log: {text[-600:]}")
                break
        failures.extend(self.thread_errors)

    def leaks(self, before: dict, failures: list[str]) -> None:
        """What the case left behind: fds, threads, children (given a moment to settle)."""
        deadline = time.monotonic() + 3
        while True:
            gc_settle()
            fds = {fd: target for fd, target in open_fds().items() if before["fds"].get(fd) != target}
            threads = [t for t in threading.enumerate() if t.ident not in before["threads"] and t.is_alive()]
            children = child_pids() - before["children"]
            if not (fds or threads or children) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if fds:
            failures.append(f"leaked fds: {sorted(fds.items())[:8]}")
        if threads:
            failures.append(f"leaked threads: {[t.name for t in threads][:8]}")
        if children:
            failures.append(f"leaked child processes: {sorted(children)}")


def gc_settle() -> None:
    import gc

    gc.collect()


#: Runs the receiver as its child and writes the child's peak RSS (ru_maxrss, KiB) to a file.  Needed because
#: a child's ru_maxrss starts at its parent's RSS at fork time (the kernel keeps the old mm's high-water mark
#: across exec): forked from this fuzzer (~100 MiB with the recording) every receiver would look that big.
#: Forked from this small wrapper, the receiver's own peak shows.  SIGTERM is passed on.
_WRAPPER = r"""
import os, signal, sys
out, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execv(argv[0], argv)
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: os.kill(pid, signum))
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


class ProcessTarget:
    """A fresh ``python -m chmig receive`` per case: exit code, stderr, log file and peak RSS are judged."""

    name = "process"

    def __init__(self, workdir: Path, sockdir: Path) -> None:
        self.workdir = workdir
        self.sockdir = sockdir

    def __enter__(self) -> ProcessTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def baseline(self) -> dict:
        return {}

    def start(self, case: Case) -> Address:
        self.log_path = self.workdir / f"receiver-{case.index}.log"
        self.socket_path = None if case.transport == "tcp" else f"{self.sockdir}/rx-{case.index}.sock"
        url = "tcp:127.0.0.1:0" if case.transport == "tcp" else f"unix:{self.socket_path}"
        self.rss_path = self.workdir / f"receiver-{case.index}.maxrss"
        log.debug("starting chmig receive --listen %s", url)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WRAPPER, str(self.rss_path),
             sys.executable, "-m", "chmig", "-v", "--log-file", str(self.log_path), "receive", "--listen", url,
             "--serial", "off"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.peak_rss = 0
        # Drain stderr as it comes: a receiver printing a huge error line must not block on a full pipe
        # (that would be our doing, not its).
        self.stderr = bytearray()
        self.stderr_reader = threading.Thread(target=self._drain, name=f"fuzz-stderr-{case.index}", daemon=True)
        self.stderr_reader.start()
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], BOUND_S)
        line = self.proc.stdout.readline().decode(errors="replace") if ready else ""
        if "listening on " not in line:
            self._kill()
            raise RuntimeError(f"chmig receive did not start: {line!r} {self._stderr()!r}")
        return Address.parse(line.rsplit("listening on ", 1)[1].strip())

    def _wait(self, timeout: float) -> int | None:
        """Wait for the exit (with its rusage); None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, _ = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                try:
                    self.peak_rss = int(self.rss_path.read_text()) * 1024
                except (OSError, ValueError):
                    self.peak_rss = 0
                code = os.waitstatus_to_exitcode(status)
                self.proc.returncode = 128 - code if code > 128 else code  # the wrapper's 128+N is signal N
                return self.proc.returncode
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)

    def _kill(self) -> None:
        """SIGKILL the receiver (the wrapper's child) and the wrapper, and reap the wrapper."""
        for pid in [*child_pids(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._wait(10)

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        while chunk := self.proc.stderr.read1(1 << 16):
            if len(self.stderr) < 64 * MiB:
                self.stderr += chunk

    def _stderr(self) -> str:
        self.stderr_reader.join(5)
        return self.stderr.decode(errors="replace")

    def finish(self, played: Played, failures: list[str], bound: float) -> None:
        if played.completed:
            code = self._wait(0.3)
            if code is None:  # still serving the VM it received, as it should
                os.kill(self.proc.pid, signal.SIGTERM)  # the wrapper passes it on (Popen.send_signal would reap)
                code = self._wait(bound)
                if code is None:
                    failures.append(f"the receiver did not stop within {bound:g} s of SIGTERM")
                    self._kill()
                elif code != 0:
                    failures.append(f"after a completed migration and SIGTERM the receiver exited with {code}")
            else:
                if "the VM stopped" not in self._log():  # a VM that fails after the hand-over may end it
                    failures.append(f"the receiver exited with {code} right after a completed migration")
            err = self._stderr()
            if err.strip():
                failures.append(f"stderr after a completed migration: {err.strip()[:400]!r}")
        else:
            code = self._wait(bound)
            if code is None:
                failures.append(f"the receiver did not give up within {bound:g} s of the peer's end")
                self._kill()
                code = self.proc.returncode
            err = self._stderr()
            lines = [line for line in err.splitlines() if line.strip()]
            if code != 1:
                failures.append(f"exit code {code}, not 1")
            if len(lines) != 1 or not lines[0].startswith("chmig receive: error: "):
                failures.append(f"stderr is not exactly one 'chmig receive: error:' line: {err[-600:]!r}")
            else:
                problem = unclear(lines[0])
                if problem:
                    failures.append(problem)
        if self.socket_path is not None and os.path.exists(self.socket_path):
            failures.append(f"the receiver left its socket file {self.socket_path} behind")
            os.unlink(self.socket_path)
        text = self._log()
        for marker in ("Traceback", "bug in chmig", "--- Logging error ---"):
            if marker in text:
                at = text.index(marker)
                failures.append(f"{marker!r} in the receiver's log: {text[max(0, at - 200):at + 600]!r}")
                break
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.proc.stderr.close()  # type: ignore[union-attr]

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def leaks(self, before: dict, failures: list[str]) -> None:
        """A process's fds and threads end with it; what matters is that it ended (checked in finish)."""

    def cleanup(self, keep: bool) -> None:
        for path in (self.rss_path,) if keep else (self.rss_path, self.log_path):
            try:
                path.unlink()
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------
# The fuzzer
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    seed: int
    index: int
    kind: str
    target: str
    detail: str
    failures: list[str]
    trace: list[str]
    seconds: float
    peak_rss: int
    budget: int

    @property
    def failed(self) -> bool:
        return bool(self.failures)

    def describe(self, replay: str = "") -> str:
        rss = f", peak RSS {self.peak_rss / MiB:.1f} of {self.budget / MiB:.0f} MiB"
        lines = [f"FAIL seed={self.seed} index={self.index} kind={self.kind} target={self.target} "
                 f"({self.seconds:.2f} s{rss}): {self.detail}"]
        lines += [f"  - {f}" for f in self.failures]
        lines += ["  trace:"] + self.trace[-14:]
        if replay:
            lines.append(f"  replay: {replay}")
        return "\n".join(lines)


def _limits_with(overrides: dict[str, float]) -> p.Limits:
    fields = {f.name for f in dataclasses.fields(p.Limits)}
    return dataclasses.replace(p.DEFAULT_LIMITS, **{k: v for k, v in overrides.items() if k in fields})


class WireFuzzer:
    """Builds cases from ``(seed, index)``, plays them against a target, judges them (one recording for all)."""

    def __init__(self, workdir: Path | None = None, recording: Path | None = None, report: Report | None = None,
                 bound: float = BOUND_S) -> None:
        self.own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="chmig-fuzz-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        # UNIX socket paths must stay under 108 bytes: a deep work directory gets a short one beside it.
        self.sockdir = self.workdir if len(str(self.workdir)) < 70 else Path(tempfile.mkdtemp(prefix="fz-"))
        self.recording: Recording = load_or_record(recording, self.workdir, report)
        self.recording_dir = recording or self.workdir / "recording"
        self.builder = Builder(self.recording)
        self.bound = bound
        total, available = host_memory()
        self.inprocess_limits = _limits_with(INPROCESS_LIMITS)
        self.env = {
            "inprocess": Env("inprocess", total, available, p.DEFAULT_LIMITS, self.inprocess_limits.role_timeout_s),
            "process": Env("process", total, available, p.DEFAULT_LIMITS, p.DEFAULT_LIMITS.role_timeout_s)}
        self._inprocess = InProcessTarget(self.workdir, self.sockdir, self.inprocess_limits)
        self._process = ProcessTarget(self.workdir, self.sockdir)

    def close(self, keep: bool = False) -> None:
        """Remove the work directory we made, unless failures need its recording and logs."""
        if self.sockdir != self.workdir:
            shutil.rmtree(self.sockdir, ignore_errors=True)
        if self.own_workdir and not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- building ------------------------------------------------------------------------------------

    def case(self, seed: int, index: int, target: str) -> Case:
        """Case ``index`` of ``seed`` for ``target``: the same bytes every time (given the recording)."""
        rng = random.Random(f"chmig-wire:{seed}:{index}")
        env = self.env[target]
        kind = choose_kind(rng)  # the first draw, as kind_of() makes it
        case = build(kind, rng, self.builder, env)
        if target == "process" and not case.process_ok:
            # Cases that wait for the receiver's long default timeouts run in-process only: draw again.
            rng = random.Random(f"chmig-wire:{seed}:{index}:process")
            while True:
                case = build(choose_kind(rng), rng, self.builder, env)
                if case.process_ok:
                    break
        case.index = index
        return case

    def plan(self, case: Case, target: str) -> ReferenceReceiver:
        total, available = host_memory()
        limits = self.inprocess_limits if target == "inprocess" else p.DEFAULT_LIMITS
        ctx = Context(case.transport, limits, total, available, self.builder.config_doc, self.builder.state_doc,
                      case.payload_verdicts)
        model = ReferenceReceiver(ctx)
        case.planned = model.plan(case.stream, case.fds_at, case.hooks)
        return model

    def budget(self, case: Case, model: ReferenceReceiver) -> int:
        """Peak RSS allowed: the base, the guest memory the case could fill, and what parsing payloads costs."""
        workers = [a for a in case.actions() if isinstance(a, Worker)]
        ram = model.facts.ram if model.facts is not None else 0
        if model.memory_fds:
            guest = ram
        else:
            data = sum(x.data for x in case.planned) + sum(w.data for w in workers)
            guest = min(ram, data + POPULATE_WINDOW * (1 + len(workers)))
        def sent(planned: list[Planned], length: int) -> list[int]:  # header+payload bytes actually sent
            return [max(0, min(x.end, length) - x.start - x.data) for x in planned]

        payloads = sent(case.planned, len(case.stream))
        payloads += [sum(sent(w.planned, len(w.stream))) for w in workers]
        return BASE_RSS + guest + 4 * max(payloads, default=0) + 4 * sum(payloads[len(case.planned):])

    def follow_up(self, case: Case, target: str, address: Address, fds: FdFactory, failures: list[str],
                  trace: list[str]) -> Played:
        """After a probe (a main connection that ended before one whole header) the receiver must still be
        listening: a clean migration on a new connection must complete."""
        trace.append("  a probe, not a sender: the receiver must take the next connection's migration")
        from .mutations import _case

        clean = _case("replay", "the follow-up", self.builder.precopy(), case.transport)
        clean.index = case.index
        self.plan(clean, target)
        driver = Driver(clean, address, fds, failures, trace, self.bound)
        played = driver.play()
        if not played.completed:
            failures.append("after a probe connection, a clean migration on a new connection did not complete")
        return played

    # -- running ---------------------------------------------------------------------------------------

    def run_case(self, seed: int, index: int, target: str) -> Result:
        case = self.case(seed, index, target)
        return self.run_built(seed, case, target)

    def run_built(self, seed: int, case: Case, target: str) -> Result:
        model = self.plan(case, target)
        budget = self.budget(case, model)
        log.debug("case %d (%s, %s, %s): %s; plan %s", case.index, case.kind, target, case.transport, case.detail,
                  " ".join(f"{x.describe()}/{x.verdict.value}" for x in case.planned[:12]))
        if is_probe(case):  # a clean migration follows the probe
            budget += self.recording.ram_size + POPULATE_WINDOW
        failures: list[str] = []
        trace = [f"  plan: {' '.join(x.describe() + '/' + x.verdict.value for x in case.planned[:12])}"
                 + (" ..." if len(case.planned) > 12 else "")]
        runner: InProcessTarget | ProcessTarget = self._inprocess if target == "inprocess" else self._process
        fds = FdFactory(self.builder, self.workdir)
        begin = time.monotonic()
        peak = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            for spec in case.all_fds():  # made before the baseline: ours, not the receiver's
                fds.get(spec)
            with runner:
                before = runner.baseline()
                if target == "inprocess":
                    reset_peak_rss()
                try:
                    address = runner.start(case)
                except Exception as exc:
                    failures.append(f"the receiver did not start: {exc}")
                    fds.close()
                    return Result(seed, case.index, case.kind, target, case.detail, failures, trace,
                                  time.monotonic() - begin, 0, budget)
                driver = Driver(case, address, fds, failures, trace, self.bound)
                try:
                    played = driver.play()
                    if is_probe(case) and not failures:
                        played = self.follow_up(case, target, address, fds, failures, trace)
                except Exception as exc:  # a bug of the fuzzer: say so, and still stop the receiver cleanly
                    log.exception("case %d", case.index)
                    failures.append(f"FUZZER ERROR (not chmig's): {exc!r}")
                    played = driver.played
                # Connections still in the listener's backlog end when its owner closes it: the process closes
                # its own when the migration ends (check before stopping it); in-process we own it (finish()
                # closes it, then check).
                if target == "process":
                    driver.finish_kept()
                runner.finish(played, failures, self.bound)
                if target == "inprocess":
                    driver.finish_kept()
                    peak = status_kib("VmHWM") * 1024 - before["rss"]
                else:
                    peak = self._process.peak_rss
                fds.close()
                runner.leaks(before, failures)
            for warning in caught:
                if issubclass(warning.category, ResourceWarning):
                    failures.append(f"ResourceWarning: {warning.message}")
        if peak > budget:
            failures.append(f"peak RSS {peak / MiB:.1f} MiB over the budget of {budget / MiB:.1f} MiB")
        if target == "process":
            self._process.cleanup(keep=bool(failures))
        log.debug("case %d: %d failures, %.2f s, peak RSS %.1f MiB", case.index, len(failures),
                  time.monotonic() - begin, peak / MiB)
        return Result(seed, case.index, case.kind, target, case.detail, failures, trace,
                      time.monotonic() - begin, peak, budget)


def kind_of(seed: int, index: int) -> str:
    """The mutation kind of case ``index`` (the rng's first draw: known without the recording)."""
    return choose_kind(random.Random(f"chmig-wire:{seed}:{index}"))


def is_probe(case: Case) -> bool:
    """Does the main connection end before one whole request header (a port probe, not a sender)?"""
    return not case.planned or (not case.planned[0].complete and case.planned[0].command == -1)


def target_for(seed: int, index: int, mode: str, process_share: float) -> str:
    """Which target case ``index`` runs on: fixed by ``mode``, or interleaved (deterministic per seed)."""
    if mode in ("inprocess", "process"):
        return mode
    return "process" if random.Random(f"chmig-wire-target:{seed}:{index}").random() < process_share else "inprocess"


def run(cases: int, seed: int, report: Report, *, mode: str = "mixed", only: list[int] | None = None,
        recording: Path | None = None, process_share: float = 0.1, bound: float = BOUND_S,
        workdir: Path | None = None, show: bool = False) -> int:
    """Run ``cases`` wire cases of ``seed`` (or only the given indexes); report failures; return their count."""
    fuzzer = WireFuzzer(workdir, recording, report, bound)
    summary = Summary("wire")
    flags = {"inprocess": " --inprocess", "process": " --process"}
    try:
        indexes = only if only else list(range(cases))
        for n, index in enumerate(indexes):
            target = target_for(seed, index, mode, process_share)
            result = fuzzer.run_case(seed, index, target)
            summary.add(result.kind, result.seconds, result.failed, result.peak_rss, target == "process")
            if result.failed:
                summary.failed.append(f"{index}")
                replay = (f"python -m fuzz --target wire --seed {seed} --only {index}{flags.get(mode, '')} "
                          f"--recording {fuzzer.recording_dir}")
                report(result.describe(replay))
            elif show:
                report(result.describe().replace("FAIL", "pass", 1))
            if (n + 1) % 250 == 0:
                report(f"  ... {n + 1}/{len(indexes)} cases, {summary.failures} failures")
        report(summary.table())
        if summary.failed:
            report(f"failing indexes (seed {seed}): {' '.join(summary.failed)}")
        return summary.failures
    finally:
        fuzzer.close(keep=bool(summary.failed))
