"""``--trace FILE`` on real migrations: ``receive``, ``remote send-migration``/``receive-migration``, the offload daemon.

Each end writes the messages it sees, one JSON object a line, as they pass
(:class:`chmig.trace.TraceWriter`); ``chmig trace show`` reads them back and
draws them.  Kept small (32 MiB guests, one migration of each kind): the
traces' contents are checked in detail by the trace module's own tests.

* A 2-connection precopy over TCP traced on both ends: each file holds only
  its side, the source's main connection says Start, Config, State, Complete,
  and ``trace show`` draws the same diagram from the source's file alone as
  from both files (it tells a trace from the source's view when it has it).
* The offload daemon: a snapshot traced by the daemon, then an on-demand
  restore traced by the daemon and by the receiving VMM (``remote
  receive-migration --trace``), whose trace goes on after Complete, as long
  as pages come.
* Refusals: a trace file that cannot be written is one error line before
  ``receive`` listens, and an error answer to ``send-migration`` (the VM keeps
  running); the API refuses a relative or non-string ``trace`` with 400.
* ``trace`` appears in a request body only when given: without it, the body
  is Cloud Hypervisor's.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from chmig import trace
from chmig.apiclient import ApiError, request
from chmig.apiconfig import RECEIVE_MIGRATION_FIELDS, SEND_MIGRATION_FIELDS, ReceiveOptions, SendOptions
from chmig.options import OptionError

from .conftest import Processes, requires_kvm

SMALL_VM = ("--cpus", "boot=1", "--memory", "size=32M", "--workload", "verify")
#: The fields of every trace line (chmig.channel.Message.to_json).
FIELDS = {"time", "side", "connection", "direction", "kind", "name", "length", "data", "summary", "header"}


def chmig(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chmig", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd)


def lines_of(path: Path) -> list[dict]:
    """Every line of a trace file as JSON, each with (at least) the fields of a message."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records, f"{path} is empty"
    for record in records:
        assert FIELDS <= set(record), record
    return records


def names(records: list[dict], **match: str) -> list[str]:
    return [r["name"] for r in records if all(r[key] == value for key, value in match.items())]


# ---------------------------------------------------------------------------------------------
# Precopy, traced on both ends
# ---------------------------------------------------------------------------------------------


@requires_kvm
@pytest.mark.timeout(150)
def test_precopy_traced_by_receive_and_remote_send(procs: Processes, tmp_path: Path) -> None:
    source = procs.run(*SMALL_VM)
    source.wait_rounds(1)
    src, dst = tmp_path / "src.jsonl", tmp_path / "dst.jsonl"
    dest, url = procs.receive("tcp:127.0.0.1:0", "--trace", str(dst))
    # A relative FILE: chmig remote makes it absolute (here, tmp_path) before the VMM opens it.
    sent = chmig("remote", "--api-socket", source.api, "--quiet", "send-migration", "--trace", "src.jsonl",
                 f"destination_url={url},connections=2", cwd=tmp_path)
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["status"] == "completed"
    assert source.wait_exit(30) == 0, source.tail()
    info = dest.wait_for(lambda i: i["state"] == "Running" and i["migration"]["status"] == "completed",
                         what="the VM running on the destination")
    assert info["guest"]["errors"] == 0

    src_records, dst_records = lines_of(src), lines_of(dst)
    assert {r["side"] for r in src_records} == {"source"}
    assert {r["side"] for r in dst_records} == {"destination"}
    assert names(src_records, connection="main", kind="request") == ["Start", "Config", "State", "Complete"]
    assert names(dst_records, connection="main", kind="request") == ["Start", "Config", "State", "Complete"]
    for records in (src_records, dst_records):
        connections = {r["connection"] for r in records}
        assert {"memory-0", "memory-1"} <= connections, connections
        assert names(records, kind="request", name="Memory"), "no Memory request traced"
    # The bytes of guest memory the Memory requests moved: all of it (at least), the same on both ends.
    moved = [sum(r["data"] for r in records if r["kind"] == "request" and r["name"] == "Memory")
             for records in (src_records, dst_records)]
    assert moved[0] == moved[1] >= 30 << 20, moved  # iteration 0 moves every populated page of 32 MiB

    shown = chmig("trace", "show", str(src), "--mermaid", str(tmp_path / "out.mmd"))
    assert shown.returncode == 0, shown.stderr
    both = chmig("trace", "show", str(src), str(dst), "--mermaid", str(tmp_path / "both.mmd"))
    assert both.returncode == 0, both.stderr
    diagram = (tmp_path / "out.mmd").read_text()
    assert diagram.startswith("sequenceDiagram")
    assert (tmp_path / "both.mmd").read_text() == diagram
    assert trace.mermaid(trace.read_trace(src)) == diagram


