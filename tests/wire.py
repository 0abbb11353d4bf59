"""Test tooling: the payloads a raw-socket peer sends (one definition for every hostile-peer test)."""

from __future__ import annotations

import json

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
