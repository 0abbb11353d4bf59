"""The client side of Cloud Hypervisor's HTTP API on a UNIX socket: one request, one answer.

``chmig remote``, the tests, the benchmarks and the demo talk to a VMM through
:func:`request`; :class:`ApiError` is what a failed call raises (and what the
server raises inside a route to choose its answer's status).

The answers are Cloud Hypervisor's (:mod:`chmig.api`): a status line with no
reason phrase, JSON bodies, and on failure a JSON *array* of messages, most
general first (``["Error from API", "The VM could not be paused", "..."]``),
which :func:`request` turns into one line.  Any other body an error comes with
(an older chmig's ``{"error": ...}``, or something that is not JSON at all) is
still reported, never a traceback.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any, Sequence

from .errors import ChmigError

API_PREFIX = "/api/v1/"

#: First messages of an error array that only restate its HTTP status: the one-line form leaves them out,
#: since it shows the status itself (Cloud Hypervisor's ``HttpError`` texts).
GENERIC_MESSAGES = frozenset({"Error from API", "Bad Request", "Not Found", "Internal Server Error",
                              "Not Implemented", "Too Many Requests", "Request Timeout"})


class ApiError(ChmigError):
    """An API request failed; ``status`` is the HTTP status (0: no HTTP answer at all).

    ``messages`` is the error's chain of messages, most general first, as
    Cloud Hypervisor sends it in an error body (one message when there is no chain).
    """

    def __init__(self, status: int, message: str, *, messages: Sequence[str] | None = None) -> None:
        super().__init__(message, where="API")
        self.status = status
        self.messages: list[str] = list(messages) if messages else [message]


def one_line(text: str, limit: int = 200) -> str:
    """``text`` fit for a one-line error (the server's messages and the client's alike): control characters escaped, at most ``limit`` characters."""
    flat = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return flat if len(flat) <= limit else flat[:limit] + "..."


def error_messages(raw: bytes) -> list[str] | None:
    """An error body read as ``ch-remote`` reads it: a JSON array of strings (None if it is not one)."""
    try:
        decoded = json.loads(raw)
    except ValueError:
        return None
    if isinstance(decoded, list) and decoded and all(isinstance(m, str) for m in decoded):
        return decoded
    return None


def describe(messages: Sequence[str]) -> str:
    """An error chain in one line: the messages that say more than the status, general to specific."""
    shown = list(messages)
    if len(shown) > 1 and shown[0] in GENERIC_MESSAGES:
        shown = shown[1:]
    return one_line(": ".join(shown), limit=1000)


def _reason(raw: bytes) -> tuple[str, list[str] | None]:
    """What a failed answer's body says, in one line, and its message chain if it is Cloud Hypervisor's array."""
    messages = error_messages(raw)
    if messages is not None:
        return describe(messages), messages
    try:
        decoded = json.loads(raw)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):  # an older chmig's form
        return one_line(decoded["error"], limit=1000), None
    if not raw:
        return "(no error message)", None
    return f"unexpected error body {one_line(raw.decode('utf-8', errors='replace'), limit=200)!r}", None


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
    """One API call; returns the decoded JSON (None for an answer without a body); raises ApiError with the reason.

    The request has ``ch-remote``'s headers (``api_client``): ``Host:
    localhost``, ``Accept: */*``, and a ``Content-Length`` only with a body —
    no ``Content-Type``, no ``Accept-Encoding``.  A failed call's message has
    the form ``"{action} failed (HTTP {status}): {reason}"``.
    """
    conn = _UnixConnection(path, timeout)
    try:
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        conn.putrequest(method, API_PREFIX + action, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", "localhost")
        conn.putheader("Accept", "*/*")
        if data is not None:
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        response = conn.getresponse()
        raw = response.read()
    except FileNotFoundError:
        raise ApiError(0, f"no API socket at {path}") from None
    except ConnectionRefusedError:
        raise ApiError(0, f"nothing listens on the API socket {path}") from None
    except OSError as exc:
        raise ApiError(0, f"API socket {path}: {exc}") from None
    except http.client.HTTPException as exc:  # something answered, but not HTTP
        raise ApiError(0, f"API socket {path}: not an HTTP answer: {one_line(repr(exc))}") from None
    finally:
        conn.close()
    if response.status >= 300:
        reason, messages = _reason(raw)
        raise ApiError(response.status, f"{action} failed (HTTP {response.status}): {reason}", messages=messages)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise ApiError(response.status, f"{action}: the API socket {path} did not answer JSON "
                                        f"(HTTP {response.status})") from None
