"""Run every benchmark in sequence: ``python3 bench/run_all.py [--quick]`` (``make bench``).

Each benchmark runs as its own process (so one that crashes cannot take the
others' VMs with it); ``--quick`` is passed through.  Exits non-zero if any
benchmark failed, after running them all.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("vm.py", "precopy.py", "postcopy.py", "hybrid.py", "restore.py", "refusals.py", "progress.py", "trace.py")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args()
    failed = []
    for name in BENCHMARKS:
        command = [sys.executable, str(HERE / name)] + (["--quick"] if args.quick else [])
        print(f"\n#### {' '.join(['python3', 'bench/' + name] + command[2:])}", flush=True)
        begin = time.monotonic()
        code = subprocess.call(command, cwd=HERE.parent)
        print(f"#### bench/{name}: exit {code} after {time.monotonic() - begin:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"#### failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
