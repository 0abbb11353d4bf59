"""``chmig walkthrough FLOW``: run a real migration and narrate every message as it passes.

Both ends run in this process — two :class:`~chmig.vmm.Vmm`\\ s, or a VMM and
the offload daemon — over real sockets, with a real KVM guest that verifies
its own memory and, for postcopy, real userfaultfd.  Nothing about the
protocol is re-told here: the narration is a :class:`~chmig.trace.Narrator`
registered on the message layer's observers, so it tells exactly the messages
that went over the wire, on every connection, as the source saw them; the
sentences come from :mod:`chmig.protocol`'s tables.  The VMMs' events
(Cloud Hypervisor's ``vm`` events: iterations, pause, resume) are shown among
the messages as notes.

``--step`` waits for Enter before each phase (the message that opens it waits
too, so a class can talk about it) and lengthens the protocol's timeouts so
the pause cannot fail the migration.  ``--mermaid FILE`` draws what happened;
``--trace FILE`` keeps every message of both ends (``chmig trace show``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import select
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from . import protocol as p
from .channel import MessageLog, Observers
from .errors import ChmigError, MigrationError, UsageError
from .events import EventMonitor
from .trace import Narrator, Phase, Style, TraceWriter, write_mermaid

#: Guest RAM of the walkthrough's VM unless ``--memory`` says otherwise: small, so a class does not wait.
DEFAULT_MEMORY = "64M"
#: The guest rewrites a tenth of its pages per round, so precopy has something to chase.
WORKLOAD = "verify,dirty_percent=10"
#: How long any one wait of the walkthrough may take before it gives up (a broken run must end, not hang).
WAIT_S = 120.0


# ---------------------------------------------------------------------------------------------
# Pausing for a class
# ---------------------------------------------------------------------------------------------


class Stepper:
    """``--step``: wait for Enter on standard input; a closed input, or :meth:`stop`, ends the waiting."""

    def __init__(self, enabled: bool, say: Callable[[str], None]) -> None:
        self.enabled = enabled
        self.say = say
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def wait(self, what: str) -> None:
        if not self.enabled:
            return
        self.say(f"   [press Enter: {what}]")
        try:
            stdin = sys.stdin.fileno()
        except (AttributeError, ValueError, OSError):
            self.enabled = False
            return
        while True:  # one line: up to a newline, or the end of the input
            ready, _, _ = select.select([stdin, self._wake_r], [], [])
            if self._wake_r in ready:
                self.enabled = False
                return
            byte = os.read(stdin, 1)
            if not byte:
                self.enabled = False  # no more input: run to the end
                return
            if byte == b"\n":
                return

    def stop(self) -> None:
        """Release a wait (Ctrl-C) and wait no more."""
        self.enabled = False
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)


#: ``--step``: a class may talk for a while at any phase; no timeout of the protocol may end the migration then.
STEP_LIMITS = dataclasses.replace(
    p.DEFAULT_LIMITS, **{name: 3600.0 for name in (
        "role_timeout_s", "fault_connection_wait_s", "fault_response_timeout_s", "workers_finish_s",
        "first_request_timeout_s", "stall_timeout_s", "response_timeout_s", "paused_response_timeout_s")})


# ---------------------------------------------------------------------------------------------
# One walkthrough
# ---------------------------------------------------------------------------------------------


class NarratedEvents(EventMonitor):
    """The null event monitor of one VMM, whose events also appear in the narration as notes."""

    def __init__(self, who: str, narrator: Narrator) -> None:
        super().__init__()
        self.who = who
        self.narrator = narrator
        #: Called once, on the thread that emits it, when an event of that name comes (then forgotten).
        self.once: dict[str, Callable[[], None]] = {}

    def emit(self, source: str, event: str, properties: Mapping[str, str] | None = None) -> None:
        super().emit(source, event, properties)
        shown = ", ".join(f"{key}={value}" for key, value in (properties or {}).items())
        self.narrator.note(f"{self.who}: event {source} {event}{f' ({shown})' if shown else ''}")
        action = self.once.pop(event, None)
        if action is not None:
            action()


class LoggedAsNotes(logging.Handler):
    """chmig's warnings and errors, told as notes among the messages instead of on stderr between them."""

    def __init__(self, narrator: Narrator) -> None:
        super().__init__(logging.WARNING)
        self.narrator = narrator

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"{record.levelname.lower()} on {record.threadName}: {record.getMessage()}"
            if record.exc_info:  # a bug's traceback: kept whole, on stderr, where it can be reported
                print(logging.Formatter().formatException(record.exc_info), file=sys.stderr, flush=True)
            if not self.narrator.note(text):  # the narration has ended (cleaning up): stderr, as usual
                print(text, file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 — logging must never break the walkthrough
            self.handleError(record)

    @classmethod
    @contextlib.contextmanager
    def installed(cls, narrator: Narrator) -> Iterator[None]:
        """Only at the default verbosity, on stderr: with ``-v`` or ``--log-file`` the log stays whole, where it
        was asked for."""
        logger, root = logging.getLogger("chmig"), logging.getLogger()
        if root.getEffectiveLevel() < logging.WARNING or any(isinstance(h, logging.FileHandler)
                                                              for h in root.handlers):
            yield
            return
        handler = cls(narrator)
        logger.addHandler(handler)
        propagate, logger.propagate = logger.propagate, False
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate


class Walk:
    """What one walkthrough runs on: the output, the narrator, the observers of both ends, what to clean up."""

    def __init__(self, args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
        from .vm import VmConfig  # here: `chmig --help` builds this module's parser without loading KVM

        self.stack = stack
        self.style = Style.for_stream(sys.stdout)
        self.memory = args.memory
        VmConfig.from_args("boot=1", f"size={self.memory}", [], WORKLOAD)  # a bad --memory fails before anything
        self.stepper = Stepper(args.step, self.say)
        stack.callback(self.stepper.close)
        self.limits = STEP_LIMITS if args.step else p.DEFAULT_LIMITS
        self.narrator = Narrator(lambda line: print(line, flush=True), style=self.style, on_phase=self._phase)
        #: Every message of both ends: the diagram is drawn from it (as the source saw them).
        self.log = MessageLog()
        self.observers = Observers(self.narrator, self.log)
        stack.enter_context(LoggedAsNotes.installed(self.narrator))
        if args.mermaid:  # a file that cannot be written is an error now, not after the migration
            try:
                with open(args.mermaid, "a"):
                    pass
            except OSError as exc:
                raise UsageError(f"cannot write {args.mermaid}: {exc.strerror}", where="--mermaid") from None
        if args.trace:
            writer = TraceWriter(args.trace)
            stack.callback(writer.close)
            self.observers.add(writer)
        self.tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chmig-walkthrough-")))

    # -- output ------------------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        """A line of the walkthrough's own, under the narrator's lock (migration threads tell messages meanwhile)."""
        self.narrator.say(text)

    def heading(self, text: str) -> None:
        self.narrator.finish()  # what was only counted is told before anything else
        self.narrator.say("")
        self.narrator.say(self.style.bold(f"== {text}"))

    def step(self, what: str) -> None:
        self.stepper.wait(what)

    def _phase(self, phase: Phase) -> None:
        self.stepper.wait(f"{phase.title} begins")

    # -- the ends ------------------------------------------------------------------------------------

    def vmm(self, who: str, narrated: bool = True) -> Any:
        """An empty VMM of this walkthrough (closed at the end); ``narrated``: its messages and events are told."""
        from .vmm import Vmm

        vmm = Vmm("off", NarratedEvents(who, self.narrator) if narrated else EventMonitor())
        vmm.limits = self.limits
        if narrated:
            vmm.observers = self.observers
        self.stack.callback(vmm.close)
        return vmm

    def boot(self, who: str = "source", shared: bool = False, narrated: bool = True) -> Any:
        """A VMM with the walkthrough's verify guest running, once the guest has done a round per vCPU."""
        from .vm import VmConfig

        vmm = self.vmm(who, narrated)
        memory = f"size={self.memory}" + (",shared=on" if shared else ",shared=off")
        vmm.boot(VmConfig.from_args("boot=1", memory, [], WORKLOAD))
        wait_guest(vmm, 1)
        return vmm

    def in_background(self, name: str, body: Callable[[], Any], stop: Callable[[], None]) -> Background:
        """Run ``body`` on a thread of its own (the other end); :meth:`Background.result` joins it."""
        from .threads import ThreadGroup

        background = Background(ThreadGroup(f"walkthrough-{name}"))
        background.threads.start(f"walkthrough-{name}", background.run, body, stopper=stop)
        self.stack.callback(lambda: background.threads.close(timeout=30))
        return background

    def receive(self, vmm: Any, url: str, memory_mode: str = "precopy") -> tuple[Background, str]:
        """``vmm`` receives one migration on ``url`` in the background; returns it and the address it listens on."""
        from .receive import ReceiveOptions

        options = ReceiveOptions(receiver_url=url, memory_mode=memory_mode)
        options.validate()
        listening: list[str] = []
        ready = threading.Event()

        def on_listening(address: str) -> None:
            listening.append(address)
            ready.set()

        background = self.in_background("receive", lambda: vmm.receive_migration(options, on_listening), vmm.close)
        background.wait_for(ready, "the destination to listen")
        return background, listening[0]

    def snapshot_daemon(self, directory: Path, narrated: bool) -> tuple[Background, str]:
        """The offload daemon takes one snapshot into ``directory``, in the background; returns it and its socket."""
        from .offload import SnapshotReceiver

        socket_path = str(self.tmp / "offload-snapshot.sock")
        daemon = SnapshotReceiver(socket_path, directory, observers=self.observers if narrated else None,
                                  limits=self.limits)
        ready = threading.Event()
        background = self.in_background("offload-snapshot", lambda: daemon.run(lambda _: ready.set()), daemon.stop)
        background.wait_for(ready, "the offload daemon to listen")
        return background, socket_path

    def take_snapshot(self, directory: Path, narrated: bool) -> tuple[Any, int]:
        """Boot a VM (shared memory) and snapshot it with the offload daemon; the daemon's result, the guest's
        rounds when the snapshot began."""
        source = self.boot(shared=True, narrated=narrated)
        daemon, socket_path = self.snapshot_daemon(directory, narrated)
        rounds = guest(source)["rounds"]
        source.send_migration({"destination_url": f"unix:{socket_path}", "local": True})
        return daemon.result(), rounds

    # -- the proof -------------------------------------------------------------------------------------

    def prove(self, destination: Any, rounds_before: int, when: str = "on the source when the migration began") -> bool:
        """The guest goes on where it was, with zero memory mismatches: the line that proves the migration."""
        arrived = guest(destination)["rounds"]
        after = wait_guest(destination, arrived + 2)
        ok = after["errors"] == 0 and after["rounds"] > arrived >= rounds_before
        self.heading("The proof")
        self.say(f"   the guest had done {rounds_before} rounds {when}; on the destination it "
                 f"arrived at {arrived} and went on to {after['rounds']}, checking every page of its memory "
                 f"each round: {after['errors']} errors")
        self.say(self.style.bold("walkthrough: the guest continued with zero memory mismatches" if ok else
                                 "walkthrough: FAILED: the guest did not continue intact"))
        return ok

    def statistics(self) -> None:
        """The migration is over: name its commands in order, then its statistics follow."""
        self.narrator.finish()
        self.say("")
        for line in self.narrator.command_summary():
            self.say(f"   {line}")
        self.heading("Statistics")

    def finish(self, mermaid: str | None) -> None:
        """Draw the diagram of what happened (also after a failure: it shows where)."""
        self.narrator.finish()
        self.narrator.close()
        if mermaid:
            write_mermaid(mermaid, self.log.messages)
            self.say(f"   Mermaid sequence diagram: {mermaid}")


@dataclass
class Background:
    """The other end of a walkthrough, on a thread of its own."""

    threads: Any
    value: Any = None
    error: BaseException | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    #: Events set when this end is over, so a wait for one of them also ends when the end failed.
    wakes: list[threading.Event] = dataclasses.field(default_factory=list)

    def run(self, body: Callable[[], Any]) -> None:
        try:
            self.value = body()
        except BaseException as exc:  # handed to the walkthrough by result()
            self.error = exc
        finally:
            self.done.set()
            for event in self.wakes:
                event.set()

    def wait_for(self, event: threading.Event, what: str) -> None:
        """Wait for ``event`` — or for this end to fail first, which then is the error."""
        self.wakes.append(event)
        if self.done.is_set():
            event.set()
        if not event.wait(WAIT_S):
            raise MigrationError(f"timed out waiting for {what}", where="walkthrough")
        if self.done.is_set():
            self.result()

    def result(self, timeout: float = WAIT_S) -> Any:
        if not self.done.wait(timeout):
            raise MigrationError(f"{self.threads.name} did not end within {timeout:g} s", where="walkthrough")
        self.threads.join(timeout=10)
        if self.error is not None:
            raise self.error
        return self.value


def guest(vmm: Any) -> dict:
    return vmm.info()["guest"]


def wait_guest(vmm: Any, rounds: int, timeout: float = WAIT_S) -> dict:
    """Until the guest has done ``rounds`` rounds.  It polls, as a person watching ``vm.info`` would: the guest's
    counters live in guest memory, and nothing signals their change."""
    deadline = time.monotonic() + timeout
    while True:
        info = vmm.info()
        if info.get("error"):
            raise MigrationError(f"the VM stopped: {info['error']}", where="walkthrough")
        if info["guest"]["rounds"] >= rounds:
            return info["guest"]
        if time.monotonic() > deadline:
            raise MigrationError(f"the guest did not reach {rounds} rounds within {timeout:g} s", where="walkthrough")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# The flows
# ---------------------------------------------------------------------------------------------


def _between_vmms(walk: Walk, joined_by: str, listen: str, options: dict[str, Any], *, shared: bool = False,
                  memory_mode: str = "precopy", after_first_iteration: Callable[[Any], None] | None = None,
                  before_send: Callable[[Any], None] | None = None) -> tuple[Any, Any, dict, int]:
    """Two VMMs of this process, a VM on the first; send it to the second with ``options`` (send-migration's,
    as the API takes them).  Returns both VMMs, the send's statistics and the guest's rounds when it began.
    ``after_first_iteration(source)`` runs on the migration's thread once precopy's first iteration is sent."""
    walk.heading(f"Setting up: two VMMs in this process, joined by {joined_by}")
    source = walk.boot(shared=shared)
    walk.say(f"   source: a VM with 1 vCPU and {walk.memory} of {'shared RAM (a memfd)' if shared else 'RAM'}; its "
             "guest checks all of its memory each round and rewrites a tenth of its pages")
    destination = walk.vmm("destination")
    receiving, url = walk.receive(destination, listen, memory_mode)
    walk.say(f"   destination: an empty VMM listening on {url}"
             + (", memory_mode=postcopy (userfaultfd on its RAM)" if memory_mode == "postcopy" else ""))
    if after_first_iteration is not None:
        source.events.once["migration-memory-iteration"] = lambda: after_first_iteration(source)
    if before_send is not None:
        before_send(source)
    walk.step("send the migration")
    rounds = guest(source)["rounds"]
    shown = "".join(f",{key}={'on' if value is True else str(value).lower()}" for key, value in options.items())
    walk.say(f"   send-migration destination_url={url}{shown}")
    stats = source.send_migration({"destination_url": url, **options})
    receiving.result()
    return source, destination, stats, rounds


def _precopy(walk: Walk) -> bool:
    from .demo import iteration_table

    source, destination, stats, rounds = _between_vmms(walk, "loopback TCP", "tcp:127.0.0.1:0", {"connections": 2})
    walk.statistics()
    for line in iteration_table(stats["iterations"]):
        walk.say(line)
    walk.say(f"   {source.migration.summary()}")
    walk.say(f"   {destination.migration.summary()}")
    return walk.prove(destination, rounds)


def _local(walk: Walk) -> bool:
    source, destination, _, rounds = _between_vmms(walk, "a UNIX socket", f"unix:{walk.tmp / 'migrate.sock'}",
                                                   {"local": True}, shared=True)
    walk.statistics()
    walk.say(f"   {source.migration.summary()}")
    walk.say(f"   {destination.migration.summary()}")
    return walk.prove(destination, rounds)


def _postcopy(walk: Walk, options: dict[str, Any] | None = None,
              after_first_iteration: Callable[[Any], None] | None = None,
              before_send: Callable[[Any], None] | None = None) -> bool:
    """Postcopy (or, with ``options``, a hybrid migration) to a destination that receives by postcopy."""
    source, destination, _, rounds = _between_vmms(walk, "loopback TCP", "tcp:127.0.0.1:0",
                                                   options or {"memory_mode": "Postcopy"}, memory_mode="postcopy",
                                                   after_first_iteration=after_first_iteration,
                                                   before_send=before_send)
    pager = destination.postcopy
    if pager is not None and not pager.done.wait(WAIT_S):
        raise MigrationError("postcopy did not bring every page in", where="walkthrough")
    walk.statistics()
    walk.say(f"   {source.migration.summary()}")
    walk.say(f"   {destination.migration.summary()}")
    return walk.prove(destination, rounds)


def _hybrid(walk: Walk) -> bool:
    def operator_switches(source: Any) -> None:
        walk.narrator.note("operator: vm.migration-start-postcopy (chmig remote migration-start-postcopy): switch "
                           "after this iteration, converged or not")
        source.start_postcopy()

    return _postcopy(walk, {"memory_mode": "Hybrid"}, after_first_iteration=operator_switches)


def _recovery(walk: Walk) -> bool:
    """Postcopy that agreed a token at Start (postcopy_recovery_s: protocol version 1); the link breaks after a
    few pages, and the source reconnects with FaultRecovery connections that prove the token."""
    cut = threading.Event()
    sources: list[Any] = []

    def break_the_link(message: Any) -> None:
        # On the thread that just read a PageFault on the source (before it answers): every Fault connection
        # is shut down at once.  The answer then fails on the source, and the destination's wait for it ends
        # with the connection: both sides see the break, as when a link goes down.
        if (cut.is_set() or not sources or message.side != p.Side.SOURCE.value or message.name != "PageFault"
                or not message.connection.startswith("fault-")):
            return
        server = sources[0].sender.fault_server if sources[0].sender is not None else None
        if server is None or server.stats.pages_served < 32:
            return
        cut.set()
        walk.narrator.note("the link breaks: the walkthrough shuts every Fault connection down")
        for channel in list(server.channels):
            channel.conn.shutdown()

    walk.observers.add(break_the_link)
    return _postcopy(walk, {"memory_mode": "Postcopy", "postcopy_recovery_s": 30}, before_send=sources.append)


def _offload_snapshot(walk: Walk) -> bool:
    from .snapshot_dir import verify_directory

    walk.heading("Setting up: a VMM and the offload daemon (chmig offload snapshot) in this process")
    directory = walk.tmp / "snapshot"
    walk.say(f"   the daemon listens on a UNIX socket and will write the snapshot to {directory.name}/; the VMM "
             f"runs a VM with {walk.memory} of shared RAM")
    walk.say("   send-migration destination_url=unix:offload-snapshot.sock,local=on")
    result, rounds = walk.take_snapshot(directory, narrated=True)
    walk.statistics()
    walk.say(f"   offload daemon: {result.summary()}")
    walk.say(f"   files: {', '.join(sorted(entry.name for entry in directory.iterdir()))}")
    for line in verify_directory(directory):
        walk.say(f"   verified: {line}")
    walk.step("restore the snapshot, to see that the guest goes on")
    walk.say("   restoring it (not narrated: see `chmig walkthrough offload-restore`) ...")
    destination = walk.vmm("restored", narrated=False)
    from .offload import RestoreSender

    receiving, _ = walk.receive(destination, f"unix:{walk.tmp / 'restore.sock'}")
    RestoreSender(walk.tmp / "restore.sock", directory, resume=True).run()
    receiving.result()
    return walk.prove(destination, rounds, when="when its snapshot began")


def _offload_restore(walk: Walk) -> bool:
    from .offload import RestoreSender

    walk.heading("Setting up: a snapshot to restore")
    directory = walk.tmp / "snapshot"
    _, rounds = walk.take_snapshot(directory, narrated=False)
    walk.say(f"   a VM with {walk.memory} of shared RAM was snapshotted by the offload daemon into "
             f"{directory.name}/ (see `chmig walkthrough offload-snapshot`)")
    walk.say("   now the daemon is the source (chmig offload restore --ondemand --resume) and an empty VMM "
             "receives (receive-migration memory_mode=postcopy): the memfds cross empty, and every page is "
             "written into them when the VMM asks for it")
    destination = walk.vmm("destination")
    socket_path = walk.tmp / "restore.sock"
    receiving, _ = walk.receive(destination, f"unix:{socket_path}", memory_mode="postcopy")
    walk.step("start the restore")
    daemon = RestoreSender(socket_path, directory, resume=True, ondemand=True, observers=walk.observers,
                           limits=walk.limits)
    result = daemon.run()
    receiving.result()
    walk.statistics()
    walk.say(f"   offload daemon: {result.summary()}")
    walk.say(f"   {destination.migration.summary()}")
    return walk.prove(destination, rounds, when="when its snapshot began")


@dataclass(frozen=True)
class Flow:
    """One walkthrough: what it shows, and how to run it."""

    title: str
    run: Callable[[Walk], bool]


FLOWS: dict[str, Flow] = {
    "precopy": Flow("Live migration by precopy over TCP, with two memory connections", _precopy),
    "local": Flow("Local migration: the memory crosses as memfds over a UNIX socket, nothing is copied", _local),
    "postcopy": Flow("Live migration by postcopy: the VM runs on the destination at once, its pages follow",
                     _postcopy),
    "offload-snapshot": Flow("Snapshot: a VMM migrates its VM locally to the offload daemon, which writes it out",
                             _offload_snapshot),
    "offload-restore": Flow("On-demand restore: the offload daemon sends a snapshot back, page by page as the VM "
                            "touches it", _offload_restore),
    "hybrid": Flow("Hybrid: precopy first, then (an operator asks) the switch to postcopy: protocol version 1, "
                   "Discard", _hybrid),
    "recovery": Flow("Postcopy recovery: the link breaks mid-postcopy, the source reconnects with the migration's "
                     "token (protocol version 1, FaultRecovery), the pull resumes", _recovery),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("flow", choices=list(FLOWS), metavar="FLOW",
                        help="|".join(FLOWS) + ": which migration to run and narrate")
    parser.add_argument("--mermaid", metavar="FILE", help="write a Mermaid sequence diagram of what happened")
    parser.add_argument("--step", action="store_true",
                        help="wait for Enter before each phase (for a class; the protocol's timeouts are "
                             "lengthened meanwhile)")
    parser.add_argument("--memory", default=DEFAULT_MEMORY, metavar="SIZE",
                        help=f"guest RAM of the walkthrough's VM (default {DEFAULT_MEMORY})")
    parser.add_argument("--trace", metavar="FILE", help="also write every message of both ends to a trace file "
                                                       "(chmig trace show FILE)")


@contextlib.contextmanager
def _interrupt_releases(stepper_of: Callable[[], Stepper | None]) -> Iterator[None]:
    """Ctrl-C must end a ``--step`` wait too (it blocks a migration thread, not this one)."""
    previous = signal.getsignal(signal.SIGINT)

    def interrupted(signum: int, frame: Any) -> None:
        stepper = stepper_of()
        if stepper is not None:
            stepper.stop()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main_walkthrough(args: argparse.Namespace) -> int:
    """``chmig walkthrough FLOW``: 0 when the guest continued intact, 1 when it did not."""
    flow = FLOWS[args.flow]
    walk: Walk | None = None
    with _interrupt_releases(lambda: walk.stepper if walk is not None else None), contextlib.ExitStack() as stack:
        walk = Walk(args, stack)
        walk.say(walk.style.bold(f"chmig walkthrough {args.flow}: {flow.title}"))
        walk.say("   Every message below went over a real socket; each is shown once, as the source saw it: time, "
                 "sender → receiver, connection, command or status, the header's bytes (u16 | 6 bytes | u64), "
                 "what it carried, and what it is for.")
        try:
            ok = flow.run(walk)
        except BaseException:
            with contextlib.suppress(ChmigError):  # the migration's error is the one to report
                walk.finish(args.mermaid)
            raise
        walk.finish(args.mermaid)
        return 0 if ok else 1


__all__ = ["FLOWS", "add_arguments", "main_walkthrough"]
