"""The offload daemon (``chmig offload snapshot|restore|verify``): real KVM guests, real chmig processes, real sockets.

A ``chmig run`` VMM snapshots its VM by a local migration to ``chmig offload snapshot`` and an empty
``chmig run`` VMM restores it by receiving a local migration from ``chmig offload restore`` (Cloud
Hypervisor's "Offload Snapshot and Restore").  The verify guest judges every restore: it must go on from
the rounds it had when it was paused, for at least two more full rounds on every vCPU, with 0 errors.

* Snapshot, then restore eagerly and on demand, resumed by the daemon or left paused and resumed through
  the API, into fresh VMMs; ``--fault-connections 2``; a snapshot without ``manifest.json`` (as Cloud
  Hypervisor's daemon writes it) restores unverified.
* The source: without ``preserve_source`` its VMM retires the VM (exits); with it, the VM stays paused and
  resumes.
* The files: ``migration_config.json`` and ``state.json`` are the Config and State payloads byte for byte,
  ``memory-<slot>`` has the slot's size and is sparse, ``chmig offload verify`` passes; a 512 GiB guest's
  snapshot (its manifest over 16 MiB) restores too.
* Crash safety: the daemon killed at several moments of a snapshot leaves no snapshot (or the previous one,
  intact), and the next snapshot to the same directory and socket works; only the target's own dead partial
  directories are removed.
* Corruption: one flipped byte is refused before anything is sent (eager), fails the restore loudly (on
  demand: the receiving VMM stops its VM), and is reported by ``verify``.  A missing or truncated file, or
  no VMM listening, is one clear error line; ``--ondemand`` into a VMM receiving by precopy is refused.
* The socket: a second daemon is refused, a stale socket file is replaced; an Abandon leaves no snapshot.

Three of these found bugs in the daemon when they were written (fixed): the on-demand refusal repeated
"State: State:"; a snapshot of a guest over ~470 GiB was written and acknowledged but its manifest was too
big to be read back (a fixed 16 MiB limit); a target named like a glob pattern ("snap[1]") had another
target's dead partial directories removed, not its own.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from chmig import protocol as p
from chmig.apiclient import ApiError
from chmig import offload
from chmig.channel import Channel, IncomingRequest
from chmig.harness import Processes, VmmProcess
from chmig.offload import SnapshotImage, SnapshotReceiver, is_snapshot_file
from chmig.snapshot_dir import CHUNK_SIZE, SnapshotWriter, verify_directory
from chmig.transport import Url, connect

from .conftest import BackgroundCall, requires_kvm
from .wire import RAM, config_payload

MiB = 1 << 20
PAGE_SIZE = 4096

#: The VM every restore test restores: two vCPUs, every page of its 128 MiB written by the verify guest.
VM_ARGS = ("--cpus", "boot=2", "--memory", "size=128M", "--workload", "verify")
VM_BYTES = 128 * MiB
#: A smaller one for tests that need a source of their own.
SMALL_VM_ARGS = ("--cpus", "boot=1", "--memory", "size=64M", "--workload", "verify")
FILES = {"memory-0", "migration_config.json", "state.json", "manifest.json"}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def chmig(log: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "chmig", "-v", "--log-file", str(log), *args]


@dataclass
class Ended:
    """How a ``chmig offload`` process ended."""

    code: int
    out: str
    err: str

    def error_line(self) -> str:
        """The one error line on stderr (asserted: exactly one, ``chmig offload: error: ...``, no traceback)."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert self.code == 1, f"exit {self.code}, expected 1: {self.out!r} {self.err!r}"
        assert len(lines) == 1 and lines[0].startswith("chmig offload: error: "), self.err
        assert "Traceback" not in self.err and "internal error" not in self.err, self.err
        return lines[0]

    def summary(self) -> str:
        """The one summary line on stdout of a daemon that succeeded."""
        assert self.code == 0, f"exit {self.code}: {self.out!r} {self.err!r}"
        lines = [line for line in self.out.splitlines() if line.startswith("chmig offload: ")]
        assert lines, self.out
        return lines[-1]


