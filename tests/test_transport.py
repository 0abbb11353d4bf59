"""Tests for chmig.transport, all on real sockets, real TLS and real memfds.

Each test that needs both ends runs the server side in a worker thread
(``ThreadPoolExecutor``) and the client side in the test thread.  The
executor is always entered *before* the listener, so the listener is closed
first when a test fails: that aborts a pending accept and lets the executor
join its thread instead of hanging until the pytest timeout.
"""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest

from .pki import Pki, _tls_dir
from chmig.errors import ListenerAborted, MigrationError, TransportError
from chmig.transport import (
    CA_CERT_FILE,
    CLIENT_CERT_FILE,
    CLIENT_KEY_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    TCP_KEEPCNT,
    TCP_KEEPIDLE_S,
    TCP_KEEPINTVL_S,
    TCP_USER_TIMEOUT_MS,
    Connection,
    ConnectionClosed,
    Listener,
    TlsConfig,
    Url,
    connect,
    listen,
    parse_url,
)

T = TypeVar("T")

LOOPBACK = Url.tcp("127.0.0.1", 0)
# Long enough for a loaded CI machine, short enough that a hang fails fast.
IO_TIMEOUT = 10.0


# --------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(pki: Pki) -> TlsConfig:
    return TlsConfig.from_dir(pki.good)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as executor:
        yield executor


def ends_promptly(pool: ThreadPoolExecutor, call: Callable[[], object], interrupt: Callable[[], None],
                  expected: type[BaseException], match: str | None = None, within: float = 0.5) -> None:
    """``call`` blocks (on a pool thread) until ``interrupt`` runs; then it raises ``expected`` at once."""
    running = pool.submit(call)
    time.sleep(0.3)  # let it block (in poll, recv, the handshake)
    assert not running.done()
    started = time.monotonic()
    interrupt()
    with pytest.raises(expected, match=match):
        running.result(timeout=IO_TIMEOUT)
    assert time.monotonic() - started < within


def serve(
    pool: ThreadPoolExecutor, listener: Listener, handler: Callable[[Connection], T]
) -> Future[T]:
    """Accept one connection in a worker thread and run ``handler`` on it."""

    def run() -> T:
        with listener.accept(timeout=IO_TIMEOUT) as conn:
            conn.set_timeout(IO_TIMEOUT)
            return handler(conn)

    return pool.submit(run)


def echo_upper(conn: Connection) -> bytes:
    """Server side of the round trip: read 5 bytes, answer them upper-cased."""
    data = conn.read_exact(5, "greeting")
    conn.write_all(data.upper())
    return data


def round_trip(
    pool: ThreadPoolExecutor, listener: Listener, url: Url, tls: TlsConfig | None = None
) -> None:
    served = serve(pool, listener, echo_upper)
    with connect(url, tls, timeout=IO_TIMEOUT) as conn:
        conn.set_timeout(IO_TIMEOUT)
        conn.write_all(b"hello")
        assert conn.read_exact(5, "answer") == b"HELLO"
    assert served.result(timeout=IO_TIMEOUT) == b"hello"


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def can_bind_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:127.0.0.1:6000", Url.tcp("127.0.0.1", 6000)),
        ("tcp:0.0.0.0:0", Url.tcp("0.0.0.0", 0)),
        ("tcp:localhost:65535", Url.tcp("localhost", 65535)),
        ("tcp:dst-host.example.com:443", Url.tcp("dst-host.example.com", 443)),
        ("tcp:[::1]:6000", Url.tcp("::1", 6000)),
        ("tcp:[::]:0", Url.tcp("::", 0)),
        ("tcp:[2001:db8::42]:1", Url.tcp("2001:db8::42", 1)),
        ("unix:/run/chmig.sock", Url.unix("/run/chmig.sock")),
        ("unix:relative/socket", Url.unix("relative/socket")),
        ("unix:/path:with:colons", Url.unix("/path:with:colons")),
    ],
)
def test_parse_url_accepts(text: str, expected: Url) -> None:
    url = parse_url(text)
    assert url == expected
    assert str(url) == text
    assert parse_url(str(url)) == url


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "missing scheme"),
        ("127.0.0.1", "missing scheme"),
        ("http://host:80", "unknown scheme 'http'"),
        ("TCP:host:1", "unknown scheme 'TCP'"),
        ("tcp:", "missing port"),
        ("tcp:host", "missing port"),
        ("tcp:host:", "missing port"),
        ("tcp::6000", "missing host"),
        ("tcp:host:port", "'port' is not a number"),
        ("tcp:host:-1", "'-1' is not a number"),
        ("tcp:host:+80", "'+80' is not a number"),
        ("tcp:host:65536", "out of range 0..65535"),
        ("tcp:host:99999999999", "out of range 0..65535"),
        ("tcp:::1:6000", "IPv6 address must be in brackets"),
        ("tcp:fe80::1:22", "IPv6 address must be in brackets"),
        ("tcp:[::1:6000", "missing ']'"),
        ("tcp:[::1]", "missing port"),
        ("tcp:[::1]6000", "unexpected '6000' after ']'"),
        ("tcp:[127.0.0.1]:6000", "not an IPv6 address"),
        ("tcp:[]:6000", "not an IPv6 address"),
        ("tcp:300.1.1.1:6000", "not a valid IPv4 address"),
        ("tcp:1.2.3:6000", "not a valid IPv4 address"),
        ("tcp:bad host:6000", "not a valid host name"),
        ("tcp:a..b:6000", "not a valid host name"),
        ("unix:", "empty path"),
        ("unix:/tmp/a\0b", "NUL byte"),
    ],
)
def test_parse_url_rejects(text: str, complaint: str) -> None:
    with pytest.raises(TransportError) as caught:
        parse_url(text)
    assert complaint in str(caught.value)
    assert caught.value.where == text
    assert isinstance(caught.value, MigrationError)


