"""The reference receiver: what the protocol says each request must be answered, decided from the bytes alone.

The fuzzer's oracle.  It reads a (mutated) source stream exactly as a receiver must frame it — a 16-byte
header, then the payload its command and length announce, then for Memory the bytes of every range — and
gives every request a :class:`Verdict`:

* ``OK``: a valid request in its state (the recorded one, or one the protocol plainly allows).  An Error
  answer, or a hang-up, is a failure: the receiver refused a valid migration.
* ``ERROR``: the protocol forbids it (docs/protocol.md, the limits, the Config and State formats).  An Ok
  answer is a failure.
* ``EITHER``: well framed, but its content may fairly be refused or taken (a changed register value, a
  host limit, an unknown key).

It is written from docs/protocol.md and the documented formats, *not* from chmig's code: the transition
table below is the documented diagram, and the Config/State rules are written out here, so a receiver that
drifts from the documentation is caught rather than copied.  Limits come from the receiver's own
:class:`chmig.protocol.Limits` (they are configuration, not rules).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from chmig import protocol as p

from .common import GiB, MiB, PAGE, Rope

U64 = 1 << 64
MAX_VCPUS = 16  # docs/guest.md: the guest program runs on at most 16 vCPUs
MIN_RAM = 2 * MiB
MAX_GUEST_PHYS = 64 * GiB
ZONE_GRANULE = 2 * MiB
MAX_CPUID_ENTRIES = 1024
#: KVM_SET_CPUID2 refuses more entries than this (E2BIG), whatever the protocol's limit says.
KVM_MAX_CPUID_ENTRIES = 256
WORKLOADS = ("verify", "counter", "idle")
CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


class Verdict(enum.Enum):
    OK = "Ok"
    ERROR = "Error"
    EITHER = "either"


# The documented state machine (docs/protocol.md, "The receiver's state machine"), written out again on
# purpose: the oracle must not read the table it judges.
_TRANSITIONS: dict[tuple[str, int], str] = {
    ("Established", 1): "Started",            # Start
    ("Started", 7): "MemoryFdsReceived",      # MemoryFd
    ("MemoryFdsReceived", 7): "MemoryFdsReceived",
    ("Started", 2): "Configured",             # Config
    ("MemoryFdsReceived", 2): "Configured",
    ("Configured", 4): "Configured",          # Memory
    ("Configured", 10): "Configured",         # Discard (version 1)
    ("Configured", 3): "StateReceived",       # State
    ("StateReceived", 5): "Completed",        # Complete
    ("StateReceived", 8): "Completed",        # CompletePaused
}
_NAMES = {0: "Invalid", 1: "Start", 2: "Config", 3: "State", 4: "Memory", 5: "Complete", 6: "Abandon",
          7: "MemoryFd", 8: "CompletePaused", 9: "PageFault", 10: "Discard"}
#: Start's version field: 0 (Cloud Hypervisor's) and 1 (chmig's, which adds Discard and recovery) are accepted;
#: version 0's Start carries nothing, version 1's nothing or the 16-byte migration token.
_VERSIONS = (0, 1)
_START_PAYLOAD = {0: (0,), 1: (0, 16)}
_NO_PAYLOAD = {5, 6, 8}


def command_name(value: int) -> str:
    return _NAMES.get(value, f"unknown command {value}")


# ---------------------------------------------------------------------------------------------
# File descriptors a case passes with MemoryFd
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FdSpec:
    """An fd the fuzzer will create and pass: what it is, and whether it can back guest memory."""

    kind: str
    #: Its size as fstat reports it.
    size: int = 0
    #: Can it be mapped shared, read-write (a memfd or a file opened read-write)?
    mappable: bool = True
    #: Which file it is: two FdSpecs with the same identity are the same open file (one fd sent twice).
    identity: str = ""
    #: For a memfd: fill it with the recorded guest memory (a replay that must run).
    image: bool = False
    #: memfd seals to add (F_SEAL_*), as names.
    seals: tuple[str, ...] = ()

    def usable_for(self, size: int) -> bool:
        return self.mappable and self.size >= size


# ---------------------------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------------------------


class NotJson(ValueError):
    """A payload that RFC 8259 (and so serde_json) does not accept as JSON."""


class Unsure(ValueError):
    """A payload too deep for this model to judge: the receiver may take or refuse it."""


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _refuse_constant(name: str) -> float:
    raise NotJson(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NotJson(f"number {text[:20]} overflows a double")
    return value


def strict_json(payload: bytes) -> Any:
    """Parse as serde_json would: UTF-8, no NaN/Infinity, finite numbers."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotJson(f"not UTF-8: {exc}") from None
    if text.startswith("\ufeff"):
        raise Unsure("a byte-order mark (RFC 8259: a parser MAY ignore it; serde_json refuses it)")
    if _SURROGATE.search(text):
        raise Unsure("a lone UTF-16 surrogate escape (serde_json refuses it, Python takes it)")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    except RecursionError:
        raise Unsure("nested deeper than this model parses") from None
    except NotJson:
        raise
    except ValueError as exc:
        raise NotJson(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# The Config document (docs/protocol.md: vm_config, common_cpuid, memory_manager_data)
# ---------------------------------------------------------------------------------------------


def canonical(document: Any) -> str:
    """A document as canonical JSON text: equal only if equal with types (Python says True == 1)."""
    return json.dumps(document, sort_keys=True)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (not isinstance(value, float) or math.isfinite(value)))


