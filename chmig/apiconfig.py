"""Cloud Hypervisor's API request structs: parsed from ``ch-remote``'s option strings, checked, serialized.

``ch-remote send-migration destination_url=...`` parses its argument with
``OptionParser`` (:mod:`chmig.options`), validates the result, and sends the
struct serialized by serde: every field in declaration order with its default,
an ``Option`` that is ``None`` as ``null``, enums by variant name.  The VMM
deserializes that JSON and validates it again.  This module is both ends for
chmig, so ``chmig remote`` sends the bytes ``ch-remote`` sends and the API
accepts what ``ch-remote`` sends:

==================  ======================================  ====================================
struct (CH)         option string → JSON body               JSON body → chmig
==================  ======================================  ====================================
VmSendMigration     :func:`send_migration_body`             :meth:`SendOptions.from_api`
VmReceiveMigration  :func:`receive_migration_body`          :meth:`ReceiveOptions.from_api`
RestoreConfig       :func:`restore_body`                    ``RestoreConfig.from_api`` (snapshot.py)
VmSnapshotConfig    :func:`snapshot_body` (the URL itself)  :func:`snapshot_from_api`
==================  ======================================  ====================================

Read from cloud-hypervisor at commit ae44c297: ``vmm/src/api/mod.rs``
(``VmSendMigrationData``, ``VmReceiveMigrationData``: fields, serde defaults,
``SYNTAX``, ``parse``, ``validate``), ``vmm/src/config.rs`` (``RestoreConfig``),
``cloud-hypervisor/src/bin/ch-remote.rs`` (what is sent).

The option strings follow CH's rules exactly: ``local=`` is off (an empty
value is "not given"), a bare ``local`` is an invalid-syntax error, ``on``/
``off``/``true``/``false`` in any case, enums (``timeout_strategy``,
``memory_mode``) in any case.  The validation rules and their messages are
CH's, in CH's order: TLS over a UNIX socket refused; ``connections`` > 1 only
over TCP and at most 128 (``MAX_MIGRATION_CONNECTIONS``); ``local`` only over
a UNIX socket; ``preserve_source`` only with ``local``; postcopy neither with
``local`` nor with ``connections`` > 1; a ``tls_dir`` must hold the files of
its end.  ``receive-migration``'s SYNTAX advertises a bare ``<receiver_url>``,
but CH's parser refuses one (the URL is taken as an unknown key); chmig does
what the code does and refuses it too, with a hint to write
``receiver_url=URL``.

Where chmig differs, deliberately:

* chmig's extensions: ``fault_connections=N`` on send (1..16 Fault connections
  for postcopy or hybrid), ``prefetch=SIZE|page|off`` on receive (postcopy's
  background pull), and ``memory_mode=hybrid[,postcopy_after_s=S]`` on send
  (precopy that switches to postcopy when it does not converge by
  ``timeout_s`` or ``postcopy_after_s``, whichever comes first, or when asked;
  it never cancels for ``timeout_strategy=cancel``: switching is its way out).
  Each is accepted only with the memory mode it is for and appears in a body
  only when given, so a body without them is byte for byte CH's.  ``trace`` on both (an absolute path: the VMM writes every message
  of the migration there, :mod:`chmig.trace`) is a JSON field only, set by
  ``chmig remote ... --trace FILE``, never an option-string key; it too
  appears in a body only when given.
* CH fields chmig cannot use (``vfio_fds``, ``iommufd_fd``, ``zone_updates``;
  ``net_fds`` on restore) are refused by name in option strings; in JSON they
  are accepted when null or empty — as ``ch-remote`` always sends them — and
  refused with the reason otherwise.
* The JSON side is stricter than serde in one way and more lenient in one:
  an unknown field is refused with the list of known ones (serde would
  silently drop it, hiding a typo), and an enum may also be written in lower
  case (``"postcopy"`` as well as CH's ``"Postcopy"``).
* URLs are checked by chmig's :func:`~chmig.transport.parse_url`, which says
  precisely what is wrong (and refuses a few things CH accepts only to fail
  later, such as an IPv6 address in brackets that is not one).

Every error is a :class:`~chmig.errors.UsageError`: an
:class:`~chmig.options.OptionError` for option strings, a
:class:`JsonBodyError` for a body serde could not have deserialized (wrong
type, unknown or missing field, unknown enum variant, zero for a ``NonZero``),
a plain :class:`~chmig.errors.UsageError` for a validation rule.  The CLI
prints it as one line and exits 2, the API answers it 400.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import protocol as p
from .errors import TransportError, UsageError
from .options import U32_MAX, U64_MAX, OptionError, OptionParser
from .transport import TlsConfig, Url, parse_url

if TYPE_CHECKING:
    from .postcopy import Prefetch

__all__ = [
    "JSON_TYPE_NAMES",
    "JsonBodyError",
    "NULLABLE_FIELDS",
    "RECEIVE_MIGRATION_FIELDS",
    "RECEIVE_MIGRATION_SYNTAX",
    "RESTORE_FIELDS",
    "RESTORE_SYNTAX",
    "ReceiveOptions",
    "SEND_MIGRATION_FIELDS",
    "SEND_MIGRATION_SYNTAX",
    "SNAPSHOT_FIELDS",
    "SNAPSHOT_SYNTAX",
    "SendOptions",
    "U32_MAX",
    "check_fields",
    "enum_variant",
    "receive_migration_body",
    "restore_body",
    "send_migration_body",
    "snapshot_body",
    "snapshot_from_api",
]

# ---------------------------------------------------------------------------------------------
# SYNTAX strings: Cloud Hypervisor's text first, verbatim; then what chmig adds or refuses
# ---------------------------------------------------------------------------------------------

#: ``VmSendMigrationData::SYNTAX``, then chmig's extension key.
SEND_MIGRATION_SYNTAX = (
    'VM send migration parameters "destination_url=<url>[,local=on|off,preserve_source=on|off,'
    "downtime_ms=<milliseconds>,timeout_s=<seconds>,timeout_strategy=cancel|ignore,connections=<amount>,"
    'tls_dir=<path>,memory_mode=precopy|postcopy]"'
    ' (chmig extensions: "[,fault_connections=<amount>]", 1-16 Fault connections with memory_mode=postcopy or'
    ' hybrid; "memory_mode=hybrid[,postcopy_after_s=<seconds>]", precopy that switches to postcopy when it does not'
    " converge by timeout_s or postcopy_after_s, or when asked: migration-start-postcopy;"
    ' "postcopy_recovery_s=<seconds>", how long a postcopy or hybrid source reconnects when a Fault connection'
    " breaks: 60 for hybrid, off (0) for postcopy unless given)"
)
#: ``VmReceiveMigrationData::SYNTAX``, then chmig's extension key and the keys it refuses.  The bare
#: ``<receiver_url>`` form is in CH's text but refused by CH's parser, and so by chmig's.
RECEIVE_MIGRATION_SYNTAX = (
    'VM receive migration parameters "<receiver_url>" or "receiver_url=<url>[,tls_dir=<path>]'
    "[,memory_mode=precopy|postcopy][,vfio_fds=<list_of_vfio_ids_with_their_associated_fd>][,iommufd_fd=<fd>]"
    '[,zone_updates=[<id@host_numa_node>]]"'
    ' (chmig extensions: "[,prefetch=<size>|page|off]", the background pull with memory_mode=postcopy;'
    ' "[,postcopy_recovery_s=<seconds>]", how long a postcopy destination waits for its source to reconnect'
    " (default 60, 0: off);"
    " chmig refuses vfio_fds, iommufd_fd and zone_updates, and needs receiver_url=<url>)"
)
#: ``RestoreConfig::SYNTAX`` (line breaks and all), then the keys chmig refuses.
RESTORE_SYNTAX = (
    "Restore from a VM snapshot. \n"
    'Restore parameters "source_url=<source_url>,prefault=on|off,memory_restore_mode=copy|ondemand,'
    "net_fds=<list_of_net_ids_with_their_associated_fds>,vfio_fds=<list_of_vfio_ids_with_their_associated_fd>,"
    'iommufd_fd=<fd>,resume=true|false,zone_updates=<list_of_updates>"\n'
    "        \n"
    "`source_url` should be a valid URL (e.g file:///foo/bar or tcp://192.168.1.10/foo) \n"
    "`prefault` controls eager prefaulting for the copy-based restore path (disabled by default) \n"
    "`memory_restore_mode=copy` preserves the existing eager read-copy restore behavior, while "
    "`memory_restore_mode=ondemand` enables lazy demand paging and fails restore if userfaultfd support is "
    "unavailable \n"
    "`net_fds` is a list of net ids with new file descriptors. Only net devices backed by FDs directly are "
    "needed as input.\n"
    "`vfio_fds` is a list of VFIO device ids each paired with a new cdev file descriptor, e.g. "
    "vfio_fds=[vfio0@5,vfio1@6]. Use this to restore a VFIO device onto a different sysfs path or host. "
    "Requires `iommufd_fd`.\n"
    "`iommufd_fd` is a new iommufd file descriptor for the restored VM. The one saved in the snapshot does not "
    "survive serialization.\n"
    " `resume` controls whether the VM will be directly resumed after restore \n"
    " `zone_updates` can be used to update NUMA memory zones. Expects a list of elements in the form "
    "`id@host_numa_node`"
    "\n(chmig: source_url must be file:///DIR; net_fds, vfio_fds, iommufd_fd and zone_updates are refused: "
    "a chmig VM has no network or VFIO devices and no NUMA placement)"
)
#: ch-remote's help for ``snapshot``'s one argument.
SNAPSHOT_SYNTAX = "<destination_url>"

# ---------------------------------------------------------------------------------------------
# JSON bodies: the type checker every body route uses
# ---------------------------------------------------------------------------------------------

class JsonBodyError(UsageError):
    """A body that is not the JSON its route takes: what serde would fail to deserialize in Cloud Hypervisor.

    A :class:`UsageError` (400) like every bad request; its own class so the
    API can answer it as CH answers a body it cannot deserialize.
    """


JSON_TYPE_NAMES: dict[type, str] = {
    dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
    bool: "a boolean", type(None): "null",
}

#: ``VmSendMigrationData`` as JSON, in CH's declaration order, plus chmig's ``fault_connections`` and ``trace``.
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
    "postcopy_after_s": int,
    "postcopy_recovery_s": int,
    "trace": str,
}
#: ``VmReceiveMigrationData`` as JSON, in CH's declaration order, plus chmig's ``prefetch`` and ``trace``.
RECEIVE_MIGRATION_FIELDS: dict[str, type] = {
    "receiver_url": str,
    "tls_dir": str,
    "memory_mode": str,
    "vfio_fds": list,
    "iommufd_fd": int,
    "zone_updates": list,
    "prefetch": str,
    "postcopy_recovery_s": int,
    "trace": str,
}
#: ``RestoreConfig`` as JSON, in CH's declaration order.
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
#: ``VmSnapshotConfig`` as JSON.
SNAPSHOT_FIELDS: dict[str, type] = {"destination_url": str}
#: Fields whose null means "not given": CH's ``Option`` fields, chmig's ``prefetch``, and the fields chmig
#: cannot use (``zone_updates`` is a plain list in CH; null is chmig's leniency).
NULLABLE_FIELDS = ("tls_dir", "prefetch", "vfio_fds", "iommufd_fd", "zone_updates", "net_fds")

#: The fields chmig cannot use, and why; a body may carry them only null or empty.
_RECEIVE_UNUSABLE = {
    "vfio_fds": "chmig's VMs have no VFIO devices",
    "iommufd_fd": "chmig's VMs have no VFIO devices, so no iommufd",
    "zone_updates": "chmig does not place memory zones on host NUMA nodes",
}


def _show_key(key: str) -> str:
    """A key from a peer, fit for a one-line message: escaped by repr, and short."""
    shown = repr(key)
    return shown if len(shown) <= 80 else shown[:80] + "..."


def check_fields(body: Any, allowed: dict[str, type], *, required: tuple[str, ...] = (),
                 nullable: tuple[str, ...] = (), where: str | None = None) -> dict[str, Any]:
    """Check a JSON request body: an object, no unknown fields, each the right type, the required present.

    ``allowed`` maps each field to its JSON type (``int`` means a u64 and
    never a boolean).  Null is accepted only for ``nullable`` fields, where it
    means "not given".  Unknown fields are refused with the known list (serde
    would drop them silently).  Raises :class:`JsonBodyError`.
    """
    if not isinstance(body, dict):
        raise JsonBodyError(f"the request body must be a JSON object, not {_type_name(body)}", where=where)
    for name in body:
        if name not in allowed:
            raise JsonBodyError(f"unknown field {_show_key(name)} (allowed: {', '.join(allowed)})", where=where)
    for name in required:
        if name not in body:
            raise JsonBodyError(f"missing field {name!r}", where=where)
    for name, value in body.items():
        expected = allowed[name]
        if value is None and name in nullable and name not in required:
            continue
        # JSON true/false are Python bools, which are ints too: never accept them as numbers.
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise JsonBodyError(f"field {name!r} must be {JSON_TYPE_NAMES[expected]}, not {_type_name(value)}",
                                where=where)
        if expected is int and not 0 <= value <= U64_MAX:
            raise JsonBodyError(f"field {name!r} is out of range (0..{U64_MAX})", where=where)
    return body


def _type_name(value: Any) -> str:
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def enum_variant(value: Any, name: str, variants: tuple[str, ...], where: str | None = None) -> str:
    """A serde enum field: CH's variant name (``"Postcopy"``) or all lower case; answers the lower case."""
    if isinstance(value, str):
        for variant in variants:
            if value in (variant, variant.lower()):
                return variant.lower()
    choices = " or ".join(v.lower() for v in variants)
    json_names = " or ".join(f'"{v}"' for v in variants)
    shown = repr(value) if isinstance(value, str) else _type_name(value)
    raise JsonBodyError(f"field {name!r} must be {choices} (Cloud Hypervisor's JSON: {json_names}), not {shown}",
                        where=where)


