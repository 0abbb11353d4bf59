"""The client side of Cloud Hypervisor's HTTP API on a UNIX socket: one request, one answer.

``chmig remote``, the tests, the benchmarks and the demo talk to a VMM through
:func:`request`; :class:`ApiError` is what a failed call raises (and what the
server raises inside a route to choose its answer's status).
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from .errors import ChmigError

API_PREFIX = "/api/v1/"


class ApiError(ChmigError):
    """An API request failed; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, where="API")
        self.status = status


def _one_line(text: str, limit: int = 200) -> str:
    """``text`` fit for a one-line error: control characters escaped, at most ``limit`` characters."""
    flat = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return flat if len(flat) <= limit else flat[:limit] + "..."


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def request(path: str, method: str, action: str, body: dict | None = None, timeout: float | None = None) -> Any:
    """One API call; returns the decoded JSON (or None); raises ApiError with the server's reason."""
    conn = _UnixConnection(path, timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data else {}
        conn.request(method, API_PREFIX + action, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except FileNotFoundError:
        raise ApiError(0, f"no API socket at {path}") from None
    except ConnectionRefusedError:
        raise ApiError(0, f"nothing listens on the API socket {path}") from None
    except OSError as exc:
        raise ApiError(0, f"API socket {path}: {exc}") from None
    except http.client.HTTPException as exc:  # something answered, but not HTTP
        raise ApiError(0, f"API socket {path}: not an HTTP answer: {_one_line(repr(exc))}") from None
    finally:
        conn.close()
    try:
        decoded = json.loads(raw) if raw else None
    except ValueError:
        raise ApiError(response.status, f"{action}: the API socket {path} did not answer JSON (HTTP {response.status})") \
            from None
    if response.status >= 300:
        reason = decoded.get("error") if isinstance(decoded, dict) else raw.decode(errors="replace")
        raise ApiError(response.status, f"{action} failed (HTTP {response.status}): {reason}")
    return decoded

