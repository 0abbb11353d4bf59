"""``--event-monitor``: Cloud Hypervisor's events, in its format, at its moments; and the live progress.

Real chmig processes with their event files: a full precopy migration leaves
the events in order on both ends, the lifecycle actions leave theirs, a failed
migration says so on both ends, ``fd=N`` works, a bad value is one line.  A
real ``bash`` script waits for ``migration-receive-ready`` on a FIFO (no
sleep) before each send, twenty times in a row.  While a send runs,
``vm.info`` shows its live progress and ``vmm.ping`` on the receiver says it
listens, then receives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chmig.apiclient import ApiError, request
from chmig.events import EventMonitor, format_event, parse_event_monitor
from chmig.errors import UsageError

from .conftest import Processes, VmmProcess, requires_kvm
from .proxy import ThrottledProxy

pytestmark = [requires_kvm, pytest.mark.timeout(240)]

VM_ARGS = ("--cpus", "boot=1", "--memory", "size=32M", "--workload", "verify,dirty_percent=10")

#: The fields of Cloud Hypervisor's ``Event`` struct, in its order.
FIELDS = ["timestamp", "source", "event", "properties"]


def read_events(path: Path | str) -> list[dict]:
    """The events of a file, each checked to be byte for byte what Cloud Hypervisor writes."""
    text = Path(path).read_text()
    assert text == "" or text.endswith("\n\n"), text[-200:]
    events = []
    for chunk in text.split("\n\n")[:-1]:
        event = json.loads(chunk)
        assert list(event) == FIELDS, event
        assert json.dumps(event, indent=2, ensure_ascii=False) == chunk  # serde_json's pretty printing
        assert list(event["timestamp"]) == ["secs", "nanos"]
        assert isinstance(event["timestamp"]["secs"], int) and 0 <= event["timestamp"]["nanos"] < 10**9
        assert isinstance(event["source"], str) and isinstance(event["event"], str)
        properties = event["properties"]
        assert properties is None or all(isinstance(v, str) for v in properties.values()), event
        events.append(event)
    stamps = [(e["timestamp"]["secs"], e["timestamp"]["nanos"]) for e in events]
    assert stamps == sorted(stamps), "timestamps must not go back"
    return events


def names(events: list[dict]) -> list[str]:
    return [f"{e['source']} {e['event']}" for e in events]


def shut_down(vmm: VmmProcess) -> None:
    vmm.call("PUT", "vmm.shutdown")
    assert vmm.wait_exit(30) == 0, vmm.tail()


# -- the format and the option ----------------------------------------------------------------------


def test_event_format_is_serde_json_pretty() -> None:
    assert format_event(1_500_000_123, "vm", "migration-memory-iteration", {"id": "3"}) == (
        b'{\n  "timestamp": {\n    "secs": 1,\n    "nanos": 500000123\n  },\n  "source": "vm",\n'
        b'  "event": "migration-memory-iteration",\n  "properties": {\n    "id": "3"\n  }\n}\n\n')
    assert b'"properties": null\n}\n\n' in format_event(0, "vmm", "starting", None)


def test_event_monitor_option_rules(tmp_path: Path) -> None:
    assert parse_event_monitor("path=/tmp/ev") == ("/tmp/ev", None)
    assert parse_event_monitor("fd=7") == (None, 7)
    assert parse_event_monitor("path=/tmp/ev,fd=7") == (None, 7)  # Cloud Hypervisor: fd wins
    for bad, message in [("/tmp/ev", "path or fd required"), ("", "path or fd required"),
                         ("path=", "path= needs a file name"), ("fd=", "fd= needs a file descriptor"),
                         ("fd=x", "fd="), ("colour=blue", "unknown option 'colour'; known options: path, fd")]:
        with pytest.raises(UsageError, match=message):
            parse_event_monitor(bad)
    with pytest.raises(UsageError, match="is not an open file descriptor"):
        EventMonitor.open("fd=987")
    with pytest.raises(UsageError, match="cannot open"):
        EventMonitor.open(f"path={tmp_path}/no/such/dir/events")
    # A path is truncated, as Cloud Hypervisor opens it.
    (tmp_path / "ev").write_text("old contents\n")
    monitor = EventMonitor.open(f"path={tmp_path}/ev")
    monitor.emit("vmm", "starting")
    monitor.close()
    assert names(read_events(tmp_path / "ev")) == ["vmm starting"]


def test_a_reader_that_stops_reading_never_blocks_the_vmm(tmp_path: Path) -> None:
    """A FIFO nobody drains: emit stays instant, close() gives up by its deadline and says what was lost."""
    import time

    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads
    try:
        monitor = EventMonitor.open(f"path={fifo}")
        begin = time.monotonic()
        for n in range(10_000):
            monitor.emit("vm", "migration-memory-iteration", {"id": str(n)})
        assert time.monotonic() - begin < 5
        begin = time.monotonic()
        monitor.close(timeout=0.5)
        assert time.monotonic() - begin < 5
        assert not monitor.threads.alive()
        monitor.emit("vm", "after-close")  # a no-op, not an error
    finally:
        os.close(reader)


def test_bad_event_monitor_is_one_line(tmp_path: Path) -> None:
    for value, message in [("/tmp/events", "path or fd required"), ("fd=", "fd= needs"),
                           (f"path={tmp_path}/missing/events", "cannot open")]:
        done = subprocess.run([sys.executable, "-m", "chmig", "run", *VM_ARGS, "--serial", "off",
                               "--event-monitor", value], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (value, done.stderr)
        assert done.stderr.count("\n") == 1 and message in done.stderr, (value, done.stderr)
        assert "Traceback" not in done.stderr


# -- a full migration -----------------------------------------------------------------------------------


def test_precopy_migration_events_in_order(procs: Processes, tmp_path: Path) -> None:
    source_events, dest_events = tmp_path / "source.events", tmp_path / "dest.events"
    source = procs.run(*VM_ARGS, "--event-monitor", f"path={source_events}")
    source.wait_rounds(2)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--event-monitor", f"path={dest_events}")
    stats = source.call("PUT", "vm.send-migration", {"destination_url": url, "connections": 2}, timeout=150)
    assert source.wait_exit(30) == 0, source.tail()
    iterations = [e["iteration"] for e in stats["iterations"] if not e["final"]]
    assert iterations == list(range(len(iterations))) and iterations, stats["iterations"]

    events = read_events(source_events)
    assert names(events) == [
        "vmm starting", "vm booting", "vm booted", "vm migration-started",
        *["vm migration-memory-iteration"] * len(iterations),
        "vm pausing", "vm paused", "vm migration-finished", "vm deleted", "vmm shutdown",
    ]
    assert [e["properties"] for e in events if e["event"] == "migration-memory-iteration"] == [
        {"id": str(n)} for n in iterations]
    assert all(e["properties"] is None for e in events if e["event"] != "migration-memory-iteration")

    dest.wait_rounds(dest.info()["guest"]["rounds"] + 2)
    shut_down(dest)
    assert names(read_events(dest_events)) == [
        "vmm starting", "vm migration-receive-ready", "vm migration-receive-started",
        "vm restoring", "vm restored", "vm resuming", "vm resumed", "vm migration-receive-finished",
        "vm shutdown", "vm deleted", "vmm shutdown",
    ]


def test_postcopy_migration_events(procs: Processes, tmp_path: Path) -> None:
    """Postcopy: no iterations; the source says when the destination has every page, before it finishes."""
    source_events, dest_events = tmp_path / "source.events", tmp_path / "dest.events"
    source = procs.run(*VM_ARGS, "--event-monitor", f"path={source_events}")
    source.wait_rounds(1)
    dest, url = procs.receive("tcp:127.0.0.1:0", "--memory-mode", "postcopy",
                              "--event-monitor", f"path={dest_events}")
    source.call("PUT", "vm.send-migration", {"destination_url": url, "memory_mode": "postcopy"}, timeout=150)
    assert source.wait_exit(30) == 0, source.tail()
    assert names(read_events(source_events)) == [
        "vmm starting", "vm booting", "vm booted", "vm migration-started", "vm pausing", "vm paused",
        "vm postcopy-migration-completed", "vm migration-finished", "vm deleted", "vmm shutdown",
    ]
    dest.wait_rounds(dest.info()["guest"]["rounds"] + 2)
    shut_down(dest)
    assert names(read_events(dest_events)) == [
        "vmm starting", "vm migration-receive-ready", "vm migration-receive-started",
        "vm restoring", "vm restored", "vm resuming", "vm resumed", "vm migration-receive-finished",
        "vm shutdown", "vm deleted", "vmm shutdown",
    ]


def test_lifecycle_events(procs: Processes, tmp_path: Path) -> None:
    path = tmp_path / "vm.events"
    vmm = procs.run(*VM_ARGS, "--event-monitor", f"path={path}")
    vmm.wait_rounds(1)
    for action in ("vm.pause", "vm.resume", "vm.pause"):
        vmm.call("PUT", action)
    vmm.call("PUT", "vm.snapshot", {"destination_url": f"file://{tmp_path}/snap"})
    for action in ("vm.resume", "vm.shutdown", "vm.boot", "vm.delete"):
        vmm.call("PUT", action)
    with pytest.raises(ApiError):
        vmm.call("PUT", "vm.pause")  # no VM: refused, and no event
    vmm.call("PUT", "vm.delete")  # nothing to delete: Cloud Hypervisor answers Ok with no event
    shut_down(vmm)
    assert names(read_events(path)) == [
        "vmm starting", "vm booting", "vm booted",
        "vm pausing", "vm paused", "vm resuming", "vm resumed", "vm pausing", "vm paused",
        "vm snapshotting", "vm snapshotted", "vm resuming", "vm resumed",
        "vm shutdown", "vm booting", "vm booted", "vm shutdown", "vm deleted",
        "vmm shutdown",
    ]
    # The snapshot restores with its events (resume=true: then resumed, as a vm.resume would).
    restored_path = tmp_path / "restored.events"
    restored = procs.run("--restore", f"source_url=file://{tmp_path}/snap,resume=true",
                         "--event-monitor", f"path={restored_path}")
    restored.wait_rounds(restored.info()["guest"]["rounds"] + 1)
    shut_down(restored)
    assert names(read_events(restored_path)) == [
        "vmm starting", "vm restoring", "vm restored", "vm resuming", "vm resumed",
        "vm shutdown", "vm deleted", "vmm shutdown",
    ]


def test_failed_migration_events(procs: Processes, tmp_path: Path) -> None:
    """A postcopy source meets a precopy destination: refused at State; both ends report the failure."""
    source_events, dest_events = tmp_path / "source.events", tmp_path / "dest.events"
    source = procs.run(*VM_ARGS, "--event-monitor", f"path={source_events}")
    source.wait_rounds(1)
    dest, url = procs.receive(f"unix:{tmp_path}/migrate.sock", "--event-monitor", f"path={dest_events}")
    with pytest.raises(ApiError):
        source.call("PUT", "vm.send-migration", {"destination_url": url, "memory_mode": "postcopy"})
    assert dest.wait_exit(30) != 0
    assert source.info()["state"] == "Running"
    shut_down(source)
    assert names(read_events(source_events)) == [
        "vmm starting", "vm booting", "vm booted", "vm migration-started", "vm pausing", "vm paused",
        "vm resuming", "vm resumed", "vm migration-failed", "vm shutdown", "vm deleted", "vmm shutdown",
    ]
    assert names(read_events(dest_events)) == [
        "vmm starting", "vm migration-receive-ready", "vm migration-receive-started",
        "vm migration-receive-failed", "vmm shutdown",
    ]


def test_event_monitor_on_an_inherited_fd(tmp_path: Path) -> None:
    """``fd=N``: a pipe the parent reads, with blocking reads (the events tell when to act, no polling)."""
    api = str(tmp_path / "api.sock")
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "chmig", "--log-file", str(tmp_path / "log"), "run", *VM_ARGS,
                             "--serial", "off", "--api-socket", api, "--event-monitor", f"fd={write_end}"],
                            pass_fds=[write_end], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "r") as events:
            seen = []
            for line in events:
                if line.startswith('  "event": '):
                    seen.append(json.loads(line.split(": ", 1)[1].rstrip(",\n")))
                    if seen[-1] == "booted":
                        break
            # The VM booted; its API comes up just after: wait for it without sleeping on the events.
            from chmig.harness import VmmProcess, wait_api

            vmm = VmmProcess(proc, api, tmp_path / "log")  # type: ignore[arg-type]
            wait_api(vmm)
            # The inherited fd stays blocking: O_NONBLOCK would belong to the whole open file description,
            # which others share (with ``fd=3 3>&1`` it is the caller's standard output).
            flags = next(line for line in Path(f"/proc/{proc.pid}/fdinfo/{write_end}").read_text().splitlines()
                         if line.startswith("flags:"))
            assert not int(flags.split()[1], 8) & os.O_NONBLOCK, flags
            vmm.call("PUT", "vm.pause")
            vmm.call("PUT", "vmm.shutdown")
            rest = events.read()  # to the end: the monitor closes the fd when the process ends
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        assert seen == ["starting", "booting", "booted"]
        tail = [json.loads(chunk)["event"] for chunk in rest.split("\n\n") if chunk.strip().startswith("{")]
        assert tail == ["pausing", "paused", "shutdown", "deleted", "shutdown"], rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


# -- a script waits for migration-receive-ready, twenty times ----------------------------------------

HOPS = 20

#: Each hop starts a receiver whose event monitor is a FIFO, reads it until the receiver says it listens
#: (``read`` blocks: no sleep, no polling), sends the VM there, and lets the old source exit.
HOP_SCRIPT = r"""#!/bin/bash
set -euo pipefail
py=$1 dir=$2 api=$3 hops=$4
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT   # on a failure, no receiver is left behind
previous=
for n in $(seq 1 "$hops"); do
    fifo=$dir/events-$n.fifo
    mkfifo "$fifo"
    "$py" -m chmig --log-file "$dir/receive-$n.log" receive --listen "unix:$dir/migrate-$n.sock" \
        --api-socket "$dir/api-$n.sock" --serial off --event-monitor "path=$fifo" >"$dir/receive-$n.out" 2>&1 &
    receiver=$!
    exec 3<"$fifo"
    ready=no
    while IFS= read -r line <&3; do
        if [[ $line == *'"event": "migration-receive-ready"'* ]]; then ready=yes; break; fi
    done
    [[ $ready == yes ]] || { echo "hop $n: the receiver ended before it was ready" >&2; exit 1; }
    cat <&3 >"$dir/events-$n.rest" &   # the monitor keeps its reader
    exec 3<&-
    "$py" -m chmig remote --api-socket "$api" send-migration "destination_url=unix:$dir/migrate-$n.sock" \
        >"$dir/send-$n.out" 2>&1 || { echo "hop $n: send-migration failed: $(cat "$dir/send-$n.out")" >&2; exit 1; }
    if [[ -n $previous ]]; then wait "$previous"; fi   # the old source exits once the VM left it
    previous=$receiver
    api=$dir/api-$n.sock
