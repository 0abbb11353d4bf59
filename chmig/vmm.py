"""The VMM process: owns at most one VM and one migration, serves the API, decides when to exit.

``chmig run`` with VM options boots a VM; with only ``--api-socket`` it starts
an empty VMM (as ``cloud-hypervisor --api-socket`` does) that waits for a
``vm.receive-migration``; ``chmig receive`` is an empty VMM that receives one
migration at once.  The main thread only waits for the exit event; the vCPUs,
the API server and the migration run in their own named threads.

The VMM owns its migration (:class:`MigrationTask`): at most one at a time,
on a thread of its own named after it, shown by ``vm.info`` while it runs (a
send; a receive has no VM to show yet), cancelled by ``vm.cancel-migration``,
and cancelled (then joined) when the VMM shuts down.  The API request that
started it only waits for its outcome, as ``ch-remote`` waits.  This module
drives :mod:`chmig.send` and :mod:`chmig.receive`; they never call back here.

Snapshot and restore (:mod:`chmig.snapshot`, Cloud Hypervisor's ``file://``
ones): ``vm.snapshot`` writes the paused VM while holding the VMM's lock (so
nothing resumes it meanwhile); ``vm.restore`` (or ``chmig run --restore``)
runs as a task like a receive, on an empty VMM, and adopts the VM it built.
An on-demand restore leaves a pager bringing the RAM in from the snapshot,
owned here as a postcopy receive's is.

Events (``--event-monitor``, :mod:`chmig.events`): the VMM reports Cloud
Hypervisor's events at the points where Cloud Hypervisor reports them —
``vmm starting`` first and ``vmm shutdown`` last (after ``vm shutdown`` and
``vm deleted`` for a VM it still has, as CH's ``vmm_shutdown`` deletes it);
``vm booting/booted``, ``pausing/paused``, ``resuming/resumed``,
``shutdown``, ``deleted``, ``snapshotting/snapshotted``,
``restoring/restored`` from the actions; ``migration-started``,
``-finished``, ``-failed`` around a send, and
``migration-receive-ready`` (listening), ``-started``, ``-finished``,
``-failed`` around a receive.  The sender and the receiver report the events
inside a migration (each ``migration-memory-iteration``, the pause, the
restore and resume on the destination, ``postcopy-migration-completed``)
through a hook they are given, so they stay free of the VMM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .api import ApiServer

from . import __version__
from . import protocol as p
from .channel import Observers
from .errors import (ChmigError, MigrationError, NoVmError, PostcopyError, StuckThreadError, TransportError,
                     UsageError, VmError)
from .events import EventMonitor
from .memory import GuestMemory
from .postcopy import PostcopyPager
from .receive import ReceiveOptions, Receiver
from .send import SendOptions, Sender, new_stats, send_migration
from .snapshot_dir import SnapshotError
from .stats import MigrationStats
from .threads import ThreadGroup
from .transport import listen, parse_url
from .vm import Serial, Vm, VmConfig, VmState

if TYPE_CHECKING:
    from .snapshot import RestoreConfig, RestoreStats
    from .trace import TraceWriter

log = logging.getLogger(__name__)


class MigrationTask:
    """One migration, run by the VMM on its own named thread; callers wait for its outcome."""

    def __init__(self, kind: str, run: Callable[[], Any], cancel: Callable[[], None]) -> None:
        self.kind = kind
        self._run = run
        self._cancel = cancel
        self.threads = ThreadGroup(kind)
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self._done_lock = threading.Lock()
        self._on_done: list[Callable[[], None]] = []

    def start(self) -> None:
        try:
            self.threads.start(f"migration-{self.kind}", self._body, stopper=self._cancel)
        except RuntimeError:  # cancelled before it could start
            self.error = MigrationError(f"the {self.kind} was cancelled before it started", where=self.kind)
            self.done.set()

    def _body(self) -> None:
        try:
            self.result = self._run()
        except BaseException as exc:  # handed to whoever waits (the API request, chmig receive)
            self.error = exc
        finally:
            with self._done_lock:
                self.done.set()
                callbacks, self._on_done = self._on_done, []
            for callback in callbacks:
                callback()

    def on_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the migration has ended (at once if it has)."""
        with self._done_lock:
            if not self.done.is_set():
                self._on_done.append(callback)
                return
        callback()

    def wait(self) -> Any:
        """Block until the migration ended; return its result or raise its error."""
        self.done.wait()
        self.threads.join(timeout=10)
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self, timeout: float = 45.0) -> None:
        """Stop the migration (its connections are shut) and join its thread by ``timeout``."""
        self.threads.close(timeout)


