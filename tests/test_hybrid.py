"""Hybrid migration: precopy first, postcopy when it does not converge (protocol version 1, Discard).

Real chmig processes, a real KVM guest that dirties its memory faster than the
throttled link (tests/proxy.py) can carry it, a real postcopy destination.  The
guest is the judge: after the switch it runs on the destination with its
counters continuing and zero memory mismatches.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
from typing import Callable

import pytest

from chmig.apiclient import ApiError

from .conftest import BackgroundCall, Processes, VmmProcess, requires_kvm
from .wire import recv_exact

pytestmark = [requires_kvm, pytest.mark.timeout(180)]

#: A guest that rewrites all of its 64 MiB every round: faster than the link below.
HEAVY = ("--cpus", "boot=2", "--memory", "size=64M", "--workload", "verify,dirty_percent=100")
def send(source: VmmProcess, url: str, **options: object) -> dict:
    return source.call("PUT", "vm.send-migration", {"destination_url": url, **options}, timeout=150)


def whole_and_continuing(dest: VmmProcess, before: dict) -> dict:
    """The destination brought every page in; the guest went on from where it was, two more rounds, 0 errors."""
    info = dest.wait_for(lambda i: i["migration"]["postcopy"]["status"] == "whole", timeout=90, what="whole")
    start = info["guest"]["rounds"]
    assert start >= before["guest"]["rounds"]
    after = dest.wait_rounds(start + 4, timeout=60)
    assert after["guest"]["errors"] == 0 and after["state"] == "Running", after["guest"]
    return after


@pytest.mark.parametrize("switch, reason", [({"timeout_s": 2}, "timeout_s"),
                                            ({"timeout_s": 600, "postcopy_after_s": 1}, "postcopy_after_s")])
def test_hybrid_completes_where_precopy_gives_up(procs: Processes, slow_link: Callable[[str], str],
                                                 switch: dict, reason: str) -> None:
    source = procs.run(*HEAVY)
    before = source.wait_rounds(2)
    if reason == "timeout_s":  # the baseline: precopy alone gives up on this guest and link
        refusing, url = procs.receive("tcp:127.0.0.1:0")
        with pytest.raises(ApiError, match="did not converge within 2 s"):
            send(source, slow_link(url), downtime_ms=1, timeout_s=2, timeout_strategy="cancel")
        assert source.info()["state"] == "Running"
        refusing.wait_exit(30)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--memory-mode", "postcopy")
    stats = send(source, slow_link(url), downtime_ms=1, memory_mode="hybrid", **switch)
    assert stats["status"] == "completed" and stats["mode"] == "hybrid", stats
    assert stats["switched_by"] == reason and stats["switch_after_ms"] >= 1000
    assert stats["pages_discarded"] > 0 and stats["precopy_bytes"] >= 60 << 20  # iteration 0: all written pages
    assert stats["postcopy"]["status"] == "served"
    assert source.wait_exit(30) == 0
    after = whole_and_continuing(dest, before)
    migration = after["migration"]
    assert migration["mode"] == "hybrid" and migration["pages_discarded"] == stats["pages_discarded"]
    postcopy = migration["postcopy"]
    # Precopy brought most of the memory: only discarded (and never-written) pages came by postcopy.
    assert 0 < postcopy["pages_faulted"] + postcopy["pages_pulled"] < (64 << 20) // 4096


def test_a_hybrid_migration_that_converges_is_a_precopy_one(procs: Processes) -> None:
    """Over loopback this guest converges: no switch, no Discard, no Fault connections, nothing pulled after."""
    source = procs.run("--memory", "size=64M", "--workload", "verify,dirty_percent=10")
    before = source.wait_rounds(2)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--memory-mode", "postcopy")
    stats = send(source, url, memory_mode="hybrid")
    assert stats["status"] == "completed" and stats["switched_by"] is None and stats["pages_discarded"] is None
    assert stats["iterations"][-1]["final"]
    assert stats["postcopy"] is None
    assert source.wait_exit(30) == 0
    arrived = dest.info()
    assert arrived["migration"]["mode"] == "hybrid" and arrived["migration"]["postcopy"] is None
    assert arrived["migration"]["pages_discarded"] is None
    after = dest.wait_rounds(arrived["guest"]["rounds"] + 4, timeout=60)
    assert after["guest"]["errors"] == 0 and after["guest"]["rounds"] >= before["guest"]["rounds"]


def test_an_operator_switches_a_hybrid_migration(procs: Processes, slow_link: Callable[[str], str]) -> None:
    """A guest that rewrites 16 MiB/s of its 32 MiB, switched by an operator during precopy: most pages are
    there from precopy (never discarded, never faulted); only the ones rewritten since come by postcopy."""
    source = procs.run("--cpus", "boot=1", "--memory", "size=32M", "--workload", "verify,dirty_percent=100,dirty_rate=16")
    before = source.wait_rounds(1, timeout=60)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--memory-mode", "postcopy")
    call = BackgroundCall(source, "PUT", "vm.send-migration",
                          {"destination_url": slow_link(url), "downtime_ms": 1, "timeout_s": 600,
                           "memory_mode": "hybrid"})
    source.wait_for(lambda i: (i.get("migration") or {}).get("progress") is not None, what="precopy under way")
    switched = subprocess.run([sys.executable, "-m", "chmig", "remote", "--api-socket", source.api,
                               "migration-start-postcopy"], capture_output=True, text=True, timeout=30)
    assert switched.returncode == 0, switched.stderr
    assert call.result(120) is None
    stats = call.answer
    assert isinstance(stats, dict)
    assert stats["switched_by"] == "operator" and stats["status"] == "completed", stats
    after = whole_and_continuing(dest, before)
    postcopy = after["migration"]["postcopy"]
    total = (32 << 20) // 4096
    assert postcopy["pages_present_at_start"] > total // 2, postcopy  # they came by precopy and stayed
    assert postcopy["pages_present_at_start"] + postcopy["pages_faulted"] + postcopy["pages_pulled"] == total
    assert after["migration"]["pages_discarded"] == stats["pages_discarded"] < total // 2


def test_migration_start_postcopy_without_a_hybrid_send_is_one_clear_error(procs: Processes) -> None:
    source = procs.run("--memory", "size=32M", "--workload", "idle")
    with pytest.raises(ApiError, match="no migration is being sent"):
        source.call("PUT", "vm.migration-start-postcopy")
    run = subprocess.run([sys.executable, "-m", "chmig", "remote", "--api-socket", source.api,
                          "migration-start-postcopy"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr


def test_a_precopy_receiver_refuses_the_switch_and_the_source_runs_on(procs: Processes,
                                                                      slow_link: Callable[[str], str]) -> None:
    source = procs.run(*HEAVY)
    source.wait_rounds(2)
    dest, url = procs.receive("tcp:127.0.0.1:0")
    with pytest.raises(ApiError, match="a hybrid migration needs one that receives by postcopy"):
        send(source, slow_link(url), downtime_ms=1, timeout_s=2, memory_mode="hybrid")
    info = source.info()
    assert info["state"] == "Running" and info["migration"]["status"] == "failed"
    source.wait_rounds(info["guest"]["rounds"] + 2)
    assert source.info()["guest"]["errors"] == 0
    assert dest.wait_exit(30) != 0


class VersionZeroReceiver:
    """Cloud Hypervisor's receiver as far as Start goes: a version other than 0 is answered Error."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.versions: list[int] = []
        self.thread = threading.Thread(target=self._serve, name="test-v0-receiver")
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            header = recv_exact(conn, 16)
            if header is None:
                return
            command, headers, _length = struct.unpack("<H6sQ", header)
            version = int.from_bytes(headers[:2], "little")
            self.versions.append(version)
            status = 1 if command == 1 and version == 0 else 2
            conn.sendall(struct.pack("<H6xQ", status, 0))
            conn.recv(16)  # until the source hangs up

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


@pytest.mark.parametrize("options, needs", [
    ({"memory_mode": "hybrid"}, "memory_mode=hybrid"),
    ({"memory_mode": "postcopy", "postcopy_recovery_s": 30}, "postcopy_recovery_s=30"),  # the token at Start
], ids=["hybrid", "recoverable-postcopy"])
def test_a_version_1_sender_facing_a_version_0_receiver_gets_a_clear_error(procs: Processes, options: dict,
                                                                           needs: str) -> None:
    source = procs.run("--memory", "size=32M", "--workload", "verify")
    receiver = VersionZeroReceiver()
    try:
        with pytest.raises(ApiError, match=f"refused protocol version 1, which {needs} needs"):
            send(source, receiver.url, **options)
    finally:
        receiver.close()
    assert receiver.versions == [1]
    assert source.info()["state"] == "Running"
