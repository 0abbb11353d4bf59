"""Sockets for the migration protocol: URLs, TLS, abortable accept, fd passing.

Everything the migration code needs from the network goes through this module,
so the protocol code never touches ``socket`` or ``ssl`` directly.

URLs
    Cloud Hypervisor names migration endpoints with two URL forms, and so do we:

    * ``tcp:HOST:PORT`` where HOST is an IPv4 literal, a host name, or an IPv6
      literal in brackets (``tcp:[::1]:6000``).  The brackets are required
      because an IPv6 address is itself full of colons.  Port 0 is allowed and
      means "pick a free port" when listening.
    * ``unix:PATH`` for a UNIX stream socket.  Only UNIX sockets can carry file
      descriptors (``send_fds``/``recv_fds``), which local migration uses to
      hand guest memory over without copying it.

    :func:`parse_url` turns text into a :class:`Url` and rejects anything else
    with a message saying what is wrong.

TLS
    TLS is optional and only for ``tcp:`` URLs (a UNIX socket never leaves the
    host).  :class:`TlsConfig` reads a certificate directory with Cloud
    Hypervisor's layout::

        ca-cert.pem       the CA both sides trust
        server-cert.pem   the receiver's certificate (and chain)
        server-key.pem    the receiver's private key
        client-cert.pem   the sender's certificate (and chain)
        client-key.pem    the sender's private key

    Both sides authenticate each other (mutual TLS): the receiver demands a
    client certificate signed by the CA and the sender checks the receiver's
    certificate against the CA *and* against the host part of the URL it
    dialled, exactly like Cloud Hypervisor (see :class:`TlsConfig`).

Abortable accept
    A receiver waits in :meth:`Listener.accept` for the sender, possibly
    forever.  To cancel that wait from another thread (an API call, a signal
    handler, a test) :meth:`Listener.abort` writes to an eventfd that ``accept``
    polls together with the listening socket, so the blocked thread wakes up at
    once and raises.  The same poll also guards the TLS handshake, so a peer
    that connects and then says nothing cannot keep ``accept`` hostage either.

Why ``recv_into``
    Guest memory arrives in large chunks and must end up in an ``mmap`` of
    guest RAM.  :meth:`Connection.read_exact_into` lets the kernel (or OpenSSL)
    write straight into that mapping, instead of building a ``bytes`` object
    and copying it over: one copy fewer per byte of guest memory.

TCP options
    Every TCP connection, on both ends, gets Cloud Hypervisor's keepalive and
    ``TCP_USER_TIMEOUT`` settings, so a peer that vanishes (power loss, cable
    pulled) is detected within two to three minutes instead of hanging the
    migration until the default of hours.
"""

from __future__ import annotations

import enum
import errno
import functools
import ipaddress
import logging
import math
import mmap
import os
import re
import select
import socket
import ssl
import stat
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Callable, Literal, Self

from chmig.errors import ListenerAborted, TransportError

log = logging.getLogger(__name__)

# Cloud Hypervisor's TCP settings (vmm/src/migration/transport.rs): after 60 s
# of silence the kernel starts probing, every 15 s, and gives up after 4 missed
# probes.  TCP_USER_TIMEOUT bounds how long sent data may stay unacknowledged;
# the kernel also uses it instead of the probe count to decide when a
# keepalive failure kills the connection.
TCP_KEEPIDLE_S = 60
TCP_KEEPINTVL_S = 15
TCP_KEEPCNT = 4
TCP_USER_TIMEOUT_MS = 120_000
#: Under a timeout, TLS data is written this much per call: a TLS write is not partial, so its timeout
#: would otherwise bound the whole piece, not the silence.
TLS_SEND_STEP = 1 << 20

# How long the receiver gives a freshly connected peer to finish the TLS
# handshake before giving up on it.  Cloud Hypervisor has no such bound.
DEFAULT_HANDSHAKE_TIMEOUT_S = 10.0

CA_CERT_FILE = "ca-cert.pem"
SERVER_CERT_FILE = "server-cert.pem"
SERVER_KEY_FILE = "server-key.pem"
CLIENT_CERT_FILE = "client-cert.pem"
CLIENT_KEY_FILE = "client-key.pem"

TlsRole = Literal["server", "client"]

# Anything the kernel can receive into: a memoryview, a bytearray, an mmap...
WritableBuffer = memoryview | bytearray | mmap.mmap

# A host name: letters, digits, '-', '_' and dots.  Deliberately loose (no
# label-length rules); the resolver has the final word.
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
# Text that can only be meant as an IPv4 address, valid or not.
_IPV4ISH_RE = re.compile(r"[0-9.]+")
# The C source position CPython appends to ssl errors.
_SSL_SOURCE_RE = re.compile(r" \(_ssl\.c:\d+\)$")


