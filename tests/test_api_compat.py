"""The real ``ch-remote`` against chmig: its recorded request bytes replayed, the answers read by a port of its client.

:mod:`tests.ch_remote_requests` holds the bytes ``ch-remote`` sends for every
verb (written out from Cloud Hypervisor's source, write by write).  Here they
are replayed against running chmig VMMs, and every answer is read by
:func:`ch_remote`, a line-by-line port of ``api_client``'s parsing
(``api_client/src/lib.rs``: ``parse_http_response``, ``get_header``,
``get_status_code``, ``StatusCode::is_server_error``) and of how ``ch-remote``
reads a failure's body (``serde_json::from_str::<Vec<String>>``): what passes
here is what the real client accepts.  The issue's bugs it reproduced: every
answer carried a reason phrase (``HTTP/1.1 200 OK``: the client's status parse
fails), errors were ``{"error": ...}`` (not an array), no VM was 409, a wrong
method was the stdlib's HTML 501, and the receive body ``ch-remote`` sends was
refused for its ``vfio_fds``/``iommufd_fd``/``zone_updates``.
"""

from __future__ import annotations

import array
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from chmig.api import ApiServer
from chmig.apiclient import ApiError, request
from chmig.errors import UsageError

from . import ch_remote_requests as ch
from .conftest import Processes, VmmProcess, requires_kvm

pytestmark = [requires_kvm, pytest.mark.timeout(120)]

VM_ARGS = ("--cpus", "boot=1", "--memory", "size=32M")


# ---------------------------------------------------------------------------------------------
# A port of api_client's parsing and of ch-remote's reading of an error body
# ---------------------------------------------------------------------------------------------


class ClientPanic(AssertionError):
    """Where the Rust client would panic (an ``unwrap`` on a missing CR, a chunk that is not UTF-8)."""


class ClientError(AssertionError):
    """An ``api_client::Error`` other than a server's error answer (``StatusCodeParsing``, ...)."""


#: ``StatusCode::from_raw``: the codes the client knows by name; any other is ``Unknown``.
KNOWN_CODES = {100: "Continue", 200: "Ok", 204: "NoContent", 400: "BadRequest", 404: "NotFound",
               429: "TooManyRequests", 500: "InternalServerError", 501: "NotImplemented"}
#: Rust's ``usize::from_str``: an optional ``+`` and ASCII digits, nothing else.
_USIZE = re.compile(r"\+?[0-9]+")


def _parse_usize(text: str, error: str) -> int:
    """``text.trim().parse::<usize>()``; ``str::trim`` strips Unicode whitespace, as Python's ``strip`` does."""
    trimmed = text.strip()
    if not _USIZE.fullmatch(trimmed) or int(trimmed) >= 1 << 64:
        raise ClientError(f"{error}: {text!r}")
    return int(trimmed)


def get_header(res: str, header: str) -> str | None:
    """``get_header``: the text after the first ``"{header}: "`` anywhere in ``res``, up to the next CR."""
    header_str = f"{header}: "
    o = res.find(header_str)
    if o < 0:
        return None
    cr = res[o:].find("\r")
    if cr < 0:
        raise ClientPanic(f"no CR after {header_str!r} (find('\\r').unwrap())")
    start, end = o + len(header_str), o + cr
    if start > end:
        raise ClientPanic(f"slice {start}..{end} out of order")
    return res[start:end]


def get_status_code(res: str) -> int:
    """``get_status_code``: everything between ``HTTP/1.1 `` and the next CR must parse as one integer."""
    o = res.find("HTTP/1.1")
    if o < 0:
        raise ClientError("MissingProtocol")
    cr = res[o:].find("\r")
    if cr < 0:
        raise ClientPanic("no CR after the status line (find('\\r').unwrap())")
    start, end = o + len("HTTP/1.1 "), o + cr
    if start > end:
        raise ClientPanic(f"slice {start}..{end} out of order")
    return _parse_usize(res[start:end], "StatusCodeParsing")


