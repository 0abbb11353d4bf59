"""Hostile and broken peers, reproduced one by one: each test failed before its fix.

Real processes, real KVM, real sockets, real memfds; resources (fds, threads, RSS) are read from /proc.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from chmig import protocol as p
from chmig.errors import ChmigError, MigrationError, TransportError
from chmig.memory import GuestRamMapping, ZoneConfig
from chmig.receive import Receiver
from chmig.transport import listen, parse_url

from .conftest import Processes, receive_through_api, requires_kvm
from .wire import config_payload

pytestmark = [requires_kvm, pytest.mark.timeout(120)]

VM_ARGS = ("--cpus", "boot=1", "--memory", "size=32M", "--workload", "verify,dirty_percent=10")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class RawSender:
    """A raw socket speaking the protocol to an in-process Receiver (run in a thread)."""

    def __init__(self, url: str, limits: p.Limits = p.DEFAULT_LIMITS) -> None:
        self.listener = listen(parse_url(url))
        self.receiver = Receiver(self.listener, limits=limits)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-receiver")
        self.thread.start()
        self.sock = self.connect()

    def connect(self) -> socket.socket:
        address = self.listener.address
        if address.is_unix:
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(20)
            sock.connect(address.path)
            return sock
        return socket.create_connection((address.host, address.port), timeout=20)

    def _run(self) -> None:
        try:
            self.receiver.run(accept_timeout=30).close()
        except BaseException as exc:
            self.error = exc

    def request(self, request: p.Request, payload: bytes = b"", fds: list[int] | None = None) -> p.Status | None:
        if fds is None:
            self.sock.sendall(request.encode() + payload)
        else:
            self.sock.sendall(request.encode())
            socket.send_fds(self.sock, [payload], fds)
        data = b""
        while len(data) < 16:
            chunk = self.sock.recv(16 - len(data))
            if not chunk:
                return None
            data += chunk
        return p.Response.decode(data).status

    def receiver_threads(self) -> list[str]:
        """The receiver's candidate threads still running."""
        return [t.name for t in threading.enumerate() if t.name.startswith("migrate-receive-candidate-")]

    def finish(self) -> BaseException | None:
        self.sock.close()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the receiver did not stop"
        self.listener.close()
        return self.error


@pytest.fixture
def raw(tmp_path: Path) -> Iterator[RawSender]:
    sender = RawSender(f"unix:{tmp_path}/in.sock")
    yield sender
    sender.sock.close()
    sender.listener.abort()
    sender.thread.join(30)
    sender.listener.close()


# ---------------------------------------------------------------------------------------------
# 1. A VM received through the API survives its first pause
# ---------------------------------------------------------------------------------------------


def test_a_vm_received_through_the_api_can_be_paused(procs: Processes, tmp_path: Path) -> None:
    source = procs.run(*VM_ARGS)
    source.wait_rounds(1)
    empty = procs.run()
    receiving = receive_through_api(empty, tmp_path / "incoming.sock")
    source.call("PUT", "vm.send-migration", {"destination_url": f"unix:{tmp_path}/incoming.sock"}, timeout=90)
    assert receiving.result() is None
    for _ in range(3):  # before the fix the first pause killed the VMM with SIGUSR1
        empty.call("PUT", "vm.pause")
        assert empty.info()["state"] == "Paused"
        empty.call("PUT", "vm.resume")
    rounds = empty.info()["guest"]["rounds"]
    info = empty.wait_rounds(rounds + 2)
    assert info["guest"]["errors"] == 0 and empty.proc.poll() is None


