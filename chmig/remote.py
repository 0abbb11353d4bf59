"""``chmig remote``: Cloud Hypervisor's ``ch-remote`` for a chmig VMM."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .apiclient import request
from .errors import UsageError
from .options import parse_typed
from .api import RECEIVE_MIGRATION_FIELDS, SEND_MIGRATION_FIELDS


REMOTE_ACTIONS: dict[str, tuple[str, str, dict | None]] = {
    "ping": ("GET", "vmm.ping", None),
    "info": ("GET", "vm.info", None),
    "pause": ("PUT", "vm.pause", None),
    "resume": ("PUT", "vm.resume", None),
    "shutdown": ("PUT", "vm.shutdown", None),
    "shutdown-vmm": ("PUT", "vmm.shutdown", None),
    "send-migration": ("PUT", "vm.send-migration", SEND_MIGRATION_FIELDS),
    "receive-migration": ("PUT", "vm.receive-migration", RECEIVE_MIGRATION_FIELDS),
    "cancel-migration": ("PUT", "vm.cancel-migration", None),
    "snapshot": ("PUT", "vm.snapshot", None),
    "restore": ("PUT", "vm.restore", None),
}


def _snapshot_body(argument: str) -> dict:
    """``ch-remote snapshot file:///DIR``: the argument is the URL itself, not key=value options."""
    if not argument.strip():
        raise UsageError("snapshot needs a destination URL: chmig remote --api-socket PATH snapshot file:///DIR")
    return {"destination_url": argument}


def _restore_body(argument: str) -> dict:
    """``ch-remote restore source_url=...``: parsed as ``--restore`` is, sent as the whole serialized RestoreConfig."""
    from .snapshot import RestoreConfig

    return RestoreConfig.parse(argument, "restore").to_api()


#: Actions whose argument ``ch-remote`` turns into a body its own way (not typed ``key=value`` fields).
REMOTE_BODIES: dict[str, Callable[[str], dict]] = {"snapshot": _snapshot_body, "restore": _restore_body}


def main_remote(args: argparse.Namespace) -> int:
    """``chmig remote --api-socket PATH ACTION [key=value,...]``."""
    if args.action not in REMOTE_ACTIONS:
        raise UsageError(f"unknown action {args.action!r} (choose from {', '.join(REMOTE_ACTIONS)})")
    method, action, fields = REMOTE_ACTIONS[args.action]
    body = None
    if args.action in REMOTE_BODIES:
        body = REMOTE_BODIES[args.action](args.options)
    elif fields is not None:
        body = parse_typed(args.options, fields, args.action)
    elif args.options:
        raise UsageError(f"{args.action} takes no options")
    result = request(args.api_socket, method, action, body)
    if result is not None:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0

