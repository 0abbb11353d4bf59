"""The cut points of postcopy: a fault at one message of a postcopy migration, with real processes.

A :class:`~tests.faultproxy.FaultProxy` sits between a ``chmig run`` source (a 32 MiB verify guest, 10 % of
its pages dirtied per round) and a ``chmig receive --memory-mode postcopy --prefetch 256K`` destination; the
source sends with ``memory_mode=postcopy, fault_connections=2``.  The pull then takes 128 round trips of
256 KiB, so a "later" PageFault exists.  The proxy does one action (FIN, half a message then close, RST, an
injected Error, a stall) at one message of the ``main`` connection or of a Fault connection (``fault-0``,
``fault-1``, named in the order the source opened them; on a Fault connection the *destination* sends the
requests, PageFault, and the source answers Ok with the page).  Which connection the destination keeps
for urgent faults and which one it pulls on is its business, and through the proxy a Fault connection may
even reach it after State (it then uses the other one alone), so a PageFault or its answer is picked on
``fault-*``: the n-th on any Fault connection.  The contract checked:

* **main connection, before Complete was sent** (Start, Config, State, the Ok to State): the source VM is
  Running again with 0 errors, ``migration.status`` is ``failed``, send-migration answered an error, and
  the destination is gone (exit 1, one ``chmig receive: error:`` line) — even when its pager was already
  pulling pages (the Ok to State);
* **main connection, at Complete**: Complete cut (the destination never got it): the source stays Paused
  with ``migration.status`` ``unknown``, the destination is gone, and ``resume`` brings the source back
  with 0 errors — never both copies running; the Ok to Complete cut (the destination got it and runs the
  VM): the source serves the pages anyway, the destination becomes whole, and the source completes;
* **a Fault connection cut once the destination depends on it** (at the first PageFault, at a later one, in
  the middle of a page, an injected Error): the destination logs ``postcopy failed``, stops the VM and
  exits non-zero within 30 s; the source's send-migration answers an error that says ``postcopy``, and
  its VM stays Paused with its memory — ``vm.info`` works and ``resume`` brings it back with 0 errors (at
  the first PageFault the pager may fail before Complete: a destination may then also refuse Complete, and
  the source is Running again);
* **a Fault connection cut before its role** (the destination never gets it): postcopy goes on over the
  other one; the destination's VM becomes whole and runs with 0 errors, the source completes;
* **a stalled answer**: with one Fault connection the destination gives up after its
  ``fault_response_timeout_s`` (10 s) and exits non-zero; the source cannot tell a silent partition from
  an idle destination, so its send-migration waits until the partition heals with the connection reset,
  then fails and keeps the VM, as above.  With two connections, a stalled answer to an urgent fault (one
  page) is survived: the pull brings that page too and wakes the vCPU; the destination's VM is whole and
  runs, and once the partition heals with a reset the source must complete.  (A stalled pull range is not
  survived: its pages the guest never touches only the stalled pull would bring.)

Each case runs once (again, up to three times, when its premise did not hold: for the survived stall, two
Fault connections taken and the stalled page an urgent fault's); two tests judge it, one for each side (a
known bug of one side is then marked on that side's test only).  One source VM serves the cases while it
comes out of them healthy (a source that resumed after a failure is reused; one that completed a migration
is replaced).
"""

from __future__ import annotations

import dataclasses
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pytest

from chmig import protocol as p
from chmig.apiclient import ApiError
from chmig.channel import Channel
from chmig.errors import ChmigError
from chmig.harness import Processes, VmmProcess
from chmig.memory import GuestMemory, ZoneConfig
from chmig.postcopy import PostcopyPager, Prefetch
from chmig.transport import Connection

from .conftest import requires_kvm
from .faultproxy import Action, Fault, FaultProxy, Point

pytestmark = [requires_kvm, pytest.mark.timeout(120)]

VM_ARGS = ("--cpus", "boot=1", "--memory", "size=32M", "--workload", "verify,dirty_percent=10")
DEST_ARGS = ("--memory-mode", "postcopy", "--prefetch", "256K")

#: Until the fault point is reached.
REACH_S = 20.0
#: A cut: the source gives up within this (main connection, before or at Complete).
CUT_BOUND_S = 10.0
#: A Fault connection cut: the destination has stopped the VM and exited within this; the source answered.
POSTCOPY_BOUND_S = 30.0
#: The destination's patience with a silent source (Limits.fault_response_timeout_s).
FAULT_RESPONSE_TIMEOUT_S = p.DEFAULT_LIMITS.fault_response_timeout_s
#: For a guest to prove it runs: two more rounds (a round of this VM takes about 10 ms).
ROUNDS_S = 10.0
DESTINATION_S = 15.0