def is_server_error(code: int) -> bool:
    """``StatusCode::is_server_error``: anything but Ok, Continue and NoContent (an unknown code too)."""
    return KNOWN_CODES.get(code, "Unknown") not in ("Ok", "Continue", "NoContent")


@dataclass
class Outcome:
    """What ``ch-remote`` ends with: the status, the body it prints (success) or the messages it shows (failure)."""

    status: int
    body: str | None
    messages: list[str] | None
    raw: bytes

    @property
    def ok(self) -> bool:
        return self.messages is None

    def json(self) -> Any:
        assert self.body, self
        return json.loads(self.body)


def parse_http_response(sock: socket.socket) -> tuple[int, str | None, bytes]:
    """``parse_http_response``: 256-byte reads, each decoded as UTF-8 on its own, until the headers end and then
    (with a Content-Length) until the body is whole; without Content-Length it stops at the end of the headers."""
    res = ""
    raw = b""
    body_offset: int | None = None
    content_length: int | None = None
    while True:
        chunk = sock.recv(256)
        if not chunk:
            break
        try:
            res += chunk.decode("utf-8")  # str::from_utf8(&bytes[0..count]).unwrap()
        except UnicodeDecodeError as exc:
            raise ClientPanic(f"a 256-byte chunk is not UTF-8 on its own: {exc}") from None
        raw += chunk
        o = res.find("\r\n\r\n")
        if o >= 0:
            # Byte offsets: Rust's String indexes bytes (every answer here is ASCII, so they are the same).
            body_offset = len(res[:o].encode()) + 4
            length = get_header(res, "Content-Length")
            content_length = _parse_usize(length, "ContentLengthParsing") if length is not None else None
            if content_length is None:
                break
        if body_offset is not None and content_length is not None \
                and len(res.encode()) >= content_length + body_offset:
            break
    body = res.encode()[body_offset:].decode() if content_length is not None and body_offset is not None else None
    return get_status_code(res), body, raw


def ch_remote(path: str, writes: list[bytes], fds: list[int] | None = None, timeout: float = 150,
              early_answer: bool = False) -> Outcome:
    """Send ``writes`` as ``api_client`` does (the first with ``sendmsg``, fds as SCM_RIGHTS), read the answer as it
    does, and a failure's body as ``ch-remote`` does: ``Vec<String>`` or the client reports a broken response.

    ``early_answer``: the server may answer and close before the request is whole (the connection cap's 429);
    the rest of the writes then fail, and the answer is read all the same.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            sock.sendmsg([writes[0]], ancillary)
            for write in writes[1:]:
                sock.sendall(write)
        except (BrokenPipeError, ConnectionResetError):
            if not early_answer:
                raise
        status, body, raw = parse_http_response(sock)
    assert_wire_form(raw)
    if not is_server_error(status):
        return Outcome(status, body, None, raw)
    try:
        messages = json.loads(body or "")  # serde_json::from_str::<Vec<String>>(body)
    except ValueError as exc:
        raise ClientError(f"Can't get remote's error messages from JSON response: {exc}: body={body!r}") from None
    if not isinstance(messages, list) or not all(isinstance(m, str) for m in messages):
        raise ClientError(f"the error body is not a Vec<String>: {body!r}")
    return Outcome(status, body, messages, raw)


STATUS_LINE = re.compile(rb"HTTP/1\.1 [0-9]{3} \r\n")


def assert_wire_form(raw: bytes) -> None:
    """micro_http's form: a status line with no reason phrase, its headers, ASCII only, never HTML."""
    head, _, body = raw.partition(b"\r\n\r\n")
    assert STATUS_LINE.match(raw), raw[:80]
    assert raw.isascii(), raw[:200]
    assert b"<" not in raw, raw[:200]
    lines = head.split(b"\r\n")[1:]
    assert lines[0].startswith(b"Server: ") and lines[1] in (b"Connection: keep-alive", b"Connection: close"), head
    status = int(raw[9:12])
    if status == 204:
        assert len(lines) == 2 and body == b"", raw
    else:
        assert lines[2:] == [b"Content-Type: application/json", f"Content-Length: {len(body)}".encode()], raw