# ---------------------------------------------------------------------------------------------
# 2. Two small requests must not commit gigabytes
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def started_receive_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], socket.socket]]:
    """A ``chmig receive`` process and a raw connection to it that has been answered Ok to Start."""
    sock_path = tmp_path / "in.sock"
    proc = subprocess.Popen([sys.executable, "-m", "chmig", "receive", "--listen", f"unix:{sock_path}",
                             "--serial", "off"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "listening on" in proc.stdout.readline()
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(sock_path))
        sock.sendall(p.Request.start().encode())
        assert p.Response.decode(sock.recv(16)).is_ok
        yield proc, sock
    finally:
        proc.kill()
        proc.wait()


def test_a_table_covering_all_ram_with_no_data_commits_only_a_window(tmp_path: Path) -> None:
    with started_receive_process(tmp_path) as (proc, sock):
        baseline = _status(proc.pid, "VmRSS")
        ram = 2 << 30
        payload = config_payload([ZoneConfig("mem0", ram, True)])
        sock.sendall(p.Request.config(len(payload)).encode() + payload)
        assert p.Response.decode(sock.recv(16)).is_ok
        table = p.MemoryRangeTable([p.MemoryRange(0, p.GiB * 2)])  # 2 GiB announced ...
        sock.sendall(p.Request.memory(table.byte_length).encode() + table.encode() + b"\xaa" * 4096)
        time.sleep(2)  # ... and one page sent: before the fix the whole 2 GiB was populated by now
        grown = _status(proc.pid, "VmRSS") - baseline
        assert grown < 64 * 1024, f"RSS grew by {grown} KiB"
        sock.close()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 1 and err.strip().splitlines()[-1].startswith("chmig receive: error:"), err


def test_a_64_mib_header_with_no_payload_allocates_nothing(tmp_path: Path) -> None:
    with started_receive_process(tmp_path) as (proc, sock):
        baseline = _status(proc.pid, "VmRSS")
        sock.sendall(p.Request.config(64 << 20).encode() + b"{" * 1024)
        time.sleep(1)
        grown = _status(proc.pid, "VmRSS") - baseline
        assert grown < 8 * 1024, f"RSS grew by {grown} KiB"
        sock.close()
        proc.communicate(timeout=30)
        assert proc.returncode == 1


def test_a_config_too_large_for_the_host_is_refused(raw: RawSender) -> None:
    assert raw.request(p.Request.start()) is p.Status.OK
    payload = config_payload([ZoneConfig("mem0", 60 << 30, True)])
    assert raw.request(p.Request.config(len(payload)), payload) is p.Status.ERROR
    assert "does not fit this host" in str(raw.finish())


# ---------------------------------------------------------------------------------------------
# 5. Non-finite numbers and deep nesting: Error, not a traceback
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload, message", [
    (config_payload([ZoneConfig("mem0", 4 << 20, True)]).replace(b'"size": 4194304', b'"size": Infinity', 1),
     "not a number JSON allows"),
    (config_payload([ZoneConfig("mem0", 4 << 20, True)]).replace(b'"gpa": 0', b'"gpa": NaN', 1), "not a number JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"vm_config": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    (b"[" + b"{}," * 1_000_000 + b"{}]", "objects and arrays"),
])
def test_hostile_json_is_answered_error(raw: RawSender, payload: bytes, message: str) -> None:
    assert raw.request(p.Request.start()) is p.Status.OK
    assert raw.request(p.Request.config(len(payload)), payload) is p.Status.ERROR
    error = raw.finish()
    assert isinstance(error, ChmigError) and message in str(error), error


def test_hostile_state_json_is_answered_error(raw: RawSender) -> None:
    assert raw.request(p.Request.start()) is p.Status.OK
    payload = config_payload([ZoneConfig("mem0", 4 << 20, True)])
    assert raw.request(p.Request.config(len(payload)), payload) is p.Status.OK
    state = b"[" * 100_000 + b"]" * 100_000
    assert raw.request(p.Request.state(len(state)), state) is p.Status.ERROR
    assert "nested too deeply" in str(raw.finish())


# ---------------------------------------------------------------------------------------------
# 6, 7. File descriptors: none closed twice, none leaked
# ---------------------------------------------------------------------------------------------


def test_one_memfd_for_two_slots_of_a_zone(tmp_path: Path) -> None:
    """Two MemoryFds carrying the same file for two slots of one zone: one mapping, each fd closed once."""
    before = _fds()
    raw = RawSender(f"unix:{tmp_path}/in.sock")
    zone = ZoneConfig("mem0", 8 << 20, True)
    mappings = [GuestRamMapping(0, 0, 4 << 20, "mem0", False, 0),
                GuestRamMapping(1, 4 << 20, 4 << 20, "mem0", False, 4 << 20)]
    memfd = os.memfd_create("test-ram")
    os.ftruncate(memfd, 8 << 20)
    try:
        assert raw.request(p.Request.start()) is p.Status.OK
        for slot in (0, 1):
            assert raw.request(p.Request.memory_fd(), p.encode_memory_fd_slot(slot), [memfd]) is p.Status.OK
        payload = config_payload([zone], mappings)
        assert raw.request(p.Request.config(len(payload)), payload) is p.Status.OK
        assert raw.request(p.Request.abandon()) is p.Status.OK
        error = raw.finish()
        assert error is not None and "abandoned" in str(error)
        assert "Bad file descriptor" not in str(error)
    finally:
        os.close(memfd)
    assert _fds() == before


