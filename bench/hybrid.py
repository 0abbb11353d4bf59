"""Benchmark hybrid precopy→postcopy against precopy and postcopy, in the same run (issue 13).

    python3 bench/hybrid.py [--quick]

A 1 GiB VM migrates over a veth pair between two network namespaces with
``tc qdisc ... tbf rate 1gbit burst 256kb latency 50ms`` on the source's end
(the link and the processes of ``bench/postcopy.py``: the source in namespace
A, each ``chmig receive`` in B, the VM brought back to A by an untimed local
migration after every measured hop).  Two guests:

* ``dirty_percent=100,dirty_rate=200``: it rewrites 200 MiB/s, above the link's
  ~119 MiB/s, so precopy with ``downtime_ms=300`` cannot converge;
* ``dirty_percent=100,dirty_rate=20``: it rewrites 20 MiB/s, so precopy converges.

For each guest: precopy (``downtime_ms=300,timeout_s=20,timeout_strategy=ignore``:
it finishes anyway, with whatever downtime that takes), postcopy (prefetch 1M,
2 Fault connections), and hybrid (``downtime_ms=300,timeout_s=20``: precopy
while it converges, postcopy after 20 s if it does not).  Per migration: total
time (send-migration's ``total_time_ms``), downtime, time until whole (postcopy
and hybrid: the destination's ``whole_after_ms``, from State), the vCPUs'
blocktime on missing pages, and the bytes the source sent.  Every migration is
checked: on the destination every vCPU completes a whole verify round with zero
errors.  Medians of 3 runs (1 with ``--quick``).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
from dataclasses import dataclass

import _common as c
import postcopy as bp  # bench/postcopy.py: the namespaces, the processes, the checked chain of hops
from tests.netns import two_hosts, unavailable_reason

SIZE = "1G"
TIMEOUT_S = 20
ABOVE, BELOW = 200, 20  # MiB/s the guest rewrites: above and below the link


@dataclass(frozen=True)
class Mode:
    """One way to migrate: a :class:`bench.postcopy.Config` the chain understands."""

    key: str
    config: bp.Config
    extra: dict


class HybridConfig(bp.Config):
    """Hybrid: a postcopy destination, a hybrid send (it answers once the destination has every page)."""

    def receive_args(self) -> list[str]:
        return ["--memory-mode", "postcopy"]

    def body(self) -> dict:
        return {"memory_mode": "hybrid", "downtime_ms": 300, "timeout_s": TIMEOUT_S}


MODES = (
    Mode("precopy", bp.Config("precopy", "precopy, downtime_ms=300", mode="precopy"),
         {"timeout_s": TIMEOUT_S, "timeout_strategy": "ignore"}),
    Mode("postcopy", bp.Config("postcopy", "postcopy, prefetch 1M, 2 Fault conns"), {}),
    Mode("hybrid", HybridConfig("hybrid", "hybrid, downtime_ms=300, timeout_s=20", mode="hybrid"), {}),
)


def measure(chain: bp.Chain, mode: Mode, label: str) -> dict:
    hop = chain.hop(mode.config, label, **mode.extra)
    src, pc = hop.src, hop.pc  # (pc: {} for a precopy, or a hybrid that converged)
    return {
        "total_s": src["total_time_ms"] / 1000,
        "downtime_ms": src["downtime_ms"],
        "whole_s": pc["whole_after_ms"] / 1000 if pc.get("whole_after_ms") is not None else None,
        "blocktime_ms": pc.get("blocktime_ms"),
        "sent_mib": src["total_bytes"] / c.MiB,
        "switched": src.get("switched_by"),
        "discarded": src.get("pages_discarded"),
    }


def median(values: list) -> object:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every case once")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    reason = unavailable_reason()
    if reason:
        print(f"hybrid.py: cannot make network namespaces: {reason}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, bp._interrupt)
    signal.signal(signal.SIGHUP, bp._interrupt)
    begin = time.monotonic()
    rows: list[list[object]] = []
    try:
        with bp.ns_processes("chmig-bench-hybrid-") as procs, two_hosts("1gbit") as hosts:
            try:
                site = bp.Site("veth", f"veth, {bp.TBF}", src_ns=hosts.a, dst_ns=hosts.b, src_host=hosts.a_address,
                               dst_host=hosts.b_address)
                for rate in (ABOVE, BELOW):
                    bp.DIRTY_RATE = rate  # Chain.boot paces the first stamping by it
                    chain = bp.Chain(procs, site, SIZE, f"verify,dirty_percent=100,dirty_rate={rate}")
                    chain.boot()
                    for mode in MODES:
                        runs = [measure(chain, mode, f"{mode.key} at {rate} MiB/s #{n + 1}") for n in range(repeats)]
                        rows.append([f"{rate} MiB/s", mode.key,
                                     *(median([r[k] for r in runs]) for k in
                                       ("total_s", "downtime_ms", "whole_s", "blocktime_ms", "sent_mib")),
                                     ", ".join(sorted({str(r["switched"]) for r in runs}))])
                    if chain.vm is not None:
                        chain.vm.stop()
            finally:
                procs.stop_all()  # before the namespaces go
    except KeyboardInterrupt:
        print("hybrid.py: interrupted; processes stopped, namespaces removed", file=sys.stderr, flush=True)
        return 130
    c.say(f"measured in {time.monotonic() - begin:.0f} s")
    c.table(f"{SIZE} VM over {bp.TBF} (veth between namespaces): precopy vs postcopy vs hybrid, median of {repeats}",
            ["guest dirties", "mode", "total s", "downtime ms", "whole after s", "blocktime ms", "MiB sent",
             "hybrid switched by"],
            [[r[0], r[1], *(f"{v:.1f}" if isinstance(v, float) else ("—" if v is None else v) for v in r[2:7]), r[7]]
             for r in rows],
            [f"precopy: downtime_ms=300,timeout_s={TIMEOUT_S},timeout_strategy=ignore (finishes whatever the "
             "downtime); postcopy: prefetch 1M, 2 Fault connections; hybrid: downtime_ms=300,"
             f"timeout_s={TIMEOUT_S} (switches to postcopy after {TIMEOUT_S} s if precopy has not converged)",
             "total: send-migration's total_time_ms (for postcopy and hybrid: until the destination was whole); "
             "whole after: from State; blocktime: vCPUs waiting for missing pages (a lower bound)",
             "the baseline for hybrid is in the same table: precopy and postcopy on the same guest and link"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