class Vmm:
    """One VMM: its VM (or none), the migration in progress, and the process's exit."""

    def __init__(self, serial_spec: str = "null", events: EventMonitor | None = None) -> None:
        self.serial_spec = serial_spec
        #: Where Cloud Hypervisor's events go (``--event-monitor``); the null monitor only logs them.
        self.events = events if events is not None else EventMonitor()
        #: While a receive runs, for ``vmm.ping``: its state (``listening``, ``receiving``) and address.
        self.receiving: dict[str, str] | None = None
        self._shutdown_reported = False
        self.vm: Vm | None = None
        #: The configuration of the VM last booted here: after ``vm.shutdown`` the VM is "Created" again
        #: (Cloud Hypervisor keeps its config), ``vm.boot`` boots it anew and ``vm.delete`` forgets it.
        self.vm_config: VmConfig | None = None
        self.lock = threading.RLock()
        self.exit_event = threading.Event()
        self.exit_code = 0
        #: Statistics of the last migration (sent or received), for vm.info.
        self.migration: MigrationStats | None = None
        #: The migration in progress, if any (one at a time).
        self.task: MigrationTask | None = None
        #: Every migration's messages go to these observers (traces, walkthroughs).
        self.observers = Observers()
        #: The protocol's limits for this VMM's migrations (the walkthrough's ``--step`` lengthens the timeouts).
        self.limits = p.DEFAULT_LIMITS
        #: The thread whose API request ends the process once its reply is out (``vmm.shutdown``, or the
        #: send-migration that handed the VM over); only that request's end may set the exit event, or a
        #: ``vm.info`` finishing first would end the process before the migration's answer is written.
        self.exit_after_reply: int | None = None
        #: Without an API there is nobody to ask what happened: a failed VM ends the process.
        self.exit_on_vm_failure = False
        #: Postcopy still bringing the received VM's memory in (see :meth:`_watch_postcopy`).
        self.postcopy: PostcopyPager | None = None
        self.postcopy_threads = ThreadGroup("postcopy-owner")
        #: ``chmig receive --exit-after-migration``: end the process once the VM is whole.
        self.exit_when_whole = False
        #: Why the process ends non-zero, when that is an error the CLI should print (postcopy failed).
        self.exit_error: ChmigError | None = None
        #: The outgoing migration in progress (its postcopy serving is stopped if the VMM exits).
        self.sender: Sender | None = None
        #: Set by a second exit signal, or when the migration ends: the VMM may exit although postcopy serves.
        self.force_exit = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    def boot(self, config: VmConfig) -> Vm:
        """Create, boot and start a fresh VM."""
        with self.lock:
            if self.vm is not None and self.vm.state != VmState.SHUTDOWN:
                raise VmError("a VM already exists")
            self.events.emit("vm", "booting")
            serial = Serial(self.serial_spec)
            try:
                memory = GuestMemory.create(config.zones)
            except BaseException:
                serial.close()
                raise
            vm = Vm(config, memory, serial)
            vm.on_stop = self._vm_failed
            vm.boot()
            vm.start()
            self.vm = vm
            self.vm_config = config
            self.events.emit("vm", "booted")
            log.info("VM booted: %d vCPUs, %d MiB, workload %s", config.cpus, vm.memory.total_size >> 20,
                     config.workload.kind)
            return vm

    def adopt(self, vm: Vm) -> None:
        """Take over a VM built by an incoming migration."""
        with self.lock:
            vm.on_stop = self._vm_failed
            self.vm = vm
            self.vm_config = vm.config

    def _vm_failed(self, vm: Vm) -> None:
        log.error("the VM stopped: %s", vm.failure)
        if self.exit_on_vm_failure:
            self.exit_code = 1
            self.exit_event.set()

    def require_vm(self) -> Vm:
        """The VM an action works on; without one, Cloud Hypervisor's ``VmNotRunning`` (a 500, as there)."""
        if self.vm is None:
            raise VmError("VM is not running" if self.vm_config is None else
                          "VM is not running (it was shut down: vm.boot starts it again)")
        return self.vm

    def _require_idle(self, what: str) -> None:
        if self.task is not None:
            raise VmError(f"cannot {what}: a {self.task.kind} is in progress")

    # -- API actions -----------------------------------------------------------------------------

    def ping(self) -> dict:
        """Cloud Hypervisor's ``VmmPingResponse``; while a receive runs, also its state (a chmig extension: so
        ``remote receive-migration`` and scripts can tell that it listens, and where)."""
        answer: dict = {"build_version": f"chmig {__version__}", "version": __version__, "pid": os.getpid(),
                        "features": ["kvm"]}
        receiving = self.receiving
        if receiving is not None:
            answer["migration"] = dict(receiving)
        return answer

    def info(self) -> dict:
        if self.vm is None and self.vm_config is not None:  # shut down: Cloud Hypervisor shows it "Created"
            info: dict = {"state": VmState.CREATED, "config": self.vm_config.to_json()}
            if self.migration is not None:
                info["migration"] = self.migration.to_json()
            return info
        if self.vm is None:
            raise NoVmError("VM is not created")  # Cloud Hypervisor's VmNotCreated: 404
        vm = self.vm
        info = vm.info()
        if self.migration is not None:
            info["migration"] = self.migration.to_json()
        task = self.task
        if task is not None:
            info["migration_in_progress"] = task.kind
        return info

    def pause(self) -> None:
        with self.lock:
            self._require_idle("pause")
            vm = self.require_vm()
            self.events.emit("vm", "pausing")
            vm.pause()
            self.events.emit("vm", "paused")

    def resume(self) -> None:
        with self.lock:
            self._require_idle("resume")
            vm = self.require_vm()
            self.events.emit("vm", "resuming")
            vm.resume()
            self.events.emit("vm", "resumed")

    def shutdown_vm(self) -> None:
        with self.lock:
            self._require_idle("shut down")
            self.require_vm()
            self._stop_postcopy()  # its threads write into the RAM that is about to go
            self.postcopy = None  # the next VM is not bound by this one's pages
            self._drop_vm()
            self.events.emit("vm", "shutdown")

    def boot_created(self) -> None:
        """``vm.boot``: boot the VM that was shut down again, from its configuration."""
        with self.lock:
            self._require_idle("boot")
            if self.vm is not None:
                raise VmError("VM is already created")  # Cloud Hypervisor's VmAlreadyCreated
            if self.vm_config is None:  # Cloud Hypervisor's VmMissingConfig: 404
                raise NoVmError("VM config is missing (chmig creates its VM from the command line: chmig run "
                                "--cpus ... --memory ...)")
            self.boot(self.vm_config)

    def delete(self) -> None:
        """``vm.delete``: shut the VM down if it runs and forget its configuration."""
        with self.lock:
            self._require_idle("delete the VM")
            if self.vm_config is None and self.vm is None:
                return  # Cloud Hypervisor: nothing to delete is not an error (and no event)
            if self.vm is not None:
                self.shutdown_vm()
            self.vm_config = None
            self.events.emit("vm", "deleted")

    def shutdown_vmm(self) -> None:
        self.exit_after_reply = threading.get_ident()

    def retire_vm(self) -> None:
        """The VM now lives elsewhere: drop it here, and end the process once the API has replied."""
        with self.lock:
            self.exit_after_reply = threading.get_ident()  # the send-migration request's thread
            self._drop_vm()

    def _run_task(self, task: MigrationTask, on_success: Callable[[Any], None]) -> Any:
        """Run ``task`` (already registered as ``self.task``) and wait for it.

        ``on_success`` hands the VM over (retire it here, or adopt the one that
        arrived) under the lock *before* the task is cleared, so no pause,
        resume or second migration can slip in between.
        """
        try:
            task.start()
            result = task.wait()
            with self.lock:
                on_success(result)
            return result
        except BaseException as exc:
            if not task.done.is_set():  # the waiter was interrupted (Ctrl-C): stop the migration too
                task.cancel()
            if self.migration is not None and self.migration.status == "running":
                self.migration.finish("cancelled" if isinstance(exc, MigrationError) else "failed", str(exc))
            raise
        finally:
            with self.lock:
                if self.task is task:
                    self.task = None

    def _require_whole(self, what: str) -> None:
        """Refuse what would read all of guest RAM while postcopy has not brought all of it in."""
        pager = self.postcopy
        if pager is not None and pager.stats.status != "whole":
            raise VmError(f"cannot {what}: the VM is not whole (postcopy {pager.stats.status}, "
                          f"{pager.present.missing} pages not brought in yet)")

    def send_migration(self, body: dict) -> dict:
        """Run an outgoing migration; answer its statistics (Cloud Hypervisor answers 204, no body)."""
        options = SendOptions.from_api(body)
        with self.lock:
            self._require_idle("send a migration")
            self._require_whole("send a migration")
            vm = self.require_vm()
            if vm.state not in (VmState.RUNNING, VmState.PAUSED):
                raise VmError(f"cannot migrate a VM that is {vm.state}")
            trace = self._start_trace(options.trace)  # a file that cannot be written: a UsageError, 400
            try:
                sender = Sender(vm, options, new_stats(options), self.observers, self.limits, on_event=self._vm_event)
                self.sender = sender
                self.migration = sender.stats
                self.task = task = MigrationTask("send-migration", lambda: self._send(sender), sender.cancel)
            except BaseException:
                self._end_trace(trace)
                raise

        def hand_over(stats: MigrationStats) -> None:
            if not options.preserve_source:
                self.retire_vm()

        try:
            # The send ends when the destination has everything (after postcopy: every page), so its trace too.
            return self._run_task(task, hand_over).to_json()
        finally:
            self._end_trace(trace)

    def _start_trace(self, path: str | None) -> TraceWriter | None:
        """``trace``: open the file (a UsageError if it cannot be written) and observe the messages into it."""
        if path is None:
            return None
        from .trace import TraceWriter

        writer = TraceWriter(path)
        self.observers.add(writer)
        return writer

    def _end_trace(self, writer: TraceWriter | None) -> None:
        if writer is not None:
            self.observers.remove(writer)
            writer.close()

    def _trace_until_done(self, pager: PostcopyPager, writer: TraceWriter) -> None:
        """A postcopy receive's trace goes on while the pager brings pages in: it ends when the pager does."""
        pager.wait()
        self._end_trace(writer)

    def _vm_event(self, event: str, properties: dict[str, str] | None = None) -> None:
        """The hook the sender and receiver report their ``vm`` events through."""
        self.events.emit("vm", event, properties)

    def _send(self, sender: Sender) -> MigrationStats:
        """The send task's body: the migration between Cloud Hypervisor's migration-started and its outcome."""
        self.events.emit("vm", "migration-started")
        try:
            stats = send_migration(sender)
        except BaseException:
            self.events.emit("vm", "migration-failed")
            raise
        self.events.emit("vm", "migration-finished")
        return stats

    def _receive_event(self, event: str, properties: dict[str, str] | None = None) -> None:
        """The receiver's events; the sender's arrival also moves ``vmm.ping``'s receive state on."""
        receiving = self.receiving
        if event == "migration-receive-started" and receiving is not None:
            self.receiving = {**receiving, "state": "receiving"}
        self.events.emit("vm", event, properties)

    def receive_migration(self, options: ReceiveOptions,
                          on_listening: Callable[[str], None] | None = None) -> MigrationStats:
        """Listen, receive one migration and adopt the VM it brings; return its statistics."""
        with self.lock:
            if self.vm is not None:
                raise VmError("cannot receive a migration: this VMM already has a VM")
            self._require_idle("receive a migration")
            trace = self._start_trace(options.trace)  # before anything listens; a UsageError, 400
            try:
                listener = listen(parse_url(options.receiver_url), options.tls())
                receiver = Receiver(listener, serial_spec=self.serial_spec, limits=self.limits,
                                    populate=options.populate, observers=self.observers,
                                    memory_mode=options.memory_mode, prefetch=options.pull(),
                                    recovery_s=options.recovery_s,
                                    on_event=self._receive_event)
            except BaseException:
                self._end_trace(trace)
                raise
            self.migration = receiver.stats
            self.task = task = MigrationTask("receive-migration", receiver.run, receiver.cancel)
            self.receiving = {"kind": "receive-migration", "state": "listening", "address": str(listener.address)}

        def adopt(vm: Vm) -> None:
            nonlocal trace
            self.adopt(vm)
            if receiver.pager is not None:
                self._watch(receiver.pager)
                if trace is not None:  # postcopy: the pages still come, and their messages go on the trace
                    self.postcopy_threads.start("postcopy-trace", self._trace_until_done, receiver.pager, trace)
                    trace = None
                receiver.pager = None

        try:
            log.info("waiting for a migration on %s", listener.address)
            # The listener listens: a script waiting for this event may connect now.
            self.events.emit("vm", "migration-receive-ready")
            if on_listening is not None:
                on_listening(str(listener.address))
            try:
                self._run_task(task, adopt)
            except BaseException:
                self.events.emit("vm", "migration-receive-failed")
                raise
            self.events.emit("vm", "migration-receive-finished")
        finally:
            self.receiving = None
            listener.close()
            with self.lock:
                if self.task is task:
                    self.task = None
            self._end_trace(trace)
        return receiver.stats

    # -- snapshot and restore ----------------------------------------------------------------

    def snapshot(self, destination_url: str) -> None:
        """Write the paused VM to ``file:///DIR`` (Cloud Hypervisor answers 204, no body)."""
        from .snapshot import write_snapshot

        with self.lock:  # held throughout: nothing may resume the VM while its memory is written
            self._require_idle("snapshot")
            self._require_whole("snapshot")
            vm = self.require_vm()
            self.events.emit("vm", "snapshotting")
            write_snapshot(vm, destination_url)
            self.events.emit("vm", "snapshotted")

    def restore(self, config: RestoreConfig) -> RestoreStats:
        """Build the VM of a snapshot on this empty VMM and adopt it; return the restore's statistics."""
        from .snapshot import Restore

        with self.lock:
            if self.vm is not None or self.vm_config is not None:  # as Cloud Hypervisor: VmAlreadyCreated
                raise VmError("VM is already created: cannot restore on a VMM that has a VM (vm.delete it first)")
            self._require_idle("restore")
            restore = Restore(config, serial_spec=self.serial_spec)
            self.migration = restore.stats
            self.task = task = MigrationTask("restore", restore.run, restore.cancel)

        def adopt(vm: Vm) -> None:
            self.adopt(vm)
            pager = restore.take_pager()
            if pager is not None:
                self._watch(pager, restore=True)

        self.events.emit("vm", "restoring")
        self._run_task(task, adopt)
        self.events.emit("vm", "restored")
        if config.resume:  # Cloud Hypervisor resumes a restored VM as a vm.resume would
            self.events.emit("vm", "resuming")
            self.events.emit("vm", "resumed")
        return restore.stats

    # -- postcopy ------------------------------------------------------------------------------

    def _watch(self, pager: PostcopyPager, restore: bool = False) -> None:
        """Own a running pager: a thread waits for its end (called under the lock, with the VM adopted).

        ``restore``: the pager reads an on-demand restore's snapshot, not a source.
        """
        if self.postcopy_threads.stopping.is_set():  # the owner of an earlier VM's pager was stopped with it
            self.postcopy_threads = ThreadGroup("postcopy-owner")
        self.postcopy = pager
        self.postcopy_threads.start("postcopy-owner", self._watch_postcopy, pager, restore,
                                    stopper=lambda: pager.stop("the VMM is shutting down"))

    def _watch_postcopy(self, pager: PostcopyPager, restore: bool = False) -> None:
        """Wait until the VM is whole (then close the Fault connections) or postcopy failed (then stop the VM
        and end the process non-zero: its missing pages exist only on the source; a failed on-demand restore
        ends the process only when there is no API to report it)."""
        pager.wait()
        if pager.stats.status == "whole":
            _reporting_stuck(pager.close, "postcopy")
            log.info("%s done: %s", "on-demand restore" if restore else "postcopy", pager.stats.summary())
            if self.exit_when_whole:
                self.exit_event.set()
            return
        if pager.stats.status == "stopped":  # the VMM is shutting down; close() has stopped the VM
            return
        error = pager.error or "unknown failure"
        if restore:
            self._stop_failed_vm(pager, "on-demand restore failed", error,
                                 "it must never run on a page that did not come from the snapshot intact")
            if self.exit_on_vm_failure:  # with an API, vm.info tells what happened and the VMM stays
                self.exit_error = SnapshotError(f"memory_restore_mode=ondemand failed: {error}; the VM was "
                                                "stopped", where="restore")
                self.exit_code = 1
                self.exit_event.set()
            return
        self._stop_failed_vm(pager, "postcopy failed", error, "its missing pages exist only on the source")
        self.exit_error = PostcopyError(f"failed: {error}; the VM was stopped (its missing pages "
                                        "exist only on the source)", where="postcopy")
        self.exit_code = 1
        self.exit_event.set()

    def _stop_failed_vm(self, pager: PostcopyPager, what: str, error: str, why: str) -> None:
        """The pager could not bring a page in: stop the VM (it cannot go on), close the pager, record why."""
        vm = self.vm
        log.error("%s: %s; stopping the VM (%s)", what, error, why)
        if vm is not None:
            vm.halt(f"{what}: {error}")
        _reporting_stuck(pager.close, what)
        if vm is not None:
            _reporting_stuck(vm.shutdown, what)
            log.error("the VM stopped: %s", vm.failure)
        if self.migration is not None and self.migration.postcopy is pager.stats:
            self.migration.status = "failed"
            self.migration.error = f"{what}: {error}"

    def _stop_postcopy(self) -> None:
        """The VMM exits while postcopy runs: stop the VM first (its pages are not all here), then the pager."""
        pager = self.postcopy
        if pager is not None and not pager.done.is_set() and self.vm is not None:
            self.vm.halt("the VMM shut down before postcopy brought every page in")
        _reporting_stuck(lambda: self.postcopy_threads.close(timeout=15), "shutting down")
        if pager is not None:
            _reporting_stuck(pager.close, "shutting down")

    def _let_postcopy_finish(self, task: MigrationTask, sender: Sender) -> None:
        """The VMM is asked to exit while the destination still pulls pages from here: they exist nowhere else.

        Wait until it has them all (the task ends), unless asked a second time
        (a second SIGTERM or SIGINT): then stop serving, and the destination's VM fails.
        """
        log.warning("exiting: waiting for the destination to pull the rest of the VM's memory from here (postcopy); "
                    "ask again (a second SIGTERM) to stop serving — the destination's VM would then fail")
        task.on_done(self.force_exit.set)
        self.force_exit.wait()
        if not task.done.is_set():
            sender.abort_postcopy()

    def cancel_migration(self) -> None:
        """Stop the migration in progress (an operator's request); its caller gets the error."""
        with self.lock:
            task = self.task
            sender = self.sender
        if task is None:
            raise VmError("no migration is in progress")
        if sender is not None and sender.complete_sent:
            raise VmError("cannot cancel: Complete was sent, the destination runs the VM"
                          + (" and still pulls its pages from here" if sender.fault_server is not None else ""))
        log.warning("cancelling the %s in progress", task.kind)
        task.cancel()

    def start_postcopy(self) -> None:
        """``vm.migration-start-postcopy``: the hybrid send in progress switches to postcopy at its next step."""
        with self.lock:
            sender = self.sender
            task = self.task
        if task is None or task.kind != "send-migration" or sender is None:
            raise VmError("no migration is being sent")
        sender.start_postcopy()

    # -- the end ---------------------------------------------------------------------------------

    def _drop_vm(self) -> None:
        """Stop the VM and release its KVM fds and memory (the VM is gone here even if that fails)."""
        vm, self.vm = self.vm, None
        if vm is not None:
            vm.close()

    def close(self) -> None:
        """Cancel the migration in progress (joining its thread), stop postcopy, then drop the VM."""
        task = self.task
        sender = self.sender
        if task is not None and sender is not None and sender.serving_postcopy:
            self._let_postcopy_finish(task, sender)
        self._stop_postcopy()
        if task is not None:
            try:
                task.cancel()
            except StuckThreadError as exc:
                log.error("shutting down: %s", exc)
        with self.lock:
            had_vm = self.vm is not None
            self._drop_vm()
            self._report_shutdown(had_vm)

    def _report_shutdown(self, had_vm: bool) -> None:
        """Cloud Hypervisor's ``vmm_shutdown``: the VM is shut down and deleted (if there is one), then the VMM."""
        if self._shutdown_reported:
            return
        self._shutdown_reported = True
        if self.vm_config is not None or had_vm:
            if had_vm:
                self.events.emit("vm", "shutdown")
            self.events.emit("vm", "deleted")
        self.events.emit("vmm", "shutdown")