@pytest.mark.timeout(10)
def test_url_rejects_unknown_scheme_when_built_directly() -> None:
    with pytest.raises(TransportError, match="unknown URL scheme 'udp'"):
        Url("udp", host="h", port=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_tcp_round_trip(pool: ThreadPoolExecutor) -> None:
    with listen(LOOPBACK) as listener:
        assert listener.address.host == "127.0.0.1"
        assert listener.address.port != 0
        round_trip(pool, listener, listener.address)


@pytest.mark.timeout(30)
def test_tcp_round_trip_by_host_name(pool: ThreadPoolExecutor) -> None:
    with listen(Url.tcp("127.0.0.1", 0)) as listener:
        round_trip(pool, listener, Url.tcp("localhost", listener.address.port))


@pytest.mark.timeout(30)
def test_unix_round_trip(pool: ThreadPoolExecutor, tmp_path: Path) -> None:
    url = Url.unix(tmp_path / "mig.sock")
    with listen(url) as listener:
        assert listener.address == url
        round_trip(pool, listener, url)


@pytest.mark.timeout(30)
def test_tls_round_trip(pool: ThreadPoolExecutor, tls: TlsConfig) -> None:
    with listen(LOOPBACK, tls) as listener:
        assert listener.is_tls
        round_trip(pool, listener, listener.address, tls)


@pytest.mark.timeout(30)
def test_tls_round_trip_by_host_name(pool: ThreadPoolExecutor, tls: TlsConfig) -> None:
    # "localhost" is verified against the DNS entry of the server's SAN.
    with listen(LOOPBACK, tls) as listener:
        round_trip(pool, listener, Url.tcp("localhost", listener.address.port), tls)


@pytest.mark.timeout(30)
def test_tls_with_role_specific_directories(
    pool: ThreadPoolExecutor, pki: Pki, tmp_path: Path
) -> None:
    # Like Cloud Hypervisor, the receiver only needs the server files and
    # the sender only the client files.
    good = pki.good
    server_dir = _tls_dir(tmp_path / "server", {
        n: good / n for n in (CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE)})
    client_dir = _tls_dir(tmp_path / "client", {
        n: good / n for n in (CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE)})
    server_tls = TlsConfig.from_dir(server_dir, role="server")
    client_tls = TlsConfig.from_dir(client_dir, role="client")
    with listen(LOOPBACK, server_tls) as listener:
        round_trip(pool, listener, listener.address, client_tls)


@pytest.mark.timeout(30)
def test_ipv6_round_trip(pool: ThreadPoolExecutor, tls: TlsConfig) -> None:
    if not can_bind_ipv6_loopback():
        pytest.skip("this machine cannot bind ::1 (no IPv6 loopback)")
    with listen(parse_url("tcp:[::1]:0")) as listener:
        assert listener.address.host == "::1"
        assert str(listener.address).startswith("tcp:[::1]:")
        round_trip(pool, listener, listener.address)
    # The server certificate has IP:::1 in its subjectAltName.
    with listen(parse_url("tcp:[::1]:0"), tls) as listener:
        round_trip(pool, listener, listener.address, tls)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["tcp", "unix", "tls"])
