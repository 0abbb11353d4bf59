"""The API socket against hostile or broken clients: real processes, real UNIX sockets, raw HTTP bytes.

Each test first reproduced a bug of the hardening issue: a negative Content-Length
read to EOF, idle clients held a thread each forever, null fields and deep nesting
gave 500 with a traceback, chunked bodies were dropped, malformed requests got an
HTML page, ``--api-socket`` deleted a regular file, the socket's mode came from
the umask, and ``chmig remote ... | head`` ended in a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chmig.api import ApiServer
from chmig.apiclient import ApiError, request
from fuzz.api import BAD_LOG_LINE

from .conftest import Processes, VmmProcess, requires_kvm

pytestmark = pytest.mark.timeout(60)

CHMIG = [sys.executable, "-m", "chmig"]


# -- a raw HTTP client -------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _read_answer(sock: socket.socket) -> Answer | None:
    """One HTTP response from ``sock`` (None if it closed without one)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            assert not data, f"the connection closed in the middle of a response: {data!r}"
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, code, reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1" and reason == "", status_line  # Cloud Hypervisor's form: no reason phrase
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of a response body"
        body += chunk
    return Answer(int(code), headers, body[:length])


def raw(api: str, data: bytes, timeout: float = 5.0, close_write: bool = False) -> Answer | None:
    """Send ``data`` on a fresh connection and read one answer (the socket stays open for writing unless asked)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(api)
        try:
            sock.sendall(data)
            if close_write:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (429, 400) and closed before reading all: its answer is still there
        return _read_answer(sock)


def put(action: str, body: bytes, extra: str = "") -> bytes:
    return (f"PUT /api/v1/{action} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


def assert_json_error(answer: Answer | None, status: int, contains: str = "") -> None:
    assert answer is not None, "no answer"
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers.get("content-type") == "application/json", answer.headers
    messages = answer.json()  # Cloud Hypervisor's error body: an array of one-line messages, most general first
    assert isinstance(messages, list) and messages and all(isinstance(m, str) for m in messages), messages
    error = " | ".join(messages)
    assert "\n" not in error and "Traceback" not in error, error
    assert contains.lower() in error.lower(), error


def assert_no_traceback(vmm: VmmProcess) -> None:
    """No traceback, and no bug the API caught and logged in one line (the API fuzzer's bad lines)."""
    bad = [line for line in vmm.log.read_text().splitlines() if BAD_LOG_LINE.search(line)]
    assert not bad, "\n".join(bad[:5]) + "\n" + vmm.tail(80)


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.fixture
def empty_vmm(procs: Processes) -> VmmProcess:
    """``chmig run --api-socket`` with no VM: the API without the cost of a guest."""
    return procs.run()


# -- Content-Length, Transfer-Encoding and the body cap ---------------------------------------------


@pytest.mark.parametrize("length", ["-1", "-100", "abc", "1_0", "+5", "0x10", "1e3", " ", "9" * 40])
def test_bad_content_length_is_400_without_reading(empty_vmm: VmmProcess, length: str) -> None:
    """Bug: ``Content-Length: -1`` read to EOF (200 MiB sent → 234 MB RSS); ``abc`` was a 500."""
    head = f"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: {length}\r\n\r\n".encode()
    # The socket stays open: an answer that comes at all proves nothing waited for EOF.
    answer = raw(empty_vmm.api, head + b"x" * 4096, timeout=5)
    assert_json_error(answer, 400, "content-length")
    assert answer is not None and answer.headers.get("connection") == "close"
    assert_no_traceback(empty_vmm)


def test_conflicting_content_lengths_are_400(empty_vmm: VmmProcess) -> None:
    answer = raw(empty_vmm.api, put("vm.pause", b"{}", "Content-Length: 7\r\n"))
    assert_json_error(answer, 400, "content-length")


def test_body_over_one_mib_is_refused_unread(empty_vmm: VmmProcess) -> None:
    head = f"PUT /api/v1/vm.send-migration HTTP/1.1\r\nContent-Length: {(1 << 20) + 1}\r\n\r\n".encode()
    assert_json_error(raw(empty_vmm.api, head), 400, "too large")


def test_chunked_body_is_refused(empty_vmm: VmmProcess) -> None:
    """Bug: the chunked body was dropped and its chunks were read as the next request (an HTML 400)."""
    body = b'{"destination_url": "unix:/nowhere"}'
    data = (b"PUT /api/v1/vm.send-migration HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(empty_vmm.api)
        sock.sendall(data)
        assert_json_error(_read_answer(sock), 400, "chunked bodies are not supported")
        assert _read_answer(sock) is None, "the chunks must not be read as another request"


# -- JSON bodies -------------------------------------------------------------------------------------


BAD_BODIES = [
    ("vm.receive-migration", b'{"receiver_url": null}', "receiver_url"),
    ("vm.receive-migration", b'{"receiver_url": "unix:/x", "memory_mode": null}', "memory_mode"),
    ("vm.send-migration", b'{"destination_url": null}', "destination_url"),
    ("vm.send-migration", b'{"destination_url": "unix:/x", "memory_mode": null}', "memory_mode"),
    ("vm.send-migration", b'{"destination_url": "unix:/x", "timeout_strategy": null}', "timeout_strategy"),
    ("vm.send-migration", b'{"destination_url": "unix:/x", "connections": null}', "connections"),
    ("vm.send-migration", b'{"destination_url": "unix:/x", "local": null}', "local"),
    ("vm.send-migration", b'{"destination_url": "unix:/x", "connections": 1.5}', "connections"),
    ("vm.send-migration", b'{"destination_url": "unix:/x", "downtime_ms": 1e999}', ""),
    ("vm.send-migration", b'{"destination_url": "unix:/x", "downtime_ms": NaN}', "nan"),
    ("vm.send-migration", b'{"destination_url": "unix:/x", "downtime_ms": -Infinity}', "infinity"),
    ("vm.send-migration", b'{"destination_url": "unix:/x", "downtime_ms": ' + b"9" * 5000 + b"}", ""),
    ("vm.send-migration", b'{"destination_url": "unix:/x", "downtime_ms": ' + b"9" * 30 + b"}", "downtime_ms"),
    ("vm.send-migration", b"[" * 100_000 + b"]" * 100_000, "nest"),
    ("vm.send-migration", b'{"a":' * 900 + b"1" + b"}" * 900, ""),
    ("vm.send-migration", b"[" + b"[]," * 300_000 + b"[]]", ""),
    ("vm.send-migration", b'"just a string"', "object"),
    ("vm.send-migration", b"\xff\xfe\x00garbage", "json"),
    ("vm.receive-migration", b'{"receiver_url": ["unix:/x"]}', "receiver_url"),
    ("vm.receive-migration", b'{"receiver_url": "unix:/x", "tls_dir": 5}', "tls_dir"),
]


@pytest.mark.parametrize(("action", "body", "contains"), BAD_BODIES, ids=[f"{a}-{b[:24]!r}" for a, b, _ in BAD_BODIES])
def test_bad_json_bodies_are_400_never_a_traceback(empty_vmm: VmmProcess, action: str, body: bytes,
                                                    contains: str) -> None:
    """Bug: null fields and deep nesting answered 500 with a traceback in the log."""
    assert_json_error(raw(empty_vmm.api, put(action, body)), 400, contains)
    assert_no_traceback(empty_vmm)


def test_null_tls_dir_is_its_default(empty_vmm: VmmProcess) -> None:
    """``tls_dir`` is optional (``Option`` in Cloud Hypervisor): null means none, so it reaches the VMM (500: no VM)."""
    body = b'{"destination_url": "unix:/nowhere", "tls_dir": null}'
    assert_json_error(raw(empty_vmm.api, put("vm.send-migration", body)), 500, "not running")


# -- malformed requests answer JSON, never HTML ------------------------------------------------------


MALFORMED = [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /api/v1/vmm.ping HTTP/1.1 extra\r\n\r\n", 400),
    (b"GET /api/v1/vmm.ping HTTP/9.9\r\n\r\n", 505),
    (b"GET /api/v1/vmm.ping HTTX/1.1\r\n\r\n", 400),
    (b"BREW /api/v1/vmm.ping HTTP/1.1\r\n\r\n", 400),
    (b"POST /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /api/v1/vmm.ping HTTP/1.1\r\n" + b"X: y\r\n" * 150 + b"\r\n", 431),
    (b"GET /api/v1/vmm.ping HTTP/1.1\r\nX: " + b"y" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
    (b"GET /api/v1/vm.pause\rX HTTP/1.1\r\n\r\n", 400),
]


@pytest.mark.parametrize(("data", "status"), MALFORMED, ids=[repr(d[:30]) for d, _ in MALFORMED])
def test_malformed_requests_answer_json(empty_vmm: VmmProcess, data: bytes, status: int) -> None:
    """Bug: the stdlib's error page was HTML (and a client that left gave a traceback on stderr)."""
    answer = raw(empty_vmm.api, data)
    assert_json_error(answer, status)
    assert b"<" not in answer.body  # type: ignore[union-attr]
    assert_no_traceback(empty_vmm)


def test_head_gets_a_json_error_too(empty_vmm: VmmProcess) -> None:
    answer = raw(empty_vmm.api, b"HEAD /api/v1/vmm.ping HTTP/1.1\r\n\r\n", close_write=True)
    assert answer is not None and answer.status == 400 and b"takes GET" in answer.body  # JSON, for any method


def test_keep_alive_still_works(empty_vmm: VmmProcess) -> None:
    """Two requests on one connection: the hardening must not break HTTP/1.1 persistence."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(empty_vmm.api)
        for _ in range(2):
            sock.sendall(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            answer = _read_answer(sock)
            assert answer is not None and answer.status == 200 and answer.json()["pid"] == empty_vmm.proc.pid


def test_unexpected_exception_is_one_json_line_and_one_log_line(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A bug behind a route answers 500 with one JSON line and logs one ERROR line, never an HTML page."""
    from chmig.vmm import Vmm

    class Broken(ApiServer):
        def routes(self):  # type: ignore[no-untyped-def]
            table = super().routes()
            table[("GET", "vm.info")] = lambda body: {}["no such key"]
            return table

    server = Broken(str(tmp_path / "api.sock"), Vmm(serial_spec="off"))
    server.start()
    try:
        with caplog.at_level(logging.INFO, logger="chmig.api"):
            answer = raw(server.path, b"GET /api/v1/vm.info HTTP/1.1\r\n\r\n")
        assert_json_error(answer, 500, "KeyError")
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is None, [r.getMessage() for r in errors]
        assert "\n" not in errors[0].getMessage()
    finally:
        server.stop()


# -- deadlines and the connection cap ----------------------------------------------------------------


@pytest.fixture
def quick_server(tmp_path: Path):  # noqa: ANN201
    """An in-process API server with a 0.5 s request deadline and 8 connections at most."""
    from chmig.vmm import Vmm

    server = ApiServer(str(tmp_path / "api.sock"), Vmm(serial_spec="off"), request_timeout=0.5, max_connections=8)
    server.start()
    yield server
    server.stop()


def _api_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("api-request"))


def _wait(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("data, told", [
    (b"", None),                                                               # connected, said nothing
    (b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n", "did not arrive whole"),   # headers that never end
    (b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 100\r\n\r\n{", "timed out"),  # a body shorter than announced
])
def test_a_slow_request_is_cut_at_its_deadline(quick_server: ApiServer, data: bytes, told: str | None) -> None:
    """Bug: these held a thread forever (300 idle clients → 302 threads)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(quick_server.path)
        sock.sendall(data)
        started = time.monotonic()
        answer = _read_answer(sock)
        took = time.monotonic() - started
    assert took < 2.5, f"the request deadline is 0.5 s, the server waited {took:.1f} s"
    if told is None:  # nothing came: nobody to answer
        assert answer is None, answer
    else:  # a request begun and not finished in time is told why, as Cloud Hypervisor's clients read it
        assert answer is not None
        assert_json_error(answer, 408, told)
    assert _wait(lambda: _api_threads() == 0), "the request's thread did not end"


def test_trickling_bytes_do_not_extend_the_deadline(quick_server: ApiServer) -> None:
    """Slowloris: one header byte every 0.1 s; the deadline is for the whole request, not each read."""
    started = time.monotonic()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(quick_server.path)
        closed = False
        for byte in b"GET /api/v1/vmm.ping HTTP/1.1\r\n" + b"X" * 100:
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed = True
                break
            if select.select([sock], [], [], 0.1)[0]:
                answer = b""
                while chunk := sock.recv(4096):  # a 408, then the end of the connection
                    answer += chunk
                closed = not answer or answer.startswith(b"HTTP/1.1 408 ")
                break
        assert closed, "the server kept reading a trickle of bytes"
    assert time.monotonic() - started < 2.5


def test_connections_beyond_the_cap_get_429(quick_server: ApiServer) -> None:
    idle = [socket.socket(socket.AF_UNIX) for _ in range(8)]
    try:
        for sock in idle:
            sock.connect(quick_server.path)
        assert _wait(lambda: _api_threads() == 8)
        assert_json_error(raw(quick_server.path, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n"), 429, "connections")
        assert _api_threads() == 8
    finally:
        for sock in idle:
            sock.close()
    assert _wait(lambda: _api_threads() == 0)
    answer = raw(quick_server.path, b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
    assert answer is not None and answer.status == 200


def test_many_idle_clients_do_not_grow_threads(empty_vmm: VmmProcess) -> None:
    """Bug: 300 idle clients → 302 threads.  Now at most 64 connections are served, the rest get 429 at once."""
    pid = empty_vmm.proc.pid
    before = thread_count(pid)
    idle: list[socket.socket] = []
    try:
        for _ in range(100):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(empty_vmm.api)
            sock.sendall(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
            idle.append(sock)
        refused = 0
        deadline = time.monotonic() + 5
        waiting = list(idle)
        while refused < 36 and time.monotonic() < deadline:
            ready, _, _ = select.select(waiting, [], [], 0.2)
            for sock in ready:
                waiting.remove(sock)
                sock.settimeout(2)
                assert_json_error(_read_answer(sock), 429, "too many")
                refused += 1
        assert refused == 36
        assert thread_count(pid) <= before + 64
    finally:
        for sock in idle:
            sock.close()
    assert _wait(lambda: thread_count(pid) <= before), (before, thread_count(pid))
    assert empty_vmm.call("GET", "vmm.ping", timeout=5)["pid"] == pid
    assert_no_traceback(empty_vmm)


# -- the socket file ---------------------------------------------------------------------------------


def _chmig(*args: str, timeout: float = 20, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CHMIG, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_api_socket_on_an_existing_non_socket_is_refused(tmp_path: Path, kind: str) -> None:
    """Bug: ``--api-socket`` naming a regular file deleted it."""
    path = tmp_path / "precious"
    if kind == "file":
        path.write_text("keep me")
    elif kind == "directory":
        path.mkdir()
    else:
        (tmp_path / "target").write_text("keep me")
        path.symlink_to(tmp_path / "target")
    result = _chmig("run", "--api-socket", str(path))
    assert result.returncode == 2  # a UsageError, as every bad --api-socket
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "exists and is not a socket" in lines[0], result.stderr
    assert path.exists() or path.is_symlink()
    if kind == "file":
        assert path.read_text() == "keep me"


def test_a_stale_socket_is_replaced(procs: Processes, tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / f"api-{procs.count + 1}.sock"))
    stale.close()  # the file stays, nobody listens: what a killed VMM leaves behind
    vmm = procs.run()
    assert vmm.call("GET", "vmm.ping")["pid"] == vmm.proc.pid


def test_a_live_socket_is_not_taken_over(empty_vmm: VmmProcess) -> None:
    result = _chmig("run", "--api-socket", empty_vmm.api)
    assert result.returncode == 2 and "another VMM is serving there" in result.stderr
    assert empty_vmm.call("GET", "vmm.ping")["pid"] == empty_vmm.proc.pid


def test_api_socket_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    """Bug: the socket's mode came from the umask (0755 under 022, 0777 under 0)."""
    api = tmp_path / "api.sock"
    proc = subprocess.Popen([*CHMIG, "run", "--api-socket", str(api)], umask=0, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        assert _wait(lambda: api.exists(), timeout=20), "no socket"
        mode = os.stat(api).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
        request(str(api), "GET", "vmm.ping", timeout=5)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stderr is not None
        proc.stderr.close()


# -- cancel-migration --------------------------------------------------------------------------------


def test_cancel_migration_stops_a_waiting_receive(empty_vmm: VmmProcess, tmp_path: Path) -> None:
    outcome: dict[str, Any] = {}

    def receive() -> None:
        try:
            outcome["result"] = empty_vmm.call("PUT", "vm.receive-migration",
                                               {"receiver_url": f"unix:{tmp_path}/rx.sock"}, timeout=30)
        except ApiError as exc:
            outcome["error"] = exc

    waiter = threading.Thread(target=receive, name="test-receive")
    waiter.start()
    assert _wait(lambda: (tmp_path / "rx.sock").exists()), "the receive did not start listening"
    cancel = _chmig("remote", "--api-socket", empty_vmm.api, "cancel-migration")
    assert cancel.returncode == 0 and cancel.stdout == "" and cancel.stderr == "", cancel
    waiter.join(timeout=20)
    assert not waiter.is_alive()
    assert "error" in outcome and outcome["error"].status == 500, outcome
    again = _chmig("remote", "--api-socket", empty_vmm.api, "cancel-migration")
    assert again.returncode == 1 and "no migration is in progress" in again.stderr, again
    assert len(again.stderr.strip().splitlines()) == 1
    with pytest.raises(ApiError, match="HTTP 500"):
        empty_vmm.call("PUT", "vm.cancel-migration")
    # The VMM is still an empty VMM that can receive again.
    assert empty_vmm.call("GET", "vmm.ping")["pid"] == empty_vmm.proc.pid
    assert_no_traceback(empty_vmm)


def test_cancel_migration_is_in_the_help_and_the_route_table() -> None:
    import chmig.api

    assert "vm.cancel-migration" in (chmig.api.__doc__ or "")
    assert "cancel-migration" in _chmig("remote", "--help").stdout


# -- chmig remote into a closed pipe ----------------------------------------------------------------


def test_remote_into_a_closed_pipe_exits_quietly(empty_vmm: VmmProcess) -> None:
    """Bug: ``chmig remote ... | head`` ended in a BrokenPipeError traceback.

    Deterministic half: the reader is gone before chmig writes anything.
    """
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([*CHMIG, "remote", "--api-socket", empty_vmm.api, "ping"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=20)
    finally:
        os.close(write_end)
    assert result.returncode in (0, 141), result
    assert result.stderr == "", result.stderr


@requires_kvm
def test_remote_piped_into_a_reader_of_one_line(procs: Processes) -> None:
    """The real pipeline: a reader takes one line of ``info`` and closes; chmig writes it unbuffered."""
    vmm = procs.run("--cpus", "boot=1", "--memory", "size=32M")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # one write per JSON chunk: the reader leaves mid-output
    for _ in range(5):
        proc = subprocess.Popen([*CHMIG, "remote", "--api-socket", vmm.api, "info"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == b"{\n"
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.wait(timeout=20) in (0, 141), stderr
        assert stderr == "", stderr


# -- the fuzzer --------------------------------------------------------------------------------------


@requires_kvm
def test_api_fuzzer_smoke() -> None:
    """200 mutated requests against a real VMM and an empty one: no failure, well under a minute."""
    from fuzz.api import run

    failures: list[str] = []
    started = time.monotonic()
    assert run(200, seed=1, report=failures.append) == 0, "\n".join(failures[-20:])
    assert time.monotonic() - started < 45