def _from_str(value: str | None, key: str, choices: tuple[str, ...], what: str) -> str | None:
    """An enum in an option string: CH's ``FromStr`` lower-cases it first, so any case is accepted."""
    if value is None:
        return None
    lowered = value.lower()
    if lowered not in choices:
        raise OptionError(f"{key}={value!r}: expected {' or '.join(choices)}", where=what, key=key)
    return lowered


def _refuse_unusable(body: dict[str, Any], unusable: dict[str, str], where: str | None) -> None:
    """The fields chmig cannot use may be null or empty (as ch-remote sends them); anything else is refused."""
    for name, why in unusable.items():
        if body.get(name) not in (None, []):
            raise UsageError(f"{name}: {why}", where=where)


# ---------------------------------------------------------------------------------------------
# URLs, as CH's validate() checks them
# ---------------------------------------------------------------------------------------------


def _check_url(text: str, key: str, where: str | None) -> Url:
    """``tcp:<host>:<port>`` or ``unix:<path>``; chmig's parser says precisely what is wrong."""
    try:
        return parse_url(text)
    except TransportError as exc:
        raise UsageError(f"{key} {text!r}: {exc.message}", where=where) from None


def _check_tls_dir(tls_dir: str | None, role: str, what: str, where: str | None) -> None:
    """The certificates a ``tls_dir`` must hold for ``role`` are there and readable (CH's ``validate_tls_dir``).

    ``what`` is CH's own wording of the failure (its send and receive say it differently).
    """
    if tls_dir is None:
        return
    try:
        TlsConfig.from_dir(tls_dir, role=role)
    except TransportError as exc:
        raise UsageError(f"{what}: {exc}", where=where) from None