# --------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Url:
    """A migration endpoint: ``tcp:HOST:PORT`` or ``unix:PATH``.

    ``host``/``port`` are only meaningful for ``tcp``, ``path`` only for
    ``unix``.  IPv6 hosts are stored without brackets; ``str()`` adds them
    back, so ``parse_url(str(url)) == url``.
    """

    scheme: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __post_init__(self) -> None:
        if self.scheme not in ("tcp", "unix"):
            raise TransportError(
                f"unknown URL scheme {self.scheme!r}: expected 'tcp' or 'unix'"
            )

    @classmethod
    def tcp(cls, host: str, port: int) -> Url:
        """Shorthand for ``Url("tcp", host=host, port=port)``."""
        return cls("tcp", host=host, port=port)

    @classmethod
    def unix(cls, path: str | os.PathLike[str]) -> Url:
        """Shorthand for ``Url("unix", path=path)``."""
        return cls("unix", path=os.fspath(path))

    @property
    def is_unix(self) -> bool:
        return self.scheme == "unix"

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"tcp:[{self.host}]:{self.port}"
        return f"tcp:{self.host}:{self.port}"


def parse_url(text: str) -> Url:
    """Parse ``tcp:HOST:PORT``, ``tcp:[IPv6]:PORT`` or ``unix:PATH``.

    Raises :class:`TransportError` (``where`` is the text) saying what is wrong,
    so a typo on the command line gets a useful answer rather than a resolver
    error later on.
    """
    scheme, colon, rest = text.partition(":")
    if not colon:
        raise TransportError(
            "missing scheme: expected tcp:HOST:PORT or unix:PATH", where=text
        )
    if scheme == "unix":
        return Url.unix(_parse_unix_path(rest, text))
    if scheme == "tcp":
        host, port = _parse_host_port(rest, text)
        return Url.tcp(host, port)
    raise TransportError(
        f"unknown scheme {scheme!r}: expected tcp:HOST:PORT or unix:PATH", where=text
    )


def _parse_unix_path(path: str, text: str) -> str:
    if not path:
        raise TransportError("empty path in unix: URL", where=text)
    if "\0" in path:
        raise TransportError("NUL byte in unix socket path", where=text)
    return path


