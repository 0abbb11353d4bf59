"""Test tooling: a loopback TCP proxy that caps throughput (a slow link), kept out of the package."""

from __future__ import annotations

import socket
import struct
import threading
import time

from chmig.transport import parse_url


class ThrottledProxy:
    """A loopback TCP proxy that caps throughput: a slow link for migrations that must not converge.

    Every accepted connection is relayed to ``target`` by two named threads, one
    per direction, each pacing itself to ``rate`` bytes per second.  ``close()``
    shuts every socket down, which ends the relay threads, and joins them.

    ``cut(seconds)`` is a network cut: every connection is reset at both ends
    (RST, as a router that lost its state answers), and for ``seconds`` every
    new connection is reset as soon as it is accepted.
    """

    def __init__(self, target: str, rate: float) -> None:
        url = parse_url(target)
        self._target = (url.host, url.port)
        self._rate = rate
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp:127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._cut_until = 0.0
        self._cutting: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                if time.monotonic() < self._cut_until:
                    _reset(client)
                    continue
                upstream = socket.create_connection(self._target)
            except OSError:
                return
            with self._lock:
                self._sockets += [client, upstream]
                for src, dst, name in ((client, upstream, "up"), (upstream, client, "down")):
                    thread = threading.Thread(target=self._relay, args=(src, dst),
                                              name=f"proxy-{name}-{len(self._threads)}", daemon=True)
                    self._threads.append(thread)
                    thread.start()

    def _relay(self, src: socket.socket, dst: socket.socket) -> None:
        started = time.monotonic()
        moved = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                moved += len(data)
                ahead = moved / self._rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)  # pacing the link is the point here
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                if sock in self._cutting:
                    continue  # cut: its close sends a reset (SO_LINGER 0), no clean end before it
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            # Closing our reading end resets a peer still writing to it, as a dead host would;
            # each socket is read by exactly one relay, so each is closed exactly once.
            src.close()

    def cut(self, seconds: float) -> None:
        """Reset every connection now, and every new one for ``seconds``."""

        self._cut_until = time.monotonic() + seconds
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self._cutting.add(sock)
                    sock.shutdown(socket.SHUT_RD)  # wakes its relay, which closes it: a reset
                except OSError:
                    pass
            self._sockets = []

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=10)
        self._accepter.join(timeout=10)


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (RST), not a clean end."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
