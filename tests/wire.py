"""Test tooling: the payloads a raw-socket peer sends (one definition for every hostile-peer test)."""

from __future__ import annotations

import json
import socket

from chmig.memory import GuestRamMapping, ZoneConfig, layout
from chmig.vm import VmConfig

#: The RAM of the small VMs raw peers configure.
RAM = 4 << 20


def config_payload(zones: list[ZoneConfig] | None = None, mappings: list[GuestRamMapping] | None = None,
                   cpuid: list[dict] | None = None) -> bytes:
    """A Config as a source sends it: one shared 4 MiB zone unless told otherwise."""
    zones = zones or [ZoneConfig("mem0", RAM, True)]
    document: dict = {"vm_config": VmConfig(cpus=1, zones=zones).to_json(),
                      "memory_manager_data": {"guest_ram_mappings": [m.to_json() for m in mappings or layout(zones)]}}
    if cpuid is not None:
        document["common_cpuid"] = cpuid
    return json.dumps(document).encode()


def recv_exact(sock: socket.socket, count: int) -> bytes | None:
    """``count`` bytes, or None when the peer closed first."""
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            return None
        data += chunk
    return bytes(data)
