"""Benchmark the offload daemon (``chmig offload``): restore and snapshot, against baselines in the same run.

    python3 bench/restore.py [--quick]

For each guest size (256 MiB, 1 GiB, 4 GiB; ``--quick``: 256 MiB and 1 GiB,
one run per cell), a ``chmig run --memory size=S --workload verify`` process
(1 vCPU; at first boot the guest stamps every page above 1 MiB, then every
round re-reads all of them and rewrites 10 %, at several GiB/s, so the
snapshot holds real data) is snapshotted by the daemon 3 times (--quick:
once), each followed by the cp baseline, then stopped, and its last snapshot
is restored 5 ways, 3 times each (--quick: once), the ways interleaved run
after run:

* The daemon is a helper process started once by this benchmark
  (``bench/restore.py --daemon-helper``, chmig already imported, as in a
  running ``chmig offload``): told a command on its stdin, it takes the time
  (``CLOCK_MONOTONIC``, one clock for the whole machine) and calls
  ``SnapshotReceiver(...).run()`` or ``RestoreSender(...).run()``.  Its steps
  are timed by wrappers it puts around chmig functions (``_memfd_for``,
  ``_migrate``, ``OnDemandSlot.place``, ``snapshot_dir``'s ``_digest``,
  ``read_exactly_at`` and ``write_all_at``, ``os.fsync``); nothing in chmig/ is
  changed.
* The restoring VMM is in this process: a :class:`chmig.vmm.Vmm` doing
  ``receive_migration(ReceiveOptions(receiver_url="unix:...", memory_mode=...))``
  in a thread, with an observer on its channel messages.  The VM runs its
  first instruction when ``Vm.resume`` returns in the Complete step: the
  observer takes the time at which the destination sends Ok to Complete (the
  Ok is sent right after the resume returned).

1. Time to first instruction: from the daemon's ``RestoreSender.run()`` being
   called until the destination answers Ok to Complete (the VM resumed).  On
   demand (``--ondemand``; the VMM receives with ``memory_mode=postcopy``), 1
   and 2 Fault connections, vs eager (the baseline); with the snapshot's
   memory files in the page cache (hot: they were just written) and dropped
   from it (cold: ``posix_fadvise(DONTNEED)`` on those files only).  1b: the
   breakdown — opening the snapshot, filling the memfds (eager: read, verify
   against the manifest, write), and the protocol (the destination's Config,
   State and Complete steps inside it).
2. Time until the on-demand VM is whole: the destination pager's
   ``whole_after_ms`` (from State) and from the start of the restore, default
   prefetch (1M), 1 vs 2 Fault connections; baseline: the eager restore's time
   to first instruction (an eager VM is whole when it starts).  2b: the
   daemon's side (time spent placing pages, and hashing in it).
3. Snapshot write throughput: the daemon's ``SnapshotResult.write_ms`` (from
   the start of Complete handling to the Ok: hash, write, fsync, manifest,
   rename) vs ``cp --sparse=always memory-0 [memory-1] DIR/ && sync DIR/...``
   (``sync FILE`` = fsync of that file, as chmig fsyncs its files) of a
   snapshot's memory files, timed as one, which of the two goes first
   alternating run after run, each after an untimed ``sync`` and 1 s of quiet.
   Nothing is dropped from the page cache for either.  A snapshot that takes
   longer than the source VMM waits for the answer to Complete
   (``protocol.completion_timeout``) is reported, and still measured.

Every restored VM is checked: once it is whole, its vCPU completes two more
verify rounds and the guest's ``errors`` must be 0, or the run stops with exit
status 1 naming the restore.  The full run takes about 5 minutes here.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as c
from _common import GiB, MiB

from chmig.apiclient import ApiError

SIZES = ("256M", "1G", "4G")
QUICK_SIZES = ("256M", "1G")
WORKLOAD = "verify"
#: Runs per cell: the full run (per size), --quick.
FULL_RUNS = {"256M": 3, "1G": 3, "4G": 3}
TARGET_MS = 50.0  # time to first instruction on demand (the target)
#: Snapshots the daemon wrote whole and put in place, whose source VMM had stopped waiting for the Ok
#: (chmig's source waits ``protocol.completion_timeout`` for the answer to Complete).
GAVE_UP: list[str] = []


def size_bytes(size: str) -> int:
    return int(size[:-1]) * (GiB if size.endswith("G") else MiB)


def size_label(size: str) -> str:
    return size.replace("G", " GiB").replace("M", " MiB")


# ---------------------------------------------------------------------------------------------
# The daemon: a helper process that runs chmig.offload when told
# ---------------------------------------------------------------------------------------------


def daemon_helper() -> int:
    """``--daemon-helper``: one JSON command per stdin line, JSON events on stdout."""
    from chmig import offload, snapshot_dir
    from chmig import protocol as p

    times: dict[str, float] = {}
    lock = threading.Lock()

    def timed(owner: object, name: str, key: str, reset: tuple[str, ...] = ()) -> None:
        """Wrap ``owner.name``: its calls' total time (ms, summed over threads) in ``times[key_ms]``, the first
        call's start in ``times[key_begin]``; ``reset``: keys zeroed when it is called.  A name chmig no longer
        has is left alone (its columns then show 0 or -)."""
        original = getattr(owner, name, None)
        if original is None:
            print(f"restore.py --daemon-helper: {owner!r} has no {name}: not timed", file=sys.stderr, flush=True)
            return

        def wrapper(*args: object, **kwargs: object) -> object:
            begin = time.monotonic()
            with lock:
                for other in reset:
                    times.pop(f"{other}_ms", None)
                times.setdefault(f"{key}_begin", begin)
            try:
                return original(*args, **kwargs)
            finally:
                with lock:
                    times[f"{key}_ms"] = times.get(f"{key}_ms", 0.0) + (time.monotonic() - begin) * 1000

        setattr(owner, name, wrapper)

    # Restore: the daemon's steps.  Snapshot and restore: hashing, writing and fsync inside chmig.snapshot_dir
    # (module globals, looked up at each call); the snapshot's are counted from Complete on.
    timed(offload.RestoreSender, "_memfd_for", "memfds")
    timed(offload.RestoreSender, "_migrate", "migrate")
    timed(offload.OnDemandSlot, "place", "place")
    timed(snapshot_dir, "_digest", "hash")
    timed(snapshot_dir, "read_exactly_at", "read")
    timed(snapshot_dir, "write_all_at", "pwrite")
    timed(os, "fsync", "fsync")
    timed(offload.SnapshotReceiver, "on_complete", "complete", reset=("hash", "read", "pwrite", "fsync"))
    steps = getattr(offload, "SNAPSHOT_STEPS", {})
    for command in (p.Command.COMPLETE, p.Command.COMPLETE_PAUSED):  # the steps table holds the functions
        if command in steps:
            steps[command] = offload.SnapshotReceiver.on_complete

    def emit(event: dict) -> None:
        print(json.dumps(event), flush=True)

    for line in sys.stdin:
        command = json.loads(line)
        try:
            times.clear()
            if command["op"] == "snapshot":
                receiver = offload.SnapshotReceiver(command["socket"], command["dir"])
                answer_error = None
                try:
                    receiver.run(on_listening=lambda path: emit({"event": "listening"}))
                except Exception as exc:
                    if not receiver.result.write_ms:
                        raise
                    # Written and put in place, but the Ok could not be sent: the VMM gave up waiting.
                    answer_error = f"{type(exc).__name__}: {exc}"
                result = receiver.result
                emit({"event": "done", "write_ms": result.write_ms, "memory_bytes": result.memory_bytes,
                      "data_bytes": result.data_bytes, "completion": result.completion,
                      "answer_error": answer_error, **times})
            elif command["op"] == "restore":
                t0 = time.monotonic()
                sender = offload.RestoreSender(command["socket"], command["dir"], resume=True,
                                               ondemand=command["ondemand"],
                                               fault_connections=command["fault_connections"])
                result = sender.run()
                emit({"event": "done", "t0": t0, "t_end": time.monotonic(), **times,
                      "handed_over_ms": result.handed_over_ms, "copied_bytes": result.copied_bytes,
                      "memory_bytes": result.memory_bytes, "page_faults": result.page_faults,
                      "pages_served": result.pages_served, "verified": result.verified})
            else:
                raise ValueError(f"unknown op {command['op']!r}")
        except Exception as exc:  # reported to the benchmark, which fails the run
            emit({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
    return 0


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Daemon:
    """The helper process, and its events read by a thread (so every wait has a deadline)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--daemon-helper"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     preexec_fn=_die_with_parent)
        self.events: queue.Queue[dict | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, name="bench-daemon-reader", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                c.say(f"daemon helper: {line.rstrip()}")
        self.events.put(None)

    def send(self, command: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def expect(self, event: str, what: str, timeout: float = 600) -> dict:
        try:
            got = self.events.get(timeout=timeout)
        except queue.Empty:
            raise c.BenchmarkFailed(f"{what}: the daemon said nothing for {timeout:g} s") from None
        if got is None:
            raise c.BenchmarkFailed(f"{what}: the daemon exited ({self.proc.poll()})")
        if got.get("event") != event:
            raise c.BenchmarkFailed(f"{what}: the daemon failed: {got.get('error', got)}")
        return got

    def close(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# Part 3: snapshots, and cp of the same bytes
# ---------------------------------------------------------------------------------------------


@dataclass
class SnapshotRun:
    write_ms: float
    memory_bytes: int
    data_bytes: int
    cp_ms: float
    cp_bytes: int
    cp_allocated: int
    hash_ms: float  # inside write_ms: SHA-256 of every chunk
    read_ms: float  # inside write_ms: preadv of the source's memfd into the buffer
    pwrite_ms: float  # inside write_ms: pwrite of the chunks that hold data
    fsync_ms: float  # inside write_ms: every fsync (memory file, manifest, directory, parent)
    acknowledged: bool  # the source VMM got the Ok (else it gave up waiting: see GAVE_UP)
    cp_first: bool  # cp ran before chmig's snapshot (copying the previous snapshot's files)


#: Before every timed write (chmig's or cp's), untimed: ``sync`` everything, then this long for the disk to settle.
QUIET_S = 1.0


def quiet() -> None:
    subprocess.run(["sync"], check=True)
    time.sleep(QUIET_S)


def memory_files(snapshot: Path) -> list[Path]:
    """The snapshot's ``memory-<slot>`` files (a 4 GiB guest has two slots: below and above the 32-bit hole)."""
    return sorted(snapshot.glob("memory-*"))


def cp_baseline(files: list[Path], into: Path) -> tuple[float, int, int]:
    """``cp --sparse=always FILES... INTO/ && sync INTO/FILE...`` timed as one: (ms, bytes, bytes allocated)."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir()
    quiet()
    copies = [str(into / f.name) for f in files]
    begin = time.monotonic()
    subprocess.run(["cp", "--sparse=always", *map(str, files), str(into)], check=True)
    subprocess.run(["sync", *copies], check=True)  # fsync of each copy
    ms = (time.monotonic() - begin) * 1000
    stats = [os.stat(copy) for copy in copies]
    return ms, sum(st.st_size for st in stats), sum(st.st_blocks * 512 for st in stats)


def snapshots(procs, daemon: Daemon, size: str, runs: int) -> tuple[list[SnapshotRun], Path]:
    """Boot the VM, snapshot it ``runs`` times, each with the cp baseline; return the last snapshot.

    Which write goes first alternates: chmig then cp (of the files chmig just wrote) in even runs, cp (of the
    previous run's files: same slots, same sizes, same data but for the guest's 10 % rewrites) then chmig in odd
    runs, so that neither always finds the disk busy with the other's writes.
    """
    folder: Path = procs.tmp
    c.say(f"{size_label(size)}: booting the source VM ({WORKLOAD}, 1 vCPU)")
    begin = time.monotonic()
    vm = procs.run("--memory", f"size={size}", "--workload", WORKLOAD)
    vm.wait_rounds(1, timeout=300)  # every page stamped, then verified once
    c.say(f"  stamped and verified once after {time.monotonic() - begin:.1f} s")
    sock = folder / "snapshot.sock"
    copy = folder / "cp-copy"
    result: list[SnapshotRun] = []
    last: Path | None = None
    for run in range(runs):
        target = folder / f"snapshot-{size}-{run}"
        what = f"{size_label(size)} snapshot (run {run + 1})"
        cp_first = run % 2 == 1 and last is not None
        if cp_first:
            assert last is not None
            cp_ms, cp_bytes, cp_allocated = cp_baseline(memory_files(last), copy)
        daemon.send({"op": "snapshot", "socket": str(sock), "dir": str(target)})
        daemon.expect("listening", what, timeout=60)
        quiet()
        vmm_error = None
        try:
            vm.call("PUT", "vm.send-migration", {"destination_url": f"unix:{sock}", "local": True,
                                                 "preserve_source": True}, timeout=900)
        except ApiError as exc:
            vmm_error = str(exc)
        done = daemon.expect("done", what)
        if vmm_error is not None:
            # The daemon wrote the snapshot whole, but the VMM stopped waiting for the Ok first (its bounded wait
            # for the answer to Complete): a finding, reported; the snapshot is measured.
            if "not acknowledged" not in vmm_error or not done.get("answer_error"):
                raise c.BenchmarkFailed(f"{what}: send-migration failed: {vmm_error}; daemon: {done}")
            GAVE_UP.append(f"{what}, written in {done['write_ms'] / 1000:.1f} s")
            c.say(f"  !! {what}: the source VMM gave up waiting for the daemon's Ok (the snapshot is written "
                  f"and in place): {vmm_error}")
        if not cp_first:
            cp_ms, cp_bytes, cp_allocated = cp_baseline(memory_files(target), copy)
        result.append(SnapshotRun(done["write_ms"], done["memory_bytes"], done["data_bytes"], cp_ms, cp_bytes,
                                  cp_allocated, done.get("hash_ms", 0.0), done.get("read_ms", 0.0),
                                  done.get("pwrite_ms", 0.0), done.get("fsync_ms", 0.0), vmm_error is None, cp_first))
        c.say(f"  {what}: {done['memory_bytes'] // MiB} MiB of RAM ({done['data_bytes'] / MiB:.0f} MiB of data) "
              f"in {done['write_ms']:.0f} ms (read {done.get('read_ms', 0):.0f}, hash {done.get('hash_ms', 0):.0f}, "
              f"pwrite {done.get('pwrite_ms', 0):.0f}, "
              f"fsync {done.get('fsync_ms', 0):.0f}); cp + fsync of {cp_bytes // MiB} MiB "
              f"({'before' if cp_first else 'after'} it): {cp_ms:.0f} ms")
        # Untimed: the previous snapshot and the copy go; the source runs again before the next one.
        if last is not None:
            shutil.rmtree(last)
        last = target
        shutil.rmtree(copy)
        info = vm.info()
        if info["state"] != "Paused":
            raise c.BenchmarkFailed(f"{what}: the source is {info['state']} after send-migration preserve_source=on")
        vm.call("PUT", "vm.resume")
        rounds = vm.info()["guest"]["rounds"]
        info = vm.wait_rounds(rounds + 1, timeout=120)
        c.check_guest(f"{what}: the source after the snapshot", info)
    vm.stop()  # its memory goes before the restores
    assert last is not None
    return result, last


# ---------------------------------------------------------------------------------------------
# Parts 1 and 2: restores into an in-process VMM
# ---------------------------------------------------------------------------------------------


class MainConnectionTimes:
    """Observer: when the destination received each request on the main connection, and answered it."""

    def __init__(self) -> None:
        self.received: dict[str, float] = {}
        self.answered: dict[str, tuple[str, float]] = {}
        self._last: str | None = None

    def __call__(self, message) -> None:
        if message.side != "destination" or message.connection != "main":
            return
        now = time.monotonic()
        if message.direction == "received" and message.kind == "request":
            self.received[message.name] = now
            self._last = message.name
        elif message.direction == "sent" and message.kind == "response" and self._last is not None:
            self.answered[self._last] = (message.name, now)

    def step_ms(self, name: str) -> float:
        return (self.answered[name][1] - self.received[name]) * 1000


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    ondemand: bool
    faults: int = 1
    #: The snapshot's memory files dropped from the page cache first (posix_fadvise DONTNEED on them only).
    cold: bool = False


EAGER = Mode("eager", "eager", False)
OD1 = Mode("od1", "on demand, 1 Fault conn", True, 1)
OD2 = Mode("od2", "on demand, 2 Fault conns", True, 2)
EAGER_COLD = Mode("eager-cold", "eager, cold cache", False, cold=True)
OD2_COLD = Mode("od2-cold", "on demand, 2 Fault conns, cold cache", True, 2, cold=True)
MODES = (EAGER, OD1, OD2, EAGER_COLD, OD2_COLD)


def drop_from_page_cache(snapshot: Path) -> None:
    """Drop the snapshot's memory files (clean: they were fsynced) from the page cache; nothing else."""
    for path in snapshot.glob("memory-*"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass
class RestoreRun:
    mode: Mode
    size: str
    ttfi_ms: float  # RestoreSender.run() called -> Ok to Complete (VM resumed)
    open_ms: float  # run() called -> first memfd step (snapshot opened: manifest, JSON, memory files)
    memfds_ms: float  # eager: memfds filled from the files, verified; on demand: empty memfds made and mapped
    protocol_ms: float  # the daemon's _migrate begins -> Ok to Complete
    connect_ms: float  # _migrate begins -> the destination has read Start (connect, accept)
    memory_fds_ms: float  # Start read -> Config read (Start answered, the MemoryFds passed)
    config_ms: float
    fault_conns_ms: float  # Config answered -> State read (on demand: the daemon opens its Fault connections)
    state_ms: float
    complete_ms: float
    daemon: dict
    postcopy: dict = field(default_factory=dict)
    whole_from_start_ms: float | None = None


def _rounds(info: dict) -> list[int]:
    return [v["rounds"] for v in info["guest"]["vcpus"]]


def settle(vmm, label: str, timeout: float = 180) -> None:
    """The restored VM (whole by now) completes two more verify rounds on every vCPU, with 0 errors."""
    info = vmm.info()
    c.check_guest(label, info)
    start = _rounds(info)
    deadline = time.monotonic() + timeout
    while not all(r >= s + 2 for r, s in zip(_rounds(info), start)):
        if time.monotonic() > deadline:
            raise c.BenchmarkFailed(f"{label}: no two verify rounds within {timeout:g} s: {info['guest']}")
        time.sleep(0.05)
        info = vmm.info()
    c.check_guest(label, info)


def restore(daemon: Daemon, folder: Path, snapshot: Path, size: str, mode: Mode, run: int) -> RestoreRun:
    from chmig.receive import ReceiveOptions
    from chmig.vmm import Vmm

    label = f"{size_label(size)} restore {mode.label} (run {run + 1})"
    sock = folder / "restore.sock"
    vmm = Vmm("off")
    times = MainConnectionTimes()
    vmm.observers.add(times)
    listening = threading.Event()
    box: dict = {}

    def receive() -> None:
        try:
            options = ReceiveOptions(receiver_url=f"unix:{sock}",
                                     memory_mode="postcopy" if mode.ondemand else "precopy")
            box["stats"] = vmm.receive_migration(options, on_listening=lambda address: listening.set())
        except BaseException as exc:  # reported below
            box["error"] = exc
            listening.set()

    thread = threading.Thread(target=receive, name="bench-receive", daemon=True)
    if mode.cold:
        drop_from_page_cache(snapshot)
    try:
        thread.start()
        if not listening.wait(60) or "error" in box:
            raise c.BenchmarkFailed(f"{label}: the VMM did not listen: {box.get('error')}")
        daemon.send({"op": "restore", "socket": str(sock), "dir": str(snapshot), "ondemand": mode.ondemand,
                     "fault_connections": mode.faults})
        thread.join(600)
        if thread.is_alive() or "error" in box:
            raise c.BenchmarkFailed(f"{label}: receive-migration failed: {box.get('error', 'still running')}")
        stats = box["stats"]
        pc: dict = {}
        whole_from_start = None
        if mode.ondemand:
            pager = vmm.postcopy
            if pager is None or not pager.wait(600):
                raise c.BenchmarkFailed(f"{label}: the on-demand VM did not become whole")
            if pager.stats.status != "whole":
                raise c.BenchmarkFailed(f"{label}: postcopy {pager.stats.status}: {pager.error}")
            pc = pager.stats.to_json()
        done = daemon.expect("done", label)  # on demand: after the VMM closed every Fault connection
        t0 = done["t0"]
        if mode.ondemand:
            begin = getattr(stats.postcopy, "_begin", None)  # when the pager's clock started (State)
            if begin is None:
                begin = times.received["State"]
            whole_from_start = (begin - t0) * 1000 + pc["whole_after_ms"]
        settle(vmm, label)
    finally:
        vmm.close()
        thread.join(30)
    answer, t_ok = times.answered["Complete"]
    if answer != "Ok":
        raise c.BenchmarkFailed(f"{label}: Complete was answered {answer}")
    first_step = min(done.get("memfds_begin", float("inf")), done.get("migrate_begin", float("inf")))
    if first_step == float("inf"):
        first_step = t0
    result = RestoreRun(
        mode, size, (t_ok - t0) * 1000, (first_step - t0) * 1000, done.get("memfds_ms", 0.0),
        (t_ok - done.get("migrate_begin", t0)) * 1000,
        (times.received["Start"] - done.get("migrate_begin", t0)) * 1000,
        (times.received["Config"] - times.received["Start"]) * 1000, times.step_ms("Config"),
        (times.received["State"] - times.answered["Config"][1]) * 1000, times.step_ms("State"),
        times.step_ms("Complete"), done, pc, whole_from_start)
    text = (f"  {label}: first instruction after {result.ttfi_ms:.1f} ms (open {result.open_ms:.1f}, memfds "
            f"{result.memfds_ms:.1f}, protocol {result.protocol_ms:.1f})")
    if mode.ondemand:
        text += (f", whole after {pc['whole_after_ms']:.0f} ms ({pc['pages_faulted']} faulted, {pc['pages_pulled']} "
                 f"pulled)")
    c.say(text + ", errors 0")
    return result


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def med(values: list[float]) -> float | None:
    return c.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def report_ttfi(restores: dict[tuple[str, str], list[RestoreRun]], sizes: list[str], runs_note: str) -> None:
    rows = []
    ttfi = lambda r: r.ttfi_ms  # noqa: E731
    for size in sizes:
        for cache, (o1, o2, e) in (("hot", (OD1, OD2, EAGER)), ("cold", (None, OD2_COLD, EAGER_COLD))):
            r1, r2, rs = (restores.get((size, m.key), []) if m else [] for m in (o1, o2, e))
            if not (r1 or r2 or rs):
                continue
            m1, m2, me = med([ttfi(r) for r in r1]), med([ttfi(r) for r in r2]), med([ttfi(r) for r in rs])
            rows.append([size_label(size), cache, m1, c.spread([ttfi(r) for r in r1], "{:.1f}") if r1 else None,
                         m2, c.spread([ttfi(r) for r in r2], "{:.1f}"), me, c.spread([ttfi(r) for r in rs]),
                         ratio(m1, me), ratio(m2, me), "yes" if max(m1 or 0, m2 or 0) <= TARGET_MS else "no"])
    c.table("1. Restore: time to first instruction (ms), on demand vs eager",
            ["VM", "page cache", "on demand, 1 Fault conn ms", "(samples)", "on demand, 2 Fault conns ms",
             "(samples)", "eager ms (baseline)", "(samples)", "ratio od1/eager", "ratio od2/eager",
             f"on demand <= {TARGET_MS:g} ms"],
            rows,
            ["from the daemon's RestoreSender(...).run() being called (in the daemon process, started and imported "
             "beforehand) until the destination VMM (in the benchmark's process) sends Ok to Complete, i.e. right "
             "after Vm.resume returned: the vCPU threads run guest code from there.  One CLOCK_MONOTONIC for both "
             "processes; nothing subtracted.",
             "on demand = offload restore --ondemand --resume --fault-connections N to a VMM receiving with "
             "memory_mode=postcopy (default prefetch 1M); eager = offload restore --resume to a precopy VMM.",
             "page cache hot: the memory files were written just before and are still cached; cold: "
             "posix_fadvise(DONTNEED) on the memory files (only) just before the restore, so they come from the disk.",
             runs_note])


def report_breakdown(restores: dict[tuple[str, str], list[RestoreRun]], sizes: list[str]) -> None:
    rows = []
    for size in sizes:
        for mode in MODES:
            runs = restores.get((size, mode.key), [])
            if not runs:
                continue
            pick = lambda f: med([f(r) for r in runs])  # noqa: E731
            eager = lambda f: None if mode.ondemand else pick(f)  # noqa: E731
            memfds = pick(lambda r: r.memfds_ms)
            rows.append([size_label(size), mode.label, pick(lambda r: r.ttfi_ms), pick(lambda r: r.open_ms), memfds,
                         eager(lambda r: r.daemon.get("read_ms", 0.0)), eager(lambda r: r.daemon.get("hash_ms", 0.0)),
                         eager(lambda r: r.daemon.get("pwrite_ms", 0.0)),
                         None if mode.ondemand else size_bytes(size) / MiB / (memfds / 1000),
                         pick(lambda r: r.protocol_ms), pick(lambda r: r.connect_ms), pick(lambda r: r.memory_fds_ms),
                         pick(lambda r: r.config_ms), pick(lambda r: r.fault_conns_ms), pick(lambda r: r.state_ms),
                         pick(lambda r: r.complete_ms)])
    c.table("1b. Where the time to first instruction goes (ms, medians)",
            ["VM", "restore", "total ms", "open snapshot", "memfds", "of which read", "hash (verify)",
             "write into memfd", "memfds MiB/s", "protocol", "of which: connect", "Start, MemoryFd", "Config",
             "-> State", "State", "Complete"],
            rows,
            ["total = open + memfds + protocol (the rest, daemon-side bookkeeping, is < 1 ms).  Medians of each "
             "column: they need not add up exactly.",
             "open snapshot = run() called until the first memfd is made: SnapshotImage (manifest.json, "
             "migration_config.json, state.json checked against the manifest, memory files opened, their data "
             "spans found).",
             "memfds = RestoreSender._memfd_for for every slot.  Eager: each memory file copied into a new memfd and "
             "verified on the way, chunk by chunk on one thread (of which: time inside snapshot_dir's read_exactly_at, "
             "_digest and write_all_at); memfds MiB/s = the guest's RAM over that time.  On demand: empty memfds "
             "made and mapped (the pages come later, table 2).",
             "protocol = the daemon's _migrate called until the destination's Ok to Complete, of which: connect = "
             "until the destination has read Start (connect, accept); Start, MemoryFd = until it read Config; Config "
             "/ State / Complete = the destination's step, from the request read to its Ok (Config: VM and KVM slots "
             "built on the memfds; State: vCPU state restored and, on demand, Fault connections taken and "
             "userfaultfd registered; Complete: Vm.resume); -> State = from Config's Ok until State is read (on "
             "demand: the daemon connects its Fault connections first)."])


def report_whole(restores: dict[tuple[str, str], list[RestoreRun]], sizes: list[str], runs_note: str) -> None:
    rows = []
    for size in sizes:
        one = None
        for mode, cache, baseline in ((OD1, "hot", EAGER), (OD2, "hot", EAGER), (OD2_COLD, "cold", EAGER_COLD)):
            runs = restores.get((size, mode.key), [])
            if not runs:
                continue
            eager = med([r.ttfi_ms for r in restores.get((size, baseline.key), [])])
            whole = [r.postcopy["whole_after_ms"] for r in runs]
            from_start = [r.whole_from_start_ms for r in runs]
            pick = lambda f: med([f(r) for r in runs])  # noqa: E731
            m_start = med(from_start)
            if mode is OD1:
                one = m_start
            rows.append([size_label(size), cache, mode.faults, med(whole), c.spread(whole), m_start,
                         c.spread(from_start), pick(lambda r: r.postcopy["pages_faulted"]),
                         pick(lambda r: r.postcopy["pages_pulled"]),
                         pick(lambda r: r.postcopy["fault_latency_us"]["p50"]),
                         pick(lambda r: r.postcopy["fault_latency_us"]["p99"]),
                         pick(lambda r: r.postcopy["blocktime_ms"]),
                         size_bytes(size) / MiB / (m_start / 1000) if m_start else None,
                         eager, ratio(m_start, eager), ratio(m_start, one) if mode is OD2 else None])
    c.table("2. On-demand restore: time until the VM is whole (ms), default prefetch 1M, 1 vs 2 Fault connections",
            ["VM", "page cache", "Fault conns", "whole after ms (pager, from State)", "(samples)",
             "from restore start ms", "(samples)", "pages faulted", "pages pulled", "fault p50 µs", "fault p99 µs",
             "vCPU blocked ms", "MiB/s (RAM / from start)", "eager first instruction ms (baseline)",
             "ratio whole/eager", "ratio 2 conns/1 conn"],
            rows,
            ["whole after = the destination pager's whole_after_ms: from State (userfaultfd registered) until every "
             "page is present; from restore start = from RestoreSender.run() called (same clock as table 1).  The "
             "guest runs meanwhile, re-reading all its RAM every round, so it faults all along.",
             "baseline: the eager restore's time to first instruction (same page cache state), when an eager VM is "
             "whole (and only starts).",
             "1 Fault conn: the destination pulls between faults on it; 2: fault-0 for the guest's faults, the pull "
             "on fault-1.  The daemon serves each PageFault by writing the range into the shared memfd (verifying "
             "each 2 MiB chunk the first time), answered Ok with length 0 (UFFDIO_CONTINUE on the destination).",
             runs_note])


def report_serving(restores: dict[tuple[str, str], list[RestoreRun]], sizes: list[str]) -> None:
    rows = []
    for size in sizes:
        for mode in (OD1, OD2, OD2_COLD):
            runs = restores.get((size, mode.key), [])
            if not runs:
                continue
            pick = lambda f: med([f(r) for r in runs])  # noqa: E731
            place = pick(lambda r: r.daemon.get("place_ms", 0.0))
            whole = pick(lambda r: r.postcopy["whole_after_ms"])
            rows.append([size_label(size), "cold" if mode.cold else "hot", mode.faults,
                         pick(lambda r: r.daemon["page_faults"]), pick(lambda r: r.daemon["pages_served"]),
                         whole, place, pick(lambda r: r.daemon.get("hash_ms", 0.0) + r.daemon.get("read_ms", 0.0)),
                         ratio(place, whole),
                         size_bytes(size) / MiB / (place / 1000) if place else None])
    c.table("2b. On-demand restore, the daemon's side: serving PageFaults (medians)",
            ["VM", "page cache", "Fault conns", "PageFaults served", "pages written", "whole after ms",
             "daemon place ms (all threads)", "of which verify ms", "place / whole", "place MiB/s"],
            rows,
            ["place = OnDemandSlot.place, summed over the daemon's Fault connection threads: verify each 2 MiB chunk "
             "the first time it is served (read into a buffer and SHA-256: snapshot_dir's read_exactly_at and _digest, "
             "'of which verify'), then preadv the unserved pages into the daemon's mapping of the memfd.  place / "
             "whole near 1 (or above, with 2 threads) = the daemon is busy the whole time: it bounds how fast the VM "
             "becomes whole."])


def report_snapshots(snaps: dict[str, list[SnapshotRun]], sizes: list[str], runs_note: str) -> None:
    rows = []
    for size in sizes:
        runs = snaps.get(size, [])
        if not runs:
            continue
        write = [r.write_ms for r in runs]
        cp = [r.cp_ms for r in runs]
        mem = runs[0].memory_bytes / MiB
        data = c.median([r.data_bytes for r in runs]) / MiB
        m_write, m_cp = med(write), med(cp)
        pick = lambda f: med([f(r) for r in runs])  # noqa: E731
        rows.append([size_label(size), mem / (m_write / 1000), data / (m_write / 1000), data, m_write,
                     c.spread(write), pick(lambda r: r.read_ms), pick(lambda r: r.hash_ms),
                     pick(lambda r: r.pwrite_ms), pick(lambda r: r.fsync_ms),
                     pick(lambda r: r.write_ms - r.read_ms - r.hash_ms - r.pwrite_ms - r.fsync_ms),
                     runs[0].cp_bytes / MiB / (m_cp / 1000), runs[0].cp_allocated / MiB, m_cp,
                     c.spread(cp), ratio(m_cp, m_write),
                     f"{sum(r.acknowledged for r in runs)} of {len(runs)}"])
    c.table("3. Snapshot write throughput: chmig offload snapshot vs cp --sparse=always + fsync of the same bytes",
            ["VM", "chmig MiB/s (RAM)", "chmig MiB/s (data)", "data MiB", "chmig write ms", "(samples)",
             "of which read ms", "hash ms", "pwrite ms", "fsync ms", "other ms",
             "cp MiB/s (baseline)", "cp output allocated MiB", "cp ms", "(samples)", "ratio chmig/cp (MiB/s)",
             "source VMM got the Ok"],
            rows,
            ["chmig = the daemon's SnapshotResult.write_ms: from the start of Complete handling to the Ok (every "
             "2 MiB chunk of the source's memfd hashed (SHA-256) and, unless all zeros, pwritten; fsync; manifest; "
             "directory fsync; rename into place; parent fsync).  MiB/s (RAM) = the guest's RAM over that time, "
             "(data) = the bytes written.  of which: time inside snapshot_dir's read_exactly_at (preadv of the source's "
             "memfd into a buffer), _digest (SHA-256), write_all_at (pwrite) and os.fsync, measured by wrappers in "
             "the daemon process; they run one after the other on one thread.",
             "cp = `cp --sparse=always memory-0 [memory-1] DIR/ && sync DIR/memory-0 [DIR/memory-1]` (sync FILE = "
             "fsync of that file) of every memory file of a snapshot (a 4 GiB guest has two slots, 3 GiB below the "
             "32-bit hole and 1 GiB above it), timed as one (two process starts included); MiB/s = the files' "
             "size over that time.  The order alternates: runs 1 and 3 chmig first, then cp of the files it just "
             "wrote; run 2 cp first, of run 1's files (same sizes and data), then chmig.  Before each timed write, "
             "untimed: `sync` and 1 s of quiet.  Neither drops anything from the page cache: chmig reads the "
             "source VM's memfd (RAM), cp reads the memory files from the page cache.",
             "source VMM got the Ok: the daemon answers Complete only after the whole snapshot is on disk, and the "
             "chmig run process that sent it (send-migration local=on) waits a bounded time for that answer "
             "(protocol.completion_timeout: 10 s plus the RAM at local_completion_rate); a snapshot slower than that "
             "is written and put in place, but the VMM reports the migration failed (status unknown, VM left "
             "paused) — "
             + (f"it happened {len(GAVE_UP)} time(s) in this run: " + "; ".join(GAVE_UP) if GAVE_UP
                else "not in this run") + ".",
             runs_note])


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB and 1 GiB only, one run per cell")
    parser.add_argument("--daemon-helper", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.daemon_helper:
        return daemon_helper()
    quick = args.quick
    sizes = list(QUICK_SIZES if quick else SIZES)
    runs = {size: 1 if quick else FULL_RUNS[size] for size in sizes}
    runs_note = ("--quick: one run per cell." if quick else
                 "medians of " + ", ".join(f"{n} runs ({size_label(s)})" for s, n in runs.items()) +
                 "; all samples in (samples).")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    c.header()  # machine, date and commit as the run starts (chmig may change under a long run)
    load_before = os.getloadavg()
    begin = time.monotonic()
    snaps: dict[str, list[SnapshotRun]] = {}
    restores: dict[tuple[str, str], list[RestoreRun]] = {}
    daemon = Daemon()
    try:
        with c.processes("chmig-bench-restore-") as procs:
            for size in sizes:
                snaps[size], snapshot = snapshots(procs, daemon, size, runs[size])
                procs.stop_all()
                # The modes interleaved, run after run, so that a change of load hits them alike.
                for run in range(runs[size]):
                    for mode in MODES:
                        restores.setdefault((size, mode.key), []).append(
                            restore(daemon, procs.tmp, snapshot, size, mode, run))
                shutil.rmtree(snapshot)
    except KeyboardInterrupt:
        print("restore.py: interrupted; processes stopped, files removed", file=sys.stderr, flush=True)
        return 130
    finally:
        daemon.close()
    load_after = os.getloadavg()
    c.say(f"measured in {time.monotonic() - begin:.0f} s")
    load = (f"load average (1/5/15 min) at the start {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
            f"at the end {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} on {os.cpu_count()} CPUs "
            "(other work on this machine shows in the noise).")
    report_ttfi(restores, sizes, runs_note + "  " + load)
    report_breakdown(restores, sizes)
    report_whole(restores, sizes, runs_note)
    report_serving(restores, sizes)
    report_snapshots(snaps, sizes, runs_note + "  " + load)
    return 0


if __name__ == "__main__":
    if "--daemon-helper" in sys.argv[1:]:
        sys.exit(main())
    # A restored guest that found bad memory ends the run: exit 1 with one line naming it.
    sys.exit(c.exit_status(main))
