"""``chmig remote``: Cloud Hypervisor's ``ch-remote`` for a chmig VMM.

One sub-command per verb, in ``ch-remote``'s names, order and ``about``
texts, each verb's argument documented by Cloud Hypervisor's syntax string;
:data:`VERBS` is the one table both the parser and the dispatch are built
from.  Only the verbs chmig serves are offered, plus chmig's own
``cancel-migration`` and ``migration-start-postcopy`` (``ch-remote`` has neither).  Bodies are built by
:mod:`chmig.apiconfig`, so they are the bytes ``ch-remote`` sends.

``send-migration`` and ``receive-migration`` answer only when the migration
has ended, so while such a request blocks, a watcher thread asks the VMM on a
second connection how it goes: for a send, a progress line from
``vm.info``'s ``migration.progress`` (rewritten in place on a terminal, a
plain line per iteration or phase otherwise); for a receive, one line once
``vmm.ping`` shows it listening, so a script can start the sender then.
``--quiet`` turns both off.  Nothing of this goes to standard output, which
carries only the answer's JSON.

``--trace FILE`` on both (chmig's own flag, not ``ch-remote``'s): FILE is made
absolute here and sent as the body's ``trace`` field; the VMM, which sees the
messages, writes them there as they pass (:mod:`chmig.trace`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, TextIO

from . import __version__, apiconfig
from .apiclient import ApiError, request
from .threads import ThreadGroup
from .units import MiB

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verb:
    """One ``chmig remote`` verb: its sub-command and the API call it makes."""

    name: str
    #: ``ch-remote``'s ``about`` text for the verb (the sub-command's help).
    about: str
    method: str
    action: str
    #: ``ch-remote``'s name for the verb's one argument (None: it takes none), and its help: CH's syntax string.
    argument: str | None = None
    syntax: str = ""
    #: Builds the request body from the argument, as ``ch-remote`` does.
    body: Callable[[str], dict] | None = None
    #: What to watch while the request blocks (:data:`WATCHERS`), unless ``--quiet``.
    watch: str | None = None
    #: Takes ``--trace FILE`` (the body's ``trace`` field: the VMM writes the migration's messages to FILE).
    trace: bool = False


#: ``ch-remote``'s verbs that chmig serves, sorted as ``ch-remote --help`` lists them, and chmig's own
#: ``cancel-migration`` and ``migration-start-postcopy``.
VERBS: tuple[Verb, ...] = (
    Verb("boot", "Boot a created VM", "PUT", "vm.boot"),
    Verb("cancel-migration", "Cancel the migration in progress (chmig's own verb: Cloud Hypervisor's "
                             "ch-remote has no such verb)", "PUT", "vm.cancel-migration"),
    Verb("delete", "Delete a VM", "PUT", "vm.delete"),
    Verb("info", "Info on the VM", "GET", "vm.info"),
    Verb("migration-start-postcopy", "Switch the hybrid migration in progress to postcopy after the iteration in flight (chmig's own "
                                     "verb, after QEMU's migrate-start-postcopy)", "PUT",
         "vm.migration-start-postcopy"),
    Verb("pause", "Pause the VM", "PUT", "vm.pause"),
    Verb("ping", "Ping the VMM to check for API server availability", "GET", "vmm.ping"),
    Verb("receive-migration", "Receive a VM migration", "PUT", "vm.receive-migration",
         "receive_migration_config", apiconfig.RECEIVE_MIGRATION_SYNTAX, apiconfig.receive_migration_body,
         watch="receive", trace=True),
    Verb("restore", "Restore VM from a snapshot", "PUT", "vm.restore",
         "restore_config", apiconfig.RESTORE_SYNTAX, apiconfig.restore_body),
    Verb("resume", "Resume the VM", "PUT", "vm.resume"),
    Verb("send-migration", "Initiate a VM migration", "PUT", "vm.send-migration",
         "send_migration_config", apiconfig.SEND_MIGRATION_SYNTAX, apiconfig.send_migration_body,
         watch="send", trace=True),
    Verb("shutdown", "Shutdown the VM", "PUT", "vm.shutdown"),
    Verb("shutdown-vmm", "Shutdown the VMM", "PUT", "vmm.shutdown"),
    Verb("snapshot", "Create a snapshot from VM", "PUT", "vm.snapshot",
         "snapshot_config", apiconfig.SNAPSHOT_SYNTAX, apiconfig.snapshot_body),
)
VERBS_BY_NAME: dict[str, Verb] = {verb.name: verb for verb in VERBS}

TRACE_HELP = ("chmig: the VMM writes every message of this migration to FILE as it passes, one JSON object a "
              "line (a relative FILE is resolved against the current directory); read it with "
              "`chmig trace show FILE [--mermaid OUT]`")


def add_arguments(remote: argparse.ArgumentParser) -> None:
    """``chmig remote``'s options and one sub-command per verb of :data:`VERBS`."""
    remote.add_argument("-V", "--version", action="version", version=f"chmig {__version__}",
                        help="print the version and exit")
    remote.add_argument("--api-socket", required=True, metavar="PATH",
                        help="HTTP API socket path (UNIX domain socket).")
    remote.add_argument("-q", "--quiet", action="store_true",
                        help="no progress line for send-migration, no 'listening on' line for receive-migration")
    verbs = remote.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in VERBS:
        sub = verbs.add_parser(verb.name, help=verb.about, description=verb.about)
        if verb.argument is not None:
            # argparse %-formats help strings; a syntax string is text to show as it is.
            sub.add_argument("config", metavar=verb.argument, help=verb.syntax.replace("%", "%%"))
        if verb.watch is not None:
            sub.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help=WATCHERS[verb.watch].QUIET_HELP)
        if verb.trace:
            sub.add_argument("--trace", metavar="FILE", help=TRACE_HELP)