class SnapshotDaemon:
    """A ``chmig offload snapshot`` process, listening."""

    def __init__(self, tmp: Path, sock: Path, out: Path, name: str = "snapshot-daemon") -> None:
        self.sock = sock
        self.out = out
        self.log = tmp / f"{name}-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(chmig(self.log, "offload", "snapshot", "--socket", str(sock),
                                           "--output-dir", str(out)),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.first_line = self.proc.stdout.readline()

    def listening(self) -> SnapshotDaemon:
        assert self.first_line == f"chmig offload: listening on {self.sock}\n", (self.first_line, self.tail())
        return self

    def finish(self, timeout: float = 60) -> Ended:
        out, err = self.proc.communicate(timeout=timeout)
        return Ended(self.proc.returncode, self.first_line + out, err)

    def tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


@pytest.fixture
def daemons() -> Iterator[list[SnapshotDaemon]]:
    started: list[SnapshotDaemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def start_daemon(daemons: list[SnapshotDaemon], tmp: Path, sock: Path, out: Path) -> SnapshotDaemon:
    daemon = SnapshotDaemon(tmp, sock, out)
    daemons.append(daemon)
    return daemon.listening()


def restore(tmp: Path, sock: Path, directory: Path, *flags: str, timeout: float = 90) -> Ended:
    """``chmig offload restore`` to completion."""
    log = tmp / f"restore-{time.monotonic_ns()}.log"
    done = subprocess.run(chmig(log, "offload", "restore", "--socket", str(sock), "--input-dir", str(directory),
                                *flags), capture_output=True, text=True, timeout=timeout)
    return Ended(done.returncode, done.stdout, done.stderr)


def verify(tmp: Path, directory: Path) -> Ended:
    done = subprocess.run(chmig(tmp / "verify.log", "offload", "verify", "--input-dir", str(directory)),
                          capture_output=True, text=True, timeout=60)
    return Ended(done.returncode, done.stdout, done.stderr)


def receive(vmm: VmmProcess, sock: Path, postcopy: bool = False) -> BackgroundCall:
    """``vm.receive-migration`` on ``unix:sock`` from a thread, returned once the socket listens."""
    body: dict = {"receiver_url": f"unix:{sock}"}
    if postcopy:
        body["memory_mode"] = "postcopy"
    call = BackgroundCall(vmm, "PUT", "vm.receive-migration", body)
    call.wait_for_file(sock)
    assert sock.exists(), f"the VMM does not listen on {sock}: {call.result(1)}\n{vmm.tail()}"
    return call


def send_local(vmm: VmmProcess, sock: Path, preserve: bool = False, timeout: float = 60) -> dict:
    body: dict = {"destination_url": f"unix:{sock}", "local": True}
    if preserve:
        body["preserve_source"] = True
    return vmm.call("PUT", "vm.send-migration", body, timeout=timeout)


def vcpu_rounds(info: dict) -> list[int]:
    return [vcpu["rounds"] for vcpu in info["guest"]["vcpus"]]


def guest_goes_on(vmm: VmmProcess, since: list[int], more: int = 3, timeout: float = 60) -> dict:
    """The guest runs: every vCPU ``more`` rounds past ``since`` (+3: two full rounds after the one under way),
    0 errors throughout."""
    targets = [rounds + more for rounds in since]
    info = vmm.wait_for(lambda i: i["state"] == "Running" and all(r >= t for r, t in zip(vcpu_rounds(i), targets)),
                        timeout, f"{more} more rounds on every vCPU")
    assert info["guest"]["errors"] == 0, info["guest"]
    return info


def postcopy_status(info: dict) -> str | None:
    return ((info.get("migration") or {}).get("postcopy") or {}).get("status")


def no_vm(vmm: VmmProcess) -> bool:
    try:
        vmm.info()
    except ApiError as exc:
        return exc.status == 404  # NoVmError: Cloud Hypervisor's VmNotCreated
    return False


def partials(directory: Path) -> list[str]:
    return sorted(glob.glob(str(directory.parent / f".{directory.name}.partial-*")))


def copy_snapshot(source: Path, target: Path, *writable: str) -> Path:
    """A copy of a snapshot directory: hard links, except real (sparse) copies of the files to be changed."""
    target.mkdir()
    for entry in source.iterdir():
        if entry.name in writable:
            subprocess.run(["cp", "--sparse=always", str(entry), str(target / entry.name)], check=True)
        else:
            os.link(entry, target / entry.name)
    return target


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x5A]))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# One snapshot of a 2-vCPU verify guest for the module (taken without preserve_source)
# ---------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    directory: Path
    #: vm.info of the source, paused, just before the snapshot.
    paused: dict
    sent: dict
    daemon: Ended
    source_exit: int | None
    leftovers: list[str]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snapshot]:
    tmp = tmp_path_factory.mktemp("offload")
    procs = Processes(tmp)
    try:
        source = procs.run(*VM_ARGS)
        source.wait_for(lambda i: min(vcpu_rounds(i)) >= 2, 60, "two rounds on every vCPU")
        source.call("PUT", "vm.pause")
        paused = source.info()
        directory = tmp / "snapshot"
        daemon = SnapshotDaemon(tmp, tmp / "offload.sock", directory).listening()
        try:
            sent = send_local(source, tmp / "offload.sock")
            ended = daemon.finish()
        finally:
            daemon.stop()
        try:
            code: int | None = source.wait_exit(30)
        except subprocess.TimeoutExpired:
            code = None
        leftovers = sorted(name for name in os.listdir(tmp) if name.startswith((".snapshot", "offload.sock")))
        yield Snapshot(directory, paused, sent, ended, code, leftovers)
    finally:
        procs.stop_all()


