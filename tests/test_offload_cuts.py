"""The cut points of the offload daemon: the connection between a VMM and ``chmig offload`` cut at one message.

A :class:`~tests.faultproxy.FaultProxy` on UNIX sockets (it passes the MemoryFds' memfds on as SCM_RIGHTS) sits
between a real ``chmig run`` VMM and a real daemon process, and does one action (a FIN both ways, half a message
then a close, an injected Error) at one message of the main connection or of a Fault connection.  The VM has
two memory zones (32 MiB each: two slots, two MemoryFds) and runs the verify guest.

Snapshot (VMM → proxy → ``chmig offload snapshot``), the source paused or running when it sends:

* **cut before the completion reaches the daemon** (Start, the Ok to Start, each MemoryFd and its Ok,
  Config, its Ok, State, its Ok): send-migration answers an error, the VM is as it was (Running again, or
  still Paused) with ``migration.status`` ``failed`` and runs on with 0 errors; the daemon exits 1 with one
  error line and leaves no snapshot — no directory, no partial one, no socket file;
* **the completion cut** (it never reaches the daemon): the VMM cannot know whether it did, so its VM stays
  Paused (``unknown``) and resumes on request; the daemon exits 1 and leaves no snapshot;
* **the Ok to the completion cut** (the daemon had written the snapshot and answered): the snapshot is
  complete and verifies, the daemon exits 0; the VMM keeps its VM Paused (``unknown``), resumable.

Restore (``chmig offload restore`` → proxy → a VMM in ``vm.receive-migration``), eager and on demand:

* **before Complete** (every message up to the Ok to State, and Complete itself): the receiving VMM ends
  with a clear error and no VM (it stays up, empty); the daemon exits 1 with one error line.  Start cut:
  a connection that closes before its first request is a probe to the VMM, which goes on listening (and then
  takes the restore);
* **the Ok to Complete cut**: the VMM took the VM and runs it (0 errors); the daemon cannot know: eager, it
  exits 1; on demand it serves the pages anyway, and the VM becomes whole;
* **on demand, a Fault connection**: its role never arriving is survived over the other one; a PageFault
  or its answer cut, or answered Error, once the VMM runs the VM: the VMM stops the VM and exits non-zero,
  and the daemon exits 1 — it must not report a restore whose VM died.

Two restore cases found bugs in the daemon when they were written (fixed): a lost Ok to Complete made an
on-demand restore stop serving, so the VMM that had taken the VM lost it; and a Fault connection cut (or the
VMM failing) after the hand-over ended the daemon with success, having served a fraction of the pages.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from chmig.apiclient import ApiError
from chmig.harness import Processes, VmmProcess

from .conftest import BackgroundCall, requires_kvm
from .faultproxy import Action, Fault, FaultProxy, Point

pytestmark = [requires_kvm]

VM_ARGS = ("--cpus", "boot=1", "--memory", "size=32M", "--memory-zone", "id=z1,size=32M",
           "--workload", "verify,dirty_percent=10")
#: The completion: CompletePaused for a paused VM, Complete for a running one.
COMPLETION = "COMPLETION"

BEFORE = "before"        # cut before the completion reached the daemon / before Complete reached the VMM
COMPLETION_CUT = "completion"  # the completion request cut
ANSWERED = "answered"    # the Ok to the completion cut
WHOLE = "whole"          # on demand: the VM becomes whole anyway
FAILED = "failed"        # on demand: the VM fails after the hand-over
PROBE = "probe"          # restore: a main connection that closes before its first request is a probe to the VMM


@dataclass(frozen=True)
class Cut:
    key: str
    name: str
    action: Action
    expect: str
    answers: str | None = None
    nth: int = 1
    connection: str = "main"
    #: Count only messages once the Ok to Complete went through the proxy.
    after_complete: bool = False
    fault_connections: int = 1

    def __str__(self) -> str:
        return self.key

    def fault(self, completion: str, proxy: list[FaultProxy]) -> Fault:
        def acked() -> bool:
            return any(s.name == "Ok" and s.answers == "Complete" and s.connection == "main" for s in proxy[0].seen)

        name = completion if self.name == COMPLETION else self.name
        answers = completion if self.answers == COMPLETION else self.answers
        when = acked if self.after_complete else None
        return Fault(Point(name, self.connection, answers, self.nth, when), self.action)


def chmig(log: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "chmig", "-v", "--log-file", str(log), *args]


def one_error_line(code: int, err: str, what: str) -> list[str]:
    """Violations of "exit 1 with exactly one 'chmig offload: error:' line"."""
    lines = [line for line in err.splitlines() if line.strip()]
    problems = []
    if code != 1:
        problems.append(f"{what} exited {code}, expected 1")
    if len(lines) != 1 or not lines[0].startswith("chmig offload: error: ") or "Traceback" in err:
        problems.append(f"{what}: stderr is not one 'chmig offload: error:' line: {err[-800:]!r}")
    return problems


def vcpu_rounds(info: dict) -> list[int]:
    return [vcpu["rounds"] for vcpu in info["guest"]["vcpus"]]


def guest_goes_on(vmm: VmmProcess, more: int = 3, timeout: float = 30) -> str | None:
    """None if every vCPU completes ``more`` rounds with 0 errors, else what went wrong."""
    try:
        info = vmm.info()
        targets = [r + more for r in vcpu_rounds(info)]
        info = vmm.wait_for(lambda i: i["state"] == "Running" and all(r >= t for r, t in zip(vcpu_rounds(i), targets)),
                            timeout, f"{more} more rounds")
    except (ApiError, AssertionError) as exc:
        return f"the guest does not run: {str(exc)[:600]}"
    if info["guest"]["errors"]:
        return f"the guest counted {info['guest']['errors']} errors"
    return None


def leftovers(directory: Path) -> list[str]:
    return sorted(glob.glob(str(directory.parent / f".{directory.name}.partial-*")))


# ---------------------------------------------------------------------------------------------
# Snapshot: VMM → proxy → chmig offload snapshot
# ---------------------------------------------------------------------------------------------

SNAPSHOT_CUTS = [
    Cut("Start-fin", "Start", Action.FIN, BEFORE),
    Cut("Ok-Start-fin", "Ok", Action.FIN, BEFORE, answers="Start"),
    Cut("MemoryFd1-fin", "MemoryFd", Action.FIN, BEFORE),
    Cut("Ok-MemoryFd1-fin", "Ok", Action.FIN, BEFORE, answers="MemoryFd"),
    Cut("MemoryFd2-half", "MemoryFd", Action.HALF, BEFORE, nth=2),
    Cut("Ok-MemoryFd2-error", "Ok", Action.ERROR, BEFORE, answers="MemoryFd", nth=2),
    Cut("Config-half", "Config", Action.HALF, BEFORE),
    Cut("Ok-Config-fin", "Ok", Action.FIN, BEFORE, answers="Config"),
    Cut("State-fin", "State", Action.FIN, BEFORE),
    Cut("State-error", "State", Action.ERROR, BEFORE),
    Cut("Ok-State-fin", "Ok", Action.FIN, BEFORE, answers="State"),
    Cut("completion-fin", COMPLETION, Action.FIN, COMPLETION_CUT),
    Cut("Ok-completion-fin", "Ok", Action.FIN, ANSWERED, answers=COMPLETION),
]


class Source:
    """One source VM for every snapshot case, replaced when a case leaves it unhealthy."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.vmm: VmmProcess | None = None

    def get(self) -> VmmProcess:
        if self.vmm is not None:
            try:
                info = self.vmm.info()
                if info["state"] == "Paused":
                    self.vmm.call("PUT", "vm.resume")
                    info = self.vmm.info()
                if info["state"] == "Running" and info["guest"]["errors"] == 0:
                    return self.vmm
            except ApiError:
                pass
            self.vmm.stop()
        self.vmm = self.procs.run(*VM_ARGS)
        self.vmm.wait_rounds(2, 30)
        return self.vmm


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Source]:
    procs = Processes(tmp_path_factory.mktemp("offload-cuts-source"))
    yield Source(procs)
    procs.stop_all()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("paused", [True, False], ids=["paused", "running"])
