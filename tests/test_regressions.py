"""Tests that would notice a regression where mutation testing found that the others would not.

Each test names the mutation it catches.  They run real ``chmig`` processes on
real KVM guests over real sockets (the guest is the judge of every migration),
real TLS with certificates from ``tests/pki.py``, and the real ``.ci/run`` and
``bench/precopy.py`` scripts in subprocesses — no mocks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from chmig import protocol as p
from chmig.apiclient import ApiError
from chmig.channel import RECEIVED, Channel, Message, Observers
from chmig.memory import GuestMemory
from chmig.receive import Receiver
from chmig.send import Sender, SendOptions, new_stats
from chmig.transport import CA_CERT_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE, connect, listen, parse_url
from chmig.units import MiB
from chmig.vm import Serial, Vm, VmConfig

from .conftest import Processes, VmmProcess, requires_kvm
from .pki import Pki

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
#: Verified guest RAM starts at 1 MiB; below is the program area (docs/guest.md).
PROGRAM_AREA = 1 * MiB


# ---------------------------------------------------------------------------------------------
# Helpers: the guest is the judge
# ---------------------------------------------------------------------------------------------


def _every_vcpu(info: dict, rounds: int) -> bool:
    """Whether every vCPU (not just their sum) has completed ``rounds`` rounds."""
    return all(v["rounds"] >= rounds for v in info["guest"]["vcpus"])


def _continues(dest: VmmProcess, before: dict) -> dict:
    """The guest arrived: its counters continue, every vCPU does two more rounds, zero errors."""
    arrived = dest.info()
    assert arrived["guest"]["errors"] == 0, arrived["guest"]
    for mine, theirs in zip(arrived["guest"]["vcpus"], before["guest"]["vcpus"]):
        assert mine["rounds"] >= theirs["rounds"], (mine, theirs)
    targets = [v["rounds"] + 2 for v in arrived["guest"]["vcpus"]]
    # Stop waiting at the first error: a guest finding bad pages reports them one by one, slowly.
    after = dest.wait_for(lambda i: i["guest"]["errors"] > 0
                          or all(v["rounds"] >= t for v, t in zip(i["guest"]["vcpus"], targets)),
                          timeout=60, what="two more rounds on every vCPU")
    assert after["guest"]["errors"] == 0, after["guest"]
    assert after["state"] == "Running"
    return after


def _keeps_running(source: VmmProcess) -> None:
    """A refused migration left the source as it was: running, a further round, zero errors."""
    info = source.info()
    assert info["state"] == "Running", info
    source.wait_for(lambda i: _every_vcpu(i, max(v["rounds"] for v in info["guest"]["vcpus"]) + 1),
                    what="a further round on the source after the refusal")
    assert source.info()["guest"]["errors"] == 0


def _send(source: VmmProcess, url: str, **options: object) -> dict:
    return source.call("PUT", "vm.send-migration", {"destination_url": url, **options}, timeout=150)


# ---------------------------------------------------------------------------------------------
# 1. connections=N is seen at the destination
# ---------------------------------------------------------------------------------------------

#: 128 MiB: iteration 0 alone is two 64 MiB chunks (protocol.PRECOPY_CHUNK_SIZE), so with two workers
#: each of them certainly carries memory, whatever the later iterations do.
MULTI_VM = ("--cpus", "boot=2", "--memory", "size=128M", "--workload", "verify,dirty_percent=10")


@requires_kvm
def test_destination_counts_the_connections_that_carried_memory(procs: Processes) -> None:
    """Mutation caught: a sender that opens no workers (or sends everything on the main connection) for
    ``connections=2`` — every guest check passes, only the destination's count of connections that carried
    memory (``migration.connections`` in its ``vm.info``) tells."""
    source = procs.run(*MULTI_VM)
    before = source.wait_for(lambda i: _every_vcpu(i, 1), what="a full round on every vCPU")
    dest, url = procs.receive("tcp:127.0.0.1:0")
    _send(source, url, connections=2)
    assert source.wait_exit(30) == 0, source.tail()
    after = _continues(dest, before)
    migration = after["migration"]
    assert migration["role"] == "destination" and migration["status"] == "completed", migration
    # The main connection, plus the two PrecopyMemory workers ("memory-0", "memory-1").
    assert migration.get("connections") == 3, migration


def _boot_here(memory: str) -> Vm:
    """A verify guest in this process (for the in-process observer check), booted and running."""
    config = VmConfig.from_args("boot=1", memory, [], "verify,dirty_percent=10")
    vm = Vm(config, GuestMemory.create(config.zones), Serial("off"))
    vm.boot()
    vm.start()
    return vm


def _wait_here(vm: Vm, what: str, predicate: Callable[[dict], bool]) -> None:
    deadline = time.monotonic() + 60
    while not predicate(vm.info()):
        assert time.monotonic() < deadline and not vm.failure, f"{what}: {vm.failure or vm.info()['guest']}"
        time.sleep(0.05)


def _idle_worker(url: str) -> None:
    """A connection that announces PrecopyMemory, then closes without carrying any memory."""
    with Channel(connect(parse_url(url)), side=p.Side.SOURCE, name="idle") as channel:
        channel.send_role(p.ConnectionRole.PRECOPY_MEMORY)


@requires_kvm
@pytest.mark.parametrize("connections", [1, 2])
def test_destination_messages_agree_with_its_connection_count(connections: int) -> None:
    """Second, independent check, from the destination's message layer alone (its observers, in this
    process): the connections it counts are exactly the ones Memory arrived on, plus the main one.

    Mutations caught: with ``connections=2``, any Memory on the main connection, or a worker left idle; the
    destination counting connections that announced PrecopyMemory rather than those that carried memory (with
    ``connections=1`` an idle worker connection is announced during the precopy), or a constant count."""
    source = _boot_here("size=128M")
    dest: Vm | None = None
    memory_on: dict[str, int] = {}
    roles_on: set[str] = set()
    probes: list[threading.Thread] = []
    lock = threading.Lock()
    url = ""

    def observe(message: Message) -> None:
        if message.side != "destination" or message.direction != RECEIVED:
            return
        with lock:
            if message.name == "Memory":
                memory_on[message.connection] = memory_on.get(message.connection, 0) + 1
            elif message.kind == "role":
                roles_on.add(message.connection)
        if connections == 1 and message.name == "Config":
            # From now until State the destination accepts workers: announce one that carries nothing.
            probes.append(threading.Thread(target=_idle_worker, args=(url,), name="test-idle-worker"))
            probes[-1].start()

    try:
        _wait_here(source, "a first round", lambda i: i["guest"]["rounds"] >= 1)
        outcome: dict = {}
        with listen(parse_url("tcp:127.0.0.1:0")) as listener:
            url = str(listener.address)
            # Only the destination reports to the observer: the sender's own reporting is not trusted here.
            receiver = Receiver(listener, observers=Observers(observe))

            def receive() -> None:
                try:
                    outcome["vm"] = receiver.run(accept_timeout=30)
                except BaseException as exc:  # reported below
                    outcome["error"] = exc

            thread = threading.Thread(target=receive, name="test-regressions-receiver")
            thread.start()
            options = SendOptions(destination_url=url, connections=connections)
            options.validate()
            sent = new_stats(options)
            try:
                Sender(source, options, sent).run()
            finally:
                thread.join(60)
                for probe in probes:
                    probe.join(10)
        assert "error" not in outcome, outcome
        dest = outcome["vm"]
        start = dest.info()["guest"]["rounds"]
        _wait_here(dest, "two rounds after the migration", lambda i: i["guest"]["rounds"] >= start + 2)
        assert dest.info()["guest"]["errors"] == 0
        workers = {f"memory-{n}" for n in range(connections)} if connections > 1 else set()
        if connections == 1:
            assert roles_on == {"memory-0"}, "the idle worker was not taken during the precopy"
        else:
            assert roles_on == workers
        assert set(memory_on) == (workers or {"main"}), memory_on
        received = receiver.stats.to_json()
        assert received.get("connections") == 1 + len(workers), received
        assert received["total_bytes"] == sent.total_bytes  # every byte sent arrived, on whichever connection
    finally:
        if dest is not None:
            dest.close()
        source.close()


# ---------------------------------------------------------------------------------------------
# 2. Private (anonymous) memory is sent
# ---------------------------------------------------------------------------------------------


@requires_kvm
def test_private_memory_is_migrated_with_its_contents(procs: Processes) -> None:
    """Mutation caught: iteration 0 sending nothing (or only part) for anonymous memory (``shared=off``:
    no memfd, ``mincore`` decides what is populated).  The guest stamped all its RAM above 1 MiB on its first
    round, so iteration 0 must carry most of it, and the destination guest must find every stamp."""
    size = 64 * MiB
    source = procs.run("--cpus", "boot=2", "--memory", "size=64M,shared=off",
                       "--workload", "verify,dirty_percent=10")
    before = source.wait_for(lambda i: _every_vcpu(i, 1), what="a full round on every vCPU")
    assert before["config"]["memory"]["shared"] is False, before["config"]
    dest, url = procs.receive("tcp:127.0.0.1:0")
    stats = _send(source, url)
    assert source.wait_exit(30) == 0, source.tail()
    iteration0 = stats["iterations"][0]
    assert iteration0["iteration"] == 0 and not iteration0["final"], stats["iterations"]
    stamped = size - PROGRAM_AREA
    # "Most": a few stamped pages may be left to the dirty iterations, never a tenth of the RAM.
    assert iteration0["bytes"] >= 0.9 * stamped, (iteration0, stamped)
    _continues(dest, before)


# ---------------------------------------------------------------------------------------------
# 3. TLS: each side refuses a stranger on its own
# ---------------------------------------------------------------------------------------------

TLS_VM = ("--cpus", "boot=2", "--memory", "size=64M", "--workload", "verify,dirty_percent=10")


#: TLS 1.3 lets the client finish its handshake before the server has checked the client's certificate,
#: so the receiver's refusal reaches the sender at its first write (an EOF) or its first read (an alert),
#: whichever comes first.  Both must name TLS (chmig's own word, not OpenSSL's "TLSV1_ALERT_..."), so the
#: refusal is tried this many times, one fresh receiver each, to meet both.
REFUSAL_ATTEMPTS = 5


def _wait_log(vmm: VmmProcess, pattern: str, timeout: float = 10) -> str:
    """The process's log once it matches ``pattern`` (it writes its log asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        text = vmm.log.read_text() if vmm.log.exists() else ""
        if re.search(pattern, text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


@requires_kvm
def test_tls_receiver_refuses_a_client_certificate_from_another_ca(procs: Processes, pki: Pki) -> None:
    """Mutation caught: the receiver not demanding or not verifying the client's certificate
    (``CERT_NONE``/``CERT_OPTIONAL``).  The sender here trusts the receiver's CA, so only the receiver can say
    no (the existing wrong-CA test has both sides refuse, so it passes with either check gone)."""
    source = procs.run(*TLS_VM)
    source.wait_for(lambda i: _every_vcpu(i, 1), what="a full round on every vCPU")
    refusal = r"TLS handshake with client failed.*certificate"
    for attempt in range(REFUSAL_ATTEMPTS):
        dest, url = procs.receive("tcp:127.0.0.1:0", "--tls-dir", str(pki.good))
        with pytest.raises(ApiError, match=r"\bTLS\b"):
            _send(source, url, tls_dir=str(pki.rogue_client))
        # It was the receiver that said no, and for the certificate.
        assert re.search(refusal, _wait_log(dest, refusal)), f"attempt {attempt + 1}\n{dest.tail()}"
        dest.stop()
    _keeps_running(source)


def _server_with_strangers_certificate(pki: Pki, where: Path) -> Path:
    """A receiver's tls_dir that trusts our CA (so it would accept our client) but presents a server
    certificate of another CA: only the sender can notice."""
    where.mkdir()
    shutil.copy(pki.good / CA_CERT_FILE, where / CA_CERT_FILE)
    shutil.copy(pki.stranger / SERVER_CERT_FILE, where / SERVER_CERT_FILE)
    shutil.copy(pki.stranger / SERVER_KEY_FILE, where / SERVER_KEY_FILE)
    return where


@requires_kvm
def test_tls_sender_refuses_a_server_certificate_from_another_ca(procs: Processes, pki: Pki,
                                                                 tmp_path: Path) -> None:
    """Mutation caught: the sender not verifying the receiver's certificate (``CERT_NONE``, or its CA file
    not loaded).  The receiver here trusts our client, so only the sender can say no."""
    source = procs.run(*TLS_VM)
    source.wait_for(lambda i: _every_vcpu(i, 1), what="a full round on every vCPU")
    tls_dir = _server_with_strangers_certificate(pki, tmp_path / "stranger-server")
    dest, url = procs.receive("tcp:127.0.0.1:0", "--tls-dir", str(tls_dir))
    with pytest.raises(ApiError, match=r"\bTLS\b") as refused:
        _send(source, url, tls_dir=str(pki.good))
    # The sender itself refused, in its handshake, for the chain it could not verify.
    assert re.search(r"certificate verify failed", str(refused.value), re.IGNORECASE), refused.value
    _keeps_running(source)


# ---------------------------------------------------------------------------------------------
# 4. bench/precopy.py fails when a hop's guest found bad memory
# ---------------------------------------------------------------------------------------------

#: Runs in its own process, as the benchmark does (``bench/_common.py`` sets sys.path and PYTHONPATH when
#: imported, which must not leak into this test session): two real hops of ``bench/precopy.py`` with a
#: small VM, the second after one verified page of the guest was flipped through its memfd.
BENCH_HOPS = textwrap.dedent('''
    import os
    import sys

    sys.path.insert(0, sys.argv[1])
    import _common as c
    import precopy


    def flip_a_verified_page(vmm) -> None:
        """Invert 8 bytes of a page the guest verifies (gpa 2 MiB), through the VMM's guest-RAM memfd."""
        gpa = 2 << 20
        fds = f"/proc/{vmm.proc.pid}/fd"
        for name in os.listdir(fds):
            if os.readlink(f"{fds}/{name}").startswith("/memfd:chmig-mem0"):
                fd = os.open(f"{fds}/{name}", os.O_RDWR)
                try:
                    os.pwrite(fd, bytes(b ^ 0xFF for b in os.pread(fd, 8, gpa)), gpa)
                finally:
                    os.close(fd)
                return
        raise RuntimeError("no guest-RAM memfd in the VMM")


    def main() -> int:
        with c.processes("chmig-test-bench-hops-") as procs:
            vmm = procs.run("--memory", "size=16M", "--workload", "verify,dirty_percent=0")
            vmm.wait_rounds(1, timeout=60)
            vmm, _ = precopy.hop(procs, vmm, "healthy", connections=1)
            print("healthy hop passed", flush=True)
            flip_a_verified_page(vmm)
            precopy.hop(procs, vmm, "after a flipped page", connections=1)
            print("broken hop passed", flush=True)
        return 0


    sys.exit(c.exit_status(main))
''')


@requires_kvm
def test_bench_precopy_hop_fails_when_the_guest_found_errors(tmp_path: Path) -> None:
    """Mutation caught: ``bench/precopy.py`` printing a hop's guest errors and carrying on (exit 0, its
    tables built on a broken migration).  A healthy hop must still pass, so the check is not always-fail."""
    script = tmp_path / "bench_hops.py"
    script.write_text(BENCH_HOPS)
    done = subprocess.run([sys.executable, str(script), str(ROOT / "bench")], cwd=ROOT, capture_output=True,
                          text=True, timeout=150)
    assert "healthy hop passed" in done.stdout, done.stdout + done.stderr
    assert "broken hop passed" not in done.stdout, done.stdout + done.stderr
    assert done.returncode == 1, done.stdout + done.stderr
    # One clear line naming the hop and what the guest found (no traceback to dig through).
    assert re.search(r"^bench_hops\.py: FAILED: hop after a flipped page: the guest reported \d+ memory error",
                     done.stderr, re.MULTILINE), done.stderr
    assert "Traceback" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------
# 5. .ci/run's verdict: a floor, no narrowing, no skips on a KVM host
# ---------------------------------------------------------------------------------------------

CI_RUN = ROOT / ".ci" / "run"
HAVE_ALL_DEVICES = os.path.exists("/dev/kvm") and os.path.exists("/dev/userfaultfd")


def _floor() -> int:
    """MIN_TESTS, read from the script: the floor is one named number there."""
    found = re.search(r"^MIN_TESTS=(\d+)$", CI_RUN.read_text(), re.MULTILINE)
    assert found, "MIN_TESTS=<number> is gone from .ci/run"
    return int(found.group(1))


def _pytest_output(closing: str, testpaths: bool = True) -> str:
    """A `make test` output as pytest 9 prints it, with this closing line."""
    header = ["============================= test session starts ==============================",
              "platform linux -- Python 3.11.7, pytest-9.2.0, pluggy-1.7.0",
              "rootdir: /work/main", "configfile: pyproject.toml"]
    if testpaths:  # only when no path was given on pytest's command line
        header.append("testpaths: tests")
    header += ["plugins: timeout-2.4.0, hypothesis-6.170.17", "collected 600 items", "",
               "tests/test_channel.py ........................................          [  7%]"]
    return "\n".join(header + [closing, ""])


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that narrows a run (this test may itself run under such a make)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_ARGS", "PYTEST_ADDOPTS", "MAKEFLAGS", "MAKEOVERRIDES", "MFLAGS")}
    return {**env, **extra}


def _check(tmp_path: Path, output: str, status: int = 0, **env: str) -> subprocess.CompletedProcess[str]:
    log = tmp_path / "make-test.log"
    log.write_text(output)
    return subprocess.run(["bash", str(CI_RUN), "--check-summary", str(log), str(status)], cwd=tmp_path,
                          env=_clean_env(**env), capture_output=True, text=True, timeout=30)


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    return done.stdout.strip().splitlines()[-1]


def test_ci_verdict_passes_a_whole_clean_run(tmp_path: Path) -> None:
    """The control: a whole run at the floor, nothing skipped, passes — so the failures below are the rules'."""
    n = _floor()
    done = _check(tmp_path, _pytest_output(f"========== {n} passed, 3 warnings in 412.33s (0:06:52) =========="))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _last_line(done) == f"CI summary: ran {n} tests: {n} passed, 0 failed, 0 skipped, 0 errors"
    assert "CI:" not in done.stdout.replace("CI summary:", "")


@pytest.mark.parametrize(("case", "closing", "status", "env", "expected"), [
    # Mutation: the floor check removed (a suite that lost most of its tests passes).
    ("floor", "===== {low} passed in 30.01s =====", 0, {}, r"only {low} tests ran, fewer than MIN_TESTS={n}"),
    # Mutation: failures not propagated (the exit status is make's).
    ("failed", "===== 2 failed, {n} passed in 400.00s (0:06:40) =====", 2, {}, r"make test failed \(exit 2\)"),
    # Mutations: each narrowing check removed.
    ("deselected", "===== {n} passed, 12 deselected in 400.00s (0:06:40) =====", 0, {},
     r"12 tests deselected"),
    ("PYTEST_ADDOPTS", "===== {n} passed in 400.00s (0:06:40) =====", 0, {"PYTEST_ADDOPTS": "-p no:randomly"},
     r"PYTEST_ADDOPTS='-p no:randomly' is set"),
    ("PYTEST_ARGS", "===== {n} passed in 400.00s (0:06:40) =====", 0, {"PYTEST_ARGS": "tests/test_cli.py"},
     r"PYTEST_ARGS='tests/test_cli.py' is set"),
    ("MAKEFLAGS", "===== {n} passed in 400.00s (0:06:40) =====", 0, {"MAKEFLAGS": " -- PYTEST_ARGS=-x"},
     r"MAKEFLAGS passes PYTEST_ARGS"),
    ("path given", "===== {n} passed in 400.00s (0:06:40) =====", 0, {}, r"given paths instead of"),
    # pytest killed, or run with -q / --co: no closing line to trust.
    ("no summary", "tests/test_vm.py ....Killed", 0, {}, r"no pytest summary line"),
])
def test_ci_verdict_fails_a_narrowed_short_or_failed_run(tmp_path: Path, case: str, closing: str, status: int,
                                                          env: dict[str, str], expected: str) -> None:
    n = _floor()
    low = n // 5
    output = _pytest_output(closing.format(n=n, low=low), testpaths=case != "path given")
    done = _check(tmp_path, output, status, **env)
    assert done.returncode == (status or 1), done.stdout + done.stderr
    assert re.search(expected.format(n=n, low=low), done.stdout), done.stdout
    assert _last_line(done).startswith("CI summary: ran "), done.stdout


def test_ci_verdict_fails_any_skip_on_a_kvm_host(tmp_path: Path) -> None:
    """Mutation caught: the skip rule removed (kept from before; on this machine's devices)."""
    n = _floor()
    done = _check(tmp_path, _pytest_output(f"===== {n} passed, 2 skipped in 400.00s (0:06:40) ====="))
    assert _last_line(done) == f"CI summary: ran {n} tests: {n} passed, 0 failed, 2 skipped, 0 errors"
    if HAVE_ALL_DEVICES:
        assert done.returncode == 1 and "2 tests skipped on a machine that has /dev/kvm" in done.stdout, done.stdout
    else:
        assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(("args", "env"), [(["-k", "migration"], {}), ([], {"PYTEST_ADDOPTS": "-k migration"}),
                                           ([], {"PYTEST_ARGS": "tests/test_cli.py"})])
def test_ci_refuses_to_start_a_narrowed_run(tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
    """Mutation caught: ``.ci/run`` passing a narrowing on (or ignoring it) and running part of the suite.

    It must refuse before it starts anything; a ``make`` first on PATH that only records being started
    is the tripwire that keeps a broken refusal from running the whole suite inside this test.
    """
    tripwire = tmp_path / "bin"
    tripwire.mkdir()
    (tripwire / "make").write_text(f"#!/bin/sh\necho started > {tmp_path}/make-was-started\nexit 99\n")
    (tripwire / "make").chmod(0o755)
    clean = _clean_env(**env)
    clean["PATH"] = f"{tripwire}{os.pathsep}{clean.get('PATH', '')}"
    done = subprocess.run(["bash", str(CI_RUN), *args], cwd=tmp_path, env=clean, capture_output=True, text=True,
                          timeout=30)
    assert not (tmp_path / "make-was-started").exists(), done.stdout
    assert done.returncode == 2, done.stdout + done.stderr
    assert "CI: the suite would be narrowed" in done.stdout, done.stdout
    assert _last_line(done) == "CI summary: ran 0 tests: 0 passed, 0 failed, 0 skipped, 0 errors"