def replay(vmm: VmmProcess | str, recorded: ch.Recorded, **values: object) -> Outcome:
    return ch_remote(vmm if isinstance(vmm, str) else vmm.api, recorded.render(**values))


def assert_refused(outcome: Outcome, status: int, *words: str) -> None:
    """A failure ``ch-remote`` shows: the status, and messages (one line each) that say the ``words``."""
    assert outcome.status == status and outcome.messages, outcome
    assert all(m and "\n" not in m for m in outcome.messages), outcome.messages
    text = " | ".join(outcome.messages).lower()
    assert all(w.lower() in text for w in words), outcome.messages


# ---------------------------------------------------------------------------------------------
# The port and the fixtures themselves
# ---------------------------------------------------------------------------------------------


class _Bytes:
    """A socket that hands out ``data`` the way ``recv`` does (at most what was asked)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def recv(self, size: int) -> bytes:
        chunk, self.data = self.data[:size], self.data[size:]
        return chunk


def test_the_port_reads_cloud_hypervisors_answers_and_not_a_reason_phrase() -> None:
    """The client bug of the issue, as the port sees it: ``HTTP/1.1 200 OK`` cannot be parsed at all."""
    ok = b"HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n" \
         b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    assert parse_http_response(_Bytes(ok))[:2] == (200, "{}")  # type: ignore[arg-type]
    no_content = b"HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\nConnection: keep-alive\r\n\r\n"
    assert parse_http_response(_Bytes(no_content))[:2] == (204, None)  # type: ignore[arg-type]
    with pytest.raises(ClientError, match="StatusCodeParsing"):
        parse_http_response(_Bytes(ok.replace(b"200 ", b"200 OK")))  # type: ignore[arg-type]
    # A character cut by a 256-byte boundary: the real client panics.
    head = ok.split(b"\r\n\r\n")[0].replace(b"Length: 2", b"Length: 999") + b"\r\n\r\n"
    body = b'["' + b"x" * (255 - len(head) - 2) + "\u00e9".encode() + b'"]'  # the two bytes of \u00e9 at 255, 256
    cut = head.replace(b"999", str(len(body)).encode()) + body
    with pytest.raises(ClientPanic):
        parse_http_response(_Bytes(cut))  # type: ignore[arg-type]
    assert not is_server_error(204) and is_server_error(404) and is_server_error(409) and is_server_error(201)


def test_every_fixture_is_a_request_line_headers_and_serde_body() -> None:
    for recorded in ch.SUPPORTED + ch.UNSUPPORTED:
        writes = recorded.render(PORT=6000, PATH="/tmp/x.sock", DIR="/tmp/snap")
        assert re.fullmatch(rb"(GET|PUT) /api/v1/vmm?\.[a-z-]+ HTTP/1\.1\r\nHost: localhost\r\nAccept: \*/\*\r\n",
                            writes[0]), writes[0]
        if recorded.body is None:
            assert writes[1:] == [b"\r\n"], recorded
        else:
            assert writes[1] == f"Content-Length: {len(writes[3])}\r\n".encode() and writes[2] == b"\r\n"
            body = json.loads(writes[3])
            assert json.dumps(body, separators=(",", ":")).encode() == writes[3], "serde's compact form"
        assert recorded.source.startswith("ch-remote.rs")


SERDE_BODIES = [
    ("send_migration_body", ch.SEND_MIGRATION_TCP),
    ("send_migration_body", ch.SEND_MIGRATION_TCP_4),
    ("send_migration_body", ch.SEND_MIGRATION_UNIX_LOCAL),
    ("send_migration_body", ch.SEND_MIGRATION_POSTCOPY),
    ("receive_migration_body", ch.RECEIVE_MIGRATION_TCP),
    ("receive_migration_body", ch.RECEIVE_MIGRATION_UNIX),
    ("receive_migration_body", ch.RECEIVE_MIGRATION_POSTCOPY),
    ("restore_body", ch.RESTORE),
    ("restore_body", ch.RESTORE_RESUME_ONDEMAND),
    ("snapshot_body", ch.SNAPSHOT),
]


@pytest.mark.parametrize(("builder", "recorded"), SERDE_BODIES, ids=[" ".join(r.argv) for _, r in SERDE_BODIES])
def test_chmig_remote_builds_the_bodies_ch_remote_sends(builder: str, recorded: ch.Recorded) -> None:
    """``chmig.apiconfig`` (what ``chmig remote`` sends) against the recorded ``ch-remote`` bodies, byte for byte."""
    import chmig.apiconfig

    values = {"PORT": 6000, "PATH": "/tmp/x.sock", "DIR": "/tmp/snap"}
    argument = recorded.argv[1]
    for key, value in values.items():
        argument = argument.replace("{" + key + "}", str(value))
    body = getattr(chmig.apiconfig, builder)(argument)
    assert json.dumps(body, separators=(",", ":")).encode() == recorded.render(**values)[3]


# ---------------------------------------------------------------------------------------------
# Replays against running VMMs
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def empty_vmm(procs: Processes) -> VmmProcess:
    return procs.run()


def test_an_empty_vmm_answers_as_cloud_hypervisor_with_an_array_to_every_vm_verb(empty_vmm: VmmProcess,
                                                                                  tmp_path: Path) -> None:
    """No VM: ``vm.info`` is ``VmNotCreated`` and ``vm.boot`` ``VmMissingConfig`` (404); an action is
    ``VmNotRunning`` (500) — each with the messages from "Error from API" down to the cause."""
    ping = replay(empty_vmm, ch.PING)
    assert ping.status == 200 and ping.json()["pid"] == empty_vmm.proc.pid
    for recorded, status, cause in ((ch.INFO, 404, "VM is not created"), (ch.BOOT, 404, "VM config is missing"),
                                    (ch.PAUSE, 500, "VM is not running"), (ch.RESUME, 500, "VM is not running"),
                                    (ch.SHUTDOWN, 500, "VM is not running")):
        outcome = replay(empty_vmm, recorded)
        assert_refused(outcome, status, cause)
        assert outcome.messages is not None and outcome.messages[0] == "Error from API", outcome
    assert_refused(replay(empty_vmm, ch.SNAPSHOT, DIR=tmp_path / "snap"), 500, "not running")
    assert_refused(replay(empty_vmm, ch.SEND_MIGRATION_UNIX_LOCAL, PATH=tmp_path / "nowhere.sock"), 500,
                   "not running")
    # Cloud Hypervisor's vm.delete with nothing to delete is not an error.
    assert replay(empty_vmm, ch.DELETE).status == 204


@pytest.mark.parametrize("recorded", ch.UNSUPPORTED, ids=[r.verb for r in ch.UNSUPPORTED])
def test_verbs_chmig_does_not_implement_answer_501(empty_vmm: VmmProcess, recorded: ch.Recorded) -> None:
    command = recorded.writes[0].split(b" ")[1].decode().rsplit("/", 1)[1]
    assert_refused(replay(empty_vmm, recorded), 501, f"chmig does not implement {command}")


def test_shutdown_keeps_the_vm_created_and_boot_runs_it_again(procs: Processes) -> None:
    vmm = procs.run(*VM_ARGS)
    vmm.wait_rounds(2)
    assert replay(vmm, ch.PAUSE).status == 204
    assert replay(vmm, ch.INFO).json()["state"] == "Paused"
    assert replay(vmm, ch.RESUME).status == 204
    assert replay(vmm, ch.SHUTDOWN).status == 204
    created = replay(vmm, ch.INFO)
    assert created.status == 200 and created.json()["state"] == "Created", created
    assert_refused(replay(vmm, ch.PAUSE), 500, "not running")
    assert replay(vmm, ch.BOOT).status == 204
    assert replay(vmm, ch.INFO).json()["state"] == "Running"
    assert_refused(replay(vmm, ch.BOOT), 500, "VM is already created")
    vmm.wait_rounds(2)
    assert replay(vmm, ch.DELETE).status == 204
    assert_refused(replay(vmm, ch.INFO), 404, "not created")
    done = replay(vmm, ch.SHUTDOWN_VMM)
    # Cloud Hypervisor's vmm.shutdown: 200 with Content-Length 0 (ch-remote prints an empty line).
    assert done.status == 200 and done.body == "", done
    assert vmm.wait_exit() == 0


WRONG = [
    (b"GET /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n", 400, "takes PUT"),
    (b"PUT /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n", 400, "takes GET"),
    (b"POST /api/v1/vmm.ping HTTP/1.1\r\n\r\n", 400, "takes GET"),
    (b"DELETE /api/v1/vm.pause HTTP/1.1\r\n\r\n", 400, "takes PUT"),
    (b"PATCH /api/v1/vm.pause HTTP/1.1\r\n\r\n", 400, "takes PUT"),
    (b"OPTIONS /api/v1/vm.pause HTTP/1.1\r\n\r\n", 400, "takes PUT"),
    (b"HEAD /api/v1/vmm.ping HTTP/1.1\r\n\r\n", 400, "takes GET"),
    (b"BREW /api/v1/vmm.ping HTTP/1.1\r\n\r\n", 400, "takes GET"),
    (b"GET /api/v1/vm.nonsense HTTP/1.1\r\n\r\n", 404, "unknown endpoint"),
    (b"GET /nowhere HTTP/1.1\r\n\r\n", 404, "unknown path"),
    (b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400, "takes no request body"),
    (b"PUT /api/v1/vm.snapshot HTTP/1.1\r\n\r\n", 400, "needs a JSON body"),
    (b"PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope", 400, "deserialize"),
    (b"PUT /api/v1/vm.send-migration HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\n{nope\r\n0\r\n\r\n", 400, "chunked bodies are not supported"),
    (b"GARBAGE\r\n\r\n", 400, "bad request"),
]


@pytest.mark.parametrize(("data", "status", "words"), WRONG, ids=[repr(d[:28]) for d, _, _ in WRONG])
def test_wrong_methods_paths_and_bodies_answer_a_json_array(empty_vmm: VmmProcess, data: bytes, status: int,
                                                            words: str) -> None:
    assert_refused(ch_remote(empty_vmm.api, [data]), status, words)


def test_file_descriptors_are_closed_and_the_request_refused(empty_vmm: VmmProcess, tmp_path: Path) -> None:
    """``ch-remote`` passes fds (SCM_RIGHTS) for vfio_fds/net_fds: chmig closes them and says it takes none."""
    fd_dir = f"/proc/{empty_vmm.proc.pid}/fd"

    def passed_along() -> list[str]:
        """The VMM's fds open on what the test passes (closed before the answer is sent: no waiting needed)."""
        return [fd for fd in os.listdir(fd_dir) if _readlink(f"{fd_dir}/{fd}") == str(marker)]

    marker = tmp_path / "passed-along"
    marker.write_text("")
    passed = [os.open(marker, os.O_RDONLY) for _ in range(3)]
    try:
        writes = ch.RECEIVE_MIGRATION_UNIX.render(PATH=tmp_path / "rx.sock")
        assert_refused(ch_remote(empty_vmm.api, writes, fds=passed), 400, "file descriptors", "3")
    finally:
        for fd in passed:
            os.close(fd)
    assert passed_along() == [], "the VMM kept fds it was passed"
    assert replay(empty_vmm, ch.PING).status == 200


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


