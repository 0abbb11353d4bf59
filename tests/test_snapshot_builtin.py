"""Cloud Hypervisor's built-in snapshot/restore (``file://``): real chmig processes, real KVM guests.

* The verify guest judges: snapshotted paused, restored by ``copy`` and by
  ``ondemand`` (userfaultfd, pages read from ``memory-ranges``), paused and
  resumed, it must go on from the counters it had with zero errors; the
  snapshotted source must go on too once resumed.
* The directory: Cloud Hypervisor's files, the manifest ``chmig offload
  verify`` checks, written in place of an earlier snapshot but never of a
  directory holding anything else.
* Failures are loud: a flipped byte in ``memory-ranges`` is refused before
  anything runs (``copy``) or stops the VM with the error naming the snapshot
  (``ondemand``), never a silently corrupted guest; a missing or truncated
  file is one clear error; a snapshot of a running VM is refused (500).
* The same through ``chmig remote snapshot|restore`` and ``chmig run --restore``,
  and :class:`~chmig.snapshot.RestoreConfig` against Cloud Hypervisor's own parsing tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from chmig.apiclient import ApiError
from chmig.errors import UsageError
from chmig.snapshot import COPY, ONDEMAND, RestoreConfig
from chmig.snapshot_dir import CHUNK_SIZE, data_spans

from .conftest import Processes, VmmProcess, requires_kvm

PAGE_SIZE = 4096
MiB = 1 << 20
SNAPSHOT_FILES = ["config.json", "manifest.json", "memory-ranges", "state.json"]
#: A shared main zone and a private one: the snapshot writes memory from a memfd and from anonymous memory.
VM_ARGS = ("--cpus", "boot=2", "--memory", "size=32M", "--memory-zone", "id=private,size=32M,shared=off",
           "--workload", "verify,dirty_percent=10")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def url(directory: Path) -> str:
    return f"file://{directory}"


def snapshot(vmm: VmmProcess, directory: Path) -> None:
    assert vmm.call("PUT", "vm.snapshot", {"destination_url": url(directory)}) is None  # 204, as Cloud Hypervisor


def restore(vmm: VmmProcess, directory: Path, timeout: float = 120, **options: object) -> None:
    assert vmm.call("PUT", "vm.restore", {"source_url": url(directory), **options}, timeout=timeout) is None


def wait_more_rounds(vmm: VmmProcess, info: dict, more: int, timeout: float = 90) -> dict:
    """Until every vCPU has completed ``more`` rounds after those it had in ``info``."""
    targets = [v["rounds"] + more for v in info["guest"]["vcpus"]]
    return vmm.wait_for(lambda i: all(v["rounds"] >= t for v, t in zip(i["guest"]["vcpus"], targets)),
                        timeout, f"{more} more rounds on every vCPU")


def assert_goes_on(vmm: VmmProcess, since: dict) -> dict:
    """The guest runs on from the counters it had in ``since``: two full rounds per vCPU, zero errors."""
    now = vmm.info()
    assert now["guest"]["errors"] == 0, now["guest"]
    for mine, theirs in zip(now["guest"]["vcpus"], since["guest"]["vcpus"]):
        assert mine["rounds"] >= theirs["rounds"], (now["guest"], since["guest"])
    # The round under way may have started before: +3 is two full rounds after.
    after = wait_more_rounds(vmm, now, 3)
    assert after["guest"]["errors"] == 0, after["guest"]
    assert after["state"] == "Running"
    return after


def flip_byte(directory: Path, offset: int) -> None:
    path = directory / "memory-ranges"
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x5A]))


def data_offsets(directory: Path) -> list[int]:
    """Offsets of memory-ranges bytes that hold data (a flipped byte in a hole would be a new data span)."""
    fd = os.open(directory / "memory-ranges", os.O_RDONLY)
    try:
        spans = data_spans(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert spans, "memory-ranges holds no data"
    return [start + length // 2 for start, length in spans]


def open_files(vmm: VmmProcess, name: str) -> list[str]:
    """The files called ``name`` that the VMM process has open."""
    fds = Path(f"/proc/{vmm.proc.pid}/fd")
    paths = []
    for fd in fds.iterdir():
        try:
            paths.append(os.readlink(fd))
        except OSError:
            pass  # closed meanwhile
    return [path for path in paths if os.path.basename(path) == name]


def chmig(log: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """A chmig command run to its end; its log goes to ``log``, so its stderr holds only what the CLI printed."""
    return subprocess.run([sys.executable, "-m", "chmig", "-v", "--log-file", str(log), *args], capture_output=True,
                          text=True, timeout=timeout)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """One snapshot of a running verify guest (shared and private memory), and its vm.info when it was taken."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this machine")
    tmp = tmp_path_factory.mktemp("saved")
    procs = Processes(tmp)
    try:
        source = procs.run(*VM_ARGS)
        source.wait_rounds(4, timeout=90)
        source.call("PUT", "vm.pause")
        info = source.info()
        snapshot(source, tmp / "snap")
        yield tmp / "snap", info
    finally:
        procs.stop_all()