@requires_kvm
@pytest.mark.timeout(120)
def test_snapshot_by_the_daemon_retires_the_source_vm(snapshot: Snapshot) -> None:
    """The daemon takes the local migration, writes the four files, answers, exits 0; the VMM, not asked to
    preserve its source, retires the VM and exits, as after any local migration."""
    summary = snapshot.daemon.summary()
    assert "snapshot of 1 slot(s), 128 MiB of RAM" in summary and "the VMM sent CompletePaused" in summary, summary
    assert snapshot.sent["status"] == "completed" and snapshot.sent["mode"] == "local", snapshot.sent
    assert snapshot.paused["state"] == "Paused" and snapshot.paused["guest"]["errors"] == 0
    assert snapshot.source_exit == 0, "the source VMM did not retire the VM it snapshotted"
    assert set(os.listdir(snapshot.directory)) == FILES
    # No partial directory left, the socket file removed (its lock file stays, as the reference daemon's).
    assert snapshot.leftovers == ["offload.sock.lock"], snapshot.leftovers


# ---------------------------------------------------------------------------------------------
# Restores: eager and on demand, resumed by the daemon or through the API
# ---------------------------------------------------------------------------------------------

RESTORES = [
    pytest.param(False, True, 1, id="eager-resume"),
    pytest.param(False, False, 1, id="eager-paused"),
    pytest.param(True, True, 1, id="ondemand-resume"),
    pytest.param(True, False, 2, id="ondemand-paused-2-fault-connections"),
]


@requires_kvm
@pytest.mark.timeout(150)
@pytest.mark.parametrize("ondemand,resume,fault_connections", RESTORES)
def test_restore_into_a_fresh_vmm(snapshot: Snapshot, procs: Processes, tmp_path: Path, ondemand: bool,
                                  resume: bool, fault_connections: int) -> None:
    vmm = procs.run()
    sock = tmp_path / "restore.sock"
    call = receive(vmm, sock, postcopy=ondemand)
    flags = [*(["--resume"] if resume else []), *(["--ondemand"] if ondemand else [])]
    if fault_connections != 1:
        flags += ["--fault-connections", str(fault_connections)]
    ended = restore(tmp_path, sock, snapshot.directory, *flags)
    summary = ended.summary()
    assert call.result() is None, call.outcome
    assert "restored 1 slot(s), 128 MiB of RAM" in summary and "(verified)" in summary, summary
    assert ("VM resumed" if resume else "VM left paused") in summary, summary
    info = vmm.info()
    if ondemand:
        # The daemon returns once the VMM closed its Fault connections: the VM is whole by then.
        assert f"over {fault_connections} Fault connection(s)" in summary, summary
        assert f"{VM_BYTES // PAGE_SIZE} page(s) written" in summary, summary
        pc = info["migration"]["postcopy"]
        assert pc["status"] == "whole" and pc["error"] is None, pc
        assert pc["fault_connections"] == fault_connections and pc["pages_total"] == VM_BYTES // PAGE_SIZE, pc
    else:
        assert "MiB of data copied" in summary, summary
    paused_rounds = vcpu_rounds(snapshot.paused)
    assert all(now >= then for now, then in zip(vcpu_rounds(info), paused_rounds)), (info["guest"], paused_rounds)
    if not resume:
        assert info["state"] == "Paused", info["state"]
        time.sleep(0.2)
        assert vcpu_rounds(vmm.info()) == vcpu_rounds(info), "a paused VM ran"
        vmm.call("PUT", "vm.resume")
    guest_goes_on(vmm, vcpu_rounds(info))
    assert vmm.proc.poll() is None


