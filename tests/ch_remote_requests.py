"""The request bytes Cloud Hypervisor's ``ch-remote`` sends, verb by verb, written out from its source.

Every request is what ``api_client::simple_api_full_command_with_fds_and_response``
(``api_client/src/lib.rs``) writes, as the separate writes it makes:

1. ``"{method} /api/v1/{command} HTTP/1.1\\r\\nHost: localhost\\r\\nAccept: */*\\r\\n"`` with
   ``send_with_fds`` (a ``sendmsg``; ``SCM_RIGHTS`` only when the verb has fds to pass);
2. ``"Content-Length: {len}\\r\\n"``, only when there is a body;
3. ``"\\r\\n"``;
4. the body, only when there is one.

No ``Content-Type``, ever.  The bodies are ``serde_json::to_string`` of the
struct ``ch-remote`` builds from its argument (``cloud-hypervisor/src/bin/ch-remote.rs``):
compact, every field in declaration order, ``Option::None`` as ``null``, enums
by variant name.  A body that needs a port, a path or a directory has a
placeholder (``{PORT}``, ``{PATH}``, ``{DIR}``); the ``{LEN}`` of the
Content-Length write is the only computed piece, the rendered body's byte
length, as ``api_client`` computes it (``request_body.len()``).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Written by api_client before anything else of every request (``send_with_fds``), after the request line.
_HEADERS = b"Host: localhost\r\nAccept: */*\r\n"


@dataclass(frozen=True)
class Recorded:
    """One ``ch-remote`` invocation: its command line, the writes it makes, and where in CH they come from."""

    #: ``ch-remote --api-socket S <argv...>``
    argv: tuple[str, ...]
    #: The writes, in order, each as one ``write``/``sendmsg``; may hold placeholders.
    writes: tuple[bytes, ...]
    #: The Cloud Hypervisor code that produces them.
    source: str

    @property
    def verb(self) -> str:
        return self.argv[0]

    @property
    def body(self) -> bytes | None:
        """The body template (the fourth write), or None for a request without one."""
        return self.writes[3] if len(self.writes) == 4 else None

    def render(self, **values: object) -> list[bytes]:
        """The writes with ``{PORT}``, ``{PATH}``, ``{DIR}`` filled in and ``{LEN}`` computed from the body."""
        writes = list(self.writes)
        if len(writes) == 4:
            body = writes[3]
            for key, value in values.items():
                body = body.replace(b"{" + key.encode() + b"}", str(value).encode())
            assert not any(p in body for p in (b"{PORT}", b"{PATH}", b"{DIR}")), (body, values)
            writes[3] = body
            writes[1] = writes[1].replace(b"{LEN}", str(len(body)).encode())
        return writes


def _request(method: str, command: str) -> bytes:
    """The first write of every request (``api_client``: ``format!("{method} /api/v1/{full_command} HTTP/1.1\\r\\n
    Host: localhost\\r\\nAccept: */*\\r\\n")``)."""
    return f"{method} /api/v1/{command} HTTP/1.1\r\n".encode() + _HEADERS


def _no_body(argv: tuple[str, ...], method: str, command: str, source: str) -> Recorded:
    """``simple_api_command(socket, METHOD, c, None)``: the request line and headers, then the blank line."""
    return Recorded(argv, (_request(method, command), b"\r\n"), source)


def _with_body(argv: tuple[str, ...], method: str, command: str, body: bytes, source: str) -> Recorded:
    """``simple_api_command(socket, METHOD, c, Some(body))``: request line, Content-Length, blank line, body."""
    return Recorded(argv, (_request(method, command), b"Content-Length: {LEN}\r\n", b"\r\n", body), source)


# ---------------------------------------------------------------------------------------------
# Verbs chmig implements
# ---------------------------------------------------------------------------------------------

PING = _no_body(("ping",), "GET", "vmm.ping",
                'ch-remote.rs rest_api_do_command: Some("ping") => simple_api_full_command(socket, "GET", '
                '"vmm.ping", None)')
INFO = _no_body(("info",), "GET", "vm.info",
                'ch-remote.rs: Some("info") => simple_api_command(socket, "GET", "info", None) (api_client '
                'prefixes "vm.")')
PAUSE = _no_body(("pause",), "PUT", "vm.pause", 'ch-remote.rs: Some("pause") => simple_api_command(socket, "PUT", '
                 '"pause", None)')
RESUME = _no_body(("resume",), "PUT", "vm.resume", 'ch-remote.rs: Some("resume") => simple_api_command(socket, '
                  '"PUT", "resume", None)')
SHUTDOWN = _no_body(("shutdown",), "PUT", "vm.shutdown", 'ch-remote.rs: Some("shutdown") => '
                    'simple_api_command(socket, "PUT", "shutdown", None)')
BOOT = _no_body(("boot",), "PUT", "vm.boot", 'ch-remote.rs: Some("boot") => simple_api_command(socket, "PUT", '
                '"boot", None)')
DELETE = _no_body(("delete",), "PUT", "vm.delete", 'ch-remote.rs: Some("delete") => simple_api_command(socket, '
                  '"PUT", "delete", None)')
SHUTDOWN_VMM = _no_body(("shutdown-vmm",), "PUT", "vmm.shutdown",
                        'ch-remote.rs: Some("shutdown-vmm") => simple_api_full_command(socket, "PUT", '
                        '"vmm.shutdown", None)')

#: VmSendMigrationData (vmm/src/api/mod.rs) fields in declaration order: destination_url, local, preserve_source,
#: downtime_ms (default 300), timeout_s (default 3600), timeout_strategy (TimeoutStrategy::Cancel), connections
#: (default 1), tls_dir (Option<PathBuf>), memory_mode (MigrationMode::Precopy).
_SEND_SOURCE = ('ch-remote.rs send_migration_data: VmSendMigrationData::parse(config) then serde_json::to_string; '
                'sent by simple_api_command(socket, "PUT", "send-migration", Some(..))')
SEND_MIGRATION_TCP = _with_body(
    ("send-migration", "destination_url=tcp:127.0.0.1:{PORT}"), "PUT", "vm.send-migration",
    b'{"destination_url":"tcp:127.0.0.1:{PORT}","local":false,"preserve_source":false,"downtime_ms":300,'
    b'"timeout_s":3600,"timeout_strategy":"Cancel","connections":1,"tls_dir":null,"memory_mode":"Precopy"}',
    _SEND_SOURCE)
SEND_MIGRATION_TCP_4 = _with_body(
    ("send-migration", "destination_url=tcp:127.0.0.1:{PORT},connections=4,downtime_ms=500,timeout_strategy=ignore"),
    "PUT", "vm.send-migration",
    b'{"destination_url":"tcp:127.0.0.1:{PORT}","local":false,"preserve_source":false,"downtime_ms":500,'
    b'"timeout_s":3600,"timeout_strategy":"Ignore","connections":4,"tls_dir":null,"memory_mode":"Precopy"}',
    _SEND_SOURCE)
SEND_MIGRATION_UNIX_LOCAL = _with_body(
    ("send-migration", "destination_url=unix:{PATH},local=on"), "PUT", "vm.send-migration",
    b'{"destination_url":"unix:{PATH}","local":true,"preserve_source":false,"downtime_ms":300,'
    b'"timeout_s":3600,"timeout_strategy":"Cancel","connections":1,"tls_dir":null,"memory_mode":"Precopy"}',
    _SEND_SOURCE)
SEND_MIGRATION_POSTCOPY = _with_body(
    ("send-migration", "destination_url=tcp:127.0.0.1:{PORT},memory_mode=postcopy"), "PUT", "vm.send-migration",
    b'{"destination_url":"tcp:127.0.0.1:{PORT}","local":false,"preserve_source":false,"downtime_ms":300,'
    b'"timeout_s":3600,"timeout_strategy":"Cancel","connections":1,"tls_dir":null,"memory_mode":"Postcopy"}',
    _SEND_SOURCE)

#: VmReceiveMigrationData fields in declaration order: receiver_url, tls_dir, memory_mode, vfio_fds
#: (Option<Vec<RestoredVfioConfig>>), iommufd_fd (Option<i32>, taken out by ch-remote), zone_updates (Vec).
_RECEIVE_SOURCE = ('ch-remote.rs receive_migration_data: VmReceiveMigrationData::parse(config), fds taken out, '
                   'serde_json::to_string; sent by simple_api_command_with_fds(socket, "PUT", "receive-migration", '
                   'Some(..), &fds) with no fds')
RECEIVE_MIGRATION_TCP = _with_body(
    ("receive-migration", "receiver_url=tcp:127.0.0.1:{PORT}"), "PUT", "vm.receive-migration",
    b'{"receiver_url":"tcp:127.0.0.1:{PORT}","tls_dir":null,"memory_mode":"Precopy","vfio_fds":null,'
    b'"iommufd_fd":null,"zone_updates":[]}',
    _RECEIVE_SOURCE)
RECEIVE_MIGRATION_UNIX = _with_body(
    ("receive-migration", "receiver_url=unix:{PATH}"), "PUT", "vm.receive-migration",
    b'{"receiver_url":"unix:{PATH}","tls_dir":null,"memory_mode":"Precopy","vfio_fds":null,'
    b'"iommufd_fd":null,"zone_updates":[]}',
    _RECEIVE_SOURCE)
RECEIVE_MIGRATION_POSTCOPY = _with_body(
    ("receive-migration", "receiver_url=tcp:127.0.0.1:{PORT},memory_mode=postcopy"), "PUT", "vm.receive-migration",
    b'{"receiver_url":"tcp:127.0.0.1:{PORT}","tls_dir":null,"memory_mode":"Postcopy","vfio_fds":null,'
    b'"iommufd_fd":null,"zone_updates":[]}',
    _RECEIVE_SOURCE)

SNAPSHOT = _with_body(
    ("snapshot", "file://{DIR}"), "PUT", "vm.snapshot", b'{"destination_url":"file://{DIR}"}',
    'ch-remote.rs snapshot_config: api::VmSnapshotConfig { destination_url } then serde_json::to_string; '
    'simple_api_command(socket, "PUT", "snapshot", Some(..))')

#: RestoreConfig (vmm/src/config.rs) fields in declaration order: source_url (PathBuf), prefault, memory_restore_mode
#: (MemoryRestoreMode::Copy | OnDemand), net_fds, vfio_fds, iommufd_fd (Options: null), resume, zone_updates.
_RESTORE_SOURCE = ('ch-remote.rs restore_config: RestoreConfig::parse(config), fds taken out, '
                   'serde_json::to_string; simple_api_command_with_fds(socket, "PUT", "restore", Some(..), &fds) '
                   'with no fds')
RESTORE = _with_body(
    ("restore", "source_url=file://{DIR}"), "PUT", "vm.restore",
    b'{"source_url":"file://{DIR}","prefault":false,"memory_restore_mode":"Copy","net_fds":null,"vfio_fds":null,'
    b'"iommufd_fd":null,"resume":false,"zone_updates":[]}',
    _RESTORE_SOURCE)
RESTORE_RESUME_ONDEMAND = _with_body(
    ("restore", "source_url=file://{DIR},resume=true,memory_restore_mode=ondemand"), "PUT", "vm.restore",
    b'{"source_url":"file://{DIR}","prefault":false,"memory_restore_mode":"OnDemand","net_fds":null,'
    b'"vfio_fds":null,"iommufd_fd":null,"resume":true,"zone_updates":[]}',
    _RESTORE_SOURCE)

SUPPORTED: tuple[Recorded, ...] = (
    PING, INFO, PAUSE, RESUME, SHUTDOWN, BOOT, DELETE, SHUTDOWN_VMM,
    SEND_MIGRATION_TCP, SEND_MIGRATION_TCP_4, SEND_MIGRATION_UNIX_LOCAL, SEND_MIGRATION_POSTCOPY,
    RECEIVE_MIGRATION_TCP, RECEIVE_MIGRATION_UNIX, RECEIVE_MIGRATION_POSTCOPY,
    SNAPSHOT, RESTORE, RESTORE_RESUME_ONDEMAND,
)

# ---------------------------------------------------------------------------------------------
# Verbs chmig does not implement (answered 501)
# ---------------------------------------------------------------------------------------------

COUNTERS = _no_body(("counters",), "GET", "vm.counters",
                    'ch-remote.rs: Some("counters") => simple_api_command(socket, "GET", "counters", None)')
REBOOT = _no_body(("reboot",), "PUT", "vm.reboot",
                  'ch-remote.rs: Some("reboot") => simple_api_command(socket, "PUT", "reboot", None)')
POWER_BUTTON = _no_body(("power-button",), "PUT", "vm.power-button",
                        'ch-remote.rs: Some("power-button") => simple_api_command(socket, "PUT", "power-button", None)')
NMI = _no_body(("nmi",), "PUT", "vm.nmi", 'ch-remote.rs: Some("nmi") => simple_api_command(socket, "PUT", "nmi", None)')
RESIZE = _with_body(
    ("resize", "--cpus", "2"), "PUT", "vm.resize",
    b'{"desired_vcpus":2,"desired_ram":null,"desired_balloon":null}',
    'ch-remote.rs resize_config: api::VmResizeData { desired_vcpus, desired_ram, desired_balloon } (Options) '
    'then serde_json::to_string')
RESIZE_ZONE = _with_body(
    ("resize-zone", "--id", "mem0", "--size", "1G"), "PUT", "vm.resize-zone",
    b'{"id":"mem0","desired_ram":1073741824}',
    'ch-remote.rs resize_zone_config: api::VmResizeZoneData { id, desired_ram: ByteSized } then '
    'serde_json::to_string')
REMOVE_DEVICE = _with_body(
    ("remove-device", "dev0"), "PUT", "vm.remove-device", b'{"id":"dev0"}',
    'ch-remote.rs remove_device_config: api::VmRemoveDeviceData { id } then serde_json::to_string')
COREDUMP = _with_body(
    ("coredump", "file:///tmp/chmig-coredump"), "PUT", "vm.coredump",
    b'{"destination_url":"file:///tmp/chmig-coredump"}',
    'ch-remote.rs coredump_config: api::VmCoredumpData { destination_url } then serde_json::to_string')

UNSUPPORTED: tuple[Recorded, ...] = (COUNTERS, REBOOT, POWER_BUTTON, NMI, RESIZE, RESIZE_ZONE, REMOVE_DEVICE, COREDUMP)