def test_bulk_data_into_mmap_both_ways(
    pool: ThreadPoolExecutor, tmp_path: Path, tls: TlsConfig, kind: str
) -> None:
    """Send a few MiB each way and receive them straight into an mmap."""
    size = 4 * 1024 * 1024 + 123  # not a multiple of any buffer size
    to_server = os.urandom(size)
    to_client = os.urandom(size)
    url = Url.unix(tmp_path / "bulk.sock") if kind == "unix" else LOOPBACK
    config = tls if kind == "tls" else None

    def server(conn: Connection) -> bytes:
        with mmap.mmap(-1, size) as memory:
            with memoryview(memory) as view:
                conn.read_exact_into(view, "guest memory")
            received = memory[:]
        conn.write_all(memoryview(to_client))
        return received

    with listen(url, config) as listener:
        served = serve(pool, listener, server)
        with connect(listener.address, config, timeout=IO_TIMEOUT) as conn:
            conn.set_timeout(IO_TIMEOUT)
            assert conn.is_tls == (kind == "tls")
            assert conn.is_unix == (kind == "unix")
            conn.write_all(to_server)
            with mmap.mmap(-1, size) as memory:
                conn.read_exact_into(memory, "guest memory")  # a bare mmap works too
                assert memory[:] == to_client
        assert served.result(timeout=IO_TIMEOUT) == to_server


@pytest.mark.timeout(30)
def test_peer_names(pool: ThreadPoolExecutor, tmp_path: Path) -> None:
    with listen(LOOPBACK) as listener:
        served = serve(pool, listener, lambda conn: conn.peer)
        with connect(listener.address) as conn:
            assert conn.peer == str(listener.address)
            client_port = conn.socket.getsockname()[1]
            assert served.result(timeout=IO_TIMEOUT) == f"tcp:127.0.0.1:{client_port}"
    url = Url.unix(tmp_path / "peer.sock")
    with listen(url) as listener:
        served = serve(pool, listener, lambda conn: conn.peer)
        with connect(url) as conn:
            # Both ends are this process.
            assert conn.peer == f"{url} (pid {os.getpid()})"
            assert served.result(timeout=IO_TIMEOUT) == f"{url} (pid {os.getpid()})"


# --------------------------------------------------------------------------
# End of stream
# --------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_eof_mid_message_is_a_clear_error(
    pool: ThreadPoolExecutor, tls: TlsConfig, kind: str
) -> None:
    config = tls if kind == "tls" else None

    def server(conn: Connection) -> None:
        conn.write_all(b"abc")  # 3 of the 16 bytes the client expects

    with listen(LOOPBACK, config) as listener:
        served = serve(pool, listener, server)
        with connect(listener.address, config, timeout=IO_TIMEOUT) as conn:
            conn.set_timeout(IO_TIMEOUT)
            served.result(timeout=IO_TIMEOUT)  # the server has closed its end
            with pytest.raises(TransportError) as caught:
                conn.read_exact(16, "request header")
    error = caught.value
    assert not isinstance(error, ConnectionClosed)
    assert (
        "connection closed by peer after 3 of 16 bytes (while reading request header)"
        in str(error)
    )
    assert error.where == str(listener.address)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["tcp", "unix", "tls"])
def test_eof_at_message_boundary_is_connection_closed(
    pool: ThreadPoolExecutor, tmp_path: Path, tls: TlsConfig, kind: str
) -> None:
    url = Url.unix(tmp_path / "eof.sock") if kind == "unix" else LOOPBACK
    config = tls if kind == "tls" else None

    def server(conn: Connection) -> None:
        conn.write_all(b"complete")

    with listen(url, config) as listener:
        served = serve(pool, listener, server)
        with connect(listener.address, config, timeout=IO_TIMEOUT) as conn:
            conn.set_timeout(IO_TIMEOUT)
            served.result(timeout=IO_TIMEOUT)
            assert conn.read_exact(8) == b"complete"
            with pytest.raises(ConnectionClosed, match="closed by peer .before response"):
                conn.read_exact(4, "response")


@pytest.mark.timeout(30)
def test_read_timeout_names_peer_and_progress(pool: ThreadPoolExecutor) -> None:
    release = threading.Event()

    def server(conn: Connection) -> None:
        conn.write_all(b"ab")
        release.wait(IO_TIMEOUT)

    with listen(LOOPBACK) as listener:
        served = serve(pool, listener, server)
        with connect(listener.address) as conn:
            conn.set_timeout(0.2)
            with pytest.raises(TransportError) as caught:
                conn.read_exact(4, "response")
            release.set()
        served.result(timeout=IO_TIMEOUT)
    message = str(caught.value)
    assert (
        "cannot read response from peer (2 of 4 bytes received): the peer was silent for 0.2 s"
        in message
    )
    assert caught.value.where == str(listener.address)