@requires_kvm
@pytest.mark.timeout(120)
@pytest.mark.parametrize("ondemand", [False, True], ids=["eager", "ondemand"])
def test_a_snapshot_without_manifest_restores_unverified(snapshot: Snapshot, procs: Processes, tmp_path: Path,
                                                         ondemand: bool) -> None:
    """As one written by Cloud Hypervisor's own daemon: restored, said to be unverified; verify refuses it."""
    directory = copy_snapshot(snapshot.directory, tmp_path / "ch-snapshot")
    (directory / "manifest.json").unlink()
    refused = verify(tmp_path, directory).error_line()
    assert "has no manifest.json" in refused, refused
    vmm = procs.run()
    sock = tmp_path / "restore.sock"
    call = receive(vmm, sock, postcopy=ondemand)
    summary = restore(tmp_path, sock, directory, "--resume", *(["--ondemand"] if ondemand else [])).summary()
    assert call.result() is None, call.outcome
    assert "unverified: no manifest" in summary, summary
    guest_goes_on(vmm, vcpu_rounds(vmm.info()))


@requires_kvm
@pytest.mark.timeout(120)
def test_ondemand_restore_into_a_precopy_vmm_is_refused(snapshot: Snapshot, procs: Processes,
                                                        tmp_path: Path) -> None:
    vmm = procs.run()
    sock = tmp_path / "restore.sock"
    call = receive(vmm, sock, postcopy=False)
    line = restore(tmp_path, sock, snapshot.directory, "--ondemand", "--resume").error_line()
    assert "memory_mode=postcopy" in line, line
    assert "State: State:" not in line, line
    assert isinstance(call.result(), ApiError)
    assert no_vm(vmm) and vmm.proc.poll() is None


# ---------------------------------------------------------------------------------------------
# The source, with preserve_source
# ---------------------------------------------------------------------------------------------


@requires_kvm
@pytest.mark.timeout(120)
def test_preserve_source_leaves_the_vm_paused_and_resumable(procs: Processes, tmp_path: Path,
                                                            daemons: list[SnapshotDaemon]) -> None:
    source = procs.run(*SMALL_VM_ARGS)
    source.wait_rounds(2, 60)
    source.call("PUT", "vm.pause")
    daemon = start_daemon(daemons, tmp_path, tmp_path / "offload.sock", tmp_path / "snapshot")
    sent = send_local(source, tmp_path / "offload.sock", preserve=True)
    assert sent["status"] == "completed", sent
    assert "snapshot of 1 slot(s), 64 MiB" in daemon.finish().summary()
    time.sleep(0.3)
    assert source.proc.poll() is None, "the source VMM exited although preserve_source was asked"
    info = source.info()
    assert info["state"] == "Paused" and info["migration"]["status"] == "completed", info
    source.call("PUT", "vm.resume")
    guest_goes_on(source, vcpu_rounds(info))
    intact = verify(tmp_path, tmp_path / "snapshot")
    assert intact.code == 0 and "is intact" in intact.out, intact


# ---------------------------------------------------------------------------------------------
# The files
# ---------------------------------------------------------------------------------------------