# ---------------------------------------------------------------------------------------------
# The offload daemon: a snapshot, then an on-demand restore
# ---------------------------------------------------------------------------------------------


@requires_kvm
@pytest.mark.timeout(150)
def test_offload_snapshot_and_ondemand_restore_traced(procs: Processes, tmp_path: Path) -> None:
    source = procs.run(*SMALL_VM)
    source.wait_rounds(1)
    source.call("PUT", "vm.pause")
    snapshot, snap_trace = tmp_path / "snapshot", tmp_path / "snapshot.jsonl"
    daemon = subprocess.Popen([sys.executable, "-m", "chmig", "offload", "snapshot", "--socket",
                               str(tmp_path / "offload.sock"), "--output-dir", str(snapshot), "--trace",
                               str(snap_trace)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert daemon.stdout is not None
        assert "listening on" in daemon.stdout.readline()
        sent = source.call("PUT", "vm.send-migration",
                           {"destination_url": f"unix:{tmp_path / 'offload.sock'}", "local": True}, timeout=60)
        assert sent["status"] == "completed", sent
        out, err = daemon.communicate(timeout=60)
        assert daemon.returncode == 0, err
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate(timeout=10)
    records = lines_of(snap_trace)
    assert {r["side"] for r in records} == {"destination"}
    main = names(records, connection="main", kind="request")
    assert main[0] == "Start" and main[-3:] == ["Config", "State", "CompletePaused"], main
    assert set(main[1:-3]) == {"MemoryFd"}, main

    vmm = procs.run()  # an empty VMM receives the VM, by postcopy, traced through chmig remote
    sock, vmm_trace, restore_trace = tmp_path / "restore.sock", tmp_path / "vmm.jsonl", tmp_path / "restore.jsonl"
    receiving = subprocess.Popen([sys.executable, "-m", "chmig", "remote", "--api-socket", vmm.api,
                                  "receive-migration", "--trace", str(vmm_trace),
                                  f"receiver_url=unix:{sock},memory_mode=postcopy"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert receiving.stderr is not None
        assert receiving.stderr.readline().startswith("chmig remote: listening on"), receiving.stderr.read()
        restored = chmig("offload", "restore", "--socket", str(sock), "--input-dir", str(snapshot), "--resume",
                         "--ondemand", "--trace", str(restore_trace))
        assert restored.returncode == 0, restored.stderr
        out, err = receiving.communicate(timeout=60)
        assert receiving.returncode == 0, err
    finally:
        if receiving.poll() is None:
            receiving.send_signal(signal.SIGTERM)
            receiving.wait(10)
    info = vmm.wait_for(lambda i: i["state"] == "Running", what="the restored VM running")
    assert info["guest"]["errors"] == 0

    daemon_records, vmm_records = lines_of(restore_trace), lines_of(vmm_trace)
    assert {r["side"] for r in daemon_records} == {"source"}
    assert {r["side"] for r in vmm_records} == {"destination"}
    assert names(daemon_records, connection="main", kind="request")[-2:] == ["State", "Complete"]
    served = names(daemon_records, kind="request", name="PageFault")
    asked = names(vmm_records, kind="request", name="PageFault")
    assert served, "the daemon's trace has no PageFault"
    # The daemon exits once the VMM has closed its Fault connections, having asked for every page: by then
    # the VMM's trace holds every PageFault it sent, those after Complete too (it lasts until the VM is whole).
    assert len(asked) >= len(served), (len(asked), len(served))


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


@requires_kvm
@pytest.mark.timeout(60)
def test_receive_refuses_an_unwritable_trace_before_listening(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "x.jsonl"
    api = tmp_path / "api.sock"
    ended = chmig("receive", "--listen", "tcp:127.0.0.1:0", "--api-socket", str(api), "--trace", str(path),
                  timeout=30)
    assert ended.returncode == 2, (ended.stdout, ended.stderr)
    lines = ended.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("chmig receive: error: ") and str(path) in lines[0], lines
    assert "listening" not in ended.stdout
    assert not api.exists()


@requires_kvm
@pytest.mark.timeout(90)
def test_api_and_remote_refuse_a_bad_trace_and_the_vm_runs_on(procs: Processes, tmp_path: Path) -> None:
    source = procs.run(*SMALL_VM)
    before = source.wait_rounds(1)
    for action, body in (("vm.send-migration", {"destination_url": "tcp:127.0.0.1:1"}),
                         ("vm.receive-migration", {"receiver_url": "tcp:127.0.0.1:0"})):
        for bad, says in (("relative.jsonl", "absolute path"), ("", "absolute path"), (7, "must be a string"),
                          (None, "must be a string")):
            with pytest.raises(ApiError) as refused:
                request(source.api, "PUT", action, {**body, "trace": bad}, timeout=30)
            assert refused.value.status == 400 and says in str(refused.value), (action, bad, refused.value)
    assert not (tmp_path / "relative.jsonl").exists()

    path = tmp_path / "no-such-dir" / "src.jsonl"
    sent = chmig("remote", "--api-socket", source.api, "--quiet", "send-migration", "--trace", str(path),
                 "destination_url=tcp:127.0.0.1:1")
    assert sent.returncode != 0 and sent.stdout == ""
    assert "cannot write the trace file" in sent.stderr and str(path) in sent.stderr, sent.stderr
    after = source.wait_rounds(before["guest"]["rounds"] + 2)
    assert after["state"] == "Running" and after["guest"]["errors"] == 0
    assert after.get("migration") is None or after["migration"]["status"] != "running", after["migration"]


# ---------------------------------------------------------------------------------------------
# The request bodies
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_trace_is_in_a_body_only_when_given() -> None:
    plain = SendOptions.parse("destination_url=tcp:1.2.3.4:5,connections=2")
    assert "trace" not in plain.to_api()
    traced = SendOptions.from_api({**plain.to_api(), "trace": "/var/tmp/src.jsonl"})
    assert traced.trace == "/var/tmp/src.jsonl"
    assert traced.to_api() == {**plain.to_api(), "trace": "/var/tmp/src.jsonl"}
    assert list(traced.to_api())[-1] == "trace"  # after Cloud Hypervisor's fields
    assert SendOptions.from_api(json.loads(json.dumps(traced.to_api()))) == traced

    receive = ReceiveOptions.parse("receiver_url=tcp:0.0.0.0:6000")
    assert "trace" not in receive.to_api()
    traced_receive = ReceiveOptions.from_api({**receive.to_api(), "trace": "/var/tmp/dst.jsonl"})
    assert traced_receive.to_api() == {**receive.to_api(), "trace": "/var/tmp/dst.jsonl"}
    # Known fields (the last, after CH's), but no option-string key: the flag is the way in.
    assert list(SEND_MIGRATION_FIELDS)[-1] == "trace" and list(RECEIVE_MIGRATION_FIELDS)[-1] == "trace"
    for parse, text in ((SendOptions.parse, "destination_url=tcp:1.2.3.4:5,trace=/var/tmp/x"),
                        (ReceiveOptions.parse, "receiver_url=tcp:0.0.0.0:6000,trace=/var/tmp/x")):
        with pytest.raises(OptionError, match="unknown option 'trace'"):
            parse(text)
