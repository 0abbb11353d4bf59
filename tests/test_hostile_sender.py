"""A hostile or broken sender, played by a raw socket: the receiver answers Error or hangs up, never crashes.

Each case runs the real :class:`~chmig.receive.Receiver` in a thread on a
real listener; the test is the peer, writing raw bytes.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

from chmig import protocol as p
from chmig.errors import ChmigError
from chmig.receive import Receiver
from chmig.transport import listen, parse_url

from .conftest import requires_kvm

pytestmark = [requires_kvm, pytest.mark.timeout(60)]

from .wire import RAM, config_payload


class Peer:
    """The raw-socket sender and the receiver thread it talks to."""

    def __init__(self, tmp_path: Path) -> None:
        self.listener = listen(parse_url("tcp:127.0.0.1:0"))
        self.receiver = Receiver(self.listener)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="receiver-under-test")
        self.thread.start()
        addr = self.listener.address
        self.sock = socket.create_connection((addr.host, addr.port), timeout=20)

    def _run(self) -> None:
        try:
            vm = self.receiver.run(accept_timeout=20)
            vm.close()  # with its memory
        except BaseException as exc:
            self.error = exc

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, command: int, length: int = 0, payload: bytes = b"", headers: bytes = bytes(6)) -> None:
        self.send(struct.pack("<H6sQ", command, headers, length) + payload)

    def response(self) -> p.Response | None:
        """The next response, or None when the receiver hung up."""
        data = b""
        while len(data) < 16:
            chunk = self.sock.recv(16 - len(data))
            if not chunk:
                return None
            data += chunk
        return p.Response.decode(data)

    def expect_ok(self) -> None:
        assert self.response() == p.Response.ok()

    def finish(self) -> BaseException | None:
        self.sock.close()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the receiver did not stop"
        self.listener.close()
        return self.error

    def configured(self) -> None:
        self.request(p.Command.START)
        self.expect_ok()
        payload = config_payload()
        self.request(p.Command.CONFIG, len(payload), payload)
        self.expect_ok()


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    peer = Peer(tmp_path)
    yield peer
    peer.sock.close()
    peer.listener.abort()
    peer.thread.join(20)
    peer.listener.close()


def refused(peer: Peer, message: str) -> None:
    """The receiver answered Error (or hung up) and stopped with a clear error."""
    response = peer.response()
    assert response is None or response.status is p.Status.ERROR
    error = peer.finish()
    assert isinstance(error, ChmigError), error
    assert message in str(error), str(error)
    assert peer.receiver.vm is None and peer.receiver.memory is None  # the half-built VM is gone


def test_unknown_command(peer: Peer) -> None:
    peer.request(42)
    refused(peer, "unknown command 42")


def test_unsupported_version(peer: Peer) -> None:
    peer.request(p.Command.START, headers=struct.pack("<H4x", 9))
    refused(peer, "version 9")


def test_memory_before_config(peer: Peer) -> None:
    peer.request(p.Command.START)
    peer.expect_ok()
    peer.request(p.Command.MEMORY, 16, p.MemoryRange(0x100000, 4096).encode())
    refused(peer, "can't handle command Memory in receive state Started")


def test_huge_config_length(peer: Peer) -> None:
    peer.request(p.Command.START)
    peer.expect_ok()
    peer.request(p.Command.CONFIG, 1 << 62)
    refused(peer, "exceeds the limit")


def test_huge_table_length(peer: Peer) -> None:
    peer.configured()
    peer.request(p.Command.MEMORY, 1 << 40)
    refused(peer, "exceeds the limit")


def test_table_not_multiple_of_16(peer: Peer) -> None:
    peer.configured()
    peer.request(p.Command.MEMORY, 20, bytes(20))
    refused(peer, "not a multiple of 16")


@pytest.mark.parametrize("gpa, length", [(RAM - 4096, 8192), (RAM, 4096), (1 << 40, 4096), (2**64 - 4096, 4096)])
def test_range_outside_ram(peer: Peer, gpa: int, length: int) -> None:
    peer.configured()
    peer.request(p.Command.MEMORY, 16, struct.pack("<QQ", gpa, length))
    refused(peer, "not inside guest RAM")


def test_truncated_memory_payload(peer: Peer) -> None:
    peer.configured()
    peer.request(p.Command.MEMORY, 16, p.MemoryRange(0x100000, 8192).encode() + bytes(100))
    peer.sock.shutdown(socket.SHUT_WR)
    refused(peer, "closed by peer")


@pytest.mark.parametrize("payload, message", [
    (b"{not json", "malformed Config"),
    (b'{"vm_config": {}}', "malformed"),
    (json.dumps({"vm_config": {"cpus": {"boot_vcpus": 1}, "memory": {"size": 1 << 50}, "workload": {
        "kind": "verify", "dirty_percent": 1, "dirty_rate": 0}},
        "memory_manager_data": {"guest_ram_mappings": []}}).encode(), "outside"),
])
def test_bad_config(peer: Peer, payload: bytes, message: str) -> None:
    peer.request(p.Command.START)
    peer.expect_ok()
    peer.request(p.Command.CONFIG, len(payload), payload)
    refused(peer, message)


def test_bad_state(peer: Peer) -> None:
    peer.configured()
    payload = b'{"vcpus": [{"regs": "no"}], "devices": {"guest": {"vcpus": [{}]}}}'
    peer.request(p.Command.STATE, len(payload), payload)
    refused(peer, "State")


def test_memory_fd_over_tcp(peer: Peer) -> None:
    peer.request(p.Command.START)
    peer.expect_ok()
    peer.request(p.Command.MEMORY_FD, 4, b"\0\0\0\0")
    refused(peer, "only unix: sockets")


def test_abandon_answers_ok_and_discards(peer: Peer) -> None:
    peer.configured()
    peer.request(p.Command.ABANDON)
    peer.expect_ok()
    error = peer.finish()
    assert error is not None and "abandoned" in str(error)
    assert peer.receiver.vm is None


def test_worker_connection_rules(peer: Peer) -> None:
    """A bad role is dropped; a worker may only send Memory; the main connection carries on."""
    peer.configured()
    addr = peer.listener.address
    bad_role = socket.create_connection((addr.host, addr.port), timeout=10)
    bad_role.sendall(struct.pack("<H", 7))
    assert bad_role.recv(16) == b""  # dropped
    bad_role.close()
    worker = socket.create_connection((addr.host, addr.port), timeout=10)
    worker.sendall(p.ConnectionRole.PRECOPY_MEMORY.encode())
    worker.sendall(p.Request.memory(16).encode() + p.MemoryRange(0x100000, 4096).encode() + b"\xab" * 4096)
    assert p.Response.decode(worker.recv(16)).is_ok
    worker.sendall(p.Request.state(2).encode() + b"{}")
    assert p.Response.decode(worker.recv(16)).status is p.Status.ERROR
    worker.close()
    assert bytes(peer.receiver.memory.read(0x100000, 4096)) == b"\xab" * 4096
    # The worker's misbehaviour fails the migration at State.
    peer.request(p.Command.STATE, 2, b"{}")
    refused(peer, "additional connection failed")


def test_receive_process_exits_with_one_clear_line(tmp_path: Path) -> None:
    sock_path = tmp_path / "in.sock"
    proc = subprocess.Popen([sys.executable, "-m", "chmig", "receive", "--listen", f"unix:{sock_path}",
                             "--serial", "off"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "listening on" in proc.stdout.readline()
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock_path))
    s.sendall(struct.pack("<H6sQ", p.Command.CONFIG, bytes(6), 0))
    assert p.Response.decode(s.recv(16)).status is p.Status.ERROR
    s.close()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1].startswith("chmig receive: error:"), err
    assert "can't handle command Config in receive state Established" in err


def test_memory_fd_that_cannot_be_mapped(tmp_path: Path) -> None:
    """A read-only file as guest memory: Error and a clear message, no crash."""
    import os

    listener = listen(parse_url(f"unix:{tmp_path}/in.sock"))
    receiver = Receiver(listener)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            receiver.run(accept_timeout=20)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="receiver-under-test")
    thread.start()
    readonly = tmp_path / "ram"
    readonly.write_bytes(bytes(RAM))
    fd = os.open(readonly, os.O_RDONLY)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(f"{tmp_path}/in.sock")
    sock.sendall(p.Request.start().encode())
    assert p.Response.decode(sock.recv(16)).is_ok
    sock.sendall(p.Request.memory_fd().encode())
    socket.send_fds(sock, [p.encode_memory_fd_slot(0)], [fd])
    assert p.Response.decode(sock.recv(16)).is_ok
    payload = config_payload()
    sock.sendall(p.Request.config(len(payload)).encode() + payload)
    assert p.Response.decode(sock.recv(16)).status is p.Status.ERROR
    sock.close()
    os.close(fd)
    thread.join(20)
    listener.close()
    assert errors and isinstance(errors[0], ChmigError) and "Config" in str(errors[0]), errors