def main_remote(args: argparse.Namespace) -> int:
    """``chmig remote --api-socket PATH VERB [ARGUMENT]``: one API call; its answer's JSON on standard output."""
    verb = VERBS_BY_NAME[args.verb]
    body = verb.body(args.config) if verb.body is not None else None  # bad options: a UsageError, exit 2
    if body is not None and getattr(args, "trace", None):
        body["trace"] = os.path.abspath(args.trace)  # the VMM opens it: a path relative to here means nothing there
    if verb.watch is not None and not args.quiet:
        with WATCHERS[verb.watch](args.api_socket, sys.stderr):
            result = request(args.api_socket, verb.method, verb.action, body)
    else:
        result = request(args.api_socket, verb.method, verb.action, body)
    if result is not None:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------------------------------
# Watching a migration while its request blocks
# ---------------------------------------------------------------------------------------------


class Watcher:
    """A named thread that asks the VMM, on connections of its own, how the blocking request goes.

    Used as a context manager around the request: entering starts the thread,
    leaving (the answer came, or failed, or Ctrl-C) stops it through its event
    and joins it.  The event is also its timer, so it never sleeps past a stop.
    A failed look (the VMM busy, the VM already gone) is skipped, not shown:
    the request's own answer is what reports the outcome.
    """

    #: Seconds between looks.
    INTERVAL = 0.5
    #: How long one look may take (it bounds how long leaving waits for the thread).
    LOOK_TIMEOUT = 2.0
    QUIET_HELP = ""
    NAME = "remote-watch"

    def __init__(self, api_socket: str, out: TextIO) -> None:
        self.api_socket = api_socket
        self.out = out
        self.stop = threading.Event()
        self.threads = ThreadGroup(self.NAME)

    def __enter__(self) -> Watcher:
        self.threads.start(self.NAME, self._run, stopper=self.stop.set)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.threads.close(timeout=self.LOOK_TIMEOUT + 5)
        self.finish()

    def _run(self) -> None:
        while not self.stop.wait(self.INTERVAL):
            try:
                done = self.look()
            except ApiError as exc:
                log.debug("%s: %s", self.NAME, exc)
                continue
            except Exception as exc:  # an answer of a shape not foreseen: stop watching, the request goes on
                log.warning("%s: stopped watching: %r", self.NAME, exc)
                return
            if done:
                return

    def get(self, action: str) -> dict:
        """One ``GET`` on a connection of its own; an answer that is not an object reads as empty."""
        answer = request(self.api_socket, "GET", action, timeout=self.LOOK_TIMEOUT)
        return answer if isinstance(answer, dict) else {}

    def look(self) -> bool:
        """One look at the VMM; True when there is nothing more to watch."""
        raise NotImplementedError

    def finish(self) -> None:
        """After the thread ended: leave the output tidy."""