@requires_kvm
@pytest.mark.timeout(120)
def test_the_snapshot_files(procs: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """migration_config.json and state.json hold the Config and State payloads byte for byte; memory-0 has the
    slot's size and, for a guest that touched little of its RAM, few blocks; verify checks every file.

    The daemon runs in this process, its Config and State steps observed (the payloads kept as they came)."""
    source = procs.run("--cpus", "boot=1", "--memory", "size=128M", "--workload", "idle")
    source.wait_for(lambda i: i["guest"]["ticks"] >= 2, 30, "two idle ticks")
    directory = tmp_path / "snapshot"
    payloads: dict[str, bytes] = {}
    for command, step in ((p.Command.CONFIG, SnapshotReceiver.on_config), (p.Command.STATE, SnapshotReceiver.on_state)):
        def observed(daemon: SnapshotReceiver, incoming: IncomingRequest, step=step) -> None:  # noqa: ANN001
            payloads[incoming.command.wire_name] = bytes(incoming.payload)
            step(daemon, incoming)

        monkeypatch.setitem(offload.SNAPSHOT_STEPS, command, observed)
    receiver = SnapshotReceiver(tmp_path / "offload.sock", directory)
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(_run_or_error(receiver)), name="test-daemon")
    thread.start()
    try:
        wait_until(lambda: (tmp_path / "offload.sock").exists() or not thread.is_alive(), 20, "the daemon")
        send_local(source, tmp_path / "offload.sock", preserve=True)
    finally:
        thread.join(30)
    result = outcome[0]
    assert not isinstance(result, BaseException), result
    assert (directory / "migration_config.json").read_bytes() == payloads["Config"]
    assert (directory / "state.json").read_bytes() == payloads["State"]
    json.loads(payloads["State"])
    mappings = p.parse_slot_mappings(json.loads(payloads["Config"]))
    assert [(m.slot, m.size, m.file_offset) for m in mappings] == [(0, 128 * MiB, 0)], mappings
    memory = os.stat(directory / "memory-0")
    assert memory.st_size == 128 * MiB
    assert memory.st_blocks * 512 < 8 * MiB, f"memory-0 is not sparse: {memory.st_blocks * 512} bytes on disk"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert set(manifest["files"]) == FILES - {"manifest.json"}, manifest["files"].keys()
    assert len(manifest["files"]["memory-0"]["chunks"]) == 128 * MiB // CHUNK_SIZE
    checked = verify(tmp_path, directory)
    assert checked.code == 0, checked
    for name in FILES - {"manifest.json"}:
        assert f"chmig offload verify: {name}: " in checked.out, checked.out
    # The source was preserved: it resumes and runs on.
    source.call("PUT", "vm.resume")
    ticks = source.info()["guest"]["ticks"]
    source.wait_for(lambda i: i["state"] == "Running" and i["guest"]["ticks"] >= ticks + 2, 30, "two more ticks")


def _run_or_error(receiver: SnapshotReceiver) -> object:
    try:
        return receiver.run()
    except BaseException as exc:  # judged by the test
        return exc


@pytest.mark.timeout(120)
def test_a_snapshot_of_a_512_gib_guest_can_be_restored(tmp_path: Path) -> None:
    """A big guest's manifest (one digest per 2 MiB) must not outgrow what the restore agrees to read: the
    daemon answers Ok to the completion, the VMM drops its VM, and this snapshot is then all there is."""
    size = 512 << 30
    sock, directory = tmp_path / "offload.sock", tmp_path / "big"
    receiver = SnapshotReceiver(sock, directory)
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(_run_or_error(receiver)), name="test-daemon")
    thread.start()
    memfd = os.memfd_create("test-big", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, size)
        os.pwrite(memfd, b"chmig" * 800, 300 << 30)
        wait_until(lambda: sock.exists() or not thread.is_alive(), 20, "the daemon")
        config = json.dumps({"memory_manager_data": {"guest_ram_mappings": [
            {"slot": 0, "gpa": 0, "size": size, "file_offset": 0}]}}).encode()
        with Channel(connect(Url.unix(str(sock))), side=p.Side.SOURCE) as channel:
            channel.request_ok(p.Request.start())
            channel.send_memory_fd(0, memfd)
            channel.request_ok(p.Request.config(len(config)), config)
            channel.request_ok(p.Request.state(2), b"{}")
            channel.request_ok(p.Request.complete_paused())
    finally:
        os.close(memfd)
        thread.join(60)
    assert not isinstance(outcome[0], BaseException), outcome[0]
    image = SnapshotImage(directory)
    try:
        assert image.verified and image.mappings[0].size == size
        for _, verifier in image.files.values():
            verifier.check_all()
    finally:
        image.close()
    assert len(verify_directory(directory)) == 3


# ---------------------------------------------------------------------------------------------
# Crash safety: the daemon killed during a snapshot
# ---------------------------------------------------------------------------------------------

KILL_MOMENTS = [
    pytest.param("connected", False, id="connected"),
    pytest.param("config", False, id="after-config"),
    pytest.param("memory", False, id="writing-memory"),
    pytest.param("memory", True, id="writing-memory-over-a-previous-snapshot"),
]


