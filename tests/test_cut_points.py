"""The cut-point matrix of the source: a fault at every message of a migration, and what the source does then.

A :class:`~tests.faultproxy.FaultProxy` between a real source and a real
destination performs one action (FIN, half a message then close, RST, stall,
an injected Error answer) at one message of the flow, for

* ``tcp2``: remote precopy over TCP with ``connections=2`` (control on ``main``, memory on
  ``memory-0``/``memory-1``), destination ``chmig receive``;
* ``local``: ``local=on`` over ``unix:``, the memfds passed through the proxy, destination an
  empty VMM that was given ``vm.receive-migration``.

The contract checked (the hardening issue's, which the sender is being changed to meet):

* **before Complete was sent**: the source VM is Running again (Paused if it was paused before)
  within 10 s of a cut and 15 s of a stall (10 s of silence once paused), its API answers, the guest keeps counting rounds with 0
  errors, ``migration.status`` is ``failed``, and the destination is gone (exit 1 with one
  ``chmig receive: error:`` line) or, for an empty VMM, an empty VMM again;
* **after Complete was sent** (Complete cut, stalled or answered Error, or its Ok lost): the source
  never resumes on its own — it stays Paused with ``migration.status == "unknown"`` and an error
  saying why — and never are two copies running: the destination runs the VM (it got Complete) or
  is gone, and then ``resume`` brings the source back with 0 errors.

Stalls are tried only where a bounded wait matters and is short (the VM is paused: at most 10 s of
silence): at the final Memory, State, Complete and the Ok to Complete.  A stall while the VM runs
would cost the 60 s bound each.

One source VM serves every case as long as it comes out of a case healthy (a failed migration must
leave it fit for the next one); after any violation it is replaced.  The measured table is printed
at the end of the module (and written to ``cut-points.md`` in its temporary folder), or run the
matrix without pytest: ``python -m tests.test_cut_points --table [-k SUBSTRING]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from chmig.apiclient import ApiError
from chmig.harness import Processes, VmmProcess

from .conftest import requires_kvm
from .faultproxy import Action, Fault, FaultProxy, Point

pytestmark = [requires_kvm, pytest.mark.timeout(120)]

#: One small VM serves both flows (shared memory, so it can also migrate locally).
VM_ARGS = ("--cpus", "boot=1", "--memory", "size=32M,shared=on", "--workload", "verify,dirty_percent=10")

TCP2 = "tcp2"
LOCAL = "local"
FLOW_OPTIONS: dict[str, dict[str, object]] = {TCP2: {"connections": 2}, LOCAL: {"local": True}}
#: For "a later Memory iteration": a link of 400 MiB/s and a downtime goal no iteration meets, so the
#: precopy iterates (≈ 14 iterations of ≈ 30 MiB) until timeout_s, then finishes anyway.
MANY_ITERATIONS: dict[str, object] = {"downtime_ms": 1, "timeout_s": 1, "timeout_strategy": "ignore"}
MANY_ITERATIONS_RATE = 400 << 20

#: The contract's bounds, from the moment the fault fired until the source gave the migration up: a cut
#: within 10 s; a stall within the sender's bound on silence once the VM is paused (10 s), plus slack.
#: (Every stall here is while paused: the issue's outer cap of ~35 s is wider than the contract needs.)
CUT_BOUND_S = 10.0
PAUSED_SILENCE_S = 10.0
STALL_BOUND_S = PAUSED_SILENCE_S + 5.0
#: Until the fault point is reached (a point never reached is a failure of the test's premise).
REACH_S = 30.0
#: For the destination to end (or run the VM) once the source has given up and the proxy is closed.
DESTINATION_S = 15.0
#: For a running guest to prove it runs: two more rounds (a round of this VM takes about 10 ms).
ROUNDS_S = 10.0
API_TIMEOUT_S = 150.0

RUNNING = "Running"
PAUSED = "Paused"


# ---------------------------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spot:
    """A message of the flow where a fault can go, and what is known about that moment."""

    #: Short, for test ids: ``Ok-State``.
    key: str
    #: For the table: "Ok to State".
    title: str
    name: str
    connection: str
    answers: str | None = None
    nth: int = 1
    #: Only a message seen while the source VM is paused counts (the final iteration).
    while_paused: bool = False
    #: The source VM's state at this message, for a VM that was running when the migration began.
    vm: str = RUNNING
    #: Complete was (or is being) sent: the source must no longer decide on its own.
    after_complete: bool = False
    #: Needs a precopy of many iterations (throttled link, unreachable downtime goal).
    many_iterations: bool = False
    #: A fault here keeps the first request from reaching the destination whole: for it no migration
    #: began, so it keeps listening for the real sender (a probe is not a migration: receive.py).
    first_request: bool = False

    def point(self, source_state: Callable[[], str]) -> Point:
        when = (lambda: source_state() == PAUSED) if self.while_paused else None
        return Point(self.name, self.connection, self.answers, self.nth, when, label=self.title)


def _request_and_ok(key: str, name: str, connection: str = "main", title: str | None = None,
                    **known: Any) -> list[Spot]:
    """A request and the Ok that answers it: two spots with the same facts."""
    title = title or name
    return [Spot(key, title, name, connection, first_request=name == "Start", **known),
            Spot(f"Ok-{key}", f"Ok to {title}", "Ok", connection, answers=name, **known)]


SPOTS: dict[str, list[Spot]] = {
    TCP2: [
        *_request_and_ok("Start", "Start"),
        *_request_and_ok("Config", "Config"),
        *_request_and_ok("Memory1", "Memory", "memory-*", "1st Memory (iteration 0)"),
        *_request_and_ok("Memory3", "Memory", "memory-*", "3rd Memory (iteration 2)", nth=3,
                         many_iterations=True),
        *_request_and_ok("Memory-final", "Memory", "memory-*", "final Memory (VM paused)", while_paused=True,
                         vm=PAUSED),
        *_request_and_ok("State", "State", vm=PAUSED),
        *_request_and_ok("Complete", "Complete", vm=PAUSED, after_complete=True),
    ],
    LOCAL: [
        *_request_and_ok("Start", "Start"),
        *_request_and_ok("MemoryFd", "MemoryFd", title="1st MemoryFd"),
        *_request_and_ok("Config", "Config"),  # the source pauses once Config is answered
        *_request_and_ok("State", "State", vm=PAUSED),
        *_request_and_ok("Complete", "Complete", vm=PAUSED, after_complete=True),
    ],
}
#: A VM paused before the migration: it must stay paused, and arrive (if at all) with CompletePaused.
PAUSED_SPOTS: list[Spot] = [
    Spot("State", "State", "State", "main", vm=PAUSED),
    Spot("CompletePaused", "CompletePaused", "CompletePaused", "main", vm=PAUSED, after_complete=True),
]
CUTS = (Action.FIN, Action.HALF, Action.RST, Action.ERROR)
#: Where a stall is worth its bounded wait: the VM is paused, so the sender gives up within 10 s.
STALLS: dict[str, tuple[str, ...]] = {TCP2: ("Memory-final", "State", "Complete", "Ok-Complete"), LOCAL: ("State",)}


@dataclass(frozen=True)
class Case:
    flow: str
    spot: Spot
    action: Action
    #: The VM was paused before the migration began.
    paused: bool = False

    def __str__(self) -> str:
        return f"{self.flow}{'-paused' if self.paused else ''}-{self.spot.key}-{self.action.value}"

    @property
    def bound_s(self) -> float:
        return STALL_BOUND_S if self.action is Action.STALL else CUT_BOUND_S

    @property
    def vm_at_spot(self) -> str:
        return PAUSED if self.paused else self.spot.vm


def matrix() -> list[Case]:
    cases = [Case(flow, spot, action) for flow, spots in SPOTS.items() for spot in spots for action in CUTS]
    cases += [Case(TCP2, spot, Action.FIN, paused=True) for spot in PAUSED_SPOTS]
    cases += [Case(flow, spot, Action.STALL) for flow, keys in STALLS.items() for spot in SPOTS[flow]
              if spot.key in keys]
    return cases


def spot(flow: str, key: str) -> Spot:
    return next(s for s in SPOTS[flow] if s.key == key)


# ---------------------------------------------------------------------------------------------
# The processes the matrix reuses
# ---------------------------------------------------------------------------------------------


class Hosts:
    """A source VM and an empty destination VMM, reused from case to case while they stay healthy."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs = Processes(root)
        self.cases = 0
        self._source: VmmProcess | None = None
        self._empty: VmmProcess | None = None

    def source(self, paused: bool) -> VmmProcess:
        """A healthy source VM, running or paused as asked."""
        vmm = self._source
        if vmm is not None and not _healthy_vm(vmm):
            self.retire_source()
            vmm = None
        if vmm is None:
            vmm = self._source = self.procs.run(*VM_ARGS)
            vmm.wait_rounds(3, timeout=ROUNDS_S)
        state = vmm.info()["state"]
        if paused and state == RUNNING:
            vmm.call("PUT", "vm.pause")
        elif not paused and state == PAUSED:
            vmm.call("PUT", "vm.resume")
        return vmm

    def empty_vmm(self) -> VmmProcess:
        """An empty VMM (no VM, no migration) to give ``vm.receive-migration``."""
        vmm = self._empty
        if vmm is not None and not _empty(vmm):
            self.retire_empty()
            vmm = None
        if vmm is None:
            vmm = self._empty = self.procs.run()
        return vmm

    def retire_source(self) -> None:
        if self._source is not None:
            self._source.stop()
            self._source = None

    def retire_empty(self) -> None:
        if self._empty is not None:
            self._empty.stop()
            self._empty = None

    def close(self) -> None:
        self.procs.stop_all()