def _check_trace(trace: str | None, where: str | None) -> None:
    """chmig's ``trace`` field: the absolute path of the file the VMM writes the migration's messages to.

    Absolute because the VMM, not its client, opens it (``chmig remote --trace``
    makes a relative FILE absolute before sending it); whether it can be
    written is found when the migration opens it (:class:`chmig.trace.TraceWriter`).
    """
    if trace is None:
        return
    if not trace or "\x00" in trace or not os.path.isabs(trace):
        raise UsageError(f"trace (a chmig extension) must be the absolute path of a file to write, not "
                         f"{_show_key(trace)}", where=where)


def _check_recovery_s(seconds: int, where: str | None) -> None:
    """chmig's ``postcopy_recovery_s``: 0 (off) up to ``max_recovery_s`` (a recovering destination's vCPUs wait
    that long)."""
    most = int(p.DEFAULT_LIMITS.max_recovery_s)
    if not 0 <= seconds <= most:
        raise UsageError(f"postcopy_recovery_s must be 0 (off) to {most} seconds, got {seconds}", where=where)


#: How long a postcopy recovery may take by default, on both sides (QEMU's postcopy-recover has no deadline;
#: a deadline keeps a destination whose source is gone for good from waiting forever).
DEFAULT_POSTCOPY_RECOVERY_S = 60

