"""Benchmark precopy and local migration (issue 4), against raw loopback sockets measured in the same run.

    python3 bench/precopy.py [--quick]

One 1 GiB VM (``verify,dirty_percent=0``, memory shared=on as ``chmig run``
defaults to) is booted once and then migrated from process to process: each
``chmig receive`` that got it sends it on, so every hop moves a guest whose RAM
is fully populated, and every hop is checked: the guest must complete a whole
verify round on the destination with zero errors, or the run stops with exit
status 1 and one line naming the hop (the downtime hops, whose rounds take
~20 s, are re-checked once, after the last hop of each dirty rate).

1. Iteration-0 throughput over loopback TCP with connections=1, 2, 4 (source
   running, and for comparison paused), vs a raw transfer of 1 GiB between
   plain sockets in threads (sendall from a populated mmap, recv_into (a) a
   fresh anonymous mapping, (b) a populated one; N pairs move 1/N each).
2. Does MADV_POPULATE_WRITE pay?  Raw: populate + transfer into populated vs
   transfer into fresh memory; chmig: an in-process ``Receiver`` with
   populate=False and populate=True, next to the ``chmig receive`` hops.
3. Downtime (downtime_ms=300) at guest dirty rates 0, 50 and 200 MiB/s, vs the
   raw socket's time for the final iteration's bytes, and vs a raw replay of
   the final Memory request (same ranges, same writes) with and without
   TCP_NODELAY.
4. Local migration (memfd, unix: socket) of 1 GiB and 4 GiB VMs (4 GiB
   skipped with --quick): downtime and total time next to TCP precopy of the
   same VM in the same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

import _common as c
from _common import GiB, MiB, PAGE_SIZE

from chmig import guest
from chmig.receive import Receiver
from chmig.send import Sender, SendOptions
from chmig.stats import MigrationStats
from chmig.transport import listen, parse_url
from chmig.vm import Vm

SIZE = 1 * GiB
CONNECTIONS = (1, 2, 4)
POPULATE_CONNECTIONS = (1, 4)
IDLE_VM = ("--memory", "size=1G", "--workload", "verify,dirty_percent=0")


# ---------------------------------------------------------------------------------------------
# Raw sockets: the baselines
# ---------------------------------------------------------------------------------------------


def raw_transfer(src, dst, n: int, size: int = SIZE) -> float:
    """Move ``size`` bytes from ``src`` into ``dst`` over ``n`` loopback pairs in parallel; seconds."""
    pairs = c.socket_pairs(n)
    share = size // n
    try:
        def sender(k: int):
            def body() -> None:
                with memoryview(src)[k * share:(k + 1) * share] as view:
                    pairs[k][0].sendall(view)
            return body

        def receiver(k: int):
            def body() -> None:
                with memoryview(dst)[k * share:(k + 1) * share] as view:
                    c.recv_exact_into(pairs[k][1], view)
            return body

        return c.run_threads([f(k) for k in range(n) for f in (sender, receiver)])
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def memfd_mapping(size: int):
    import mmap
    fd = os.memfd_create("bench-dst", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


@dataclass
class Raw:
    """Medians of the raw transfers; keys (n, kind), kind = fresh | populated | memfd-fresh | memfd-populated |
    memfd-populated-2t (populated by 2 threads, half each)."""

    xfer: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    pop: dict[tuple[int, str], list[float]] = field(default_factory=dict)

    def seconds(self, n: int, kind: str) -> float:
        return c.median(self.xfer[(n, kind)])

    def populate_s(self, n: int, kind: str) -> float:
        return c.median(self.pop[(n, kind)])

    def mib_s(self, n: int, kind: str) -> float:
        return SIZE / self.seconds(n, kind) / MiB

    def bytes_per_s(self) -> float:
        """The 1-connection bandwidth into populated memory (what chmig's destination has)."""
        return SIZE / self.seconds(1, "populated")


def measure_raw(src, repeats: int) -> Raw:
    raw = Raw()
    plan = [(n, kind) for n in CONNECTIONS for kind in ("fresh", "populated")]
    plan += [(n, kind) for n in POPULATE_CONNECTIONS
             for kind in ("memfd-fresh", "memfd-populated", "memfd-populated-2t")]
    for rep in range(repeats):
        for n, kind in plan:
            dst = memfd_mapping(SIZE) if kind.startswith("memfd") else c.anonymous(SIZE)
            try:
                if kind.endswith("-2t"):
                    pop_s = c.populate_parallel(dst, 2)
                elif kind.endswith("populated"):
                    pop_s = c.populate(dst)
                else:
                    pop_s = 0.0
                seconds = raw_transfer(src, dst, n)
            finally:
                dst.close()
            raw.xfer.setdefault((n, kind), []).append(seconds)
            raw.pop.setdefault((n, kind), []).append(pop_s)
            c.say(f"  raw rep {rep + 1}/{repeats}: {n} conn, {kind:16s} populate {pop_s:.2f} s, "
                  f"transfer {seconds:.2f} s = {SIZE / seconds / MiB:.0f} MiB/s")
    return raw


def replay_memory_request(src, dst, ranges: int, total: int, nodelay: bool, repeats: int) -> float:
    """Replay one Memory request as chmig sends it: header+table in one write, one write per range, 16-byte Ok.

    Returns the median milliseconds from the first write to the Ok.
    """
    ranges = max(1, ranges)
    per = max(PAGE_SIZE, total // ranges // PAGE_SIZE * PAGE_SIZE)
    ranges = min(ranges, max(1, min(len(src), len(dst)) // per))
    (sender, receiver), = c.socket_pairs(1)
    if nodelay:
        for s in (sender, receiver):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = bytes(16 + 16 * ranges)
    times: list[float] = []

    def serve() -> None:
        header = bytearray(len(head))
        for _ in range(repeats):
            c.recv_exact_into(receiver, memoryview(header))
            with memoryview(dst)[:per * ranges] as view:
                for k in range(ranges):
                    c.recv_exact_into(receiver, view[k * per:(k + 1) * per])
            receiver.sendall(bytes(16))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        for _ in range(repeats):
            begin = time.perf_counter()
            sender.sendall(head)
            with memoryview(src)[:per * ranges] as view:
                for k in range(ranges):
                    sender.sendall(view[k * per:(k + 1) * per])
            c.recv_exact_into(sender, memoryview(bytearray(16)))
            times.append((time.perf_counter() - begin) * 1000)
    finally:
        server.join(timeout=30)
        sender.close()
        receiver.close()
    return c.median(times)


# ---------------------------------------------------------------------------------------------
# Hops: one migration of the guest from one place to the next
# ---------------------------------------------------------------------------------------------


@dataclass
class Hop:
    label: str
    src: dict  # the source's migration statistics (send-migration's answer)
    dst: dict | None = None  # the destination's, when it has them
    errors: int = 0

    @property
    def iteration0(self) -> dict:
        return self.src["iterations"][0]

    @property
    def final(self) -> dict:
        return self.src["iterations"][-1]

    @property
    def before_iterations_ms(self) -> float:
        """≈ Start + Config (destination allocation and populate) + dirty-log start: total minus the rest."""
        s = self.src
        rest = sum(i["duration_ms"] for i in s["iterations"])
        rest += sum(s[k] or 0 for k in ("state_capture_ms", "send_state_ms", "complete_ms"))
        return s["total_time_ms"] - rest


def _rounds(info: dict) -> list[int]:
    return [v["rounds"] for v in info["guest"]["vcpus"]]


def _rechecked(start: list[int]):  # noqa: ANN202 - a predicate over vm.info()
    """Whether every vCPU completed a whole round that began after ``start`` was read.

    The round in progress at arrival may have checked part of RAM on the source; the one after it
    checks all of it here (verify comes before the rewrite in each round, docs/guest.md).
    """
    return lambda info: all(r >= s + 2 for r, s in zip(_rounds(info), start))


def arrived(dst, label: str, was_paused: bool, wait_round: bool) -> int:
    """The guest is on ``dst``: resume it if it came paused, let it re-check its memory; its errors (0).

    Raises :class:`_common.BenchmarkFailed` naming the hop if the guest is not running or found bad memory.
    Without ``wait_round`` only the errors found so far count (see the downtime hops in :func:`run_chmig`).
    """
    if was_paused:
        dst.call("PUT", "vm.resume")
    info = dst.info()
    if wait_round:
        info = dst.wait_for(_rechecked(_rounds(info)), timeout=120,
                            what=f"hop {label}: a whole verify round on every vCPU after the migration")
    c.check_guest(f"hop {label}", info)
    return info["guest"]["errors"]


def hop(procs, src, label: str, listen_url: str = "tcp:127.0.0.1:0", pause: bool = False,
        wait_round: bool = True, **options) -> tuple[object, Hop]:
    """Migrate the guest from process ``src`` to a new ``chmig receive``; return (its process, the hop).

    Raises :class:`_common.BenchmarkFailed` naming the hop when the guest arrives broken.
    """
    if pause:
        src.call("PUT", "vm.pause")
    dst, url = procs.receive(listen_url)
    stats = src.call("PUT", "vm.send-migration", {"destination_url": url, **options}, timeout=600)
    if src.wait_exit(60) != 0:
        raise RuntimeError(f"the source exited with an error\n{src.tail()}")
    errors = arrived(dst, label, pause, wait_round)
    result = Hop(label, stats, dst.info().get("migration"), errors)
    first = f"iteration 0 {result.iteration0['bandwidth_mib_s']:.0f} MiB/s, " if stats["iterations"] else ""
    c.say(f"  hop {label}: {first}downtime {stats['downtime_ms']:.1f} ms, total {stats['total_time_ms']:.0f} ms, "
          f"errors {errors}")
    return dst, result


def hop_into_this_process(src, populate: bool, connections: int = 1) -> tuple[Vm, Hop]:
    """Migrate from process ``src`` to a ``Receiver`` running here (populate on or off); the VM lands here."""
    with listen(parse_url("tcp:127.0.0.1:0")) as listener:
        url = str(listener.address)
        answer: dict = {}

        def send() -> None:
            try:
                answer["stats"] = src.call("PUT", "vm.send-migration",
                                           {"destination_url": url, "connections": connections}, timeout=600)
            except BaseException as exc:  # reported below
                answer["error"] = exc

        sender = threading.Thread(target=send, name="bench-send", daemon=True)
        sender.start()
        receiver = Receiver(listener, populate=populate)
        try:
            vm = receiver.run(accept_timeout=60)
        finally:
            sender.join(timeout=600)
    if "error" in answer:
        vm.close()  # with its memory
        raise RuntimeError(f"send-migration failed: {answer['error']}")
    src.wait_exit(60)
    label = f"in-process Receiver, populate={'on' if populate else 'off'}, {connections} conn"
    try:
        rechecked = _rechecked(_rounds(vm.info()))
        deadline = time.monotonic() + 120
        while not rechecked(vm.info()):
            if time.monotonic() > deadline or vm.failure:
                raise RuntimeError(f"hop {label}: the guest did not complete a round here: {vm.failure}")
            time.sleep(0.02)
        c.check_guest(f"hop {label}", vm.info())
    except BaseException:
        vm.close()  # with its memory
        raise
    result = Hop(label, answer["stats"], receiver.stats.to_json(), vm.info()["guest"]["errors"])
    c.say(f"  hop {label}: iteration 0 {result.iteration0['bandwidth_mib_s']:.0f} MiB/s, "
          f"total {result.src['total_time_ms']:.0f} ms, errors {result.errors}")
    return vm, result


def hop_out_of_this_process(procs, vm: Vm) -> object:
    """Send the VM living here on to a new ``chmig receive`` (with chmig's Sender), then drop it here."""
    try:
        dst, url = procs.receive("tcp:127.0.0.1:0")
        Sender(vm, SendOptions(destination_url=url), MigrationStats(role="source", url=url)).run()
    finally:
        vm.close()  # with its memory
    arrived(dst, "in-process Sender back to chmig receive", False, True)
    return dst


# ---------------------------------------------------------------------------------------------
# Reading a guest's status block from outside its process (to know when first-boot stamping is done)
# ---------------------------------------------------------------------------------------------


def stamping_done(vmm, cpus: int) -> bool | None:
    """Whether every vCPU has stamped all its pages (status.initialized), read from the VMM's memfd.

    A read-only look at the guest RAM of a ``chmig run --memory shared=on``
    process through /proc/PID/fd; None if that is not possible here.
    """
    pid = vmm.proc.pid
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("/memfd:chmig-mem0"):
                fd = os.open(f"/proc/{pid}/fd/{name}", os.O_RDONLY)
                try:
                    return all(
                        struct.unpack("<Q", os.pread(fd, 8, guest.status_addr(k) + guest.ST_INITIALIZED))[0] == 1
                        for k in range(cpus))
                finally:
                    os.close(fd)
    except OSError:
        return None
    return None


def wait_stamped(vmm, cpus: int, expected_s: float) -> None:
    """Wait until the guest has stamped all its RAM (or, if we cannot look, for the time it should take)."""
    deadline = time.monotonic() + max(120, 3 * expected_s)
    while time.monotonic() < deadline:
        done = stamping_done(vmm, cpus)
        if done is None:
            time.sleep(max(0.0, expected_s))
            return
        if done:
            return
        time.sleep(0.2)
    raise RuntimeError("first-boot stamping did not finish")


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter run (no 4 GiB case, fewer repeats)")
    args = parser.parse_args()
    quick = args.quick
    repeats = 1 if quick else 2
    raw_repeats = 1 if quick else 3

    src = c.anonymous(SIZE)
    try:
        c.populate(src)
        c.say(f"raw loopback transfers of 1 GiB ({raw_repeats} repeats)")
        raw = measure_raw(src, raw_repeats)
    finally:
        src.close()  # the chmig processes get the memory
    with c.processes("chmig-bench-precopy-") as procs:
        results = run_chmig(procs, quick, repeats)
    c.say("raw replays of the final Memory requests")
    keys = sorted({(h.final["ranges"], h.final["bytes"]) for hops in results["downtime"].values() for h in hops})
    size = max(PAGE_SIZE, max(b for _, b in keys)) if keys else PAGE_SIZE
    size = -(-size // PAGE_SIZE) * PAGE_SIZE
    src, dst = c.anonymous(size), c.anonymous(size)
    try:
        c.populate(src)
        c.populate(dst)
        replays = {key: (replay_memory_request(src, dst, *key, nodelay=False, repeats=5),
                         replay_memory_request(src, dst, *key, nodelay=True, repeats=5)) for key in keys}
    finally:
        src.close()
        dst.close()

    report_throughput(raw, results)
    report_populate(raw, results)
    report_downtime(raw, results, replays)
    report_local(results, quick)
    return 0


def run_chmig(procs, quick: bool, repeats: int) -> dict:
    results: dict = {"live": {n: [] for n in CONNECTIONS}, "paused": {},
                     "inproc": {(p, n): [] for p in (True, False) for n in POPULATE_CONNECTIONS},
                     "local": {"1G": [], "4G": []}, "tcp4g": [], "downtime": {}}
    folder = procs.tmp
    c.say("chmig: booting the 1 GiB VM (verify,dirty_percent=0) and waiting for its first round")
    vmm = procs.run(*IDLE_VM)
    vmm.wait_rounds(1, timeout=300)
    # The first migration after boot is consistently slower before iteration 0 (see the notes): reported apart.
    vmm, results["warmup"] = hop(procs, vmm, "tcp, 1 conn (warm-up, not in the medians)", connections=1)

    # 1. Iteration 0 with 1, 2, 4 connections, source running; then paused.
    for rep in range(repeats):
        for n in CONNECTIONS:
            vmm, h = hop(procs, vmm, f"tcp, {n} conn (rep {rep + 1})", connections=n)
            results["live"][n].append(h)
    for n in ((1,) if quick else (1, 4)):
        vmm, h = hop(procs, vmm, f"tcp, {n} conn, source paused", pause=True, connections=n)
        results["paused"][n] = h

    # 4 (1 GiB). Local migration: the memfd goes over the unix socket, nothing is copied.
    for rep in range(repeats + 1):
        vmm, h = hop(procs, vmm, f"local 1G (rep {rep + 1})", listen_url=f"unix:{folder}/local-{rep}.sock",
                     local=True)
        results["local"]["1G"].append(h)

    # 2. Populate on/off, with the receiver in this process (then sent on to a chmig receive process).
    for rep in range(repeats):
        for n in POPULATE_CONNECTIONS:
            for populate in (False, True):
                vm, h = hop_into_this_process(vmm, populate, n)
                results["inproc"][(populate, n)].append(h)
                vmm = hop_out_of_this_process(procs, vm)
    vmm.stop()

    # 3. Downtime at dirty rates 50 and 200 MiB/s (0 MiB/s = the 1-connection hops above).
    rates = (50, 200)
    c.say("chmig: booting 1 GiB VMs with dirty_percent=100 at 50 and 200 MiB/s; waiting for their first-boot "
          "stamping (paced at that rate)")
    booted = time.monotonic()
    vms = {r: procs.run("--memory", "size=1G", "--workload", f"verify,dirty_percent=100,dirty_rate={r}")
           for r in rates}  # both stamp at the same time, each paced at its own rate
    for r in rates:
        wait_stamped(vms[r], 1, SIZE / (r * MiB) - (time.monotonic() - booted) + 1)
    for r in rates:
        for k, other in vms.items():
            if k != r and other.proc.poll() is None and other.info()["state"] == "Running":
                other.call("PUT", "vm.pause")  # nothing else runs while this one migrates
        if vms[r].info()["state"] == "Paused":
            vms[r].call("PUT", "vm.resume")
        time.sleep(1.0)  # let the guest write at its rate again
        hops = []
        for rep in range(repeats):
            vms[r], h = hop(procs, vms[r], f"dirty {r} MiB/s (rep {rep + 1})", wait_round=False, downtime_ms=300)
            hops.append(h)
            time.sleep(1.0)
        # A round takes ~1 GiB / R here (20 s at 50 MiB/s), too long to wait after every hop: the last VM
        # re-checks once, the memory all the hops of this rate brought (then it is stopped).
        arrived(vms[r], f"dirty {r} MiB/s (after rep {repeats}, re-checked)", False, True)
        results["downtime"][r] = hops
        vms[r].stop()
    results["downtime"][0] = results["live"][1]
    for v in vms.values():
        v.stop()

    # 4 (4 GiB). Local, then TCP, then local again, of the same 4 GiB VM.
    if not quick:
        c.say("chmig: booting the 4 GiB VM (1 vCPU, shared=on) and waiting for its first round")
        vmm = procs.run("--memory", "size=4G,shared=on", "--workload", "verify,dirty_percent=0")
        booted = time.monotonic()
        vmm.wait_rounds(1, timeout=300)
        c.say(f"  first round after {time.monotonic() - booted:.0f} s")
        vmm, h = hop(procs, vmm, "local 4G (rep 1)", listen_url=f"unix:{folder}/local4-0.sock", local=True)
        results["local"]["4G"].append(h)
        vmm, h = hop(procs, vmm, "tcp 4G, 1 conn", connections=1)
        results["tcp4g"].append(h)
        vmm, h = hop(procs, vmm, "local 4G (rep 2)", listen_url=f"unix:{folder}/local4-1.sock", local=True)
        results["local"]["4G"].append(h)
        vmm.stop()
    return results


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def _med(hops: list[Hop], get) -> float:
    return c.median([get(h) for h in hops])


def raw_total(raw: Raw, n: int) -> float:
    return (raw.populate_s(n, "populated") + raw.seconds(n, "populated")) * 1000


def report_throughput(raw: Raw, results: dict) -> None:
    rows = []
    for n in CONNECTIONS:
        hops = results["live"][n]
        bw = _med(hops, lambda h: h.iteration0["bandwidth_mib_s"])
        total = _med(hops, lambda h: h.src["total_time_ms"])
        rows.append([f"tcp, {n} conn, source running", n, bw,
                     c.spread([h.iteration0["bandwidth_mib_s"] for h in hops]),
                     raw.mib_s(n, "fresh"), raw.mib_s(n, "populated"), bw / raw.mib_s(n, "populated"),
                     "yes" if bw / raw.mib_s(n, "populated") >= 0.9 else "NO",
                     _med(hops, lambda h: h.before_iterations_ms), total, raw_total(raw, n),
                     total / raw_total(raw, n), sum(h.errors for h in hops)])
    for n, h in results["paused"].items():
        bw = h.iteration0["bandwidth_mib_s"]
        total = h.src["total_time_ms"]
        rows.append([f"tcp, {n} conn, source paused", n, bw, c.spread([bw]),
                     raw.mib_s(n, "fresh"), raw.mib_s(n, "populated"), bw / raw.mib_s(n, "populated"),
                     "yes" if bw / raw.mib_s(n, "populated") >= 0.9 else "NO",
                     h.before_iterations_ms, total, raw_total(raw, n), total / raw_total(raw, n), h.errors])
    warm = results["warmup"]
    c.table(
        "Precopy iteration 0: 1 GiB VM over loopback TCP (chmig run -> chmig receive), vs raw sockets",
        ["chmig migration", "conns", "iter-0 MiB/s", "(samples)", "raw MiB/s (a) fresh", "raw MiB/s (b) populated",
         "ratio iter-0/(b)", ">= 0.9", "before iter-0 ms", "total ms", "raw populate+(b) ms", "ratio total",
         "guest errors"],
        rows,
        [
            "chmig: iterations[0].bandwidth_mib_s of send-migration's statistics (median of the samples); the "
            "destination populates each range (MADV_POPULATE_WRITE) in the receiving thread just before its "
            "recv_into, so iteration 0 carries the populate cost: compare with (a) and with raw populate+(b).",
            "before iter-0 ms ≈ total - iterations - state - complete: Start + Config (the destination's "
            "allocation) + dirty-log start.",
            "raw: N loopback socket pairs in 2N threads of one process, sendall(memoryview) of a populated "
            f"1 GiB mmap, recv_into (a) a fresh MAP_PRIVATE|MAP_ANONYMOUS mmap, (b) a populated one; median of "
            f"{len(raw.xfer[(1, 'fresh')])}, nothing else running.",
            "source running = the guest's vCPU keeps checking its 1 GiB on one of the 2 cores during the "
            "transfer; source paused = the vCPU is parked, the cores are the transfer's alone.",
            "raw populate+(b) = MADV_POPULATE_WRITE of a fresh anonymous 1 GiB mapping + the transfer into it: "
            "the raw equivalent of chmig's whole migration; ratio total = chmig total / that.  chmig's destination "
            f"RAM is a memfd (shared=on), whose populate took {raw.populate_s(1, 'memfd-populated') * 1000:.0f} ms "
            f"here vs {raw.populate_s(1, 'populated') * 1000:.0f} ms anonymous.",
            f"warm-up hop (the first migration after boot, not in the medians): iteration 0 "
            f"{warm.iteration0['bandwidth_mib_s']:.0f} MiB/s, before iter-0 {warm.before_iterations_ms:.0f} ms, "
            f"total {warm.src['total_time_ms']:.0f} ms.",
        ],
    )


def report_populate(raw: Raw, results: dict) -> None:
    rows = []
    cases = [(n, "fresh", "populated") for n in CONNECTIONS]
    cases += [(n, "memfd-fresh", p) for n in POPULATE_CONNECTIONS for p in ("memfd-populated", "memfd-populated-2t")]
    for n, fresh, populated in cases:
        pop = raw.populate_s(n, populated)
        into = raw.seconds(n, populated)
        plain = raw.seconds(n, fresh)
        kind = "memfd (shmem)" if fresh.startswith("memfd") else "anonymous"
        if populated.endswith("-2t"):
            kind += ", populate in 2 threads"
        rows.append([f"raw, {n} conn, {kind}", pop * 1000, into * 1000, (pop + into) * 1000, plain * 1000,
                     (pop + into) / plain, "populate" if pop + into < plain else "fresh"])
    chmig_rows = [("chmig receive process, populate on, 1 conn", results["live"][1])]
    for n in POPULATE_CONNECTIONS:
        chmig_rows += [(f"in-process Receiver, populate on, {n} conn", results["inproc"][(True, n)]),
                       (f"in-process Receiver, populate off, {n} conn", results["inproc"][(False, n)])]
    for label, hops in chmig_rows:
        if hops:
            rows.append([label, _med(hops, lambda h: h.before_iterations_ms),
                         _med(hops, lambda h: h.iteration0["duration_ms"]),
                         _med(hops, lambda h: h.before_iterations_ms + h.iteration0["duration_ms"]),
                         None, None, "total " + c.spread([h.src["total_time_ms"] for h in hops]) + " ms"])
    notes = [
        "raw rows: populate = MADV_POPULATE_WRITE of the fresh 1 GiB destination, then the transfer into it; "
        "'fresh' = recv_into untouched memory (the page faults happen inside recv_into).",
        "ratio = (populate + transfer into populated) / transfer into fresh: below 1 means populating pays.",
        "'populate in 2 threads' = MADV_POPULATE_WRITE of the two halves at once (one per core): a sketch of a "
        "parallel populate, which chmig does not do.",
        "chmig rows: first column = time before iteration 0 (≈ Start + Config incl. populate), second = "
        "iteration 0; both from the sender's statistics, source running; the destination RAM is a memfd "
        "(shared=on), like the raw memfd row.",
    ]
    for n in POPULATE_CONNECTIONS:
        on, off = results["inproc"][(True, n)], results["inproc"][(False, n)]
        if on and off:
            t_on = _med(on, lambda h: h.src["total_time_ms"])
            t_off = _med(off, lambda h: h.src["total_time_ms"])
            notes.append(f"chmig verdict, {n} conn: total migration time {t_on:.0f} ms with populate vs "
                         f"{t_off:.0f} ms without -> {'populate' if t_on < t_off else 'no populate'} is faster "
                         f"({abs(t_off - t_on) / max(t_on, t_off) * 100:.0f}% difference, medians).")
    c.table("Does populating the destination (MADV_POPULATE_WRITE) pay? 1 GiB",
            ["destination", "populate / before iter-0 ms", "transfer / iter-0 ms", "sum ms", "into fresh ms",
             "ratio", "faster"], rows, notes)


def report_downtime(raw: Raw, results: dict, replays: dict) -> None:
    rows = []
    bw = raw.bytes_per_s()
    for rate, hops in sorted(results["downtime"].items()):
        for h in hops:
            final = h.final
            base_ms = final["bytes"] / bw * 1000
            nagle, nodelay = replays[(final["ranges"], final["bytes"])]
            live = h.src["iterations"][:-1]
            # chmig records no dirty rate for iteration 0 nor for the final one: estimate it from what the final
            # iteration had to send, dirtied while the live iterations ran.
            dirtied = final["bytes"] / MiB / max(sum(i["duration_ms"] for i in live) / 1000, 1e-3)
            rows.append([f"{rate} MiB/s" if rate else "0 (dirty_percent=0)", dirtied, h.src["downtime_ms"],
                         len(h.src["iterations"]), h.src["total_time_ms"], final["bytes"] / MiB, final["ranges"],
                         final["duration_ms"], base_ms, final["duration_ms"] / max(base_ms, 1e-3),
                         nodelay, nagle, final["duration_ms"] / max(nodelay, 1e-3)])
    c.table(
        "Downtime, downtime_ms=300: 1 GiB VM, verify,dirty_percent=100,dirty_rate=R (1 connection)",
        ["dirty rate asked", "dirtied MiB/s (upper bound)", "downtime ms", "iterations", "total ms", "final MiB",
         "final ranges", "final iter ms", "raw ms (bytes/bw)", "ratio final/raw", "replay ms NODELAY",
         "replay ms Nagle", "ratio final/replay NODELAY"],
        rows,
        [
            f"raw ms (bytes/bw) = final-iteration bytes / the raw 1-connection bandwidth into populated memory "
            f"({bw / MiB:.0f} MiB/s).",
            "raw replay = the final Memory request re-sent over a fresh loopback pair exactly as chmig writes it "
            "(header+table in one write, one sendall per range, then the 16-byte Ok), with TCP_NODELAY and with "
            "the default (Nagle); median of 5.",
            "dirtied MiB/s = final-iteration bytes / duration of the live iterations' transfers, an upper bound "
            "(the dirty window also holds the dirty-log start and the table scans); chmig's own statistics give "
            "dirty_rate_mib_s per iteration from iteration 1 on, the final one included.",
            "final iter ms = pause -> dirty log read -> dirty logging off -> final Memory request acknowledged; "
            "downtime adds State capture/send and Complete.",
        ],
    )


def report_local(results: dict, quick: bool) -> None:
    rows = []
    tcp1 = results["live"][1]
    tcp4 = results["tcp4g"]
    for size, hops in results["local"].items():
        if not hops:
            continue
        if size == "4G" and tcp4 and tcp4[0].src["total_time_ms"] <= 120_000:
            tcp_down = _med(tcp4, lambda h: h.src["downtime_ms"])
            tcp_total = _med(tcp4, lambda h: h.src["total_time_ms"])
            tcp_label = "4 GiB TCP, 1 conn"
        else:
            tcp_down = _med(tcp1, lambda h: h.src["downtime_ms"])
            tcp_total = _med(tcp1, lambda h: h.src["total_time_ms"])
            tcp_label = "1 GiB TCP, 1 conn"
        down = _med(hops, lambda h: h.src["downtime_ms"])
        total = _med(hops, lambda h: h.src["total_time_ms"])
        rows.append([size.replace("G", " GiB"), down, c.spread([h.src["downtime_ms"] for h in hops], "{:.1f}"), total,
                     tcp_label, tcp_down, tcp_total, down / tcp_down, total / tcp_total,
                     sum(h.errors for h in hops)])
    notes = ["local: send-migration local=true over a unix: socket, guest RAM handed over as memfds (shared=on); "
             "downtime = pause -> Complete acknowledged (capture + send vCPU state, restore on the destination).",
             "TCP: 1-connection precopy of the same VM in this run (downtime = final iteration + state + complete)."]
    if quick:
        notes.append("--quick: the 4 GiB case is skipped.")
    elif tcp4:
        slow = tcp4[0].src["total_time_ms"] > 120_000
        notes.append(f"4 GiB TCP took {tcp4[0].src['total_time_ms'] / 1000:.1f} s in total "
                     f"(iteration 0 at {tcp4[0].iteration0['bandwidth_mib_s']:.0f} MiB/s, "
                     f"before iteration 0 {tcp4[0].before_iterations_ms / 1000:.1f} s)"
                     + (": more than 2 minutes, so the 4 GiB row compares with the 1 GiB TCP figure." if slow else "."))
    notes.append("all VMs here have 1 vCPU and run verify,dirty_percent=0 (RAM fully stamped before the first hop).")
    c.table("Local migration (memfd over unix:) vs TCP precopy of the same VM", [
        "VM", "local downtime ms", "(samples)", "local total ms", "TCP compared", "TCP downtime ms", "TCP total ms",
        "ratio downtime local/TCP", "ratio total local/TCP", "guest errors"], rows, notes)


if __name__ == "__main__":
    # A hop whose guest found bad memory ends the run: exit 1 with one line naming the hop.
    sys.exit(c.exit_status(main))