def _tcp_port_listening(port: int) -> bool:
    """Whether 127.0.0.1:``port`` is in LISTEN state (read from /proc: connecting would consume an accept)."""
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and local == f"0100007F:{port:04X}":
                return True
    return False


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_whole_migration_driven_by_ch_remote_bytes(procs: Processes) -> None:
    """receive-migration on an empty VMM and send-migration (4 connections) from the source, both by fixture:
    the guest goes on running on the destination with zero errors."""
    source = procs.run(*VM_ARGS, "--workload", "verify,dirty_percent=10")
    before = source.wait_rounds(3)
    dest = procs.run()
    port = _free_port()
    received: list[Outcome | BaseException] = []

    def receive() -> None:
        try:
            received.append(replay(dest, ch.RECEIVE_MIGRATION_TCP, PORT=port))
        except BaseException as exc:  # the test asserts on it
            received.append(exc)

    receiver = threading.Thread(target=receive, name="test-receive-fixture")
    receiver.start()
    try:
        _wait_listening(port, receiver)
        sent = replay(source, ch.SEND_MIGRATION_TCP_4, PORT=port)
    finally:
        receiver.join(60)
    assert not receiver.is_alive() and received, "receive-migration did not answer"
    outcome = received[0]
    assert isinstance(outcome, Outcome) and outcome.status == 204 and outcome.body is None, outcome
    # chmig's deliberate difference: send-migration answers when done, 200 with the statistics.
    assert sent.status == 200 and sent.json()["status"] == "completed", sent
    assert source.wait_exit(30) == 0, source.tail()
    info = replay(dest, ch.INFO).json()
    assert info["state"] == "Running" and info["guest"]["errors"] == 0, info
    assert info["guest"]["rounds"] >= before["guest"]["rounds"]
    after = dest.wait_rounds(info["guest"]["rounds"] + 2, timeout=60)
    assert after["guest"]["errors"] == 0 and after["migration"]["status"] == "completed", after