_CANCEL, _IGNORE = "cancel", "ignore"
_PRECOPY, _POSTCOPY = "precopy", "postcopy"
_TIMEOUT_VARIANTS = ("Cancel", "Ignore")
_MODE_VARIANTS = ("Precopy", "Postcopy")
#: chmig's own memory mode, for a send only: precopy that may switch to postcopy (protocol version 1).
_HYBRID = "hybrid"
_SEND_MODE_VARIANTS = (*_MODE_VARIANTS, "Hybrid")


# ---------------------------------------------------------------------------------------------
# VmSendMigrationData
# ---------------------------------------------------------------------------------------------


@dataclass
class SendOptions:
    """``VmSendMigrationData``: Cloud Hypervisor's field names and defaults, plus ``fault_connections``, ``trace``.

    Enums are held in lower case (``"cancel"``, ``"postcopy"``).  Build one
    from an option string with :meth:`parse`, from a JSON body with
    :meth:`from_api`; both validate.  :meth:`to_api` is serde's JSON.
    """

    destination_url: str
    local: bool = False
    preserve_source: bool = False
    downtime_ms: int = 300
    timeout_s: int = 3600
    timeout_strategy: str = _CANCEL
    connections: int = 1
    tls_dir: str | None = None
    memory_mode: str = _PRECOPY
    #: Postcopy (a chmig extension): Fault connections to open; the destination keeps the first for urgent
    #: faults and pulls over the others.  A Cloud Hypervisor destination uses one and closes the rest.
    fault_connections: int = p.DEFAULT_FAULT_CONNECTIONS
    #: ``memory_mode=hybrid`` (a chmig extension): switch to postcopy once precopy has run this long without
    #: converging (None: only at ``timeout_s``, or when an operator asks).
    postcopy_after_s: int | None = None
    #: Postcopy recovery (a chmig extension, protocol version 1): how long the source keeps reconnecting when
    #: a Fault connection broke.  None: 60 s for hybrid, off for postcopy (which then stays version 0,
    #: Cloud Hypervisor's wire); 0: off.  See :attr:`recovery_s`.
    postcopy_recovery_s: int | None = None
    #: chmig's extension (JSON only, from ``chmig remote send-migration --trace FILE``): the absolute path the
    #: VMM writes every message of this migration to.  None: no trace.
    trace: str | None = None
    #: The chmig extension keys that were given (only those are checked and serialized).
    extensions_given: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def parse(cls, text: str, what: str = "send-migration") -> SendOptions:
        """``VmSendMigrationData::parse``: CH's option string (see :data:`SEND_MIGRATION_SYNTAX`), validated."""
        parser = OptionParser(what).add_all(
            ("destination_url", "local", "preserve_source", "downtime_ms", "timeout_s", "timeout_strategy",
             "connections", "tls_dir", "memory_mode", "fault_connections", "postcopy_after_s",
             "postcopy_recovery_s"))
        parser.parse(text)
        destination_url = parser.get("destination_url")
        if destination_url is None:
            raise OptionError("invalid syntax: destination_url is required", where=what, key="destination_url")
        options = cls(destination_url)
        options.local = parser.toggle("local", False)
        options.preserve_source = parser.toggle("preserve_source", False)
        for key in ("downtime_ms", "timeout_s"):
            value = parser.integer(key)
            if value == 0:
                raise OptionError(f"invalid value: {key} must be non-zero", where=what, key=key)
            if value is not None:
                setattr(options, key, value)
        options.timeout_strategy = _from_str(parser.get("timeout_strategy"), "timeout_strategy",
                                             (_CANCEL, _IGNORE), what) or _CANCEL
        connections = parser.integer("connections", maximum=U32_MAX)
        if connections == 0:
            raise OptionError("invalid value: connections must be non-zero", where=what, key="connections")
        options.connections = connections or 1
        options.tls_dir = parser.string("tls_dir")
        options.memory_mode = _from_str(parser.get("memory_mode"), "memory_mode", (_PRECOPY, _POSTCOPY, _HYBRID),
                                        what) or _PRECOPY
        given = set()
        faults = parser.integer("fault_connections")
        if faults is not None:
            options.fault_connections = faults
            given.add("fault_connections")
        after = parser.integer("postcopy_after_s")
        if after is not None:
            options.postcopy_after_s = after
            given.add("postcopy_after_s")
        recovery = parser.integer("postcopy_recovery_s")
        if recovery is not None:
            options.postcopy_recovery_s = recovery
            given.add("postcopy_recovery_s")
        options.extensions_given = frozenset(given)
        options.validate(what)
        return options

    @classmethod
    def from_api(cls, body: Any, where: str | None = None) -> SendOptions:
        """A ``vm.send-migration`` body as ``ch-remote`` sends it (serde's rules; see the module docstring)."""
        body = check_fields(body, SEND_MIGRATION_FIELDS, required=("destination_url",), nullable=("tls_dir",),
                            where=where)
        for name in ("downtime_ms", "timeout_s", "connections"):
            if body.get(name) == 0:  # serde: NonZeroU64/NonZeroU32
                raise JsonBodyError(f"{name} must be non-zero", where=where)
        if body.get("connections", 1) > U32_MAX:
            raise JsonBodyError(f"field 'connections' is out of range (1..{U32_MAX})", where=where)
        options = cls(body["destination_url"])
        for name in ("local", "preserve_source", "downtime_ms", "timeout_s", "connections", "tls_dir",
                     "fault_connections", "postcopy_after_s", "postcopy_recovery_s", "trace"):
            if body.get(name) is not None:
                setattr(options, name, body[name])
        if "timeout_strategy" in body:
            options.timeout_strategy = enum_variant(body["timeout_strategy"], "timeout_strategy",
                                                    _TIMEOUT_VARIANTS, where)
        if "memory_mode" in body:
            options.memory_mode = enum_variant(body["memory_mode"], "memory_mode", _SEND_MODE_VARIANTS, where)
        options.extensions_given = frozenset(name for name in ("fault_connections", "postcopy_after_s",
                                                               "postcopy_recovery_s") if name in body)
        options.validate(where)
        return options

    def validate(self, where: str | None = "send-migration") -> None:
        """``VmSendMigrationData::validate``, its rules in its order and its words; then chmig's extension."""
        url = _check_url(self.destination_url, "destination_url", where)
        if url.scheme == "unix":
            if self.connections > 1:
                raise UsageError("UNIX sockets and connections option cannot be used at the same time.", where=where)
            if self.tls_dir is not None:
                raise UsageError("UNIX sockets and TLS encryption cannot be used at the same time.", where=where)
        most = p.DEFAULT_LIMITS.max_connections  # CH's MAX_MIGRATION_CONNECTIONS
        if not 1 <= self.connections <= most:
            raise UsageError(f"connections must not exceed {most}." if self.connections else
                             "connections must be non-zero", where=where)
        if self.downtime_ms <= 0 or self.timeout_s <= 0:
            raise UsageError(f"{'downtime_ms' if self.downtime_ms <= 0 else 'timeout_s'} must be non-zero",
                             where=where)
        if self.timeout_strategy not in (_CANCEL, _IGNORE):
            raise UsageError(f"timeout_strategy must be cancel or ignore, got {self.timeout_strategy!r}", where=where)
        if self.memory_mode not in (_PRECOPY, _POSTCOPY, _HYBRID):
            raise UsageError(f"memory_mode must be precopy, postcopy or hybrid, got {self.memory_mode!r}",
                             where=where)
        if self.local:
            if url.scheme != "unix":
                raise UsageError("local option is only supported with UNIX sockets.", where=where)
            if self.connections > 1:  # CH's rule; the UNIX check above already refuses it
                raise UsageError("local option and connections option cannot be used at the same time.",
                                 where=where)
        if self.preserve_source and not self.local:
            raise UsageError("preserve_source option is only supported with the local option.", where=where)
        _check_tls_dir(self.tls_dir, "client", "invalid TLS configuration for send-migration", where)
        if self.memory_mode == _POSTCOPY:
            if self.local:
                raise UsageError("memory_mode=postcopy and local options are mutually exclusive.", where=where)
            if self.connections > 1:
                raise UsageError("memory_mode=postcopy currently requires a single connection (connections=1); "
                                 "chmig: fault_connections=N opens more Fault connections", where=where)
        if self.memory_mode == _HYBRID and self.local:
            raise UsageError("memory_mode=hybrid and local options are mutually exclusive.", where=where)
        most_faults = p.DEFAULT_LIMITS.max_fault_connections
        if not 1 <= self.fault_connections <= most_faults:
            raise UsageError(f"fault_connections must be 1..{most_faults}, got {self.fault_connections}", where=where)
        if "fault_connections" in self.extensions_given and self.memory_mode not in (_POSTCOPY, _HYBRID):
            raise UsageError("fault_connections (a chmig extension) is only for memory_mode=postcopy or hybrid",
                             where=where)
        if self.postcopy_after_s is not None:
            if self.memory_mode != _HYBRID:
                raise UsageError("postcopy_after_s (a chmig extension) is only for memory_mode=hybrid", where=where)
            if self.postcopy_after_s <= 0:
                raise UsageError("postcopy_after_s must be a positive number of seconds", where=where)
        if self.postcopy_recovery_s is not None:
            if self.memory_mode not in (_POSTCOPY, _HYBRID):
                raise UsageError("postcopy_recovery_s (a chmig extension) is only for memory_mode=postcopy or "
                                 "hybrid", where=where)
            _check_recovery_s(self.postcopy_recovery_s, where)
        _check_trace(self.trace, where)

    @property
    def recovery_s(self) -> int:
        """How long the source reconnects after a Fault connection broke (0: it does not; the migration
        then speaks version 0 unless hybrid)."""
        if self.postcopy_recovery_s is not None:
            return self.postcopy_recovery_s
        return DEFAULT_POSTCOPY_RECOVERY_S if self.memory_mode == _HYBRID else 0

    @property
    def protocol_version(self) -> int:
        """Version 0 (Cloud Hypervisor's) unless this migration needs version 1: hybrid (Discard), or postcopy
        that recovers (the token)."""
        return 1 if self.memory_mode == _HYBRID or self.recovery_s else p.PROTOCOL_VERSION

    def to_api(self) -> dict[str, Any]:
        """serde's JSON of ``VmSendMigrationData``: every field in order; ``fault_connections`` and ``trace``
        only if given."""
        body: dict[str, Any] = {
            "destination_url": self.destination_url,
            "local": self.local,
            "preserve_source": self.preserve_source,
            "downtime_ms": self.downtime_ms,
            "timeout_s": self.timeout_s,
            "timeout_strategy": self.timeout_strategy.capitalize(),
            "connections": self.connections,
            "tls_dir": self.tls_dir,
            "memory_mode": self.memory_mode.capitalize(),
        }
        if "fault_connections" in self.extensions_given:
            body["fault_connections"] = self.fault_connections
        if self.postcopy_after_s is not None:
            body["postcopy_after_s"] = self.postcopy_after_s
        if self.postcopy_recovery_s is not None:
            body["postcopy_recovery_s"] = self.postcopy_recovery_s
        if self.trace is not None:
            body["trace"] = self.trace
        return body

    @property
    def url(self) -> Url:
        return parse_url(self.destination_url)

    def tls(self) -> TlsConfig | None:
        return TlsConfig.from_dir(self.tls_dir, role="client") if self.tls_dir else None