def _unusable_fds(tmp_path: Path) -> Iterator[tuple[str, int]]:
    small = os.memfd_create("small")
    os.ftruncate(small, 4096)
    yield "a memfd too small", small
    sealed = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(sealed, 4 << 20)
    import fcntl

    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    yield "a write-sealed memfd", sealed
    read_end, write_end = os.pipe()
    os.close(write_end)
    yield "a pipe", read_end
    left, right = socket.socketpair()
    yield "a socket", left.detach()
    right.close()
    yield "/dev/null", os.open("/dev/null", os.O_RDWR)
    readonly = tmp_path / "readonly"
    readonly.write_bytes(bytes(4 << 20))
    yield "a read-only file", os.open(readonly, os.O_RDONLY)
    yield "a directory", os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)


def test_refused_migrations_leak_no_fd_and_no_thread(tmp_path: Path) -> None:
    """Memory fds that cannot back a zone, and a Config whose VM KVM refuses: every fd and thread comes back."""
    zone = ZoneConfig("mem0", 4 << 20, True)
    # Warm up once: the first VM built in a process opens fds that stay (cffi, libc).
    warm = RawSender(f"unix:{tmp_path}/warm.sock")
    assert warm.request(p.Request.start()) is p.Status.OK
    payload = config_payload([zone])
    assert warm.request(p.Request.config(len(payload)), payload) is p.Status.OK
    assert warm.request(p.Request.abandon()) is p.Status.OK
    warm.finish()
    fds_before, threads_before = _fds(), threading.active_count()
    cases = list(_unusable_fds(tmp_path))
    for round_ in range(3):
        for what, fd in cases:
            raw = RawSender(f"unix:{tmp_path}/in-{round_}.sock")
            assert raw.request(p.Request.start()) is p.Status.OK
            assert raw.request(p.Request.memory_fd(), p.encode_memory_fd_slot(0), [fd]) is p.Status.OK, what
            assert raw.request(p.Request.config(len(payload)), payload) is p.Status.ERROR, what
            assert isinstance(raw.finish(), ChmigError), what
        # KVM takes at most 256 CPUID entries: the VM's construction fails after /dev/kvm was opened.
        raw = RawSender(f"unix:{tmp_path}/cpuid-{round_}.sock")
        assert raw.request(p.Request.start()) is p.Status.OK
        many = config_payload([zone], cpuid=[{"function": n, "index": 0} for n in range(300)])
        assert raw.request(p.Request.config(len(many)), many) is p.Status.ERROR
        assert isinstance(raw.finish(), ChmigError)
    for _, fd in cases:
        os.close(fd)
    assert _fds() == fds_before
    assert threading.active_count() == threads_before


# ---------------------------------------------------------------------------------------------
# 8, 9. Probes and idle peers on the main and the additional connections
# ---------------------------------------------------------------------------------------------


def test_probes_and_idle_peers_do_not_end_the_receiver(tmp_path: Path) -> None:
    limits = p.Limits(first_request_timeout_s=0.5, stall_timeout_s=0.5)
    raw = RawSender(f"unix:{tmp_path}/in.sock", limits)
    # The fixture-style sender connected first: make it a probe that says nothing and closes.
    raw.sock.close()
    idle = raw.connect()  # says nothing: dropped after 0.5 s
    assert idle.recv(16) == b""
    idle.close()
    half = raw.connect()  # half a header, then silence
    half.sendall(b"\x01\x00\x00")
    assert half.recv(16) == b""
    half.close()
    raw.sock = raw.connect()  # the real sender
    assert raw.request(p.Request.start()) is p.Status.OK
    assert raw.request(p.Request.abandon()) is p.Status.OK
    assert "abandoned" in str(raw.finish())


def test_silent_peers_that_came_first_do_not_delay_the_sender(tmp_path: Path) -> None:
    """Every connection is made ready on its own thread: peers that connected first and say nothing cost the
    real sender nothing (not their first_request_timeout_s each), and are closed once it is found."""
    limits = p.Limits(first_request_timeout_s=5, stall_timeout_s=5)
    raw = RawSender(f"unix:{tmp_path}/in.sock", limits)
    threads_before = threading.active_count()
    silent = [raw.sock, *(raw.connect() for _ in range(3))]
    raw.sock = raw.connect()
    started = time.monotonic()
    assert raw.request(p.Request.start()) is p.Status.OK
    assert time.monotonic() - started < 2, "the sender waited behind the silent peers"
    for sock in silent:
        assert sock.recv(16) == b""  # closed, unanswered, as soon as the sender was found
        sock.close()
    assert raw.request(p.Request.abandon()) is p.Status.OK
    assert "abandoned" in str(raw.finish())
    assert threading.active_count() <= threads_before


