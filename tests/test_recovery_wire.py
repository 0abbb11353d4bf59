"""Postcopy recovery's wire surface, in-process: the listener a recoverable destination keeps after State.

A real pager (real userfaultfd on a real memfd), a real listener, and a fake
source made of raw bytes (tests/test_postcopy.py's lab).  Hostile or confused
connections — another role, a short hello, a wrong token, silence, garbage —
are closed unanswered and change nothing; the real source's next attempt then
resumes the pull, and the fault that was in flight when the connection broke
is asked again.  Nothing may be left behind: no fd, no thread.
"""

from __future__ import annotations

import ctypes
import dataclasses
import socket
import threading
import time
from typing import Any, Callable, Iterator

import pytest

from chmig import protocol as p
from chmig.channel import Observers
from chmig.receive import RecoveryAcceptor
from chmig.transport import TlsConfig, listen, parse_url

from .conftest import requires_kvm
from .pki import Pki
from .test_postcopy import (PAGE_SIZE, FakeSource, PagerLab, answer_right, labs_closed_after, page_pattern,
                           read_page_fault)

pytestmark = [requires_kvm, pytest.mark.timeout(60)]

TOKEN = bytes(range(100, 116))
LIMITS = dataclasses.replace(p.DEFAULT_LIMITS, role_timeout_s=1.0, fault_response_timeout_s=2.0)


class RecoveryLab(PagerLab):
    """A pager that recovers (``recovery_s``), with the listener a source reconnects to."""

    def __init__(self, recovery_s: float, prefetch: str = "256K", tls: TlsConfig | None = None) -> None:
        super().__init__(1, prefetch, LIMITS)
        self.pager.recovery_s = recovery_s
        self.tls = tls
        listener = listen(parse_url("tcp:127.0.0.1:0"), tls)
        self.address = (listener.address.host, listener.address.port)
        self.pager.recovery_listener = RecoveryAcceptor(listener, TOKEN, self.pager.arrive, Observers(), LIMITS)
        self.pager.recovery_listener.start()
        self.reconnected: list[socket.socket] = []

    def connect(self, first_bytes: bytes, tls: bool = False) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=10)
        if tls:
            assert self.tls is not None
            sock = self.tls.client_context().wrap_socket(sock, server_hostname=self.address[0])
        sock.sendall(first_bytes)
        return sock

    def reconnect(self, attempt: int, behave: Callable[[socket.socket, int, int], bool]) -> FakeSource:
        """The real source's next attempt: the right token, then it serves with ``behave``."""
        sock = self.connect(p.ConnectionRole.FAULT_RECOVERY.encode() + p.RecoveryHello(TOKEN, attempt).encode(),
                            tls=self.tls is not None)
        self.reconnected.append(sock)
        return FakeSource([sock], behave)

    def close(self) -> None:
        try:
            super().close()
        finally:
            for sock in self.reconnected:
                sock.close()


@pytest.fixture
def labs() -> Iterator[Callable[..., PagerLab]]:
    yield from labs_closed_after(RecoveryLab)


def breaks_at_once(sock: socket.socket, gpa: int, length: int) -> bool:
    sock.shutdown(socket.SHUT_RDWR)
    return False