@requires_kvm
@pytest.mark.timeout(150)
@pytest.mark.parametrize("moment,previous", KILL_MOMENTS)
def test_the_daemon_killed_during_a_snapshot(procs: Processes, tmp_path: Path, daemons: list[SnapshotDaemon],
                                             moment: str, previous: bool) -> None:
    source = procs.run("--cpus", "boot=1", "--memory", "size=128M", "--workload", "verify")
    source.wait_rounds(2, 60)
    source.call("PUT", "vm.pause")
    sock, directory = tmp_path / "offload.sock", tmp_path / "snapshot"
    manifest_before = None
    if previous:
        start_daemon(daemons, tmp_path, sock, directory)
        send_local(source, sock, preserve=True)
        assert daemons[-1].finish().code == 0
        manifest_before = (directory / "manifest.json").read_bytes()

    daemon = start_daemon(daemons, tmp_path, sock, directory)
    sending = BackgroundCall(source, "PUT", "vm.send-migration",
                             {"destination_url": f"unix:{sock}", "local": True}, timeout=60)
    mine = f".{directory.name}.partial-{daemon.proc.pid}-"

    def reached() -> bool:
        if moment == "connected":
            return "the VMM connected" in daemon.tail()
        name = "migration_config.json" if moment == "config" else "memory-0"
        return any(os.path.exists(os.path.join(path, name)) for path in partials(directory) if mine in path)

    wait_until(reached, 30, f"the moment '{moment}'")
    daemon.proc.kill()
    assert daemon.proc.wait(10) == -signal.SIGKILL

    error = sending.result(60)
    assert isinstance(error, ApiError), f"send-migration did not fail: {error}"
    info = source.info()
    status = info["migration"]["status"]
    assert info["state"] == "Paused", info["state"]  # it was paused; it stays so, with its memory
    # Killed once Complete was sent (writing memory), the VMM cannot know: it keeps the VM paused, outcome
    # unknown.  Before, it failed (the earlier moments are reached a few milliseconds before Complete).
    complete_sent = "Complete was sent" in str(error)
    assert status == ("unknown" if complete_sent else "failed"), info["migration"]
    assert complete_sent or moment != "memory", str(error)
    # What the killed daemon left: its partial directory and its socket file; never a snapshot at the target.
    assert any(mine in path for path in partials(directory)), os.listdir(tmp_path)
    assert sock.exists()
    if previous:
        assert (directory / "manifest.json").read_bytes() == manifest_before, "the previous snapshot changed"
        assert verify(tmp_path, directory).code == 0
    else:
        assert not directory.exists(), os.listdir(directory)
        line = restore(tmp_path, tmp_path / "nobody.sock", directory).error_line()
        assert "no such snapshot directory" in line, line

    # The next snapshot to the same socket and directory: the stale socket is replaced, the dead partial removed.
    dead = daemon.proc.pid
    daemon = start_daemon(daemons, tmp_path, sock, directory)
    assert not any(f".partial-{dead}-" in path for path in partials(directory)), partials(directory)
    sent = send_local(source, sock, preserve=True)
    assert sent["status"] == "completed", sent
    assert "snapshot of 1 slot(s), 128 MiB" in daemon.finish().summary()
    assert partials(directory) == [] and not sock.exists()
    assert verify(tmp_path, directory).code == 0
    if previous:
        assert (directory / "manifest.json").read_bytes() != manifest_before
    source.call("PUT", "vm.resume")
    guest_goes_on(source, vcpu_rounds(info))


# ---------------------------------------------------------------------------------------------
# Corruption: one flipped byte
# ---------------------------------------------------------------------------------------------

#: In chunk 2 (4..6 MiB) of memory-0: a page the verify guest wrote.
FLIP_AT = 5 * MiB + 123


