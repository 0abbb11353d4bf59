"""The socket-free destination: a VM built from parsed parts and files, with no connection at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from chmig.destination import Destination
from chmig.errors import MigrationError, ProtocolError
from chmig.memory import GuestMemory, ZoneConfig, layout
from chmig.vm import Serial, Vm, VmConfig, VmState

from .conftest import requires_kvm

pytestmark = [requires_kvm, pytest.mark.timeout(60)]


def _parts(size: int = 8 << 20) -> tuple[bytes, Vm]:
    """A Config payload, and a paused source VM of that shape whose State can be captured."""
    config = VmConfig.from_args("boot=1", f"size={size >> 20}M", [], "verify,dirty_percent=10")
    source = Vm(config, GuestMemory.create(config.zones), Serial("off"))
    source.boot()
    return json.dumps(source.migration_config()).encode(), source


def test_a_vm_restored_from_files_runs(tmp_path: Path) -> None:
    """Config, memory from a file (as a snapshot restore will), State, Complete — no socket anywhere."""
    payload, source = _parts()
    try:
        source.start()
        source.pause()
        state = json.dumps(source.capture_state()).encode()
        image = tmp_path / "memory-0"
        with open(image, "wb") as out:
            out.write(source.memory.read(0, source.memory.total_size))
        destination = Destination()
        vm = destination.configure(payload)
        fd = os.open(image, os.O_RDONLY)
        try:
            destination.fill_from_file(0, vm.memory.total_size, fd, 0)
        finally:
            os.close(fd)
        destination.restore(state)
        vm = destination.complete(resume=True)
        assert destination.take() is vm and destination.vm is None
        try:
            before = vm.info()["guest"]["rounds"]
            import time

            deadline = time.monotonic() + 30
            while vm.info()["guest"]["rounds"] < before + 2:
                assert time.monotonic() < deadline and not vm.failure
                time.sleep(0.05)
            assert vm.info()["guest"]["errors"] == 0 and vm.state == VmState.RUNNING
        finally:
            vm.close()
    finally:
        source.close()


def test_file_ranges_are_checked(tmp_path: Path) -> None:
    payload, source = _parts()
    source.close()
    destination = Destination()
    destination.configure(payload)
    short = tmp_path / "short"
    short.write_bytes(b"\1" * 4096)
    fd = os.open(short, os.O_RDONLY)
    try:
        with pytest.raises(ProtocolError, match="not inside guest RAM"):
            destination.fill_from_file(16 << 20, 4096, fd, 0)
        with pytest.raises(MigrationError, match="the file ends"):
            destination.fill_from_file(0x100000, 8192, fd, 0)
    finally:
        os.close(fd)
        destination.discard()


def test_json_bombs_and_non_finite_numbers_are_the_peers_fault() -> None:
    destination = Destination()
    zones = [ZoneConfig("mem0", 4 << 20, True)]
    good = {"vm_config": VmConfig(cpus=1, zones=zones).to_json(),
            "memory_manager_data": {"guest_ram_mappings": [m.to_json() for m in layout(zones)]}}
    for payload, message in [
        (b"[" * 100_001 + b"]" * 100_001, "objects and arrays"),
        (b"[" * 5_000 + b"]" * 5_000, "nested too deeply"),
        (b"[" + b"{}," * 200_000 + b"{}]", "objects and arrays"),
        (json.dumps(good).replace('"size": 4194304', '"size": Infinity', 1).encode(), "not a number JSON allows"),
        (json.dumps(good).replace('"size": 4194304', '"size": 1e999', 1).encode(), "out of range"),
        (json.dumps(good).replace('"size": 4194304', '"size": NaN', 1).encode(), "not a number JSON allows"),
        (b'"a string"', "malformed Config"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            destination.configure(payload)
    assert destination.vm is None


def test_a_config_larger_than_the_host_is_refused_before_allocating() -> None:
    zones = [ZoneConfig("mem0", 60 << 30, True)]
    payload = json.dumps({"vm_config": VmConfig(cpus=1, zones=zones).to_json(),
                          "memory_manager_data": {"guest_ram_mappings": [m.to_json() for m in layout(zones)]}})
    with pytest.raises(MigrationError, match="does not fit this host"):
        Destination().configure(payload.encode())