@pytest.mark.parametrize("cut", SNAPSHOT_CUTS, ids=str)
def test_snapshot_cut(source: Source, tmp_path: Path, cut: Cut, paused: bool) -> None:
    vmm = source.get()
    if paused:
        vmm.call("PUT", "vm.pause")
    completion = "CompletePaused" if paused else "Complete"
    sock, directory = tmp_path / "offload.sock", tmp_path / "snapshot"
    daemon = subprocess.Popen(chmig(tmp_path / "daemon.log", "offload", "snapshot", "--socket", str(sock),
                                    "--output-dir", str(directory)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    holder: list[FaultProxy] = []
    problems: list[str] = []
    try:
        assert daemon.stdout is not None and "listening on" in daemon.stdout.readline()
        proxy = FaultProxy(f"unix:{sock}", f"unix:{tmp_path}/proxy.sock", fault=cut.fault(completion, holder))
        holder.append(proxy)
        with proxy:
            error: BaseException | None = None
            try:
                vmm.call("PUT", "vm.send-migration", {"destination_url": proxy.url, "local": True}, timeout=60)
            except ApiError as exc:
                error = exc
            if not proxy.fired.is_set():
                problems.append(f"the cut point was never reached: {error}")
            out, err = daemon.communicate(timeout=30)
        transcript = proxy.transcript()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()

    # The VMM.
    info = vmm.info()
    migration = info.get("migration") or {}
    if error is None:
        problems.append("send-migration answered success through a cut connection")
    if cut.expect == BEFORE:
        want_state, want_status = ("Paused" if paused else "Running"), "failed"
    else:  # the completion was sent: the VMM cannot know whether the daemon has the VM
        want_state, want_status = "Paused", "unknown"
    if info["state"] != want_state or migration.get("status") != want_status:
        problems.append(f"the source VM is {info['state']} with migration.status {migration.get('status')!r}, "
                        f"expected {want_state} and {want_status!r}")
    if info["state"] == "Paused":
        vmm.call("PUT", "vm.resume")
    problem = guest_goes_on(vmm)
    if problem:
        problems.append(f"source: {problem}")

    # The daemon and its directory.
    if cut.expect == ANSWERED:
        if daemon.returncode != 0 or "chmig offload: snapshot of 2 slot(s), 64 MiB" not in out:
            problems.append(f"the daemon answered the completion, yet exited {daemon.returncode}: {err!r}")
        verify = subprocess.run(chmig(tmp_path / "verify.log", "offload", "verify", "--input-dir", str(directory)),
                                capture_output=True, text=True, timeout=60)
        if verify.returncode != 0 or sorted(os.listdir(directory)) != [
                "manifest.json", "memory-0", "memory-1", "migration_config.json", "state.json"]:
            problems.append(f"the snapshot it answered for is not complete: {verify.stderr!r}")
    else:
        problems += one_error_line(daemon.returncode, err, "the daemon")
        if directory.exists():
            problems.append(f"a snapshot exists after a cut before the completion: {os.listdir(directory)}")
    if leftovers(directory) or sock.exists():
        problems.append(f"left behind: {leftovers(directory)} {'and the socket file' if sock.exists() else ''}")
    assert not problems, "\n".join([f"{cut} ({'paused' if paused else 'running'}):", *problems,
                                    "messages through the proxy:", transcript, f"daemon stderr: {err}"])


# ---------------------------------------------------------------------------------------------
# Restore: chmig offload restore → proxy → a VMM receiving
# ---------------------------------------------------------------------------------------------

RESTORE_CUTS = [
    Cut("Start-fin", "Start", Action.FIN, PROBE),
    Cut("Ok-Start-fin", "Ok", Action.FIN, BEFORE, answers="Start"),
    Cut("MemoryFd1-fin", "MemoryFd", Action.FIN, BEFORE),
    Cut("Ok-MemoryFd1-error", "Ok", Action.ERROR, BEFORE, answers="MemoryFd"),
    Cut("MemoryFd2-half", "MemoryFd", Action.HALF, BEFORE, nth=2),
    Cut("Ok-MemoryFd2-fin", "Ok", Action.FIN, BEFORE, answers="MemoryFd", nth=2),
    Cut("Config-half", "Config", Action.HALF, BEFORE),
    Cut("Ok-Config-fin", "Ok", Action.FIN, BEFORE, answers="Config"),
    Cut("State-half", "State", Action.HALF, BEFORE),
    Cut("Ok-State-fin", "Ok", Action.FIN, BEFORE, answers="State"),
    Cut("Complete-fin", "Complete", Action.FIN, COMPLETION_CUT),
    Cut("Ok-Complete-fin", "Ok", Action.FIN, ANSWERED, answers="Complete"),
]

ONDEMAND_CUTS = [
    Cut("ondemand-State-fin", "State", Action.FIN, BEFORE),
    Cut("ondemand-Ok-State-fin", "Ok", Action.FIN, BEFORE, answers="State"),
    Cut("ondemand-Complete-fin", "Complete", Action.FIN, COMPLETION_CUT),
    Cut("ondemand-Ok-Complete-fin", "Ok", Action.FIN, WHOLE, answers="Complete"),
    Cut("ondemand-fault-1-role-fin", "Fault", Action.FIN, WHOLE, connection="fault-1", fault_connections=2),
    Cut("ondemand-PageFault1-fin", "PageFault", Action.FIN, FAILED, connection="fault-*", after_complete=True),
    Cut("ondemand-PageFault5-half", "PageFault", Action.HALF, FAILED, connection="fault-*", nth=5,
        after_complete=True, fault_connections=2),
    Cut("ondemand-page3-fin", "Ok", Action.FIN, FAILED, answers="PageFault", connection="fault-*", nth=3,
        after_complete=True),
    Cut("ondemand-PageFault3-error", "PageFault", Action.ERROR, FAILED, connection="fault-*", nth=3,
        after_complete=True),
]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A snapshot of the two-zone verify guest, taken directly (no proxy), the source preserved."""
    tmp = tmp_path_factory.mktemp("offload-cuts-snapshot")
    procs = Processes(tmp)
    try:
        vmm = procs.run(*VM_ARGS)
        vmm.wait_rounds(3, 30)
        vmm.call("PUT", "vm.pause")
        directory = tmp / "snapshot"
        daemon = subprocess.Popen(chmig(tmp / "daemon.log", "offload", "snapshot", "--socket", str(tmp / "s.sock"),
                                        "--output-dir", str(directory)), stdout=subprocess.PIPE, text=True)
        assert daemon.stdout is not None and "listening on" in daemon.stdout.readline()
        vmm.call("PUT", "vm.send-migration", {"destination_url": f"unix:{tmp}/s.sock", "local": True,
                                               "preserve_source": True})
        assert daemon.wait(30) == 0
        daemon.stdout.close()
        yield directory
    finally:
        procs.stop_all()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cut", RESTORE_CUTS + ONDEMAND_CUTS, ids=str)
def test_restore_cut(snapshot: Path, procs: Processes, tmp_path: Path, cut: Cut) -> None:
    ondemand = cut.key.startswith("ondemand")
    vmm = procs.run()
    target = tmp_path / "vmm.sock"
    body: dict = {"receiver_url": f"unix:{target}"}
    if ondemand:
        body["memory_mode"] = "postcopy"
    receiving = BackgroundCall(vmm, "PUT", "vm.receive-migration", body, timeout=90)
    receiving.wait_for_file(target)
    holder: list[FaultProxy] = []
    proxy = FaultProxy(f"unix:{target}", f"unix:{tmp_path}/proxy.sock", fault=cut.fault("Complete", holder))
    holder.append(proxy)
    problems: list[str] = []
    flags = ["--resume"] + (["--ondemand", "--fault-connections", str(cut.fault_connections)] if ondemand else [])
    with proxy:
        daemon = subprocess.run(chmig(tmp_path / "restore.log", "offload", "restore", "--socket",
                                      str(tmp_path / "proxy.sock"), "--input-dir", str(snapshot), *flags),
                                capture_output=True, text=True, timeout=90)
        if not proxy.fired.is_set():
            problems.append("the cut point was never reached")
        refused = None if cut.expect == PROBE else receiving.result(60)
        vmm_exit = None
        if cut.expect == FAILED:
            try:
                vmm_exit = vmm.wait_exit(30)
            except subprocess.TimeoutExpired:
                problems.append("the VMM whose postcopy failed still runs 30 s later")
    transcript = proxy.transcript()

    if cut.expect == PROBE:
        # Closed before its first request: the VMM takes it for a probe and goes on listening; the daemon failed.
        problems += one_error_line(daemon.returncode, daemon.stderr, "the daemon")
        if receiving.outcome or not target.exists():
            problems.append(f"the VMM stopped listening after a connection that sent nothing: {receiving.outcome}")
        else:
            again = subprocess.run(chmig(tmp_path / "restore-again.log", "offload", "restore", "--socket",
                                         str(target), "--input-dir", str(snapshot), "--resume"),
                                   capture_output=True, text=True, timeout=90)
            if again.returncode != 0 or receiving.result(30) is not None:
                problems.append(f"the VMM could not receive after the probe: {again.stderr!r} {receiving.outcome}")
            else:
                problem = guest_goes_on(vmm)
                if problem:
                    problems.append(problem)
    elif cut.expect in (BEFORE, COMPLETION_CUT):
        # The VMM never took the VM: a clear error, no VM, and it stays up.
        problems += one_error_line(daemon.returncode, daemon.stderr, "the daemon")
        if not isinstance(refused, ApiError):
            problems.append(f"receive-migration did not answer an error: {refused!r}")
        elif "\n" in str(refused):
            problems.append(f"the VMM's error is not one line: {refused}")
        try:
            vmm.info()
            problems.append("the VMM has a VM after a restore cut before Complete")
        except ApiError as exc:
            if exc.status != 404:  # NoVmError (VM is not created)
                problems.append(f"vm.info: {exc}")
        if vmm.proc.poll() is not None:
            problems.append(f"the VMM exited ({vmm.proc.returncode})")
    elif cut.expect == ANSWERED:
        # The VMM got Complete: it runs the VM; the daemon cannot know that, and says so.
        problems += one_error_line(daemon.returncode, daemon.stderr, "the daemon")
        if refused is not None:
            problems.append(f"receive-migration failed: {refused}")
        else:
            problem = guest_goes_on(vmm)
            if problem:
                problems.append(problem)
    elif cut.expect == WHOLE:
        if refused is not None:
            problems.append(f"receive-migration failed: {refused}")
        else:
            try:
                vmm.wait_for(lambda i: ((i.get("migration") or {}).get("postcopy") or {}).get("status") == "whole",
                             30, "postcopy whole")
                problem = guest_goes_on(vmm)
                if problem:
                    problems.append(problem)
            except AssertionError as exc:
                problems.append(f"the VM did not become whole: {str(exc)[:800]}")
        if daemon.returncode != 0:
            problems.append(f"the daemon served every page, yet exited {daemon.returncode}: {daemon.stderr!r}")
    else:  # FAILED: the VMM had the VM and lost its pages' source
        problems += one_error_line(daemon.returncode, daemon.stderr, "the daemon")
        log = vmm.log.read_text()
        if refused is None:
            if vmm_exit == 0:
                problems.append("the VMM exited 0 after its postcopy failed")
            if "postcopy failed" not in log or "the VM stopped" not in log:
                problems.append("the VMM's log does not say postcopy failed and the VM stopped")
        # (receive-migration may also fail: the pager failed before Complete, and the VMM refused it.)
    assert not problems, "\n".join([f"{cut}:", *problems, "messages through the proxy:", transcript[-4000:],
                                    f"daemon stderr: {daemon.stderr}", vmm.tail(20)])