def wait_status(lab: RecoveryLab, status: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while lab.pager.stats.status != status:
        assert time.monotonic() < deadline, f"status {lab.pager.stats.status}, not {status}"
        time.sleep(0.01)


def refused(sock: socket.socket) -> bool:
    """Closed by the destination without a byte of answer."""
    sock.settimeout(10)
    try:
        return sock.recv(16) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


HOSTILE_HELLOS = [
    pytest.param(p.ConnectionRole.FAULT.encode() + bytes(24), id="role-fault-after-state"),
    pytest.param(p.ConnectionRole.PRECOPY_MEMORY.encode(), id="role-memory"),
    pytest.param(b"\x09\x00", id="unknown-role"),
    pytest.param(p.ConnectionRole.FAULT_RECOVERY.encode() + TOKEN[:10], id="short-hello"),
    pytest.param(p.ConnectionRole.FAULT_RECOVERY.encode(), id="silent-after-role"),
    pytest.param(p.ConnectionRole.FAULT_RECOVERY.encode() + p.RecoveryHello(bytes(16), 1).encode(), id="wrong-token"),
    pytest.param(p.ConnectionRole.FAULT_RECOVERY.encode() + TOKEN + bytes(8), id="attempt-0"),
    pytest.param(b"\xff" * 4096, id="garbage"),
]


@pytest.mark.parametrize("hello", HOSTILE_HELLOS)
def test_strangers_are_refused_and_the_source_still_recovers(labs: Callable[..., Any],
                                                             hello: bytes) -> None:
    lab = labs(recovery_s=20)
    lab.start(breaks_at_once)
    wait_status(lab, "recovering")
    strangers = [lab.connect(hello) for _ in range(3)]
    assert all(refused(sock) for sock in strangers)
    assert lab.pager.stats.status == "recovering" and not lab.pager.done.is_set()
    source = lab.reconnect(1, answer_right)
    assert lab.pager.wait(30), "the pager did not recover"
    assert lab.pager.stats.status == "whole", lab.pager.stats.error
    recovery, = lab.pager.stats.recoveries
    assert recovery["attempt"] == 1 and recovery["pages_rerequested"] >= 1, recovery
    memory = lab.memory
    lab.pager.close()
    assert memory.read(0x40000, 4 * PAGE_SIZE) == page_pattern(0x40000, 4 * PAGE_SIZE)
    lab.close()
    source.join()
    lab.assert_nothing_left()


def test_strangers_stalling_their_tls_handshake_do_not_keep_the_source_out(labs: Callable[..., Any],
                                                                          pki: Pki) -> None:
    """Each TLS handshake runs on its connection's thread, and an unproven connection may be evicted: more
    silent strangers than the acceptor hears at once delay the real source by nothing like a handshake
    timeout (10 s) each."""
    lab = labs(recovery_s=20, tls=TlsConfig.from_dir(pki.good))
    lab.start(breaks_at_once)
    wait_status(lab, "recovering")
    strangers = [socket.create_connection(lab.address, timeout=10) for _ in range(LIMITS.max_fault_connections + 2)]
    try:
        started = time.monotonic()
        source = lab.reconnect(1, answer_right)
        assert lab.pager.wait(30), "the pager did not recover"
        assert time.monotonic() - started < 5, "the source waited behind the strangers' handshakes"
        assert lab.pager.stats.status == "whole", lab.pager.stats.error
    finally:
        for sock in strangers:
            sock.close()
    lab.close()
    source.join()
    lab.assert_nothing_left()


def test_an_older_attempt_is_refused_once_a_newer_one_came(labs: Callable[..., Any]) -> None:
    lab = labs(recovery_s=20)
    lab.start(breaks_at_once)
    wait_status(lab, "recovering")
    newer = lab.reconnect(5, answer_right)
    assert lab.pager.wait(30) and lab.pager.stats.status == "whole"
    assert [r["attempt"] for r in lab.pager.stats.recoveries] == [5]
    lab.close()
    newer.join()
    lab.assert_nothing_left()


def test_no_reconnection_within_the_deadline_fails_the_pager(labs: Callable[..., Any]) -> None:
    lab = labs(recovery_s=1)
    begin = time.monotonic()
    lab.start(breaks_at_once)
    assert lab.pager.wait(15)
    assert time.monotonic() - begin >= 1
    error = lab.pager.error
    assert error is not None and "did not reconnect within 1 s (postcopy_recovery_s)" in error, error
    assert "\n" not in error and lab.pager.stats.status == "failed"
    lab.close()
    lab.assert_nothing_left()
    # The port was given back: nobody reconnects to a pager that ended.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(lab.address, timeout=5)


def test_the_fault_in_flight_is_asked_again_after_the_recovery(labs: Callable[..., Any]) -> None:
    """prefetch=off: a thread faults on a page; the connection breaks on that very request; the new connection's
    first request is the same page, and the thread gets the source's bytes."""
    lab = labs(recovery_s=20, prefetch="off")
    asked: list[tuple[int, int]] = []

    def break_on_the_fault(sock: socket.socket, gpa: int, length: int) -> bool:
        asked.append((gpa, length))
        return breaks_at_once(sock, gpa, length)

    lab.start(break_on_the_fault)
    gpa = 0x123000
    buffer = ctypes.create_string_buffer(PAGE_SIZE)
    region = lab.memory.regions[0]
    reader = threading.Thread(target=ctypes.memmove, args=(buffer, region.host_address + gpa, PAGE_SIZE),
                              name="test-faulting-reader")
    reader.start()
    wait_status(lab, "recovering")
    assert asked == [(gpa, PAGE_SIZE)]
    assert reader.is_alive(), "the faulting thread went on without its page"
    sock = lab.connect(p.ConnectionRole.FAULT_RECOVERY.encode() + p.RecoveryHello(TOKEN, 1).encode())
    lab.reconnected.append(sock)
    sock.settimeout(10)
    assert read_page_fault(sock) == (gpa, PAGE_SIZE)  # asked again, first
    sock.sendall(p.Response.ok(PAGE_SIZE).encode() + page_pattern(gpa, PAGE_SIZE))
    reader.join(10)
    assert not reader.is_alive() and buffer.raw == page_pattern(gpa, PAGE_SIZE)
    recovery, = lab.pager.stats.recoveries
    assert recovery["pages_rerequested"] == 1 and recovery["duration_ms"] > 0, recovery
    lab.close()
    lab.assert_nothing_left()


def test_fuzz_the_recovery_listener_briefly() -> None:
    """A short fixed-seed run of fuzz/recovery.py (``python -m fuzz --target recovery`` runs more)."""
    from fuzz import recovery

    lines: list[str] = []
    assert recovery.run(60, seed=1, report=lines.append) == 0, "\n".join(lines)
