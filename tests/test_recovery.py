"""Postcopy recovery (protocol version 1): every Fault connection breaks mid-postcopy, and neither side gives up.

Real chmig processes, a real KVM guest that reads and checks all of its memory
while its pages are still on the source, a real postcopy destination, and a
proxy (tests/proxy.py) that cuts the link: every connection reset at both ends,
every new one refused for the length of the cut.  The guest is the judge: after
the recovery it runs on with its counters continuing and zero memory mismatches.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from chmig import protocol as p
from chmig.apiclient import ApiError

from .conftest import BackgroundCall, Processes, VmmProcess, requires_kvm
from .faultproxy import Action, Fault, FaultProxy, Point
from .proxy import ThrottledProxy

pytestmark = [requires_kvm, pytest.mark.timeout(180)]

GUEST = ("--cpus", "boot=2", "--memory", "size=64M", "--workload", "verify")
#: Slow enough that the pull of 64 MiB takes seconds: the cut lands in the middle of it.
LINK = 12 << 20


def postcopy_of(info: dict) -> dict:
    return (info.get("migration") or {}).get("postcopy") or {}


def pulling(dest: VmmProcess) -> dict:
    """Until the destination has brought some pages in (postcopy under way, far from whole)."""
    return dest.wait_for(lambda i: postcopy_of(i).get("pages_pulled", 0) >= 512, timeout=60, what="pulling")


def send_in_background(source: VmmProcess, url: str, recovery_s: int) -> BackgroundCall:
    return BackgroundCall(source, "PUT", "vm.send-migration",
                          {"destination_url": url, "memory_mode": "postcopy", "postcopy_recovery_s": recovery_s})


def stranger(url: str, token: bytes) -> bytes | None:
    """A FaultRecovery connection with the wrong token, straight to the destination: what does it get back?"""
    host, port = url.removeprefix("tcp:").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as conn:
        conn.sendall(p.ConnectionRole.FAULT_RECOVERY.encode() + p.RecoveryHello(token, 1).encode())
        # If it were taken as the source, a PageFault would come (the faults in flight are asked again).
        try:
            return conn.recv(16)
        except ConnectionResetError:
            return None


def test_a_2_s_cut_mid_postcopy_recovers_and_a_stranger_is_refused(procs: Processes) -> None:
    source = procs.run(*GUEST)
    before = source.wait_rounds(2)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--memory-mode", "postcopy", "--postcopy-recovery-s", "30")
    proxy = ThrottledProxy(url, LINK)
    try:
        sending = send_in_background(source, proxy.url, recovery_s=30)
        at_cut = postcopy_of(pulling(dest))
        assert at_cut["pages_total"] - at_cut["pages_faulted"] - at_cut["pages_pulled"] > 4096, at_cut
        proxy.cut(2.0)
        dest.wait_for(lambda i: postcopy_of(i).get("status") == "recovering", timeout=10, what="recovering")
        assert stranger(url, bytes(16)) in (b"", None), "the destination answered a stranger's connection"
        assert sending.result(120) is None, sending.outcome
    finally:
        proxy.close()
    stats = sending.answer
    assert isinstance(stats, dict) and stats["status"] == "completed", stats
    served = stats["postcopy"]
    assert served["status"] == "served" and len(served["recoveries"]) >= 1, served
    assert source.wait_exit(30) == 0
    info = dest.wait_for(lambda i: postcopy_of(i).get("status") == "whole", timeout=90, what="whole")
    recoveries = postcopy_of(info)["recoveries"]
    assert len(recoveries) >= 1, postcopy_of(info)
    first = recoveries[0]
    assert first["attempt"] >= 1 and first["duration_ms"] >= 1000 and first["pages_rerequested"] >= 0, first
    start = info["guest"]["rounds"]
    assert start >= before["guest"]["rounds"]
    after = dest.wait_rounds(start + 2, timeout=60)
    assert after["guest"]["errors"] == 0 and after["state"] == "Running", after["guest"]
    assert "refusing a recovery connection" in dest.log.read_text() and "wrong migration token" in dest.log.read_text()


def test_a_cut_recovers_over_tls_while_strangers_stall_their_handshakes(procs: Processes,
                                                                       tls_dirs: dict[str, Path]) -> None:
    """The source reconnects with TLS (the destination's listener keeps its certificates); strangers that
    connect and never start a handshake are there first, and do not hold the source up."""
    source = procs.run(*GUEST)
    source.wait_rounds(2)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--memory-mode", "postcopy", "--postcopy-recovery-s", "30",
                              "--tls-dir", str(tls_dirs["good"]))
    proxy = ThrottledProxy(url, LINK)
    host, port = url.removeprefix("tcp:").rsplit(":", 1)
    strangers: list[socket.socket] = []
    try:
        sending = BackgroundCall(source, "PUT", "vm.send-migration",
                                 {"destination_url": proxy.url, "memory_mode": "postcopy", "postcopy_recovery_s": 30,
                                  "tls_dir": str(tls_dirs["good"])})
        pulling(dest)
        proxy.cut(2.0)
        dest.wait_for(lambda i: postcopy_of(i).get("status") == "recovering", timeout=10, what="recovering")
        strangers = [socket.create_connection((host, int(port)), timeout=20) for _ in range(3)]
        recovering_at = time.monotonic()
        assert sending.result(120) is None, sending.outcome
    finally:
        for conn in strangers:
            conn.close()
        proxy.close()
    stats = sending.answer
    assert isinstance(stats, dict) and stats["status"] == "completed", stats
    recovery = stats["postcopy"]["recoveries"][0]
    # The cut lasts 2 s and the source retries within 1 s; each stranger's handshake would take 10 s in turn.
    info = dest.wait_for(lambda i: postcopy_of(i).get("status") == "whole", timeout=90, what="whole")
    first = postcopy_of(info)["recoveries"][0]
    assert first["duration_ms"] < 8000, (first, recovery, time.monotonic() - recovering_at)
    after = dest.wait_rounds(info["guest"]["rounds"] + 2, timeout=60)
    assert after["guest"]["errors"] == 0 and after["state"] == "Running", after["guest"]
    assert source.wait_exit(30) == 0


def test_a_hybrid_migration_recovers_from_a_cut_after_its_switch(procs: Processes) -> None:
    """Hybrid is recoverable by default (postcopy_recovery_s=60): precopy gives up on a guest that rewrites all of
    its memory faster than the link, the switch discards those pages, and the cut lands while they come back."""
    source = procs.run("--cpus", "boot=2", "--memory", "size=64M", "--workload", "verify,dirty_percent=100")
    before = source.wait_rounds(2)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--memory-mode", "postcopy")
    proxy = ThrottledProxy(url, LINK)
    try:
        sending = BackgroundCall(source, "PUT", "vm.send-migration",
                                 {"destination_url": proxy.url, "memory_mode": "hybrid", "downtime_ms": 1,
                                  "postcopy_after_s": 1})
        dest.wait_for(lambda i: postcopy_of(i).get("pages_pulled", 0) >= 256, timeout=60, what="pulling")
        proxy.cut(2.0)
        assert sending.result(120) is None, sending.outcome
    finally:
        proxy.close()
    stats = sending.answer
    assert isinstance(stats, dict) and stats["mode"] == "hybrid" and stats["pages_discarded"] > 0, stats
    assert len(stats["postcopy"]["recoveries"]) >= 1, stats["postcopy"]
    assert source.wait_exit(30) == 0
    info = dest.wait_for(lambda i: postcopy_of(i).get("status") == "whole", timeout=90, what="whole")
    assert len(postcopy_of(info)["recoveries"]) >= 1
    after = dest.wait_rounds(max(info["guest"]["rounds"], before["guest"]["rounds"]) + 2, timeout=60)
    assert after["guest"]["errors"] == 0 and after["state"] == "Running", after["guest"]


def test_a_cut_longer_than_postcopy_recovery_s_fails_cleanly_on_both_sides(procs: Processes) -> None:
    source = procs.run(*GUEST)
    source.wait_rounds(2)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--memory-mode", "postcopy", "--postcopy-recovery-s", "2")
    proxy = ThrottledProxy(url, LINK)
    try:
        sending = send_in_background(source, proxy.url, recovery_s=2)
        pulling(dest)
        cut_at = time.monotonic()
        proxy.cut(30.0)
        outcome = sending.result(60)
        assert isinstance(outcome, ApiError), outcome
        text = str(outcome)
        assert "reconnecting failed for 2 s (postcopy_recovery_s)" in text and "\n" not in text, text
        assert time.monotonic() - cut_at >= 2
        # The source keeps its VM, paused, with all its memory: the destination's cannot go on.
        assert source.proc.poll() is None
        info = source.info()
        assert info["state"] == "Paused" and info["migration"]["postcopy"]["status"] == "failed", info["migration"]
        # The destination waited its 2 s, then failed as postcopy fails: the VM stopped, the process exits.
        assert dest.wait_exit(30) != 0
        assert "the source did not reconnect within 2 s (postcopy_recovery_s)" in dest.log.read_text(), dest.tail()
    finally:
        proxy.close()


def test_a_version_0_postcopy_does_not_recover(procs: Processes) -> None:
    """Plain postcopy without postcopy_recovery_s stays Cloud Hypervisor's version 0: a cut fails it at once (the
    destination's default deadline does not apply to a source that agreed no token)."""
    source = procs.run(*GUEST)
    source.wait_rounds(2)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--memory-mode", "postcopy")
    proxy = ThrottledProxy(url, LINK)
    try:
        sending = BackgroundCall(source, "PUT", "vm.send-migration",
                                 {"destination_url": proxy.url, "memory_mode": "postcopy"})
        pulling(dest)
        proxy.cut(30.0)
        outcome = sending.result(30)
        assert isinstance(outcome, ApiError) and "postcopy" in str(outcome), outcome
        assert dest.wait_exit(30) != 0  # well before the default postcopy_recovery_s of 60 s
        log = dest.log.read_text()
        assert "postcopy failed" in log and "waiting up to" not in log, dest.tail()
        assert source.info()["state"] == "Paused"
    finally:
        proxy.close()


#: Cut points on the Fault connections (tests/faultproxy.py), the migration recoverable: each is survived.  The
#: n-th PageFault or answer on any Fault connection (which one pulls is the destination's business).
RECOVERED_CUTS = [
    pytest.param(Fault(Point("PageFault", connection="fault-*", nth=20), Action.RST), id="rst-at-a-pagefault"),
    pytest.param(Fault(Point("Ok", connection="fault-*", answers="PageFault", nth=10), Action.HALF),
                 id="half-an-answer"),
]


@pytest.mark.parametrize("fault", RECOVERED_CUTS)
def test_a_recoverable_postcopy_survives_a_cut_point(procs: Processes, fault: Fault) -> None:
    """One Fault connection cut at one message: the destination resets the attempt, the source reconnects with
    the token (FaultRecovery through the same proxy), the faults in flight are asked again; 0 errors."""
    source = procs.run("--cpus", "boot=1", "--memory", "size=32M", "--workload", "verify,dirty_percent=10")
    source.wait_rounds(2)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--memory-mode", "postcopy", "--prefetch", "256K",
                              "--postcopy-recovery-s", "30")
    proxy = FaultProxy(url, fault=fault).start()
    try:
        sending = send_in_background(source, proxy.url, recovery_s=30)
        assert proxy.fired.wait(60), proxy.transcript()
        assert sending.result(90) is None, f"{sending.outcome}\n{proxy.transcript()}"
    finally:
        proxy.close()
    stats = sending.answer
    assert isinstance(stats, dict) and len(stats["postcopy"]["recoveries"]) >= 1, stats
    assert source.wait_exit(30) == 0
    info = dest.wait_for(lambda i: postcopy_of(i).get("status") == "whole", timeout=60, what="whole")
    assert len(postcopy_of(info)["recoveries"]) >= 1
    after = dest.wait_rounds(info["guest"]["rounds"] + 2, timeout=60)
    assert after["guest"]["errors"] == 0 and after["state"] == "Running", after["guest"]