def _healthy_vm(vmm: VmmProcess) -> bool:
    if vmm.proc.poll() is not None:
        return False
    try:
        info = vmm.info()
    except ApiError:
        return False
    return (info["state"] in (RUNNING, PAUSED) and info["guest"]["errors"] == 0
            and "migration_in_progress" not in info)


def _empty(vmm: VmmProcess) -> bool:
    if vmm.proc.poll() is not None:
        return False
    try:
        vmm.call("GET", "vmm.ping", timeout=5)
        vmm.info()
    except ApiError as exc:
        return exc.status == 404 and "not created" in str(exc)
    return False  # it has a VM


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """What one case measured, for the table and for its test."""

    case: Case
    vm_at_spot: str = "-"
    source: str = "-"
    recovery_s: float | None = None
    destination: str = "-"
    violations: list[str] = field(default_factory=list)
    transcript: str = ""
    logs: str = ""

    @property
    def source_state(self) -> str:
        return self.source.split(",")[0]

    def cells(self) -> list[str]:
        case = self.case
        recovery = "-" if self.recovery_s is None else f"{self.recovery_s:.2f} s"
        if self.recovery_s is not None and self.recovery_s > case.bound_s:
            recovery = f"> {case.bound_s:.0f} s"
        verdict = "pass" if not self.violations else "FAIL: " + "; ".join(self.violations)
        flow = case.flow + (" (VM paused)" if case.paused else "")
        return [flow, case.spot.title, case.action.value, self.vm_at_spot, self.source, recovery, self.destination,
                verdict]

    def report(self) -> str:
        lines = [f"{self.case}: " + " | ".join(self.cells()), "violations:"]
        lines += [f"  - {v}" for v in self.violations]
        lines += ["messages through the proxy:", self.transcript, self.logs]
        return "\n".join(lines)