RUNNING = "Running"
PAUSED = "Paused"
PAGE_SIZE = p.PAGE_SIZE

# What a case must end in.
ROLLBACK = "rollback"        # before Complete: the source runs the VM again, the destination is gone
UNKNOWN = "unknown"          # Complete (or its Ok) cut: the source stays Paused, outcome unknown
FAILED = "postcopy failed"   # after the hand-over: the destination stops; the source keeps its VM, paused
WHOLE = "whole"              # the destination's VM is whole and runs; the source completed

@dataclass(frozen=True)
class Case:
    key: str
    name: str
    connection: str
    action: Action
    expect: str
    answers: str | None = None
    nth: int = 1
    #: Count only messages seen after the Ok to Complete went through the proxy.
    after_complete: bool = False
    #: Only messages with this header length (an urgent fault's answer: one page).
    length: int | None = None
    fault_connections: int = 2
    #: Outcomes the source may also end in (e.g. a destination that refuses Complete once its pager failed).
    also: tuple[str, ...] = ()
    #: Known bug of the source's side: its test is xfail(strict) with this reason.
    source_bug: str | None = None
    #: The case means something only if the destination took this many Fault connections (it is run again,
    #: up to ATTEMPTS times, when one arrived through the proxy after State and the destination left it).
    needs_connections: int = 0

    def __str__(self) -> str:
        return self.key

    def point(self, acked: Callable[[str], bool]) -> Point:
        when = (lambda: acked("Complete")) if self.after_complete else None
        return Point(self.name, self.connection, self.answers, self.nth, when, length=self.length)


CASES = [
    # The main connection.
    Case("main-Ok-Start-fin", "Ok", "main", Action.FIN, ROLLBACK, answers="Start"),
    Case("main-Config-half", "Config", "main", Action.HALF, ROLLBACK),
    Case("main-State-fin", "State", "main", Action.FIN, ROLLBACK),
    Case("main-Ok-State-error", "Ok", "main", Action.ERROR, ROLLBACK, answers="State"),
    Case("main-Complete-fin", "Complete", "main", Action.FIN, UNKNOWN),
    # The destination got Complete and runs the VM: the source serves its pages anyway, and completes.
    Case("main-Ok-Complete-fin", "Ok", "main", Action.FIN, WHOLE, answers="Complete"),
    # A Fault connection the destination never gets.
    Case("fault-0-role-fin", "Fault", "fault-0", Action.FIN, WHOLE),
    # (Not RST: the proxy's RST of a role sends a FIN first and the reset after, and which one the source
    # reads is a race; a reset there is the false failure of fault-1-page5-stall.)
    Case("fault-1-role-half", "Fault", "fault-1", Action.HALF, WHOLE),
    # Fault connections in use ("fault-*": whichever carries the n-th message; through the proxy a Fault
    # connection may reach the destination after State, and it then uses the other one alone).
    Case("fault-PageFault1-fin", "PageFault", "fault-*", Action.FIN, FAILED, also=(ROLLBACK,)),
    Case("fault-PageFault1-rst", "PageFault", "fault-*", Action.RST, FAILED, also=(ROLLBACK,)),
    Case("fault-PageFault5-half", "PageFault", "fault-*", Action.HALF, FAILED, nth=5, after_complete=True),
    Case("fault-PageFault5-error", "PageFault", "fault-*", Action.ERROR, FAILED, nth=5, after_complete=True),
    Case("fault-PageFault20-fin", "PageFault", "fault-*", Action.FIN, FAILED, nth=20, after_complete=True),
    Case("fault-page5-half", "Ok", "fault-*", Action.HALF, FAILED, answers="PageFault", nth=5,
         after_complete=True),
    Case("fault-page5-rst", "Ok", "fault-*", Action.RST, FAILED, answers="PageFault", nth=5,
         after_complete=True),
    # A stalled answer: the destination's fault_response_timeout_s, and a partition that heals with a reset.
    Case("one-fault-page5-stall", "Ok", "fault-0", Action.STALL, FAILED, answers="PageFault", nth=5,
         after_complete=True, fault_connections=1),
    # With two, an urgent fault's answer stalls (one page: a pull range would hold pages the guest never
    # touches, which only the stalled pull would bring); the pull brings that page too and wakes the vCPU.
    # The link of that stalled answer then heals with a reset: every page was served, but one connection
    # ended in an error, so the source cannot tell "whole" from "failed on the last pages": it keeps its VM
    # paused (unknown) while the destination runs the VM whole.
    Case("fault-urgent3-stall", "Ok", "fault-*", Action.STALL, WHOLE, answers="PageFault", nth=3,
         after_complete=True, length=PAGE_SIZE, needs_connections=2),
]


