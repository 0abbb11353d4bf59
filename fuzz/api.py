"""Fuzz the API socket: mutated HTTP requests against real chmig VMM processes, over their UNIX sockets only.

Two targets are started in a temporary folder: a VMM running a small VM
(``chmig run --cpus boot=1 --memory size=32M``) and an empty VMM (``chmig run
--api-socket`` only, which can receive).  Each case is built from a valid
request of Cloud Hypervisor's API and mutated: methods, paths, request lines,
headers, Content-Length lies, chunked bodies, truncated or oversized bodies,
JSON bodies with null / wrong-typed / huge / nested / non-finite values for
every field of every route, raw byte flips, pipelines, slowloris-style partial
requests given up after a short while, and bursts of idle connections past the
server's connection cap.

Every case is checked:

* whatever came back is a sequence of well-formed HTTP/1.1 responses in Cloud
  Hypervisor's form, which its client ``api_client`` can read: a status line
  with no reason phrase (``HTTP/1.1 200 ``), a status from the API's table,
  pure ASCII, ``Content-Length`` on all but 100 and 204, JSON bodies, and
  errors as Cloud Hypervisor's JSON array of one-line messages (most general
  first): never HTML, never a traceback, never ``internal error``;
* a valid request (built by the model of every field and its rules, postcopy's ``fault_connections`` and
  ``prefetch`` included) is never refused with 400;
* the target is alive and answers ``GET /api/v1/vmm.ping`` within 5 s;
* its log and standard error gained no traceback and no unexpected-error line.

After the run each target's thread count (``/proc/PID/task``) and fd count
(``/proc/PID/fd``) must be back near where they started, and its peak RSS
(``VmHWM``) must have grown by less than :data:`MAX_RSS_GROWTH`.

Safety: nothing leaves the machine.  Requests only go to the targets' UNIX
sockets; the URLs put in bodies are ``unix:`` paths inside the temporary folder
that nothing listens on (send) or that the empty VMM listens on and the fuzzer
cancels at once (receive), or strings ``parse_url`` refuses.  Requests that
would end a target on purpose (``vm.shutdown``, ``vmm.shutdown``) are never
built; a target that dies anyway is a failure, and it is restarted so the run
goes on.

Case ``i`` of seed ``s`` is generated from its own ``random.Random`` seeded by
``(s, i)``, so a run is deterministic and one case can be replayed alone
(``python -m fuzz.api --seed S --only I``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import select
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("fuzz.api")

Report = Callable[[str], None]

#: How long a complete request may take to be answered (the liveness check uses the same bound).
ANSWER_TIMEOUT = 5.0
#: Peak RSS a target may gain over the whole run.
MAX_RSS_GROWTH = 300 << 20
#: Threads and fds a target may have more than at the start, once the run's connections are closed.
THREAD_SLACK = 2
FD_SLACK = 4
#: The server's connection cap (chmig.api.MAX_CONNECTIONS), to know how many 429s an idle burst earns.
SERVER_MAX_CONNECTIONS = 64

#: Lines in a target's log that mean a bug: a traceback, or an unexpected exception the API caught.
BAD_LOG_LINE = re.compile(r"Traceback|Exception ignored| ERROR \S+ chmig\.api: ")
#: micro_http's status line: the code and one space, no reason phrase (api_client parses all of it as the code).
STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9]{2}) ")
#: The statuses the API answers (chmig.api's table); anything else (an old 405, 409 or 503) is a failure.
STATUSES = frozenset({100, 200, 204, 400, 404, 408, 414, 429, 431, 500, 501, 505})

# ---------------------------------------------------------------------------------------------
# Targets: real chmig processes
# ---------------------------------------------------------------------------------------------


def _proc_count(pid: int, what: str) -> int:
    return len(os.listdir(f"/proc/{pid}/{what}"))


def _status_kib(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise ValueError(f"no {name} in /proc/{pid}/status")


@dataclass
class Target:
    """One ``chmig run`` process, its API socket, its log and what it looked like at the start."""

    name: str
    args: list[str]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    api: str = ""
    log_path: Path = Path()
    err_path: Path = Path()
    generation: int = 0
    log_offset: int = 0
    err_offset: int = 0
    threads0: int = 0
    fds0: int = 0
    hwm0_kib: int = 0
    #: Migrations the fuzzer started and cancelled (receive-migration on the empty VMM).
    cancelled: int = 0

    @property
    def has_vm(self) -> bool:
        return bool(self.args)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.generation += 1
        stem = f"{self.name}-{self.generation}"
        self.api = str(self.workdir / f"{stem}.sock")
        self.log_path = self.workdir / f"{stem}.log"
        self.err_path = self.workdir / f"{stem}.stderr"
        self.log_offset = self.err_offset = 0
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chmig", "-vv", "--log-file", str(self.log_path), "run", "--api-socket",
                 self.api, "--serial", "off", *self.args],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + 30
        while not self.ping(timeout=1.0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fuzz target {self.name} did not start: {self.err_path.read_text()[-2000:]}")
            time.sleep(0.05)
        time.sleep(0.2)  # the ping's connection thread ends: the baseline is the idle server
        self.threads0 = _proc_count(self.pid, "task")
        self.fds0 = _proc_count(self.pid, "fd")
        self.hwm0_kib = _status_kib(self.pid, "VmHWM")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ping(self, timeout: float = ANSWER_TIMEOUT) -> bool:
        """``GET /api/v1/vmm.ping`` answered 200 by ``timeout`` (retrying while the server is busy: 429)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                stream, _ = exchange(self.api, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n", deadline)
                answers, problem = parse_responses(stream)
                if problem is None and answers and answers[0].status == 200:
                    return True
            except OSError:
                pass
            if time.monotonic() >= deadline or not self.alive():
                return False
            time.sleep(0.05)

    def new_log_lines(self) -> list[str]:
        """Lines the log and standard error gained since the last call that mean a bug."""
        bad: list[str] = []
        for attr, path in (("log_offset", self.log_path), ("err_offset", self.err_path)):
            try:
                with open(path, "rb") as f:
                    f.seek(getattr(self, attr))
                    text = f.read()
            except FileNotFoundError:
                continue
            setattr(self, attr, getattr(self, attr) + len(text))
            for line in text.decode(errors="replace").splitlines():
                if BAD_LOG_LINE.search(line) or (path == self.err_path and line.strip()):
                    bad.append(f"{path.name}: {line[:300]}")
        return bad

    def settle(self, timeout: float = 5.0) -> tuple[int, int]:
        """Threads and fds once the connections the run opened have ended (waits for them up to ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            threads, fds = _proc_count(self.pid, "task"), _proc_count(self.pid, "fd")
            if (threads <= self.threads0 + THREAD_SLACK and fds <= self.fds0 + FD_SLACK) \
                    or time.monotonic() > deadline:
                return threads, fds
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The client side: raw bytes on a UNIX socket, and what a well-formed answer is
# ---------------------------------------------------------------------------------------------


def _connect(api: str, timeout: float) -> socket.socket:
    """Connect by ``timeout``; a full listen backlog (EAGAIN on a UNIX socket) is waited out, not an error."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            sock.connect(api)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{api}: the listen backlog stayed full for {timeout:g} s") from None
            time.sleep(0.005)
        except OSError:
            sock.close()
            raise