@pytest.mark.timeout(30)
def test_connection_reset_is_wrapped(pool: ThreadPoolExecutor) -> None:
    connected = threading.Event()

    def server(conn: Connection) -> None:
        # Reset only once connect() has returned, or a slow client would see
        # the RST as a failed connect instead of a failed read.
        connected.wait(IO_TIMEOUT)
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")

    with listen(LOOPBACK) as listener:
        served = serve(pool, listener, server)
        with connect(listener.address) as conn:
            connected.set()
            conn.set_timeout(IO_TIMEOUT)
            served.result(timeout=IO_TIMEOUT)
            with pytest.raises(TransportError) as caught:
                conn.read_exact(4, "response")
    assert not isinstance(caught.value, ConnectionClosed)
    assert "reset by peer" in str(caught.value)
    assert caught.value.where == str(listener.address)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["tcp", "unix", "tls"])
def test_shutdown_wakes_a_blocked_reader(
    pool: ThreadPoolExecutor, tmp_path: Path, tls: TlsConfig, kind: str
) -> None:
    url = Url.unix(tmp_path / "shut.sock") if kind == "unix" else LOOPBACK
    config = tls if kind == "tls" else None
    with listen(url, config) as listener:
        peer_done = threading.Event()
        served = serve(pool, listener, lambda conn: peer_done.wait(IO_TIMEOUT))
        with connect(listener.address, config, timeout=IO_TIMEOUT) as conn:
            ends_promptly(pool, lambda: conn.read_exact(4, "response"), conn.shutdown, ConnectionClosed, within=1.0)
            conn.shutdown()  # a second shutdown is harmless
            peer_done.set()
        served.result(timeout=IO_TIMEOUT)


@pytest.mark.timeout(30)
def test_write_to_closed_peer_is_wrapped(pool: ThreadPoolExecutor) -> None:
    with listen(LOOPBACK) as listener:
        served = serve(pool, listener, lambda conn: None)
        with connect(listener.address) as conn:
            served.result(timeout=IO_TIMEOUT)
            with pytest.raises(TransportError, match="cannot send .* bytes to peer"):
                # The first writes may still be accepted by the kernel; the
                # peer's RST makes a later one fail.
                for _ in range(100):
                    conn.write_all(b"x" * 65536)
                    time.sleep(0.01)


@pytest.mark.timeout(30)
def test_close_is_idempotent(pool: ThreadPoolExecutor) -> None:
    with listen(LOOPBACK) as listener:
        served = serve(pool, listener, lambda conn: None)
        conn = connect(listener.address)
        conn.close()
        conn.close()
        assert "closed" in repr(conn)
        served.result(timeout=IO_TIMEOUT)
    listener.close()


# --------------------------------------------------------------------------
# TLS refusals and configuration errors
# --------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_tls_refuses_client_certificate_from_another_ca(
    pool: ThreadPoolExecutor, pki: Pki, tls: TlsConfig
) -> None:
    rogue = TlsConfig.from_dir(pki.rogue_client, role="client")
    with listen(LOOPBACK, tls) as listener:
        served = pool.submit(listener.accept, IO_TIMEOUT)
        # With TLS 1.3 the client's side of the handshake can finish before
        # the server has checked the client certificate, so the refusal may
        # only show up on the first read.
        with pytest.raises(TransportError) as client_error:
            with connect(listener.address, rogue, timeout=IO_TIMEOUT) as conn:
                conn.set_timeout(IO_TIMEOUT)
                conn.read_exact(1, "anything")
        with pytest.raises(TransportError) as server_error:
            served.result(timeout=IO_TIMEOUT)
    assert "alert" in str(client_error.value) or "certificate" in str(client_error.value)
    message = str(server_error.value)
    assert "TLS handshake with client failed: " in message
    assert "certificate verify failed" in message
    assert "_ssl.c" not in message
    assert server_error.value.where.startswith("tcp:127.0.0.1:")


@pytest.mark.timeout(30)
def test_tls_client_refuses_server_from_untrusted_ca(
    pool: ThreadPoolExecutor, pki: Pki, tls: TlsConfig
) -> None:
    distrusting = TlsConfig.from_dir(pki.distrusting_client, role="client")
    with listen(LOOPBACK, tls) as listener:
        served = pool.submit(listener.accept, IO_TIMEOUT)
        with pytest.raises(TransportError, match="certificate verify failed") as caught:
            connect(listener.address, distrusting, timeout=IO_TIMEOUT)
        with pytest.raises(TransportError, match="TLS handshake with client failed"):
            served.result(timeout=IO_TIMEOUT)
    assert caught.value.where == str(listener.address)