# ---------------------------------------------------------------------------------------------
# VmReceiveMigrationData
# ---------------------------------------------------------------------------------------------


@dataclass
class ReceiveOptions:
    """``VmReceiveMigrationData`` (the fields chmig can use), plus ``prefetch``, ``trace``; also ``chmig receive``'s.

    ``memory_mode`` is held in lower case.  :meth:`parse` takes ``ch-remote``'s
    option string, :meth:`from_api` its JSON; both validate.  ``populate`` is
    not part of the request: it is how the destination writes memory.
    """

    receiver_url: str
    tls_dir: str | None = None
    memory_mode: str = _PRECOPY
    #: Postcopy (a chmig extension): how the pages no fault asked for are pulled (``page``, ``off`` or a size,
    #: 256K..2M).  None: not given (the default pull).
    prefetch: str | None = None
    #: Postcopy recovery (a chmig extension): how long a postcopy destination waits, its vCPUs blocked, for a
    #: source whose Fault connections all broke to reconnect (None: 60 s; 0: it fails at once, as Cloud
    #: Hypervisor's does).  Only a version-1 source (it agreed a token at Start) can reconnect.
    postcopy_recovery_s: int | None = None
    #: chmig's extension (JSON only, from ``--trace FILE``): the absolute path the VMM writes every message of
    #: this migration to, until the VM is whole.  None: no trace.
    trace: str | None = None
    #: Fault in each range with MADV_POPULATE_WRITE just before its data arrives (see bench/precopy.py).
    populate: bool = True

    @classmethod
    def parse(cls, text: str, what: str = "receive-migration") -> ReceiveOptions:
        """``VmReceiveMigrationData::parse``: CH's option string (see :data:`RECEIVE_MIGRATION_SYNTAX`), validated."""
        parser = OptionParser(what).add_all(("receiver_url", "tls_dir", "memory_mode"))
        for key, why in _RECEIVE_UNUSABLE.items():
            parser.add_unsupported(key, reason=why)
        parser.add("prefetch")
        parser.add("postcopy_recovery_s")
        try:
            parser.parse(text)
        except OptionError as exc:
            if exc.key and exc.key.startswith(("tcp:", "unix:")) and exc.key not in parser.known:
                raise OptionError(f"{exc.message}; write receiver_url=<url> (Cloud Hypervisor's parser "
                                  "refuses a bare URL too, whatever its SYNTAX says)",
                                  where=what, key=exc.key, known=exc.known) from None
            raise
        receiver_url = parser.get("receiver_url")
        if receiver_url is None:
            raise OptionError("invalid syntax: receiver_url is required", where=what, key="receiver_url")
        options = cls(receiver_url, tls_dir=parser.string("tls_dir"),
                      memory_mode=_from_str(parser.get("memory_mode"), "memory_mode", (_PRECOPY, _POSTCOPY),
                                            what) or _PRECOPY,
                      prefetch=parser.get("prefetch"), postcopy_recovery_s=parser.integer("postcopy_recovery_s"))
        options.validate(what)
        return options

    @classmethod
    def from_api(cls, body: Any, where: str | None = None) -> ReceiveOptions:
        """A ``vm.receive-migration`` body as ``ch-remote`` sends it (``vfio_fds``/``iommufd_fd`` null,
        ``zone_updates`` empty: accepted; given, refused with the reason)."""
        if isinstance(body, dict):
            _refuse_unusable(body, _RECEIVE_UNUSABLE, where)
        body = check_fields(body, RECEIVE_MIGRATION_FIELDS, required=("receiver_url",), nullable=NULLABLE_FIELDS,
                            where=where)
        options = cls(body["receiver_url"], tls_dir=body.get("tls_dir"), prefetch=body.get("prefetch"),
                      trace=body.get("trace"), postcopy_recovery_s=body.get("postcopy_recovery_s"))
        if "memory_mode" in body:
            options.memory_mode = enum_variant(body["memory_mode"], "memory_mode", _MODE_VARIANTS, where)
        options.validate(where)
        return options

    def validate(self, where: str | None = "receive-migration") -> None:
        """``VmReceiveMigrationData::validate``, its rules in its order and its words; then chmig's extension."""
        url = _check_url(self.receiver_url, "receiver_url", where)
        if url.scheme == "unix" and self.tls_dir is not None:
            raise UsageError("UNIX sockets and TLS encryption cannot be used at the same time", where=where)
        _check_tls_dir(self.tls_dir, "server", "Invalid TLS configuration for receive-migration", where)
        self.memory_mode = mode = (self.memory_mode or _PRECOPY).lower()
        if mode not in (_PRECOPY, _POSTCOPY):
            raise UsageError(f"memory_mode must be precopy or postcopy, got {self.memory_mode!r}", where=where)
        if self.prefetch is not None and mode != _POSTCOPY:
            raise UsageError("prefetch (a chmig extension) is only for memory_mode=postcopy", where=where)
        if self.postcopy_recovery_s is not None:
            if mode != _POSTCOPY:
                raise UsageError("postcopy_recovery_s (a chmig extension) is only for memory_mode=postcopy",
                                 where=where)
            _check_recovery_s(self.postcopy_recovery_s, where)
        try:
            self.pull()
        except UsageError as exc:
            raise UsageError(exc.message, where=where) from None
        _check_trace(self.trace, where)

    def to_api(self) -> dict[str, Any]:
        """serde's JSON of ``VmReceiveMigrationData`` as ch-remote sends it; ``prefetch`` and ``trace`` only if
        given."""
        body: dict[str, Any] = {
            "receiver_url": self.receiver_url,
            "tls_dir": self.tls_dir,
            "memory_mode": self.memory_mode.capitalize(),
            "vfio_fds": None,
            "iommufd_fd": None,
            "zone_updates": [],
        }
        if self.prefetch is not None:
            body["prefetch"] = self.prefetch
        if self.postcopy_recovery_s is not None:
            body["postcopy_recovery_s"] = self.postcopy_recovery_s
        if self.trace is not None:
            body["trace"] = self.trace
        return body

    @property
    def recovery_s(self) -> int:
        """How long this destination waits for a broken postcopy's source to reconnect (0: not at all)."""
        return DEFAULT_POSTCOPY_RECOVERY_S if self.postcopy_recovery_s is None else self.postcopy_recovery_s

    def pull(self) -> Prefetch:
        """The postcopy pull these options ask for."""
        from .postcopy import Prefetch  # here: the postcopy machinery is not needed to build a request

        return Prefetch.parse(self.prefetch)

    def tls(self) -> TlsConfig | None:
        return TlsConfig.from_dir(self.tls_dir, role="server") if self.tls_dir else None