def _reporting_stuck(close: Callable[[], None], what: str) -> None:
    """Close something whose threads may not stop: a stuck one is logged (it was already named), not raised."""
    try:
        close()
    except StuckThreadError as exc:
        log.error("%s: %s", what, exc)


def install_exit_signals(vmm: Vmm) -> None:
    """SIGTERM and SIGINT end the process cleanly (the main thread is waiting on the exit event)."""

    def handler(signum: int, frame: Any) -> None:
        if vmm.exit_event.is_set():
            log.warning("signal %d again: exiting now", signum)
            vmm.force_exit.set()
            return
        log.info("signal %d: shutting down", signum)
        vmm.exit_event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def start_api(vmm: Vmm, api_socket: str | None, api_socket_fd: int | None = None) -> ApiServer | None:
    """Serve the API on ``api_socket``, or on the inherited listening socket ``api_socket_fd`` (Cloud
    Hypervisor's ``--api-socket fd=N``), from its own thread; None when neither is given."""
    from .api import ApiServer

    if api_socket_fd is not None:
        server = ApiServer(api_socket or None, vmm, fd=api_socket_fd)
    elif api_socket:
        server = ApiServer(api_socket, vmm)
    else:
        return None
    server.start()
    return server


def _api_args(args: argparse.Namespace) -> tuple[str | None, int | None]:
    """``--api-socket`` as the CLI parsed it: a path, or an inherited fd (either may be absent on ``args``)."""
    return getattr(args, "api_socket", None) or None, getattr(args, "api_socket_fd", None)