# ---------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------


class Call(threading.Thread):
    """An API call that blocks until a migration ends, on a thread of its own."""

    def __init__(self, name: str, call: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self._call = call
        self.result: Any = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            self.result = self._call()
        except BaseException as exc:  # judged by the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()


@dataclass
class Row:
    """What one case showed, as facts and as violations of each side's contract."""

    case: Case
    #: Why the run does not count (the case's premise did not hold), or None.
    premise: str | None = None
    source_violations: list[str] = field(default_factory=list)
    destination_violations: list[str] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    transcript: str = ""
    logs: str = ""

    def report(self, side: str) -> str:
        violations = self.source_violations if side == "source" else self.destination_violations
        lines = [f"{self.case} ({side}):"] + [f"  - {v}" for v in violations]
        lines += ["what happened:"] + [f"  {f}" for f in self.facts]
        lines += ["messages through the proxy (last 40):", *self.transcript.splitlines()[-40:], self.logs]
        return "\n".join(lines)


class Hosts:
    """A source VM reused from case to case while it comes out healthy."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self._source: VmmProcess | None = None

    def source(self) -> VmmProcess:
        vmm = self._source
        if vmm is not None and not _healthy_running(vmm):
            self.retire_source()
            vmm = None
        if vmm is None:
            vmm = self._source = self.procs.run(*VM_ARGS)
            vmm.wait_rounds(3, timeout=ROUNDS_S)
        return vmm

    def retire_source(self) -> None:
        if self._source is not None:
            self._source.stop()
            self._source = None


def _healthy_running(vmm: VmmProcess) -> bool:
    if vmm.proc.poll() is not None:
        return False
    try:
        info = vmm.info()
    except ApiError:
        return False
    return info["state"] == RUNNING and info["guest"]["errors"] == 0 and "migration_in_progress" not in info


def _read(path: Any) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class CaseRun:
    def __init__(self, case: Case, hosts: Hosts, procs: Processes) -> None:
        self.case = case
        self.hosts = hosts
        self.row = Row(case)
        self.source = hosts.source()
        self.dest, target = procs.receive("tcp:127.0.0.1:0", *DEST_ARGS)
        self.proxy = FaultProxy(target, fault=Fault(case.point(self._acked), case.action), probe=self._state)
        self.sending: Call | None = None
        self.fired_at = 0.0
        self.retire = False

    # -- small helpers ---------------------------------------------------------------------------------

    def _acked(self, command: str) -> bool:
        """The proxy has seen (and is forwarding) the Ok to ``command`` on main."""
        return any(s.name == "Ok" and s.answers == command and s.connection == "main" for s in list(self.proxy.seen))

    def _state(self) -> str:
        return str(self.source.info()["state"])

    def fact(self, text: str) -> None:
        self.row.facts.append(text)

    def source_fail(self, text: str) -> None:
        self.row.source_violations.append(text)

    def dest_fail(self, text: str) -> None:
        self.row.destination_violations.append(text)

    # -- the run -----------------------------------------------------------------------------------------

    def run(self) -> Row:
        try:
            self.proxy.start()
            body = {"destination_url": self.proxy.url, "memory_mode": "postcopy",
                    "fault_connections": self.case.fault_connections}
            self.sending = Call("test-send", lambda: self.source.call("PUT", "vm.send-migration", body,
                                                                      timeout=150))
            self.sending.start()
            if self._reach():
                {ROLLBACK: self._judge_rollback, UNKNOWN: self._judge_unknown, FAILED: self._judge_failed,
                 WHOLE: self._judge_whole}[self.case.expect]()
        except (ApiError, AssertionError, OSError) as exc:
            self.source_fail(f"the test stopped: {type(exc).__name__}: {exc}")
            self.dest_fail(f"the test stopped: {type(exc).__name__}: {exc}")
        finally:
            self._clean_up()
        return self.row

    def _reach(self) -> bool:
        assert self.sending is not None
        if not self.proxy.fired.wait(REACH_S):
            outcome = self.sending.error or ("completed" if not self.sending.is_alive() else "still running")
            text = f"the fault point was never reached (migration: {outcome})"
            self.source_fail(text)
            self.dest_fail(text)
            return False
        assert self.proxy.fired_at is not None
        self.fired_at = self.proxy.fired_at
        self.fact(f"fired at: {self.proxy.fired_message} (source VM {self.proxy.at_fire})")
        return True

    def _wait_send(self, bound: float) -> bool:
        """Wait (until ``bound`` s after the fault) for send-migration to answer."""
        assert self.sending is not None
        self.sending.join(max(0.0, self.fired_at + bound - time.monotonic()))
        if self.sending.is_alive():
            return False
        assert self.sending.ended_at is not None
        outcome = f"error: {self.sending.error}" if self.sending.error else "completed"
        self.fact(f"send-migration answered after {self.sending.ended_at - self.fired_at:.2f} s: {outcome}"[:600])
        return True

    def _wait_dest_exit(self, bound: float) -> int | None:
        try:
            code = self.dest.proc.wait(max(0.1, self.fired_at + bound - time.monotonic()))
        except Exception:
            return None
        self.fact(f"destination exited {code} {time.monotonic() - self.fired_at:.2f} s after the fault")
        return code

    # -- the verdicts ---------------------------------------------------------------------------------------

    def _judge_rollback(self) -> None:
        if not self._wait_send(CUT_BOUND_S):
            self.source_fail(f"send-migration had not answered {CUT_BOUND_S:.0f} s after the fault")
            return
        self._source_rolled_back()
        code = self._wait_dest_exit(CUT_BOUND_S + DESTINATION_S)
        if code is None:
            self.dest_fail(f"chmig receive still runs {CUT_BOUND_S + DESTINATION_S:.0f} s after the fault")
            return
        assert self.dest.proc.stdout is not None
        lines = self.dest.proc.stdout.read().splitlines()
        errors = [line for line in lines if line.startswith("chmig receive: error:")]
        if code != 1 or len(errors) != 1:
            self.dest_fail(f"chmig receive exited {code} with {len(errors)} error lines, expected 1 and 1")

    def _source_rolled_back(self) -> None:
        assert self.sending is not None
        info = self.source.info()
        self.fact(f"source: {info['state']}, migration {info.get('migration', {}).get('status')}")
        if not isinstance(self.sending.error, ApiError):
            self.source_fail(f"send-migration did not answer an error: {self.sending.result}")
        if info["state"] != RUNNING:
            self.source_fail(f"the source VM is {info['state']}, expected Running again")
        if info.get("migration", {}).get("status") != "failed":
            self.source_fail(f"migration.status is {info.get('migration', {}).get('status')!r}, expected 'failed'")
        self._guest_runs(self.source, self.source_fail)

    def _judge_unknown(self) -> None:
        if not self._wait_send(CUT_BOUND_S):
            self.source_fail(f"send-migration had not answered {CUT_BOUND_S:.0f} s after the fault")
            return
        info = self.source.info()
        migration = info.get("migration", {})
        self.fact(f"source: {info['state']}, migration {migration.get('status')}")
        if info["state"] != PAUSED:
            self.source_fail(f"the source VM is {info['state']} after Complete was sent: it must stay Paused")
        if migration.get("status") != "unknown" or not migration.get("error"):
            self.source_fail(f"migration.status is {migration.get('status')!r}, expected 'unknown' with an error")
        dest_running = self._destination_outcome()
        if dest_running:
            self.retire = True  # the VM lives on the destination: this paused copy must never run again
            if self._state() != PAUSED:
                self.source_fail("the source resumed while the destination runs the VM")
            return
        self._resume_source()

    def _destination_outcome(self) -> bool:
        """After Complete: the destination runs the VM whole (True), or stopped it and exited (False)."""
        deadline = self.fired_at + POSTCOPY_BOUND_S
        while time.monotonic() < deadline:
            if self.dest.proc.poll() is not None:
                self.fact(f"destination exited {self.dest.proc.returncode}")
                if self.dest.proc.returncode == 0:
                    self.dest_fail("chmig receive exited 0 without the VM")
                return False
            try:
                info = self.dest.info()
            except ApiError:
                time.sleep(0.05)
                continue
            postcopy = info.get("migration", {}).get("postcopy") or {}
            if postcopy.get("status") == "whole" and info["state"] == RUNNING:
                self.fact("destination: the VM is whole and runs")
                self._guest_runs(self.dest, self.dest_fail)
                return True
            time.sleep(0.05)
        self.dest_fail(f"the destination neither ran the VM whole nor exited {POSTCOPY_BOUND_S:.0f} s after the fault")
        return False

    def _judge_failed(self) -> None:
        # The destination: postcopy failed, VM stopped, process gone.
        code = self._wait_dest_exit(POSTCOPY_BOUND_S)
        log = _read(self.dest.log)
        if code is None:
            self.dest_fail(f"chmig receive still runs {POSTCOPY_BOUND_S:.0f} s after the fault")
        elif code == 0:
            self.dest_fail("chmig receive exited 0")
        if "postcopy failed" not in log:
            self.dest_fail("the destination's log does not say 'postcopy failed'")
        if self.case.action is Action.STALL:
            self._judge_stall_timeout(code)
            if self.proxy.reset_stalled() != 1:
                self.source_fail("the stalled connection was not there to heal")
        # The source: an error about postcopy, its VM paused with its memory, and resume brings it back.
        if not self._wait_send(POSTCOPY_BOUND_S + (FAULT_RESPONSE_TIMEOUT_S if self.case.action is Action.STALL
                                                   else 0)):
            self.source_fail("send-migration did not answer after the destination failed")
            return
        assert self.sending is not None
        error = self.sending.error
        info = self.source.info()
        migration = info.get("migration", {})
        self.fact(f"source: {info['state']}, migration {migration.get('status')}")
        if ROLLBACK in self.case.also and info["state"] == RUNNING:
            self.fact("the destination refused Complete: the source rolled back")
            self._source_rolled_back()
            return
        if code is not None and "the VM stopped" not in log:  # it got Complete: the VM ran, and was stopped
            self.dest_fail("the destination's log does not say the VM stopped")
        if not isinstance(error, ApiError) or "postcopy" not in str(error):
            self.source_fail(f"send-migration did not answer an error about postcopy: "
                             f"{error or (self.sending.result or {}).get('status')}")
        if info["state"] != PAUSED:
            self.source_fail(f"the source VM is {info['state']}, expected Paused (it holds the only copy)")
        if migration.get("status") != "failed":
            self.source_fail(f"migration.status is {migration.get('status')!r}, expected 'failed'")
        self._resume_source()

    def _judge_stall_timeout(self, code: int | None) -> None:
        """The stall ended the destination by its fault_response_timeout_s, not earlier, not much later."""
        if code is None:
            return
        took = time.monotonic() - self.fired_at
        if not FAULT_RESPONSE_TIMEOUT_S - 1 <= took <= FAULT_RESPONSE_TIMEOUT_S + 15:
            self.dest_fail(f"the destination gave up {took:.1f} s after the stall, expected about "
                           f"{FAULT_RESPONSE_TIMEOUT_S:g} s")
        assert self.sending is not None
        if not self.sending.is_alive():
            self.fact("the source answered during the stall")
        else:  # the source cannot tell a partition from an idle destination: it waits, its VM paused
            state = self._state()
            self.fact(f"during the stall, after the destination exited: source {state}, still migrating")
            if state != PAUSED:
                self.source_fail(f"the source VM is {state} during the stall")

    def _took_connections(self) -> int | None:
        """How many Fault connections the destination's pager took (from its log)."""
        match = re.search(r"postcopy: userfaultfd on .*?, (\d+) page source\(s\)", _read(self.dest.log))
        return int(match.group(1)) if match else None

    def _judge_whole(self) -> None:
        if self.case.needs_connections:
            deadline = time.monotonic() + 5
            took = self._took_connections()
            while took is None and time.monotonic() < deadline:
                time.sleep(0.05)
                took = self._took_connections()
            if took is None:
                # Never skipped silently: a reworded log line once turned this premise off unnoticed.
                self.dest_fail("the destination's log does not say how many Fault connections its pager took")
                self.proxy.reset_stalled()
                self.retire = True
                return
            if took < self.case.needs_connections:
                self.row.premise = f"the destination took {took} Fault connection(s)"
                self.proxy.reset_stalled()
                self.retire = True
                return
        deadline = self.fired_at + POSTCOPY_BOUND_S
        whole = False
        while time.monotonic() < deadline and self.dest.proc.poll() is None:
            try:
                info = self.dest.info()
            except ApiError:
                time.sleep(0.05)
                continue
            postcopy = info.get("migration", {}).get("postcopy") or {}
            if postcopy.get("status") == "whole":
                whole = True
                self.fact(f"destination whole: {postcopy.get('pages_faulted')} pages faulted, "
                          f"{postcopy.get('pages_pulled')} pulled over {postcopy.get('fault_connections')} "
                          f"connection(s)")
                break
            if postcopy.get("status") in ("failed", "stopped"):
                break
            time.sleep(0.05)
        if not whole and self.case.action is Action.STALL and re.search(
                r"ERROR postcopy-pull-\S+ chmig.postcopy: postcopy failed .*silent for", _read(self.dest.log)):
            # The one-page answer that stalled was a pull range's (a gap between faulted pages), not an
            # urgent fault's: nothing else brings those pages.
            self.row.premise = "the stalled one-page answer was the pull's, not an urgent fault's"
            self.proxy.reset_stalled()
            self.retire = True
            return
        if not whole:
            self.dest_fail(f"the destination's VM did not become whole (exit {self.dest.proc.poll()}, log: "
                           f"{[l for l in _read(self.dest.log).splitlines() if 'postcopy failed' in l][:1]})")
        else:
            self._guest_runs(self.dest, self.dest_fail)
        if self.case.action is Action.STALL:
            assert self.sending is not None
            time.sleep(0.5)  # the destination has closed its connections; the source cannot see through the stall
            self.fact(f"during the stall, the destination whole: send-migration "
                      f"{'still waits' if self.sending.is_alive() else 'answered'}")
            self.proxy.reset_stalled()
        if not self._wait_send(POSTCOPY_BOUND_S):
            self.source_fail("send-migration did not answer once the destination was whole")
            return
        assert self.sending is not None
        self.retire = True
        if self.sending.error is not None and "every page was served" in str(self.sending.error):
            # The partition healed with a reset: the source cannot tell this from a destination that failed
            # on its last pages, so it keeps its copy, paused, and says the outcome is unknown.
            state = self._state()
            self.fact(f"source kept its VM {state}, outcome unknown (a reset after every page was served)")
            if state != PAUSED:
                self.source_fail(f"the source VM is {state}: with the outcome unknown it must stay Paused")
            return
        if self.sending.error is not None:
            self.source_fail(f"send-migration failed though the destination has the whole VM: "
                             f"{self.sending.error}"[:800])
            try:
                if self._state() == RUNNING:
                    self.source_fail("and the source runs the VM too")
            except ApiError:
                pass
            return
        try:
            state = self._state()
        except ApiError as exc:
            self.fact(f"source after completing: {exc}")
        else:
            self.fact(f"source after completing: {state}")
            if state == RUNNING:
                self.source_fail("the source still runs the VM it migrated away")

    # -- checks -------------------------------------------------------------------------------------------

    def _guest_runs(self, vmm: VmmProcess, fail: Callable[[str], None]) -> None:
        """Two more rounds, 0 errors."""
        try:
            info = vmm.info()
            info = vmm.wait_rounds(info["guest"]["rounds"] + 2, timeout=ROUNDS_S)
        except (ApiError, AssertionError) as exc:
            fail(f"the guest on {vmm.api} does not run: {str(exc)[:300]}")
            return
        if info["guest"]["errors"]:
            fail(f"the guest on {vmm.api} counted {info['guest']['errors']} errors")

    def _resume_source(self) -> None:
        """The source kept the VM (paused): resume brings it back running, 0 errors."""
        try:
            self.source.call("PUT", "vm.resume")
        except ApiError as exc:
            self.source_fail(f"resume failed: {exc}")
            return
        self._guest_runs(self.source, self.source_fail)
        self.fact(f"source resumed: {self._state()}")

    def _clean_up(self) -> None:
        try:
            self.proxy.close()
        except RuntimeError as exc:
            self.source_fail(str(exc))
        self.row.transcript = self.proxy.transcript()
        if self.sending is not None:
            self.sending.join(30)
            if self.sending.is_alive():
                self.source_fail("the send-migration API call did not return after the proxy closed")
                self.retire = True
        self.dest.stop()
        if self.row.source_violations or self.row.destination_violations:
            self.row.logs = self.source.tail(30) + "\n" + self.dest.tail(30)
            self.retire = True
        if self.retire:
            self.hosts.retire_source()


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------

ROWS: dict[str, Row] = {}


class _Summary:
    """Prints what each case showed in pytest's terminal summary (the facts, not only pass or fail)."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not ROWS:
            return
        terminalreporter.section("postcopy cut points")
        for key, row in ROWS.items():
            verdict = "pass" if not (row.source_violations or row.destination_violations) else "VIOLATIONS"
            terminalreporter.write_line(f"{key} [{row.case.expect}] {verdict}: {' | '.join(row.facts)}"[:1500])


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Iterator[tuple[Hosts, Processes]]:
    procs = Processes(tmp_path_factory.mktemp("postcopy-cuts"))
    if not request.config.pluginmanager.has_plugin("postcopy-cut-summary"):
        request.config.pluginmanager.register(_Summary(), "postcopy-cut-summary")
    yield Hosts(procs), procs
    procs.stop_all()


#: Runs of a case whose premise did not hold, before it counts as a failure.
ATTEMPTS = 3


def outcome(hosts: tuple[Hosts, Processes], case: Case) -> Row:
    """The case's run, done once for both of its tests (again while its premise does not hold)."""
    if case.key not in ROWS:
        notes: list[str] = []
        for attempt in range(ATTEMPTS):
            row = CaseRun(case, *hosts).run()
            if row.premise is None:
                break
            notes.append(f"attempt {attempt + 1} does not count: {row.premise}")
        else:
            row.source_violations.append(f"the case's premise never held: {row.premise}")
            row.destination_violations.append(f"the case's premise never held: {row.premise}")
        row.facts[:0] = notes
        ROWS[case.key] = row
    return ROWS[case.key]


def _source_param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=case.source_bug)] if case.source_bug else []
    return pytest.param(case, id=str(case), marks=marks)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_destination(hosts: tuple[Hosts, Processes], case: Case) -> None:
    row = outcome(hosts, case)
    assert not row.destination_violations, row.report("destination")