# ---------------------------------------------------------------------------------------------
# What ch-remote sends
# ---------------------------------------------------------------------------------------------


def send_migration_body(text: str) -> dict[str, Any]:
    """``VmSendMigrationData::parse`` then serde: the body ``ch-remote send-migration TEXT`` sends."""
    return SendOptions.parse(text).to_api()


def receive_migration_body(text: str) -> dict[str, Any]:
    """``VmReceiveMigrationData::parse`` then serde: the body ``ch-remote receive-migration TEXT`` sends."""
    return ReceiveOptions.parse(text).to_api()


def restore_body(text: str) -> dict[str, Any]:
    """``RestoreConfig::parse`` then serde: the body ``ch-remote restore TEXT`` sends."""
    from .snapshot import RestoreConfig  # here: snapshot.py brings the VM stack, which a client does not need

    return RestoreConfig.parse(text, "restore").to_api()


def snapshot_body(url: str) -> dict[str, Any]:
    """``ch-remote snapshot URL``: the argument is the URL itself, not key=value options.

    CH sends even an empty URL; chmig refuses it here, where the mistake is made.
    """
    if not url.strip():
        raise UsageError("snapshot needs a destination URL: chmig remote --api-socket PATH snapshot file:///DIR")
    return {"destination_url": url}


def snapshot_from_api(body: Any, where: str | None = None) -> str:
    """A ``vm.snapshot`` body (``VmSnapshotConfig``): its ``destination_url``."""
    return check_fields(body, SNAPSHOT_FIELDS, required=("destination_url",), where=where)["destination_url"]