def _parse_host_port(rest: str, text: str) -> tuple[str, int]:
    if rest.startswith("["):
        closing = rest.find("]")
        if closing < 0:
            raise TransportError("missing ']' after the IPv6 address", where=text)
        host = rest[1:closing]
        after = rest[closing + 1 :]
        if not after:
            raise TransportError("missing port: expected tcp:[IPv6]:PORT", where=text)
        if not after.startswith(":"):
            raise TransportError(
                f"unexpected {after!r} after ']': expected tcp:[IPv6]:PORT", where=text
            )
        port_text = after[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise TransportError(
                f"{host!r} in brackets is not an IPv6 address", where=text
            ) from None
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise TransportError("missing port: expected tcp:HOST:PORT", where=text)
        if ":" in host:
            raise TransportError(
                "IPv6 address must be in brackets, e.g. tcp:[::1]:6000", where=text
            )
        if not host:
            raise TransportError("missing host: expected tcp:HOST:PORT", where=text)
        _check_host(host, text)
    return host, _parse_port(port_text, text)


def _check_host(host: str, text: str) -> None:
    if _IPV4ISH_RE.fullmatch(host):
        # Reject "1.2.3" and "300.1.1.1" here; getaddrinfo would accept the
        # first one as the legacy inet_aton spelling of 1.2.0.3.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise TransportError(f"{host!r} is not a valid IPv4 address", where=text) from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise TransportError(f"{host!r} is not a valid host name", where=text)


def _parse_port(port_text: str, text: str) -> int:
    if not port_text:
        raise TransportError("missing port: expected tcp:HOST:PORT", where=text)
    # isascii() keeps out digits like '²' that str.isdigit() accepts.
    if not (port_text.isascii() and port_text.isdigit()):
        raise TransportError(f"port {port_text!r} is not a number", where=text)
    port = int(port_text)
    if port > 65535:
        raise TransportError(f"port {port} is out of range 0..65535", where=text)
    return port


# --------------------------------------------------------------------------
# TLS configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsConfig:
    """A certificate directory with Cloud Hypervisor's layout.

    How it matches Cloud Hypervisor (``vm-migration/src/tls.rs``, rustls):

    * The receiver (server) requires a client certificate that chains to
      ``ca-cert.pem``; it does not look at the names in that certificate.
    * The sender (client) verifies the receiver's certificate against
      ``ca-cert.pem`` and against the host part of the URL it connects to (a
      DNS name or an IP address), so hostname verification is ON.  rustls
      (webpki) only looks at subjectAltName, never at the Common Name; we
      switch OpenSSL's Common Name fallback off to behave the same.  A
      receiver's certificate therefore needs a subjectAltName for every name
      or address senders will use.
    * Only TLS 1.2 and 1.3, the versions rustls speaks.

    Like Cloud Hypervisor, each side needs only its own files: the receiver
    ``ca-cert.pem`` + ``server-*.pem``, the sender ``ca-cert.pem`` +
    ``client-*.pem``.
    """

    directory: Path

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike[str], role: TlsRole | None = None
    ) -> TlsConfig:
        """Check the directory and return the config.

        ``role`` says which files must be there: ``"server"`` (receiver),
        ``"client"`` (sender) or ``None`` for all five.  A missing or
        unreadable file is reported by its full path now rather than at the
        first connection.
        """
        directory = Path(path)
        if not directory.is_dir():
            raise TransportError(
                "TLS directory does not exist or is not a directory",
                where=str(directory),
            )
        config = cls(directory)
        roles: tuple[TlsRole, ...] = (role,) if role else ("server", "client")
        for r in roles:
            config._check_files(r)
        return config

    def file(self, name: str) -> Path:
        """Path of one of the five files in the directory."""
        return self.directory / name

    def _check_files(self, role: TlsRole) -> tuple[Path, Path, Path]:
        """Return (ca, cert, key) for ``role`` after checking they are readable."""
        names = (
            (CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE)
            if role == "server"
            else (CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE)
        )
        paths = tuple(self.file(name) for name in names)
        for p in paths:
            if not p.exists():
                raise TransportError(
                    f"missing TLS file {p.name} needed by the migration {role}: {p}",
                    where=str(self.directory),
                )
            if not p.is_file():
                raise TransportError(
                    f"TLS file {p.name} is not a regular file: {p}",
                    where=str(self.directory),
                )
            if not os.access(p, os.R_OK):
                raise TransportError(
                    f"TLS file {p.name} is not readable: {p}", where=str(self.directory)
                )
        ca, cert, key = paths
        return ca, cert, key

    def server_context(self) -> ssl.SSLContext:
        """An SSLContext for the receiver: our certificate, client cert required."""
        ca, cert, key = self._check_files("server")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        _load_ca(context, ca)
        _load_cert_chain(context, cert, key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """An SSLContext for the sender: verify the receiver, present our cert."""
        ca, cert, key = self._check_files("client")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname=True
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.hostname_checks_common_name = False  # as webpki: SANs only
        _load_ca(context, ca)
        _load_cert_chain(context, cert, key)
        return context


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise TransportError(
            f"cannot load CA certificates: {_describe(e)}", where=str(ca)
        ) from e


def _load_cert_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (ssl.SSLError, OSError) as e:
        raise TransportError(
            f"cannot load certificate {cert.name} with key {key.name}: {_describe(e)}",
            where=str(cert.parent),
        ) from e


# --------------------------------------------------------------------------
# Helpers shared by the listener and connect()
# --------------------------------------------------------------------------

class _Wait(enum.Enum):
    """How a :func:`_wait` ended."""

    READY = enum.auto()
    TIMED_OUT = enum.auto()
    ABORTED = enum.auto()
    WOKEN = enum.auto()


def _wait(
    fd: int, events: int, deadline: float | None, abort_fd: int | None = None, wake_fd: int | None = None
) -> _Wait:
    """Wait until ``fd`` has ``events``, the deadline passes, ``abort_fd`` fires or ``wake_fd`` is readable.

    An error or hang-up on ``fd`` counts as READY: the socket call that
    follows will report it with a proper error.  An abort wins over
    readiness, so an aborted listener never hands out one more connection;
    a wake-up loses to both (a waiting connection is taken first).
    """
    poller = select.poll()
    poller.register(fd, events)
    if abort_fd is not None:
        poller.register(abort_fd, select.POLLIN)
    if wake_fd is not None:
        poller.register(wake_fd, select.POLLIN)
    if deadline is None:
        timeout_ms = None
    else:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _Wait.TIMED_OUT
        timeout_ms = math.ceil(remaining * 1000)
    ready = dict(poller.poll(timeout_ms))  # EINTR is retried by Python (PEP 475)
    if abort_fd is not None and abort_fd in ready:
        return _Wait.ABORTED
    if fd in ready:
        return _Wait.READY
    return _Wait.WOKEN if wake_fd is not None and wake_fd in ready else _Wait.TIMED_OUT


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _set_tcp_options(sock: socket.socket, peer: str) -> None:
    """Apply Cloud Hypervisor's keepalive and user-timeout settings."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_KEEPIDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, TCP_KEEPINTVL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, TCP_KEEPCNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)
    except OSError as e:
        raise TransportError(f"cannot set TCP keepalive options: {e}", where=peer) from e


def _describe(error: BaseException) -> str:
    """``str(error)`` minus the ``(_ssl.c:1006)`` suffix, which only helps CPython devs."""
    return _SSL_SOURCE_RE.sub("", str(error))


def _tls_handshake(
    tls_sock: ssl.SSLSocket,
    deadline: float | None,
    peer: str,
    peer_role: Literal["client", "server"],
    abort_fd: int | None = None,
) -> None:
    """Run the handshake without blocking, so it honours a deadline and an abort.

    A blocking ``do_handshake`` could only be bounded by a socket timeout and
    could not be interrupted by :meth:`Listener.abort`; driving it by hand
    with ``poll`` gives both.
    """
    tls_sock.setblocking(False)
    while True:
        try:
            tls_sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        except (ssl.SSLError, OSError) as e:
            raise TransportError(
                f"TLS handshake with {peer_role} failed: {_describe(e)}", where=peer
            ) from e
        outcome = _wait(tls_sock.fileno(), events, deadline, abort_fd)
        if outcome is _Wait.ABORTED:
            raise ListenerAborted(
                f"accept aborted during the TLS handshake with {peer_role}", where=peer
            )
        if outcome is _Wait.TIMED_OUT:
            raise TransportError(
                f"TLS handshake with {peer_role} timed out "
                "(the peer sent nothing, or does not speak TLS)",
                where=peer,
            )


def _tcp_peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "tcp:<unknown peer>"
    return str(Url.tcp(host, port))


def _unix_peer(sock: socket.socket, path: str) -> str:
    """Describe a UNIX peer by socket path and, for the logs, its process id."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", creds)[0]
    except OSError:
        return f"unix:{path}"
    return f"unix:{path} (pid {pid})"


