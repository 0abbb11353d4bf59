"""Cloud Hypervisor's HTTP API on a UNIX socket, and ``chmig remote`` (the ``ch-remote`` of chmig).

Routes (Cloud Hypervisor's names; bodies are JSON):

======  ==========================  ===========================================
GET     /api/v1/vmm.ping            build and version information
GET     /api/v1/vm.info             state, config, guest counters, migration
PUT     /api/v1/vm.pause            pause every vCPU
PUT     /api/v1/vm.resume           resume
PUT     /api/v1/vm.shutdown         stop the VM (the VMM keeps serving)
PUT     /api/v1/vmm.shutdown        stop the VM and end the process
PUT     /api/v1/vm.send-migration   ``VmSendMigrationData`` (destination_url, connections, ...)
PUT     /api/v1/vm.receive-migration ``VmReceiveMigrationData`` (receiver_url, tls_dir)
======  ==========================  ===========================================

Status codes: 200 with a JSON body, 204 for success without a body, 400 for a
malformed request (the reason in the body), 404 for an unknown route, 409 when
the VM's state does not allow the command, 500 when the action failed.
Migration requests are answered when the migration has finished, like
``ch-remote`` waits for them; the server is threaded, so ``vm.info`` keeps
answering meanwhile.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import socket
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Callable

from .errors import ChmigError, UsageError, VmError
from .options import parse_typed

if TYPE_CHECKING:
    from .vmm import Vmm

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/"


class ApiError(ChmigError):
    """An API request failed; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, where="API")
        self.status = status


