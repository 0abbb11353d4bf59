"""Cloud Hypervisor's HTTP API on a UNIX socket, and ``chmig remote`` (the ``ch-remote`` of chmig).

Routes (Cloud Hypervisor's names; bodies are JSON):

======  ============================  ===========================================
GET     /api/v1/vmm.ping              build and version information
GET     /api/v1/vm.info               state, config, guest counters, migration
PUT     /api/v1/vm.pause              pause every vCPU
PUT     /api/v1/vm.resume             resume
PUT     /api/v1/vm.shutdown           stop the VM (the VMM keeps serving)
PUT     /api/v1/vmm.shutdown          stop the VM and end the process
PUT     /api/v1/vm.send-migration     ``VmSendMigrationData`` (destination_url, connections, ...)
PUT     /api/v1/vm.receive-migration  ``VmReceiveMigrationData`` (receiver_url, tls_dir)
PUT     /api/v1/vm.cancel-migration   stop the migration in progress (its own request then fails)
PUT     /api/v1/vm.snapshot           ``VmSnapshotConfig`` (destination_url ``file:///DIR``); the VM must be paused
PUT     /api/v1/vm.restore            ``RestoreConfig`` (source_url ``file:///DIR``, memory_restore_mode, resume,
                                      prefault); on a VMM with no VM
======  ============================  ===========================================

Status codes: 200 with a JSON body, 204 for success without a body, 400 for a
malformed request (the reason in the body), 404 for an unknown route, 405 for a
known route with another method, 408 for a request not received in time, 409
when the VM's state does not allow the command, 500 when the action failed, 503
when too many connections are open.  Every error body is one line of JSON,
``{"error": "..."}`` — never an HTML page, never a traceback.
Migration requests are answered when the migration has finished, like
``ch-remote`` waits for them; the server is threaded, so ``vm.info`` keeps
answering meanwhile.

The socket is the VMM's whole control surface, so it is guarded:

* it is created with mode **0600** whatever the umask (the socket is fchmod-ed
  before ``bind``, which creates the file with the socket's mode less the
  umask, so it is never more open, not even for a moment); only the VMM's
  user can connect.  ``--api-socket`` replaces only a *stale socket*; a
  regular file, directory or symlink there is refused, and so is a socket a
  live VMM serves.
* each request must arrive whole — request line, headers and body — within
  :data:`REQUEST_TIMEOUT` seconds of its first byte being awaited (a deadline
  for the request, not for each read, so trickling bytes does not extend it);
  an idle keep-alive connection is closed after the same time.
* at most :data:`MAX_CONNECTIONS` connections are served at once; beyond that
  a connection is answered 503 and closed at once, so idle clients cannot grow
  threads without bound.
* a body needs a valid ``Content-Length`` of at most :data:`MAX_BODY` bytes
  (chunked bodies are refused) and is parsed as bounded JSON: finite numbers,
  a few objects and arrays, integers in Cloud Hypervisor's ``u64`` range, no
  null where a value is required.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import socketserver
import stat
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Callable

from .apiclient import API_PREFIX, ApiError
from .errors import ChmigError, UsageError, VmError
from .jsonlimits import JsonRefused, loads_bounded

if TYPE_CHECKING:
    from .vmm import Vmm

log = logging.getLogger(__name__)

#: The largest request body read (the API's bodies are a few hundred bytes).
MAX_BODY = 1 << 20
#: Seconds for a whole request (line, headers, body) to arrive; also how long a keep-alive connection may idle.
REQUEST_TIMEOUT = 10.0
#: Connections served at once; more are answered 503 and closed without a thread.
MAX_CONNECTIONS = 64
#: The API socket's mode: only the VMM's user may drive the VMM.
SOCKET_MODE = 0o600
#: Objects and arrays in one body (every body is one flat object), counted on the raw bytes before parsing.
MAX_JSON_CONTAINERS = 64
#: ``:`` and ``,`` in one body (a few per field), counted on the raw bytes before parsing.
MAX_JSON_SEPARATORS = 4096
#: Cloud Hypervisor's integer fields are u64.
U64_MAX = (1 << 64) - 1




# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------


def decode_body(raw: bytes) -> Any:
    """A request body as JSON, parsed at a cost bounded by its size (:mod:`chmig.jsonlimits`); empty is ``{}``."""
    if not raw.strip():
        return {}
    try:
        return loads_bounded(raw, max_containers=MAX_JSON_CONTAINERS, max_values=MAX_JSON_SEPARATORS)
    except JsonRefused as exc:
        raise ApiError(400, f"invalid JSON body: {_one_line(str(exc))}") from None


_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer",
                    float: "a number", bool: "a boolean", type(None): "null"}


def _fields(body: Any, allowed: dict[str, type], required: tuple[str, ...] = (),
            nullable: tuple[str, ...] = ()) -> dict:
    """Check a JSON body: an object, no unknown fields, the right types, required ones present.

    Null is only accepted for the ``nullable`` fields (Cloud Hypervisor's
    ``Option`` ones, such as ``tls_dir``), where it means "not given".
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, f"unknown field {_one_line(unknown[0])!r} (allowed: {', '.join(sorted(allowed))})")
    for name in required:
        if name not in body:
            raise ApiError(400, f"missing field {name!r}")
    for name, value in body.items():
        expected = allowed[name]
        if value is None and name in nullable and name not in required:
            continue
        # JSON true/false are Python bools, which are ints too: never accept them as numbers.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ApiError(400, f"field {name!r} must be {_JSON_TYPE_NAMES[expected]}, "
                                f"not {_JSON_TYPE_NAMES.get(type(value), type(value).__name__)}")
        if expected is int and not 0 <= value <= U64_MAX:
            raise ApiError(400, f"field {name!r} is out of range (0..{U64_MAX})")
    return body