def _wait_listening(port: int, receiver: threading.Thread, timeout: float = 30) -> None:
    waited = 0.0
    while not _tcp_port_listening(port):
        assert receiver.is_alive(), "receive-migration ended before it listened"
        receiver.join(0.05)
        waited += 0.05
        assert waited < timeout, f"nothing listens on 127.0.0.1:{port}"


def test_snapshot_and_restore_driven_by_ch_remote_bytes(procs: Processes, tmp_path: Path) -> None:
    source = procs.run(*VM_ARGS)
    source.wait_rounds(2)
    assert replay(source, ch.PAUSE).status == 204
    snapshot = tmp_path / "snap"
    assert replay(source, ch.SNAPSHOT, DIR=snapshot).status == 204
    paused = replay(source, ch.INFO).json()
    target = procs.run()
    assert replay(target, ch.RESTORE_RESUME_ONDEMAND, DIR=snapshot).status == 204
    restored = replay(target, ch.INFO).json()
    assert restored["state"] == "Running" and restored["guest"]["errors"] == 0, restored
    assert target.wait_rounds(paused["guest"]["rounds"] + 2)["guest"]["errors"] == 0
    # A second restore on a VMM that has a VM is an action that failed: 500 and the reason.
    assert_refused(replay(target, ch.RESTORE, DIR=snapshot), 500, "The VM could not be restored", "VM is already created")


