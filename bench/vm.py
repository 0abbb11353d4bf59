"""Benchmark the VM itself (issue 3): guest verify throughput, and port-I/O exits per second.

    python3 bench/vm.py [--quick]

1. Guest verify throughput: a 512 MiB VM with ``verify,dirty_percent=0`` (every
   round is a pure check of all RAM above 1 MiB), 1 and 2 vCPUs, run by a real
   ``chmig run`` process.  Rounds are timed edge to edge (the API is polled
   tightly only around the first and the last round change, so the poller does
   not steal the cores while the guest runs); GiB/s = rounds x pages-per-vCPU
   x 4096 / seconds.  Baseline, same run, no VM running: the host scanning a
   populated anonymous mapping of the same size at C speed (``mmap.find`` of an
   absent byte = memchr), and libc ``memchr`` through ctypes in 2 threads.
2. Port-I/O exits per second: a tiny CPL-3 guest whose only job is
   ``inc [rbx]; out dx, eax; jmp`` (port PORT_PACE), in a chmig ``Vm``: a bare
   ``vcpu.run()`` loop, chmig's own vCPU thread (``_vcpu_loop`` ->
   ``_handle_exit`` -> ``_port_out`` -> ``_pace``), ``_handle_exit`` alone, the
   real-mode guest of tests/test_kvm.py, and the PORT_PACE exit rate of the
   verify workload with dirty_percent=100.  Baseline: ``KVM_RUN`` with
   ``immediate_exit`` set, the cheapest round trip into KVM and back.
"""

from __future__ import annotations

import argparse
import fcntl
import math
import mmap
import struct
import sys
import time
from typing import Callable

import _common as c
from _common import GiB, MiB, PAGE_SIZE

from chmig import guest, kvm
from chmig.memory import GuestMemory, ZoneConfig, layout
from chmig.vm import Serial, Vm, VmConfig, Workload

VM_MIB = 512


# ---------------------------------------------------------------------------------------------
# 1. Guest verify throughput
# ---------------------------------------------------------------------------------------------


