"""``python -m fuzz --cases N --seed S [--target wire|api|pagefault|pager|recovery|offload|all] [--inprocess|--process] [--only INDEX ...]``.

Dispatches to :func:`fuzz.wire.run`, ``fuzz.api.run``, :func:`fuzz.pagefault.run`, :func:`fuzz.pager.run` and
:func:`fuzz.recovery.run` and :func:`fuzz.offload.run`;
each has the signature ``run(cases, seed, report) -> failures``.  The exit status is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence


def report(line: str) -> None:
    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fuzz",
        description="Hostile-peer fuzzers: the migration wire (fuzz.wire), the API socket (fuzz.api), the "
                    "source's PageFault server (fuzz.pagefault), the destination's postcopy pager (fuzz.pager), "
                    "postcopy recovery's listener (fuzz.recovery) and the offload daemon (fuzz.offload).")
    parser.add_argument("--cases", type=int, default=1000, help="cases per fuzzer (default 1000)")
    parser.add_argument("--seed", type=int, default=1, help="seed: a case is fixed by (seed, index)")
    parser.add_argument("--target", choices=["wire", "api", "pagefault", "pager", "recovery", "offload", "all"],
                        default="all", help="which fuzzer (default all: wire, api, pagefault, pager, recovery, offload)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--inprocess", dest="mode", action="store_const", const="inprocess",
                       help="wire: every case against an in-process Receiver")
    where.add_argument("--process", dest="mode", action="store_const", const="process",
                       help="wire: every case against a fresh `chmig receive` process")
    parser.add_argument("--process-share", type=float, default=0.1,
                        help="wire, interleaved: share of cases run against a process (default 0.1)")
    parser.add_argument("--only", type=int, nargs="+", metavar="INDEX",
                        help="wire, pagefault, pager, recovery, offload: run only these case indexes")
    parser.add_argument("--recording", type=Path,
                        help="wire: replay the recording saved in DIR (recorded and saved there if missing)")
    parser.add_argument("--bound", type=float, default=15.0,
                        help="wire: seconds the receiver has to answer and to give up (default 15)")
    parser.add_argument("--show", action="store_true", help="wire: print every case and its trace, not only failures")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the fuzzer's own steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    begin = time.monotonic()
    failures = 0
    ran = []
    if args.target in ("wire", "all"):
        from . import wire

        failures += wire.run(args.cases, args.seed, report, mode=args.mode or "mixed", only=args.only,
                             recording=args.recording, process_share=args.process_share, bound=args.bound,
                             show=args.show)
        ran.append("wire")
    if args.target in ("api", "all"):
        from . import api

        failures += api.run(args.cases, args.seed, report)
        ran.append("api")
    if args.target in ("pagefault", "all"):
        from . import pagefault

        failures += pagefault.run(args.cases, args.seed, report, only=args.only)
        ran.append("pagefault")
    if args.target in ("pager", "all"):
        from . import pager

        failures += pager.run(args.cases, args.seed, report, only=args.only, verbose=args.verbose)
        ran.append("pager")
    if args.target in ("recovery", "all"):
        from . import recovery

        failures += recovery.run(args.cases, args.seed, report, only=args.only)
        ran.append("recovery")
    if args.target in ("offload", "all"):
        from . import offload

        failures += offload.run(args.cases, args.seed, report, only=args.only)
        ran.append("offload")
    report(f"fuzz ({', '.join(ran)}): {failures} failures in {time.monotonic() - begin:.1f} s, seed {args.seed}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
