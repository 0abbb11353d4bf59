"""What ``--trace`` costs a migration (issue 12): ``python3 bench/trace.py [--quick]``.

The trace writes one JSON line per message as it passes, on the thread that
sends or reads the message; the message-heaviest flow is postcopy, where every
page the destination asks for is a PageFault and its answer.  This runs a real
postcopy migration of a 256 MiB verify guest between two VMMs in this process
(loopback TCP, userfaultfd), with both ends traced and without any trace (the
baseline, in the same run), and compares the time until the VM is whole and the
guests' fault latency — with Cloud Hypervisor's pull (``prefetch=page``: one
PageFault per 4 KiB page, the worst case for a per-message cost) and chmig's
default (1 MiB ranges).  Median of 3 runs (1 with --quick) after one untimed warm-up.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import _common  # noqa: F401 - puts the repository on sys.path
from chmig.receive import ReceiveOptions
from chmig.trace import TraceWriter
from chmig.vm import VmConfig
from chmig.vmm import Vmm

MEMORY = "256M"
RUNS = 1 if "--quick" in sys.argv else 3


def migrate(prefetch: str, trace_dir: Path | None) -> dict:
    """One postcopy migration; the destination's postcopy statistics, plus the trace's lines and bytes."""
    source, destination = Vmm("off"), Vmm("off")
    writers = []
    if trace_dir is not None:
        for vmm, name in ((source, "source"), (destination, "destination")):
            writer = TraceWriter(trace_dir / f"{name}.jsonl")
            writers.append(writer)
            vmm.observers.add(writer)
    try:
        source.boot(VmConfig.from_args("boot=1", f"size={MEMORY},shared=off", [], "verify"))
        while source.info()["guest"]["rounds"] < 1:  # a tool watching the guest's counters: nothing signals them
            threading.Event().wait(0.05)
        listening: list[str] = []
        ready = threading.Event()
        options = ReceiveOptions(receiver_url="tcp:127.0.0.1:0", memory_mode="postcopy", prefetch=prefetch)
        failure: list[BaseException] = []

        def receive() -> None:
            try:
                destination.receive_migration(options, lambda address: (listening.append(address), ready.set()))
            except BaseException as exc:  # reported below
                failure.append(exc)
                ready.set()

        thread = threading.Thread(target=receive, name="bench-receive")
        thread.start()
        if not ready.wait(60) or failure:
            raise failure[0] if failure else RuntimeError("the destination did not listen within 60 s")
        source.send_migration({"destination_url": listening[0], "memory_mode": "Postcopy"})
        thread.join(60)
        if thread.is_alive() or failure:
            raise failure[0] if failure else RuntimeError("the receive did not end within 60 s")
        pager = destination.postcopy
        assert pager is not None and pager.done.wait(300), "postcopy did not finish"
        stats = pager.stats.to_json()
        for writer in writers:
            writer.close()
        stats["trace_lines"] = sum(w.messages for w in writers)
        stats["trace_bytes"] = sum(os.path.getsize(w.path) for w in writers)
        return stats
    finally:
        for writer in writers:
            writer.close()
        destination.close()
        source.close()


def main() -> None:
    # A failed migration's reasons are logged (WARNING and up): with thread and time, they say where.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    migrate("1M", None)  # warm-up: first touches of memory on this machine cost more (machine-facts)
    rows: list[list[object]] = []
    for prefetch in ("page", "1M"):
        medians: dict[str, dict[str, float]] = {}
        for label in ("untraced", "traced"):
            runs = []
            for _ in range(RUNS):
                with tempfile.TemporaryDirectory(prefix="chmig-bench-trace-") as tmp:
                    runs.append(migrate(prefetch, Path(tmp) if label == "traced" else None))
            medians[label] = {
                "whole": statistics.median(r["whole_after_ms"] for r in runs),
                "p50": statistics.median(r["fault_latency_us"]["p50"] for r in runs),
                "p99": statistics.median(r["fault_latency_us"]["p99"] for r in runs),
                "lines": statistics.median(r["trace_lines"] for r in runs),
                "mib": statistics.median(r["trace_bytes"] for r in runs) / (1 << 20),
            }
        base, traced = medians["untraced"], medians["traced"]
        rows.append([f"prefetch={prefetch}", f"{base['whole']:.0f}", f"{traced['whole']:.0f}",
                     f"{traced['whole'] / base['whole']:.2f}", f"{base['p50']:.0f} / {base['p99']:.0f}",
                     f"{traced['p50']:.0f} / {traced['p99']:.0f}", f"{traced['lines']:.0f}", f"{traced['mib']:.1f}"])
    _common.table(f"--trace on a postcopy migration of a {MEMORY} verify guest: both ends traced (chmig) vs "
                  f"untraced (baseline), median of {RUNS}",
                  ["pull", "whole ms (base)", "whole ms (traced)", "ratio", "fault p50/p99 µs (base)",
                   "fault p50/p99 µs (traced)", "messages", "trace MiB"], rows,
                  ["whole: from State until every page is present (destination's postcopy statistics)",
                   "messages: lines written to both ends' trace files (each message twice: sent and received)"])


if __name__ == "__main__":
    main()
