"""Cloud Hypervisor's API request structs as ``ch-remote`` builds them from its option strings.

``ch-remote send-migration destination_url=...`` parses its argument with
``OptionParser`` (:mod:`chmig.options`), checks it, and sends the struct
serialized by serde: every field, in declaration order, enums by variant name.
The functions here do the same, so ``chmig remote`` sends the bytes
``ch-remote`` sends.
"""

from __future__ import annotations

from .errors import UsageError
from .options import parse_typed

SEND_MIGRATION_SYNTAX = (
    'VM send migration parameters "destination_url=<url>[,local=on|off,preserve_source=on|off,'
    'downtime_ms=<milliseconds>,timeout_s=<seconds>,timeout_strategy=cancel|ignore,connections=<amount>,'
    'tls_dir=<path>,memory_mode=precopy|postcopy]"'
)
RECEIVE_MIGRATION_SYNTAX = (
    'VM receive migration parameters "<receiver_url>" or "receiver_url=<url>[,tls_dir=<path>]'
    '[,memory_mode=precopy|postcopy][,vfio_fds=<list_of_vfio_ids_with_their_associated_fd>][,iommufd_fd=<fd>]'
    '[,zone_updates=[<id@host_numa_node>]]"'
)
RESTORE_SYNTAX = "source_url=<source_url>[,prefault=on|off][,memory_restore_mode=copy|ondemand][,resume=on|off]"
SNAPSHOT_SYNTAX = "<destination_url>"


def send_migration_body(text: str) -> dict:
    """``VmSendMigrationData::parse`` then serde: the body ``ch-remote send-migration TEXT`` sends."""
    from .api import SEND_MIGRATION_FIELDS

    return parse_typed(text, SEND_MIGRATION_FIELDS, "send-migration")


def receive_migration_body(text: str) -> dict:
    """``VmReceiveMigrationData::parse`` then serde: the body ``ch-remote receive-migration TEXT`` sends."""
    from .api import RECEIVE_MIGRATION_FIELDS

    return parse_typed(text, RECEIVE_MIGRATION_FIELDS, "receive-migration")


def restore_body(text: str) -> dict:
    """``RestoreConfig::parse`` then serde: the body ``ch-remote restore TEXT`` sends."""
    from .snapshot import RestoreConfig

    return RestoreConfig.parse(text, "restore").to_api()


def snapshot_body(url: str) -> dict:
    """``ch-remote snapshot URL``: the argument is the URL itself, not key=value options."""
    if not url.strip():
        raise UsageError("snapshot needs a destination URL: chmig remote --api-socket PATH snapshot file:///DIR")
    return {"destination_url": url}