@requires_kvm
@pytest.mark.timeout(150)
def test_a_flipped_byte_is_refused_before_an_eager_restore_sends_anything(snapshot: Snapshot, procs: Processes,
                                                                         tmp_path: Path) -> None:
    directory = copy_snapshot(snapshot.directory, tmp_path / "corrupt", "memory-0")
    flip_byte(directory / "memory-0", FLIP_AT)
    reported = verify(tmp_path, directory).error_line()
    assert "memory-0" in reported and "(chunk 2)" in reported and "corrupt" in reported, reported

    vmm = procs.run()
    sock = tmp_path / "restore.sock"
    call = receive(vmm, sock)
    line = restore(tmp_path, sock, directory, "--resume").error_line()
    assert "memory-0" in line and "(chunk 2)" in line, line
    # Nothing was sent: the VMM is still empty and still waiting for a migration.
    assert call.thread.is_alive(), call.outcome
    assert no_vm(vmm)
    assert "accepted" not in vmm.log.read_text().split("waiting for a migration", 1)[-1]
    # ... and it can still receive one: the same snapshot, mended.
    flip_byte(directory / "memory-0", FLIP_AT)
    summary = restore(tmp_path, sock, directory, "--resume").summary()
    assert "(verified)" in summary, summary
    assert call.result() is None, call.outcome
    guest_goes_on(vmm, vcpu_rounds(vmm.info()))


@requires_kvm
@pytest.mark.timeout(150)
@pytest.mark.parametrize("resume", [True, False], ids=["resume", "paused"])
def test_a_flipped_byte_fails_an_ondemand_restore_loudly(snapshot: Snapshot, procs: Processes, tmp_path: Path,
                                                         resume: bool) -> None:
    """The chunk is checked the first time a page of it is served: the daemon answers Error and exits non-zero,
    the receiving VMM's postcopy fails and its VM stops — it never runs on the corrupt page."""
    directory = copy_snapshot(snapshot.directory, tmp_path / "corrupt", "memory-0")
    flip_byte(directory / "memory-0", FLIP_AT)
    vmm = procs.run()
    sock = tmp_path / "restore.sock"
    call = receive(vmm, sock, postcopy=True)
    line = restore(tmp_path, sock, directory, "--ondemand", *(["--resume"] if resume else [])).error_line()
    assert "memory-0" in line and "(chunk 2)" in line and "corrupt" in line, line
    refused = call.result()
    if refused is None:
        # The VMM had the VM (Complete came before the first bad page): its postcopy fails, it stops the VM
        # and exits non-zero.
        code = vmm.wait_exit(30)
        assert code != 0
        log = vmm.log.read_text()
        assert "postcopy failed" in log and "the VM stopped" in log, vmm.tail()
    else:
        # The pager failed before Complete: the VMM refused Complete and has no VM.
        assert isinstance(refused, ApiError), refused
        assert no_vm(vmm)


# ---------------------------------------------------------------------------------------------
# Missing or truncated files: one clear error line, before anything is sent
# ---------------------------------------------------------------------------------------------


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        path = directory / name
        os.truncate(path, int(os.stat(path).st_size * keep))

    return change


def _remove(*names: str) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        for name in names:
            (directory / name).unlink()

    return change


def _both(*changes: Callable[[Path], None]) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        for one in changes:
            one(directory)

    return change


BROKEN = [
    pytest.param(None, "no such snapshot directory", id="no-directory"),
    pytest.param(_remove("state.json"), "state.json is missing", id="state-missing"),
    pytest.param(_remove("migration_config.json"), "migration_config.json is missing", id="config-missing"),
    pytest.param(_remove("memory-0"), "memory-0 is missing", id="memory-missing"),
    pytest.param(_truncate("memory-0", 0.5), "memory-0 has 67108864 bytes, the manifest says 134217728 (truncated?)",
                 id="memory-truncated"),
    pytest.param(_truncate("state.json", 0.5), "(truncated?)", id="state-truncated"),
    pytest.param(_truncate("manifest.json", 0.5), "unreadable manifest", id="manifest-truncated"),
    pytest.param(_both(_remove("manifest.json"), _truncate("memory-0", 0.25)),
                 "memory-0 has 33554432 bytes, the snapshot's configuration says 134217728", id="unverified-memory-truncated"),
    pytest.param(_both(_remove("manifest.json"), _truncate("migration_config.json", 0.5)),
                 "migration_config.json: malformed Config", id="unverified-config-truncated"),
]