@dataclass
class ConfigFacts:
    """What an accepted Config tells the rest of the stream."""

    cpus: int
    zones: dict[str, tuple[int, bool]]  # id → (size, shared)
    slots: list[tuple[int, int, int, str, int]]  # (slot, gpa, size, zone_id, file_offset)

    @property
    def ram(self) -> int:
        return sum(size for size, _ in self.zones.values())

    def spans(self) -> list[tuple[int, int]]:
        return sorted((gpa, gpa + size) for _, gpa, size, _, _ in self.slots)


class _Judge:
    """Collects definite violations (→ ERROR) and doubts (→ EITHER) while walking a document."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.doubts: list[str] = []

    def error(self, text: str) -> None:
        self.errors.append(text)

    def doubt(self, text: str) -> None:
        self.doubts.append(text)

    def obj(self, value: Any, where: str, known: tuple[str, ...]) -> dict | None:
        if not isinstance(value, dict):
            self.error(f"{where} is {type(value).__name__}, not an object")
            return None
        extra = [k for k in value if k not in known]
        if extra:
            self.doubt(f"{where} has unknown keys {extra[:3]}")
        return value

    def uint(self, parent: dict, key: str, where: str, bits: int = 64, required: bool = True,
             lo: int = 0, hi: int | None = None) -> int | None:
        if key not in parent:
            if required:
                self.error(f"{where}.{key} is missing")
            return None
        value = parent[key]
        if not _is_int(value):
            self.error(f"{where}.{key} is {type(value).__name__}, not an integer")
            return None
        if not 0 <= value < 1 << bits:
            self.error(f"{where}.{key}={value} does not fit u{bits}")
            return None
        if value < lo or (hi is not None and value > hi):
            self.error(f"{where}.{key}={value} is outside {lo}..{hi}")
            return None
        return value

    def boolean(self, parent: dict, key: str, where: str, default: bool) -> bool:
        if key not in parent:
            return default
        value = parent[key]
        if not isinstance(value, bool):
            self.error(f"{where}.{key} is {type(value).__name__}, not a boolean")
            return default
        return value

    def string(self, parent: dict, key: str, where: str) -> str | None:
        if key not in parent:
            self.error(f"{where}.{key} is missing")
            return None
        value = parent[key]
        if not isinstance(value, str):
            self.error(f"{where}.{key} is {type(value).__name__}, not a string")
            return None
        return value


def judge_config(document: Any, memory_fds: dict[int, FdSpec], host_total: int,
                 host_available: int) -> tuple[Verdict, str, ConfigFacts | None]:
    """The verdict on a Config document, and what it says if it is accepted."""
    j = _Judge()
    facts = _read_config(document, j)
    if facts is not None and not j.errors:
        _check_layout(facts, j)
    if facts is not None and not j.errors:
        _check_memory(facts, memory_fds, host_total, host_available, j)
    if j.errors:
        return Verdict.ERROR, j.errors[0], facts
    if j.doubts:
        return Verdict.EITHER, j.doubts[0], facts
    return Verdict.OK, "a valid Config", facts


def _read_config(document: Any, j: _Judge) -> ConfigFacts | None:
    top = j.obj(document, "Config", ("vm_config", "common_cpuid", "memory_manager_data"))
    if top is None:
        return None
    if "vm_config" not in top:
        j.error("vm_config is missing")
        return None
    vm = j.obj(top["vm_config"], "vm_config", ("cpus", "memory", "workload"))
    if vm is None:
        return None
    cpus = None
    if "cpus" not in vm:
        j.error("vm_config.cpus is missing")
    else:
        cpu_obj = j.obj(vm["cpus"], "vm_config.cpus", ("boot_vcpus", "max_vcpus"))
        if cpu_obj is not None:
            cpus = j.uint(cpu_obj, "boot_vcpus", "vm_config.cpus", 8, lo=1, hi=MAX_VCPUS)
            if "max_vcpus" in cpu_obj and not _is_int(cpu_obj["max_vcpus"]):
                j.doubt("vm_config.cpus.max_vcpus is not an integer (chmig does not use it)")
    zones: dict[str, tuple[int, bool]] = {}
    if "memory" not in vm:
        j.error("vm_config.memory is missing")
    else:
        mem = j.obj(vm["memory"], "vm_config.memory", ("size", "shared", "zones"))
        if mem is not None:
            size = j.uint(mem, "size", "vm_config.memory")
            shared = j.boolean(mem, "shared", "vm_config.memory", True)
            if size is not None:
                zones["mem0"] = (size, shared)
            extra = mem.get("zones", [])
            if not isinstance(extra, list):
                j.error("vm_config.memory.zones is not a list")
            else:
                for n, zone in enumerate(extra):
                    where = f"vm_config.memory.zones[{n}]"
                    z = j.obj(zone, where, ("id", "size", "shared"))
                    if z is None:
                        continue
                    zone_id = j.string(z, "id", where)
                    if zone_id is not None and (not zone_id or not zone_id.isprintable() or len(zone_id) > 128):
                        # A Rust String takes it; chmig takes only 1..128 printable characters (ids end up in
                        # memfd names and log lines) — refusing is fair, but cleanly, not with a traceback.
                        j.doubt(f"zone id {zone_id[:20]!r}… is not a plain printable name of 1..128 characters")
                    zsize = j.uint(z, "size", where)
                    zshared = j.boolean(z, "shared", where, True)
                    if zone_id is not None and zsize is not None:
                        if zone_id in zones:
                            j.error(f"zone id {zone_id!r} twice")
                        zones[zone_id] = (zsize, zshared)
    if "workload" not in vm:
        j.error("vm_config.workload is missing")
    else:
        work = j.obj(vm["workload"], "vm_config.workload", ("kind", "dirty_percent", "dirty_rate"))
        if work is not None:
            kind = j.string(work, "kind", "vm_config.workload")
            if kind is not None and kind not in WORKLOADS:
                j.error(f"unknown workload {kind!r}")
            j.uint(work, "dirty_percent", "vm_config.workload", hi=100)
            if "dirty_rate" not in work:
                j.error("vm_config.workload.dirty_rate is missing")
            elif not _is_number(work["dirty_rate"]) or work["dirty_rate"] < 0:
                j.error(f"vm_config.workload.dirty_rate={work['dirty_rate']!r} is not a number >= 0")
            elif work["dirty_rate"] > 1 << 20:
                # chmig's own field: it takes rates up to 1 Mi MiB/s; refusing a larger one is fair.
                j.doubt(f"vm_config.workload.dirty_rate={work['dirty_rate']!r} is beyond chmig's 1 Mi MiB/s")
    cpuid = top.get("common_cpuid")
    if cpuid is not None:
        if not isinstance(cpuid, list):
            j.error("common_cpuid is not a list")
        elif len(cpuid) > MAX_CPUID_ENTRIES:
            j.error(f"common_cpuid has {len(cpuid)} entries, more than {MAX_CPUID_ENTRIES}")
        else:
            if len(cpuid) > KVM_MAX_CPUID_ENTRIES:
                j.doubt(f"common_cpuid has {len(cpuid)} entries; KVM takes at most {KVM_MAX_CPUID_ENTRIES}")
            keys = [(e.get("function"), e.get("index")) for e in cpuid if isinstance(e, dict)]
            if len(set(map(repr, keys))) != len(keys):
                j.doubt("common_cpuid repeats a (function, index) entry")
            for n, entry in enumerate(cpuid):
                e = j.obj(entry, f"common_cpuid[{n}]", CPUID_FIELDS)
                if e is None:
                    continue
                for name in CPUID_FIELDS:
                    j.uint(e, name, f"common_cpuid[{n}]", 32, required=False)
                    if name not in e:
                        j.doubt(f"common_cpuid[{n}].{name} is missing")
    slots: list[tuple[int, int, int, str, int]] = []
    if "memory_manager_data" not in top:
        j.error("memory_manager_data is missing")
    else:
        mmd = j.obj(top["memory_manager_data"], "memory_manager_data", ("guest_ram_mappings",))
        if mmd is not None:
            if "guest_ram_mappings" not in mmd:
                j.error("memory_manager_data.guest_ram_mappings is missing")
            elif not isinstance(mmd["guest_ram_mappings"], list):
                j.error("guest_ram_mappings is not a list")
            else:
                for n, m in enumerate(mmd["guest_ram_mappings"]):
                    where = f"guest_ram_mappings[{n}]"
                    o = j.obj(m, where, ("slot", "gpa", "size", "zone_id", "virtio_mem", "file_offset"))
                    if o is None:
                        continue
                    slot = j.uint(o, "slot", where, 32)
                    gpa = j.uint(o, "gpa", where)
                    size = j.uint(o, "size", where)
                    zone_id = j.string(o, "zone_id", where)
                    j.boolean(o, "virtio_mem", where, False)
                    offset = j.uint(o, "file_offset", where, required=False)
                    if None not in (slot, gpa, size, zone_id):
                        slots.append((slot, gpa, size, zone_id, offset or 0))  # type: ignore[arg-type]
    if cpus is None or not zones:
        return None
    return ConfigFacts(cpus, zones, slots)


def _check_layout(facts: ConfigFacts, j: _Judge) -> None:
    """The layout rules: zones in 2 MiB units, slots inside their zones, page aligned, disjoint, covering."""
    first = facts.zones.get("mem0", (0, True))[0]
    if first < MIN_RAM:
        j.error(f"the first zone has {first} bytes, less than {MIN_RAM}")
    for zone_id, (size, _) in facts.zones.items():
        if size <= 0 or size % ZONE_GRANULE:
            j.error(f"zone {zone_id!r} of {size} bytes is not a positive multiple of 2 MiB")
    if facts.ram > MAX_GUEST_PHYS:
        j.error(f"guest RAM of {facts.ram} bytes is more than {MAX_GUEST_PHYS}")
    seen: set[int] = set()
    for slot, gpa, size, zone_id, offset in facts.slots:
        if zone_id not in facts.zones:
            j.error(f"slot {slot} names unknown zone {zone_id!r}")
            continue
        if slot in seen or slot >= 512:
            j.error(f"bad or duplicate slot {slot}")
        seen.add(slot)
        if size == 0 or gpa % PAGE or size % PAGE or offset % PAGE:
            j.error(f"slot {slot} is empty or not page aligned")
        if offset + size > facts.zones[zone_id][0]:
            j.error(f"slot {slot} lies outside zone {zone_id!r}")
        if gpa + size > MAX_GUEST_PHYS:
            j.error(f"slot {slot} lies above 64 GiB")
    spans = facts.spans()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            j.error("slots overlap")
    if sum(size for _, _, size, _, _ in facts.slots) != facts.ram:
        j.error("the slots do not cover the zones exactly")
    # Each zone's slots must tile it: a hole in a zone's file offsets is guest RAM with no slot.
    for zone_id, (size, _) in facts.zones.items():
        pieces = sorted((offset, offset + s) for _, _, s, z, offset in facts.slots if z == zone_id)
        at = 0
        for lo, hi in pieces:
            if lo != at:
                j.doubt(f"zone {zone_id!r} is not tiled by its slots")
                break
            at = hi
        else:
            if at != size:
                j.doubt(f"zone {zone_id!r} is not tiled by its slots")


def _check_memory(facts: ConfigFacts, memory_fds: dict[int, FdSpec], host_total: int, host_available: int,
                  j: _Judge) -> None:
    """Where the RAM comes from: MemoryFds (local) or this host (which must have it)."""
    if not memory_fds:
        if facts.ram > host_total:
            j.error(f"guest RAM of {facts.ram >> 20} MiB is more than this host has ({host_total >> 20} MiB)")
        elif facts.ram > min(host_available, 1 * GiB):
            j.doubt(f"guest RAM of {facts.ram >> 20} MiB may not fit this host now")
        return
    by_slot = {slot: (zone_id, offset + size) for slot, _, size, zone_id, offset in facts.slots}
    by_zone: dict[str, dict[int, FdSpec]] = {}
    for slot, fd in memory_fds.items():
        if slot not in by_slot:
            j.error(f"a MemoryFd for slot {slot}, which the Config does not have")
            return
        by_zone.setdefault(by_slot[slot][0], {})[slot] = fd
    identities: dict[str, str] = {}
    for zone_id, (size, shared) in facts.zones.items():
        fds = by_zone.get(zone_id)
        if not fds:
            j.error(f"no MemoryFd for zone {zone_id!r}")
            continue
        if not shared:
            j.error(f"zone {zone_id!r} is private, but arrived as a MemoryFd")
        # Every slot needs its MemoryFd (a slot without one would read zeros); slots of one zone may come as one
        # file (mapped once, whole) or as one file each (Cloud Hypervisor's offload daemon: slot at file_offset).
        missing = sorted(slot for slot, (zone, _) in by_slot.items() if zone == zone_id and slot not in fds)
        if missing:
            j.error(f"no MemoryFd for slot {missing[0]} of zone {zone_id!r}")
        if len({fd.identity for fd in fds.values()}) == 1:
            fd = next(iter(fds.values()))
            if not fd.usable_for(size):
                j.error(f"the MemoryFd of zone {zone_id!r} ({fd.kind}, {fd.size} bytes) cannot back {size} bytes")
        else:
            for slot, fd in fds.items():
                if not fd.usable_for(by_slot[slot][1]):
                    j.error(f"the MemoryFd of slot {slot} ({fd.kind}, {fd.size} bytes) cannot back its "
                            f"{by_slot[slot][1]} bytes (file_offset + size)")
        for fd in fds.values():
            if identities.get(fd.identity, zone_id) != zone_id:
                j.doubt(f"zones {identities[fd.identity]!r} and {zone_id!r} share one file")
            identities[fd.identity] = zone_id
    if facts.ram > host_total:
        j.doubt("more guest RAM than this host has, handed over as memfds")


# ---------------------------------------------------------------------------------------------
# The State document (chmig's own: vcpus as KVM state, devices.guest.vcpus as the guest's counters)
# ---------------------------------------------------------------------------------------------


def judge_state(document: Any, recorded: dict, cpus: int | None) -> tuple[Verdict, str]:
    j = _Judge()
    if not isinstance(document, dict):
        return Verdict.ERROR, f"State is {type(document).__name__}, not an object"
    if canonical(document) == canonical(recorded) and cpus == len(recorded["vcpus"]):
        return Verdict.OK, "the recorded State"
    vcpus = document.get("vcpus")
    if not isinstance(vcpus, list):
        j.error("State.vcpus is missing or not a list")
    elif cpus is not None and len(vcpus) != cpus:
        j.error(f"State describes {len(vcpus)} vCPUs, the Config {cpus}")
    else:
        template = recorded["vcpus"][0]
        for n, vcpu in enumerate(vcpus):
            _same_shape(vcpu, template, f"vcpus[{n}]", j, strict_keys=True)
    devices = document.get("devices")
    guest = devices.get("guest") if isinstance(devices, dict) else None
    counters = guest.get("vcpus") if isinstance(guest, dict) else None
    if not isinstance(counters, list):
        j.error("State.devices.guest.vcpus is missing or not a list")
    elif cpus is not None and len(counters) != cpus:
        j.error(f"State has counters for {len(counters)} vCPUs, the Config {cpus}")
    else:
        template = recorded["devices"]["guest"]["vcpus"][0]
        for n, entry in enumerate(counters):
            if not isinstance(entry, dict):
                j.error(f"devices.guest.vcpus[{n}] is not an object")
                continue
            for key, value in entry.items():
                if key in template and (not _is_int(value) or not 0 <= value < U64):
                    j.error(f"devices.guest.vcpus[{n}].{key}={value!r} is not a u64")
            if set(template) - set(entry):
                j.doubt(f"devices.guest.vcpus[{n}] lacks counters")
    if j.errors:
        return Verdict.ERROR, j.errors[0]
    if j.doubts:
        return Verdict.EITHER, j.doubts[0]
    return Verdict.EITHER, "a changed State (KVM decides whether it can load it)"


def _same_shape(value: Any, template: Any, where: str, j: _Judge, strict_keys: bool) -> None:
    """A vCPU's state has exactly the shape chmig's capture gives it: same keys, same JSON types, u64 ints."""
    if isinstance(template, dict):
        if not isinstance(value, dict):
            j.error(f"{where} is {type(value).__name__}, not an object")
            return
        missing = [k for k in template if k not in value]
        extra = [k for k in value if k not in template]
        if missing and where.count(".") < 2 and not where.endswith(".msrs"):  # a piece of state is gone
            # (MSRs that cannot be read are left out by the capture, so msrs may lack some)
            j.error(f"{where} lacks {missing[:3]}")
        elif missing:
            j.doubt(f"{where} lacks {missing[:3]}")
        if extra:
            (j.error if strict_keys and where.count(".") == 0 else j.doubt)(f"{where} has unknown keys {extra[:3]}")
        for key, item in value.items():
            if key in template:
                _same_shape(item, template[key], f"{where}.{key}", j, strict_keys)
            elif where.endswith(".msrs"):
                _same_shape(item, 0, f"{where}.{key}", j, strict_keys)
    elif isinstance(template, list):
        if not isinstance(value, list):
            j.error(f"{where} is {type(value).__name__}, not a list")
            return
        if template:
            for n, item in enumerate(value):
                _same_shape(item, template[0], f"{where}[{n}]", j, strict_keys)
    elif _is_int(template):
        if not _is_int(value):
            j.error(f"{where} is {type(value).__name__}, not an integer")
        elif not 0 <= value < U64:
            j.error(f"{where}={value} does not fit u64")
        elif value != template:
            j.doubt(f"{where} changed")
    elif isinstance(template, str):
        if not isinstance(value, str):
            j.error(f"{where} is {type(value).__name__}, not a hex string")
        else:
            try:
                bytes.fromhex(value)
            except ValueError:
                j.error(f"{where} is not hex")
            if len(value) != len(template):
                j.doubt(f"{where} changed length")


# ---------------------------------------------------------------------------------------------
# Framing a stream: the reference receiver
# ---------------------------------------------------------------------------------------------


@dataclass
class Planned:
    """One request of a stream, as the reference receiver frames and judges it."""

    start: int
    #: Where the receiver's reading of this request ends: after the header when it must refuse the header,
    #: after the table when a range is outside RAM, else after the whole request (data included).
    end: int
    command: int
    verdict: Verdict
    reason: str
    #: The stream holds all of ``[start, end)``: an answer is due.
    complete: bool = True
    #: No request after this one is read (Complete, Abandon, or a refusal).
    final: bool = False
    #: Guest-memory bytes this request carries (the RSS budget counts them).
    data: int = 0

    @property
    def name(self) -> str:
        return command_name(self.command)

    def describe(self) -> str:
        return f"{self.name}@{self.start}+{self.end - self.start}"


@dataclass
class Context:
    """What the reference receiver knows besides the stream."""

    transport: str  # "tcp" or "unix"
    limits: p.Limits
    host_total: int
    host_available: int
    recorded_config: dict
    recorded_state: dict
    #: Verdicts a mutation decided for a payload it wrote (by payload digest), when the rules above cannot
    #: see its intent (rarely needed).
    payload_verdicts: dict[str, tuple[Verdict, str]] = field(default_factory=dict)


def digest(payload: bytes) -> str:
    return hashlib.sha1(payload).hexdigest()


class ReferenceReceiver:
    """Frames and judges the main connection's requests, one after another, assuming each is answered Ok.

    Planning stops at the first request that must (or may) end the migration: after an Error nothing more
    is read, so the framing of the rest does not matter.  An EITHER request is planned as if answered Ok;
    if the receiver refuses it instead, the driver stops there.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.state = "Established"
        self.version = 0
        self.facts: ConfigFacts | None = None
        self.layout_known = False
        self.memory_fds: dict[int, FdSpec] = {}
        #: A memory connection failed (True), may have failed (None), or none did (False): State depends on it.
        self.worker_failed: bool | None = False
        #: Guest memory came (True), may have come (None), or none did (False): a precopy State needs some.
        self.memory_arrived: bool | None = False
        self.same_cpus = False

    # -- the main connection -----------------------------------------------------------------------

    def plan(self, stream: Rope, fds_at: dict[int, list[FdSpec]], hooks: dict[int, list[Any]] | None = None
             ) -> list[Planned]:
        """Frame and judge the main stream; ``hooks`` (extra connections, by the main offset they start
        before) are planned in their turn, since a failed memory connection changes what State must get."""
        out: list[Planned] = []
        pending = sorted((hooks or {}).items())
        at = 0
        while at < len(stream):
            while pending and pending[0][0] <= at:
                for action in pending.pop(0)[1]:
                    action.plan(self)
            planned = self._next(stream, at, fds_at)
            out.append(planned)
            if planned.final or not planned.complete or planned.verdict is Verdict.ERROR:
                break
            at = planned.end
        return out

    def _next(self, stream: Rope, at: int, fds_at: dict[int, list[FdSpec]]) -> Planned:
        header = stream.read(at, p.HEADER_SIZE)
        if len(header) < p.HEADER_SIZE:
            return Planned(at, len(stream), -1, Verdict.EITHER, "the stream ends inside a header", complete=False)
        command, headers, length = struct.unpack("<H6sQ", header)
        body = at + p.HEADER_SIZE
        name = command_name(command)

        def refuse(reason: str, end: int = body) -> Planned:
            return Planned(at, end, command, Verdict.ERROR, reason, complete=end <= len(stream), final=True)

        if command not in _NAMES:
            return refuse(f"unknown command {command}")
        if command == 6:  # Abandon: from any state, answered Ok, then the migration is over
            if length:
                return refuse(f"Abandon carries no payload, but length is {length}")
            return Planned(at, body, command, Verdict.OK, "Abandon", final=True)
        target = _TRANSITIONS.get((self.state, command))
        if target is None:
            return refuse(f"{name} in state {self.state}")
        limits = self.ctx.limits
        if command in _NO_PAYLOAD and length:
            return refuse(f"{name} carries no payload, but length is {length}")
        if command == 1 and int.from_bytes(headers[0:2], "little") not in _VERSIONS:
            return refuse(f"protocol version {int.from_bytes(headers[0:2], 'little')}")
        if command == 1:
            self.version = int.from_bytes(headers[0:2], "little")
            if length not in _START_PAYLOAD[self.version]:
                return refuse(f"Start of version {self.version} with {length} bytes")
        if command == 10:
            # Discard: version 1 only, in Configured, a range table; and these receivers receive by precopy, so
            # even a valid one is refused (after its table was read).
            if self.version < 1 or self.state != "Configured" or length % 16 or length > limits.max_table_bytes:
                return refuse(f"Discard (version {self.version}, state {self.state}, {length} bytes)")
            return refuse("Discard at a precopy receiver", end=body + length)
        if command == 2 and length > limits.max_config_bytes:
            return refuse(f"Config of {length} bytes is over the limit")
        if command == 3 and length > limits.max_state_bytes:
            return refuse(f"State of {length} bytes is over the limit")
        if command == 4 and (length % 16 or length > limits.max_table_bytes):
            return refuse(f"a range table of {length} bytes")
        if command == 7 and length != 4:
            return refuse(f"MemoryFd of {length} bytes")

        end = body + length
        complete = end <= len(stream)
        if command == 7:
            return self._memory_fd(stream, at, body, end, fds_at, target)
        if command == 4:
            return self._memory(stream, at, body, length, target)
        if not complete:
            return Planned(at, end, command, Verdict.EITHER, f"the stream ends inside {name}", complete=False)
        payload = stream.read(body, length) if length else b""
        verdict, reason = Verdict.OK, name
        if command == 2:
            verdict, reason = self._config(payload)
        elif command == 3:
            verdict, reason = self._state(payload)
        planned = Planned(at, end, command, verdict, reason, final=command in (5, 8))
        if verdict is not Verdict.ERROR:
            self.state = target
        return planned

    def _memory_fd(self, stream: Rope, at: int, body: int, end: int, fds_at: dict[int, list[FdSpec]],
                   target: str) -> Planned:
        if end > len(stream):
            return Planned(at, end, 7, Verdict.EITHER, "the stream ends inside MemoryFd", complete=False)
        fds = fds_at.get(body, [])
        if self.ctx.transport != "unix":
            return Planned(at, end, 7, Verdict.ERROR, "MemoryFd over TCP", final=True)
        if not fds:
            return Planned(at, end, 7, Verdict.ERROR, "MemoryFd without a file descriptor", final=True)
        slot = int.from_bytes(stream.read(body, 4), "little")
        if slot in self.memory_fds:
            return Planned(at, end, 7, Verdict.ERROR, f"a second MemoryFd for slot {slot}", final=True)
        if len(self.memory_fds) >= self.ctx.limits.max_slots:
            return Planned(at, end, 7, Verdict.ERROR, "more MemoryFds than slots allowed", final=True)
        self.state = target
        self.memory_fds[slot] = fds[0]
        if len(fds) > 1:
            return Planned(at, end, 7, Verdict.EITHER, f"MemoryFd with {len(fds)} fds")
        return Planned(at, end, 7, Verdict.OK, f"MemoryFd for slot {slot} ({fds[0].kind})")

    def _config(self, payload: bytes) -> tuple[Verdict, str]:
        override = self.ctx.payload_verdicts.get(digest(payload))
        try:
            document = strict_json(payload)
        except NotJson as exc:
            return override or (Verdict.ERROR, f"Config is not JSON: {exc}")
        except Unsure as exc:
            return override or (Verdict.EITHER, f"Config {exc}")
        verdict, reason, facts = judge_config(document, self.memory_fds, self.ctx.host_total,
                                              self.ctx.host_available)
        if verdict is not Verdict.ERROR:
            self.facts = facts
            self.layout_known = facts is not None
            # The recorded State fits only the recorded vCPUs: the same count and CPUID (MSRs need features).
            recorded = self.ctx.recorded_config
            self.same_cpus = (isinstance(document, dict) and facts is not None
                              and canonical(document.get("common_cpuid")) == canonical(recorded.get("common_cpuid"))
                              and facts.cpus == recorded["vm_config"]["cpus"]["boot_vcpus"])
        return override or (verdict, reason)

    def _state(self, payload: bytes) -> tuple[Verdict, str]:
        override = self.ctx.payload_verdicts.get(digest(payload))
        worker_failed = self.worker_failed
        if worker_failed:
            return Verdict.ERROR, "a memory connection failed: State must be refused"
        try:
            document = strict_json(payload)
        except NotJson as exc:
            return override or (Verdict.ERROR, f"State is not JSON: {exc}")
        except Unsure as exc:
            return override or (Verdict.EITHER, f"State {exc}")
        cpus = self.facts.cpus if self.facts is not None else None
        verdict, reason = judge_state(document, self.ctx.recorded_state, cpus)
        if override:
            return override
        if not self.memory_fds and verdict is not Verdict.ERROR:
            if self.memory_arrived is False:
                return Verdict.ERROR, "State before any guest memory (precopy)"
            if self.memory_arrived is None:
                return Verdict.EITHER, "State after memory that may not have arrived"
        if worker_failed is None and verdict is Verdict.OK:
            return Verdict.EITHER, "a memory connection may have failed"
        if not self.same_cpus and verdict is Verdict.OK:
            return Verdict.EITHER, "the recorded State on vCPUs of a changed Config"
        return verdict, reason

    # -- Memory, on any connection ---------------------------------------------------------------

    def _memory(self, stream: Rope, at: int, body: int, length: int, target: str | None) -> Planned:
        table_end = body + length
        if table_end > len(stream):
            return Planned(at, table_end, 4, Verdict.EITHER, "the stream ends inside a range table", complete=False)
        table = stream.read(body, length)
        verdict, reason, data = self.judge_table(table)
        if verdict is Verdict.ERROR:
            return Planned(at, table_end, 4, verdict, reason, final=True)
        end = table_end + data
        if target is not None:
            self.state = target
        if end > len(stream):
            return Planned(at, end, 4, Verdict.EITHER, "the stream ends inside the memory data", complete=False,
                           data=len(stream) - table_end)
        if data and target is not None:  # on the main connection (a worker's is counted by its plan)
            if verdict is Verdict.OK:
                self.memory_arrived = True
            elif self.memory_arrived is False:
                self.memory_arrived = None
        return Planned(at, end, 4, verdict, reason, data=data)

    def judge_table(self, table: bytes) -> tuple[Verdict, str, int]:
        """A Memory table against the accepted layout: (verdict, reason, data bytes that follow)."""
        total = 0
        verdict, reason = Verdict.OK, f"{len(table) // 16} ranges inside guest RAM"
        spans = self.facts.spans() if self.facts is not None and self.layout_known else None
        for gpa, size in struct.iter_unpack("<QQ", table):
            if gpa + size > U64:
                return Verdict.ERROR, f"range {gpa:#x}+{size:#x} wraps past 2^64", 0
            total += size
            if spans is None:
                verdict, reason = Verdict.EITHER, "the layout is not known"
                continue
            inside = _covered(spans, gpa, size)
            if size == 0 and not inside:
                verdict, reason = Verdict.EITHER, f"empty range at {gpa:#x}, outside guest RAM"
            elif size and not inside:
                return Verdict.ERROR, f"range {gpa:#x}+{size:#x} is not inside guest RAM", 0
        return verdict, reason, total


