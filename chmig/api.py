"""Cloud Hypervisor's HTTP API on a UNIX socket, answered as Cloud Hypervisor answers, so ``ch-remote`` works.

Routes (Cloud Hypervisor's names; bodies are JSON, as ``ch-remote`` serializes its structs):

======  ============================  ===========================================
GET     /api/v1/vmm.ping              build and version information (``VmmPingResponse``)
PUT     /api/v1/vmm.shutdown          stop the VM and end the process (200, empty body)
GET     /api/v1/vm.info               state, config, guest counters, migration (live progress while one runs)
PUT     /api/v1/vm.boot               boot the VM that ``vm.shutdown`` stopped, from its config
PUT     /api/v1/vm.delete             shut the VM down if it runs and forget its config
PUT     /api/v1/vm.pause              pause every vCPU
PUT     /api/v1/vm.resume             resume
PUT     /api/v1/vm.shutdown           stop the VM; the VMM keeps serving, ``vm.info`` shows it "Created"
PUT     /api/v1/vm.send-migration     ``VmSendMigrationData``; answered when the migration has ended, with its
                                      statistics (Cloud Hypervisor answers at once; chmig's send blocks)
PUT     /api/v1/vm.receive-migration  ``VmReceiveMigrationData`` (receiver_url, tls_dir, memory_mode, ...)
PUT     /api/v1/vm.cancel-migration   stop the migration in progress (its own request then fails); chmig's own
PUT     /api/v1/vm.migration-start-postcopy  a ``memory_mode=hybrid`` send switches to postcopy after the iteration in flight (QEMU's
                                      ``migrate-start-postcopy``); chmig's own
PUT     /api/v1/vm.snapshot           ``VmSnapshotConfig`` (destination_url ``file:///DIR``); the VM must be paused
PUT     /api/v1/vm.restore            ``RestoreConfig`` (source_url ``file:///DIR``, memory_restore_mode, resume,
                                      prefault); on a VMM with no VM
======  ============================  ===========================================

Cloud Hypervisor's other endpoints (``vm.add-*``, ``vm.counters``,
``vm.create``, ``vm.coredump``, ``vm.nmi``, ``vm.power-button``, ``vm.reboot``,
``vm.remove-device``, ``vm.resize*``: :data:`UNIMPLEMENTED`) answer 501 with a
message saying chmig does not implement them.

Answers are micro_http's: ``HTTP/1.1 200 `` with **no reason phrase** (its
client, ``api_client``, parses everything between ``HTTP/1.1 `` and the CR as
the status code), then ``Server``, ``Connection``, ``Content-Type:
application/json`` and ``Content-Length`` (none of those two on a 204), and
the body as compact JSON in pure ASCII (``api_client`` decodes each 256-byte
chunk as UTF-8 on its own).  Status codes (Cloud Hypervisor's
``api_error_status_code`` and ``HttpError``):

======  ==========================================================================
200     a JSON body (``vm.info``, ``vmm.ping``, ``vm.send-migration``'s statistics); ``vmm.shutdown``: empty
204     done, no body
400     a bad request: a malformed or refused body (``UsageError``), a wrong method for the route, a body on a
        route that takes none (or none where one is needed), chunked bodies, file descriptors passed along,
        a malformed request line or header (414, 431 and 505 where the stdlib can tell)
404     ``vm.info`` without a VM, ``vm.boot`` without a config (``NoVmError``: Cloud Hypervisor's
        ``VmNotCreated``, ``VmMissingConfig``), or an unknown path
408     the request did not arrive whole in time
429     too many connections open
500     the action failed (every other ``VmError``/``ChmigError``: no VM running, a VM already created, a wrong
        state, a failed migration, ...)
501     a Cloud Hypervisor endpoint chmig does not implement
======  ==========================================================================

Every error body is Cloud Hypervisor's: a JSON array of one-line messages, most
general first — ``["Error from API", "The VM could not be paused", "VM is not
running"]`` for an action, ``["Bad Request", "..."]``, ``["Failed to
deserialize JSON", "..."]``, ``["Not Found", "..."]`` for the HTTP layer —
whatever the method (HEAD and unknown ones included): never HTML, never a
traceback, never ``{"error": ...}``.  Migration requests are answered when the
migration has finished, as ``ch-remote`` waits for them; the server is
threaded, so ``vm.info`` keeps answering meanwhile.

The socket is the VMM's whole control surface, so it is guarded:

* it is created with mode **0600** whatever the umask (the socket is fchmod-ed
  before ``bind``, which creates the file with the socket's mode less the
  umask, so it is never more open, not even for a moment); only the VMM's
  user can connect.  ``--api-socket`` replaces only a *stale socket*; a
  regular file, directory or symlink there is refused, and so is a socket a
  live VMM serves.  ``--api-socket fd=N`` adopts an inherited listening UNIX
  socket instead (whose file, if any, chmig neither chmods nor removes).  A
  socket it cannot listen on is one line of usage error, never a traceback.
* each request must arrive whole — request line, headers and body — within
  :data:`REQUEST_TIMEOUT` seconds of its first byte being awaited (a deadline
  for the request, not for each read, so trickling bytes does not extend it);
  an idle keep-alive connection is closed after the same time.
* at most :data:`MAX_CONNECTIONS` connections are served at once; beyond that
  a connection is answered 429 and closed at once, so idle clients cannot grow
  threads without bound.
* a body needs a valid ``Content-Length`` of at most :data:`MAX_BODY` bytes
  (chunked bodies are refused) and is parsed as bounded JSON: finite numbers,
  a few objects and arrays, integers in Cloud Hypervisor's ``u64`` range, no
  null where a value is required.
* file descriptors passed with a request (``SCM_RIGHTS``, as ``ch-remote``
  does for ``vfio_fds`` or ``net_fds``) are closed as they arrive, and the
  request is refused: chmig has no use for them.
"""