# --------------------------------------------------------------------------
# Connection
# --------------------------------------------------------------------------


class ConnectionClosed(TransportError):
    """The peer closed the connection cleanly, at a message boundary.

    :meth:`Connection.read_exact` raises this only when the peer closed the
    connection *before the first byte* of what we asked for: the normal way a
    peer ends a session.  A close in the middle of a message raises a plain
    :class:`TransportError` instead (it is data loss, not an ending), so
    ``except ConnectionClosed`` never hides a truncated message.
    """


class Connection:
    """A connected stream socket, plain TCP, TLS over TCP, or UNIX.

    Not thread-safe, with one deliberate exception: :meth:`shutdown` may be
    called from another thread to wake up a thread blocked in a read.

    ``socket`` is the underlying socket object.  For a plain TCP or UNIX
    connection it can be used directly (e.g. with ``os.sendfile``); for TLS it
    is an ``ssl.SSLSocket`` and raw I/O on its file descriptor would bypass
    the encryption and corrupt the stream.
    """

    def __init__(
        self, sock: socket.socket, *, peer: str, is_unix: bool, is_tls: bool = False
    ) -> None:
        self.socket = sock
        self._peer = peer
        self._is_unix = is_unix
        self._is_tls = is_tls
        self._closed = False
        #: The TLS handshake a listener left to the connection's own thread (``accept(handshake=False)``).
        self._pending_handshake: Callable[[], None] | None = None

    # ---- description ----------------------------------------------------

    @property
    def peer(self) -> str:
        """The other end, printable: ``tcp:1.2.3.4:5678`` or ``unix:PATH (pid N)``."""
        return self._peer

    @property
    def is_unix(self) -> bool:
        return self._is_unix

    @property
    def is_tls(self) -> bool:
        return self._is_tls

    def __repr__(self) -> str:
        kind = "tls" if self._is_tls else ("unix" if self._is_unix else "tcp")
        state = " closed" if self._closed else ""
        return f"<Connection {kind} peer={self._peer}{state}>"

    def fileno(self) -> int:
        return self.socket.fileno()

    def complete_handshake(self) -> None:
        """Run the TLS handshake :meth:`Listener.accept` left to this thread (``handshake=False``), if any.

        Bounded like the listener's own (``handshake_timeout``) and ended by
        its abort; raises :class:`TransportError` (:class:`ListenerAborted`
        after an abort) naming the peer.  Nothing else may use the connection
        before this returned.
        """
        handshake, self._pending_handshake = self._pending_handshake, None
        if handshake is not None:
            handshake()

    # ---- reading --------------------------------------------------------

    def read_exact(self, n: int, what: str = "data") -> bytes:
        """Read exactly ``n`` bytes.

        ``what`` names the thing being read ("request header") for the error
        messages.  Raises :class:`ConnectionClosed` if the peer closed before
        sending anything, :class:`TransportError` if it closed part-way.
        """
        buf = bytearray(n)
        self.read_exact_into(memoryview(buf), what)
        return bytes(buf)

    def read_exact_into(self, view: WritableBuffer, what: str = "data") -> None:
        """Fill the whole of ``view`` from the socket, without intermediate copies.

        ``view`` can be any writable buffer; a memoryview of an ``mmap`` lets
        guest memory go from the socket straight into guest RAM.
        """
        with memoryview(view) as outer, outer.cast("B") as target:
            total = target.nbytes
            got = 0
            while got < total:
                try:
                    n = self.socket.recv_into(target[got:])
                except (TimeoutError, ssl.SSLError, OSError) as e:
                    raise self._read_error(e, got, total, what) from e
                if n == 0:
                    raise self._eof_error(got, total, what)
                got += n

    def _eof_error(self, got: int, total: int, what: str) -> TransportError:
        if got == 0:
            return ConnectionClosed(
                f"connection closed by peer (before {what}, expected {total} bytes)",
                where=self._peer,
            )
        return TransportError(
            f"connection closed by peer after {got} of {total} bytes "
            f"(while reading {what})",
            where=self._peer,
        )

    def _read_error(
        self, error: BaseException, got: int, total: int, what: str
    ) -> TransportError:
        reason = self._reason(error)
        return TransportError(
            f"cannot read {what} from peer ({got} of {total} bytes received): {reason}",
            where=self._peer,
        )

    # ---- writing --------------------------------------------------------

    def write_all(self, data: bytes | bytearray | memoryview | mmap.mmap) -> None:
        """Send all of ``data``, or raise naming the peer.

        Without a timeout this is ``sendall``.  With one (:meth:`set_timeout`)
        it is a loop of ``send`` calls, each bounded by the timeout: the bound
        is on *silence* (no byte accepted for that long), not on the whole
        transfer, which may take as long as it needs while it progresses.
        (``sendall`` would bound the whole transfer.)
        """
        try:
            if self.socket.gettimeout() is None:
                self.socket.sendall(data)
                return
            # One SSL_write is all or nothing under the timeout, so TLS goes in bounded steps.
            step = TLS_SEND_STEP if self._is_tls else None
            with memoryview(data) as outer, outer.cast("B") as view:
                sent, total = 0, view.nbytes
                while sent < total:
                    sent += self.socket.send(view[sent : sent + step] if step else view[sent:])
        except (TimeoutError, ssl.SSLError, OSError) as e:
            size = memoryview(data).nbytes
            raise TransportError(
                f"cannot send {size} bytes to peer: {self._reason(e)}", where=self._peer
            ) from e

    def _reason(self, error: BaseException) -> str:
        """Why a read or write failed, in words (a timeout says whose and how long)."""
        if isinstance(error, TimeoutError):
            timeout = self.socket.gettimeout()
            if timeout is None:  # the kernel's TCP_USER_TIMEOUT: our data went unacknowledged
                return f"the peer stopped acknowledging data for {TCP_USER_TIMEOUT_MS // 1000} s"
            return f"the peer was silent for {timeout:g} s"
        if isinstance(error, ssl.SSLError):
            # With TLS 1.3 a server that refuses our certificate says so only at our first read or write.
            return f"TLS: {_describe(error)} (did the peer refuse the TLS certificate?)"
        return _describe(error)

    # ---- file descriptor passing (UNIX only) ----------------------------

    def send_fds(self, data: bytes, fds: list[int]) -> None:
        """Send ``data`` with ``fds`` attached to its first byte (SCM_RIGHTS).

        The receiver gets its own duplicates; the caller still owns ``fds``.
        """
        self._require_unix("send file descriptors")
        if not data:
            # The kernel attaches fds to data; with no data there is nothing
            # to carry them.
            raise TransportError(
                "send_fds needs at least one byte of data to carry the fds",
                where=self._peer,
            )
        try:
            sent = socket.send_fds(self.socket, [data], fds)
            if sent < len(data):
                # Short send (a timeout is set): the fds went with the first
                # part; the rest is ordinary data.
                self.socket.sendall(memoryview(data)[sent:])
        except (TimeoutError, OSError) as e:
            raise TransportError(
                f"cannot send {len(data)} bytes with {len(fds)} fds to peer: {_describe(e)}",
                where=self._peer,
            ) from e

    def recv_fds(self, n: int, maxfds: int) -> tuple[bytes, list[int]]:
        """Read exactly ``n`` bytes and up to ``maxfds`` fds sent with them.

        The fds come with the first chunk of data; the rest of the ``n`` bytes
        may need more reads.  Any fd we will not hand to the caller (more than
        ``maxfds``, or fds arriving with a later chunk) is closed at once so it
        does not leak, and on error every fd received so far is closed.  The
        caller owns the returned fds.
        """
        self._require_unix("receive file descriptors")
        chunks: list[bytes] = []
        fds: list[int] = []
        got = 0
        try:
            while got < n:
                try:
                    data, new_fds, flags, _ = socket.recv_fds(self.socket, n - got, maxfds)
                except (TimeoutError, OSError) as e:
                    raise self._read_error(e, got, n, "data with file descriptors") from e
                if got == 0:
                    fds, extra = new_fds[:maxfds], new_fds[maxfds:]
                else:
                    extra = new_fds
                if extra:
                    log.warning("closing %d unexpected fds received from %s",
                                len(extra), self._peer)
                    _close_fds(extra)
                if flags & socket.MSG_CTRUNC:
                    raise TransportError(
                        f"peer sent more than {maxfds} file descriptors "
                        "(the kernel truncated them)",
                        where=self._peer,
                    )
                if not data:
                    raise self._eof_error(got, n, "data with file descriptors")
                chunks.append(data)
                got += len(data)
        except BaseException:
            _close_fds(fds)
            raise
        return b"".join(chunks), fds

    def _require_unix(self, action: str) -> None:
        if not self._is_unix:
            raise TransportError(
                f"cannot {action} over a TCP connection: only unix: sockets can",
                where=self._peer,
            )

    # ---- options and lifetime -------------------------------------------

    def set_timeout(self, seconds: float | None) -> None:
        """Bound the silence every later read and write may wait through; ``None`` waits forever.

        A read returns as soon as any byte arrives and :meth:`write_all` sends
        in bounded steps, so this bounds how long the peer may say nothing,
        never how long a large transfer may take.
        """
        self.socket.settimeout(seconds)

    def set_keepalive(self, idle_s: int, interval_s: int, count: int) -> None:
        """TCP keepalive tighter than Cloud Hypervisor's: a recoverable Fault connection whose peer vanished
        (a link down, the other end's reset lost) must break in seconds, so that recovery can begin."""
        if self._is_unix:
            return
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval_s)
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        except OSError as e:
            raise TransportError(f"cannot set TCP keepalive: {e}", where=self._peer) from e

    def set_nodelay(self) -> None:
        """Disable Nagle for small request/response round trips (fault channel).

        A no-op on UNIX sockets, which have no Nagle algorithm.
        """
        if self._is_unix:
            return
        try:
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise TransportError(f"cannot set TCP_NODELAY: {e}", where=self._peer) from e

    def shutdown(self) -> None:
        """Shut both directions down; wakes a thread blocked reading this socket.

        Closing the fd would not reliably wake such a thread (and the fd number
        could be reused under it); shutdown makes its read return EOF.
        """
        try:
            _shutdown_fd(self.socket, socket.SHUT_RDWR)
        except OSError as e:
            # ENOTCONN: the peer is already gone or shutdown was called twice.
            # EBADF: already closed.  Either way there is nothing left to do.
            if e.errno not in (errno.ENOTCONN, errno.EBADF):
                raise TransportError(f"cannot shut down: {e}", where=self._peer) from e

    def reset(self) -> None:
        """Abort the connection: wake a thread blocked reading it and make the coming close a reset (RST).

        A clean close (FIN) says "done"; a peer that must tell "done" from
        "gave up" (a postcopy source: see :mod:`chmig.postcopy`) sees a reset
        instead.  ``SHUT_RD`` sends nothing (``shutdown`` would send a FIN).
        """
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # a UNIX socket, or already closed: its close is all there is
        try:
            _shutdown_fd(self.socket, socket.SHUT_RD)
        except OSError as e:
            if e.errno not in (errno.ENOTCONN, errno.EBADF):
                raise TransportError(f"cannot shut down: {e}", where=self._peer) from e

    def close(self) -> None:
        """Close the socket; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self.socket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _shutdown_fd(sock: socket.socket, how: int) -> None:
    """The socket's shutdown(2), from any thread.

    ``ssl.SSLSocket.shutdown`` also drops its TLS state, under the feet of a
    thread still inside a handshake or a read on it (which then fails with
    an AttributeError, not an error about the connection); the plain
    socket's method only shuts the fd down.
    """
    socket.socket.shutdown(sock, how)


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


# --------------------------------------------------------------------------
# Listening
# --------------------------------------------------------------------------


class Listener:
    """A listening socket whose ``accept`` can be aborted from another thread.

    Create it with :func:`listen`.  ``abort()`` is sticky: once called, the
    accept in progress and every later one raise at once.  ``close()`` aborts
    first and waits for running accepts to leave before closing the fds, so
    no thread is ever left polling a closed (and maybe reused) fd number.
    """

    def __init__(
        self,
        sock: socket.socket,
        address: Url,
        *,
        tls_context: ssl.SSLContext | None,
        handshake_timeout: float,
        unix_inode: tuple[int, int] | None = None,
    ) -> None:
        self._sock = sock
        self._address = address
        self._tls_context = tls_context
        self._handshake_timeout = handshake_timeout
        # (st_dev, st_ino) of the socket file we created, so close() removes
        # that file and not one somebody else has put there since.
        self._unix_inode = unix_inode
        # A non-zero eventfd counter means "aborted"; nobody ever reads it, so
        # it stays readable for every later poll too.
        self._abort_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._state = threading.Condition()
        self._active_accepts = 0
        self._closed = False

    @property
    def address(self) -> Url:
        """The bound address; for ``tcp:HOST:0`` it carries the real port."""
        return self._address

    @property
    def is_tls(self) -> bool:
        return self._tls_context is not None

    def fileno(self) -> int:
        return self._sock.fileno()

    def __repr__(self) -> str:
        return f"<Listener {self._address}{' tls' if self.is_tls else ''}>"

    def accept(self, timeout: float | None = None, *, handshake: bool = True) -> Connection:
        """Wait for one connection (and its TLS handshake) and return it.

        ``timeout`` bounds the wait for a connection; the TLS handshake has its
        own bound (``handshake_timeout`` of :func:`listen`).  Raises
        :class:`TransportError` on timeout or if the handshake fails (naming
        the peer), and its subclass :class:`ListenerAborted` after :meth:`abort`.

        With ``handshake=False`` a TLS connection comes back before its
        handshake, which the caller runs on the connection's own thread
        (:meth:`Connection.complete_handshake`): a peer that stalls its
        handshake then holds up that thread only, never the accept loop and the
        connections queued behind it.
        """
        conn = self._accept(timeout, handshake, wake_fd=None)
        assert conn is not None  # only a wake-up returns none
        return conn

    def accept_or_wake(self, wake_fd: int, timeout: float | None = None, *,
                       handshake: bool = True) -> Connection | None:
        """:meth:`accept`, or None as soon as ``wake_fd`` (an eventfd the caller owns and reads) is readable:
        the caller waits for a connection and for work of its own at once.  A waiting connection goes first."""
        return self._accept(timeout, handshake, wake_fd)

    def _accept(self, timeout: float | None, handshake: bool, wake_fd: int | None) -> Connection | None:
        with self._state:
            if self._closed:
                raise ListenerAborted("listener is closed", where=str(self._address))
            self._active_accepts += 1
        try:
            sock = self._wait_for_connection(_deadline(timeout), timeout, wake_fd)
            return None if sock is None else self._set_up(sock, handshake_now=handshake)
        finally:
            with self._state:
                self._active_accepts -= 1
                self._state.notify_all()

    def _wait_for_connection(
        self, deadline: float | None, timeout: float | None, wake_fd: int | None = None
    ) -> socket.socket | None:
        where = str(self._address)
        while True:
            outcome = _wait(self._sock.fileno(), select.POLLIN, deadline, self._abort_fd, wake_fd)
            if outcome is _Wait.WOKEN:
                return None
            if outcome is _Wait.ABORTED:
                raise ListenerAborted("waiting for a connection: accept aborted", where=where)
            if outcome is _Wait.TIMED_OUT:
                raise TransportError(f"no connection within {timeout} s", where=where)
            try:
                sock, _ = self._sock.accept()
                return sock
            except (BlockingIOError, ConnectionAbortedError):
                # The peer gave up between poll and accept: wait for the next.
                continue
            except OSError as e:
                raise TransportError(f"accept failed: {e}", where=where) from e

    def _set_up(self, sock: socket.socket, handshake_now: bool) -> Connection:
        """Turn a freshly accepted socket into a Connection (options, TLS: now, or left to the connection)."""
        if self._address.is_unix:
            peer = _unix_peer(sock, self._address.path)
        else:
            peer = _tcp_peer(sock)
        try:
            if not self._address.is_unix:
                _set_tcp_options(sock, peer)
            sock.settimeout(None)
            if self._tls_context is not None:
                # Wrapped here, before any thread may shut it down: the wrap replaces the socket object.
                sock = self._tls_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            conn = Connection(sock, peer=peer, is_unix=self._address.is_unix, is_tls=self.is_tls)
            if self._tls_context is not None:
                conn._pending_handshake = functools.partial(self._handshake, sock, peer)
                if handshake_now:
                    conn.complete_handshake()
        except BaseException:
            sock.close()
            raise
        log.info("accepted %s connection from %s on %s%s", "TLS" if self.is_tls else "a", peer, self._address,
                 " (its handshake follows on its own thread)" if conn._pending_handshake else "")
        return conn

    def _handshake(self, sock: ssl.SSLSocket, peer: str) -> None:
        """The server side of a TLS handshake: bounded by ``handshake_timeout``, ended by :meth:`abort`.

        Counted as an accept in progress, so :meth:`close` waits for it to
        leave before it closes the abort fd the handshake polls.
        """
        with self._state:
            if self._closed:
                raise ListenerAborted("the listener closed before the TLS handshake", where=peer)
            self._active_accepts += 1
        try:
            _tls_handshake(sock, _deadline(self._handshake_timeout), peer, "client", self._abort_fd)
            sock.settimeout(None)
        finally:
            with self._state:
                self._active_accepts -= 1
                self._state.notify_all()

    def pending(self) -> bool:
        """Is a connection waiting in the accept queue (the peer connected, nobody accepted it yet)?"""
        with self._state:
            if self._closed:
                return False
            poller = select.poll()
            poller.register(self._sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))

    def abort(self) -> None:
        """Make the accept in progress, and all later ones, raise promptly."""
        with self._state:
            if self._closed:
                return
            os.eventfd_write(self._abort_fd, 1)

    def take_over(self) -> Listener:
        """A new owner keeps listening on this socket, with an abort of its own: this Listener is closed (its
        accepts end, as after :meth:`close`) without closing the socket or removing its file.

        Postcopy recovery needs this: the migration's acceptor is aborted at State
        (sticky), but the destination keeps the port for a source that reconnects.
        """
        with self._state:
            if self._closed:
                raise ListenerAborted("listener is closed", where=str(self._address))
            os.eventfd_write(self._abort_fd, 1)
            self._closed = True
            while self._active_accepts:
                self._state.wait()
        successor = Listener(self._sock, self._address, tls_context=self._tls_context,
                             handshake_timeout=self._handshake_timeout, unix_inode=self._unix_inode)
        self._sock = None  # type: ignore[assignment]  # the successor's now
        self._unix_inode = None
        os.close(self._abort_fd)
        return successor

    def close(self) -> None:
        """Stop listening and remove the socket file we created; idempotent."""
        with self._state:
            if self._closed:
                return
            os.eventfd_write(self._abort_fd, 1)
            self._closed = True
            while self._active_accepts:
                self._state.wait()
        if self._sock is None:  # handed to a successor (take_over)
            return
        self._sock.close()
        os.close(self._abort_fd)
        if self._unix_inode is not None:
            _remove_own_socket_file(self._address.path, self._unix_inode)
        log.info("stopped listening on %s", self._address)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def listen(
    url: Url,
    tls: TlsConfig | None = None,
    backlog: int = 128,
    *,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
) -> Listener:
    """Bind and listen on ``url``; with ``tls`` every accepted peer must do mTLS.

    For ``unix:`` a leftover socket file from a dead process is replaced, but
    a socket somebody still listens on is refused ("address in use").
    """
    if url.is_unix:
        if tls is not None:
            raise TransportError(
                "TLS is only supported for tcp: URLs, not unix: sockets", where=str(url)
            )
        sock, inode = _bind_unix(url, backlog)
        listener = Listener(
            sock, url, tls_context=None, handshake_timeout=handshake_timeout,
            unix_inode=inode,
        )
    else:
        # Load the certificates before binding, so a bad tls_dir fails
        # without leaving a half-open port behind.
        context = tls.server_context() if tls is not None else None
        sock = _bind_tcp(url, backlog)
        host, port = sock.getsockname()[:2]
        listener = Listener(
            sock, Url.tcp(host, port), tls_context=context,
            handshake_timeout=handshake_timeout,
        )
    log.info("listening on %s%s", listener.address, " with TLS" if tls else "")
    return listener


def _bind_tcp(url: Url, backlog: int) -> socket.socket:
    where = str(url)
    try:
        candidates = socket.getaddrinfo(
            url.host, url.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as e:
        raise TransportError(f"cannot resolve host {url.host!r}: {e.strerror}", where=where) from e
    # A host name may resolve to several addresses; listen on the first one
    # that works, like Rust's TcpListener::bind does for Cloud Hypervisor.
    errors: list[str] = []
    for family, kind, proto, _, address in candidates:
        sock = socket.socket(family, kind, proto)
        try:
            # Lets a restarted receiver reuse the port while old connections
            # linger in TIME_WAIT (Rust's std sets this too).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(backlog)
        except OSError as e:
            sock.close()
            errors.append(f"{address[0]}: {e.strerror or e}")
            continue
        # Non-blocking, so an accept after poll cannot hang if the peer
        # vanished in between; accept() loops back to poll instead.
        sock.setblocking(False)
        return sock
    raise TransportError(f"cannot listen: {'; '.join(errors)}", where=where)


#: A migration listener's UNIX socket: only its owner may connect (whoever connects can hand it a VM).
UNIX_LISTENER_MODE = 0o600


def _bind_unix(url: Url, backlog: int) -> tuple[socket.socket, tuple[int, int]]:
    where = str(url)
    _remove_stale_socket_file(url.path, where)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Private to our user whatever the umask, as Cloud Hypervisor's: bind() gives the file the socket's
        # own mode less the umask, so the file is never more open than 0600, not even for a moment.
        os.fchmod(sock.fileno(), UNIX_LISTENER_MODE)
        sock.bind(url.path)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            # Somebody created the file between our check and bind().
            raise TransportError("address in use", where=where) from e
        raise TransportError(f"cannot bind: {e.strerror or e}", where=where) from e
    try:
        sock.listen(backlog)
        st = os.stat(url.path)
        if stat.S_IMODE(st.st_mode) & ~UNIX_LISTENER_MODE:  # a kernel that ignored the fchmod
            os.chmod(url.path, UNIX_LISTENER_MODE)
    except OSError as e:
        sock.close()
        os.unlink(url.path)  # bind() created it; do not leave a dead file behind
        raise TransportError(f"cannot listen: {e.strerror or e}", where=where) from e
    sock.setblocking(False)
    return sock, (st.st_dev, st.st_ino)


def _remove_stale_socket_file(path: str, where: str) -> None:
    """Delete ``path`` if it is a socket nobody listens on; refuse otherwise.

    A receiver that crashed leaves its socket file behind, and bind() then
    fails with EADDRINUSE forever.  Connecting tells a dead file (refused)
    from a live listener (accepted, or EAGAIN when its backlog is full).
    Regular files are never deleted: the path is probably a mistake.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise TransportError(f"cannot inspect socket path: {e.strerror or e}", where=where) from e
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError("path exists and is not a socket; not replacing it", where=where)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        result = probe.connect_ex(path)
    if result in (0, errno.EAGAIN):
        raise TransportError("address in use: another process listens on it", where=where)
    if result not in (errno.ECONNREFUSED, errno.ENOENT):
        raise TransportError(
            f"cannot tell whether the socket is in use: {os.strerror(result)}", where=where
        )
    log.info("removing stale socket file %s", path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_own_socket_file(path: str, inode: tuple[int, int]) -> None:
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove socket file %s: %s", path, e)


# --------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------


def connect(url: Url, tls: TlsConfig | None = None, timeout: float = 30.0) -> Connection:
    """Connect to ``url`` (and do the TLS handshake) within ``timeout`` seconds.

    The returned connection is blocking (no timeout); use
    :meth:`Connection.set_timeout` to bound later I/O.
    """
    where = str(url)
    if url.is_unix:
        if tls is not None:
            raise TransportError(
                "TLS is only supported for tcp: URLs, not unix: sockets", where=where
            )
        return _connect_unix(url, timeout)
    if url.port == 0:
        raise TransportError("cannot connect to port 0", where=where)
    context = tls.client_context() if tls is not None else None
    deadline = _deadline(timeout)
    try:
        sock = socket.create_connection((url.host, url.port), timeout=timeout)
    except socket.gaierror as e:
        raise TransportError(f"cannot resolve host {url.host!r}: {e.strerror}", where=where) from e
    except TimeoutError as e:
        raise TransportError(f"cannot connect: timed out after {timeout} s", where=where) from e
    except OSError as e:
        raise TransportError(f"cannot connect: {e.strerror or e}", where=where) from e
    peer = _tcp_peer(sock)
    try:
        _set_tcp_options(sock, peer)
        if context is not None:
            # server_hostname is the host as written in the URL, which is what
            # Cloud Hypervisor hands rustls as the name to verify.
            sock = context.wrap_socket(
                sock, server_hostname=url.host, do_handshake_on_connect=False
            )
            _tls_handshake(sock, deadline, peer, "server")
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    log.info("connected to %s%s", peer, " with TLS" if context else "")
    return Connection(sock, peer=peer, is_unix=False, is_tls=context is not None)


def _connect_unix(url: Url, timeout: float) -> Connection:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(url.path)
        sock.settimeout(None)
    except TimeoutError as e:
        sock.close()
        raise TransportError(f"cannot connect: timed out after {timeout} s", where=str(url)) from e
    except OSError as e:
        sock.close()
        raise TransportError(f"cannot connect: {e.strerror or e}", where=str(url)) from e
    peer = _unix_peer(sock, url.path)
    log.info("connected to %s", peer)
    return Connection(sock, peer=peer, is_unix=True)