def wait_for_exit(vmm: Vmm, server: ApiServer | None) -> int:
    """Block until the VMM is told to exit (API, signal, VM failure); clean up; return the exit code."""
    install_exit_signals(vmm)
    try:
        vmm.exit_event.wait()
    finally:
        if server is not None:
            server.stop()
        vmm.close()
    return vmm.exit_code


def _with_events(args: argparse.Namespace, body: Callable[[EventMonitor], int]) -> int:
    """Open ``--event-monitor`` before anything else (Cloud Hypervisor reports ``vmm starting`` first), run
    ``body``, and close the monitor last, once every event of the VMM's end is queued."""
    events = EventMonitor.open(getattr(args, "event_monitor", None))
    try:
        events.emit("vmm", "starting")
        return body(events)
    finally:
        events.close()


def main_run(args: argparse.Namespace) -> int:
    """``chmig run``: boot a VM, restore one (``--restore``), or wait empty for either through the API."""
    return _with_events(args, lambda events: _run(args, events))


def _run(args: argparse.Namespace, events: EventMonitor) -> int:
    api_socket, api_socket_fd = _api_args(args)
    has_api = api_socket is not None or api_socket_fd is not None
    Serial(args.serial).close()  # an empty VMM uses it for the VM it will receive or restore: check it now
    vm_options = args.cpus or args.memory or args.memory_zone or args.workload
    restore = None
    if args.restore:
        from .snapshot import RestoreConfig

        restore = RestoreConfig.parse(args.restore)
        if vm_options:
            raise UsageError("--restore builds the VM from its snapshot: give no --cpus, --memory, --memory-zone "
                             "or --workload with it")
    vmm = Vmm(args.serial, events)
    vmm.exit_on_vm_failure = not has_api
    if restore is not None:
        try:
            # Before the API serves: nobody can see (or act on) a VMM half way through its restore.
            print(f"chmig run: {vmm.restore(restore).summary()}", flush=True)
        except BaseException:
            vmm.close()
            raise
    elif not vm_options:
        if not has_api:
            raise UsageError("nothing to run: give VM options (--cpus, --memory, --workload), --restore, "
                             "or --api-socket")
        log.info("empty VMM: waiting for a restore or an incoming migration")
    else:
        vmm.boot(VmConfig.from_args(args.cpus, args.memory, args.memory_zone, args.workload))
    try:
        server = start_api(vmm, api_socket, api_socket_fd)
    except BaseException:
        vmm.close()
        raise
    code = wait_for_exit(vmm, server)
    if vmm.exit_error is not None:
        raise vmm.exit_error  # the CLI prints it as one line and exits 1
    return code