def copy_of(saved: tuple[Path, dict], tmp_path: Path) -> Path:
    """A copy of the module's snapshot this test may damage."""
    target = tmp_path / "snap"
    shutil.copytree(saved[0], target)
    return target


# ---------------------------------------------------------------------------------------------
# 1. Snapshot: the files, the manifest, the source goes on
# ---------------------------------------------------------------------------------------------


@requires_kvm
@pytest.mark.timeout(180)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "private"])
def test_snapshot_writes_cloud_hypervisors_files_and_the_source_goes_on(procs: Processes, tmp_path: Path,
                                                                        shared: bool) -> None:
    source = procs.run("--cpus", "boot=2", "--memory", f"size=64M,shared={'on' if shared else 'off'}",
                       "--workload", "verify,dirty_percent=10")
    source.wait_rounds(4, timeout=90)
    source.call("PUT", "vm.pause")
    paused = source.info()
    directory = tmp_path / "snap"
    snapshot(source, directory)

    assert sorted(os.listdir(directory)) == SNAPSHOT_FILES
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n], os.listdir(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    assert config == paused["config"], "config.json is the VM's vm_config"
    state = json.loads((directory / "state.json").read_text())
    assert sorted(state) == ["common_cpuid", "memory_manager_data", "memory_ranges", "vm_state"]
    assert state["memory_manager_data"]["guest_ram_mappings"][0]["size"] == 64 * MiB
    assert [v["rounds"] for v in state["vm_state"]["devices"]["guest"]["vcpus"]] == \
        [v["rounds"] for v in paused["guest"]["vcpus"]]
    ranges = state["memory_ranges"]
    assert ranges and all(r["gpa"] % PAGE_SIZE == 0 and r["length"] % PAGE_SIZE == 0 for r in ranges)
    size = sum(r["length"] for r in ranges)
    assert (directory / "memory-ranges").stat().st_size == size
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["files"]["memory-ranges"]["size"] == size
    assert len(manifest["files"]["memory-ranges"]["chunks"]) == -(-size // CHUNK_SIZE)
    # The manifest format is the offload daemon's: its verifier checks this snapshot too.
    verified = chmig(tmp_path / "verify.log", "offload", "verify", "--input-dir", str(directory))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "is intact" in verified.stdout

    # The source keeps its paused VM: resumed, it goes on.
    assert source.info()["state"] == "Paused"
    source.call("PUT", "vm.resume")
    assert_goes_on(source, paused)

    # A second snapshot replaces the first one whole; a directory with anything else is never replaced.
    source.call("PUT", "vm.pause")
    first = (directory / "state.json").read_bytes()
    snapshot(source, directory)
    assert (directory / "state.json").read_bytes() != first
    assert chmig(tmp_path / "verify.log", "offload", "verify", "--input-dir", str(directory)).returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("mine")
    with pytest.raises(ApiError) as refused:
        snapshot(source, other)
    assert refused.value.status == 500 and "precious.txt" in str(refused.value), refused.value
    assert os.listdir(other) == ["precious.txt"]
    assert not [n for n in os.listdir(tmp_path) if ".partial" in n], os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# 2. Restore: copy and ondemand, paused and resumed
# ---------------------------------------------------------------------------------------------


@requires_kvm
@pytest.mark.timeout(180)
@pytest.mark.parametrize("resume", [False, True], ids=["paused", "resume"])
@pytest.mark.parametrize("mode", [COPY, ONDEMAND])
def test_restore_continues_the_guest(procs: Processes, saved: tuple[Path, dict], tmp_path: Path, mode: str,
                                     resume: bool) -> None:
    directory, at_snapshot = saved
    vmm = procs.run()
    with pytest.raises(ApiError) as empty:
        vmm.info()
    assert empty.value.status == 404
    restore(vmm, directory, memory_restore_mode=mode, resume=resume)

    restored = vmm.info()
    assert restored["config"] == at_snapshot["config"]
    assert restored["state"] == ("Running" if resume else "Paused")
    migration = restored["migration"]
    assert migration["mode"] == "restore" and migration["memory_restore_mode"] == mode, migration
    assert migration["status"] == "completed" and migration["verified"] is True, migration
    assert migration["url"] == url(directory)
    if not resume:
        # Paused, as Cloud Hypervisor restores: the counters are the snapshot's.
        assert [v["rounds"] for v in restored["guest"]["vcpus"]] == [v["rounds"] for v in at_snapshot["guest"]["vcpus"]]
        time.sleep(0.3)
        assert vmm.info()["guest"]["rounds"] == at_snapshot["guest"]["rounds"]

    if mode == ONDEMAND:
        # Paused, the pull alone brings every page in; running, the guest's faults go first.
        whole = vmm.wait_for(lambda i: i["migration"]["postcopy"]["status"] == "whole", 60, "the VM whole")
        pc = whole["migration"]["postcopy"]
        assert pc["error"] is None and pc["pages_present_at_start"] == 0, pc
        assert pc["pages_faulted"] + pc["pages_pulled"] == pc["pages_total"] == 64 * MiB // PAGE_SIZE, pc
        assert pc["whole_after_ms"] is not None and pc["whole_after_ms"] > 0, pc
        assert pc["faults"] == 0 if not resume else pc["faults"] > 0, pc
        assert whole["migration"]["total_bytes"] == 64 * MiB
        # The VMM logs it once it has closed the pager, just after vm.info shows "whole" (seen racing in CI).
        deadline = time.monotonic() + 10
        while "on-demand restore done" not in vmm.log.read_text():
            assert time.monotonic() < deadline, "no 'on-demand restore done' in the VMM's log"
            time.sleep(0.05)
    else:
        assert migration["postcopy"] is None
        assert 0 < migration["total_bytes"] <= migration["snapshot_bytes"], migration
        assert migration["verify_ms"] is not None
    # The VMM's owner of the pager closes it (and the file) just after the VM became whole.
    deadline = time.monotonic() + 10
    while open_files(vmm, "memory-ranges") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not open_files(vmm, "memory-ranges"), "the snapshot's memory file is still open once the VM is whole"
    if not resume:
        vmm.call("PUT", "vm.resume")
    running = assert_goes_on(vmm, at_snapshot)

    # A restored VM snapshots like any other.
    vmm.call("PUT", "vm.pause")
    snapshot(vmm, tmp_path / "again")
    assert chmig(tmp_path / "verify.log", "offload", "verify", "--input-dir", str(tmp_path / "again")).returncode == 0
    state = json.loads((tmp_path / "again" / "state.json").read_text())
    saved_rounds = [v["rounds"] for v in state["vm_state"]["devices"]["guest"]["vcpus"]]
    assert all(mine >= theirs for mine, theirs in zip(saved_rounds, [v["rounds"] for v in running["guest"]["vcpus"]]))


# ---------------------------------------------------------------------------------------------
# 3. ch-remote's commands and --restore
# ---------------------------------------------------------------------------------------------


@requires_kvm
@pytest.mark.timeout(240)
def test_remote_snapshot_restore_and_command_line_restore(procs: Processes, tmp_path: Path) -> None:
    source = procs.run("--cpus", "boot=1", "--memory", "size=32M", "--workload", "verify,dirty_percent=10")
    source.wait_rounds(3, timeout=60)
    directory = tmp_path / "snap"

    log = tmp_path / "remote.log"
    running = chmig(log, "remote", "--api-socket", source.api, "snapshot", url(directory))
    assert running.returncode == 1 and len(error_lines(running)) == 1, running.stderr
    assert "HTTP 500" in running.stderr and "pause" in running.stderr, running.stderr
    assert not directory.exists()
    assert chmig(log, "remote", "--api-socket", source.api, "pause").returncode == 0
    paused = source.info()
    done = chmig(log, "remote", "--api-socket", source.api, "snapshot", url(directory))
    assert done.returncode == 0 and done.stdout == "", done.stderr  # 204: ch-remote prints nothing
    assert sorted(os.listdir(directory)) == SNAPSHOT_FILES

    empty = procs.run()
    restored = chmig(log, "remote", "--api-socket", empty.api, "restore",
                     f"source_url={url(directory)},memory_restore_mode=ondemand,resume=on")
    assert restored.returncode == 0, restored.stderr
    info = empty.info()
    assert info["migration"]["memory_restore_mode"] == ONDEMAND and info["state"] == "Running"
    assert_goes_on(empty, paused)

    # cloud-hypervisor --api-socket S --restore source_url=...: the VM is there when the API answers.
    by_option = procs.run("--restore", f"source_url={url(directory)},resume=true")
    info = by_option.info()
    assert info["migration"]["memory_restore_mode"] == COPY and info["state"] == "Running"
    assert_goes_on(by_option, paused)

    # Without an API: the VM runs until the process is told to stop.
    alone = subprocess.Popen([sys.executable, "-m", "chmig", "--log-file", str(tmp_path / "alone.log"), "run",
                              "--serial", "off", "--restore",
                              f"source_url={url(directory)},memory_restore_mode=ondemand,resume=true"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert alone.stdout is not None
        line = alone.stdout.readline()
        assert line.startswith("chmig run: restore (ondemand)") and "completed" in line, line
        time.sleep(1)
        assert alone.poll() is None, alone.communicate()
        alone.terminate()
        assert alone.wait(30) == 0
    finally:
        if alone.poll() is None:
            alone.kill()
        alone.communicate()


# ---------------------------------------------------------------------------------------------
# 4. A corrupt snapshot is never a silently corrupted guest
# ---------------------------------------------------------------------------------------------


@requires_kvm
@pytest.mark.timeout(180)
def test_flipped_byte_is_refused_by_copy(procs: Processes, saved: tuple[Path, dict], tmp_path: Path) -> None:
    directory = copy_of(saved, tmp_path)
    offset = data_offsets(directory)[-1]
    flip_byte(directory, offset)
    chunk = offset // CHUNK_SIZE
    vmm = procs.run()
    with pytest.raises(ApiError) as refused:
        restore(vmm, directory)
    message = str(refused.value)
    assert refused.value.status == 500 and "\n" not in message, message
    assert f"{directory}: memory-ranges: bytes {chunk * CHUNK_SIZE}.." in message, message
    assert f"(chunk {chunk})" in message and "corrupt" in message, message
    with pytest.raises(ApiError) as none:
        vmm.info()
    assert none.value.status == 404, "a refused restore leaves no VM"
    assert vmm.call("GET", "vmm.ping")
    # The same VMM restores a good snapshot afterwards.
    restore(vmm, saved[0], resume=True)
    assert_goes_on(vmm, saved[1])

    # On the command line: one line, exit 1, nothing runs.
    result = chmig(tmp_path / "run.log", "run", "--serial", "off", "--restore", f"source_url={url(directory)},resume=true")
    assert result.returncode == 1 and len(error_lines(result)) == 1, result.stderr
    assert result.stderr.startswith("chmig run: error: ") and "memory-ranges" in result.stderr
    assert "corrupt" in result.stderr


def wait_stopped(vmm: VmmProcess, timeout: float = 60) -> dict:
    return vmm.wait_for(lambda i: i["state"] == "Shutdown", timeout, "the VM stopped")


@requires_kvm
@pytest.mark.timeout(180)
@pytest.mark.parametrize("resume", [False, True], ids=["paused", "resume"])
def test_flipped_byte_stops_an_ondemand_restore(procs: Processes, saved: tuple[Path, dict], tmp_path: Path,
                                                resume: bool) -> None:
    directory = copy_of(saved, tmp_path)
    flip_byte(directory, data_offsets(directory)[-1])
    vmm = procs.run()
    try:
        restore(vmm, directory, memory_restore_mode="OnDemand", resume=resume)  # Cloud Hypervisor's JSON spelling
    except ApiError as early:
        # The pull reached the corrupt chunk before the VM was handed over: the restore itself is refused.
        assert "memory-ranges" in str(early) and "corrupt" in str(early), early
        with pytest.raises(ApiError):
            vmm.info()
    else:
        stopped = wait_stopped(vmm)
        assert "memory-ranges" in stopped["error"] and "corrupt" in stopped["error"], stopped
        assert str(directory) in stopped["error"], stopped
        migration = stopped["migration"]
        assert migration["status"] == "failed" and "corrupt" in migration["error"], migration
        assert migration["postcopy"]["status"] == "failed", migration
        assert stopped["guest"]["errors"] == 0, stopped["guest"]  # it stopped; it never ran on a bad page
        log = vmm.log.read_text()
        assert "on-demand restore failed" in log and "corrupt" in log
        assert vmm.proc.poll() is None, "with an API the VMM stays to say why"
        vmm.call("PUT", "vm.delete")  # as in Cloud Hypervisor, a restore needs a VMM without a VM config
        restore(vmm, saved[0], memory_restore_mode=ONDEMAND, resume=True)
        assert_goes_on(vmm, saved[1])

    # Without an API the process exits non-zero with one line naming the snapshot.
    result = chmig(tmp_path / "run.log", "run", "--serial", "off", "--restore",
                   f"source_url={url(directory)},memory_restore_mode=ondemand,resume={'on' if resume else 'off'}",
                   timeout=90)
    assert result.returncode == 1 and len(error_lines(result)) == 1, result.stderr
    assert result.stderr.startswith("chmig run: error: ") and str(directory) in result.stderr, result.stderr
    assert "memory-ranges" in result.stderr and "corrupt" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# 5. Refusals: a running VM, missing and truncated files, bad requests
# ---------------------------------------------------------------------------------------------


@requires_kvm
@pytest.mark.timeout(120)
def test_snapshot_and_restore_refusals(procs: Processes, saved: tuple[Path, dict], tmp_path: Path) -> None:
    vm = procs.run("--cpus", "boot=1", "--memory", "size=16M", "--workload", "idle")
    empty = procs.run()
    target = tmp_path / "snap"

    def refused(vmm: VmmProcess, action: str, body: dict, status: int, *words: str) -> None:
        with pytest.raises(ApiError) as error:
            vmm.call("PUT", action, body)
        assert error.value.status == status, error.value
        for word in words:
            assert word in str(error.value), error.value

    refused(vm, "vm.snapshot", {"destination_url": url(target)}, 500, "Running", "pause")
    refused(empty, "vm.snapshot", {"destination_url": url(target)}, 500, "not running")
    vm.call("PUT", "vm.pause")
    refused(vm, "vm.snapshot", {"destination_url": "tcp:127.0.0.1:1"}, 400, "file:///DIR")
    refused(vm, "vm.snapshot", {"destination_url": url(target), "x": 1}, 400, "unknown field 'x'")
    refused(vm, "vm.snapshot", {"destination_url": url(tmp_path / "no" / "such")}, 500, "parent")
    refused(vm, "vm.restore", {"source_url": url(saved[0])}, 500, "VM is already created")
    assert not target.exists()

    good = url(saved[0])
    refused(empty, "vm.restore", {}, 400, "missing field 'source_url'")
    refused(empty, "vm.restore", {"source_url": good, "bogus": True}, 400, "unknown field 'bogus'")
    refused(empty, "vm.restore", {"source_url": good, "resume": "yes"}, 400, "'resume' must be a boolean")
    refused(empty, "vm.restore", {"source_url": good, "memory_restore_mode": "lazy"}, 400, "copy or ondemand")
    refused(empty, "vm.restore", {"source_url": good, "memory_restore_mode": "ondemand", "prefault": True}, 400,
            "'prefault' cannot be combined with 'memory_restore_mode=ondemand'")
    refused(empty, "vm.restore", {"source_url": good, "net_fds": [{"id": "net0", "num_fds": 1}]}, 400,
            "net_fds", "network")
    refused(empty, "vm.restore", {"source_url": saved[0].as_posix()}, 400, "file:///DIR")
    refused(empty, "vm.restore", {"source_url": url(tmp_path / "nothing")}, 500, "no such snapshot directory")
    offloaded = tmp_path / "offloaded"
    offloaded.mkdir()
    (offloaded / "migration_config.json").write_text("{}")
    refused(empty, "vm.restore", {"source_url": url(offloaded)}, 500, "offload daemon's snapshot")
    with pytest.raises(ApiError):
        empty.info()
    # What ch-remote sends (every field, nulls included) is accepted.
    restore(empty, saved[0], **{k: v for k, v in RestoreConfig(good).to_api().items() if k != "source_url"})
    assert empty.info()["state"] == "Paused"


#: (how to damage a copy of the snapshot, what the one error says; None: it restores, unverified).
DAMAGE = [
    pytest.param("rm config.json", "config.json is missing", id="no-config"),
    pytest.param("rm state.json", "state.json is missing", id="no-state"),
    pytest.param("rm memory-ranges", "memory-ranges is missing", id="no-memory"),
    pytest.param("truncate memory-ranges", "the manifest says", id="truncated-memory"),
    pytest.param("truncate state.json", "state.json has", id="truncated-state"),
    pytest.param("rm manifest.json", None, id="no-manifest-restores-unverified"),
    pytest.param("rm manifest.json; truncate memory-ranges", "the snapshot's configuration says",
                 id="no-manifest-truncated-memory"),
    pytest.param("rm manifest.json; garble state.json", "state.json is not valid JSON", id="no-manifest-bad-json"),
]


@requires_kvm
@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage,message", DAMAGE)
def test_missing_or_truncated_files_give_one_clear_error(procs: Processes, saved: tuple[Path, dict], tmp_path: Path,
                                                         damage: str, message: str | None) -> None:
    directory = copy_of(saved, tmp_path)
    for step in damage.split("; "):
        verb, name = step.split()
        path = directory / name
        if verb == "rm":
            path.unlink()
        elif verb == "truncate":
            os.truncate(path, path.stat().st_size - PAGE_SIZE if name == "memory-ranges" else 100)
        else:
            path.write_text("{" + path.read_text()[:50])
    vmm = procs.run()
    if message is None:
        restore(vmm, directory, resume=True)
        assert vmm.info()["migration"]["verified"] is False
        assert "restoring it unverified" in vmm.log.read_text()
        assert_goes_on(vmm, saved[1])
        return
    with pytest.raises(ApiError) as refused:
        restore(vmm, directory)
    text = str(refused.value)
    assert "\n" not in text and str(directory) in text and message in text, text
    result = chmig(tmp_path / "run.log", "run", "--serial", "off", "--restore", f"source_url={url(directory)}")
    assert result.returncode == 1 and len(error_lines(result)) == 1 and message in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# 6. RestoreConfig, by Cloud Hypervisor's parsing rules (no KVM needed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_restore_options_parse_as_cloud_hypervisor_parses_them() -> None:
    # Cloud Hypervisor's test_restore_parsing, for the options a chmig VM has (with file:// URLs: CH's parser
    # takes any path, but its restore then needs file://, and chmig checks that while parsing).
    assert RestoreConfig.parse("source_url=file:///snap") == RestoreConfig("file:///snap", False, COPY, False)
    assert RestoreConfig.parse("source_url=file:///snap,prefault=off") == RestoreConfig("file:///snap")
    assert RestoreConfig.parse("source_url=file:///snap,memory_restore_mode=ondemand").memory_restore_mode == ONDEMAND
    assert RestoreConfig.parse("source_url=file:///snap,memory_restore_mode=OnDemand").memory_restore_mode == ONDEMAND
    assert RestoreConfig.parse("source_url=file:///snap,resume=on").resume is True
    assert RestoreConfig.parse("source_url=file:///snap,resume=true,prefault=on").prefault is True
    assert RestoreConfig.parse('source_url="file:///a,b"').source_url == "file:///a,b"
    for bad, words in [
        ("prefault=off", "source_url missing"),
        ("source_url=file:///snap,memory_restore_mode=bogus", "copy or ondemand"),
        ("source_url=file:///snap,resume=maybe", "expected on, off, true or false"),
        ("source_url=file:///snap,prefault=on,memory_restore_mode=ondemand", "'prefault' cannot be combined"),
        ("source_url=file:///snap,net_fds=[net0@[3,4]]", "net_fds is a Cloud Hypervisor option that chmig does not"),
        ("source_url=file:///snap,zone_updates=[zone1@1]", "zone_updates is a Cloud Hypervisor option that chmig"),
        ("source_url=file:///snap,unknown=1", "unknown option 'unknown'"),
        ("source_url=/path/to/snapshot", "file:///DIR"),
    ]:
        with pytest.raises(UsageError) as error:
            RestoreConfig.parse(bad)
        assert words in str(error.value) and str(error.value).startswith("--restore: "), (bad, error.value)
    # ch-remote sends the whole RestoreConfig as serde writes it.
    assert RestoreConfig("file:///snap", memory_restore_mode=ONDEMAND, resume=True).to_api() == {
        "source_url": "file:///snap", "prefault": False, "memory_restore_mode": "OnDemand", "net_fds": None,
        "vfio_fds": None, "iommufd_fd": None, "resume": True, "zone_updates": []}
    assert RestoreConfig.from_api({"source_url": "file:///snap", "memory_restore_mode": "Copy"}) == \
        RestoreConfig("file:///snap")


@pytest.mark.timeout(60)
def test_bad_restore_options_on_the_command_line(tmp_path: Path) -> None:
    # Bad options are bad input (exit 2, as every usage error); a snapshot that is not there is a failure (1).
    for options, words, code in [
        ("memory_restore_mode=ondemand", "source_url missing", 2),
        (f"source_url=file://{tmp_path},prefault=on,memory_restore_mode=ondemand", "'prefault' cannot be combined", 2),
        (f"source_url=file://{tmp_path}/none", "no such snapshot directory", 1),
    ]:
        result = chmig(tmp_path / "run.log", "run", "--serial", "off", "--restore", options)
        assert result.returncode == code and len(error_lines(result)) == 1 and words in result.stderr, result.stderr
    both = chmig(tmp_path / "run.log", "run", "--memory", "size=16M", "--restore", f"source_url=file://{tmp_path}")
    assert both.returncode == 2 and "give no --cpus" in both.stderr, both.stderr
    remote = chmig(tmp_path / "remote.log", "remote", "--api-socket", str(tmp_path / "none.sock"), "restore",
                   "resume=on")
    assert remote.returncode == 2 and "source_url missing" in remote.stderr, remote.stderr
    remote = chmig(tmp_path / "remote.log", "remote", "--api-socket", str(tmp_path / "none.sock"), "snapshot")
    assert remote.returncode == 2 and "required: snapshot_config" in remote.stderr, remote.stderr


@pytest.mark.timeout(30)
def test_fragmented_ram_is_saved_slot_by_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """More ranges than a restore reads: every slot is saved whole instead (zeros cost only holes)."""
    from chmig import snapshot as s
    from chmig.memory import GuestMemory, ZoneConfig

    memory = GuestMemory.create([ZoneConfig("mem0", 4 * MiB, shared=True), ZoneConfig("z1", 2 * MiB, shared=False)])
    try:
        for gpa in (0, 2 * PAGE_SIZE, 4 * MiB + PAGE_SIZE):
            memory.write(gpa, b"x")
        assert s._ranges_to_save(memory) == [(0, PAGE_SIZE), (2 * PAGE_SIZE, PAGE_SIZE), (4 * MiB + PAGE_SIZE, PAGE_SIZE)]
        monkeypatch.setattr(s, "MAX_RANGES", 2)
        assert s._ranges_to_save(memory) == memory.ram_ranges() == [(0, 4 * MiB), (4 * MiB, 2 * MiB)]
    finally:
        memory.close()