@pytest.mark.timeout(30)
def test_tls_client_verifies_the_host_name(pool: ThreadPoolExecutor, tls: TlsConfig) -> None:
    # 127.0.0.2 reaches the loopback interface too, but it is not in the
    # server certificate's subjectAltName: the sender must refuse, as Cloud
    # Hypervisor does (it verifies the URL's host).
    with listen(Url.tcp("127.0.0.2", 0), tls) as listener:
        served = pool.submit(listener.accept, IO_TIMEOUT)
        with pytest.raises(TransportError, match="IP address mismatch"):
            connect(listener.address, tls, timeout=IO_TIMEOUT)
        with pytest.raises(TransportError):
            served.result(timeout=IO_TIMEOUT)


@pytest.mark.timeout(30)
def test_tls_server_refuses_plain_client(pool: ThreadPoolExecutor, tls: TlsConfig) -> None:
    with listen(LOOPBACK, tls) as listener:
        served = pool.submit(listener.accept, IO_TIMEOUT)
        with connect(listener.address) as conn:
            conn.write_all(b"GET / HTTP/1.0\r\n\r\n")
            with pytest.raises(TransportError) as caught:
                served.result(timeout=IO_TIMEOUT)
    assert str(caught.value).startswith("tcp:127.0.0.1:")
    assert "TLS handshake with client failed" in str(caught.value)


@pytest.mark.timeout(30)
def test_tls_handshake_times_out_on_a_silent_peer(tls: TlsConfig) -> None:
    with listen(LOOPBACK, tls, handshake_timeout=0.3) as listener:
        with connect(listener.address):  # plain TCP, never says a word
            started = time.monotonic()
            with pytest.raises(TransportError, match="TLS handshake with client timed out"):
                listener.accept(timeout=IO_TIMEOUT)
            assert time.monotonic() - started < 2.0


@pytest.mark.timeout(30)
def test_abort_interrupts_a_tls_handshake(pool: ThreadPoolExecutor, tls: TlsConfig) -> None:
    with listen(LOOPBACK, tls, handshake_timeout=IO_TIMEOUT) as listener:
        with connect(listener.address):  # silent peer: accept sits in the handshake
            ends_promptly(pool, listener.accept, listener.abort, TransportError,
                          match="accept aborted during the TLS handshake with client")


@pytest.mark.timeout(30)
def test_a_stalled_tls_handshake_holds_up_only_its_own_connection(pool: ThreadPoolExecutor, tls: TlsConfig) -> None:
    """accept(handshake=False): the accept loop goes on; each connection runs its handshake on its own thread."""
    with listen(LOOPBACK, tls, handshake_timeout=2.0) as listener:
        with connect(listener.address):  # plain TCP, never says a word
            stalled = listener.accept(timeout=IO_TIMEOUT, handshake=False)
            good = pool.submit(connect, listener.address, tls, timeout=IO_TIMEOUT)
            started = time.monotonic()
            conn = listener.accept(timeout=IO_TIMEOUT, handshake=False)
            conn.complete_handshake()
            with good.result(timeout=IO_TIMEOUT) as client, conn:
                assert time.monotonic() - started < 1.5  # not after the silent peer's 2 s
                client.write_all(b"hello")
                assert conn.read_exact(5) == b"hello"
            with pytest.raises(TransportError, match="TLS handshake with client timed out"):
                stalled.complete_handshake()
            stalled.close()


@pytest.mark.timeout(30)
def test_close_ends_a_handshake_left_to_the_connection(pool: ThreadPoolExecutor, tls: TlsConfig) -> None:
    """A handshake running on a connection's thread counts as an accept in progress: close() aborts it and
    waits for it to leave before it closes the fd the handshake polls."""
    listener = listen(LOOPBACK, tls, handshake_timeout=IO_TIMEOUT)
    with connect(listener.address):
        conn = listener.accept(timeout=IO_TIMEOUT, handshake=False)
        ends_promptly(pool, conn.complete_handshake, listener.close, ListenerAborted)
        conn.close()
    late = listen(LOOPBACK, tls)
    with connect(late.address):
        conn = late.accept(timeout=IO_TIMEOUT, handshake=False)
        late.close()
        with pytest.raises(ListenerAborted, match="closed before the TLS handshake"):
            conn.complete_handshake()
        conn.close()


