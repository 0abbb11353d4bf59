"""The ``chmig`` command line: one subcommand per job, errors as one clear line.

It follows ``cloud-hypervisor``'s command line where the two meet: ``-v``
(repeatable), ``--log-file`` and ``--log-format`` (Cloud Hypervisor's tokens)
are accepted before or after any subcommand; ``-V``/``--version``;
``--api-socket path=P|fd=N|P`` and ``--event-monitor`` on ``run`` and
``receive``; ``--serial`` defaults to ``null``.  Every bad input ends as one
line on standard error and exit status 2 (argparse's complaints, and every
:class:`~chmig.errors.UsageError` a handler raises, bind errors included);
any other :class:`~chmig.errors.ChmigError` is one line and exit 1.

Each subcommand's handler is imported lazily so ``chmig --help`` stays fast and
works on a machine without /dev/kvm; ``remote`` and ``offload`` build their
own sub-parsers (:func:`chmig.remote.add_arguments`), to which the logging
options are then added like everywhere else.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import sys
import textwrap
from typing import Any, Callable, Iterator, NoReturn, Sequence

from . import __version__
from .errors import ChmigError, UsageError
from .logformat import CH_DEFAULT_LOG_FORMAT, LOG_FORMAT_TOKENS, LogFormat, configure_logging

log = logging.getLogger("chmig")

VERSION = f"chmig {__version__}"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, but an option syntax (``destination_url=<url>[,local=on|off,...]``) is never cut mid-word.

    A syntax string is something to copy; a line a little too long is better
    than one broken inside ``memory_mode=p|recopy``.
    """

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose complaints are one line naming the command and where its help is, with exit status 2.

    argparse's own ``error`` prints the whole usage block first; a script (or a
    person) reading the output wants the one thing that was wrong.  Subparsers
    are of this class too (``add_subparsers`` uses the parent's class), and
    share its help formatter.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        flat = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {flat} (see {self.prog} --help)\n")


def _log_format_type(text: str) -> LogFormat:
    try:
        return LogFormat(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


_LOG_FORMAT_HELP = (
    "the log line, in Cloud Hypervisor's tokens: " + ", ".join(f"{{{token}}}" for token in LOG_FORMAT_TOKENS)
    + f" ({{{{ and }}}} for braces; e.g. {CH_DEFAULT_LOG_FORMAT!r}, Cloud Hypervisor's default); without it, "
    "chmig's own layout: time level thread logger: message"
).replace("%", "%%")  # argparse %-formats help strings


def _add_logging_options(parser: argparse.ArgumentParser, depth: int) -> None:
    """``-v``, ``--log-file``, ``--log-format`` on ``parser``, ``depth`` subcommands deep.

    argparse parses a subcommand's options into a fresh namespace and copies it
    over the parent's, so the deeper copies default to "not given"
    (SUPPRESS) and keep the top level's value unless given again; each level
    counts ``-v`` under its own name, summed by :func:`parse_args`.
    """
    if depth == 0:
        parser.add_argument("-v", "--verbose", action="count", dest="verbose_0", default=0,
                            help="more log output: -v info, -vv (or more) debug; repeatable, before or after "
                                 "the subcommand")
        parser.add_argument("--log-file", metavar="PATH", default=None,
                            help="write the log to this file (appended) instead of standard error")
        parser.add_argument("--log-format", metavar="FORMAT", type=_log_format_type, default=None,
                            help=_LOG_FORMAT_HELP)
        return
    group = parser.add_argument_group("logging (as before the subcommand; see chmig --help)")
    group.add_argument("-v", "--verbose", action="count", dest=f"verbose_{depth}", default=argparse.SUPPRESS,
                       help="more log output (repeatable)")
    group.add_argument("--log-file", metavar="PATH", default=argparse.SUPPRESS, help="the log goes to this file")
    group.add_argument("--log-format", metavar="FORMAT", type=_log_format_type, default=argparse.SUPPRESS,
                       help="the log line, in Cloud Hypervisor's tokens ({wallclock}, {level}, {msg} ...)")


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers of ``parser``'s subcommands (argparse keeps them only in its actions)."""
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield sub


def _add_logging_everywhere(parser: argparse.ArgumentParser, depth: int = 0) -> None:
    _add_logging_options(parser, depth)
    for sub in _subparsers(parser):
        _add_logging_everywhere(sub, depth + 1)


# ---------------------------------------------------------------------------------------------
# --api-socket path=P|fd=N|P (cloud-hypervisor's parse_api_socket)
# ---------------------------------------------------------------------------------------------


def parse_api_socket(text: str) -> tuple[str | None, int | None]:
    """``--api-socket`` → ``(path, fd)``, one of them None, by Cloud Hypervisor's ``parse_api_socket``.

    ``path=P`` or ``fd=N`` (an inherited listening socket; ``fd`` wins when
    both are given); anything else is the path itself (``/tmp/a=b.sock`` too).
    Stricter than Cloud Hypervisor in one way: a string that starts with
    ``path=`` or ``fd=`` must be valid options (not ``path=`` alone, not
    ``path=P,mode=x``), where Cloud Hypervisor would quietly take the whole
    string as a file name and create a socket called that.
    """
    from .options import OptionParser

    key, equals, _ = text.partition(",")[0].partition("=")
    if not (equals and key.strip() in ("path", "fd")):
        if not text.strip():
            raise UsageError("needs a socket path: path=<path> or fd=<fd>", where="--api-socket")
        return text, None
    parser = OptionParser("--api-socket").add("path").add("fd").parse(text)
    if parser.is_set("fd"):
        fd = parser.integer("fd", maximum=2**31 - 1)
        if fd is None:
            raise UsageError("fd= needs a file descriptor number", where="--api-socket")
        return None, fd
    path = parser.get("path")
    if not path:
        raise UsageError("path= needs a socket path", where="--api-socket")
    return path, None


class _ApiSocketAction(argparse.Action):
    """Store ``--api-socket`` as ``args.api_socket`` (a path) and ``args.api_socket_fd`` (an fd), one of them None."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        try:
            path, fd = parse_api_socket(str(values))
        except UsageError as exc:
            raise argparse.ArgumentError(self, exc.message) from None
        namespace.api_socket = path
        namespace.api_socket_fd = fd


def _add_vmm_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``run`` and ``receive`` share, as ``cloud-hypervisor`` spells them."""
    parser.add_argument("--api-socket", action=_ApiSocketAction, metavar="path=<path>|fd=<fd>",
                        help="HTTP API socket (UNIX domain socket): path=<path> or fd=<fd> (a listening socket "
                             "this process inherits); a bare PATH is path=PATH")
    parser.set_defaults(api_socket=None, api_socket_fd=None)
    parser.add_argument("--event-monitor", metavar="path=<path>|fd=<fd>",
                        help="Path to report events on: path=<path> or fd=<fd>")
    parser.add_argument("--serial", default="null", metavar="off|null|tty|file=<path>",
                        help="Control serial port: off|null|tty|file=<path> (default null: the guest's output "
                             "is dropped)")


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------


def _lazy(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"chmig.{module}"), function)(args)

    return handler


def _selfcheck(args: argparse.Namespace) -> int:
    from . import selfcheck

    return 0 if selfcheck.run(args.url) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="chmig",
        description="Cloud Hypervisor's live-migration protocol in Python, driving a real KVM guest.",
    )
    parser.add_argument("-V", "--version", action="version", version=VERSION, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="boot a KVM VM (or an empty VMM) and serve its API")
    run.set_defaults(handler=_lazy("vmm", "main_run"))
    _add_run_arguments(run)

    remote = sub.add_parser("remote", help="talk to a running chmig VMM, like ch-remote",
                            description="Remotely control a chmig VMM, as ch-remote controls a cloud-hypervisor "
                                        "one.")
    remote.set_defaults(handler=_lazy("remote", "main_remote"))
    from .remote import add_arguments as add_remote_arguments

    add_remote_arguments(remote)

    receive = sub.add_parser("receive", help="wait for an incoming migration and run the VM it brings")
    receive.set_defaults(handler=_lazy("vmm", "main_receive"))
    receive.add_argument("--listen", required=True, metavar="URL", help="tcp:HOST:PORT or unix:PATH")
    receive.add_argument("--tls-dir", help="directory with ca-cert.pem, server-cert.pem, server-key.pem ...")
    _add_vmm_arguments(receive)
    receive.add_argument("--exit-after-migration", action="store_true",
                         help="exit once the migration finished (after postcopy: once the VM is whole) "
                              "instead of running the VM")
    receive.add_argument("--memory-mode", choices=["precopy", "postcopy"], default="precopy",
                         help="how the memory comes: precopy (before the VM runs here, the default) or postcopy "
                              "(the VM runs at once and faults its pages in; the source migrates by postcopy, or hybrid: precopy first)")
    receive.add_argument("--prefetch", metavar="SIZE|page|off",
                         help="postcopy: pull the pages no fault asked for in ranges of SIZE (256K..2M, default "
                              "1M); page = one page per idle loop (Cloud Hypervisor's way); off = no pull")
    receive.add_argument("--postcopy-recovery-s", type=int, metavar="SECONDS",
                         help="postcopy: when a Fault connection breaks, wait this long (vCPUs blocked) for "
                              "the source to reconnect with the migration's token (default 60; 0: fail at once). "
                              "Only a chmig source that agreed a token (protocol version 1) can reconnect")
    receive.add_argument("--trace", metavar="FILE",
                         help="write every message of the migration to FILE as it passes (until the VM is whole), "
                              "one JSON object a line; read it with `chmig trace show FILE [--mermaid OUT]`")

    offload = sub.add_parser("offload", help="snapshot/restore daemon (a drop-in for Cloud Hypervisor's "
                                             "offload_daemon)")
    offload.set_defaults(handler=_lazy("offload", "main_offload"))
    from .offload import add_arguments as add_offload_arguments

    add_offload_arguments(offload)

    walkthrough = sub.add_parser("walkthrough", help="teach the protocol: run a real migration and narrate every "
                                                     "message",
                                 description="Run a real migration of a small self-verifying guest (both ends in "
                                             "this process: real sockets, real KVM, real userfaultfd) and narrate "
                                             "every message as it passes.")
    walkthrough.set_defaults(handler=_lazy("walkthrough", "main_walkthrough"))
    from .walkthrough import add_arguments as add_walkthrough_arguments

    add_walkthrough_arguments(walkthrough)

    trace = sub.add_parser("trace", help="narrate and draw a trace file written by --trace")
    trace.set_defaults(handler=_lazy("trace", "main_trace"))
    from .trace import add_arguments as add_trace_arguments

    add_trace_arguments(trace)

    demo = sub.add_parser("demo", help="the main job: a live migration between two chmig processes")
    demo.set_defaults(handler=_lazy("demo", "main_demo"))
    demo.add_argument("--memory", default="256M", metavar="size=SIZE",
                      help="guest RAM, as run's --memory: size=SIZE[,shared=on|off] (a bare SIZE too; default 256M)")
    demo.add_argument("--cpus", default="2", metavar="boot=N",
                      help="vCPUs, as run's --cpus: boot=N (a bare N too; default 2)")
    demo.add_argument("--connections", type=int, default=2, help="migration connections (default 2)")
    demo.add_argument("--postcopy", action="store_true",
                      help="migrate by postcopy: the VM runs on the destination at once, its pages follow")

    selfcheck = sub.add_parser("selfcheck", help="a full protocol exchange between two threads over loopback")
    selfcheck.set_defaults(handler=_selfcheck)
    selfcheck.add_argument("--url", default="tcp:127.0.0.1:0", help="where to listen (default tcp:127.0.0.1:0)")

    _add_logging_everywhere(parser)
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    _add_vmm_arguments(run)
    run.add_argument("--cpus",
                     help="boot=<boot_vcpus> (default boot=1); Cloud Hypervisor's other keys (max, topology, ...) "
                          "are refused by name")
    run.add_argument("--memory",
                     help="size=<guest_memory_size>[,shared=on|off] (default size=512M,shared=on; size=0 with "
                          "--memory-zone: only the zones); Cloud Hypervisor's other keys are refused by name")
    run.add_argument("--memory-zone", action="append", default=[],
                     help="id=<zone_identifier>[,size=<size_of_memory_zone>][,shared=on|off] (repeatable; each "
                          "zone is its own KVM slot; size defaults to 512M)")
    run.add_argument("--workload", help="verify[,dirty_percent=P][,dirty_rate=MIB] | counter | idle")
    run.add_argument("--restore", metavar="OPTIONS",
                     help="restore the VM of a snapshot instead of booting one: source_url=file:///DIR"
                          "[,resume=true|false][,memory_restore_mode=copy|ondemand][,prefault=on|off] "
                          "(paused unless resume=true)")


def _deepest_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the innermost subcommand ``args`` chose (``chmig remote info``'s, say)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, action.dest, None)
            if chosen in action.choices:
                return _deepest_parser(action.choices[chosen], args)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; a bad one exits 2 with one line, from the subcommand it concerns."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # parse_args would blame the top level ("chmig: error"); the subcommand is the one to read about.
        _deepest_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    depths = [name for name in vars(args) if name.startswith("verbose_")]
    args.verbose = sum(getattr(args, name) for name in depths)
    for name in depths:
        delattr(args, name)
    return args


#: ``chmig remote info | head -1``: the reader left early, as for a process killed by SIGPIPE (128 + 13).
EXIT_STDOUT_CLOSED = 141
#: Bad input of any kind (argparse's own status for it).
EXIT_USAGE = 2


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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        configure_logging(args.verbose, args.log_file, args.log_format)
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # so a closed pipe shows here, not in the interpreter's last flush
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # not the reader of our output that left: a real error
        _silence_stdout()
        return EXIT_STDOUT_CLOSED
    except UsageError as exc:
        print(f"chmig {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except ChmigError as exc:
        print(f"chmig {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"chmig {args.command}: interrupted", file=sys.stderr)
        return 130