def pages_per_vcpu(size: int, cpus: int) -> list[int]:
    ram = [(m.gpa, m.size) for m in layout([ZoneConfig("mem0", size)])]
    return [sum((end - start) // PAGE_SIZE for start, end in share) for share in guest.split_ranges(ram, cpus)]


def _round_edges(vmm, cpus: int, since: list[int], timeout: float = 60) -> list[tuple[float, int]]:
    """Poll vm.info tightly until every vCPU's round count differs from ``since``: (time, rounds) each."""
    found: list[tuple[float, int] | None] = [None] * cpus
    deadline = time.monotonic() + timeout
    while any(f is None for f in found):
        before = time.monotonic()
        vcpus = vmm.info()["guest"]["vcpus"]
        now = (before + time.monotonic()) / 2  # the count was read somewhere inside the call
        for k, status in enumerate(vcpus):
            if found[k] is None and status["rounds"] != since[k]:
                found[k] = (now, status["rounds"])
        if time.monotonic() > deadline:
            raise RuntimeError(f"rounds did not advance within {timeout} s: {vcpus}")
    return found  # type: ignore[return-value]


def round_rates(vmm, cpus: int, seconds: float) -> list[float]:
    """Rounds per second of each vCPU, timed from one round change to another ``seconds`` later."""
    now = [v["rounds"] for v in vmm.info()["guest"]["vcpus"]]
    first = _round_edges(vmm, cpus, now)
    time.sleep(seconds)
    now = [v["rounds"] for v in vmm.info()["guest"]["vcpus"]]
    last = _round_edges(vmm, cpus, now)
    return [(r1 - r0) / (t1 - t0) for (t0, r0), (t1, r1) in zip(first, last)]


def guest_verify(cpus: int, seconds: float) -> dict:
    size = VM_MIB * MiB
    pages = pages_per_vcpu(size, cpus)
    with c.processes("chmig-bench-vm-") as procs:
        vmm = procs.run("--cpus", f"boot={cpus}", "--memory", f"size={VM_MIB}M",
                        "--workload", "verify,dirty_percent=0")
        # Round 1 also stamps every page (first touch); from round 2 on a round is a pure check.
        vmm.wait_for(lambda i: all(v["rounds"] >= 2 for v in i["guest"]["vcpus"]), timeout=180,
                     what="two rounds on every vCPU")
        rates = round_rates(vmm, cpus, seconds)
        info = vmm.info()
        c.check_guest(f"verify scan, {cpus} vCPU(s)", info)
        errors = info["guest"]["errors"]
    per_vcpu = [r * n * PAGE_SIZE / GiB for r, n in zip(rates, pages)]
    return {"cpus": cpus, "pages": pages, "rounds_per_s": rates, "gib_s": per_vcpu, "total": sum(per_vcpu),
            "errors": errors}


def host_scan(size: int, repeats: int) -> dict:
    """The host reading ``size`` bytes at C speed: mmap.find (memchr) and ctypes memchr in 2 threads."""
    m = c.anonymous(size)
    try:
        c.populate(m)  # every page backed (zero-filled), so the scan reads real memory, not the zero page
        address = c.address_of(m)
        half = size // 2

        def timed(fn: Callable[[], object]) -> float:
            begin = time.perf_counter()
            fn()
            return time.perf_counter() - begin

        find = [timed(lambda: m.find(b"\x01")) for _ in range(repeats)]
        # Does mmap.find release the GIL?  Two threads over the two halves vs one thread over all.
        find_two = [c.run_threads([lambda: m.find(b"\x01", 0, half), lambda: m.find(b"\x01", half)])
                    for _ in range(repeats)]
        memchr_one = [timed(lambda: c.memchr(address, 1, size)) for _ in range(repeats)]
        thread_times: list[list[float]] = []

        def scan(offset: int, out: list[float]) -> Callable[[], None]:
            def body() -> None:
                begin = time.perf_counter()
                c.memchr(address + offset, 1, half)
                out.append(time.perf_counter() - begin)
            return body

        memchr_two = []
        for _ in range(repeats):
            out: list[float] = []
            memchr_two.append(c.run_threads([scan(0, out), scan(half, out)]))
            thread_times.append(out)
        assert m.find(b"\x01") == -1
    finally:
        m.close()
    find_s, find_two_s = c.median(find), c.median(find_two)
    return {
        "find": size / find_s / GiB,
        "find_two_threads": size / find_two_s / GiB,
        "find_speedup": find_s / find_two_s,
        "memchr": size / c.median(memchr_one) / GiB,
        "memchr_two_total": size / c.median(memchr_two) / GiB,
        "memchr_two_per_thread": half / c.median([t for ts in thread_times for t in ts]) / GiB,
    }


def bench_verify(quick: bool) -> None:
    seconds = 2.0 if quick else 4.0
    repeats = 3 if quick else 7
    checked = sum(pages_per_vcpu(VM_MIB * MiB, 1)) * PAGE_SIZE
    c.say(f"verify: host scan of {checked / MiB:.0f} MiB ({repeats} repeats)")
    host = host_scan(checked, repeats)  # before any VM runs: nothing else wants the cores
    results = []
    for cpus in (1, 2):
        c.say(f"verify: {VM_MIB} MiB guest, {cpus} vCPU(s), {seconds:.0f} s of rounds")
        results.append(guest_verify(cpus, seconds))
    releases = host["find_speedup"] > 1.4
    find_label = "mmap.find, 1 thread"
    rows = []
    for r in results:
        per = "/".join(f"{g:.2f}" for g in r["gib_s"])
        rps = "/".join(f"{x:.1f}" for x in r["rounds_per_s"])
        mib = "/".join(f"{n * PAGE_SIZE / MiB:.0f}" for n in r["pages"])
        if r["cpus"] == 1 or not releases:
            label = find_label + ("" if r["cpus"] == 1 else " (holds the GIL)")
            rows.append([r["cpus"], mib, rps, per, r["total"], label,
                         host["find"], host["find"], r["total"] / host["find"],
                         min(r["gib_s"]) / host["find"], r["errors"]])
        else:
            rows.append([r["cpus"], mib, rps, per, r["total"], "mmap.find, 2 threads", host["find_two_threads"] / 2,
                         host["find_two_threads"], r["total"] / host["find_two_threads"],
                         min(r["gib_s"]) / (host["find_two_threads"] / 2), r["errors"]])
        if r["cpus"] == 2:
            rows.append([r["cpus"], mib, rps, per, r["total"], "libc memchr via ctypes, 2 threads",
                         host["memchr_two_per_thread"], host["memchr_two_total"],
                         r["total"] / host["memchr_two_total"],
                         min(r["gib_s"]) / host["memchr_two_per_thread"], r["errors"]])
    c.table(
        f"Guest verify throughput: {VM_MIB} MiB VM, verify,dirty_percent=0 (chmig run), vs the host scanning "
        "the same amount of memory",
        ["vCPUs", "MiB per vCPU", "rounds/s per vCPU", "guest GiB/s per vCPU", "guest GiB/s total", "host baseline",
         "host GiB/s per thread", "host GiB/s total", "ratio total", "ratio per vCPU", "guest errors"],
        rows,
        [
            "GiB/s = rounds x pages-per-vCPU x 4096 / seconds; rounds timed edge to edge over "
            f"~{seconds:.0f} s after round 2 (round 1 also stamps).",
            f"host: a populated (MADV_POPULATE_WRITE) anonymous mapping of {checked / MiB:.0f} MiB, median of "
            f"{repeats}; measured before the VMs, with nothing else running.",
            f"GIL check: mmap.find over two halves in 2 threads is {host['find_speedup']:.2f}x as fast as 1 thread "
            f"over all -> mmap.find {'releases' if releases else 'does NOT release'} the GIL"
            + ("" if releases else ", so its 2-vCPU baseline is the 1-thread figure") + "; ctypes calls do release "
            "it, hence the memchr row.",
            f"host 1-thread libc memchr via ctypes: {host['memchr']:.2f} GiB/s (same as mmap.find: both are memchr).",
            "ratio per vCPU = the slowest vCPU's GiB/s / the host's GiB/s per thread.",
        ],
    )


# ---------------------------------------------------------------------------------------------
# 2. Port-I/O exits per second
# ---------------------------------------------------------------------------------------------

#: inc qword [rbx] ; out dx, eax ; jmp back to the inc  (64-bit, runs at CPL 3 with IOPL 3)
OUT_LOOP_64 = bytes.fromhex("48ff03" "ef" "ebfa")
#: out 0x10, al ; jmp back to the out  (16-bit real mode, as in tests/test_kvm.py)
OUT_LOOP_REAL = bytes.fromhex("e610" "ebfc")


def rate(step: Callable[[], object], seconds: float, batch: int = 500) -> float:
    """Calls of ``step`` per second over about ``seconds``."""
    for _ in range(batch):
        step()
    count = 0
    begin = time.perf_counter()
    end = begin + seconds
    while True:
        for _ in range(batch):
            step()
        count += batch
        now = time.perf_counter()
        if now >= end:
            return count / (now - begin)


def raw_ioctl_rate(vcpu: kvm.Vcpu, seconds: float) -> float:
    fd, request, ioctl = vcpu.fd, kvm.KVM_RUN, fcntl.ioctl

    def step() -> None:
        try:
            ioctl(fd, request, 0)
        except OSError:
            pass
    return rate(step, seconds)


def real_mode_rate(seconds: float) -> float:
    """The real-mode guest of tests/test_kvm.py, ``out 0x10, al`` in a loop (CPL 0: PVM emulates it)."""
    dev = kvm.Kvm()
    vmfd = dev.create_vm()
    mem = mmap.mmap(-1, 2 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    vcpu = None
    try:
        vmfd.set_tss_addr(0xFFFBD000)
        mem[0x1000:0x1000 + len(OUT_LOOP_REAL)] = OUT_LOOP_REAL
        vmfd.set_user_memory_region(0, 0, len(mem), kvm.address_of(mem), 0)
        vcpu = vmfd.create_vcpu(0)
        vcpu.set_cpuid2(dev.supported_cpuid())
        flat = {"base": 0, "selector": 0}
        vcpu.set_sregs({name: flat for name in ("cs", "ds", "es", "ss")})
        vcpu.set_regs({"rip": 0x1000, "rflags": 0x2})
        assert vcpu.run() == kvm.KVM_EXIT_IO
        return rate(vcpu.run, seconds)
    finally:
        if vcpu is not None:
            vcpu.close()
        vmfd.set_user_memory_region(0, 0, 0, 0)
        vmfd.close()
        mem.close()
        dev.close()


def exit_rates(seconds: float, rounds: int) -> dict:
    """Exits per second of each path; the main-thread paths are interleaved ``rounds`` times (medians)."""
    config = VmConfig(cpus=1, zones=[ZoneConfig("mem0", 4 * MiB, False)], workload=Workload("verify", 0))
    memory = GuestMemory.create(config.zones)
    vm = Vm(config, memory, Serial("off"))
    samples: dict[str, list[float]] = {}
    each = seconds / rounds
    try:
        vm.boot()  # GDT, page tables, CPL-3 long-mode entry at PROGRAM_ADDR ...
        memory.write(guest.PROGRAM_ADDR, OUT_LOOP_64)  # ... and our loop instead of the guest program
        counter = guest.status_addr(0) + guest.ST_TICKS
        vcpu = vm.vcpus[0]
        vcpu.set_regs({"rbx": counter, "rdx": guest.PORT_PACE, "rax": 0})
        ticks = lambda: struct.unpack("<Q", memory.read(counter, 8))[0]  # noqa: E731

        first = vcpu.run()
        direction, size, port, _, data = vcpu.io_exit()
        data.release()
        assert (first, direction, port, size) == (kvm.KVM_EXIT_IO, kvm.KVM_EXIT_IO_OUT, guest.PORT_PACE, 4), \
            vcpu.describe_exit()
        run, handle, io = vcpu.run, vm._handle_exit, vcpu.run_struct.io
        calls = [0]

        def bare() -> None:  # (a) nothing but KVM_RUN: every call is one OUT exit
            run()
            calls[0] += 1

        def loop_body() -> None:  # (b') what _vcpu_loop does per exit, here in the main thread
            if run() != kvm.KVM_EXIT_INTR:
                handle(vcpu, kvm.KVM_EXIT_IO)

        def lean() -> None:  # (e) a fast path: look at the port in kvm_run, no memoryview / bytes / int()
            run()
            if io.direction == kvm.KVM_EXIT_IO_OUT and io.port == guest.PORT_PACE:
                pass

        before = ticks()
        for _ in range(rounds):
            samples.setdefault("bare", []).append(rate(bare, each))
            samples.setdefault("loop_body", []).append(rate(loop_body, each))
            samples.setdefault("lean", []).append(rate(lean, each))
            # Baseline: KVM_RUN with immediate_exit set returns EINTR at once, guest not entered.
            vcpu.immediate_exit = True
            samples.setdefault("immediate", []).append(rate(run, each))
            samples.setdefault("immediate_raw", []).append(raw_ioctl_rate(vcpu, each))
            vcpu.immediate_exit = False
        assert ticks() - before >= calls[0], "the guest ran one iteration per OUT exit"
        run()  # kvm_run holds an OUT exit again
        # (c) chmig's dispatch of that exit, without entering the guest.
        samples["dispatch_only"] = [rate(lambda: handle(vcpu, kvm.KVM_EXIT_IO), each) for _ in range(rounds)]
        # (b) chmig's own vCPU thread: _vcpu_loop -> run -> _handle_exit -> _port_out -> _pace.
        vm.start(paused=True)
        for _ in range(rounds):
            before = ticks()
            vm.resume()
            begin = time.perf_counter()
            time.sleep(each)
            vm.pause()
            samples.setdefault("vm_thread", []).append((ticks() - before) / (time.perf_counter() - begin))
        if vm.failure:
            raise RuntimeError(vm.failure)
    finally:
        vm.close()
        memory.close()
    samples["real_mode"] = [real_mode_rate(each) for _ in range(rounds)]
    return {name: c.median(values) for name, values in samples.items()}


def pace_exit_rate(seconds: float) -> dict:
    """PORT_PACE exits per second of the real verify workload at dirty_percent=100 (chmig run)."""
    pages = pages_per_vcpu(VM_MIB * MiB, 1)[0]
    paces_per_round = math.ceil(guest.window_pages(pages, 100) / guest.PACE_PAGES)
    with c.processes("chmig-bench-vm-") as procs:
        vmm = procs.run("--memory", f"size={VM_MIB}M", "--workload", "verify,dirty_percent=100")
        vmm.wait_rounds(2, timeout=180)
        rounds = round_rates(vmm, 1, seconds)[0]
        info = vmm.info()
        c.check_guest("pacing exits, verify dirty_percent=100", info)
        errors = info["guest"]["errors"]
    return {"rounds": rounds, "paces_per_round": paces_per_round, "rate": rounds * paces_per_round,
            "written_mib_s": rounds * pages * PAGE_SIZE / MiB, "errors": errors}


def bench_exits(quick: bool) -> None:
    seconds = 1.0 if quick else 2.0
    rounds = 3
    c.say(f"exits: tiny guests, {seconds:.0f} s per figure in {rounds} interleaved parts")
    r = exit_rates(seconds, rounds)
    c.say(f"exits: verify,dirty_percent=100 on {VM_MIB} MiB")
    pace = pace_exit_rate(2.0 if quick else 4.0)
    base = r["immediate"]
    us = lambda n: 1e6 / n  # noqa: E731
    rows = [
        ["baseline: vcpu.run() with immediate_exit=1 (EINTR, guest not entered)", base, us(base), base, 1.0],
        ["baseline: raw fcntl.ioctl(KVM_RUN) with immediate_exit=1", r["immediate_raw"], us(r["immediate_raw"]),
         base, r["immediate_raw"] / base],
        ["(a) bare vcpu.run() loop, CPL-3 guest: inc [rbx]; out dx,eax; jmp", r["bare"], us(r["bare"]), base,
         r["bare"] / base],
        ["(b) chmig Vm vCPU thread: _vcpu_loop -> _handle_exit -> _port_out(PORT_PACE)", r["vm_thread"],
         us(r["vm_thread"]), base, r["vm_thread"] / base],
        ["(b') the same loop body in the main thread: run(); _handle_exit()", r["loop_body"], us(r["loop_body"]),
         base, r["loop_body"] / base],
        ["(c) Vm._handle_exit(PORT_PACE) alone, no KVM_RUN (hot-loop Python cost)", r["dispatch_only"],
         us(r["dispatch_only"]), base, r["dispatch_only"] / base],
        ["(e) sketch of a fast path: run(); compare kvm_run io.direction/io.port", r["lean"], us(r["lean"]), base,
         r["lean"] / base],
        ["(a') bare vcpu.run() loop, real-mode guest (CPL 0): out 0x10,al; jmp", r["real_mode"], us(r["real_mode"]),
         base, r["real_mode"] / base],
        [f"(d) PORT_PACE exits of verify,dirty_percent=100 ({VM_MIB} MiB, 1 vCPU, chmig run)", pace["rate"],
         us(pace["rate"]), base, pace["rate"] / base],
    ]
    python_us = us(r["dispatch_only"])
    c.table(
        "Port-I/O exits per second handled by chmig's vCPU loop, vs KVM_RUN with immediate_exit",
        ["path", "exits/s", "us per exit", "baseline KVM_RUN/s", "ratio"],
        rows,
        [
            f"(b) costs {us(r['vm_thread']) - us(r['bare']):.1f} us per exit more than (a), (b') "
            f"{us(r['loop_body']) - us(r['bare']):.1f} us, though the same dispatch costs {python_us:.1f} us in a hot "
            f"loop (c): after every exit the Python code runs cold; a fast path that only reads io.port (e) costs "
            + (f"{us(r['lean']) - us(r['bare']):.1f} us." if us(r["lean"]) - us(r["bare"]) >= 1
               else "nothing measurable."),
            "(a) is KVM/PVM's own cost: the guest's OUT traps to the host, KVM_RUN returns, the next one re-enters.",
            f"every figure is the median of {rounds} interleaved parts; (b) by resume/sleep/pause cycles, counted "
            "by the guest's own loop counter.",
            f"(d) is what the guest asks for, not a limit: {pace['rounds']:.2f} rounds/s x {pace['paces_per_round']} "
            f"PORT_PACE per round ({pace['written_mib_s']:.0f} MiB/s written, guest errors {pace['errors']}); "
            f"at (b)'s cost the exits take {pace['rate'] * us(r['vm_thread']) / 1e4:.1f}% of the vCPU's time.",
            "(a') the real-mode guest runs at CPL 0, which PVM emulates instruction by instruction.",
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter run")
    args = parser.parse_args()
    bench_verify(args.quick)
    bench_exits(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(c.exit_status(main))