from __future__ import annotations

import contextlib
import io
import json
import array
import logging
import math
import os
import socket
import socketserver
import stat
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, Callable, Iterator

from . import apiconfig
from .apiclient import API_PREFIX, ApiError
from .apiclient import one_line as _one_line
from .apiconfig import JsonBodyError
from .errors import ChmigError, NoVmError, UsageError
from .jsonlimits import JsonRefused, loads_bounded

if TYPE_CHECKING:
    from .vmm import Vmm

log = logging.getLogger(__name__)

#: The largest request body read (the API's bodies are a few hundred bytes).
MAX_BODY = 1 << 20
#: Seconds for a whole request (line, headers, body) to arrive; also how long a keep-alive connection may idle.
REQUEST_TIMEOUT = 10.0
#: Connections served at once; more are answered 429 and closed without a thread.
MAX_CONNECTIONS = 64
#: The API socket's mode: only the VMM's user may drive the VMM.
SOCKET_MODE = 0o600
#: Objects and arrays in one body (every body is one flat object), counted on the raw bytes before parsing.
MAX_JSON_CONTAINERS = 64
#: ``:`` and ``,`` in one body (a few per field), counted on the raw bytes before parsing.
MAX_JSON_SEPARATORS = 4096
#: Cloud Hypervisor's integer fields are u64.
U64_MAX = (1 << 64) - 1
#: The first message of a body that is not the JSON a route takes (Cloud Hypervisor's serde error).
BAD_JSON = "Failed to deserialize JSON"


class HttpError(ApiError):
    """An answer the HTTP layer gives itself: its status and Cloud Hypervisor's message chain, most general first."""

    def __init__(self, status: int, *messages: str) -> None:
        super().__init__(status, messages[-1], messages=messages)


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
        raise HttpError(400, BAD_JSON, f"invalid JSON body: {_one_line(str(exc))}") from None


@contextlib.contextmanager
def _bad_json() -> Iterator[None]:
    """A body the route cannot take (:class:`~chmig.apiconfig.JsonBodyError`), answered as Cloud Hypervisor
    answers a body serde cannot deserialize."""
    try:
        yield
    except JsonBodyError as exc:
        raise HttpError(400, BAD_JSON, _one_line(exc.message, limit=1000)) from None


# The request structs' JSON fields, re-exported from apiconfig.py, which checks every body route's fields
# (check_fields) and owns Cloud Hypervisor's request structs.
SEND_MIGRATION_FIELDS = apiconfig.SEND_MIGRATION_FIELDS
RECEIVE_MIGRATION_FIELDS = apiconfig.RECEIVE_MIGRATION_FIELDS
NULLABLE_FIELDS = apiconfig.NULLABLE_FIELDS
SNAPSHOT_FIELDS = apiconfig.SNAPSHOT_FIELDS
RESTORE_FIELDS = apiconfig.RESTORE_FIELDS


