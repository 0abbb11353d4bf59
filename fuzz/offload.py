"""The offload daemon (:mod:`chmig.offload`), fuzzed in process from both of its ends.

    python -m fuzz --target offload --cases N --seed S [--only INDEX ...]

Even cases play a **hostile VMM** against :class:`~chmig.offload.SnapshotReceiver` (the daemon's snapshot
side), odd cases a **hostile receiving VMM** against :class:`~chmig.offload.RestoreSender` with ``ondemand``
(the restore side that serves PageFaults by writing into the memfds).  Everything is real: UNIX sockets, memfds
passed as SCM_RIGHTS, the snapshot directory on disk; the daemon runs on a thread of this process with short
timeouts.  A case is fixed by ``(seed, index)``.

Snapshot (a VMM of one to three slots, some sharing one memfd at non-zero ``file_offset``; pages stamped,
some left holes) sends Start, a MemoryFd per slot, Config, State and the completion, with one mutation:
an Abandon; a close, a truncated message or a stall at any step; a request out of order, an unknown command,
a wrong protocol version or header length; a MemoryFd without its fd, with the fd on the wrong bytes, with two
fds, for a duplicate, unknown or missing slot, too many of them; an fd that is no memfd (pipe, socket,
/dev/null, directory, eventfd, a write-only file; a read-only file works), too small or larger; a hostile
Config (malformed, not UTF-8, NaN, a nesting bomb, no or empty mappings, too many, wrong types, negative,
beyond 2^64, unaligned, empty, overlapping, duplicate slots, huge sizes, ``file_offset`` beyond the fd, an
extra slot); a malformed State; a second VMM connecting meanwhile.  An independent model says which step the
daemon must refuse.  Checks: every request before it answered Ok, that one answered Error (an Abandon: Ok)
and then the connection closed; the daemon ends within a bound with the snapshot written (every memory file
equal to its slot's bytes in the fd, the Config and State byte for byte, the manifest verifying) or with one
clear :class:`~chmig.errors.ChmigError` (never another exception) and nothing at the target, no partial
directory, no socket file; no fd and no thread left behind.

Restore on demand (a snapshot of three slots, two adjacent — a range may span them — and one after a gap at a
non-zero ``file_offset``; a copy of it with one flipped byte): the hostile VMM answers the daemon's Start,
MemoryFds, Config, State and Complete (or, once per case, answers Error, an unknown status, a payload, or
closes or stays silent instead — a lost Ok to Complete must be served anyway), takes 1–3 Fault connections,
then sends PageFaults: valid ranges, ranges spanning slots, repeats of served pages (after writing a marker
into the page through its own mapping of the memfd), the same range on two connections at once, and one
hostile request — outside every slot, in the gap, past the end, at 2^64, wrapping, empty, unaligned, over
1 GiB, another command, a wrong length, an unknown command, a truncated request, a corrupt chunk, a page
of a memfd the VMM has shrunk — or an early close.  Checks: Error answered for every bad request; the daemon ends within a bound, successfully
exactly when every page was asked for and every connection closed cleanly; every page of the memfds holds
what the snapshot holds if it was served (or its 2 MiB chunk was: the daemon writes whole chunks), zeros if it
was never asked for, and the marker if it was written
after being served (never rewritten); the snapshot's files unchanged; no fd, no thread left behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import mmap
import os
import random
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from chmig import protocol as p
from chmig.errors import ChmigError
from chmig.offload import RestoreSender, SnapshotImage, SnapshotReceiver, SnapshotResult
from chmig.snapshot_dir import CHUNK_SIZE, verify_directory

from .common import BugLog, Resources, standalone_main, unclear

Report = Callable[[str], None]

PAGE = p.PAGE_SIZE
KiB, MiB = 1 << 10, 1 << 20
U64 = 1 << 64
#: Seconds the daemon has to end once the fuzzer has done its part.
BOUND_S = 10.0
#: Short patience, so that the cases which wait for a timeout stay fast; few slots, so "too many" is cheap.
LIMITS = dataclasses.replace(p.DEFAULT_LIMITS, stall_timeout_s=1.0, first_request_timeout_s=1.0,
                             response_timeout_s=1.0, max_slots=8)
HEADER = struct.Struct("<H6sQ")
OK, ERROR = 1, 2
C = p.Command


def header(command: int, length: int, extra: bytes = bytes(6)) -> bytes:
    return HEADER.pack(command, extra, length)


def pattern(tag: int, offset: int, length: int) -> bytes:
    """Recognisable bytes: every 8 bytes their own offset, mixed with ``tag``."""
    return struct.pack(f"<{length // 8}Q", *((tag << 40) ^ (o + 1) for o in range(offset, offset + length, 8)))


@dataclass
class Outcome:
    index: int
    side: str
    kind: str
    ok: bool
    detail: str = ""


# ---------------------------------------------------------------------------------------------
# Sockets
# ---------------------------------------------------------------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        try:
            chunk = sock.recv(n - len(data))
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_answer(sock: socket.socket, timeout: float = BOUND_S) -> tuple[str, int, int]:
    """("answer", status, length), ("closed", 0, 0) or ("timeout", 0, 0)."""
    sock.settimeout(timeout)
    try:
        data = recv_exact(sock, 16)
    except TimeoutError:
        return "timeout", 0, 0
    except OSError:
        return "closed", 0, 0
    if len(data) < 16:
        return "closed", 0, 0
    status, _, length = HEADER.unpack(data)
    return "answer", status, length


def wait_closed(sock: socket.socket, timeout: float = BOUND_S) -> str | None:
    """None once the peer closed; else what it did instead."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(64)
    except TimeoutError:
        return f"still open after {timeout:g} s"
    except OSError:
        return None
    return None if not data else f"sent {len(data)} more bytes"


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int], at: int, split: bool = False) -> None:
    """Send ``data``; ``fds`` ride on the byte at offset ``at`` (nowhere if ``at`` is past the end); ``split``:
    that byte goes alone, the rest after it."""
    if not fds or at >= len(data):
        sock.sendall(data)
        return
    if at:
        sock.sendall(data[:at])
    rest = data[at:at + 1] if split else data[at:]
    sent = socket.send_fds(sock, [rest], fds)
    if sent < len(rest):
        sock.sendall(rest[sent:])
    if split:
        sock.sendall(data[at + 1:])


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# Snapshot: a hostile VMM against SnapshotReceiver
# ---------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One request the VMM sends: its bytes, the fds riding on the byte at ``fd_at``, and the answer due."""

    label: str
    data: bytes
    fds: list[int] = field(default_factory=list)
    fd_at: int = 16
    #: Send the byte carrying the fds alone, the rest of the request after it.
    split: bool = False
    #: "ok", "error" (refused: Error, then the daemon closes), "abandon" (Ok, then the daemon closes).
    expect: str = "ok"


@dataclass
class SlotSpec:
    slot: int
    gpa: int
    size: int
    file_offset: int
    fd: str  # which of the case's memory fds


@dataclass
class SnapshotPlan:
    kind: str
    detail: str
    steps: list[Step]
    #: "ok" (a snapshot), "refused" (a step expects Error or Abandon), "close", "truncate", "stall".
    ending: str
    #: The step of the ending ("close": before it; "truncate"/"stall": inside or before it).
    at: int = -1
    cut: int = 0
    slots: list[SlotSpec] = field(default_factory=list)
    fds: dict[str, int] = field(default_factory=dict)
    config: bytes = b""
    state: bytes = b""
    #: A second VMM connects while the first one runs (it must be closed by the end).
    second: bool = False
    #: Fds the fuzzer made (closed after the case).
    own_fds: list[int] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.ending == "ok" and all(step.expect == "ok" for step in self.steps)


SNAPSHOT_KINDS = {"valid": 10, "abandon": 4, "close": 4, "truncate": 5, "stall": 3, "order": 6, "version": 1,
                  "length": 4, "fd": 10, "slot": 5, "config": 14, "state": 3, "second": 2}