@pytest.mark.timeout(30)
def test_accept_or_wake_returns_none_on_a_wake_up_and_a_waiting_connection_first(pool: ThreadPoolExecutor) -> None:
    wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        with listen(LOOPBACK) as listener:
            waiting = pool.submit(listener.accept_or_wake, wake, IO_TIMEOUT)
            time.sleep(0.2)
            assert not waiting.done()
            os.eventfd_write(wake, 1)
            assert waiting.result(timeout=IO_TIMEOUT) is None
            # Still readable (the caller reads it): a connection that is there goes first anyway.
            with connect(listener.address):
                conn = listener.accept_or_wake(wake, IO_TIMEOUT)
                assert conn is not None
                conn.close()
            assert listener.accept_or_wake(wake, IO_TIMEOUT) is None
    finally:
        os.close(wake)


@pytest.mark.timeout(10)
def test_tls_on_unix_url_is_refused(tmp_path: Path, tls: TlsConfig) -> None:
    url = Url.unix(tmp_path / "tls.sock")
    with pytest.raises(TransportError, match="TLS is only supported for tcp: URLs") as caught:
        listen(url, tls)
    assert caught.value.where == str(url)
    assert not (tmp_path / "tls.sock").exists()
    with pytest.raises(TransportError, match="TLS is only supported for tcp: URLs"):
        connect(url, tls)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("missing", "role"),
    [
        (CA_CERT_FILE, None),
        (SERVER_KEY_FILE, None),
        (CLIENT_CERT_FILE, "client"),
        (SERVER_CERT_FILE, "server"),
    ],
)
def test_missing_tls_file_is_named(
    pki: Pki, tmp_path: Path, missing: str, role: str | None
) -> None:
    directory = tmp_path / "tls"
    shutil.copytree(pki.good, directory)
    (directory / missing).unlink()
    with pytest.raises(TransportError) as caught:
        TlsConfig.from_dir(directory, role=role)  # type: ignore[arg-type]
    assert str(directory / missing) in str(caught.value)
    assert f"missing TLS file {missing}" in str(caught.value)