def _send(sock: socket.socket, data: bytes) -> None:
    """Send what the server takes; it may answer (400, 429) and close before reading all of it."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    except TimeoutError:
        pass  # the server stopped reading (it answered early): what it said is still to be read


def _read_until_eof(sock: socket.socket, deadline: float, on_stall: Callable[[], None] | None = None) -> tuple[bytes, bool]:
    """Everything the server sends until it closes, or the deadline; (bytes, whether it closed).

    ``on_stall`` runs whenever nothing arrived for half a second (the empty VMM's
    receive-migration waits for a migration until it is cancelled; a pipeline may hold several).
    """
    data = bytearray()
    stalled_at = time.monotonic() + 0.5
    while True:
        now = time.monotonic()
        if now >= deadline:
            return bytes(data), False
        wait = min(deadline, stalled_at) - now if on_stall is not None else deadline - now
        ready, _, _ = select.select([sock], [], [], max(wait, 0))
        if not ready:
            if on_stall is not None and time.monotonic() >= stalled_at:
                on_stall()
                stalled_at = time.monotonic() + 0.5
            continue
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # the server closed with our unread bytes in its queue
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk
        stalled_at = time.monotonic() + 0.5


def exchange(api: str, data: bytes, deadline: float,
             on_stall: Callable[[], None] | None = None) -> tuple[bytes, bool]:
    """Send ``data``, say we are done (SHUT_WR), and read the answers until the server closes."""
    sock = _connect(api, max(deadline - time.monotonic(), 0.1))
    try:
        _send(sock, data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return _read_until_eof(sock, deadline, on_stall)
    finally:
        sock.close()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_responses(stream: bytes) -> tuple[list[Response], str | None]:
    """Split ``stream`` into HTTP/1.1 responses; the second item says what is malformed, if anything."""
    answers: list[Response] = []
    if not stream.isascii():  # api_client decodes each 256-byte chunk as UTF-8 on its own: a cut character panics
        return answers, f"an answer that is not pure ASCII: {stream[:200]!r}"
    rest = stream
    while rest:
        head, sep, after = rest.partition(b"\r\n\r\n")
        if not sep:
            return answers, f"a response without the end of its headers: {rest[:120]!r}"
        status_line, *lines = head.split(b"\r\n")
        match = STATUS_LINE.fullmatch(status_line)
        if match is None:
            return answers, f"not an HTTP/1.1 status line: {status_line[:120]!r}"
        status = int(match.group(1))
        if status not in STATUSES:
            return answers, f"HTTP {status}: not a status of the API"
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                return answers, f"a malformed header line: {line[:120]!r}"
            headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()
        if "server" not in headers or headers.get("connection") not in ("keep-alive", "close"):
            return answers, f"HTTP {status} without micro_http's Server and Connection headers: {head[:200]!r}"
        if status in (100, 204):  # micro_http: neither Content-Type nor Content-Length, no body
            if "content-length" in headers or "content-type" in headers:
                return answers, f"HTTP {status} with a Content-Length or Content-Type"
            answers.append(Response(status, headers, b""))
            rest = after
            continue
        length_text = headers.get("content-length")
        if length_text is None:
            return answers, f"HTTP {status} without Content-Length"
        elif not length_text.isdigit():
            return answers, f"HTTP {status} with Content-Length {length_text!r}"
        else:
            length = int(length_text)
        if len(after) < length:
            return answers, f"HTTP {status}: body of {len(after)} bytes, {length} announced"
        body, rest = after[:length], after[length:]
        problem = check_body(status, headers, body)
        answers.append(Response(status, headers, body))
        if problem is not None:
            return answers, problem
    return answers, None


def check_body(status: int, headers: dict[str, str], body: bytes) -> str | None:
    """A body is empty or JSON; an error is Cloud Hypervisor's array of one-line messages (``ch-remote`` reads it
    as ``Vec<String>``); no traceback, no HTML, no internal error."""
    if b"Traceback" in body or b"<html" in body.lower() or b"<!doctype" in body.lower():
        return f"HTTP {status} with a traceback or HTML body: {body[:200]!r}"
    if headers.get("content-type") != "application/json":
        return f"HTTP {status} is not labelled JSON ({headers.get('content-type')!r})"
    if not body:
        return f"HTTP {status} error without a body" if status >= 400 else None
    try:
        decoded = json.loads(body)
    except ValueError:
        return f"HTTP {status} body is not JSON: {body[:200]!r}"
    if status >= 400:
        if not isinstance(decoded, list) or not decoded \
                or not all(isinstance(m, str) and m and "\n" not in m for m in decoded):
            return f"HTTP {status} error is not an array of one-line messages: {body[:200]!r}"
        if any("internal error" in m for m in decoded):
            return f"HTTP {status} from a bug behind the route: {body[:200]!r}"
    return None


# ---------------------------------------------------------------------------------------------
# Building requests
# ---------------------------------------------------------------------------------------------

#: The routes a case may aim at.  vm.shutdown and vmm.shutdown end the target on purpose: never sent.
ROUTES: list[tuple[str, str]] = [
    ("GET", "vmm.ping"),
    ("GET", "vm.info"),
    ("PUT", "vm.pause"),
    ("PUT", "vm.resume"),
    ("PUT", "vm.send-migration"),
    ("PUT", "vm.receive-migration"),
    ("PUT", "vm.cancel-migration"),
    ("PUT", "vm.snapshot"),
    ("PUT", "vm.restore"),
]
FORBIDDEN_ACTIONS = frozenset({"vm.shutdown", "vmm.shutdown"})

SEND_FIELDS = {"destination_url": str, "local": bool, "preserve_source": bool, "downtime_ms": int,
               "timeout_s": int, "timeout_strategy": str, "connections": int, "tls_dir": str, "memory_mode": str,
               "fault_connections": int}
RECEIVE_FIELDS = {"receiver_url": str, "tls_dir": str, "memory_mode": str, "vfio_fds": list, "iommufd_fd": int,
                  "zone_updates": list, "prefetch": str}
SNAPSHOT_FIELDS = {"destination_url": str}
RESTORE_FIELDS = {"source_url": str, "prefault": bool, "memory_restore_mode": str, "net_fds": list,
                  "vfio_fds": list, "iommufd_fd": int, "resume": bool, "zone_updates": list}
#: Which fields each route with a body takes.
FIELDS_OF = {"vm.send-migration": SEND_FIELDS, "vm.receive-migration": RECEIVE_FIELDS,
             "vm.snapshot": SNAPSHOT_FIELDS, "vm.restore": RESTORE_FIELDS}
#: file:// URLs for vm.snapshot and vm.restore (a snapshot may really be written into the workdir; a restore
#: never finds one there: restoring would give the empty target a VM).
FILE_URL_FIELDS = frozenset({"source_url"})
#: Postcopy: fault_connections is 1..16 and only with memory_mode=postcopy (which refuses local=true and
#: connections > 1); prefetch (string or null) is page, off or a page-aligned size from 256K to 2M, and only with
#: memory_mode=postcopy.  preserve_source only with local (Cloud Hypervisor's rule).  Enums are Cloud
#: Hypervisor's variant names (serde's "Postcopy", "Cancel") or all lower case.
MAX_FAULT_CONNECTIONS = 16
VALID_PREFETCH = ["page", "off", "PAGE", "256K", "1M", "2M", "2m", "524288", "300K", "1536K"]
#: Refused: out of range, not page aligned, not a size.
BAD_PREFETCH = ["0", "4K", "255K", "2049K", "3M", "257K", "1G", "-1M", "pages", "1.5M", "1M ", "0x100000"]
URL_FIELDS = frozenset({"destination_url", "receiver_url"})
#: URL strings parse_url refuses: no tcp: URL here can ever be connected to (or even resolved).
BAD_URLS = ["", "tcp:", "tcp:x", "tcp:[::1", "udp:1.2.3.4:5", "unix:", "unix", ":", "unix:\u0000x", "http://x/",
            "UNIX:/x", "\u00e9:\u00e9"]
METHODS = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "get", "PUT ", "",
           "G\x00T", "X" * 300, "\u00c9T".encode("utf-8").decode("latin-1")]
VERSIONS = ["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/0.9", "HTTP/1.1.1", "HTTP/x", "HTTPS/1.1", "http/1.1",
            "HTTP/01.01", "HTTP/1", "HTTP/" + "1" * 20 + ".1", ""]
HEADER_NAMES = ["Content-Length", "Transfer-Encoding", "Expect", "Connection", "Content-Type", "Host", "X-Junk",
                "Content-Length ", " Content-Length", "content-length", "Upgrade", ""]


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    eol: bytes = b"\r\n"

    def encode(self) -> bytes:
        line = " ".join(part for part in (self.method, self.target, self.version) if part)
        head = [line] + [f"{name}: {value}" for name, value in self.headers]
        return self.eol.join(part.encode("latin-1", "replace") for part in head) + self.eol * 2 + self.body


@dataclass
class Case:
    """One generated case: what it is, the bytes to send, how to send them."""

    index: int
    kind: str
    target: Target
    data: bytes = b""
    expect_answer: bool = False
    #: "exchange": send, SHUT_WR, read to EOF.  "slow": send part, linger, close.  "idle": a burst of idle clients.
    mode: str = "exchange"
    slow_delay: float = 0.0
    trickle: int = 0
    burst: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        shown = self.data[:160]
        more = f"... ({len(self.data)} bytes)" if len(self.data) > 160 else ""
        return f"case {self.index} [{self.kind} -> {self.target.name}] {shown!r}{more}"


class Generator:
    """Builds case ``index`` from its own random stream (replayable alone)."""

    def __init__(self, seed: int, workdir: Path, targets: list[Target]) -> None:
        self.seed = seed
        self.workdir = workdir
        self.targets = targets

    def case(self, index: int) -> Case:
        rng = random.Random(f"chmig-api-fuzz:{self.seed}:{index}")
        target = rng.choice(self.targets)
        kind = rng.choices(
            ["valid", "json", "body-bytes", "headers", "request-line", "byte-flips", "pipeline", "oversize",
             "slow", "idle"],
            weights=[10, 30, 10, 15, 10, 8, 6, 3, 6, 2])[0]
        case = Case(index, kind, target)
        build = getattr(self, "_" + kind.replace("-", "_"))
        build(rng, case)
        return case

    # -- valid requests, and the pieces mutations start from -------------------------------------

    def _nowhere(self, rng: random.Random) -> str:
        """A unix: URL in the workdir that nothing listens on (so a send fails at connect)."""
        return f"unix:{self.workdir}/nowhere-{rng.randrange(1000)}.sock"

    def _receive_url(self, rng: random.Random) -> str:
        """A fresh unix: URL in the workdir for the empty VMM to listen on (never one a send aims at)."""
        return f"unix:{self.workdir}/rx-{rng.randrange(1 << 30)}.sock"

    def _valid_body(self, rng: random.Random, action: str) -> dict[str, Any] | None:
        if action == "vm.send-migration":
            body: dict[str, Any] = {"destination_url": self._nowhere(rng)}
            postcopy = rng.random() < 0.3
            local = rng.random() < 0.5 and not postcopy
            optional = {"local": local, "preserve_source": local and rng.random() < 0.5,
                        "downtime_ms": rng.choice([1, 300, 10_000]), "timeout_s": rng.choice([1, 3600]),
                        "timeout_strategy": rng.choice(["Cancel", "Ignore", "cancel", "ignore"]),
                        "connections": 1,
                        "memory_mode": rng.choice(["postcopy", "Postcopy"] if postcopy else ["precopy", "Precopy"]),
                        "tls_dir": None}
            if postcopy:
                optional["fault_connections"] = rng.choice([1, 2, 4, MAX_FAULT_CONNECTIONS])
            for name in rng.sample(sorted(optional), rng.randrange(len(optional) + 1)):
                body[name] = optional[name]
            if postcopy:
                body["memory_mode"] = optional["memory_mode"]
            if body.get("preserve_source"):
                body["local"] = True
            return body
        if action == "vm.receive-migration":
            body = {"receiver_url": self._receive_url(rng)}
            if rng.random() < 0.5:  # what ch-remote always sends along
                body.update({"vfio_fds": None, "iommufd_fd": None, "zone_updates": []})
            if rng.random() < 0.3:
                body["memory_mode"] = rng.choice(["precopy", "Precopy"])
            elif rng.random() < 0.4:
                body["memory_mode"] = rng.choice(["postcopy", "Postcopy"])
                if rng.random() < 0.7:
                    body["prefetch"] = rng.choice(VALID_PREFETCH + [None])
            if rng.random() < 0.2:
                body["tls_dir"] = None
            return body
        if action == "vm.snapshot":
            return {"destination_url": self._snapshot_url(rng)}
        if action == "vm.restore":
            body = {"source_url": self._no_snapshot_url(rng, well_formed=True)}
            ondemand = rng.random() < 0.4
            optional = {"prefault": rng.random() < 0.3 and not ondemand, "resume": rng.random() < 0.5,
                        "net_fds": None, "vfio_fds": None, "iommufd_fd": None, "zone_updates": [],
                        "memory_restore_mode": rng.choice(["ondemand", "OnDemand"] if ondemand else ["copy", "Copy"])}
            for name in rng.sample(sorted(optional), rng.randrange(len(optional) + 1)):
                body[name] = optional[name]
            if ondemand:
                body["memory_restore_mode"] = optional["memory_restore_mode"]
            return body
        return None

    def _snapshot_url(self, rng: random.Random) -> str:
        """Where a snapshot of the (small) target VM may be written: a fresh directory in the workdir."""
        return f"file://{self.workdir}/snap-{rng.randrange(1 << 30)}"

    def _no_snapshot_url(self, rng: random.Random, well_formed: bool = False) -> str:
        """A file:// URL where no snapshot is (missing, or a directory of junk): a restore must fail cleanly.

        Not ``well_formed``: also URLs the API refuses as such (not file://, empty).
        """
        junk = self.workdir / "junk-snapshot"
        if not junk.exists():
            junk.mkdir(parents=True, exist_ok=True)
            (junk / "config.json").write_text("{not json")
            (junk / "state.json").write_text("[]")
            (junk / "memory-ranges").write_bytes(b"\0" * 4096)
        urls = [f"file://{self.workdir}/missing-{rng.randrange(1000)}", f"file://{junk}", "file:///nonexistent"]
        return rng.choice(urls if well_formed else urls + ["file://relative", "http://x/y", "file:", ""])

    def _request(self, rng: random.Random, method: str, action: str, body: bytes | None) -> Request:
        headers = [("Host", "localhost")]
        if body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        return Request(method, "/api/v1/" + action, "HTTP/1.1", headers, body or b"")

    def _valid_request(self, rng: random.Random) -> Request:
        method, action = rng.choice(ROUTES)
        body = self._valid_body(rng, action)
        return self._request(rng, method, action, json.dumps(body).encode() if body is not None else None)

    def _valid(self, rng: random.Random, case: Case) -> None:
        case.data = self._valid_request(rng).encode()
        case.expect_answer = True

    # -- JSON bodies -------------------------------------------------------------------------------

    def _value(self, rng: random.Random, name: str, kind: type) -> Any:
        """A value for field ``name``: often wrong (null, wrong type, out of range), sometimes right."""
        depth = rng.randrange(1, 40)
        pool: list[Any] = [
            None, True, False, 0, -1, 1, 2 ** 63, 2 ** 64 - 1, 2 ** 64, -(2 ** 63), 10 ** 30, 1.5, -0.0, 1e308,
            float("nan"), float("inf"), float("-inf"), "", "x" * rng.choice([1, 100, 5000]), "\u0000", "\ud800x",
            [], {}, [None], {"a": 1}, [[[]]], json.loads("[" * depth + "]" * depth),
        ]
        if name in FILE_URL_FIELDS:
            pool += [self._no_snapshot_url(rng), "file://" + "d/" * 2000]
        elif name == "destination_url" and rng.random() < 0.3:
            pool += [self._snapshot_url(rng), "file:///proc/x", f"file://{self.workdir}/a/b/c", "file://"]
        elif kind is str and name in URL_FIELDS:
            good = self._receive_url(rng) if name == "receiver_url" else self._nowhere(rng)
            pool += [rng.choice(BAD_URLS), good, f"unix:{self.workdir}/" + "d/" * 80 + "x.sock"]
        elif name == "prefetch":
            pool += VALID_PREFETCH + BAD_PREFETCH + ["precopy", "\n"]
        elif kind is str:
            pool += ["precopy", "postcopy", "cancel", "ignore", "bogus", str(self.workdir), "/nonexistent",
                     "\n", "a,b=c"]
        elif name == "fault_connections":
            pool += [2, MAX_FAULT_CONNECTIONS, MAX_FAULT_CONNECTIONS + 1, 128]
        elif kind is int:
            pool += [2, 128, 129, 300, 3600]
        return rng.choice(pool)

    def _json(self, rng: random.Random, case: Case) -> None:
        method, action = rng.choice([r for r in ROUTES if r[1] in FIELDS_OF] + [rng.choice(ROUTES)])
        fields = FIELDS_OF.get(action, RECEIVE_FIELDS)
        body: Any = self._valid_body(rng, action) or {}
        for _ in range(rng.randrange(1, 4)):
            op = rng.random()
            if op < 0.6 and isinstance(body, dict):
                name = rng.choice(sorted(fields))
                body[name] = self._value(rng, name, fields[name])
            elif op < 0.7 and isinstance(body, dict) and body:
                del body[rng.choice(sorted(body))]
            elif op < 0.8 and isinstance(body, dict):
                body[rng.choice(["destination", "receiver", "", "x" * 200, "\u00e9", "tls_dir "])] = 1
            else:
                body = rng.choice([[], [body], "a string", 42, None, True, 1e999, [1] * 100])
        text = json.dumps(body, allow_nan=True).encode()  # NaN and Infinity go out as their JS literals
        case.data = self._request(rng, method, action, _safe_urls(text, self._nowhere(rng))).encode()
        case.expect_answer = True

    def _body_bytes(self, rng: random.Random, case: Case) -> None:
        method, action = rng.choice(ROUTES)
        valid = json.dumps(self._valid_body(rng, action) or {"a": 1}).encode()
        depth = rng.choice([10, 63, 64, 65, 500, 990, 5000, 200_000])
        choice = rng.randrange(12)
        body = [
            valid[: rng.randrange(len(valid) + 1)],                         # truncated
            valid + b"}" * rng.randrange(1, 4),                               # trailing junk
            b"[" * depth + b"]" * depth,                                      # nesting
            b'{"a":' * depth + b"1" + b"}" * depth,
            b"\xef\xbb\xbf" + valid,                                          # a BOM
            valid.decode().encode("utf-16"),
            bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))),    # noise
            b'{"connections": ' + b"9" * rng.choice([20, 4299, 4301, 100_000]) + b"}",
            b'{"downtime_ms": 1' + b"0" * 400 + b".5e-400}",
            b"[" + b"[]," * rng.choice([10, 1000, 300_000]) + b"[]]",          # many small arrays
            b" " * rng.choice([0, 100, 1 << 19]) + valid,                     # whitespace padding
            valid.replace(b"{", b'{"destination_url": 1, ', 1),               # duplicate keys
        ][choice]
        case.data = self._request(rng, method, action, _safe_urls(body, self._nowhere(rng))).encode()
        case.expect_answer = True

    # -- the request line and the headers ----------------------------------------------------------

    def _mutate_target(self, rng: random.Random, target: str) -> str:
        ops: list[Callable[[str], str]] = [
            lambda t: t[: rng.randrange(len(t) + 1)],
            lambda t: t + rng.choice(["?x=1", "#frag", "/", "/..", "%00", "\u00e9", " ", "\t"]),
            lambda t: t.upper(),
            lambda t: t.replace("/api/v1/", rng.choice(["/api/v2/", "//api/v1/", "/api/v1//", "api/v1/", "/"])),
            lambda t: "/api/v1/" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz.-_%") for _ in range(12)),
            lambda t: "*",
            lambda t: "http://localhost" + t,
            lambda t: "/" + "a" * rng.choice([100, 8000, 70_000]),
            lambda t: t.replace(".", rng.choice(["%2e", "..", "_"])),
        ]
        return rng.choice(ops)(target)

    def _request_line(self, rng: random.Random, case: Case) -> None:
        request = self._valid_request(rng)
        for _ in range(rng.randrange(1, 3)):
            part = rng.randrange(4)
            if part == 0:
                request.method = rng.choice(METHODS)
            elif part == 1:
                request.target = self._mutate_target(rng, request.target)
            elif part == 2:
                request.version = rng.choice(VERSIONS)
            else:
                request.eol = rng.choice([b"\n", b"\r", b"\r\r\n", b"\n\r"])
        case.data = request.encode()
        case.expect_answer = False

    def _headers(self, rng: random.Random, case: Case) -> None:
        request = self._valid_request(rng)
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(10)
            length = len(request.body)
            if op == 0:  # Content-Length lies and non-numbers
                value = rng.choice([str(length + rng.randrange(1, 100)), str(max(length - 1, 0)), "-1", "-100",
                                    "abc", "1_0", "+5", "0x10", " 7 ", "", "9" * 40, str(1 << 20), "1e3", "٣"])
                request.headers = [(n, v) for n, v in request.headers if n != "Content-Length"]
                request.headers.append(("Content-Length", value))
            elif op == 1:
                request.headers.append(("Content-Length", str(length + rng.randrange(0, 3))))
            elif op == 2:
                request.headers.append(("Transfer-Encoding", rng.choice(["chunked", "gzip, chunked", "identity",
                                                                          "CHUNKED", ""])))
                if rng.random() < 0.5:
                    request.body = b"%x\r\n" % len(request.body) + request.body + b"\r\n0\r\n\r\n"
            elif op == 3:
                request.headers.append(("Expect", rng.choice(["100-continue", "200-ok", "100-CONTINUE"])))
            elif op == 4:
                request.headers.append(("Connection", rng.choice(["close", "keep-alive", "upgrade", "Close, x"])))
            elif op == 5:  # many or huge headers
                count = rng.choice([50, 99, 101, 500])
                request.headers += [(f"X-{i}", "y") for i in range(count)]
            elif op == 6:
                request.headers.append(("X-Big", "v" * rng.choice([1000, 65_000, 70_000])))
            elif op == 7:  # malformed header lines
                request.headers.append((rng.choice(HEADER_NAMES),
                                        rng.choice(["", " ", "\u00e9", "a\rb", "x" * 10, "\x00", "1, 2"])))
            elif op == 8:
                request.headers.append(("No colon here", "") if rng.random() < 0.5 else (" folded", "line"))
            else:
                rng.shuffle(request.headers)
        case.data = request.encode()
        case.expect_answer = False

    def _byte_flips(self, rng: random.Random, case: Case) -> None:
        data = bytearray(self._valid_request(rng).encode())
        for _ in range(rng.randrange(1, 8)):
            op = rng.randrange(4)
            at = rng.randrange(len(data))
            if op == 0:
                data[at] = rng.randrange(256)
            elif op == 1:
                del data[at]
            elif op == 2:
                data.insert(at, rng.choice(b"\r\n :\x00\xff{}[]\""))
            else:
                data[at:at] = data[rng.randrange(len(data)):][: rng.randrange(1, 40)]
        case.data = _guard(bytes(data))
        case.expect_answer = False

    def _pipeline(self, rng: random.Random, case: Case) -> None:
        parts = []
        for _ in range(rng.randrange(2, 6)):
            request = self._valid_request(rng)
            if rng.random() < 0.3:
                request.headers.append(("Connection", "keep-alive"))
            parts.append(request.encode())
        case.data = b"".join(parts)
        case.expect_answer = True

    def _oversize(self, rng: random.Random, case: Case) -> None:
        size = rng.choice([(1 << 20) + 1, 2 << 20, 8 << 20])
        announced = size if rng.random() < 0.7 else rng.choice([10, 1 << 20])
        body = b'{"destination_url": "' + b"a" * (size - 24) + b'"}'
        request = self._request(rng, "PUT", "vm.send-migration", body)
        request.headers[-1] = ("Content-Length", str(announced))
        case.data = request.encode()
        case.expect_answer = False

    # -- slow and idle clients ---------------------------------------------------------------------

    def _slow(self, rng: random.Random, case: Case) -> None:
        data = self._valid_request(rng).encode()
        case.data = data[: rng.randrange(len(data))]  # never the whole request
        case.mode = "slow"
        case.slow_delay = rng.choice([0.0, 0.05, 0.2])
        case.trickle = rng.choice([0, 0, 5, 20])

    def _idle(self, rng: random.Random, case: Case) -> None:
        case.mode = "idle"
        case.burst = rng.choice([10, 40, SERVER_MAX_CONNECTIONS + 1, 100])
        data = self._valid_request(rng).encode()
        case.data = data[: rng.randrange(len(data))]


def _safe_urls(body: bytes, nowhere: str) -> bytes:
    """Never a tcp: URL that could be connected to or resolved: any "tcp:" but the refused forms is replaced."""
    def replace(match: re.Match[bytes]) -> bytes:
        text = match.group(0)
        return text if text.decode(errors="replace").strip('"') in BAD_URLS else json.dumps(nowhere).encode()

    return re.sub(rb'"tcp:[^"]*"', replace, body)


def _guard(data: bytes) -> bytes:
    """A byte-flipped request must not turn into one that ends the target (vm.shutdown, vmm.shutdown)."""
    for action in FORBIDDEN_ACTIONS:
        data = data.replace(action.encode(), b"vm.info")
    return _safe_urls(data, "unix:/nonexistent/fuzz.sock")


# ---------------------------------------------------------------------------------------------
# Running cases
# ---------------------------------------------------------------------------------------------


def _cancel(target: Target) -> None:
    """Stop a receive-migration the case started (204), or nothing if none runs (500)."""
    try:
        stream, _ = exchange(target.api, b"PUT /api/v1/vm.cancel-migration HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                             time.monotonic() + ANSWER_TIMEOUT)
    except OSError as exc:
        log.debug("cancel-migration: %s", exc)
        return
    answers, _ = parse_responses(stream)
    if answers and answers[0].status == 204:
        target.cancelled += 1


def run_case(case: Case) -> list[str]:
    """Play one case; return what was wrong (empty when all is well)."""
    target = case.target
    problems: list[str] = []
    if case.mode == "exchange":
        on_stall = (lambda: _cancel(target)) if not target.has_vm else None
        started = time.monotonic()
        try:
            stream, closed = exchange(target.api, case.data, started + ANSWER_TIMEOUT + 1, on_stall)
        except OSError as exc:
            return [f"cannot talk to the server: {exc}"]
        answers, problem = parse_responses(stream)
        if problem is not None:
            problems.append(problem)
        if not closed:
            problems.append(f"no end of the answer within {ANSWER_TIMEOUT + 1:g} s (got {len(stream)} bytes)")
        if case.expect_answer and not answers:
            problems.append("a complete request got no answer")
        if any(a.status == 429 for a in answers):
            problems.append("429 (connection cap) with only this case's connection open")
        if case.kind == "valid" and any(a.status == 400 for a in answers):
            # The model's valid bodies follow every rule of the fields (postcopy's too): a 400 means the
            # model and the server disagree about what is valid.
            refused = next(a for a in answers if a.status == 400)
            problems.append(f"a valid request was refused: {refused.body[:200]!r}")
    elif case.mode == "slow":
        try:
            sock = _connect(target.api, ANSWER_TIMEOUT)
        except OSError as exc:
            return [f"cannot connect: {exc}"]
        with sock:
            _send(sock, case.data)
            for _ in range(case.trickle):  # a byte at a time, as a slowloris does
                _send(sock, b"X")
                time.sleep(0.01)
            time.sleep(case.slow_delay)
    else:
        problems += _idle_burst(case)
    if not target.alive():
        problems.append(f"the server died (exit {target.proc.returncode if target.proc else '?'})")
    elif not target.ping():
        problems.append(f"the server did not answer vmm.ping within {ANSWER_TIMEOUT:g} s")
    problems += target.new_log_lines()
    return problems


def _idle_burst(case: Case) -> list[str]:
    """Open ``burst`` connections that say little or nothing; those past the cap must get a JSON 429."""
    problems: list[str] = []
    socks: list[socket.socket] = []
    try:
        for _ in range(case.burst):
            sock = _connect(case.target.api, ANSWER_TIMEOUT)
            socks.append(sock)
            _send(sock, case.data)
        deadline = time.monotonic() + 1.0
        expected = max(case.burst - SERVER_MAX_CONNECTIONS, 0)
        refused = 0
        waiting = list(socks)
        while refused < expected and time.monotonic() < deadline:
            ready, _, _ = select.select(waiting, [], [], 0.05)
            for sock in ready:
                waiting.remove(sock)
                stream, _ = _read_until_eof(sock, time.monotonic() + 1.0)
                answers, problem = parse_responses(stream)
                if problem is not None:
                    problems.append(f"idle connection: {problem}")
                elif [a.status for a in answers] == [429]:
                    refused += 1
                else:
                    problems.append(f"idle connection answered {[a.status for a in answers]} before its request")
        if refused < expected:
            problems.append(f"{case.burst} idle connections: {refused} answered 429, expected {expected}")
    except OSError as exc:
        problems.append(f"idle burst: {exc}")
    finally:
        for sock in socks:
            sock.close()
    return problems


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _targets(workdir: Path) -> list[Target]:
    return [Target("vm", ["--cpus", "boot=1", "--memory", "size=32M"], workdir),
            Target("empty", [], workdir)]


def _final_checks(target: Target, report: Report) -> int:
    """Threads, fds and peak RSS after the run; returns the number of failures."""
    if not target.alive():
        report(f"FAIL {target.name}: not running at the end")
        return 1
    threads, fds = target.settle()
    hwm = _status_kib(target.pid, "VmHWM")
    growth = (hwm - target.hwm0_kib) << 10
    report(f"{target.name} (pid {target.pid}): threads {target.threads0} -> {threads}, fds {target.fds0} -> {fds}, "
           f"peak RSS {target.hwm0_kib >> 10} -> {hwm >> 10} MiB, migrations cancelled {target.cancelled}")
    failures = 0
    if threads > target.threads0 + THREAD_SLACK:
        report(f"FAIL {target.name}: {threads} threads after the run, {target.threads0} at the start")
        failures += 1
    if fds > target.fds0 + FD_SLACK:
        report(f"FAIL {target.name}: {fds} fds after the run, {target.fds0} at the start: "
               f"{sorted(os.readlink(f'/proc/{target.pid}/fd/{fd}') for fd in os.listdir(f'/proc/{target.pid}/fd'))}")
        failures += 1
    if growth > MAX_RSS_GROWTH:
        report(f"FAIL {target.name}: peak RSS grew by {growth >> 20} MiB (at most {MAX_RSS_GROWTH >> 20})")
        failures += 1
    full_log = target.log_path.read_text(errors="replace") + target.err_path.read_text(errors="replace")
    if "Traceback" in full_log:
        report(f"FAIL {target.name}: a traceback in {target.log_path}")
        failures += 1
    return failures


def run(cases: int, seed: int, report: Report, only: int | None = None) -> int:
    """Play ``cases`` cases of seed ``seed`` (or only case ``only``); report each failure; return how many failed."""
    failures = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chmig-fuzz-api-") as tmp:
        workdir = Path(tmp)
        targets = _targets(workdir)
        try:
            for target in targets:
                target.start()
            generator = Generator(seed, workdir, targets)
            indices: Iterator[int] = iter([only]) if only is not None else iter(range(cases))
            kinds: dict[str, int] = {}
            for index in indices:
                case = generator.case(index)
                kinds[case.kind] = kinds.get(case.kind, 0) + 1
                problems = run_case(case)
                if problems:
                    failures += 1
                    report(f"FAIL {case.describe()}: {'; '.join(problems)}")
                    if not case.target.alive():
                        report(f"restarting {case.target.name} (its log: {case.target.log_path})")
                        case.target.stop()
                        case.target.start()
            for target in targets:
                failures += _final_checks(target, report)
            played = 1 if only is not None else cases
            report(f"api fuzz: seed {seed}, {played} cases "
                   f"({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), {failures} failures, "
                   f"{time.monotonic() - started:.1f} s")
        finally:
            for target in targets:
                target.stop()
    return failures


def main(argv: list[str] | None = None) -> int:
    """``python -m fuzz.api --cases N --seed S [--only I]``."""
    parser = argparse.ArgumentParser(prog="python -m fuzz.api", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", type=int, help="replay only this case of the seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return 1 if run(args.cases, args.seed, lambda line: print(line, flush=True), only=args.only) else 0


if __name__ == "__main__":
    sys.exit(main())