# ---------------------------------------------------------------------------------------------
# The server in-process: the connection cap, an inherited socket, a socket it cannot listen on
# ---------------------------------------------------------------------------------------------


def _server(**kwargs: Any) -> ApiServer:
    from chmig.vmm import Vmm

    return ApiServer(vmm=Vmm(serial_spec="off"), **kwargs)


def test_too_many_connections_is_429_with_an_array(tmp_path: Path) -> None:
    server = _server(path=str(tmp_path / "api.sock"), max_connections=1)
    server.start()
    try:
        with socket.socket(socket.AF_UNIX) as idle:
            idle.connect(server.path)
            outcome = _first_answer(server.path, lambda status: status != 200)
        assert_refused(outcome, 429, "too many API connections")
        # Once the idle connection's thread has ended, the next one is served.
        assert _first_answer(server.path, lambda status: status != 429).status == 200  # type: ignore[arg-type]
    finally:
        server.stop()


def _first_answer(path: str, wanted: Any) -> Outcome:
    """Ping until the answer's status is ``wanted``: the server counts a connection from its own thread."""
    for _ in range(250):
        outcome = ch_remote(path, ch.PING.render(), early_answer=True)
        if wanted(outcome.status):
            return outcome
        time.sleep(0.02)
    raise AssertionError(f"the server kept answering {outcome.status}")