def test_a_cancel_ends_the_wait_for_a_sender_at_once_with_silent_peers_waiting(tmp_path: Path) -> None:
    raw = RawSender(f"unix:{tmp_path}/in.sock", p.Limits(first_request_timeout_s=20))
    silent = [raw.sock, raw.connect()]  # both say nothing: their threads wait for first bytes
    deadline = time.monotonic() + 10
    while len(raw.receiver_threads()) < 2:
        assert time.monotonic() < deadline, "the candidates' threads never started"
        time.sleep(0.01)
    started = time.monotonic()
    raw.receiver.cancel()
    raw.thread.join(10)
    assert not raw.thread.is_alive() and time.monotonic() - started < 2
    assert isinstance(raw.error, MigrationError) and "cancelled before a sender connected" in str(raw.error)
    assert not raw.receiver_threads()
    for sock in silent:
        assert sock.recv(16) == b""
        sock.close()
    raw.listener.close()


def test_no_sender_in_time_says_so_and_counts_the_quiet_connections(tmp_path: Path) -> None:
    listener = listen(parse_url(f"unix:{tmp_path}/in.sock"))
    receiver = Receiver(listener, limits=p.Limits(first_request_timeout_s=20))
    quiet = socket.socket(socket.AF_UNIX)
    quiet.settimeout(10)
    quiet.connect(str(tmp_path / "in.sock"))
    try:
        with pytest.raises(TransportError, match=r"no sender in time \(1 connection\(s\) accepted had not said"):
            receiver.run(accept_timeout=0.5)
        assert quiet.recv(16) == b""
    finally:
        quiet.close()
        listener.close()


def test_stalled_tls_handshakes_before_the_sender_do_not_delay_it(procs: Processes,
                                                                   tls_dirs: dict[str, Path]) -> None:
    """Strangers that connect to a TLS receiver and never start their handshake (10 s each if done in turn)."""
    source = procs.run(*VM_ARGS)
    before = source.wait_rounds(1)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--tls-dir", str(tls_dirs["good"]))
    host, port = url.removeprefix("tcp:").rsplit(":", 1)
    strangers = [socket.create_connection((host, int(port)), timeout=20) for _ in range(3)]
    try:
        started = time.monotonic()
        source.call("PUT", "vm.send-migration", {"destination_url": url, "tls_dir": str(tls_dirs["good"])},
                    timeout=90)
        took = time.monotonic() - started
    finally:
        for sock in strangers:
            sock.close()
    assert took < 10, f"the migration took {took:.1f} s: it waited behind the strangers' handshakes"
    info = dest.wait_rounds(before["guest"]["rounds"] + 2)
    assert info["guest"]["errors"] == 0


def test_receive_process_survives_a_port_probe_and_a_failed_tls_handshake(procs: Processes, tmp_path: Path,
                                                                         tls_dirs: dict[str, Path]) -> None:
    source = procs.run(*VM_ARGS)
    before = source.wait_rounds(1)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--tls-dir", str(tls_dirs["good"]))
    host, port = url.removeprefix("tcp:").rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=10).close()  # a port probe
    plain = socket.create_connection((host, int(port)), timeout=20)  # no TLS at all: the handshake fails
    plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
    try:
        plain.recv(64)
    except ConnectionResetError:
        pass  # the receiver gave up on it: that is the point
    plain.close()
    source.call("PUT", "vm.send-migration", {"destination_url": url, "tls_dir": str(tls_dirs["good"])}, timeout=90)
    info = dest.wait_rounds(before["guest"]["rounds"] + 2)
    assert info["guest"]["errors"] == 0


def test_worker_probes_give_their_place_back(tmp_path: Path) -> None:
    limits = p.Limits(max_connections=4, role_timeout_s=0.5)
    raw = RawSender("tcp:127.0.0.1:0", limits)
    assert raw.request(p.Request.start()) is p.Status.OK
    payload = config_payload([ZoneConfig("mem0", 4 << 20, True)])
    assert raw.request(p.Request.config(len(payload)), payload) is p.Status.OK
    for _ in range(12):  # three times the quota of probes, each closed at once
        probe = raw.connect()
        probe.close()
    deadline = time.monotonic() + 10

    def probes_gone() -> bool:
        # Every probe accepted (none left in the backlog to arrive with the worker and take its place: under
        # load, several could) and its thread ended.
        return not raw.listener.pending() and raw.receiver.threads.alive() == ["migrate-receive-accept"]

    while not probes_gone():
        assert time.monotonic() < deadline, "the probes were not all accepted and ended"
        time.sleep(0.02)
    worker = raw.connect()
    worker.sendall(p.ConnectionRole.PRECOPY_MEMORY.encode())
    worker.sendall(p.Request.memory(16).encode() + p.MemoryRange(0x100000, 4096).encode() + b"\xab" * 4096)
    assert p.Response.decode(worker.recv(16)).is_ok
    worker.close()
    assert bytes(raw.receiver.memory.read(0x100000, 4096)) == b"\xab" * 4096
    # The probes were no migration errors: State goes through (the VM is restored from a garbage-free state? no:
    # an empty State is refused), so end with Abandon and check nothing but that was reported.
    assert raw.request(p.Request.abandon()) is p.Status.OK
    assert "abandoned" in str(raw.finish())