done
curl -sf --unix-socket "$api" http://localhost/api/v1/vm.info >"$dir/final-info.json"
"$py" -m chmig remote --api-socket "$api" shutdown-vmm >/dev/null
wait
trap - EXIT
"""


def test_script_waits_for_receive_ready_twenty_times(procs: Processes, tmp_path: Path) -> None:
    source = procs.run(*VM_ARGS)
    before = source.wait_rounds(2)
    script = tmp_path / "hops.sh"
    script.write_text(HOP_SCRIPT)
    work = tmp_path / "hops"
    work.mkdir()
    done = subprocess.run(["bash", str(script), sys.executable, str(work), source.api, str(HOPS)],
                          capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr + "".join(
        f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(work.glob("receive-*.log"))[-2:])
    assert source.wait_exit(30) == 0
    final = json.loads((work / "final-info.json").read_text())
    assert final["state"] == "Running" and final["guest"]["errors"] == 0, final["guest"]
    assert final["guest"]["rounds"] >= before["guest"]["rounds"]
    for n in range(1, HOPS + 1):
        rest = (work / f"events-{n}.rest").read_text()
        assert '"event": "migration-receive-finished"' in rest, (n, rest)
        assert rest.rstrip().endswith('"event": "shutdown",\n  "properties": null\n}'), (n, rest[-300:])


# -- live progress, and the receiver's state in vmm.ping ------------------------------------------------


def test_live_progress_and_receive_state(procs: Processes, tmp_path: Path) -> None:
    source = procs.run("--cpus", "boot=1", "--memory", "size=32M", "--workload", "verify,dirty_percent=100")
    source.wait_rounds(1)
    dest, url = procs.receive("tcp:127.0.0.1:0")
    ping = dest.call("GET", "vmm.ping")
    assert ping["migration"] == {"kind": "receive-migration", "state": "listening", "address": url}
    proxy = ThrottledProxy(url, 16 << 20)  # iteration 0 (32 MiB) takes two seconds: time to watch it
    outcome: list[object] = []
    # The guest dirties faster than the link: after a second, finish anyway.
    options = {"destination_url": proxy.url, "timeout_s": 1, "timeout_strategy": "ignore"}
    sending = threading.Thread(target=lambda: outcome.append(source.call("PUT", "vm.send-migration", options)),
                               name="test-send")
    sending.start()
    try:
        info = source.wait_for(
            lambda i: (i.get("migration", {}).get("progress") or {}).get("iteration_sent", 0) > 0,
            what="bytes of iteration 0 sent")
        progress = info["migration"]["progress"]
        assert set(progress) == {"phase", "iteration", "iteration_bytes", "iteration_sent", "bandwidth_mib_s",
                                 "dirty_rate_mib_s", "estimated_downtime_ms"}
        assert progress["phase"] == "precopy" and progress["iteration"] == 0
        assert 0 < progress["iteration_sent"] <= progress["iteration_bytes"]
        assert progress["estimated_downtime_ms"] is None  # no bandwidth measured before the first iteration
        assert info["migration"]["status"] == "running" and info["migration"]["mode"] == "precopy"
        # It moves within the iteration.
        source.wait_for(lambda i: (i.get("migration", {}).get("progress") or {}).get("iteration_sent", 0)
                        > progress["iteration_sent"], what="more bytes sent")
        assert dest.call("GET", "vmm.ping")["migration"]["state"] == "receiving"
        sending.join(150)
    finally:
        proxy.close()
    assert outcome and isinstance(outcome[0], dict), outcome
    assert source.wait_exit(30) == 0
    assert "migration" not in dest.call("GET", "vmm.ping")
    assert dest.info()["migration"]["progress"] is None


def test_progress_is_none_without_a_send(procs: Processes) -> None:
    vmm = procs.run(*VM_ARGS)
    assert "migration" not in vmm.info()
    assert "migration" not in request(vmm.api, "GET", "vmm.ping")
