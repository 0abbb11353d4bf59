"""``chmig demo``: the main job — a live migration of a self-verifying guest between two chmig processes.

1. ``chmig run`` boots a KVM VM whose guest checks all of its memory, round after round.
2. ``chmig receive --listen tcp:127.0.0.1:0`` waits for a migration.
3. ``send-migration`` moves the running VM over loopback TCP (precopy, several connections; or, with
   ``--postcopy``, postcopy: the VM runs on the destination at once and its pages follow).
4. The guest, now in the other process, keeps counting rounds and reports zero mismatches.

``--memory`` and ``--cpus`` take ``chmig run``'s syntax (``size=256M``, ``boot=2``: Cloud Hypervisor's option
rules, the same keys and checks) and keep their short forms (``256M``, ``2``); see :func:`vm_options`.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from .harness import Processes

#: The demo's guest: rewrites a tenth of its pages per round, so precopy has something to chase.
DEMO_WORKLOAD = "verify,dirty_percent=10"


def vm_options(memory: str | int, cpus: str | int) -> tuple[str, str, int]:
    """``chmig run``'s ``--memory`` and ``--cpus`` strings for the demo's VM, and its number of vCPUs.

    A value with ``=`` is an option string as ``run`` takes it; one without
    is the short form, the size (``256M``) or the vCPU count (``2``).  Both are
    parsed and checked here, by ``run``'s own parser, so a bad value is one
    clear line before any process starts.
    """
    from .vm import VmConfig  # here: the parser lives with the VM, which `chmig --help` need not load

    memory_text, cpus_text = str(memory), str(cpus)
    if "=" not in memory_text:
        memory_text = f"size={memory_text}"
    if "=" not in cpus_text:
        cpus_text = f"boot={cpus_text}"
    config = VmConfig.from_args(cpus_text, memory_text, [], DEMO_WORKLOAD)
    return memory_text, cpus_text, config.cpus


def iteration_table(iterations: list[dict]) -> list[str]:
    lines = [f"    {'iteration':>9} {'MiB':>9} {'ms':>9} {'MiB/s':>9} {'dirty MiB/s':>12}"]
    for it in iterations:
        name = f"{it['iteration']}{' final' if it['final'] else ''}"
        lines.append(f"    {name:>9} {it['bytes'] / 2**20:9.1f} {it['duration_ms']:9.1f} "
                     f"{it['bandwidth_mib_s']:9.0f} {it['dirty_rate_mib_s']:12.0f}")
    return lines


def main_demo(args: argparse.Namespace) -> int:
    say = lambda text="": print(text, flush=True)  # noqa: E731
    memory, cpus, vcpus = vm_options(args.memory, args.cpus)
    with tempfile.TemporaryDirectory(prefix="chmig-demo-") as tmp:
        procs = Processes(Path(tmp), verbose=False)
        try:
            vm_args = ("--cpus", cpus, "--memory", memory, "--workload", DEMO_WORKLOAD)
            say(f"1. source: chmig run {' '.join(vm_args)}")
            source = procs.run(*vm_args)
            before = source.wait_rounds(2 * vcpus, timeout=120)["guest"]
            say(f"   guest verifying its memory: {before['rounds']} rounds, {before['errors']} errors")
            postcopy = getattr(args, "postcopy", False)
            receive_args = ("--memory-mode", "postcopy") if postcopy else ()
            dest, url = procs.receive("tcp:127.0.0.1:0", *receive_args)
            say(f"2. destination: chmig receive --listen {url} {' '.join(receive_args)}".rstrip())
            if postcopy:
                options = {"destination_url": url, "memory_mode": "postcopy"}
                say(f"3. live migration: send-migration destination_url={url},memory_mode=postcopy")
            else:
                options = {"destination_url": url, "connections": args.connections}
                say(f"3. live migration: send-migration destination_url={url},connections={args.connections}")
            stats = source.call("PUT", "vm.send-migration", options, timeout=600)
            for line in iteration_table(stats["iterations"]) if stats["iterations"] else []:
                say(line)
            say(f"   total {stats['total_time_ms'] / 1000:.2f} s, downtime {stats['downtime_ms']:.1f} ms "
                f"(goal {stats['downtime_goal_ms']} ms), {stats['total_bytes'] / 2**20:.0f} MiB sent")
            say(f"   source process exited with {source.wait_exit(60)}")
            if postcopy:
                whole = dest.wait_for(lambda i: i["migration"]["postcopy"]["status"] != "pulling", timeout=120,
                                      what="the VM to become whole")["migration"]["postcopy"]
                latency = whole["fault_latency_us"]
                say(f"   postcopy: {whole['status']} after {whole['whole_after_ms'] or 0:.0f} ms; "
                    f"{whole['pages_faulted']} pages on demand (fault latency p50 {latency['p50']:.0f} µs, "
                    f"p99 {latency['p99']:.0f} µs), {whole['pages_pulled']} pulled in the background")
            arrived = dest.info()["guest"]
            after = dest.wait_for(
                lambda i: all(v["rounds"] >= a["rounds"] + 2 for v, a in zip(i["guest"]["vcpus"], arrived["vcpus"])),
                timeout=120, what="two more rounds on the destination")["guest"]
            say(f"4. destination: guest continued from round {before['rounds']} → {arrived['rounds']} (arrival) "
                f"→ {after['rounds']}, errors {after['errors']}")
            ok = after["errors"] == 0 and after["rounds"] >= arrived["rounds"] >= before["rounds"]
            say("demo: " + ("the guest kept running with zero memory mismatches" if ok else "FAILED"))
            return 0 if ok else 1
        finally:
            procs.stop_all()
