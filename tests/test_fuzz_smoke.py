"""A short, fixed-seed run of the hostile-peer wire fuzzer (fuzz/wire.py): every mutation kind, both targets.

One real migration is recorded for the module (``chmig run`` → recording proxy → ``chmig receive``); each
case then replays it mutated from a raw socket.  In-process cases run :class:`chmig.receive.Receiver` on a
thread here (with fd, thread and peak-RSS accounting); process cases start ``python -m chmig receive``.
A failing case prints its seed and index: ``python -m fuzz --target wire --seed 1 --only INDEX`` replays it.

The cases that found bugs in chmig are kept as regressions of their own (``test_case_that_found_a_bug``),
each naming its bug: they must pass, and a return of the bug's own symptom is reported as that regression.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from fuzz.mutations import KINDS
from fuzz.wire import WireFuzzer, kind_of

from .conftest import requires_kvm

pytestmark = [requires_kvm, pytest.mark.timeout(120)]

SEED = 1
#: In-process: the first four cases of each of the 15 kinds (60); process: the first case of ten kinds.
PER_KIND = 4
PROCESS_KINDS = ("replay", "close", "close-mid", "flip", "header-length", "out-of-state", "config-json", "ranges",
                 "workers", "fds")

# Bugs the fuzzer found in chmig (all fixed), each pinned as the (seed, index) case that reproduced it, with
# the text its failure showed.


@dataclass(frozen=True)
class Bug:
    reason: str
    #: Text one of the case's failures contains when it is this bug (any other failure fails the test).
    shows: str


COERCION = Bug("Config/State values are coerced (int(), bool(), & 0xFFFFFFFF) instead of type- and range-checked: "
               "wrong types and out-of-range numbers are answered Ok", "answered Ok to a request the protocol forbids")
UNBOUNDED_ERROR = Bug("the refusal embeds the peer's data with repr(): the one error line (stderr, log, exception) "
                      "grows with the payload, megabytes long", "error message of")
ZONE_ID_CRASH = Bug("a zone id with a NUL byte (or a lone surrogate) makes memfd_create raise ValueError "
                    "(UnicodeEncodeError): 'bug in chmig while handling Config' with a traceback", "raceback")
NOT_UTF8 = Bug("a Config in UTF-16 or UTF-32 is accepted (json.loads on bytes guesses the encoding); JSON must be "
               "UTF-8", "answered Ok to a request the protocol forbids")
PINNED: list[tuple[int, int, str, Bug]] = [
    (7, 643, "inprocess", COERCION),          # common_cpuid[0].eax = 2**32, silently masked to 0
    (7, 201, "process", COERCION),            # guest_ram_mappings[0].virtio_mem = "false", read as True
    (7, 850, "inprocess", COERCION),          # State devices.guest.vcpus[0].ticks = true
    (7, 2137, "inprocess", UNBOUNDED_ERROR),  # file_offset = a 1 MiB string: a 1 MiB error line
    (7, 1798, "process", UNBOUNDED_ERROR),    # a mapping = an 8 MiB string: an 8 MiB "chmig receive: error:" line
    (1, 1485, "inprocess", ZONE_ID_CRASH),    # extra zone id "nul\x00"
    (1, 1485, "process", ZONE_ID_CRASH),
    (1, 812, "inprocess", NOT_UTF8),          # the Config encoded as UTF-16
]


def _indexes(kinds: tuple[str, ...] | list[str], per_kind: int) -> list[int]:
    """The first ``per_kind`` case indexes of each kind for SEED (kind_of needs no recording)."""
    wanted = {kind: per_kind for kind in kinds}
    found: list[int] = []
    index = 0
    while any(wanted.values()):
        kind = kind_of(SEED, index)
        if wanted.get(kind):
            wanted[kind] -= 1
            found.append(index)
        index += 1
    return found


def _params(target: str, indexes: list[int]) -> Iterator[pytest.param]:
    for index in indexes:  # (none of SEED's smoke cases hits a known bug today; those are pinned below)
        yield pytest.param(target, index, id=f"{target}-{index}-{kind_of(SEED, index)}")


CASES = [*_params("inprocess", _indexes(list(KINDS), PER_KIND)),
         *_params("process", _indexes(PROCESS_KINDS, 1))]
# The cases that found bugs (all fixed), kept as regressions: each must now pass.
BUG_CASES = [pytest.param(seed, index, target, bug, id=f"seed{seed}-{index}-{target}")
             for seed, index, target, bug in PINNED]


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WireFuzzer]:
    """One recorded migration for every case of the module."""
    workdir: Path = tmp_path_factory.mktemp("fuzz")
    wire = WireFuzzer(workdir)
    yield wire
    wire.close(keep=True)  # tmp_path_factory cleans up; keep the logs of failures until then


@pytest.mark.parametrize("target, index", CASES)
def test_wire_case(fuzzer: WireFuzzer, target: str, index: int) -> None:
    result = fuzzer.run_case(SEED, index, target)
    assert not result.failed, result.describe(f"python -m fuzz --target wire --seed {SEED} --only {index} --{target}")


@pytest.mark.parametrize("seed, index, target, bug", BUG_CASES)
def test_case_that_found_a_bug(fuzzer: WireFuzzer, seed: int, index: int, target: str, bug: Bug) -> None:
    result = fuzzer.run_case(seed, index, target)
    report = result.describe(f"python -m fuzz --target wire --seed {seed} --only {index} --{target}")
    assert not any(bug.shows in failure for failure in result.failures), f"regression: {bug.reason}\n{report}"
    assert not result.failed, report


# ---------------------------------------------------------------------------------------------
# The postcopy pager fuzzer (fuzz/pager.py): the destination's pager against a hostile source, in process
# ---------------------------------------------------------------------------------------------

PAGER_SEED = 1
#: The first 150 cases of PAGER_SEED reach every mutation kind (about 15 s).
PAGER_CASES = 150


def test_pager_fuzz_smoke() -> None:
    """A fixed-seed run of the pager fuzzer: no case fails, and every mutation kind was answered at least once."""
    from fuzz import pager

    outcomes = list(pager.play(PAGER_SEED, range(PAGER_CASES)))
    failed = [o for o in outcomes if not o.ok]
    assert not failed, "\n".join(
        f"case {o.index} [{o.kind}]: {o.detail}\n  replay: python -m fuzz --target pager --seed {PAGER_SEED} "
        f"--only {o.index}" for o in failed)
    reached = {o.kind for o in outcomes}  # "valid (not reached)" when the planned request never came
    missing = set(pager.KINDS) - reached
    assert not missing, f"the smoke no longer reaches these mutation kinds: {sorted(missing)}"
    ends = {o.end for o in outcomes}
    assert {"whole", "failed", "stopped"} <= ends, f"the smoke's cases ended only as {sorted(ends)}"


# ---------------------------------------------------------------------------------------------
# The offload daemon fuzzer (fuzz/offload.py): a hostile VMM against both ends of the daemon, in process
# ---------------------------------------------------------------------------------------------

OFFLOAD_SEED = 1
#: Even cases fuzz the snapshot side, odd ones the on-demand restore; the first 300 of OFFLOAD_SEED reach every
#: mutation kind of both (about 20 s: the stalls and silences wait for the daemon's 1 s timeouts).
OFFLOAD_CASES = 300


@pytest.mark.timeout(90)
def test_offload_fuzz_smoke() -> None:
    """A fixed-seed run of the offload fuzzer: no case fails, every mutation kind of both sides was played, and
    the snapshot it restores from is unchanged on disk."""
    from fuzz import offload

    outcomes = list(offload.play(OFFLOAD_SEED, range(OFFLOAD_CASES)))
    failed = [o for o in outcomes if not o.ok]
    assert not failed, "\n".join(
        f"case {o.index} [{o.side} {o.kind}]: {o.detail}\n  replay: python -m fuzz --target offload "
        f"--seed {OFFLOAD_SEED} --only {o.index}" for o in failed)
    reached = {(o.side, o.kind) for o in outcomes}
    wanted = {("snapshot", kind) for kind in offload.SNAPSHOT_KINDS} | {("restore", kind)
                                                                         for kind in offload.RESTORE_KINDS}
    missing = wanted - reached
    assert not missing, f"the smoke no longer reaches these mutation kinds: {sorted(missing)}"