# ---------------------------------------------------------------------------------------------
# 3. A silent destination gives the source back within a bound
# ---------------------------------------------------------------------------------------------


class SilentDestination:
    """Answers Ok to Start, Config and every Memory, then goes silent at the request named ``stall_at``."""

    def __init__(self, stall_at: p.Command) -> None:
        self.stall_at = stall_at
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp:127.0.0.1:{self.server.getsockname()[1]}"
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="silent-destination")

    def start(self) -> SilentDestination:
        self.thread.start()
        return self

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            while True:
                header = b""
                while len(header) < 16:
                    chunk = conn.recv(16 - len(header))
                    if not chunk:
                        return
                    header += chunk
                request = p.Request.decode(header)
                if request.command is self.stall_at:
                    self.release.wait(120)
                    return
                if request.command is p.Command.MEMORY:
                    table = p.MemoryRangeTable.decode(_read(conn, request.length))
                    _read(conn, table.total_bytes)
                elif request.length:
                    _read(conn, request.length)
                conn.sendall(p.Response.ok().encode())

    def close(self) -> None:
        self.release.set()
        self.server.close()
        self.thread.join(10)


def _read(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = conn.recv(min(n - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return bytes(data)


def test_a_destination_silent_at_state_gives_the_paused_vm_back(procs: Processes) -> None:
    source = procs.run(*VM_ARGS)
    before = source.wait_rounds(1)
    silent = SilentDestination(p.Command.STATE).start()
    try:
        begin = time.monotonic()
        with pytest.raises(Exception, match="silent for 10 s"):
            source.call("PUT", "vm.send-migration", {"destination_url": silent.url}, timeout=60)
        took = time.monotonic() - begin
    finally:
        silent.close()
    assert took < 30, took
    info = source.wait_rounds(before["guest"]["rounds"] + 2)
    assert info["state"] == "Running" and info["guest"]["errors"] == 0
    assert info["migration"]["status"] == "failed"


def test_a_lost_ok_to_complete_leaves_the_source_paused(procs: Processes) -> None:
    """The point of no return: Complete went out, its answer never came — the VM must not run twice."""
    source = procs.run(*VM_ARGS)
    before = source.wait_rounds(1)
    silent = SilentDestination(p.Command.COMPLETE).start()
    try:
        with pytest.raises(Exception, match="Complete was sent but not acknowledged"):
            source.call("PUT", "vm.send-migration", {"destination_url": silent.url}, timeout=60)
    finally:
        silent.close()
    info = source.info()
    assert info["state"] == "Paused"
    assert info["migration"]["status"] == "unknown"
    assert "may be running on the destination" in info["migration"]["error"]
    time.sleep(1)
    assert source.info()["state"] == "Paused"  # nothing resumes it on its own
    source.call("PUT", "vm.resume")  # the operator's explicit decision
    info = source.wait_rounds(before["guest"]["rounds"] + 2)
    assert info["guest"]["errors"] == 0


def test_an_operator_can_cancel_a_migration(procs: Processes) -> None:
    source = procs.run(*VM_ARGS)
    before = source.wait_rounds(1)
    silent = SilentDestination(p.Command.CONFIG).start()  # would hold the source for 60 s
    outcome: list[BaseException | None] = []

    def send() -> None:
        try:
            source.call("PUT", "vm.send-migration", {"destination_url": silent.url}, timeout=60)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=send, name="test-send")
    thread.start()
    try:
        source.wait_for(lambda i: i.get("migration_in_progress") == "send-migration", 10, "the migration")
        begin = time.monotonic()
        from chmig.apiclient import request

        request(source.api, "PUT", "vm.cancel-migration", None, timeout=30)
        thread.join(30)
        assert time.monotonic() - begin < 10
    finally:
        silent.close()
    assert outcome and outcome[0] is not None and "cancelled" in str(outcome[0])
    info = source.wait_rounds(before["guest"]["rounds"] + 2)
    assert info["state"] == "Running" and info["migration"]["status"] == "cancelled"


