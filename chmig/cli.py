"""The ``chmig`` command line: one subcommand per job, errors as one clear line.

Each subcommand's handler is imported lazily so ``chmig --help`` stays fast and
works on a machine without /dev/kvm.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import sys
from typing import Callable, Sequence

from .errors import ChmigError

log = logging.getLogger("chmig")


def _not_implemented(name: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        print(f"chmig {name}: not implemented yet", file=sys.stderr)
        return 2

    return handler


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"chmig.{module}"), function)(args)

    return handler


def _selfcheck(args: argparse.Namespace) -> int:
    from . import selfcheck

    return 0 if selfcheck.run(args.url) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chmig",
        description="Cloud Hypervisor's live-migration protocol in Python, driving a real KVM guest.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("--log-file", help="write the log to this file instead of standard error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="boot a KVM VM (or an empty VMM) and serve its API")
    run.set_defaults(handler=_lazy("vmm", "main_run"))
    _add_run_arguments(run)

    remote = sub.add_parser("remote", help="talk to a running chmig VMM, like ch-remote")
    remote.set_defaults(handler=_lazy("remote", "main_remote"))
    remote.add_argument("--api-socket", required=True, help="the VMM's API socket")
    remote.add_argument("action", help="ping, info, pause, resume, shutdown, shutdown-vmm, send-migration, "
                        "receive-migration, cancel-migration, snapshot, restore")
    remote.add_argument("options", nargs="?", default="",
                        help="key=value[,key=value...] for the action (snapshot: the URL file:///DIR)")

    receive = sub.add_parser("receive", help="wait for an incoming migration and run the VM it brings")
    receive.set_defaults(handler=_lazy("vmm", "main_receive"))
    receive.add_argument("--listen", required=True, metavar="URL", help="tcp:HOST:PORT or unix:PATH")
    receive.add_argument("--tls-dir", help="directory with ca-cert.pem, server-cert.pem, server-key.pem ...")
    receive.add_argument("--api-socket", help="serve the received VM's API on this UNIX socket")
    receive.add_argument("--serial", default="tty", help="tty, off or file=PATH (default tty)")
    receive.add_argument("--exit-after-migration", action="store_true",
                         help="exit once the migration finished (after postcopy: once the VM is whole) "
                              "instead of running the VM")
    receive.add_argument("--memory-mode", choices=["precopy", "postcopy"], default="precopy",
                         help="how the memory comes: precopy (before the VM runs here, the default) or postcopy "
                              "(the VM runs at once and faults its pages in; the source must say so too)")
    receive.add_argument("--prefetch", metavar="SIZE|page|off",
                         help="postcopy: pull the pages no fault asked for in ranges of SIZE (256K..2M, default "
                              "1M); page = one page per idle loop (Cloud Hypervisor's way); off = no pull")

    offload = sub.add_parser("offload", help="snapshot/restore daemon (a drop-in for Cloud Hypervisor's "
                                             "offload_daemon)")
    offload.set_defaults(handler=_lazy("offload", "main_offload"))
    from .offload import add_arguments as add_offload_arguments

    add_offload_arguments(offload)

    walkthrough = sub.add_parser("walkthrough", help="teach the protocol by running it, step by step")
    walkthrough.set_defaults(handler=_not_implemented("walkthrough"))

    demo = sub.add_parser("demo", help="the main job: a live migration between two chmig processes")
    demo.set_defaults(handler=_lazy("demo", "main_demo"))
    demo.add_argument("--memory", default="256M", help="guest RAM size (default 256M)")
    demo.add_argument("--cpus", type=int, default=2, help="vCPUs (default 2)")
    demo.add_argument("--connections", type=int, default=2, help="migration connections (default 2)")
    demo.add_argument("--postcopy", action="store_true",
                      help="migrate by postcopy: the VM runs on the destination at once, its pages follow")

    selfcheck = sub.add_parser("selfcheck", help="a full protocol exchange between two threads over loopback")
    selfcheck.set_defaults(handler=_selfcheck)
    selfcheck.add_argument("--url", default="tcp:127.0.0.1:0", help="where to listen (default tcp:127.0.0.1:0)")
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("--api-socket", help="serve Cloud Hypervisor's HTTP API on this UNIX socket")
    run.add_argument("--cpus", help="boot=N (default 1)")
    run.add_argument("--memory", help="size=SIZE[,shared=on|off] (default shared=on)")
    run.add_argument("--memory-zone", action="append", default=[], help="id=NAME,size=SIZE[,shared=on|off]")
    run.add_argument("--workload", help="verify[,dirty_percent=P][,dirty_rate=MIB] | counter | idle")
    run.add_argument("--serial", default="tty", help="tty, off or file=PATH (default tty)")
    run.add_argument("--restore", metavar="OPTIONS",
                     help="restore the VM of a snapshot instead of booting one: source_url=file:///DIR"
                          "[,resume=true|false][,memory_restore_mode=copy|ondemand][,prefault=on|off] "
                          "(paused unless resume=true)")


def configure_logging(verbosity: int, log_file: str | None) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(
        level=level,
        filename=log_file,
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s",
    )


#: ``chmig remote info | head -1``: the reader left early, as for a process killed by SIGPIPE (128 + 13).
EXIT_STDOUT_CLOSED = 141


def _stdout_closed() -> bool:
    """Whether standard output is a pipe or socket whose reader has gone (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):  # no usable stdout at all: nothing can be written there anyway
        return True


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the buffered rest is dropped quietly at exit (Python's documented recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.log_file)
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # so a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # not the reader of our output that left: a real error
        _silence_stdout()
        return EXIT_STDOUT_CLOSED
    except ChmigError as exc:
        print(f"chmig {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"chmig {args.command}: interrupted", file=sys.stderr)
        return 130