def _send_migration(vmm: Vmm, body: Any) -> dict:
    """``Vmm.send_migration`` reads the body with ``SendOptions.from_api``, which checks every field."""
    with _bad_json():
        return vmm.send_migration(body)


def _receive_migration(vmm: Vmm, body: Any) -> None:
    """Cloud Hypervisor answers receive-migration with 204 and no body."""
    with _bad_json():
        options = apiconfig.ReceiveOptions.from_api(body)
    vmm.receive_migration(options)


def _snapshot(vmm: Vmm, body: Any) -> None:
    """Cloud Hypervisor answers vm.snapshot with 204 and no body."""
    with _bad_json():
        destination_url = apiconfig.snapshot_from_api(body)
    vmm.snapshot(destination_url)


def _restore(vmm: Vmm, body: Any) -> None:
    """Cloud Hypervisor answers vm.restore with 204 and no body; ``vm.info`` shows the restore."""
    from .snapshot import RestoreConfig  # here, so that `chmig remote` never loads the VM stack

    with _bad_json():
        config = RestoreConfig.from_api(body)
    vmm.restore(config)


# ---------------------------------------------------------------------------------------------
# Answers in Cloud Hypervisor's form
# ---------------------------------------------------------------------------------------------

#: The reason texts of Cloud Hypervisor's ``HttpError``: the first message of an error the HTTP layer answers.
REASONS = {400: "Bad Request", 404: "Not Found", 408: "Request Timeout", 414: "Bad Request",
           429: "Too Many Requests", 431: "Bad Request", 500: "Internal Server Error", 501: "Not Implemented",
           505: "Bad Request"}
#: The first message of an error a VMM action raised (Cloud Hypervisor's ``HttpError::ApiError``).
FROM_API = "Error from API"
#: What failed, per route: Cloud Hypervisor's ``ApiError`` texts (the second message of an action's error).
#: send-migration's is CH's synchronous-era text: chmig's send blocks until the migration ended, so
#: "Error dispatching the migration worker" (CH's send runs in the background) would not be true here.
ROUTE_FAILURES = {
    "vmm.ping": "The VMM could not be pinged",
    "vmm.shutdown": "The VMM could not shutdown",
    "vm.info": "The VM info is not available",
    "vm.boot": "The VM could not boot",
    "vm.delete": "The VM could not be deleted",
    "vm.pause": "The VM could not be paused",
    "vm.resume": "The VM could not resume",
    "vm.shutdown": "The VM could not shutdown",
    "vm.snapshot": "The VM could not be snapshotted",
    "vm.restore": "The VM could not be restored",
    "vm.send-migration": "Error sending migration",
    "vm.receive-migration": "Error receiving migration",
    "vm.cancel-migration": "The migration could not be cancelled",
    "vm.migration-start-postcopy": "The migration could not switch to postcopy",
}
#: Routes whose request carries a JSON body.  The others refuse one, as Cloud Hypervisor's
#: ``vm_action_put_handler`` does (400), and those refuse a missing one.
BODY_ROUTES = frozenset({"vm.send-migration", "vm.receive-migration", "vm.snapshot", "vm.restore"})
#: Cloud Hypervisor's other endpoints (``HTTP_ROUTES`` in its ``vmm/src/api/http/mod.rs``) with their method:
#: chmig answers them 501 with a message naming the endpoint, never a bare 404.
UNIMPLEMENTED: dict[str, str] = {
    "vm.add-device": "PUT", "vm.add-disk": "PUT", "vm.add-fs": "PUT", "vm.add-generic-vhost-user": "PUT",
    "vm.add-net": "PUT", "vm.add-pmem": "PUT", "vm.add-user-device": "PUT", "vm.add-vdpa": "PUT",
    "vm.add-vsock": "PUT", "vm.coredump": "PUT", "vm.counters": "GET", "vm.create": "PUT", "vm.nmi": "PUT",
    "vm.power-button": "PUT", "vm.reboot": "PUT", "vm.remove-device": "PUT", "vm.resize": "PUT",
    "vm.resize-disk": "PUT", "vm.resize-zone": "PUT",
}
#: The ``Server`` header.  Cloud Hypervisor writes "Cloud Hypervisor API"; no client of its API reads the
#: header (``api_client`` reads only the status line and ``Content-Length``), so chmig names itself: whoever
#: looks at the raw answer (``curl -v``) learns what answered, as ``vmm.ping``'s ``build_version`` says too.
SERVER_NAME = "chmig"
#: ``Connection`` value per case: Cloud Hypervisor's micro_http always says keep-alive; chmig says close when
#: it closes (a request it did not read to the end, a refused connection), so a client is never misled.
_KEEP_ALIVE, _CLOSE = "keep-alive", "close"