class Call(threading.Thread):
    """An API call that blocks until a migration ends (send or receive), on a thread of its own."""

    def __init__(self, name: str, call: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self._call = call
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._call()
        except BaseException as exc:  # reported to the test, which judges it
            self.error = exc


class CaseRun:
    """One case of the matrix, from a healthy source to a judged outcome (see the module docstring)."""

    def __init__(self, case: Case, hosts: Hosts) -> None:
        self.case = case
        self.hosts = hosts
        self.row = Row(case)
        self.source = hosts.source(case.paused)
        hosts.cases += 1
        number = hosts.cases
        self.receiving: Call | None = None
        if case.flow == LOCAL:  # an empty VMM told to receive: it must come back empty after a failure
            self.dest = hosts.empty_vmm()
            inbound = hosts.root / f"in-{number}.sock"
            body = {"receiver_url": f"unix:{inbound}"}
            self.receiving = Call("test-receive", lambda: self.dest.call("PUT", "vm.receive-migration", body,
                                                                         timeout=API_TIMEOUT_S))
            self.receiving.start()
            try:
                _wait_for_path(inbound)
            except BaseException:
                hosts.retire_empty()  # it may still be receiving: never hand it to another case
                raise
            target, listen = f"unix:{inbound}", f"unix:{hosts.root}/proxy-{number}.sock"
        else:
            self.dest, target = hosts.procs.receive("tcp:127.0.0.1:0")
            listen = "tcp:127.0.0.1:0"
        many = case.spot.many_iterations
        self.proxy = FaultProxy(target, listen, Fault(case.spot.point(self.source_state), case.action),
                                probe=self.source_state, rate=MANY_ITERATIONS_RATE if many else None)
        self.options = {**FLOW_OPTIONS[case.flow], **(MANY_ITERATIONS if many else {})}
        self.sending: Call | None = None
        self.dest_running = False
        self._settled_at = 0.0

    def source_state(self) -> str:
        return str(self.source.info()["state"])

    def fail(self, violation: str) -> None:
        self.row.violations.append(violation)

    def run(self) -> Row:
        try:
            self.proxy.start()
            body = {"destination_url": self.proxy.url, **self.options}
            self.sending = Call("test-send", lambda: self.source.call("PUT", "vm.send-migration", body,
                                                                      timeout=API_TIMEOUT_S))
            self.sending.start()
            if self._reach() and self._source_gave_up():
                if self.case.spot.after_complete:
                    self._judge_after_complete()
                else:
                    self._judge_before_complete()
        except (ApiError, AssertionError, OSError) as exc:
            self.fail(f"{type(exc).__name__}: {exc}")
        finally:
            self._clean_up()
        return self.row

    # -- the steps ---------------------------------------------------------------------------------

    def _reach(self) -> bool:
        """Wait for the fault to fire; the source's state at that moment must be the one the spot implies."""
        assert self.sending is not None
        deadline = time.monotonic() + REACH_S
        while not self.proxy.fired.wait(0.05):
            if self.sending.is_alive() and time.monotonic() < deadline:
                continue
            if self.proxy.fired.is_set():  # it fired and the migration ended, both since the wait above
                break
            outcome = self.sending.error or ("completed" if not self.sending.is_alive() else "still running")
            self.fail(f"the fault point was never reached (migration: {outcome})")
            return False
        self.row.vm_at_spot = str(self.proxy.at_fire)
        if self.row.vm_at_spot != self.case.vm_at_spot:
            self.fail(f"the VM was {self.row.vm_at_spot} at the fault, expected {self.case.vm_at_spot}")
        return True

    def _source_gave_up(self) -> bool:
        """Wait (within the case's bound) for the source to end the migration; record how long it took."""
        assert self.proxy.fired_at is not None
        bound = self.case.bound_s
        info = self._wait_source(self.proxy.fired_at + bound)
        if info is None:
            self.fail(f"the source was still migrating {bound:.0f} s after the {self.case.action.value}")
            self.proxy.close()  # end the stall, so the table can show what the source does then
            info = self._wait_source(time.monotonic() + 30)
            if info is None:
                self.row.source = "still migrating"
                return False
        self.row.recovery_s = self._settled_at - self.proxy.fired_at
        migration = info.get("migration", {})
        self.row.source = f"{info['state']}, {migration.get('status')}"
        return True

    def _wait_source(self, deadline: float) -> dict | None:
        while time.monotonic() < deadline:
            info = self.source.info()
            if "migration_in_progress" not in info and info.get("migration", {}).get("status") != "running":
                self._settled_at = time.monotonic()
                return info
            time.sleep(0.02)
        return None

    def _judge_before_complete(self) -> None:
        case = self.case
        info = self.source.info()
        expected = PAUSED if case.paused else RUNNING
        if info["state"] != expected:
            self.fail(f"the source VM is {info['state']} after the failure, expected {expected}")
        if info["migration"]["status"] != "failed":
            self.fail(f"migration.status is {info['migration']['status']!r}, expected 'failed'")
        self._join_sending()
        if self.sending is not None and not isinstance(self.sending.error, ApiError):
            self.fail(f"send-migration did not answer an error: {self.sending.error or self.sending.result}")
        self._guest_continues(self.source, running=info["state"] == RUNNING)
        if case.action is Action.STALL:
            self.proxy.close()  # the partition heals with the connections gone
        self._destination_gone()

    def _judge_after_complete(self) -> None:
        info = self.source.info()
        migration = info["migration"]
        if info["state"] != PAUSED:
            self.fail(f"the source VM is {info['state']} after Complete was sent: it must stay Paused")
        if migration["status"] != "unknown" or not migration.get("error"):
            self.fail(f"migration.status is {migration['status']!r} (error {migration.get('error')!r}), "
                      "expected 'unknown' with an error")
        self.proxy.close()
        self._join_sending()
        self.dest_running = self._destination_outcome()
        source_running = self.source_state() == RUNNING
        if self.dest_running and source_running:
            self.fail("two copies: the source runs the VM, and the destination got Complete")
        if self.dest_running:
            self._guest_continues(self.dest, running=not self.case.paused)
            if not source_running and self.source_state() == RUNNING:
                self.fail("the source resumed later, while the destination runs the VM")
        else:
            if not source_running:
                self.source.call("PUT", "vm.resume")
            self._guest_continues(self.source, running=True)

    # -- the checks ---------------------------------------------------------------------------------

    def _guest_continues(self, vmm: VmmProcess, running: bool) -> None:
        """0 errors, and (if running) two more rounds."""
        info = vmm.info()
        if running:
            try:
                info = vmm.wait_rounds(info["guest"]["rounds"] + 2, timeout=ROUNDS_S)
            except AssertionError:
                self.fail(f"the guest on {vmm.api} does not count rounds any more")
        if info["guest"]["errors"]:
            self.fail(f"the guest on {vmm.api} counted {info['guest']['errors']} errors")

    def _destination_gone(self) -> None:
        """A failed migration ends ``chmig receive`` (exit 1, one error line) or leaves an empty VMM empty."""
        if self.case.spot.first_request:
            self._destination_still_listening()
            return
        if self.receiving is not None:
            self.receiving.join(DESTINATION_S)
            if self.receiving.is_alive():
                self.row.destination = "still receiving"
                self.fail(f"the empty VMM was still receiving {DESTINATION_S:.0f} s later")
                return
            if not isinstance(self.receiving.error, ApiError):
                self.fail(f"receive-migration did not fail: {self.receiving.error or self.receiving.result}")
            if _empty(self.dest):
                self.row.destination = "empty VMM again"
            else:
                self.row.destination = "not an empty VMM"
                self.fail("the destination VMM is not back to an empty VMM answering the API")
            return
        try:
            code = self.dest.proc.wait(DESTINATION_S)
        except Exception:
            self.row.destination = "still running"
            self.fail(f"chmig receive was still running {DESTINATION_S:.0f} s later")
            return
        assert self.dest.proc.stdout is not None
        errors = [line for line in self.dest.proc.stdout.read().splitlines()
                  if line.startswith("chmig receive: error:")]
        self.row.destination = f"exit {code}"
        if code != 1 or len(errors) != 1:
            self.fail(f"chmig receive exited {code} with {len(errors)} error lines, expected 1 and 1")

    def _destination_still_listening(self) -> None:
        """No whole request reached the destination: it logged the connection, dropped it, and still waits."""
        deadline = time.monotonic() + DESTINATION_S
        while "ignoring a connection" not in _read(self.dest.log):
            if time.monotonic() > deadline or self.dest.proc.poll() is not None:
                self.row.destination = "gone" if self.dest.proc.poll() is not None else "?"
                self.fail("the destination did not log and drop the connection that brought no request")
                return
            time.sleep(0.05)
        alive = self.dest.proc.poll() is None and (self.receiving is None or self.receiving.is_alive())
        if not alive or not _empty(self.dest):
            self.row.destination = "gone"
            self.fail("the destination stopped listening, though no migration reached it")
            return
        self.row.destination = "still listening"
        if self.receiving is not None:  # the operator's way out: cancel, and the VMM is an empty VMM again
            self.dest.call("PUT", "vm.cancel-migration")
            self.receiving.join(DESTINATION_S)

    def _destination_outcome(self) -> bool:
        """After Complete: does the destination have the VM (True: it got Complete) or is it gone (False)?"""
        deadline = time.monotonic() + DESTINATION_S
        while time.monotonic() < deadline:
            if self.receiving is not None:
                if not self.receiving.is_alive():
                    if self.receiving.error is None:
                        self.row.destination = f"{self.dest.info()['state']} (got Complete)"
                        return True
                    self._destination_gone()
                    return False
            elif self.dest.proc.poll() is not None:
                self._destination_gone()
                return False
            else:
                try:
                    state = self.dest.info()["state"]
                    self.row.destination = f"{state} (got Complete)"
                    return True
                except ApiError:
                    pass  # no VM yet: still receiving
            time.sleep(0.05)
        self.row.destination = "undecided"
        self.fail(f"the destination neither runs the VM nor ended {DESTINATION_S:.0f} s after the source gave up")
        return False

    def _join_sending(self) -> None:
        if self.sending is not None:
            self.sending.join(30)
            if self.sending.is_alive():
                self.fail("the send-migration API call did not return")

    def _clean_up(self) -> None:
        try:
            self.proxy.close()
        except RuntimeError as exc:
            self.fail(str(exc))
        self.row.transcript = self.proxy.transcript()
        self._join_sending()
        if self.receiving is None:
            self.dest.stop()
        elif self.receiving.is_alive() or self.dest_running or self.row.violations:
            self.hosts.retire_empty()
        if self.dest_running or self.row.violations:
            self.row.logs = self.source.tail(30) + "\n" + self.dest.tail(30)
            self.hosts.retire_source()  # it may still be paused for a VM that lives on elsewhere, or be odd


def run_case(case: Case, hosts: Hosts) -> Row:
    return CaseRun(case, hosts).run()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _wait_for_path(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

HEADINGS = ["flow", "fault point", "action", "VM at point", "source after", "recovery", "destination", "result"]


def format_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADINGS) + " |", "|" + "---|" * len(HEADINGS)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |" for row in rows]
    failed = sum(1 for row in rows if row.violations)
    lines.append(f"\n{len(rows)} cases, {len(rows) - failed} pass, {failed} fail")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------

#: Rows of the matrix in the order they ran, printed when the module ends.
ROWS: list[Row] = []


class _TableReport:
    """A plugin registered by the ``hosts`` fixture: prints the matrix in pytest's terminal summary."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not ROWS:
            return
        table = format_table(ROWS)
        self.path.write_text(table + "\n")
        terminalreporter.section("cut-point matrix")
        terminalreporter.write_line(f"(also in {self.path})")
        for line in table.splitlines():
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Hosts]:
    hosts = Hosts(tmp_path_factory.mktemp("cut"))
    # Output of a fixture is captured; the terminal summary is not.
    request.config.pluginmanager.register(_TableReport(hosts.root / "cut-points.md"), "cut-point-table")
    yield hosts
    hosts.close()


@pytest.mark.parametrize("case", matrix(), ids=str)
def test_cut_point(hosts: Hosts, case: Case) -> None:
    row = run_case(case, hosts)
    ROWS.append(row)
    assert not row.violations, row.report()


@pytest.mark.parametrize("flow,key", [(TCP2, "Memory-final"), (TCP2, "State"), (LOCAL, "State")])
def test_a_failure_after_the_pause_resumes_the_vm(hosts: Hosts, flow: str, key: str) -> None:
    """The regression points: the sender had paused the VM and had not sent Complete; it must resume it."""
    row = run_case(Case(flow, spot(flow, key), Action.ERROR), hosts)
    assert row.vm_at_spot == PAUSED, row.report()  # the failure came after the pause ...
    assert row.source_state == RUNNING, row.report()  # ... and the VM runs again
    assert not row.violations, row.report()


# ---------------------------------------------------------------------------------------------
# Without pytest: python -m tests.test_cut_points --table
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.test_cut_points",
                                     description="Run the cut-point matrix and print its table.")
    parser.add_argument("--table", action="store_true", help="print the table as Markdown (the default)")
    parser.add_argument("-k", default="", help="only the cases whose id contains this")
    args = parser.parse_args(argv)
    cases = [case for case in matrix() if args.k in str(case)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cut-") as root:
        hosts = Hosts(Path(root))
        try:
            for case in cases:
                row = run_case(case, hosts)
                rows.append(row)
                print(f"{case}: {'pass' if not row.violations else 'FAIL'}", file=sys.stderr, flush=True)
        finally:
            hosts.close()
    print(format_table(rows))
    return 0 if all(not row.violations for row in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