class SendProgress(Watcher):
    """``send-migration``'s progress line, from ``vm.info``'s ``migration`` while it runs.

    On a terminal one line, rewritten in place and cleared at the end (the
    answer's JSON follows on standard output).  Elsewhere (a log, a pipe) a
    plain line whenever the iteration or phase changed, at most one every
    :data:`PLAIN_EVERY` seconds so a fast migration does not flood the log.
    """

    PLAIN_EVERY = 2.0
    QUIET_HELP = "no progress line on standard error"
    NAME = "remote-progress"

    def __init__(self, api_socket: str, out: TextIO) -> None:
        super().__init__(api_socket, out)
        self.tty = out.isatty()
        self._shown = False
        self._last_key: tuple[str, int] | None = None
        self._last_plain = float("-inf")

    def look(self) -> bool:
        migration = self.get("vm.info").get("migration")
        if not isinstance(migration, dict) or migration.get("status") != "running":
            return False  # not started yet, or the last one's statistics: nothing of this send to show
        line = progress_line(migration)
        if line is None:
            return False
        key, text = line
        if self.tty:
            self.out.write(f"\r{text}\x1b[K")
            self.out.flush()
            self._shown = True
        elif key != self._last_key and time.monotonic() - self._last_plain >= self.PLAIN_EVERY:
            self.out.write(f"{text}\n")
            self.out.flush()
            self._last_key = key
            self._last_plain = time.monotonic()
        return False

    def finish(self) -> None:
        if self._shown:  # the line was for while it ran: the answer says how it ended
            self.out.write("\r\x1b[K")
            self.out.flush()


def progress_line(migration: dict) -> tuple[tuple[str, int], str] | None:
    """``migration`` (``vm.info``'s) → ``((phase, iteration), line)``; None when there is nothing to show yet.

    From ``progress`` (the iteration in flight) when the VMM reports it, else
    from the last finished entry of ``iterations``.
    """
    progress = migration.get("progress")
    if isinstance(progress, dict):
        phase = str(progress.get("phase", "precopy"))
        number = int(progress.get("iteration") or 0)
        sent, size = progress.get("iteration_sent") or 0, progress.get("iteration_bytes") or 0
        bandwidth, dirty = progress.get("bandwidth_mib_s"), progress.get("dirty_rate_mib_s")
        downtime = progress.get("estimated_downtime_ms")
    else:
        iterations = migration.get("iterations") or []
        if not iterations or not isinstance(iterations[-1], dict):
            return None
        last = iterations[-1]
        phase = "final" if last.get("final") else str(migration.get("mode") or "precopy")
        number = int(last.get("iteration") or 0)
        sent = size = last.get("bytes") or 0
        bandwidth, dirty = last.get("bandwidth_mib_s"), last.get("dirty_rate_mib_s")
        downtime = last.get("estimated_downtime_ms")
    if phase in ("precopy", "final", "local") or size:
        parts = [f"chmig remote: {phase} iteration {number}: {sent / MiB:.1f}/{size / MiB:.1f} MiB"]
    else:  # State and Complete, postcopy: no iteration of memory to count
        parts = [f"chmig remote: {phase}"]
    if bandwidth:
        parts.append(f"{bandwidth:.0f} MiB/s")
    if dirty:
        parts.append(f"dirty {dirty:.0f} MiB/s")
    if downtime is not None:
        parts.append(f"estimated downtime {downtime:.0f} ms")
    return (phase, number), ", ".join(parts)


class ListeningNotice(Watcher):
    """``receive-migration``: one line, ``chmig remote: listening on ADDRESS``, once the VMM listens.

    ``vmm.ping`` shows ``migration: {kind, state, address}`` while a receive
    runs.  A script reads the line and starts the sender; so this looks more
    often than the progress does (a ping is cheap) and stops once it spoke.
    """

    INTERVAL = 0.1
    QUIET_HELP = "no 'listening on ADDRESS' line on standard error"
    NAME = "remote-listening"

    def look(self) -> bool:
        migration = self.get("vmm.ping").get("migration")
        if not isinstance(migration, dict) or migration.get("kind") != "receive-migration":
            return False
        if migration.get("state") not in ("listening", "receiving") or not migration.get("address"):
            return False
        self.out.write(f"chmig remote: listening on {migration['address']}\n")
        self.out.flush()
        return True


WATCHERS: dict[str, type[Watcher]] = {"send": SendProgress, "receive": ListeningNotice}