@pytest.mark.timeout(10)
def test_files_of_the_other_role_are_not_required(pki: Pki, tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    shutil.copytree(pki.good, directory)
    (directory / CLIENT_KEY_FILE).unlink()
    TlsConfig.from_dir(directory, role="server")
    with pytest.raises(TransportError, match=CLIENT_KEY_FILE):
        TlsConfig.from_dir(directory)


@pytest.mark.timeout(10)
def test_bad_tls_files_are_reported(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="does not exist or is not a directory"):
        TlsConfig.from_dir(tmp_path / "nowhere")
    directory = tmp_path / "tls"
    shutil.copytree(pki.good, directory)
    # A key that does not belong to the certificate.
    shutil.copy(directory / CLIENT_KEY_FILE, directory / SERVER_KEY_FILE)
    config = TlsConfig.from_dir(directory)
    mismatch = "cannot load certificate server-cert.pem with key server-key.pem"
    with pytest.raises(TransportError, match=mismatch):
        listen(LOOPBACK, config)
    (directory / CA_CERT_FILE).write_text("not a certificate\n")
    with pytest.raises(TransportError, match="cannot load CA certificates") as caught:
        connect(Url.tcp("127.0.0.1", 9), config)
    assert caught.value.where == str(directory / CA_CERT_FILE)


# --------------------------------------------------------------------------
# File descriptor passing
# --------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_memfd_passing_shares_memory(pool: ThreadPoolExecutor, tmp_path: Path) -> None:
    size = 64 * 1024
    url = Url.unix(tmp_path / "fds.sock")

    def receiver(conn: Connection) -> bytes:
        data, fds = conn.recv_fds(12, maxfds=4)
        assert len(fds) == 1
        try:
            with mmap.mmap(fds[0], size) as memory:
                seen = memory[:13]
                memory[size - 6 :] = b"answer"  # the sender must see this
            conn.write_all(b"k")
            return data + b"|" + seen
        finally:
            os.close(fds[0])

    memfd = os.memfd_create("chmig-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, size)
        with listen(url) as listener:
            served = serve(pool, listener, receiver)
            with connect(url) as conn, mmap.mmap(memfd, size) as memory:
                memory[:13] = b"guest memory!"
                conn.send_fds(b"memory-slot0", [memfd])
                conn.set_timeout(IO_TIMEOUT)
                assert conn.read_exact(1) == b"k"
                assert memory[size - 6 :] == b"answer"
            assert served.result(timeout=IO_TIMEOUT) == b"memory-slot0|guest memory!"
    finally:
        os.close(memfd)


@pytest.mark.timeout(30)
def test_recv_fds_loops_over_short_reads(pool: ThreadPoolExecutor, tmp_path: Path) -> None:
    """The fds come with the first chunk; the rest of the message needs more reads.

    Linux ends a read on a UNIX stream socket right after data that carried
    fds, so the first recvmsg returns only b"four" however fast the rest
    arrives: the loop in recv_fds is always exercised here.
    """
    url = Url.unix(tmp_path / "short.sock")

    def receiver(conn: Connection) -> tuple[bytes, int]:
        data, fds = conn.recv_fds(10, maxfds=2)
        _close_all(fds)
        return data, len(fds)

    r, w = os.pipe()
    try:
        with listen(url) as listener:
            served = serve(pool, listener, receiver)
            with connect(url) as conn:
                conn.send_fds(b"four", [r, w])
                conn.write_all(b"567890")
                assert served.result(timeout=IO_TIMEOUT) == (b"four567890", 2)
    finally:
        _close_all([r, w])


@pytest.mark.timeout(30)
def test_recv_fds_closes_fds_beyond_maxfds(pool: ThreadPoolExecutor, tmp_path: Path) -> None:
    url = Url.unix(tmp_path / "many.sock")
    fds_before = set(os.listdir("/proc/self/fd"))
    pipes = [os.pipe() for _ in range(2)]
    sent = [fd for pair in pipes for fd in pair]  # 4 fds

    def receiver(conn: Connection) -> None:
        conn.recv_fds(1, maxfds=1)

    try:
        with listen(url) as listener:
            served = serve(pool, listener, receiver)
            with connect(url) as conn:
                conn.send_fds(b"x", sent)
                with pytest.raises(TransportError, match="more than 1 file descriptors"):
                    served.result(timeout=IO_TIMEOUT)
    finally:
        _close_all(sent)
    # Nothing the receiver got is left open.
    assert set(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.timeout(30)
def test_recv_fds_eof_closes_received_fds(pool: ThreadPoolExecutor, tmp_path: Path) -> None:
    url = Url.unix(tmp_path / "eoffds.sock")
    fds_before = set(os.listdir("/proc/self/fd"))
    r, w = os.pipe()

    def receiver(conn: Connection) -> None:
        conn.recv_fds(8, maxfds=1)

    try:
        with listen(url) as listener:
            served = serve(pool, listener, receiver)
            with connect(url) as conn:
                conn.send_fds(b"half", [r])
            with pytest.raises(TransportError, match="after 4 of 8 bytes"):
                served.result(timeout=IO_TIMEOUT)
    finally:
        _close_all([r, w])
    assert set(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.timeout(30)
def test_fd_passing_over_tcp_is_refused(pool: ThreadPoolExecutor) -> None:
    with listen(LOOPBACK) as listener:
        served = serve(pool, listener, lambda conn: None)
        with connect(listener.address) as conn:
            with pytest.raises(TransportError, match="cannot send file descriptors over a TCP"):
                conn.send_fds(b"x", [0])
            with pytest.raises(TransportError, match="cannot receive file descriptors over a TCP"):
                conn.recv_fds(1, 1)
        served.result(timeout=IO_TIMEOUT)


@pytest.mark.timeout(30)
def test_send_fds_needs_data(pool: ThreadPoolExecutor, tmp_path: Path) -> None:
    url = Url.unix(tmp_path / "nodata.sock")
    with listen(url) as listener:
        served = serve(pool, listener, lambda conn: None)
        with connect(url) as conn:
            with pytest.raises(TransportError, match="at least one byte"):
                conn.send_fds(b"", [0])
        served.result(timeout=IO_TIMEOUT)


# --------------------------------------------------------------------------
# Listener behaviour
# --------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_accept_is_aborted_promptly_from_another_thread(
    pool: ThreadPoolExecutor, tmp_path: Path, kind: str
) -> None:
    url = Url.unix(tmp_path / "abort.sock") if kind == "unix" else LOOPBACK
    with listen(url) as listener:
        ends_promptly(pool, listener.accept, listener.abort, TransportError, match="accept aborted")
        # Abort is sticky: later accepts fail at once too.
        with pytest.raises(TransportError, match="accept aborted"):
            listener.accept(timeout=IO_TIMEOUT)


@pytest.mark.timeout(30)
def test_close_aborts_a_pending_accept(pool: ThreadPoolExecutor) -> None:
    listener = listen(LOOPBACK)
    ends_promptly(pool, listener.accept, listener.close, TransportError, match="accept aborted")
    with pytest.raises(TransportError, match="listener is closed"):
        listener.accept()
    listener.abort()  # harmless after close
    listener.close()


@pytest.mark.timeout(30)
def test_accept_timeout() -> None:
    with listen(LOOPBACK) as listener:
        started = time.monotonic()
        with pytest.raises(TransportError, match="no connection within 0.2 s") as caught:
            listener.accept(timeout=0.2)
        assert 0.15 < time.monotonic() - started < 1.0
        assert caught.value.where == str(listener.address)


@pytest.mark.timeout(30)
def test_stale_unix_socket_file_is_replaced(pool: ThreadPoolExecutor, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    # A socket file whose owner died: bound, then closed without unlinking.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    assert path.is_socket()
    with listen(Url.unix(path)) as listener:
        round_trip(pool, listener, listener.address)
    assert not path.exists()  # close() removes the file it created


@pytest.mark.timeout(10)
def test_unix_listener_is_private_to_its_owner_whatever_the_umask(tmp_path: Path) -> None:
    """Whoever can connect can hand this process a VM: the socket is 0600, as Cloud Hypervisor's."""
    import stat

    old = os.umask(0o022)
    try:
        with listen(Url.unix(tmp_path / "private.sock")) as listener:
            assert stat.S_IMODE(os.stat(listener.address.path).st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.timeout(30)
def test_live_unix_socket_is_refused(tmp_path: Path) -> None:
    url = Url.unix(tmp_path / "live.sock")
    with listen(url):
        with pytest.raises(TransportError, match="address in use") as caught:
            listen(url)
        assert caught.value.where == str(url)
        assert Path(url.path).is_socket()  # the live socket is left alone


@pytest.mark.timeout(10)
def test_unix_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    with pytest.raises(TransportError, match="not a socket"):
        listen(Url.unix(path))
    assert path.read_text() == "keep me"


@pytest.mark.timeout(10)
def test_tcp_port_in_use_is_refused() -> None:
    with listen(LOOPBACK) as listener:
        with pytest.raises(TransportError, match="Address already in use") as caught:
            listen(listener.address)
        assert caught.value.where == str(listener.address)


@pytest.mark.timeout(10)
def test_connect_errors_name_the_url(tmp_path: Path) -> None:
    # Find a port nobody listens on by binding and closing.
    with listen(LOOPBACK) as listener:
        address = listener.address
    with pytest.raises(TransportError, match="cannot connect: Connection refused") as caught:
        connect(address, timeout=IO_TIMEOUT)
    assert caught.value.where == str(address)
    missing = Url.unix(tmp_path / "nobody.sock")
    with pytest.raises(TransportError, match="cannot connect: No such file") as caught:
        connect(missing)
    assert caught.value.where == str(missing)
    with pytest.raises(TransportError, match="cannot connect to port 0"):
        connect(Url.tcp("127.0.0.1", 0))


# --------------------------------------------------------------------------
# Socket options
# --------------------------------------------------------------------------


def _keepalive_options(sock: socket.socket) -> tuple[int, int, int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["tcp", "tls"])
def test_keepalive_options_on_both_ends(
    pool: ThreadPoolExecutor, tls: TlsConfig, kind: str
) -> None:
    expected = (1, TCP_KEEPIDLE_S, TCP_KEEPINTVL_S, TCP_KEEPCNT, TCP_USER_TIMEOUT_MS)
    assert expected == (1, 60, 15, 4, 120_000)  # Cloud Hypervisor's values
    config = tls if kind == "tls" else None
    with listen(LOOPBACK, config) as listener:
        served = serve(pool, listener, lambda conn: _keepalive_options(conn.socket))
        with connect(listener.address, config, timeout=IO_TIMEOUT) as conn:
            assert _keepalive_options(conn.socket) == expected
            assert served.result(timeout=IO_TIMEOUT) == expected


@pytest.mark.timeout(30)
def test_set_nodelay(pool: ThreadPoolExecutor, tmp_path: Path) -> None:
    with listen(LOOPBACK) as listener:
        served = serve(pool, listener, lambda conn: None)
        with connect(listener.address) as conn:
            assert conn.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
            conn.set_nodelay()
            assert conn.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        served.result(timeout=IO_TIMEOUT)
    url = Url.unix(tmp_path / "nodelay.sock")
    with listen(url) as listener:
        served = serve(pool, listener, lambda conn: None)
        with connect(url) as conn:
            conn.set_nodelay()  # no Nagle on UNIX sockets: a harmless no-op
        served.result(timeout=IO_TIMEOUT)