@requires_kvm
@pytest.mark.timeout(60)
@pytest.mark.parametrize("change,expected", BROKEN)
def test_a_missing_or_truncated_file_is_one_clear_error(snapshot: Snapshot, tmp_path: Path,
                                                        change: Callable[[Path], None] | None, expected: str) -> None:
    directory = tmp_path / "broken"
    if change is not None:
        copy_snapshot(snapshot.directory, directory, "memory-0", "state.json", "manifest.json",
                      "migration_config.json")
        change(directory)
    # Nobody listens on this socket: a restore that got as far as connecting would say so instead.
    line = restore(tmp_path, tmp_path / "nobody.sock", directory, "--resume").error_line()
    assert expected in line, line
    assert verify(tmp_path, directory).code == 1


@requires_kvm
@pytest.mark.timeout(60)
def test_a_restore_with_no_vmm_listening_is_one_clear_error(snapshot: Snapshot, tmp_path: Path) -> None:
    line = restore(tmp_path, tmp_path / "nobody.sock", snapshot.directory, "--ondemand").error_line()
    assert "nobody.sock" in line, line


# ---------------------------------------------------------------------------------------------
# The socket: one daemon per socket, stale files replaced; an Abandon leaves nothing
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_only_the_targets_own_dead_partials_are_removed(tmp_path: Path) -> None:
    """A target named like a glob pattern: its own dead partial directories go, nobody else's."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that is gone
    own = tmp_path / f".snap[1].partial-{dead.pid}-0123abcd"
    other = tmp_path / f".snap1.partial-{dead.pid}-0123abcd"
    alive = tmp_path / f".snap[1].partial-{os.getpid()}-0123abcd"
    for path in (own, other, alive):
        path.mkdir()
    writer = SnapshotWriter(tmp_path / "snap[1]", is_snapshot_file)
    try:
        assert not own.exists(), "the target's partial directory of a dead process was not removed"
        assert other.exists(), "another target's partial directory was removed"
        assert alive.exists(), "the partial directory of a running process was removed"
    finally:
        writer.abort()


@pytest.mark.timeout(60)
def test_a_second_daemon_on_the_same_socket_is_refused(tmp_path: Path, daemons: list[SnapshotDaemon]) -> None:
    sock = tmp_path / "offload.sock"
    first = start_daemon(daemons, tmp_path, sock, tmp_path / "one")
    second = SnapshotDaemon(tmp_path, sock, tmp_path / "two")
    daemons.append(second)
    line = second.finish(30).error_line()
    assert "already in use" in line and str(sock) in line, line
    assert not (tmp_path / "two").exists() and partials(tmp_path / "two") == []
    assert first.proc.poll() is None and sock.exists(), "the second daemon disturbed the first"
    # The first still takes its VMM; interrupted instead, it leaves nothing behind.
    first.proc.send_signal(signal.SIGINT)
    ended = first.finish(30)
    assert ended.code == 130, ended
    assert not (tmp_path / "one").exists() and partials(tmp_path / "one") == [] and not sock.exists()


@pytest.mark.timeout(60)
def test_a_stale_socket_file_is_replaced(tmp_path: Path, daemons: list[SnapshotDaemon]) -> None:
    sock = tmp_path / "offload.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # its file stays: as a daemon killed with SIGKILL leaves it
    daemon = start_daemon(daemons, tmp_path, sock, tmp_path / "snapshot")
    with Channel(connect(Url.unix(str(sock))), side=p.Side.SOURCE) as channel:
        channel.request_ok(p.Request.start())
    line = daemon.finish(30).error_line()
    assert "closed the connection in state Started: no snapshot" in line, line
    assert not (tmp_path / "snapshot").exists() and partials(tmp_path / "snapshot") == []


@pytest.mark.timeout(60)
def test_abandon_leaves_no_snapshot(tmp_path: Path, daemons: list[SnapshotDaemon]) -> None:
    sock, directory = tmp_path / "offload.sock", tmp_path / "snapshot"
    daemon = start_daemon(daemons, tmp_path, sock, directory)
    memfd = os.memfd_create("test-guest", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, RAM)
        os.pwrite(memfd, b"guest" * 1000, 0)
        config = config_payload()
        with Channel(connect(Url.unix(str(sock))), side=p.Side.SOURCE) as channel:
            channel.request_ok(p.Request.start())
            channel.send_memory_fd(0, memfd)
            channel.request_ok(p.Request.config(len(config)), config)
            channel.request_ok(p.Request.abandon())  # answered Ok
    finally:
        os.close(memfd)
    line = daemon.finish(30).error_line()
    assert "abandoned" in line, line
    assert not directory.exists() and partials(directory) == [] and not sock.exists()