class _Memfds:
    """The memory fds a case's VMM holds."""

    def __init__(self, plan: SnapshotPlan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir

    def memfd(self, name: str, size: int, fill: Callable[[int], None] | None = None) -> int:
        fd = os.memfd_create(f"fuzz-{name}", os.MFD_CLOEXEC)
        self.plan.own_fds.append(fd)
        os.ftruncate(fd, size)
        if fill is not None:
            fill(fd)
        return fd


def _stamp(rng: random.Random, fd: int, size: int, tag: int) -> None:
    """Stamp most pages of ``fd`` (some stay holes), page-run by page-run."""
    pages = size // PAGE
    page = 0
    while page < pages:
        run = min(pages - page, rng.randint(1, 40))
        if rng.random() < 0.75:
            os.pwrite(fd, pattern(tag, page * PAGE, run * PAGE), page * PAGE)
        page += run


def _layout(rng: random.Random, plan: SnapshotPlan, memfds: _Memfds, tag: int) -> None:
    """One to three slots; sometimes two share one memfd (the second at a non-zero file_offset)."""
    count = rng.randint(1, 3)
    gpa = rng.choice([0, 0, 1 * MiB])
    sizes = [rng.choice([16, 64, 256, 512 + 16, 600]) * PAGE for _ in range(count)]
    share = count >= 2 and rng.random() < 0.4
    extents: dict[str, int] = {}
    slot_numbers = rng.sample(range(8), count) if rng.random() < 0.3 else list(range(count))
    for n, size in enumerate(sizes):
        if share and n == 1:
            name = "m0"
            offset = extents["m0"] + rng.choice([0, PAGE, 64 * KiB])
        else:
            name, offset = f"m{n}", rng.choice([0, 0, 0, 2 * PAGE])
        plan.slots.append(SlotSpec(slot_numbers[n], gpa, size, offset, name))
        extents[name] = max(extents.get(name, 0), offset + size)
        gpa += size + rng.choice([0, 0, 64 * KiB, 1 * MiB])
    for name, extent in extents.items():
        plan.fds[name] = memfds.memfd(name, extent, lambda fd, e=extent: _stamp(rng, fd, e, tag))


def _config_bytes(entries: object, rng: random.Random) -> bytes:
    document = {"vm_config": {"cpus": {"boot_vcpus": 1}, "memory": {"size": 0, "shared": True}},
                "memory_manager_data": {"guest_ram_mappings": entries}}
    return json.dumps(document, indent=rng.choice([None, 1])).encode()


def _entries(slots: list[SlotSpec]) -> list[dict]:
    return [{"slot": s.slot, "gpa": s.gpa, "size": s.size, "zone_id": f"z{n}", "virtio_mem": False,
             "file_offset": s.file_offset} for n, s in enumerate(slots)]


def model_config(entries: object, max_slots: int) -> str | None:
    """The snapshot daemon's rule for ``guest_ram_mappings``, restated: why it is refused at Config, or None."""
    if not isinstance(entries, list) or not entries:
        return "no mappings"
    if len(entries) > max_slots:
        return "too many slots"
    spans = []
    for entry in entries:
        if not isinstance(entry, dict):
            return "an entry is not an object"
        values = []
        for name, top in (("slot", 1 << 32), ("gpa", U64), ("size", U64), ("file_offset", U64)):
            value = entry.get(name)
            if type(value) is not int or value < 0 or value >= top:
                return f"bad {name}"
            values.append(value)
        slot, gpa, size, offset = values
        if size == 0 or gpa % PAGE or size % PAGE or offset % PAGE:
            return "empty or unaligned"
        if gpa + size >= U64 or offset + size >= U64:
            return "beyond 2^64"
        spans.append((gpa, gpa + size, slot))
    if sum(hi - lo for lo, hi, _ in spans) > LIMITS.max_guest_ram:
        return "more guest RAM than accepted"
    if len({s for _, _, s in spans}) != len(spans):
        return "duplicate slot"
    spans.sort()
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        return "overlap"
    return None


def model_complete(entries: list[dict], fd_slots: dict[int, tuple[int, str]]) -> str | None:
    """At the completion: one fd per slot, each holding the slot's bytes and readable.  Why not, or None."""
    slots = {e["slot"] for e in entries}
    if slots != set(fd_slots):
        return "MemoryFds do not match the slots"
    for entry in entries:
        size, kind = fd_slots[entry["slot"]]
        if kind not in ("memfd", "readonly"):
            return f"a {kind} fd"
        if size < entry["file_offset"] + entry["size"]:
            return "an fd smaller than its slot"
    return None


def _other_fd(rng: random.Random, plan: SnapshotPlan, workdir: Path, size: int,
              source: int) -> tuple[str, int, int]:
    """(kind, fd, size) of an fd that is not a memfd."""
    kind = rng.choice(["pipe", "socket", "devnull", "directory", "eventfd", "writeonly", "readonly"])
    if kind == "pipe":
        r, w = os.pipe()
        plan.own_fds += [r, w]
        return kind, r, 0
    if kind == "socket":
        a, b = socket.socketpair()
        fa, fb = a.detach(), b.detach()
        plan.own_fds += [fa, fb]
        return kind, fa, 0
    if kind == "devnull":
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        plan.own_fds.append(fd)
        return kind, fd, 0
    if kind == "directory":
        fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        plan.own_fds.append(fd)
        return kind, fd, os.fstat(fd).st_size
    if kind == "eventfd":
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        plan.own_fds.append(fd)
        return kind, fd, 0
    path = workdir / f"ram-{kind}-{os.getpid()}"
    with open(path, "wb") as file:  # the same bytes as the memfd it replaces
        file.truncate(size)
    copy = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for start, length in _spans(source, size):
            os.pwrite(copy, os.pread(source, length, start), start)
    finally:
        os.close(copy)
    fd = os.open(path, (os.O_RDONLY if kind == "readonly" else os.O_WRONLY) | os.O_CLOEXEC)
    path.unlink()
    plan.own_fds.append(fd)
    return kind, fd, size


def _spans(fd: int, size: int) -> list[tuple[int, int]]:
    out, position = [], 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:
            break
        if start >= size:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        out.append((start, stop - start))
        position = stop
    return out


def _state_after(steps: list[Step]) -> str:
    """Where the receiver state machine is after ``steps`` (all answered Ok)."""
    state = "Established"
    for step in steps:
        command = HEADER.unpack(step.data[:16])[0]
        state = {C.START: "Started", C.MEMORY_FD: "MemoryFdsReceived", C.CONFIG: "Configured",
                 C.STATE: "StateReceived", C.COMPLETE: "Completed", C.COMPLETE_PAUSED: "Completed"}[command]
    return state


#: The commands each state accepts (Abandon everywhere), restated from the protocol's table.
ALLOWED = {"Established": {C.START}, "Started": {C.MEMORY_FD, C.CONFIG},
           "MemoryFdsReceived": {C.MEMORY_FD, C.CONFIG}, "Configured": {C.STATE},
           "StateReceived": {C.COMPLETE, C.COMPLETE_PAUSED}}


def _request(command: int, rng: random.Random, plan: SnapshotPlan) -> Step:
    """A well-formed request for ``command`` (its payload too), whatever the state."""
    name = C(command).wire_name if command in C._value2member_map_ else f"command {command}"
    if command == C.START:
        return Step(name, p.Request.start().encode())
    if command == C.CONFIG:
        return Step(name, header(command, len(plan.config)) + plan.config)
    if command == C.STATE:
        return Step(name, header(command, len(plan.state)) + plan.state)
    if command == C.MEMORY:
        table = p.MemoryRange(0, PAGE).encode()
        return Step(name, header(command, len(table)) + table + bytes(PAGE))
    if command == C.MEMORY_FD:
        return Step(name, header(command, 4) + struct.pack("<I", 0), [next(iter(plan.fds.values()))])
    if command == C.PAGE_FAULT:
        return Step(name, header(command, 16) + p.MemoryRange(0, PAGE).encode())
    return Step(name, header(command, 0))


def make_snapshot_plan(seed: int, index: int, workdir: Path) -> SnapshotPlan:
    rng = random.Random(f"chmig-offload-snapshot:{seed}:{index}")
    kind = rng.choices(list(SNAPSHOT_KINDS), weights=list(SNAPSHOT_KINDS.values()))[0]
    plan = SnapshotPlan(kind, "", [], "ok")
    memfds = _Memfds(plan, workdir)
    _layout(rng, plan, memfds, index)
    entries = _entries(plan.slots)
    plan.config = _config_bytes(entries, rng)
    plan.state = json.dumps({"vcpus": [{"rip": rng.randrange(1 << 32)}], "devices": {"guest": {"rounds": index}}}
                            ).encode()
    paused = rng.random() < 0.5
    fd_steps = [Step(f"MemoryFd {s.slot}", header(C.MEMORY_FD, 4) + struct.pack("<I", s.slot), [plan.fds[s.fd]])
                for s in plan.slots]
    rng.shuffle(fd_steps)
    # Slot → (size, kind) of the fd that came for it (what the completion will find).
    fd_slots = {s.slot: (os.fstat(plan.fds[s.fd]).st_size, "memfd") for s in plan.slots}
    steps = [Step("Start", p.Request.start().encode()), *fd_steps,
             Step("Config", header(C.CONFIG, len(plan.config)) + plan.config),
             Step("State", header(C.STATE, len(plan.state)) + plan.state),
             Step("CompletePaused" if paused else "Complete", header(C.COMPLETE_PAUSED if paused else C.COMPLETE, 0))]
    plan.steps = list(steps)
    first_fd, config_at, state_at = 1, 1 + len(fd_steps), 2 + len(fd_steps)

    def refuse(at: int, why: str) -> None:
        plan.steps[at].expect = "error"
        plan.steps[:] = plan.steps[:at + 1]
        plan.ending = "refused"
        plan.detail += f"; refused at {plan.steps[at].label}: {why}"

    if kind == "valid":
        plan.detail = f"{len(plan.slots)} slot(s)"
    elif kind == "abandon":
        at = rng.randrange(len(steps))
        plan.steps[:] = steps[:at] + [Step("Abandon", header(C.ABANDON, 0), expect="abandon")]
        plan.ending, plan.detail = "refused", f"Abandon before {steps[at].label}"
    elif kind in ("close", "truncate", "stall"):
        at = rng.randrange(len(steps))
        plan.ending, plan.at = kind, at
        if kind == "truncate" or (kind == "stall" and rng.random() < 0.5):
            plan.cut = rng.randrange(1, len(steps[at].data))
        plan.detail = f"{kind} at {steps[at].label}" + (f" after {plan.cut} bytes" if plan.cut else "")
    elif kind == "order":
        at = rng.randrange(len(steps))
        state = _state_after(steps[:at])
        choices = [c for c in C if c not in ALLOWED[state] and c is not C.ABANDON] + [10, 255, 0xFFFF]
        if state == "Configured":
            choices.append(C.MEMORY)  # allowed by the protocol, refused by the snapshot daemon
        command = rng.choice(choices)
        plan.steps[:] = steps[:at] + [_request(int(command), rng, plan)]
        refuse(at, f"{plan.steps[at].label} in state {state}")
        plan.detail = plan.detail.lstrip("; ")
    elif kind == "version":
        plan.steps[0] = Step("Start", header(C.START, 0, struct.pack("<H4x", rng.choice([2, 7, 0xFFFF]))))
        refuse(0, "protocol version")
    elif kind == "length":
        at = rng.randrange(len(steps))
        command = HEADER.unpack(steps[at].data[:16])[0]
        if command == C.MEMORY_FD:
            length = rng.choice([0, 3, 5, 8, 1 << 40])
        elif command == C.CONFIG:
            length = LIMITS.max_config_bytes + rng.choice([1, 1 << 20, 1 << 40])
        elif command == C.STATE:
            length = LIMITS.max_state_bytes + rng.choice([1, 1 << 30])
        else:
            length = rng.choice([1, 16, 1 << 62])
        plan.steps[at] = Step(steps[at].label, header(command, length) + bytes(min(length, 8)))
        refuse(at, f"length {length}")
        plan.detail = plan.detail.lstrip("; ")
    elif kind == "fd":
        at = rng.randrange(first_fd, config_at)
        step = steps[at]
        slot = struct.unpack("<I", step.data[16:20])[0]
        spec = next(s for s in plan.slots if s.slot == slot)
        variant = rng.choice(["none", "on-header", "split", "two", "other", "other", "small", "large"])
        # (An fd on a later byte of the payload is no mutation: a stream has no byte the fd belongs to, and the
        # daemon may read the payload in one go or not.  "split" sends the slot's first byte with the fd, alone.)
        plan.detail = f"MemoryFd {slot}: {variant}"
        if variant == "none":
            step.fds = []
            refuse(at, "no fd")
        elif variant == "on-header":
            step.fd_at = rng.randrange(0, 16)
            refuse(at, "the fd on the header")
        elif variant == "split":
            step.split = True  # a valid MemoryFd, its payload in two pieces
        elif variant == "two":
            step.fds = [step.fds[0], step.fds[0]]
            refuse(at, "two fds")
        elif variant == "other":
            extent = os.fstat(plan.fds[spec.fd]).st_size
            other, fd, size = _other_fd(rng, plan, workdir, extent, plan.fds[spec.fd])
            step.fds = [fd]
            holes = not any(start < spec.file_offset + spec.size and start + length > spec.file_offset
                            for start, length in _spans(plan.fds[spec.fd], extent))
            # A write-only file whose slot is all holes needs no reading: its snapshot is zeros, rightly.
            fd_slots[slot] = (size, "readonly" if other == "writeonly" and holes else other)
            plan.detail = f"MemoryFd {slot}: a {other} fd" + (" (the slot all holes)" if holes else "")
            # (A success reads the same bytes as the memfd it replaces: the check compares with that one.)
        else:
            extent = spec.file_offset + spec.size
            size = extent - PAGE * rng.randint(1, spec.size // PAGE) if variant == "small" else extent + 5 * PAGE
            fd = memfds.memfd(f"{variant}-{slot}", size, lambda f: os.pwrite(f, pattern(index, 0, PAGE), 0))
            step.fds = [fd]
            fd_slots[slot] = (size, "memfd")
            plan.fds[f"{variant}-{slot}"] = fd
            spec.fd = f"{variant}-{slot}"
    elif kind == "slot":
        variant = rng.choice(["duplicate", "unknown", "missing", "too-many"])
        plan.detail = f"MemoryFds: {variant}"
        if variant == "duplicate":
            at = rng.randrange(first_fd, config_at)
            plan.steps.insert(at + 1, dataclasses.replace(steps[at], label=steps[at].label + " again"))
            refuse(at + 1, "a second MemoryFd for the slot")
        elif variant == "unknown":
            extra = Step("MemoryFd 99", header(C.MEMORY_FD, 4) + struct.pack("<I", 99), [steps[first_fd].fds[0]])
            plan.steps.insert(config_at, extra)
            fd_slots[99] = (0, "memfd")
        elif variant == "missing":
            at = rng.randrange(first_fd, config_at)
            gone = struct.unpack("<I", plan.steps[at].data[16:20])[0]
            del plan.steps[at]
            del fd_slots[gone]
        else:
            more = [Step(f"MemoryFd {100 + n}", header(C.MEMORY_FD, 4) + struct.pack("<I", 100 + n),
                         [steps[first_fd].fds[0]]) for n in range(LIMITS.max_slots + 1 - len(fd_steps))]
            plan.steps[config_at:config_at] = more
            refuse(config_at + len(more) - 1, f"more than {LIMITS.max_slots} MemoryFds")
    elif kind == "config":
        _mutate_config(rng, plan, entries, fd_slots)
    elif kind == "state":
        variant = rng.choice([b"", b"{", b'{"a": NaN}', b"\xff\xfe{}", b"[1, 2", b"[]", b'"just a string"', b"1"])
        plan.steps[state_at] = Step("State", header(C.STATE, len(variant)) + variant)
        plan.state = variant
        plan.detail = f"State {variant[:20]!r}"
        if variant in (b"", b"{", b'{"a": NaN}', b"\xff\xfe{}", b"[1, 2"):
            refuse(state_at, "malformed State")
    elif kind == "second":
        plan.second = True
        plan.detail = "a second VMM connects"

    # The completion, judged by the model (when nothing before it was refused).
    if plan.ending == "ok" and kind in ("valid", "fd", "slot", "config", "second"):
        try:
            final_entries = json.loads(plan.config)["memory_manager_data"]["guest_ram_mappings"]
        except (ValueError, KeyError, TypeError):
            final_entries = None
        if isinstance(final_entries, list) and model_config(final_entries, LIMITS.max_slots) is None:
            why = model_complete(final_entries, fd_slots)
            if why is not None:
                refuse(len(plan.steps) - 1, why)
    plan.detail = plan.detail.lstrip("; ")
    return plan


def _mutate_config(rng: random.Random, plan: SnapshotPlan, entries: list[dict],
                   fd_slots: dict[int, tuple[int, str]]) -> None:
    config_at = next(n for n, s in enumerate(plan.steps) if s.label == "Config")
    raw: bytes | None = None
    entries = json.loads(json.dumps(entries))
    variant = rng.choice(["malformed", "not-utf8", "utf16", "nan", "bomb", "no-mappings", "empty", "too-many",
                          "field", "field", "field", "unaligned", "zero-size", "overlap", "duplicate-slot",
                          "huge-size", "offset-beyond", "wraps", "extra-slot", "alias"])
    target = rng.choice(entries)
    if variant == "malformed":
        raw = plan.config[: rng.randrange(1, len(plan.config))]
    elif variant == "not-utf8":
        raw = plan.config.replace(b'"z0"', b'"z\xff"')
    elif variant == "utf16":
        raw = plan.config.decode().encode("utf-16")
    elif variant == "nan":
        raw = plan.config[:-1] + b', "x": NaN}'
    elif variant == "bomb":
        raw = b"[" * (LIMITS.max_json_containers + 1) + b"]" * (LIMITS.max_json_containers + 1)
    elif variant == "no-mappings":
        raw = rng.choice([b"{}", b"[]", b"null", b'{"memory_manager_data": 1}',
                          b'{"memory_manager_data": {"guest_ram_mappings": {}}}'])
    elif variant == "empty":
        entries = []
    elif variant == "too-many":
        top = max(e["gpa"] + e["size"] for e in entries)
        entries += [{"slot": 200 + n, "gpa": top + n * PAGE, "size": PAGE, "file_offset": 0}
                    for n in range(LIMITS.max_slots + 1 - len(entries))]
    elif variant == "field":
        name = rng.choice(["slot", "gpa", "size", "file_offset"])
        value = rng.choice([-PAGE, U64, U64 - PAGE, 1 << 32, 1.5, str(target[name]), True, False, None, "missing",
                            [PAGE], {"v": PAGE}])
        if value == "missing":
            del target[name]
        else:
            target[name] = value
        variant = f"{name}={value!r}"
    elif variant == "unaligned":
        name = rng.choice(["gpa", "size", "file_offset"])
        target[name] += rng.randrange(1, PAGE)
        variant = f"unaligned {name}"
    elif variant == "zero-size":
        target["size"] = 0
    elif variant == "overlap" and len(entries) >= 2:
        entries[1]["gpa"] = entries[0]["gpa"] + rng.randrange(0, entries[0]["size"] // PAGE) * PAGE
    elif variant == "duplicate-slot" and len(entries) >= 2:
        entries[1]["slot"] = entries[0]["slot"]
    elif variant == "huge-size":
        last = max(entries, key=lambda e: e["gpa"])
        last["size"] = rng.choice([1 << 40, 1 << 62, U64 - last["gpa"] - PAGE])
    elif variant == "offset-beyond":
        target["file_offset"] += rng.choice([1 << 20, 1 << 44, U64 - target["file_offset"] - target["size"] - PAGE])
        target["file_offset"] -= target["file_offset"] % PAGE
    elif variant == "wraps":
        target["gpa"] = U64 - PAGE
        target["size"] = 2 * PAGE
    elif variant == "extra-slot":
        top = max(e["gpa"] + e["size"] for e in entries)
        entries.append({"slot": 77, "gpa": top + MiB, "size": PAGE, "file_offset": 0})
    elif variant == "alias" and len(entries) >= 2:
        # Two slots reading the same bytes of one fd: allowed (each file gets them).
        entries[1]["file_offset"] = entries[0]["file_offset"]
        entries[1]["size"] = min(entries[1]["size"], entries[0]["size"])
        fd_slots[entries[1]["slot"]] = fd_slots[entries[0]["slot"]]
        plan.steps[:] = [s for s in plan.steps if not s.label == f"MemoryFd {entries[1]['slot']}"]
        plan.steps.insert(config_at - 1, Step(f"MemoryFd {entries[1]['slot']}", header(C.MEMORY_FD, 4)
                                              + struct.pack("<I", entries[1]["slot"]),
                                              [plan.fds[plan.slots[0].fd]]))
        for spec in plan.slots:
            if spec.slot == entries[1]["slot"]:
                spec.fd, spec.file_offset, spec.size = plan.slots[0].fd, entries[1]["file_offset"], entries[1]["size"]
        config_at = next(n for n, s in enumerate(plan.steps) if s.label == "Config")
    else:
        variant = f"{variant} (not applicable: unchanged)"
    plan.detail = f"Config: {variant}"
    if raw is None:
        raw = _config_bytes(entries, rng)
        for spec in plan.slots:  # what a success must then have written
            for entry in entries:
                if isinstance(entry, dict) and entry.get("slot") == spec.slot and all(
                        type(entry.get(k)) is int for k in ("gpa", "size", "file_offset")):
                    spec.gpa, spec.size, spec.file_offset = entry["gpa"], entry["size"], entry["file_offset"]
        if model_config(entries, LIMITS.max_slots) is not None:
            raw_reason = model_config(entries, LIMITS.max_slots)
            plan.config = raw
            plan.steps[config_at] = Step("Config", header(C.CONFIG, len(raw)) + raw, expect="error")
            plan.steps[:] = plan.steps[:config_at + 1]
            plan.ending = "refused"
            plan.detail += f"; refused at Config: {raw_reason}"
            return
    else:
        plan.steps[config_at] = Step("Config", header(C.CONFIG, len(raw)) + raw, expect="error")
        plan.steps[:] = plan.steps[:config_at + 1]
        plan.config = raw
        plan.ending = "refused"
        return
    plan.config = raw
    plan.steps[config_at] = Step("Config", header(C.CONFIG, len(raw)) + raw)


def _play_snapshot(plan: SnapshotPlan, sock_path: Path, problems: list[str], thread: threading.Thread) -> None:
    """The VMM's side, in lock-step: each request, then its answer, checked."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    second: socket.socket | None = None
    try:
        sock.settimeout(BOUND_S)
        sock.connect(str(sock_path))
        if plan.second:
            second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            second.settimeout(BOUND_S)
            second.connect(str(sock_path))
            second.sendall(p.Request.start().encode())
        for n, step in enumerate(plan.steps):
            if n == plan.at and plan.ending in ("close", "truncate", "stall"):
                if plan.cut:
                    send_with_fds(sock, step.data[:plan.cut], step.fds, step.fd_at, step.split)
                if plan.ending == "stall":
                    thread.join(BOUND_S)  # the daemon must give up on its own
                    if thread.is_alive():
                        problems.append(f"the daemon waited for a silent VMM more than {BOUND_S:g} s")
                    kind, status, _ = read_answer(sock, 0.5)
                    if kind == "answer" and status != ERROR:
                        problems.append(f"after a stall the daemon answered status {status}")
                return
            try:
                send_with_fds(sock, step.data, step.fds, step.fd_at, step.split)
            except OSError as exc:
                if step.expect == "ok":
                    problems.append(f"{step.label}: the daemon stopped reading: {exc}")
                    return
            kind, status, length = read_answer(sock)
            want = {"ok": OK, "abandon": OK, "error": ERROR}[step.expect]
            if kind != "answer":
                problems.append(f"{step.label}: {kind} instead of {'Ok' if want == OK else 'Error'}")
                return
            if status != want or length:
                problems.append(f"{step.label}: answered status {status} length {length}, expected "
                                f"{'Ok' if want == OK else 'Error'}")
                return
            if step.expect != "ok":
                problem = wait_closed(sock)
                if problem:
                    problems.append(f"after {step.label} answered, the daemon's end is {problem}")
                return
    except OSError as exc:
        problems.append(f"the fuzzer's socket failed: {exc}")
    finally:
        sock.close()
        if second is not None:
            thread.join(BOUND_S)
            problem = wait_closed(second, 2)
            if problem:
                problems.append(f"the second VMM's connection is {problem} after the daemon ended")
            second.close()


def run_snapshot_case(seed: int, index: int, workdir: Path, bug_log: BugLog) -> Outcome:
    fds_before = len(os.listdir("/proc/self/fd"))
    plan = make_snapshot_plan(seed, index, workdir)
    sock_path = workdir / "offload.sock"
    target = workdir / f"snapshot-{index}"
    problems: list[str] = []
    outcome: list[object] = []
    receiver = SnapshotReceiver(sock_path, target, limits=LIMITS)
    listening = threading.Event()

    def daemon() -> None:
        try:
            outcome.append(receiver.run(on_listening=lambda _: listening.set()))
        except BaseException as exc:  # judged below
            outcome.append(exc)
        listening.set()

    thread = threading.Thread(target=daemon, name=f"fuzz-offload-daemon-{index}", daemon=True)
    bug_log.records.clear()
    try:
        thread.start()
        if not listening.wait(BOUND_S) or not sock_path.exists():
            problems.append(f"the daemon did not listen: {outcome}")
        else:
            _play_snapshot(plan, sock_path, problems, thread)
        thread.join(BOUND_S)
        if thread.is_alive():
            receiver.stop()
            problems.append(f"the daemon did not end within {BOUND_S:g} s of the VMM's last move")
            thread.join(BOUND_S)
        result = outcome[0] if outcome else None
        if plan.success:
            if not isinstance(result, SnapshotResult):
                problems.append(f"a valid snapshot failed: {result!r}")
            else:
                problems += _check_snapshot(plan, target)
        elif isinstance(result, SnapshotResult):
            problems.append("the daemon wrote a snapshot it should have refused")
        elif not isinstance(result, ChmigError):
            problems.append(f"the daemon ended with {result!r}, not a ChmigError")
        else:
            line = unclear(str(result))
            if line:
                problems.append(line)
            if target.exists():
                problems.append(f"a snapshot is left at the target after a failure: {sorted(os.listdir(target))}")
        partial = sorted(n for n in os.listdir(workdir) if n.startswith(f".{target.name}.partial-"))
        if partial:
            problems.append(f"partial directories left: {partial}")
        if sock_path.exists():
            problems.append("the socket file is left behind")
    finally:
        close_all(plan.own_fds)
        shutil.rmtree(target, ignore_errors=True)
    problems += [f"chmig logged a bug: {line}" for line in bug_log.records]
    fds_after = len(os.listdir("/proc/self/fd"))
    if fds_after != fds_before:
        problems.append(f"fds {fds_before} -> {fds_after}")
    detail = "; ".join(problems)
    return Outcome(index, "snapshot", plan.kind, not problems, f"{plan.detail}: {detail}"[:3000] if problems else "")


def _check_snapshot(plan: SnapshotPlan, target: Path) -> list[str]:
    """A snapshot the daemon wrote: each memory file is its slot's bytes, Config and State byte for byte."""
    problems = []
    names = sorted(os.listdir(target))
    expected = sorted([f"memory-{s.slot}" for s in plan.slots] + ["manifest.json", "migration_config.json",
                                                                    "state.json"])
    if names != expected:
        return [f"the snapshot holds {names}, expected {expected}"]
    if (target / "migration_config.json").read_bytes() != plan.config:
        problems.append("migration_config.json differs from the Config sent")
    if (target / "state.json").read_bytes() != plan.state:
        problems.append("state.json differs from the State sent")
    for spec in plan.slots:
        want = os.pread(plan.fds[spec.fd], spec.size, spec.file_offset) if spec.size else b""
        got = (target / f"memory-{spec.slot}").read_bytes()
        if got != want:
            problems.append(f"memory-{spec.slot} is not the slot's bytes ({len(got)} vs {len(want)} bytes)")
    try:
        verify_directory(target)
        SnapshotImage(target, LIMITS).close()
    except ChmigError as exc:
        problems.append(f"the snapshot written does not verify: {exc}")
    return problems


# ---------------------------------------------------------------------------------------------
# Restore on demand: a hostile VMM against RestoreSender's PageFault serving
# ---------------------------------------------------------------------------------------------

#: The snapshot restored: slot 0 crosses a 2 MiB chunk, slot 1 follows it (a range may span both), slot 5
#: lies after a gap at a non-zero file_offset.
RESTORE_SLOTS = [SlotSpec(0, 0, 2 * MiB + 64 * KiB, 0, "a"), SlotSpec(1, 2 * MiB + 64 * KiB, 256 * KiB, 0, "b"),
                 SlotSpec(5, 4 * MiB, 512 * KiB, 128 * KiB, "c")]
RAM_END = 4 * MiB + 512 * KiB
#: Start, a MemoryFd per slot, Config, State: then Complete is step 6.
COMPLETE_STEP = len(RESTORE_SLOTS) + 3
#: The flipped byte of the corrupt copy: in slot 0's second chunk.
CORRUPT_AT = CHUNK_SIZE + 5000


@dataclass
class RestoreFixture:
    good: Path
    corrupt: Path
    #: slot → its bytes as the snapshot holds them.
    image: dict[int, bytes]
    digests: dict[str, str]


def make_restore_fixture(workdir: Path) -> RestoreFixture:
    """Write the snapshot the restore cases serve, through the daemon's own snapshot side."""
    plan = SnapshotPlan("fixture", "", [], "ok")
    memfds = _Memfds(plan, workdir)
    rng = random.Random("chmig-offload-restore-fixture")
    plan.slots = [dataclasses.replace(s) for s in RESTORE_SLOTS]
    try:
        for spec in plan.slots:
            extent = spec.file_offset + spec.size
            plan.fds[spec.fd] = memfds.memfd(spec.fd, extent)
            _stamp(rng, plan.fds[spec.fd], extent, 0x77 + spec.slot)
        plan.config = _config_bytes(_entries(plan.slots), rng)
        plan.state = b'{"fixture": true}'
        good = workdir / "restore-good"
        receiver = SnapshotReceiver(workdir / "fixture.sock", good, limits=LIMITS)
        outcome: list[object] = []
        thread = threading.Thread(target=lambda: outcome.append(_run(receiver)), name="fuzz-offload-fixture")
        thread.start()
        deadline = time.monotonic() + BOUND_S
        while not (workdir / "fixture.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(workdir / "fixture.sock"))
            requests = [p.Request.start().encode()]
            for request in requests:
                sock.sendall(request)
                assert read_answer(sock)[1] == OK
            for spec in plan.slots:
                send_with_fds(sock, header(C.MEMORY_FD, 4) + struct.pack("<I", spec.slot), [plan.fds[spec.fd]], 16)
                assert read_answer(sock)[1] == OK
            for data in (header(C.CONFIG, len(plan.config)) + plan.config,
                         header(C.STATE, len(plan.state)) + plan.state, header(C.COMPLETE, 0)):
                sock.sendall(data)
                assert read_answer(sock)[1] == OK
        thread.join(BOUND_S)
        if not outcome or not isinstance(outcome[0], SnapshotResult):
            raise RuntimeError(f"the fixture snapshot failed: {outcome}")
        image = {s.slot: os.pread(plan.fds[s.fd], s.size, s.file_offset) for s in plan.slots}
    finally:
        close_all(plan.own_fds)
    corrupt = workdir / "restore-corrupt"
    shutil.copytree(good, corrupt)
    with open(corrupt / "memory-0", "r+b") as file:
        file.seek(CORRUPT_AT)
        byte = file.read(1)
        file.seek(CORRUPT_AT)
        file.write(bytes([byte[0] ^ 0xFF]))
    return RestoreFixture(good, corrupt, image, _digests(good, corrupt))


def _run(receiver: SnapshotReceiver) -> object:
    try:
        return receiver.run()
    except BaseException as exc:
        return exc


def _digests(*directories: Path) -> dict[str, str]:
    return {f"{d.name}/{f.name}": hashlib.sha256(f.read_bytes()).hexdigest()
            for d in directories for f in sorted(d.iterdir())}


RESTORE_KINDS = {"valid": 10, "spanning": 4, "repeat": 6, "race": 4, "bad-range": 14, "bad-command": 6,
                 "truncated": 3, "early-close": 3, "corrupt": 4, "corrupt-refused": 2, "main": 8, "lost-ok": 3,
                 "shrunk": 3}
#: (what, gpa, length): ranges the daemon must refuse (Error) — never a byte written for them.
BAD_RANGES = [
    ("in the gap", 3 * MiB, PAGE), ("across into the gap", 2 * MiB + 64 * KiB + 256 * KiB - PAGE, 2 * PAGE),
    ("past the end", RAM_END, PAGE), ("across the end", RAM_END - PAGE, 2 * PAGE), ("at 2^64", U64 - PAGE, PAGE),
    ("wraps", U64 - PAGE, 2 * PAGE), ("empty", 0, 0), ("unaligned gpa", 123, PAGE), ("unaligned length", 0, 100),
    ("over 1 GiB", 0, (1 << 30) + PAGE), ("huge", 0, U64 - PAGE), ("below slot 5", 4 * MiB - PAGE, 2 * PAGE)]


@dataclass
class RestorePlan:
    kind: str
    detail: str
    resume: bool
    connections: int
    #: Main connection: (step index, what) — "error", "status", "payload", "close", "silence" — or None.
    main: tuple[int, str] | None = None
    #: Operations on the Fault connections, in order.
    ops: list[tuple] = field(default_factory=list)
    #: Ask for every page at the end (else: close with pages missing).
    finish: bool = True
    corrupt: bool = False
    #: Valid PageFaults sent after State and before answering it.
    early: int = 0
    #: A PageFault in the corrupt chunk sent then too (answered Error), so that the VMM refuses State or Complete.
    corrupt_early: bool = False
    #: Words the daemon's error must hold.
    error_says: str | None = None


def _valid_range(rng: random.Random, spanning: bool = False) -> tuple[int, int]:
    if spanning:  # across slots 0 and 1
        boundary = RESTORE_SLOTS[1].gpa
        return boundary - rng.randint(1, 16) * PAGE, rng.randint(2, 48) * PAGE
    spec = rng.choice(RESTORE_SLOTS)
    pages = spec.size // PAGE
    first = rng.randrange(pages)
    return spec.gpa + first * PAGE, rng.randint(1, min(64, pages - first)) * PAGE


def make_restore_plan(seed: int, index: int) -> RestorePlan:
    rng = random.Random(f"chmig-offload-restore:{seed}:{index}")
    kind = rng.choices(list(RESTORE_KINDS), weights=list(RESTORE_KINDS.values()))[0]
    plan = RestorePlan(kind, "", rng.random() < 0.5, rng.randint(1, 3))
    conn = lambda: rng.randrange(plan.connections)  # noqa: E731
    plan.ops = [("valid", conn(), *_valid_range(rng)) for _ in range(rng.randint(0, 6))]
    if kind == "corrupt":  # only the one range meant to, in the corrupt chunk
        plan.ops = [op for op in plan.ops if not _touches_corrupt(op[2], op[3])]
    plan.early = rng.choice([0, 0, 0, 2])
    if kind == "spanning":
        plan.ops += [("valid", conn(), *_valid_range(rng, spanning=True)) for _ in range(rng.randint(1, 3))]
    elif kind == "repeat":
        plan.ops.append(("repeat", conn(), conn(), *_valid_range(rng, spanning=rng.random() < 0.3)))
    elif kind == "race":
        plan.connections = max(2, plan.connections)
        plan.ops.append(("race", 0, 1, *_valid_range(rng, spanning=rng.random() < 0.3)))
    elif kind == "bad-range":
        what, gpa, length = rng.choice(BAD_RANGES)
        plan.ops.append(("bad", conn(), what, header(C.PAGE_FAULT, 16) + struct.pack("<QQ", gpa, length)))
        plan.detail = what
    elif kind == "bad-command":
        command = rng.choice([c for c in C if c is not C.PAGE_FAULT] + [10, 0xFFFF])
        length = rng.choice([0, 4, 16])
        what = f"command {command}"
        if rng.random() < 0.3:
            command, length, what = C.PAGE_FAULT, rng.choice([0, 8, 24, 1 << 40]), "PageFault of a wrong length"
        plan.ops.append(("bad", conn(), what, header(int(command), length) + bytes(min(length, 24))))
        plan.detail = what
    elif kind == "truncated":
        cut = rng.randrange(1, 32)
        plan.ops.append(("truncated", conn(), cut))
        plan.detail = f"a PageFault cut after {cut} bytes"
    elif kind == "early-close":
        plan.finish = False
        plan.detail = "every connection closed with pages never asked for"
    elif kind == "corrupt":
        plan.corrupt = True
        before = rng.randint(0, 3)
        gpa = (CORRUPT_AT // PAGE - before) * PAGE
        plan.ops.append(("corrupt", conn(), gpa, (before + rng.randint(1, 4)) * PAGE))
        plan.detail = f"a range in the corrupt chunk at {gpa:#x}"
    elif kind == "corrupt-refused":
        # The pull fails on the corrupt chunk while State is handled; the VMM refuses State or Complete for it:
        # the daemon must report the corrupt chunk, not the refusal it caused.
        plan.corrupt, plan.corrupt_early, plan.error_says = True, True, "corrupt"
        plan.ops = []
        plan.main = (rng.choice([COMPLETE_STEP - 1, COMPLETE_STEP]), "error")
        plan.detail = f"a corrupt chunk served while State is handled, then Error to step {plan.main[0]}"
    elif kind == "shrunk":
        spec = rng.choice(RESTORE_SLOTS)
        keep = rng.randrange(spec.size // PAGE)
        first = keep + rng.randrange(spec.size // PAGE - keep)
        pages = rng.randint(1, min(4, spec.size // PAGE - first))
        plan.ops.append(("shrink", conn(), spec.slot, keep, spec.gpa + first * PAGE, pages * PAGE))
        plan.finish = False
        plan.detail = f"the VMM shrinks slot {spec.slot}'s memfd to {keep} pages, then asks for page {first}"
    elif kind in ("main", "lost-ok"):
        if kind == "lost-ok":
            plan.main = (COMPLETE_STEP, "close")
            plan.finish = rng.random() < 0.7
        else:
            plan.main = (rng.randrange(COMPLETE_STEP + 1), rng.choice(["error", "status", "payload", "close",
                                                                       "silence"]))
        plan.detail = f"main: {plan.main[1]} at step {plan.main[0]}" + ("" if plan.finish else ", pages missing")
    return plan


class _Vmm:
    """The receiving VMM played by the fuzzer: its sockets, the memfds it was given, what it asked for."""

    def __init__(self, fixture: RestoreFixture) -> None:
        self.fixture = fixture
        self.main: socket.socket | None = None
        self.faults: list[socket.socket] = []
        self.memfds: dict[int, int] = {}
        self.maps: dict[int, mmap.mmap] = {}
        #: Pages answered Ok (served), pages of refused requests, and marker pages.
        self.served: set[int] = set()
        self.maybe: set[int] = set()
        self.markers: dict[int, bytes] = {}
        self.problems: list[str] = []
        self.refused = 0
        self.dead: set[int] = set()


    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        close_all(self.memfds.values())
        for sock in [self.main, *self.faults]:
            if sock is not None:
                sock.close()

    # -- the main connection ----------------------------------------------------------------------

    def read_request(self, sock: socket.socket) -> tuple[int, int, bytes, list[int]] | None:
        head = recv_exact(sock, 16)
        if len(head) < 16:
            return None
        command, _, length = HEADER.unpack(head)
        fds: list[int] = []
        if command == C.MEMORY_FD:
            data = b""
            while len(data) < length:
                chunk, got, _, _ = socket.recv_fds(sock, length - len(data), 4)
                fds += got
                if not chunk:
                    break
                data += chunk
            return command, length, data, fds
        return command, length, recv_exact(sock, length), fds


def _slot_of(gpa: int) -> SlotSpec | None:
    for spec in RESTORE_SLOTS:
        if spec.gpa <= gpa < spec.gpa + spec.size:
            return spec
    return None


def _touches_corrupt(gpa: int, length: int) -> bool:
    """Does the range touch the chunk of slot 0 that holds the flipped byte (of the corrupt copy)?"""
    start = CORRUPT_AT // CHUNK_SIZE * CHUNK_SIZE
    return gpa < start + CHUNK_SIZE and gpa + length > start


def _valid(gpa: int, length: int) -> bool:
    return all(_slot_of(page * PAGE) is not None for page in _pages(gpa, length))


def _pages(gpa: int, length: int) -> range:
    return range(gpa // PAGE, (gpa + length) // PAGE)


def _play_restore(plan: RestorePlan, vmm: _Vmm, listener: socket.socket, thread: threading.Thread) -> None:
    """Answer the daemon's main connection, take its Fault connections, then send the PageFaults."""
    listener.settimeout(BOUND_S)
    main, _ = listener.accept()
    vmm.main = main
    main.settimeout(BOUND_S)
    step = 0
    complete = C.COMPLETE if plan.resume else C.COMPLETE_PAUSED
    expected = [C.START] + [C.MEMORY_FD] * len(RESTORE_SLOTS) + [C.CONFIG, C.STATE, complete]
    for want in expected:
        request = vmm.read_request(main)
        if request is None:
            vmm.problems.append(f"the daemon closed its main connection before {C(want).wire_name}")
            return
        command, length, payload, fds = request
        if command == C.MEMORY_FD:
            if len(fds) != 1:
                vmm.problems.append(f"a MemoryFd carried {len(fds)} fds")
                close_all(fds)
            else:
                vmm.memfds[struct.unpack("<I", payload)[0]] = fds[0]
        if command != want:
            vmm.problems.append(f"step {step}: the daemon sent command {command}, expected {C(want).wire_name}")
            return
        if command == C.CONFIG and payload != (vmm.fixture.good / "migration_config.json").read_bytes():
            vmm.problems.append("the Config sent is not migration_config.json")
        if command == C.STATE:
            if payload != (vmm.fixture.good / "state.json").read_bytes():
                vmm.problems.append("the State sent is not state.json")
            _take_fault_connections(plan, vmm, listener)
            if vmm.problems:
                return
            _map_memfds(vmm)
            for n in range(plan.early):  # pages asked for while State is handled (before its Ok): slot 5's
                spec = RESTORE_SLOTS[2]
                _page_fault(vmm, 0, spec.gpa + n * 8 * PAGE, 8 * PAGE)
            if plan.corrupt_early:
                _page_fault(vmm, 0, CORRUPT_AT // PAGE * PAGE, PAGE, expect="corrupt")
        if plan.main is not None and plan.main[0] == step:
            what = plan.main[1]
            if what == "close":
                main.close()
                vmm.main = None
            elif what != "silence":
                main.sendall({"error": header(ERROR, 0), "status": header(7, 0), "payload": header(OK, 16)}[what])
            if command == complete and what != "error":
                break  # Complete not acknowledged (no Ok, or a garbled one): the daemon must serve anyway
            if what == "silence":
                thread.join(BOUND_S)
            elif what != "close":
                problem = wait_closed(main)
                if problem:
                    vmm.problems.append(f"after a bad answer to {C(want).wire_name} the daemon's main end is "
                                        f"{problem}")
            return
        main.sendall(header(OK, 0))
        step += 1
    _faults(plan, vmm)


def _take_fault_connections(plan: RestorePlan, vmm: _Vmm, listener: socket.socket) -> None:
    for n in range(plan.connections):
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            vmm.problems.append(f"Fault connection {n} never came")
            return
        sock.settimeout(BOUND_S)
        role = recv_exact(sock, 2)
        if role != p.ConnectionRole.FAULT.encode():
            vmm.problems.append(f"connection {n} announced role {role!r}")
        vmm.faults.append(sock)


def _map_memfds(vmm: _Vmm) -> None:
    for spec in RESTORE_SLOTS:
        fd = vmm.memfds.get(spec.slot)
        if fd is None:
            vmm.problems.append(f"no memfd for slot {spec.slot}")
            continue
        if os.fstat(fd).st_size != spec.file_offset + spec.size:
            vmm.problems.append(f"slot {spec.slot}'s memfd has {os.fstat(fd).st_size} bytes")
            continue
        vmm.maps[spec.slot] = mmap.mmap(fd, spec.file_offset + spec.size, flags=mmap.MAP_SHARED)


def _page_fault(vmm: _Vmm, conn: int, gpa: int, length: int, expect: str = "ok") -> bool:
    """One PageFault on Fault connection ``conn``; True if answered as expected."""
    if conn in vmm.dead:
        return False
    sock = vmm.faults[conn]
    sock.sendall(header(C.PAGE_FAULT, 16) + struct.pack("<QQ", gpa, length))
    kind, status, answer_length = read_answer(sock)
    pages = set(_pages(gpa, length))
    if kind != "answer":
        vmm.problems.append(f"PageFault {gpa:#x}+{length:#x} on fault-{conn}: {kind}")
        return False
    if status == OK and not answer_length:
        if expect in ("ok", "either"):
            # (After a shrink, pages served before are gone, and rightly not written again.)
            vmm.served |= pages - vmm.maybe if expect == "either" else pages
            return True
        vmm.problems.append(f"PageFault {gpa:#x}+{length:#x} ({expect}): answered Ok, not Error")
        vmm.served |= pages
        return False
    if status != ERROR or answer_length:
        vmm.problems.append(f"PageFault {gpa:#x}+{length:#x}: answered status {status} length {answer_length}")
        return False
    if expect == "ok":
        vmm.problems.append(f"PageFault {gpa:#x}+{length:#x}: a valid request answered Error")
    vmm.maybe |= pages
    vmm.refused += 1
    vmm.dead.add(conn)
    problem = wait_closed(sock)
    if problem:
        vmm.problems.append(f"after refusing a PageFault the daemon's end is {problem}")
    return expect != "ok"


def _faults(plan: RestorePlan, vmm: _Vmm) -> None:
    for op in plan.ops:
        what, conn = op[0], op[1]
        if what == "valid":
            _page_fault(vmm, conn, op[2], op[3])
        elif what == "repeat":
            other, gpa, length = op[2], op[3], op[4]
            if not _page_fault(vmm, conn, gpa, length):
                continue
            marked = gpa // PAGE + (length // PAGE) // 2
            spec = _slot_of(marked * PAGE)
            assert spec is not None
            marker = b"MARK" * (PAGE // 4)
            at = spec.file_offset + marked * PAGE - spec.gpa
            vmm.maps[spec.slot][at:at + PAGE] = marker  # the guest wrote the page after it was served
            vmm.markers[marked] = marker
            # Again, on another connection, as the same range or one more page on each side where that is RAM.
            if gpa >= PAGE and _valid(gpa - PAGE, length + 2 * PAGE):
                gpa, length = gpa - PAGE, length + 2 * PAGE
            _page_fault(vmm, other, gpa, length)
        elif what == "race":
            gpa, length = op[3], op[4]
            for n in (0, 1):
                vmm.faults[n].sendall(header(C.PAGE_FAULT, 16) + struct.pack("<QQ", gpa, length))
            for n in (0, 1):
                kind, status, answer_length = read_answer(vmm.faults[n])
                if kind != "answer" or status != OK or answer_length:
                    vmm.problems.append(f"a raced PageFault {gpa:#x}+{length:#x} on fault-{n}: {kind} {status}")
            vmm.served |= set(_pages(gpa, length))
        elif what == "bad":
            sock = vmm.faults[conn]
            if conn in vmm.dead:
                continue
            sock.sendall(op[3])
            kind, status, _ = read_answer(sock)
            if kind != "answer" or status != ERROR:
                vmm.problems.append(f"{op[2]}: answered {kind} {status}, not Error")
            else:
                vmm.refused += 1
            vmm.dead.add(conn)
            problem = wait_closed(sock)
            if problem:
                vmm.problems.append(f"after refusing {op[2]} the daemon's end is {problem}")
            break  # the daemon fails the restore now
        elif what == "truncated":
            sock = vmm.faults[conn]
            sock.sendall((header(C.PAGE_FAULT, 16) + struct.pack("<QQ", 0, PAGE))[: op[2]])
            sock.shutdown(socket.SHUT_WR)
            vmm.dead.add(conn)
            vmm.refused += 1  # a broken connection: the restore fails
            break
        elif what == "corrupt":
            gpa, length = op[2], op[3]
            _page_fault(vmm, conn, gpa, length, expect="corrupt")
            break
        elif what == "shrink":
            slot, keep, gpa, length = op[2], op[3], op[4], op[5]
            spec = next(s for s in RESTORE_SLOTS if s.slot == slot)
            os.ftruncate(vmm.memfds[slot], spec.file_offset + keep * PAGE)
            # What was served past the new end is gone (the VMM's doing): those pages hold nothing now, and the
            # daemon, which never writes a page twice, leaves them so.
            lost = {page for page in range(spec.gpa // PAGE + keep, (spec.gpa + spec.size) // PAGE)}
            vmm.maybe |= (vmm.served | _written_pages(vmm)) & lost
            vmm.served -= lost
            for page in lost:
                vmm.markers.pop(page, None)
            # A page to write now: written (the memfd grows back) or refused with Error — either, never a crash.
            _page_fault(vmm, conn, gpa, length, expect="either")
            break
    if plan.finish and not vmm.refused:
        for spec in RESTORE_SLOTS:  # every page, in ranges of at most 1 MiB, over every connection in turn
            for n, start in enumerate(range(spec.gpa, spec.gpa + spec.size, MiB)):
                _page_fault(vmm, n % plan.connections, start, min(MiB, spec.gpa + spec.size - start))
    for n, sock in enumerate(vmm.faults):
        if n not in vmm.dead:
            sock.shutdown(socket.SHUT_WR)


def run_restore_case(seed: int, index: int, workdir: Path, fixture: RestoreFixture, bug_log: BugLog) -> Outcome:
    fds_before = len(os.listdir("/proc/self/fd"))
    plan = make_restore_plan(seed, index)
    sock_path = workdir / "restore.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(8)
    sender = RestoreSender(sock_path, fixture.corrupt if plan.corrupt else fixture.good, resume=plan.resume,
                           ondemand=True, fault_connections=plan.connections, limits=LIMITS)
    outcome: list[object] = []
    vmm = _Vmm(fixture)
    bug_log.records.clear()

    def daemon() -> None:
        try:
            outcome.append(sender.run())
        except BaseException as exc:  # judged below
            outcome.append(exc)

    thread = threading.Thread(target=daemon, name=f"fuzz-offload-restore-{index}", daemon=True)
    problems = vmm.problems
    try:
        thread.start()
        try:
            _play_restore(plan, vmm, listener, thread)
        except OSError as exc:
            problems.append(f"the fuzzer's socket failed: {exc}")
        thread.join(BOUND_S)
        if thread.is_alive():
            problems.append(f"the daemon did not end within {BOUND_S:g} s of the VMM's last move")
            for sock in [vmm.main, *vmm.faults]:
                if sock is not None:
                    sock.close()
            thread.join(BOUND_S)
        result = outcome[0] if outcome else None
        # Every mutation of the main connection fails the restore, except an unacknowledged Complete.
        main_fails = plan.main is not None and plan.main != (COMPLETE_STEP, "close") and (
            plan.main[0] != COMPLETE_STEP or plan.main[1] == "error")
        # The daemon succeeds when the VMM asked from every 2 MiB chunk (it writes whole chunks) and closed cleanly.
        every_chunk = (len(_served_chunks(vmm, vmm.served | vmm.maybe))  # (a shrink moves served pages to maybe)
                       == sum(-(-spec.size // CHUNK_SIZE) for spec in RESTORE_SLOTS))
        should_succeed = (not main_fails and (plan.finish or every_chunk) and not vmm.refused and not plan.corrupt)
        if should_succeed and not problems:
            if isinstance(result, BaseException):
                problems.append(f"a restore whose VMM asked for every page failed: {result!r}")
            elif sender.result.pages_served != RAM_PAGES:
                problems.append(f"{sender.result.pages_served} pages written, {RAM_PAGES} in the snapshot")
        elif not should_succeed:
            if not isinstance(result, ChmigError):
                problems.append(f"the daemon ended with {result!r}, not a ChmigError")
            else:
                line = unclear(str(result))
                if line:
                    problems.append(line)
                if plan.error_says and plan.error_says not in str(result):
                    problems.append(f"the daemon's error does not say {plan.error_says!r}: {result}")
        written_chunks = _served_chunks(vmm)
        if not vmm.maybe and vmm.maps and sender.result.pages_served != sum(
                min(CHUNK_PAGES, spec.size // PAGE - chunk * CHUNK_PAGES)
                for spec in RESTORE_SLOTS for chunk in range(-(-spec.size // (CHUNK_PAGES * PAGE)))
                if (spec.slot, chunk) in written_chunks):
            problems.append(f"{sender.result.pages_served} pages written, not the pages of the {len(written_chunks)} "
                            "chunks asked from")
        problems += _check_memory(vmm)
        leftover = [t.name for t in threading.enumerate() if t.name.startswith("offload-fault")]
        if leftover:
            problems.append(f"threads left running: {leftover}")
    finally:
        vmm.close()
        listener.close()
        sock_path.unlink(missing_ok=True)
    problems += [f"chmig logged a bug: {line}" for line in bug_log.records]
    fds_after = len(os.listdir("/proc/self/fd"))
    if fds_after != fds_before:
        problems.append(f"fds {fds_before} -> {fds_after}")
    detail = f"{plan.kind} ({plan.detail}, {plan.connections} conn, {len(plan.ops)} ops): {'; '.join(problems)}"
    return Outcome(index, "restore", plan.kind, not problems, detail[:3000] if problems else "")


RAM_PAGES = sum(s.size for s in RESTORE_SLOTS) // PAGE


#: The daemon writes whole chunks of a slot's file (2 MiB from the slot's start): this many pages.
CHUNK_PAGES = CHUNK_SIZE // PAGE


def _served_chunks(vmm: _Vmm, pages: set[int] | None = None) -> set[tuple[int, int]]:
    """(slot, chunk) of every page asked for (or of ``pages``): the daemon writes all of a chunk's pages at once."""
    chunks = set()
    for spec in RESTORE_SLOTS:
        first = spec.gpa // PAGE
        for page in vmm.served if pages is None else pages:
            if first <= page < first + spec.size // PAGE:
                chunks.add((spec.slot, (page - first) // CHUNK_PAGES))
    return chunks


def _written_pages(vmm: _Vmm) -> set[int]:
    """Every page the daemon has written by now: all pages of the chunks asked from."""
    pages = set()
    for slot, chunk in _served_chunks(vmm):
        spec = next(s for s in RESTORE_SLOTS if s.slot == slot)
        first = spec.gpa // PAGE + chunk * CHUNK_PAGES
        pages.update(range(first, min(first + CHUNK_PAGES, (spec.gpa + spec.size) // PAGE)))
    return pages


def _check_memory(vmm: _Vmm) -> list[str]:
    """Served pages hold the snapshot's bytes (or the marker written after); the other pages of a chunk asked
    from hold them too (the daemon writes whole chunks); all others are zeros; nothing before a slot's
    file_offset."""
    problems: list[str] = []
    chunks = _served_chunks(vmm)
    maybe_chunks = _served_chunks(vmm, set(vmm.maybe))
    for spec in RESTORE_SLOTS:
        fd = vmm.memfds.get(spec.slot)
        if fd is None or spec.slot not in vmm.maps:
            continue
        if spec.file_offset and os.pread(fd, spec.file_offset, 0).strip(b"\0"):
            problems.append(f"slot {spec.slot}: bytes written before its file_offset")
        image = vmm.fixture.image[spec.slot]
        for n in range(spec.size // PAGE):
            page = spec.gpa // PAGE + n
            got = os.pread(fd, PAGE, spec.file_offset + n * PAGE).ljust(PAGE, b"\0")  # (past a shrunk end)
            want = image[n * PAGE:(n + 1) * PAGE]
            if page in vmm.markers:
                ok = got == vmm.markers[page]
                what = "the marker written after it was served was overwritten"
            elif page in vmm.served:
                ok = got == want
                what = "a served page does not hold the snapshot's bytes"
            elif page in vmm.maybe or (spec.slot, n // CHUNK_PAGES) in maybe_chunks:
                # part of a refused request (or of a chunk it touched): nothing, or the right bytes
                ok = got == want or not got.strip(b"\0")
                what = "a page of a refused request holds wrong bytes"
            elif (spec.slot, n // CHUNK_PAGES) in chunks:
                ok = got == want
                what = "a page of a chunk asked from does not hold the snapshot's bytes"
            else:
                ok = not got.strip(b"\0")
                what = "a page never asked for was written"
            if not ok:
                problems.append(f"slot {spec.slot} page {n} (gpa {page * PAGE:#x}): {what}")
                if len(problems) > 5:
                    return problems
    return problems


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


class Fuzzer:
    """The work directory, the restore fixture and chmig's log watch, for a run of cases."""

    def __init__(self, workdir: Path | None = None) -> None:
        self.own = workdir is None
        # UNIX socket paths must stay under 108 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="chmig-fuzz-offload-")) if workdir is None else workdir
        self.bug_log = BugLog()
        logger = logging.getLogger("chmig")
        self._saved = (logger.level, logger.propagate)
        logger.addHandler(self.bug_log)
        logger.setLevel(logging.ERROR)  # refusals are logged at ERROR: expected here, thousands of lines
        logger.propagate = False
        self.fixture = make_restore_fixture(self.workdir)

    def case(self, seed: int, index: int) -> Outcome:
        try:
            if index % 2 == 0:
                return run_snapshot_case(seed, index, self.workdir, self.bug_log)
            return run_restore_case(seed, index, self.workdir, self.fixture, self.bug_log)
        except Exception as exc:  # the harness itself: still a failure to look at, with the case to replay
            logging.getLogger("fuzz.offload").exception("case %d", index)
            return Outcome(index, "snapshot" if index % 2 == 0 else "restore", "?", False, f"the case raised {exc!r}")

    def files_unchanged(self) -> str | None:
        now = _digests(self.fixture.good, self.fixture.corrupt)
        return None if now == self.fixture.digests else "the restore changed the snapshot's files on disk"

    def close(self) -> None:
        logger = logging.getLogger("chmig")
        logger.removeHandler(self.bug_log)
        logger.setLevel(self._saved[0])
        logger.propagate = self._saved[1]
        if self.own:
            shutil.rmtree(self.workdir, ignore_errors=True)


def play(seed: int, indexes: Iterable[int]) -> Iterator[Outcome]:
    """The outcome of each case, in order; a last outcome if the run changed the snapshot it restores."""
    fuzzer = Fuzzer()
    try:
        for index in indexes:
            yield fuzzer.case(seed, index)
        changed = fuzzer.files_unchanged()
        if changed:
            yield Outcome(-1, "restore", "files", False, changed)
    finally:
        fuzzer.close()


def run(cases: int, seed: int, report: Report, only: list[int] | None = None) -> int:
    """Run ``cases`` cases (or just ``only``); print a summary; return the number of failures."""
    resources = Resources()
    begin = time.monotonic()
    kinds: dict[tuple[str, str], list[int]] = {}
    failures = 0
    for outcome in play(seed, only if only is not None else range(cases)):
        counts = kinds.setdefault((outcome.side, outcome.kind), [0, 0])
        counts[0] += 1
        if not outcome.ok:
            counts[1] += 1
            failures += 1
            report(f"offload: FAILED case {outcome.index} (seed {seed}, --only {outcome.index}): {outcome.detail}")
    leaked, counts = resources.compare("offload", report)
    failures += leaked
    report(f"offload: {sum(c[0] for c in kinds.values())} cases in {time.monotonic() - begin:.1f} s, "
           f"{failures} failures; {counts}")
    for (side, kind), (count, failed) in sorted(kinds.items()):
        report(f"  {side:<9} {kind:<14} {count:>6} cases  {failed:>4} failed")
    return failures


def main() -> int:
    return standalone_main("python -m fuzz.offload", __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