def test_an_inherited_listening_socket_is_adopted_and_its_file_left_alone(tmp_path: Path) -> None:
    """``--api-socket fd=N``: serve on the socket as it is; stop() removes nothing chmig did not create."""
    path = tmp_path / "inherited.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    fd = listener.detach()
    server = _server(path=None, fd=fd)
    server.start()
    try:
        assert server.path == str(path)
        assert replay(str(path), ch.PING).status == 200
        assert request(str(path), "GET", "vmm.ping")["pid"] == os.getpid()
    finally:
        server.stop()
    assert path.exists(), "the inherited socket's file is not chmig's to remove"


def test_what_cannot_be_listened_on_is_one_usage_line(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        cases = [
            ({"path": None, "fd": read_end}, f"--api-socket fd={read_end}: not an open socket"),
            ({"path": None, "fd": tcp.fileno()}, f"--api-socket fd={tcp.fileno()}: must be a UNIX stream socket"),
            ({"path": None, "fd": unbound.fileno()}, "not bound"),
            ({"path": None, "fd": 100_000}, "fd=100000: not an open socket"),
            ({"path": str(tmp_path / "missing" / "api.sock")}, "cannot listen there: No such file or directory"),
            ({"path": str(tmp_path / ("x" * 120))}, "cannot listen there"),
            ({"path": None}, "give a path or fd=N"),
        ]
        for kwargs, words in cases:
            with pytest.raises(UsageError) as refused:
                _server(**kwargs)
            assert words in str(refused.value) and "\n" not in str(refused.value), refused.value
        # A refused fd is left open: it was never the server's.
        os.fstat(read_end)
        assert tcp.fileno() >= 0 and unbound.fileno() >= 0
    finally:
        os.close(read_end)
        os.close(write_end)
        tcp.close()
        unbound.close()


def test_the_python_client_reads_the_array(empty_vmm: VmmProcess) -> None:
    """``chmig.apiclient.request`` turns Cloud Hypervisor's array into one line, keeping the chain."""
    with pytest.raises(ApiError) as refused:
        empty_vmm.call("PUT", "vm.pause")
    error = refused.value
    assert error.status == 500 and error.messages == ["Error from API", "The VM could not be paused",
                                                      "VM is not running"], error.messages
    assert str(error) == "API: vm.pause failed (HTTP 500): The VM could not be paused: VM is not running"


def test_the_python_client_sends_the_bytes_ch_remote_sends(tmp_path: Path) -> None:
    """``chmig.apiclient.request`` (so ``chmig remote``) writes what ``api_client`` writes, header for header."""
    import threading

    from chmig.apiclient import request

    path = str(tmp_path / "capture.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()
    captured: list[bytes] = []

    def capture() -> None:
        for _ in range(2):
            conn, _ = server.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(4096)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]) if b"Content-Length" in head else 0
                while len(rest) < length:
                    rest += conn.recv(4096)
                captured.append(head + b"\r\n\r\n" + rest)
                conn.sendall(b"HTTP/1.1 204 \r\nServer: x\r\nConnection: keep-alive\r\n\r\n")

    thread = threading.Thread(target=capture, name="test-capture")
    thread.start()
    try:
        request(path, "PUT", "vm.pause", timeout=10)
        request(path, "PUT", "vm.snapshot", {"destination_url": f"file://{tmp_path}"}, timeout=10)
    finally:
        thread.join(10)
        server.close()
    assert captured == [b"".join(ch.PAUSE.render()), b"".join(ch.SNAPSHOT.render(DIR=tmp_path))]