class _Status:
    """A route's answer that is a status without a JSON body (``vmm.shutdown``: 200 and ``Content-Length: 0``)."""

    def __init__(self, status: int) -> None:
        self.status = status


#: Cloud Hypervisor answers vmm.shutdown 200 with an empty body (``ch-remote`` prints an empty line).
EMPTY_200 = _Status(200)


def encode_json(value: Any) -> bytes:
    """Compact JSON in pure ASCII, as serde_json writes it; a non-finite float (not JSON) becomes null.

    ASCII only: ``api_client`` reads answers in 256-byte chunks and decodes each
    one as UTF-8 on its own, so a multi-byte character cut by a chunk boundary
    would make ``ch-remote`` panic.
    """
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    except ValueError:
        return json.dumps(_finite(value), separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null: serde_json (``ch-remote``) refuses them, JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def answer_bytes(status: int, body: bytes | None, close: bool = False) -> bytes:
    """One answer in micro_http's form: no reason phrase; no Content-Type nor Content-Length on a 204 (or 100).

    ``HTTP/1.1 200 \\r\\nServer: ...\\r\\nConnection: keep-alive\\r\\nContent-Type: application/json\\r\\n``
    ``Content-Length: N\\r\\n\\r\\n<body>``.
    """
    head = [f"HTTP/1.1 {status} ", f"Server: {SERVER_NAME}", f"Connection: {_CLOSE if close else _KEEP_ALIVE}"]
    if status not in (100, 204):
        head += ["Content-Type: application/json", f"Content-Length: {len(body or b'')}"]
    payload = (body or b"") if status not in (100, 204) else b""
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + payload


def error_body(messages: list[str]) -> bytes:
    """Cloud Hypervisor's error body: a JSON array of messages, most general first, each one line."""
    return encode_json([_one_line(m, limit=1000) for m in messages])


def _busy_response(limit: int) -> bytes:
    return answer_bytes(429, error_body([REASONS[429], f"too many API connections (at most {limit}): try again"]),
                        close=True)


def _claim_socket_path(path: str) -> None:
    """Make ``path`` free for the API socket: only a stale socket (nobody listening) is removed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:  # a directory we may not search, a NUL in the path, ...
        raise UsageError(f"--api-socket {_one_line(path)}: {_os_reason(exc)}") from None
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


def _os_reason(exc: BaseException) -> str:
    """An OS error's own words ("No such file or directory"), without Python's ``[Errno N]`` and path decoration."""
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def _adopt_listener(fd: int, backlog: int) -> socket.socket:
    """The inherited listening socket ``fd`` (Cloud Hypervisor's ``--api-socket fd=N``), checked and listening.

    Only a bound UNIX stream socket will do; anything else is refused by name
    and left as it was (not closed: it was never ours).
    """
    what = f"--api-socket fd={fd}"
    if fd < 0:
        raise UsageError(f"{what}: not a file descriptor")
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise UsageError(f"{what}: not an open socket ({_os_reason(exc)})") from None
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            kind = f"{getattr(sock.family, 'name', sock.family)}/{getattr(sock.type, 'name', sock.type)}"
            raise UsageError(f"{what}: must be a UNIX stream socket, not {kind}")
        if not sock.getsockname():
            raise UsageError(f"{what}: the socket is not bound to an address")
        sock.listen(backlog)
    except UsageError:
        sock.detach()
        raise
    except OSError as exc:
        sock.detach()
        raise UsageError(f"{what}: cannot listen on it ({_os_reason(exc)})") from None
    sock.set_inheritable(False)  # it is the VMM's now: no child may hold the API open
    sock.settimeout(None)  # the parent may have left it non-blocking
    return sock


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A threaded HTTP/1.1 server on a UNIX socket, dispatching to a :class:`Vmm`.

    It listens on ``path`` (created with mode 0600), or on the inherited
    listening socket ``fd`` (``--api-socket fd=N``: its path, if any, is not
    chmig's to create, chmod or remove).  A socket it cannot listen on is a
    :class:`UsageError` of one line.  ``request_timeout`` and
    ``max_connections`` are the guards described in the module docstring
    (tests shorten them).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, path: str | None, vmm: Vmm, *, fd: int | None = None,
                 request_timeout: float = REQUEST_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        if (path is None) == (fd is None):
            raise UsageError("--api-socket: give a path or fd=N, one of them")
        if path is not None and not path:
            raise UsageError("--api-socket: the path is empty")
        self.vmm = vmm
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._busy = _busy_response(max_connections)
        self._lock = threading.Lock()
        self._active = 0  # connections being served (each has its thread)
        self._requests = 0  # connections accepted so far, to name their threads
        self._saturated = False  # warn once per episode of refusals, not once per refusal
        self._thread: threading.Thread | None = None
        #: The socket file this server created (removed by stop() if it is still that file), as (dev, ino).
        self._created: tuple[int, int] | None = None
        if fd is not None:
            listener = _adopt_listener(fd, self.request_queue_size)
            name = listener.getsockname()
            #: The socket's path, when it has one in the filesystem (to connect to); None for an abstract one.
            self.path = name if isinstance(name, str) and name.startswith("/") else None
            self.description = f"fd={fd}" + (f" ({name})" if isinstance(name, str) and name else "")
            super().__init__(self.path or "", _Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = listener
            self.server_address = name
            return
        _claim_socket_path(path)  # type: ignore[arg-type]
        self.path = path
        self.description = path  # type: ignore[assignment]
        super().__init__(path, _Handler, bind_and_activate=False)
        try:
            self.server_bind()
            self.server_activate()
        except OSError as exc:
            self.server_close()
            self._remove_created()
            raise UsageError(f"--api-socket {_one_line(path)}: cannot listen there: {_os_reason(exc)}") from None

    def server_bind(self) -> None:
        """Bind with mode 0600: ``bind`` gives the file the socket's own mode less the umask."""
        os.fchmod(self.socket.fileno(), SOCKET_MODE)
        super().server_bind()
        assert self.path is not None
        created = os.stat(self.path)
        self._created = (created.st_dev, created.st_ino)
        if stat.S_IMODE(created.st_mode) & ~SOCKET_MODE:
            # A kernel that ignored the fchmod: not listening yet, so nobody could have connected meanwhile.
            os.chmod(self.path, SOCKET_MODE)

    def process_request(self, request: Any, client_address: Any) -> None:
        """One named thread per connection, up to ``max_connections``; beyond, 429 at once and no thread."""
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
        """Answer 429 without blocking the accepting thread, and close."""
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
        log.info("API listening on %s", self.description)

    def stop(self) -> None:
        """Stop serving (``shutdown`` unblocks ``serve_forever``) and remove the socket file if this server made it.

        A socket file that is no longer the one created here (replaced since)
        and an inherited socket's path are left alone.
        """
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.server_close()
        self._remove_created()

    def _remove_created(self) -> None:
        """Unlink the socket file this server bound, if it is still that very file."""
        if self._created is None or self.path is None:
            return
        try:
            now = os.lstat(self.path)
            if (now.st_dev, now.st_ino) == self._created:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("API: cannot remove the socket %s: %s", self.path, _os_reason(exc))
        self._created = None

    def routes(self) -> dict[tuple[str, str], Callable[[Any], Any]]:
        """``(method, action)`` → the handler of the request's decoded body; its result is the answer."""
        vmm = self.vmm

        def shutdown_vmm(body: Any) -> _Status:
            vmm.shutdown_vmm()
            return EMPTY_200

        return {
            ("GET", "vmm.ping"): lambda body: vmm.ping(),
            ("PUT", "vmm.shutdown"): shutdown_vmm,
            ("GET", "vm.info"): lambda body: vmm.info(),
            ("PUT", "vm.boot"): lambda body: vmm.boot_created(),
            ("PUT", "vm.delete"): lambda body: vmm.delete(),
            ("PUT", "vm.pause"): lambda body: vmm.pause(),
            ("PUT", "vm.resume"): lambda body: vmm.resume(),
            ("PUT", "vm.shutdown"): lambda body: vmm.shutdown_vm(),
            ("PUT", "vm.send-migration"): lambda body: _send_migration(vmm, body),
            ("PUT", "vm.receive-migration"): lambda body: _receive_migration(vmm, body),
            ("PUT", "vm.cancel-migration"): lambda body: vmm.cancel_migration(),
            ("PUT", "vm.migration-start-postcopy"): lambda body: vmm.start_postcopy(),
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


def _closed_fds(ancillary: list[tuple[int, int, bytes]]) -> int:
    """Close the file descriptors that came as SCM_RIGHTS; return how many (chmig's API takes none)."""
    count = 0
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
                count += 1
    return count


#: Room for the most descriptors one SCM_RIGHTS message may carry (the kernel's SCM_MAX_FD).
_ANCILLARY_SPACE = socket.CMSG_SPACE(253 * array.array("i").itemsize)


class _DeadlineReader(io.RawIOBase):
    """The request socket as a raw stream whose reads all end by one deadline.

    A socket timeout alone bounds each read, so a client trickling a byte at a
    time could hold its thread forever; here each read may only wait for what
    is left of the request's time.  File descriptors sent along (``ch-remote``
    passes some with ``SCM_RIGHTS`` for a few verbs) are closed at once and
    counted in :attr:`fds_received`, so none leaks and the request is refused.
    """

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self._sock = sock
        self.deadline: float | None = None
        self.fds_received = 0
        #: Bytes of the current request received so far, and whether its deadline passed (see handle_one_request).
        self.received = 0
        self.timed_out = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.timed_out = True
                raise TimeoutError("the request did not arrive in time")
            self._sock.settimeout(left)
        try:
            count, ancillary, _flags, _address = self._sock.recvmsg_into([buffer], _ANCILLARY_SPACE,
                                                                          socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            self.timed_out = True
            raise
        if ancillary:
            self.fds_received += _closed_fds(ancillary)
        self.received += count
        return count


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
        self._answered = False

    def handle_one_request(self) -> None:
        # The deadline starts when the request is awaited, so an idle keep-alive connection ends too.
        self._reader.deadline = time.monotonic() + self.server.request_timeout
        self._reader.fds_received = 0
        self._reader.received = 0
        self._reader.timed_out = False
        self._body_read = False
        self._answered = False
        super().handle_one_request()
        if self._reader.timed_out and self._reader.received and not self._answered:
            # Part of a request line or headers came, the rest not in time (the stdlib would just close): a
            # body's timeout is answered 408 by the route; this is the same answer for the start of a request.
            self.close_connection = True
            self._write(answer_bytes(408, error_body([
                REASONS[408], f"the request did not arrive whole within {self.server.request_timeout:g} s"]),
                close=True))

    def __getattr__(self, name: str) -> Any:
        # Every method gets a JSON answer: the stdlib looks for do_<METHOD>, so any method has one (400, or the
        # route's answer); only names of that form are made up here.
        if name.startswith("do_") and len(name) > 3:
            return lambda: self._dispatch(name[3:])
        raise AttributeError(name)

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

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue``: micro_http's interim answer, without a reason phrase either."""
        self._write(answer_bytes(100, None))
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (request line, headers, version) as a JSON array, closing the connection.

        Cloud Hypervisor's micro_http answers every malformed request 400; the
        stdlib's more precise 414, 431 and 505 are kept (``api_client`` reads any
        status it does not know as a failure, and the body says the same).
        """
        self.log_error("code %d, message %s", code, message)
        if code == 501:  # "Unsupported method": cannot happen (see __getattr__), but never a 501 for a method
            code = 400
        reason = message or self.responses.get(code, ("error",))[0]
        self._reply(code, [REASONS.get(code, "Bad Request"), reason], close=True)

    def _read_body(self) -> bytes:
        """The body by its Content-Length, within the request's deadline; refused before any read if invalid."""
        if "Transfer-Encoding" in self.headers:
            coding = _one_line(self.headers["Transfer-Encoding"], limit=40)
            raise HttpError(400, REASONS[400], f"chunked bodies are not supported (Transfer-Encoding: {coding}): "
                                               "send a Content-Length")
        lengths = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        if not lengths:
            self._body_read = True
            return b""
        if len(lengths) > 1:
            raise HttpError(400, REASONS[400], "conflicting Content-Length headers")
        text = lengths.pop()
        # Only digits: int() would also take "-1", "+5", "1_0" and " 7 ", and -1 means "read to EOF".
        if not (text.isascii() and text.isdigit()):
            raise HttpError(400, REASONS[400], f"invalid Content-Length {_one_line(text, 40)!r}: "
                                               "expected a number of bytes")
        if len(text) > 9 or int(text) > MAX_BODY:
            raise HttpError(400, REASONS[400], f"request body too large (Content-Length {text[:20]}, "
                                               f"at most {MAX_BODY})")
        length = int(text)
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raise HttpError(408, REASONS[408], f"the request body timed out: not received within "
                                               f"{self.server.request_timeout:g} s") from None
        if len(raw) < length:
            raise HttpError(400, REASONS[400], f"the request body ended after {len(raw)} of {length} bytes")
        self._body_read = True
        return raw

    def _route(self, method: str, raw: bytes) -> tuple[str, Callable[[Any], Any]]:
        """The action and handler of this request, or the HttpError that answers it (404, 400, 501)."""
        path = self.path.partition("?")[0]
        if not path.startswith(API_PREFIX):
            raise HttpError(404, REASONS[404], f"unknown path {_one_line(self.path, 100)}: the API is under "
                                               f"{API_PREFIX}")
        action = path[len(API_PREFIX):]
        routes = self.server.routes()
        handler = routes.get((method, action))
        if handler is None:
            methods = sorted(m for m, a in routes if a == action)
            if methods:
                raise HttpError(400, REASONS[400], f"{action} takes {' or '.join(methods)}, not "
                                                   f"{_one_line(method, 20)}")
            if action in UNIMPLEMENTED:
                raise HttpError(501, REASONS[501], f"chmig does not implement {action}")
            raise HttpError(404, REASONS[404], f"unknown endpoint {_one_line(action, 100)}")
        if self._reader.fds_received:
            raise HttpError(400, REASONS[400], f"chmig's API takes no file descriptors: "
                                               f"{self._reader.fds_received} came with this request and were closed")
        if action in BODY_ROUTES and not raw:
            raise HttpError(400, REASONS[400], f"{action} needs a JSON body")
        if action not in BODY_ROUTES and raw:
            raise HttpError(400, REASONS[400], f"{action} takes no request body")
        return action, handler

    def _dispatch(self, method: str) -> None:
        action = ""
        try:
            raw = self._read_body()
            action, handler = self._route(method, raw)
            result = handler(decode_body(raw) if action in BODY_ROUTES else None)
        except ApiError as exc:
            self._reply(exc.status, exc.messages if len(exc.messages) > 1
                        else [REASONS.get(exc.status, REASONS[400]), exc.message])
        except ChmigError as exc:
            self._reply(_status_of(exc), [FROM_API, _failure(action), str(exc)])
        except Exception as exc:  # a bug behind the route: the API must answer, and the log says where
            log.error("API %s %s failed: %s", _one_line(method, 20), _one_line(self.path, 100), _describe(exc))
            self._reply(500, [FROM_API, _failure(action), f"internal error: {_one_line(repr(exc))}"])
        else:
            if isinstance(result, _Status):
                self._reply(result.status, None)
            else:
                self._reply(200 if result is not None else 204, result)
        finally:
            # Only the request that asked for the exit ends the process, once its own answer is out.
            if self.server.vmm.exit_after_reply == threading.get_ident():
                self.server.vmm.exit_event.set()

    def _reply(self, status: int, body: Any, close: bool = False) -> None:
        """Answer ``body`` (JSON; for an error, the array of messages); close if the request was not read whole."""
        if status >= 400:
            data = error_body(body)
        else:
            data = b"" if body is None else encode_json(body)
        close = close or not self._body_read or self.close_connection or self.command == "HEAD"
        if close:
            self.close_connection = True
        self._answered = True
        self._write(answer_bytes(status, data, close=close))
        self.log_request(status, len(data))

    def _write(self, data: bytes) -> None:
        # The request's deadline no longer applies: the answer gets a timeout of its own.
        self.connection.settimeout(self.server.request_timeout)
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError as exc:  # the client went away: nothing left to tell it
            log.debug("API reply to a client that left: %s", exc)
            self.close_connection = True


def _status_of(exc: ChmigError) -> int:
    """Cloud Hypervisor's ``api_error_status_code``, for chmig's errors: no VM 404, bad input 400, else 500."""
    if isinstance(exc, NoVmError):
        return 404
    if isinstance(exc, UsageError):
        return 400
    return 500


def _failure(action: str) -> str:
    """What failed, as the second message of an action's error (Cloud Hypervisor's ``ApiError`` text)."""
    return ROUTE_FAILURES.get(action, f"{action or 'the request'} failed")