SEND_MIGRATION_FIELDS: dict[str, type] = {
    "destination_url": str,
    "local": bool,
    "preserve_source": bool,
    "downtime_ms": int,
    "timeout_s": int,
    "timeout_strategy": str,
    "connections": int,
    "tls_dir": str,
    "memory_mode": str,
    "fault_connections": int,
}
RECEIVE_MIGRATION_FIELDS: dict[str, type] = {
    "receiver_url": str,
    "tls_dir": str,
    "memory_mode": str,
    "prefetch": str,
}
#: Fields whose Cloud Hypervisor type is an ``Option``: null is their default.
NULLABLE_FIELDS = ("tls_dir", "prefetch")


def _send_migration(vmm: Vmm, body: Any) -> dict:
    return vmm.send_migration(_fields(body, SEND_MIGRATION_FIELDS, ("destination_url",), NULLABLE_FIELDS))


def _receive_migration(vmm: Vmm, body: Any) -> None:
    """Cloud Hypervisor answers receive-migration with 204 and no body."""
    from .receive import ReceiveOptions  # here, so that `chmig remote` never loads the VM stack

    fields = _fields(body, RECEIVE_MIGRATION_FIELDS, ("receiver_url",), NULLABLE_FIELDS)
    vmm.receive_migration(ReceiveOptions.from_api(fields))


SNAPSHOT_FIELDS: dict[str, type] = {"destination_url": str}
#: Cloud Hypervisor's ``RestoreConfig``, every field as ``ch-remote restore`` serializes it.
RESTORE_FIELDS: dict[str, type] = {
    "source_url": str,
    "prefault": bool,
    "memory_restore_mode": str,
    "net_fds": list,
    "vfio_fds": list,
    "iommufd_fd": int,
    "resume": bool,
    "zone_updates": list,
}
#: RestoreConfig's ``Option`` fields (``ch-remote`` sends them as null).
RESTORE_NULLABLE = ("net_fds", "vfio_fds", "iommufd_fd")


def _snapshot(vmm: Vmm, body: Any) -> None:
    """Cloud Hypervisor answers vm.snapshot with 204 and no body."""
    fields = _fields(body, SNAPSHOT_FIELDS, ("destination_url",))
    vmm.snapshot(fields["destination_url"])


def _restore(vmm: Vmm, body: Any) -> None:
    """Cloud Hypervisor answers vm.restore with 204 and no body; ``vm.info`` shows the restore."""
    from .snapshot import RestoreConfig  # here, so that `chmig remote` never loads the VM stack

    vmm.restore(RestoreConfig.from_api(_fields(body, RESTORE_FIELDS, ("source_url",), RESTORE_NULLABLE)))