def _fields(body: dict, allowed: dict[str, type | tuple[type, ...]], required: tuple[str, ...] = ()) -> dict:
    """Check a JSON body: no unknown fields, the right types, required ones present."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    for name in required:
        if name not in body:
            raise ApiError(400, f"missing field {name!r}")
    for name, value in body.items():
        expected = allowed[name]
        # JSON true/false are Python bools, which are ints too: never accept them as numbers.
        wrong = not isinstance(value, expected) or (expected is int and isinstance(value, bool))
        if value is not None and wrong:
            raise ApiError(400, f"field {name!r} has the wrong type ({type(value).__name__})")
    return body


SEND_MIGRATION_FIELDS: dict[str, type | tuple[type, ...]] = {
    "destination_url": str,
    "local": bool,
    "preserve_source": bool,
    "downtime_ms": int,
    "timeout_s": int,
    "timeout_strategy": str,
    "connections": int,
    "tls_dir": str,
    "memory_mode": str,
}
RECEIVE_MIGRATION_FIELDS: dict[str, type | tuple[type, ...]] = {
    "receiver_url": str,
    "tls_dir": str,
    "memory_mode": str,
}


def _receive_migration(vmm: Vmm, body: dict) -> None:
    """Cloud Hypervisor answers receive-migration with 204 and no body."""
    from .receive import ReceiveOptions  # here, so that `chmig remote` never loads the VM stack

    vmm.receive_migration(ReceiveOptions.from_api(_fields(body, RECEIVE_MIGRATION_FIELDS, ("receiver_url",))))


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threaded HTTP/1.1 server on a UNIX socket, dispatching to a :class:`Vmm`."""

    daemon_threads = True
    allow_reuse_address = True
    _requests = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        """One named thread per request (the stdlib's own is anonymous)."""
        self._requests += 1
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name=f"api-request-{self._requests}", daemon=True)
        thread.start()

    def __init__(self, path: str, vmm: Vmm) -> None:
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # stale socket of a process that is gone
            else:
                probe.close()
                raise UsageError(f"--api-socket {path}: another VMM is serving there")
            finally:
                probe.close()
        self.path = path
        self.vmm = vmm
        super().__init__(path, _Handler)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="api-server", daemon=True)
        self._thread.start()
        log.info("API listening on %s", self.path)

    def stop(self) -> None:
        """Stop serving and remove the socket (``shutdown`` unblocks ``serve_forever``)."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def routes(self) -> dict[tuple[str, str], Callable[[dict], Any]]:
        vmm = self.vmm
        return {
            ("GET", "vmm.ping"): lambda body: vmm.ping(),
            ("GET", "vm.info"): lambda body: vmm.info(),
            ("PUT", "vm.pause"): lambda body: vmm.pause(),
            ("PUT", "vm.resume"): lambda body: vmm.resume(),
            ("PUT", "vm.shutdown"): lambda body: vmm.shutdown_vm(),
            ("PUT", "vmm.shutdown"): lambda body: vmm.shutdown_vmm(),
            ("PUT", "vm.send-migration"): lambda body: vmm.send_migration(
                _fields(body, SEND_MIGRATION_FIELDS, ("destination_url",))
            ),
            ("PUT", "vm.receive-migration"): lambda body: _receive_migration(vmm, body),
        }


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("API %s", format % args)

    def address_string(self) -> str:
        return "api-client"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > 1 << 20:
                raise ApiError(400, "request body too large")
            raw = self.rfile.read(length) if length else b""
            if not self.path.startswith(API_PREFIX):
                raise ApiError(404, f"unknown path {self.path}")
            action = self.path[len(API_PREFIX):]
            handler = self.server.routes().get((method, action))
            if handler is None:
                known = any(a == action for _, a in self.server.routes())
                raise ApiError(405 if known else 404, f"{'method not allowed for' if known else 'unknown endpoint'} {action}")
            try:
                body = json.loads(raw) if raw.strip() else {}
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ApiError(400, f"invalid JSON body: {exc}") from None
            result = handler(body)
        except ApiError as exc:
            self._reply(exc.status, {"error": exc.message})
        except VmError as exc:
            self._reply(409, {"error": str(exc)})
        except UsageError as exc:
            self._reply(400, {"error": str(exc)})
        except ChmigError as exc:
            self._reply(500, {"error": str(exc)})
        except Exception as exc:  # the API must answer, whatever failed behind it
            log.exception("API request %s %s failed", method, self.path)
            self._reply(500, {"error": f"internal error: {exc!r}"})
        else:
            self._reply(200 if result is not None else 204, result)
        finally:
            if self.server.vmm.exit_after_reply:
                self.server.vmm.exit_event.set()

    def _reply(self, status: int, body: Any) -> None:
        data = b"" if body is None else json.dumps(body, indent=1).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        try:
            self.end_headers()
            if data:
                self.wfile.write(data)
        except OSError as exc:  # the client went away: nothing left to tell it
            log.debug("API reply to a client that left: %s", exc)


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------


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
    finally:
        conn.close()
    decoded = json.loads(raw) if raw else None
    if response.status >= 300:
        reason = decoded.get("error") if isinstance(decoded, dict) else raw.decode(errors="replace")
        raise ApiError(response.status, f"{action} failed (HTTP {response.status}): {reason}")
    return decoded


REMOTE_ACTIONS: dict[str, tuple[str, str, dict | None]] = {
    "ping": ("GET", "vmm.ping", None),
    "info": ("GET", "vm.info", None),
    "pause": ("PUT", "vm.pause", None),
    "resume": ("PUT", "vm.resume", None),
    "shutdown": ("PUT", "vm.shutdown", None),
    "shutdown-vmm": ("PUT", "vmm.shutdown", None),
    "send-migration": ("PUT", "vm.send-migration", SEND_MIGRATION_FIELDS),
    "receive-migration": ("PUT", "vm.receive-migration", RECEIVE_MIGRATION_FIELDS),
}


def main_remote(args: argparse.Namespace) -> int:
    """``chmig remote --api-socket PATH ACTION [key=value,...]``."""
    if args.action not in REMOTE_ACTIONS:
        raise UsageError(f"unknown action {args.action!r} (choose from {', '.join(REMOTE_ACTIONS)})")
    method, action, fields = REMOTE_ACTIONS[args.action]
    body = None
    if fields is not None:
        body = parse_typed(args.options, fields, args.action)
    elif args.options:
        raise UsageError(f"{args.action} takes no options")
    result = request(args.api_socket, method, action, body)
    if result is not None:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0