def _covered(spans: list[tuple[int, int]], gpa: int, size: int) -> bool:
    """Is ``[gpa, gpa+size)`` inside the union of ``spans`` (adjacent slots join)?  Empty: is gpa inside?"""
    end = gpa + max(size, 1)
    at = gpa
    for lo, hi in spans:
        if hi <= at:
            continue
        if lo > at:
            return False
        at = hi
        if at >= end:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Additional connections
# ---------------------------------------------------------------------------------------------


def plan_worker(model: ReferenceReceiver, stream: Rope) -> list[Planned]:
    """A PrecopyMemory connection's requests after its role: Memory only, each checked like the main one's."""
    out: list[Planned] = []
    at = 0
    limits = model.ctx.limits
    while at < len(stream):
        header = stream.read(at, p.HEADER_SIZE)
        if len(header) < p.HEADER_SIZE:
            out.append(Planned(at, len(stream), -1, Verdict.EITHER, "ends inside a header", complete=False))
            break
        command, _, length = struct.unpack("<H6sQ", header)
        body = at + p.HEADER_SIZE
        if command != 4:
            out.append(Planned(at, body, command, Verdict.ERROR, f"{command_name(command)} on a memory connection",
                               complete=True, final=True))
            break
        if length % 16 or length > limits.max_table_bytes:
            out.append(Planned(at, body, 4, Verdict.ERROR, f"a range table of {length} bytes", final=True))
            break
        planned = model._memory(stream, at, body, length, None)
        out.append(planned)
        if planned.verdict is Verdict.ERROR or not planned.complete:
            break
        at = planned.end
    return out