def main_receive(args: argparse.Namespace) -> int:
    """``chmig receive --listen URL``: wait for one migration, then run the VM it brought."""
    return _with_events(args, lambda events: _receive(args, events))


def _receive(args: argparse.Namespace, events: EventMonitor) -> int:
    api_socket, api_socket_fd = _api_args(args)
    Serial(args.serial).close()  # a bad --serial is an error before anything listens
    options = ReceiveOptions(receiver_url=args.listen, tls_dir=args.tls_dir, memory_mode=args.memory_mode,
                             prefetch=args.prefetch, trace=os.path.abspath(args.trace) if args.trace else None,
                             postcopy_recovery_s=args.postcopy_recovery_s)
    options.validate()
    if options.trace is not None:
        from .trace import TraceWriter

        TraceWriter(options.trace).close()  # a file that cannot be written is an error before anything listens
    vmm = Vmm(args.serial, events)
    vmm.exit_on_vm_failure = api_socket is None and api_socket_fd is None
    server = start_api(vmm, api_socket, api_socket_fd)
    listening = threading.Event()

    def say_listening(address: str) -> None:
        listening.set()
        print(f"chmig receive: listening on {address}", flush=True)

    try:
        try:
            stats = vmm.receive_migration(options, on_listening=say_listening)
        except TransportError as exc:
            if listening.is_set():
                raise
            # Could not listen at all (address in use, no such directory ...): bad input, as the API socket's.
            raise UsageError(exc.message, where=exc.where or "--listen") from None
        print(f"chmig receive: {stats.summary()}", flush=True)
        if args.exit_after_migration:
            if vmm.postcopy is not None:
                vmm.exit_when_whole = True  # the VM needs its source until then
                if vmm.postcopy.done.is_set() and vmm.postcopy.stats.status == "whole":
                    vmm.exit_event.set()
            else:
                vmm.exit_event.set()
    except BaseException:
        if server is not None:
            server.stop()
        vmm.close()
        raise
    code = wait_for_exit(vmm, server)
    if vmm.exit_error is not None:
        raise vmm.exit_error  # the CLI prints it as one line and exits 1
    return code