@pytest.mark.parametrize("case", [_source_param(case) for case in CASES])
def test_source(hosts: tuple[Hosts, Processes], case: Case) -> None:
    row = outcome(hosts, case)
    assert not row.source_violations, row.report("source")


# ---------------------------------------------------------------------------------------------
# In process: a pull connection that breaks while the pager is still starting its threads
# ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_a_pull_connection_cut_while_the_pager_starts() -> None:
    """Three Fault connections, two pulling; the first pull connection's source is gone (its first PageFault
    meets a closed socket) before ``start()`` has started the second pull thread.  The pager must fail
    cleanly; ``start()`` itself must not raise (the receiver calls it while handling State)."""
    memory = GuestMemory.create([ZoneConfig("mem0", 4 << 20, False)])
    pairs = [socket.socketpair() for _ in range(3)]
    channels = [Channel(Connection(ours, peer=f"test-{n}", is_unix=True), side=p.Side.DESTINATION,
                        name=f"fault-{n}") for n, (ours, _) in enumerate(pairs)]
    limits = dataclasses.replace(p.DEFAULT_LIMITS, fault_response_timeout_s=2.0)
    pager = PostcopyPager(memory, channels, Prefetch.parse("256K"), limits=limits)
    pairs[1][1].close()  # fault-1's source is gone: the first pull thread fails at its first request
    started = pager.threads.start

    def start_then_let_it_fail(name: str, *args: Any, **kwargs: Any) -> threading.Thread:
        thread = started(name, *args, **kwargs)
        if name == "postcopy-pull-fault-1":
            pager.threads.stopping.wait(5)  # it has failed, and stopped the group, before the next one starts
        return thread

    pager.threads.start = start_then_let_it_fail  # type: ignore[method-assign]
    try:
        pager.register()
        try:
            pager.start()
            raised: BaseException | None = None
        except BaseException as exc:  # judged below
            raised = exc
        assert pager.wait(5)
        assert pager.stats.status == "failed" and pager.error and "fault-1" in pager.error, pager.error
        assert raised is None or isinstance(raised, ChmigError), (
            f"start() raised {raised!r} after a pull connection failed: the receiver's State step turns that "
            "into an internal error")
    finally:
        pager.close()
        for _, theirs in pairs:
            theirs.close()
        memory.close()