def _one_line(text: str, limit: int = 200) -> str:
    """``text`` fit for a one-line error: control characters escaped, at most ``limit`` characters."""
    flat = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
    return flat if len(flat) <= limit else flat[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


def _busy_response(limit: int) -> bytes:
    body = json.dumps({"error": f"too many API connections (at most {limit}): try again"}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


def _claim_socket_path(path: str) -> None:
    """Make ``path`` free for the API socket: only a stale socket (nobody listening) is removed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"--api-socket {path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(5)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # the stale socket of a process that is gone
        return
    except OSError as exc:
        raise UsageError(f"--api-socket {path}: cannot tell whether a VMM serves there: {exc.strerror or exc}") \
            from None
    finally:
        probe.close()
    raise UsageError(f"--api-socket {path}: another VMM is serving there")


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threaded HTTP/1.1 server on a UNIX socket, dispatching to a :class:`Vmm`.

    ``request_timeout`` and ``max_connections`` are the guards described in the
    module docstring (tests shorten them).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, path: str, vmm: Vmm, *, request_timeout: float = REQUEST_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        _claim_socket_path(path)
        self.path = path
        self.vmm = vmm
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._busy = _busy_response(max_connections)
        self._lock = threading.Lock()
        self._active = 0  # connections being served (each has its thread)
        self._requests = 0  # connections accepted so far, to name their threads
        self._saturated = False  # warn once per episode of refusals, not once per refusal
        self._thread: threading.Thread | None = None
        super().__init__(path, _Handler)

    def server_bind(self) -> None:
        """Bind with mode 0600: ``bind`` gives the file the socket's own mode less the umask."""
        os.fchmod(self.socket.fileno(), SOCKET_MODE)
        super().server_bind()
        if stat.S_IMODE(os.stat(self.path).st_mode) & ~SOCKET_MODE:
            # A kernel that ignored the fchmod: not listening yet, so nobody could have connected meanwhile.
            os.chmod(self.path, SOCKET_MODE)

    def process_request(self, request: Any, client_address: Any) -> None:
        """One named thread per connection, up to ``max_connections``; beyond, 503 at once and no thread."""
        with self._lock:
            full = self._active >= self.max_connections
            if not full:
                self._active += 1
                self._requests += 1
                number = self._requests
                self._saturated = False
        if full:
            self._refuse(request)
            return
        thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                  name=f"api-request-{number}", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # the host ran out of threads: refuse rather than stop serving
            log.warning("API: cannot start a thread for a connection: %s", exc)
            self._release()
            self._refuse(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._active -= 1

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 without blocking the accepting thread, and close."""
        with self._lock:
            first, self._saturated = not self._saturated, True
        if first:
            log.warning("API: %d connections open, refusing more until one ends", self.max_connections)
        try:
            request.setblocking(False)
            request.send(self._busy)
        except OSError:
            pass  # the client left, or its buffer is full: closing says enough
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection's thread failed outside a request's handler: one log line, never a traceback on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # the client reset or left mid-request: nobody to tell
            log.debug("API connection ended: %s", exc)
        else:
            log.error("API connection failed: %s", _describe(exc))

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

    def routes(self) -> dict[tuple[str, str], Callable[[Any], Any]]:
        vmm = self.vmm
        return {
            ("GET", "vmm.ping"): lambda body: vmm.ping(),
            ("GET", "vm.info"): lambda body: vmm.info(),
            ("PUT", "vm.pause"): lambda body: vmm.pause(),
            ("PUT", "vm.resume"): lambda body: vmm.resume(),
            ("PUT", "vm.shutdown"): lambda body: vmm.shutdown_vm(),
            ("PUT", "vmm.shutdown"): lambda body: vmm.shutdown_vmm(),
            ("PUT", "vm.send-migration"): lambda body: _send_migration(vmm, body),
            ("PUT", "vm.receive-migration"): lambda body: _receive_migration(vmm, body),
            ("PUT", "vm.cancel-migration"): lambda body: vmm.cancel_migration(),
            ("PUT", "vm.snapshot"): lambda body: _snapshot(vmm, body),
            ("PUT", "vm.restore"): lambda body: _restore(vmm, body),
        }


def _describe(exc: BaseException | None) -> str:
    """An unexpected exception in one line: what, and where it was raised (enough to find the bug)."""
    if exc is None:
        return "unknown error"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return _one_line(f"{exc!r}{where}", limit=500)


class _DeadlineReader(io.RawIOBase):
    """The request socket as a raw stream whose reads all end by one deadline.

    A socket timeout alone bounds each read, so a client trickling a byte at a
    time could hold its thread forever; here each read may only wait for what
    is left of the request's time.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request did not arrive in time")
            self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    # A request line without a version would otherwise be answered HTTP/0.9-style: a body with no status line.
    default_request_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's reader is replaced by one bounded by the request's deadline
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)
        self._body_read = False

    def handle_one_request(self) -> None:
        # The deadline starts when the request is awaited, so an idle keep-alive connection ends too.
        self._reader.deadline = time.monotonic() + self.server.request_timeout
        self._body_read = False
        super().handle_one_request()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("API %s", _one_line(format % args, limit=300))

    def address_string(self) -> str:
        return "api-client"

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        major = int(self.request_version.partition("/")[2].partition(".")[0])  # the stdlib checked the digits
        if major < 1:
            self.send_error(505, f"{self.request_version} is not supported: use HTTP/1.1")
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (bad request line, headers, method) as JSON, closing the connection."""
        self.log_error("code %d, message %s", code, message)
        reason = message or self.responses.get(code, ("error",))[0]
        self._reply(code, {"error": _one_line(reason)}, close=True)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # Cloud Hypervisor's routes are GET or PUT; these exist so that its routes answer 405, not 501.
    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        """The body by its Content-Length, within the request's deadline; refused before any read if invalid."""
        if "Transfer-Encoding" in self.headers:
            coding = _one_line(self.headers["Transfer-Encoding"], limit=40)
            raise ApiError(400, f"chunked bodies are not supported (Transfer-Encoding: {coding}): "
                                "send a Content-Length")
        lengths = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        if not lengths:
            self._body_read = True
            return b""
        if len(lengths) > 1:
            raise ApiError(400, "conflicting Content-Length headers")
        text = lengths.pop()
        # Only digits: int() would also take "-1", "+5", "1_0" and " 7 ", and -1 means "read to EOF".
        if not (text.isascii() and text.isdigit()):
            raise ApiError(400, f"invalid Content-Length {_one_line(text, 40)!r}: expected a number of bytes")
        if len(text) > 9 or int(text) > MAX_BODY:
            raise ApiError(400, f"request body too large (Content-Length {text[:20]}, at most {MAX_BODY})")
        length = int(text)
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raise ApiError(408, f"the request body timed out: not received within {self.server.request_timeout:g} s") \
                from None
        if len(raw) < length:
            raise ApiError(400, f"the request body ended after {len(raw)} of {length} bytes")
        self._body_read = True
        return raw

    def _dispatch(self, method: str) -> None:
        try:
            raw = self._read_body()
            if not self.path.startswith(API_PREFIX):
                raise ApiError(404, f"unknown path {_one_line(self.path, 100)}")
            action = self.path[len(API_PREFIX):]
            routes = self.server.routes()
            handler = routes.get((method, action))
            if handler is None:
                if any(a == action for _, a in routes):
                    raise ApiError(405, f"method {method} not allowed for {action}")
                raise ApiError(404, f"unknown endpoint {_one_line(action, 100)}")
            result = handler(decode_body(raw))
        except ApiError as exc:
            self._reply(exc.status, {"error": exc.message})
        except VmError as exc:
            self._reply(409, {"error": str(exc)})
        except UsageError as exc:
            self._reply(400, {"error": str(exc)})
        except ChmigError as exc:
            self._reply(500, {"error": str(exc)})
        except Exception as exc:  # a bug behind the route: the API must answer, and the log says where
            log.error("API %s %s failed: %s", method, _one_line(self.path, 100), _describe(exc))
            self._reply(500, {"error": f"internal error: {_one_line(repr(exc))}"})
        else:
            self._reply(200 if result is not None else 204, result)
        finally:
            if self.server.vmm.exit_after_reply:
                self.server.vmm.exit_event.set()

    def _reply(self, status: int, body: Any, close: bool = False) -> None:
        """Answer ``body`` as one line of JSON; close the connection if its request was not read to the end."""
        if status >= 400 and isinstance(body, dict) and isinstance(body.get("error"), str):
            body["error"] = _one_line(body["error"], limit=1000)
        data = b"" if body is None else json.dumps(body).encode()
        close = close or not self._body_read
        if self.request_version == "HTTP/0.9":  # the stdlib would send no status line and no headers at all
            self.request_version = "HTTP/1.0"
        # The request's deadline no longer applies: the answer gets a timeout of its own.
        self.connection.settimeout(self.server.request_timeout)
        try:
            self.send_response(status)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            if self.command == "HEAD":  # no body, and no length of one that is not sent
                self.close_connection = True
                self.end_headers()
                return
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)
        except OSError as exc:  # the client went away: nothing left to tell it
            log.debug("API reply to a client that left: %s", exc)
            self.close_connection = True
