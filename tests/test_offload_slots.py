"""The offload daemon with a VM whose zone spans the 32-bit hole: two slots, the second at a non-zero file_offset.

The daemon writes each slot's bytes from its ``file_offset`` to ``memory-<slot>`` and, on restore, hands the
VMM one new memfd per slot with the slot's bytes at ``file_offset`` (as Cloud Hypervisor's daemon does); the
verify guest, which checks all of its RAM every round, is the judge.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chmig.units import GiB, MiB

from .conftest import BackgroundCall, Processes, requires_kvm

pytestmark = [requires_kvm, pytest.mark.timeout(240)]

#: 3 GiB + 32 MiB: the zone continues at 4 GiB for its last 32 MiB (slot 1, file_offset 3 GiB).
MEMORY = "size=3104M"


def _daemon(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "chmig", "-v", "offload", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("ondemand", [False, True], ids=["eager", "ondemand"])
def test_a_zone_across_the_hole_snapshots_and_restores_slot_by_slot(procs: Processes, tmp_path: Path,
                                                                     ondemand: bool) -> None:
    source = procs.run("--cpus", "boot=2", "--memory", MEMORY, "--workload", "verify")
    source.wait_rounds(2, timeout=120)
    socket_path, snapshot = tmp_path / "offload.sock", tmp_path / "snap"
    daemon = _daemon("snapshot", "--socket", str(socket_path), "--output-dir", str(snapshot))
    assert daemon.stdout is not None and "listening on" in daemon.stdout.readline()
    source.call("PUT", "vm.pause")
    rounds = source.info()["guest"]["rounds"]
    source.call("PUT", "vm.send-migration", {"destination_url": f"unix:{socket_path}", "local": True})
    output, _ = daemon.communicate(timeout=120)
    assert daemon.returncode == 0, output

    config = json.loads((snapshot / "migration_config.json").read_bytes())
    slots = {m["slot"]: m for m in config["memory_manager_data"]["guest_ram_mappings"]}
    assert slots[0]["size"] == 3 * GiB and slots[0]["file_offset"] == 0
    assert slots[1]["gpa"] == 4 * GiB and slots[1]["size"] == 32 * MiB and slots[1]["file_offset"] == 3 * GiB
    assert (snapshot / "memory-1").stat().st_size == 32 * MiB  # the slot's bytes only, from its file_offset

    target = procs.run()
    receive_socket = tmp_path / "restore.sock"
    body = {"receiver_url": f"unix:{receive_socket}", **({"memory_mode": "postcopy"} if ondemand else {})}
    call = BackgroundCall(target, "PUT", "vm.receive-migration", body)
    call.wait_for_file(receive_socket)
    # On demand, the VM stays paused until it is whole: a guest that reads all of its 3 GiB would fault in
    # every page one at a time (165 s here), and what this test checks is where each slot's bytes come from.
    restore = _daemon("restore", "--socket", str(receive_socket), "--input-dir", str(snapshot),
                      *(["--ondemand"] if ondemand else ["--resume"]))
    output, _ = restore.communicate(timeout=180)
    assert restore.returncode == 0, output
    assert call.result() is None
    if ondemand:
        whole = target.wait_for(lambda i: i["migration"]["postcopy"]["status"] == "whole", timeout=120,
                                what="the on-demand restore's pull made the VM whole")
        assert whole["state"] == "Paused" and whole["migration"]["postcopy"]["pages_faulted"] == 0
        target.call("PUT", "vm.resume")
    info = target.wait_rounds(rounds + 2, timeout=120)
    assert info["state"] == "Running"
    assert info["guest"]["errors"] == 0, info["guest"]
