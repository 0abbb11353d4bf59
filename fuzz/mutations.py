"""The mutation kinds: how a case changes the recorded migration.

Each kind is a function ``(rng, builder, env) -> Case``; :data:`KINDS` lists them with their weights.
A kind only decides what to send; whether the receiver must answer Ok or Error is the reference
receiver's business (:mod:`fuzz.model`), so a mutation cannot also get the expectation wrong.
"""

from __future__ import annotations

import copy
import json
import random
import struct
from dataclasses import dataclass
from typing import Any, Callable

from chmig import protocol as p

from .common import GiB, MiB, PAGE, Rope
from .model import MAX_VCPUS, FdSpec
from .scenario import Builder, Case, Message, Probe, Worker, flatten, header, table_bytes, zeros

U64 = 1 << 64
ENDINGS = ("fin", "rst", "shut", "hold")


@dataclass
class Env:
    """What a kind may depend on besides the rng: the target, this host, the receiver's limits."""

    target: str  # "process" or "inprocess"
    host_total: int
    host_available: int
    limits: p.Limits
    #: The in-process receiver's role timeout (cases that send a role late wait past it).
    role_timeout_s: float


KindFn = Callable[[random.Random, Builder, Env], Case]


def _case(kind: str, detail: str, messages: list[Message], transport: str = "tcp", ending: str = "fin",
          hooks: dict[int, list] | None = None, process_ok: bool = True) -> Case:
    """A case from whole messages; ``hooks`` are keyed by message index (before that message)."""
    stream, fds, starts = flatten(messages)
    by_offset: dict[int, list] = {}
    for index, actions in (hooks or {}).items():
        offset = starts[index] if index < len(starts) else len(stream)
        by_offset.setdefault(offset, []).extend(actions)
    return Case(-1, kind, detail, transport, stream, fds, by_offset, ending, process_ok)


def _base(rng: random.Random, b: Builder, allow_local: bool = True) -> tuple[str, list[Message], str]:
    """A whole valid migration to mutate: normalized precopy (TCP or UNIX), the raw recording, or local."""
    roll = rng.random()
    if roll < 0.55:
        return "precopy", b.precopy(), "tcp"
    if roll < 0.7:
        return "recorded", b.recorded(), "tcp"
    if roll < 0.82 or not allow_local:
        return "precopy/unix", b.precopy(), "unix"
    return "local", b.local({0: [b.memfd()]}), "unix"


# ---------------------------------------------------------------------------------------------
# Replays and truncations
# ---------------------------------------------------------------------------------------------


def k_replay(rng: random.Random, b: Builder, env: Env) -> Case:
    """The migration as recorded (normalized, raw, local, over N memory connections): must complete."""
    variant = rng.choice(["precopy", "recorded", "precopy/unix", "local", "paused", "workers"])
    if variant == "workers":
        return _workers_case("replay", b, rng.randint(1, 4), [], "N memory connections, as a real source")
    if variant == "paused":
        messages = b.precopy()
        messages[-1] = b.complete(paused=True)
        return _case("replay", "precopy ending in CompletePaused", messages)
    if variant == "local":
        return _case("replay", "local migration (memfd)", b.local({0: [b.memfd()]}), "unix")
    transport = "unix" if variant.endswith("unix") else "tcp"
    messages = b.recorded() if variant == "recorded" else b.precopy()
    return _case("replay", f"{variant}, unchanged", messages, transport)


def k_close(rng: random.Random, b: Builder, env: Env) -> Case:
    """Close or reset at a message boundary: the receiver must give up with one clear error."""
    name, messages, transport = _base(rng, b)
    k = rng.randrange(len(messages))
    ending = rng.choice(ENDINGS)
    after = messages[k - 1].name if k else "nothing"
    return _case("close", f"{name}: {ending} after {k} messages (last {after})", messages[:k], transport, ending)


def k_close_mid(rng: random.Random, b: Builder, env: Env) -> Case:
    """Close or reset inside a message: header, payload, table or memory data."""
    name, messages, transport = _base(rng, b)
    k = rng.randrange(len(messages))
    message = messages[k]
    regions = [("header", 1, p.HEADER_SIZE)]
    if message.payload_end > p.HEADER_SIZE:
        regions.append(("payload", p.HEADER_SIZE, message.payload_end))
    if len(message) > message.payload_end:
        regions.append(("data", message.payload_end, len(message)))
    where, lo, hi = rng.choice(regions)
    cut = rng.randrange(lo, hi)
    partial = Message(message.name, message.rope.slice(0, cut), min(message.payload_end, cut),
                      message.fds if cut > p.HEADER_SIZE else [])
    ending = rng.choice(ENDINGS)
    return _case("close-mid", f"{name}: {ending} {cut} bytes into {message.name} #{k} ({where})",
                 messages[:k] + [partial], transport, ending)


# ---------------------------------------------------------------------------------------------
# Bytes and headers
# ---------------------------------------------------------------------------------------------


def k_flip(rng: random.Random, b: Builder, env: Env) -> Case:
    """Flip 1..8 bytes: in headers, JSON, tables or memory data."""
    name, messages, transport = _base(rng, b)
    case = _case("flip", "", messages, transport)
    _, _, starts = flatten(messages)
    stream = case.stream
    flips = []
    for _ in range(rng.randint(1, 8)):
        k = rng.randrange(len(messages))
        m = messages[k]
        region = rng.random()
        if region < 0.35 or len(m) == p.HEADER_SIZE:
            offset = rng.randrange(p.HEADER_SIZE)
        elif region < 0.7 and m.payload_end > p.HEADER_SIZE:
            offset = rng.randrange(p.HEADER_SIZE, m.payload_end)
        else:
            offset = rng.randrange(p.HEADER_SIZE, len(m))
        at = starts[k] + offset
        old = stream.read(at, 1)[0]
        new = rng.choice([old ^ (1 << rng.randrange(8)), old ^ rng.randrange(1, 256), 0, 0xFF])
        if new == old:
            new = old ^ 0x80
        stream = stream.replace(at, at + 1, bytes([new]))
        flips.append(f"{m.name}#{k}+{offset}:{old:#04x}->{new:#04x}")
    case.stream = stream
    case.detail = f"{name}: " + ", ".join(flips)
    return case


def _with_header(message: Message, command: int | None = None, length: int | None = None,
                 headers: bytes | None = None) -> Message:
    old_cmd, old_headers, old_len = struct.unpack("<H6sQ", message.rope.read(0, p.HEADER_SIZE))
    new = header(old_cmd if command is None else command, old_len if length is None else length,
                 old_headers if headers is None else headers)
    return Message(message.name, message.rope.replace(0, p.HEADER_SIZE, new), message.payload_end, message.fds)


def k_header_command(rng: random.Random, b: Builder, env: Env) -> Case:
    """Another command in a header (valid ones out of place, Invalid, PageFault, unknown numbers)."""
    name, messages, transport = _base(rng, b)
    k = rng.randrange(len(messages))
    command = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0x100, 0x8000, 0xFFFF, rng.randrange(1 << 16)])
    messages[k] = _with_header(messages[k], command=command)
    return _case("header-command", f"{name}: {messages[k].name} #{k} sent as command {command}", messages,
                 transport, rng.choice(ENDINGS))


def k_header_length(rng: random.Random, b: Builder, env: Env) -> Case:
    """Another length in a header: off by one or sixteen, zero, at and over the limits, huge."""
    name, messages, transport = _base(rng, b)
    k = rng.randrange(len(messages))
    old = struct.unpack("<Q", messages[k].rope.read(8, 8))[0]
    limits = env.limits
    length = rng.choice([0, 1, 3, 4, 5, 16, old + 1, max(old - 1, 0), old + 16, max(old - 16, 0), old * 2,
                         limits.max_config_bytes, limits.max_config_bytes + 1, limits.max_table_bytes,
                         limits.max_table_bytes + 16, 1 << 32, 1 << 63, U64 - 1, U64 - 16, rng.randrange(U64)])
    messages[k] = _with_header(messages[k], length=length)
    return _case("header-length", f"{name}: {messages[k].name} #{k} length {old} -> {length}", messages,
                 transport, rng.choice(ENDINGS))


def k_header_padding(rng: random.Random, b: Builder, env: Env) -> Case:
    """Other command_headers bytes: Start's version (0 is the only one), garbage elsewhere."""
    name, messages, transport = _base(rng, b)
    k = rng.randrange(len(messages))
    if messages[k].name == "Start" and rng.random() < 0.7:
        version = rng.choice([0, 1, 2, 0x100, 0xFFFF])
        headers = struct.pack("<H", version) + bytes(rng.randrange(256) for _ in range(4))
    else:
        headers = bytes(rng.randrange(256) for _ in range(6))
    messages[k] = _with_header(messages[k], headers=headers)
    return _case("header-padding", f"{name}: {messages[k].name} #{k} command_headers {headers.hex()}", messages,
                 transport)


# ---------------------------------------------------------------------------------------------
# Commands out of state
# ---------------------------------------------------------------------------------------------


def _any_request(rng: random.Random, b: Builder) -> Message:
    """A well-formed request of any command, to put where it may not belong."""
    choice = rng.choice(["Start", "Config", "State", "Memory", "Complete", "CompletePaused", "Abandon",
                         "MemoryFd", "PageFault", "Invalid", "unknown"])
    if choice == "Start":
        return b.start()
    if choice == "Config":
        return b.config()
    if choice == "State":
        return b.state()
    if choice == "Memory":
        return b.memory([b.tables[0][0]] if rng.random() < 0.5 else [])
    if choice in ("Complete", "CompletePaused"):
        return b.complete(paused=choice == "CompletePaused")
    if choice == "Abandon":
        return b.abandon()
    if choice == "MemoryFd":
        return b.memory_fd(0, [])
    if choice == "PageFault":
        return b.raw("PageFault", 9, table_bytes([(0, PAGE)]))
    if choice == "Invalid":
        return b.raw("Invalid", 0)
    return b.raw("unknown", rng.choice([10, 42, 0xFFFF]), bytes(rng.choice([0, 4, 16])))


def k_out_of_state(rng: random.Random, b: Builder, env: Env) -> Case:
    """Insert, repeat, drop, swap or move requests: every command where the table does not allow it."""
    name, messages, transport = _base(rng, b)
    op = rng.choice(["insert", "insert", "duplicate", "drop", "swap", "move"])
    k = rng.randrange(len(messages))
    if op == "insert":
        extra = _any_request(rng, b)
        messages.insert(k, extra)
        detail = f"{extra.name} inserted before #{k}"
    elif op == "duplicate":
        messages.insert(k, messages[k])
        detail = f"{messages[k].name} #{k} sent twice"
    elif op == "drop":
        detail = f"{messages[k].name} #{k} left out"
        del messages[k]
    elif op == "swap" and k + 1 < len(messages):
        messages[k], messages[k + 1] = messages[k + 1], messages[k]
        detail = f"#{k} ({messages[k + 1].name}) and #{k + 1} ({messages[k].name}) swapped"
    else:
        j = rng.randrange(len(messages))
        message = messages.pop(k)
        messages.insert(j, message)
        detail = f"{message.name} #{k} moved to #{j}"
    return _case("out-of-state", f"{name}: {detail}", messages, transport, rng.choice(ENDINGS))


# ---------------------------------------------------------------------------------------------
# Config and State JSON
# ---------------------------------------------------------------------------------------------

_RAW = "\x00RAW\x00"


def _paths(document: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in a JSON document (dict keys and list indexes)."""
    out = [prefix]
    if isinstance(document, dict):
        for key, value in document.items():
            out += _paths(value, prefix + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            out += _paths(value, prefix + (index,))
    return out


def _get(document: Any, path: tuple) -> Any:
    for key in path:
        document = document[key]
    return document


def _set(document: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    _get(document, path[:-1])[path[-1]] = value
    return document


def _dump(document: Any, raw: str | None = None) -> bytes:
    """JSON text; a value set to the _RAW marker becomes ``raw`` verbatim (NaN, 1e400, 2^70 ...)."""
    text = json.dumps(document, allow_nan=True)
    if raw is not None:
        text = text.replace(json.dumps(_RAW), raw, 1)
    return text.encode()


def _pick_path(rng: random.Random, document: Any, groups: list[tuple[str, ...]]) -> tuple:
    """A path, first choosing a group (so 77 CPUID entries do not crowd out the few fields that matter)."""
    paths = [q for q in _paths(document) if q]
    group = rng.choice(groups)
    chosen = [q for q in paths if q[:len(group)] == group] or paths
    return rng.choice(chosen)


_CONFIG_GROUPS = [("vm_config", "cpus"), ("vm_config", "memory"), ("vm_config", "workload"), ("common_cpuid",),
                  ("memory_manager_data",), ("memory_manager_data",), ("vm_config",)]
_STATE_GROUPS = [("vcpus", 0, "regs"), ("vcpus", 0, "sregs"), ("vcpus", 0), ("vcpus",), ("devices",),
                 ("devices", "guest", "vcpus"), ("vcpus", 0, "msrs"), ("vcpus", 0, "fpu")]

_WRONG_TYPES: list[Any] = ["1", "16777216", "true", "false", "", 1.5, 16777216.0, True, False, None, [], {},
                           [1], {"a": 1}, -1, "0x10"]
_HUGE = ["18446744073709551616", "18446744073709551615", "9223372036854775808", "4294967296", "4294967295",
         "256", "1e30", "100000000000000000000000000000", "-1", "-9223372036854775809", "1e308", "1e400",
         "-1e400", "1E+2", "0.5", "-0"]


def _json_mutation(rng: random.Random, document: Any, groups: list[tuple[str, ...]], limits: p.Limits
                   ) -> tuple[str, bytes]:
    """One structural change to a JSON document: (what was done, new payload)."""
    doc = copy.deepcopy(document)
    op = rng.choice(["nan", "huge", "wrong-type", "wrong-type", "missing", "missing", "deep", "empty-objects",
                     "extra-key", "duplicate-key", "syntax", "top-level", "long-string", "utf8"])
    path = _pick_path(rng, doc, groups)
    where = ".".join(str(x) for x in path)
    if op == "nan":
        raw = rng.choice(["NaN", "Infinity", "-Infinity"])
        return f"{where} = {raw}", _dump(_set(doc, path, _RAW), raw)
    if op == "huge":
        raw = rng.choice(_HUGE)
        return f"{where} = {raw}", _dump(_set(doc, path, _RAW), raw)
    if op == "wrong-type":
        value = rng.choice(_WRONG_TYPES)
        return f"{where} = {json.dumps(value)}", _dump(_set(doc, path, value))
    if op == "missing":
        parent = _get(doc, path[:-1])
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
        return f"{where} removed", _dump(doc)
    if op == "deep":
        depth = rng.choice([20, 200, 900, 2000, 50_000, limits.max_json_containers + 10])
        raw = "[" * depth + "0" + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "0" + "}" * depth
        return f"{where} nested {depth} deep", _dump(_set(doc, path, _RAW), raw)
    if op == "empty-objects":
        n = rng.choice([1000, 50_000, limits.max_json_containers - 10, limits.max_json_containers + 1, 400_000])
        raw = "[" + ",".join(["{}"] * n) + "]"
        return f"{where} = [{{}} x {n}]", _dump(_set(doc, path, _RAW), raw)
    if op == "extra-key":
        target = _get(doc, path[:-1]) if isinstance(_get(doc, path[:-1]), dict) else doc
        if isinstance(target, dict):
            target[rng.choice(["x", "unknown_field", "\u00e9\u00e8", "a" * 300])] = rng.choice([1, "s", [], {}, None])
        return f"extra key near {where}", _dump(doc)
    if op == "duplicate-key":
        text = _dump(doc).decode()
        key = json.dumps(path[-1]) if isinstance(path[-1], str) else '"vm_config"'
        at = text.find(key + ":")
        if at > 0:
            text = text[:at] + key + ": 7, " + text[at:]
        return f"key {key} twice", text.encode()
    if op == "syntax":
        text = _dump(doc)
        choice = rng.choice(["truncate", "trailing", "two", "comma", "quote", "comment", "empty", "space"])
        if choice == "truncate":
            text = text[:rng.randrange(len(text))]
        elif choice == "trailing":
            text = text + rng.choice([b" x", b"}", b"\x00", b",", b"\n\n"])
        elif choice == "two":
            text = text + text
        elif choice == "comma":
            text = text.replace(b"}", b",}", 1)
        elif choice == "quote":
            text = text.replace(b'"', b"'", 2)
        elif choice == "comment":
            text = b"/* c */" + text
        elif choice == "empty":
            text = b""
        else:
            text = b" \t\r\n" + text + b" \t\r\n"
        return f"syntax: {choice}", text
    if op == "top-level":
        value = rng.choice([[], None, "config", 1, 1.5, True, {}, [document]])
        return f"the whole document = {json.dumps(value)[:40]}", _dump(value)
    if op == "long-string":
        n = rng.choice([1000, 1 << 20, 8 << 20])
        return f"{where} = a string of {n} bytes", _dump(_set(doc, path, "x" * n))
    # utf8
    text = _dump(doc)
    choice = rng.choice(["invalid", "overlong", "bom", "surrogate", "nul", "escape", "control", "utf16", "utf32"])
    if choice in ("utf16", "utf32"):  # RFC 8259: JSON between systems MUST be UTF-8
        width = choice[3:]
        text = text.decode().encode(rng.choice([f"utf-{width}", f"utf-{width}-le", f"utf-{width}-be"]))
    elif choice == "invalid":
        at = rng.randrange(1, len(text))
        text = text[:at] + b"\xff" + text[at:]
    elif choice == "overlong":
        text = text.replace(b'"', b'"\xc0\xaf', 1)
    elif choice == "bom":
        text = b"\xef\xbb\xbf" + text
    elif choice == "surrogate":
        text = text.replace(b'"mem0"', b'"mem0\\ud800"')
    elif choice == "nul":
        text = text.replace(b'"mem0"', b'"mem0\\u0000"')
    elif choice == "escape":
        text = text.replace(b'"mem0"', b'"\\u001b[31mmem0"')
    else:
        text = text.replace(b'"mem0"', b'"mem\x010"')
    return f"encoding: {choice}", text


def _config_semantics(rng: random.Random, b: Builder, env: Env) -> tuple[str, bytes]:
    """A well-formed Config that says something else: sizes, slots, zones, vCPUs, workload, CPUID."""
    size = b.rec.ram_size
    op = rng.choice(["ram", "ram", "slot", "slot", "zone", "cpus", "workload", "cpuid", "mappings"])

    def mapping(document: dict) -> dict:
        return document["memory_manager_data"]["guest_ram_mappings"][0]

    if op == "ram":
        new = rng.choice([0, MiB, 2 * MiB, 2 * MiB + PAGE, 8 * MiB, 32 * MiB, 64 * GiB, 64 * GiB + 2 * MiB, U64 - 1])
        consistent = rng.random() < 0.5

        def change(document: dict) -> None:
            document["vm_config"]["memory"]["size"] = new
            if consistent:
                mapping(document)["size"] = new
        return f"memory size {new}{' (mapping too)' if consistent else ''}", b.config_with(change)
    if op == "slot":
        field_name, value = rng.choice([("slot", 511), ("slot", 512), ("slot", 0xFFFFFFFF), ("gpa", 1),
                                        ("gpa", PAGE), ("gpa", 3 * GiB), ("gpa", 64 * GiB), ("gpa", U64 - PAGE),
                                        ("size", 0), ("size", size - PAGE), ("size", size + PAGE),
                                        ("size", 1), ("file_offset", PAGE), ("file_offset", size),
                                        ("zone_id", "other"), ("zone_id", ""), ("virtio_mem", True)])

        def change(document: dict) -> None:
            mapping(document)[field_name] = value
        return f"mapping {field_name} = {value!r}", b.config_with(change)
    if op == "zone":
        extra = rng.choice([2 * MiB, 4 * MiB, 3 * MiB, 0, 64 * GiB])
        zone_id = rng.choice(["extra", "mem0", "", "e\u00e9", "x" * 5000, "z\x1b[31m", "nul\x00", "sur\ud800",
                              "a/b", "x" * 300])
        shared = rng.random() < 0.8
        with_mapping = rng.random() < 0.7

        def change(document: dict) -> None:
            document["vm_config"]["memory"]["zones"] = [{"id": zone_id, "size": extra, "shared": shared}]
            if with_mapping:
                document["memory_manager_data"]["guest_ram_mappings"].append(
                    {"slot": 1, "gpa": size, "size": extra, "zone_id": zone_id, "virtio_mem": False,
                     "file_offset": 0})
        return (f"extra zone {zone_id[:20]!r} of {extra} bytes, shared={shared}, mapping={with_mapping}",
                b.config_with(change))
    if op == "cpus":
        cpus = rng.choice([0, 1, 2, MAX_VCPUS, MAX_VCPUS + 1, 255, 256])

        def change(document: dict) -> None:
            document["vm_config"]["cpus"]["boot_vcpus"] = cpus
        return f"boot_vcpus = {cpus}", b.config_with(change)
    if op == "workload":
        key, value = rng.choice([("kind", "idle"), ("kind", "counter"), ("kind", "mine"), ("dirty_percent", 100),
                                 ("dirty_percent", 101), ("dirty_rate", -1.0), ("dirty_rate", 1e300),
                                 ("dirty_rate", 5)])

        def change(document: dict) -> None:
            document["vm_config"]["workload"][key] = value
        return f"workload {key} = {value!r}", b.config_with(change)
    if op == "cpuid":
        choice = rng.choice(["none", "empty", "many", "big", "shuffle"])

        def change(document: dict) -> None:
            cpuid = document["common_cpuid"]
            if choice == "none":
                document["common_cpuid"] = None
            elif choice == "empty":
                document["common_cpuid"] = []
            elif choice == "many":
                document["common_cpuid"] = (cpuid * 20)[:rng.choice([1024, 1025, 1500])]
            elif choice == "big":
                cpuid[0]["eax"] = 1 << 32
            else:
                rng.shuffle(cpuid)
        return f"common_cpuid: {choice}", b.config_with(change)
    choice = rng.choice(["none", "twice", "split", "many"])

    def change(document: dict) -> None:
        mappings = document["memory_manager_data"]["guest_ram_mappings"]
        if choice == "none":
            mappings.clear()
        elif choice == "twice":
            mappings.append(dict(mappings[0], slot=1))
        elif choice == "split":  # the one zone as two slots: legal, and a range may cross between them
            half = size // 2
            mappings[:] = [dict(mappings[0], size=half), dict(mappings[0], slot=1, gpa=half, size=half,
                                                                file_offset=half)]
        else:
            mappings[:] = [dict(mappings[0], slot=n, gpa=n * PAGE, size=PAGE, file_offset=n * PAGE)
                           for n in range(size // PAGE)]
    return f"guest_ram_mappings: {choice}", b.config_with(change)


def k_config_json(rng: random.Random, b: Builder, env: Env) -> Case:
    """Config mutations: NaN, huge numbers, deep nesting, wrong types, missing keys, {} floods, layouts."""
    if rng.random() < 0.4:
        what, payload = _config_semantics(rng, b, env)
    else:
        what, payload = _json_mutation(rng, b.config_doc, _CONFIG_GROUPS, env.limits)
    local = rng.random() < 0.15
    messages = b.local({0: [b.memfd()]}, config=payload) if local else b.precopy(config=payload)
    return _case("config-json", f"{'local' if local else 'precopy'}: Config {what} ({len(payload)} bytes)",
                 messages, "unix" if local else "tcp")


def k_state_json(rng: random.Random, b: Builder, env: Env) -> Case:
    """State mutations: the same JSON abuse, plus vCPU counts and register values."""
    if rng.random() < 0.2:
        doc = copy.deepcopy(b.state_doc)
        n = rng.choice([0, 2, 16, 1000])
        doc["vcpus"] = doc["vcpus"] * n if n else []
        if rng.random() < 0.5:
            doc["devices"]["guest"]["vcpus"] = doc["devices"]["guest"]["vcpus"] * max(n, 1)
        what, payload = f"{n} vCPUs", _dump(doc)
    else:
        what, payload = _json_mutation(rng, b.state_doc, _STATE_GROUPS, env.limits)
    messages = b.precopy(state=payload)
    if rng.random() < 0.3:
        messages[-1] = b.complete(paused=True)
    return _case("state-json", f"State {what} ({len(payload)} bytes)", messages)


# ---------------------------------------------------------------------------------------------
# Memory ranges
# ---------------------------------------------------------------------------------------------


def _crafted_ranges(rng: random.Random, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
    """Ranges at the edges: at and over each slot's end, up to 2^64, empty, unaligned, many."""
    lo, hi = rng.choice(spans)
    last = max(end for _, end in spans)
    n = rng.choice([1, PAGE - 1, PAGE, 2 * PAGE])
    choices: list[tuple[str, list[tuple[int, int]]]] = [
        ("at the end of a slot", [(hi - n, n)]),
        ("over the end of a slot", [(hi - n, n + rng.choice([1, PAGE]))]),
        ("starting at a slot's end", [(hi, n)]),
        ("across to the next slot", [(hi - PAGE, 2 * PAGE)]),
        ("past the end of RAM", [(last - PAGE, 2 * PAGE)]),
        ("ending at 2^64", [(U64 - n, n)]),
        ("wrapping past 2^64", [(U64 - PAGE, 2 * PAGE)]),
        ("all of 2^64", [(0, U64 - 1)]),
        ("empty inside RAM", [(lo + PAGE, 0)]),
        ("empty at the end of RAM", [(last, 0)]),
        ("empty at 2^64-1", [(U64 - 1, 0)]),
        ("unaligned inside", [(lo + 1, PAGE - 1), (lo + 12345, 1)]),
        ("overlapping", [(lo, 2 * PAGE), (lo + PAGE, 2 * PAGE)]),
        ("descending", [(lo + 4 * PAGE, PAGE), (lo, PAGE)]),
        ("many one-byte ranges", [(lo + i * 7, 1) for i in range(rng.choice([100, 5000]))]),
        ("empty table", []),
        ("a whole slot", [(lo, hi - lo)]),
    ]
    label, ranges = rng.choice(choices)
    return f"{label} [{lo:#x},{hi:#x})", ranges


def k_ranges(rng: random.Random, b: Builder, env: Env) -> Case:
    """One Memory request's table replaced by ranges at the boundaries (one slot, or two adjacent ones)."""
    two = rng.random() < 0.4
    if two:
        config, spans = b.two_zone_config()
    else:
        config, spans = b.rec.config, [(s.gpa, s.end) for s in b.rec.slots]
    label, ranges = _crafted_ranges(rng, spans)
    messages = b.precopy(config=config)
    k = 2 + rng.randrange(len(b.tables) + 1)
    messages.insert(k, b.memory(ranges))
    return _case("ranges", f"{'two slots' if two else 'one slot'}: Memory #{k}: {label}: "
                 f"{[(hex(g), hex(n)) for g, n in ranges[:3]]}", messages, "tcp" if rng.random() < 0.7 else "unix")


# ---------------------------------------------------------------------------------------------
# Additional connections
# ---------------------------------------------------------------------------------------------


def _role(value: int) -> bytes:
    return struct.pack("<H", value)


def _workers_case(kind: str, b: Builder, count: int, extra: list, detail: str,
                  mutate: Callable[[list[Worker]], str] | None = None, process_ok: bool = True) -> Case:
    """Start, Config, [memory over ``count`` workers + ``extra`` actions], State, Complete."""
    workers = [Worker(f"memory-{n}", Rope([])) for n in range(count)]
    for n, table in enumerate(b.tables):
        message = b.memory(table)
        workers[n % count].stream = workers[n % count].stream + message.rope
    if mutate is not None:
        detail += ": " + mutate(workers)
    messages = [b.start(), b.config(), b.state(), b.complete()]
    return _case(kind, detail, messages, "tcp", hooks={2: [*workers, *extra]}, process_ok=process_ok)


def k_workers(rng: random.Random, b: Builder, env: Env) -> Case:
    """Worker connection roles and floods: bad, short, late and Fault roles, many probes, misbehaving workers."""
    count = rng.randint(1, 3)
    options = ["bad-role", "short-role", "no-role", "fault-role", "many-probes", "over-max", "non-memory",
               "bad-range", "mid-close", "rst-between", "early", "after-state", "garbage-after-role",
               "busy-at-state", "second-sender"]
    if env.target == "inprocess":
        options += ["late-role", "idle-at-state", "stuck-at-state"]
    op = rng.choice(options)
    extra: list = []
    mutate = None
    process_ok = True
    if op == "bad-role":
        value = rng.choice([0, 3, 4, 255, 0x100, 0xFFFF, rng.randrange(3, 1 << 16)])
        extra = [Probe(f"role {value}", _role(value), expect_drop=True)]
    elif op == "garbage-after-role":
        value = rng.choice([0, 3, 0xFFFF])
        extra = [Probe(f"role {value} + 64 KiB", _role(value) + bytes(64 << 10), expect_drop=True)]
    elif op == "short-role":
        extra = [Probe("one byte of a role", b"\x01", hold=rng.choice([0.0, 0.2]), rst=rng.random() < 0.5)]
    elif op == "no-role":
        extra = [Probe("no role", b"", hold=rng.choice([0.0, 0.2]), rst=rng.random() < 0.5)]
    elif op == "fault-role":
        extra = [Probe("role Fault, kept open", _role(2), keep=True)]
    elif op == "many-probes":
        n = rng.choice([10, 30, 60])
        role = rng.choice([b"", b"\x01", _role(0), _role(7)])
        extra = [Probe(f"{n} probes sending {role.hex() or 'nothing'}", role, count=n,
                       expect_drop=len(role) == 2)]
    elif op == "over-max":
        n = env.limits.max_connections + rng.choice([1, 10])
        extra = [Probe(f"{n} connections with no role", b"", count=n)]
    elif op == "late-role":
        extra = [Probe("role after the role timeout", _role(1) + b.memory([b.tables[0][0]]).rope.tobytes(),
                       expect_drop=True, late=env.role_timeout_s + 0.3)]
    elif op == "non-memory":
        bad = _any_request(rng, b)
        while bad.name == "Memory":
            bad = _any_request(rng, b)

        def mutate(workers: list[Worker]) -> str:
            w = workers[rng.randrange(len(workers))]
            w.stream = bad.rope + w.stream if rng.random() < 0.5 else w.stream + bad.rope
            return f"{w.label} sends {bad.name}"
    elif op == "bad-range":
        spans = [(s.gpa, s.end) for s in b.rec.slots]
        label, ranges = _crafted_ranges(rng, spans)

        def mutate(workers: list[Worker]) -> str:
            w = workers[0]
            w.stream = w.stream + b.memory(ranges).rope
            return f"{w.label} sends Memory {label}"
    elif op == "mid-close":
        def mutate(workers: list[Worker]) -> str:
            w = workers[rng.randrange(len(workers))]
            cut = rng.randrange(1, len(w.stream))
            w.stream = w.stream.slice(0, cut)
            w.ending = rng.choice(["fin", "rst"])
            return f"{w.label} {w.ending} after {cut} of its bytes"
    elif op == "rst-between":
        def mutate(workers: list[Worker]) -> str:
            workers[0].ending = "rst"
            return f"{workers[0].label} resets after its last Ok"
    elif op == "early":
        def mutate(workers: list[Worker]) -> str:
            workers[0].early = 1  # connects (and announces itself) before Config; set to an offset below
            return f"{workers[0].label} connects before Config"
    elif op == "busy-at-state":
        def mutate(workers: list[Worker]) -> str:
            workers[-1].finish_later = 0.4
            return f"{workers[-1].label} is still sending its last request when State comes"
    elif op == "second-sender":
        # Another source (a retry?) connecting after Config: its Start header's first two bytes read as role
        # PrecopyMemory, the rest as a request of command 0.  A memory connection failed: State must fail.
        start = b.start().rope.tobytes()
        extra = [Worker("a second sender", Rope([start[2:], b.config().rope]), role=start[:2])]
    elif op == "after-state":
        extra = [Probe("a worker after State", _role(1) + b.memory([b.tables[0][0]]).rope.tobytes(), hold=0.2)]
    elif op == "idle-at-state":
        process_ok = False

        def mutate(workers: list[Worker]) -> str:
            workers[0].ending = "hold"
            return f"{workers[0].label} stays open, idle, at State"
    else:  # stuck-at-state
        process_ok = False

        def mutate(workers: list[Worker]) -> str:
            w = workers[0]
            w.stream = w.stream + w.stream.slice(0, p.HEADER_SIZE + 8)
            w.ending = "hold"
            return f"{w.label} stays open inside a request at State"
    case = _workers_case("workers", b, count, extra, op, mutate, process_ok)
    for action in case.actions():
        if isinstance(action, Worker) and action.early is not None:
            action.early = p.HEADER_SIZE  # before Config: right after Start
    if op == "after-state":  # move the probe to just before Complete
        probes = [a for a in case.hooks[min(case.hooks)] if isinstance(a, Probe)]
        for probe in probes:
            case.hooks[min(case.hooks)].remove(probe)
        state_end = len(case.stream) - p.HEADER_SIZE
        case.hooks.setdefault(state_end, []).extend(probes)
    return case


# ---------------------------------------------------------------------------------------------
# File descriptors over UNIX sockets
# ---------------------------------------------------------------------------------------------


def k_fds(rng: random.Random, b: Builder, env: Env) -> Case:
    """MemoryFd with odd fds: none, two, one memfd for two slots, too small, sealed, a pipe, a socket ..."""
    size = b.rec.ram_size
    op = rng.choice(["none", "two", "same-for-two-zones", "small", "sealed-write", "sealed-grow", "pipe", "socket",
                     "devnull", "readonly", "directory", "regular", "huge", "wrong-slot", "duplicate-slot",
                     "over-tcp", "after-config", "fd-on-header", "missing-zone", "private-zone",
                     "split-same", "split-different"])
    good = b.memfd()
    transport = "unix"
    config = None
    fds: dict[int, list[FdSpec]] = {0: [good]}
    detail = op
    if op == "none":
        fds = {0: []}
    elif op == "two":
        fds = {0: [good, b.memfd(identity="memfd-1")]}
    elif op == "same-for-two-zones":
        config, _ = b.two_zone_config()
        fds = {0: [good], 1: [good]}
    elif op == "small":
        fds = {0: [b.memfd(size=rng.choice([0, PAGE, size - PAGE, size // 2]))]}
    elif op == "sealed-write":
        fds = {0: [b.memfd(seals=rng.choice([("write",), ("write", "shrink", "grow", "seal")]))]}
    elif op == "sealed-grow":
        fds = {0: [b.memfd(seals=("shrink", "grow", "seal"))]}
    elif op in ("pipe", "socket", "devnull", "directory"):
        fds = {0: [FdSpec(op, 0 if op != "directory" else 4096, False, op)]}
    elif op == "readonly":
        fds = {0: [FdSpec("readonly", size, False, "readonly")]}
    elif op == "regular":
        fds = {0: [FdSpec("regular", size, True, "regular", image=True)]}
    elif op == "huge":
        fds = {0: [b.memfd(size=64 * GiB)]}
    elif op == "wrong-slot":
        slot = rng.choice([1, 511, 512, 0xFFFFFFFF])
        fds = {slot: [good]}
        detail = f"MemoryFd for slot {slot}"
    elif op == "duplicate-slot":
        messages = [b.start(), b.memory_fd(0, [good]), b.memory_fd(0, [b.memfd(identity="memfd-1")]),
                    b.config(), b.state(), b.complete()]
        return _case("fds", "two MemoryFds for slot 0", messages, "unix")
    elif op == "over-tcp":
        transport = "tcp"
    elif op == "after-config":
        messages = b.precopy()
        messages.insert(2, b.memory_fd(0, [good]))
        return _case("fds", "MemoryFd after Config", messages, "unix")
    elif op == "fd-on-header":
        # The fd rides on a byte of Start's header, read without ancillary data: the kernel must drop it.
        case = _case("fds", "an fd sent with Start's header", b.precopy(), "unix")
        case.fds_at = {0: [good]}
        return case
    elif op == "missing-zone":
        config, _ = b.two_zone_config()
        detail = "two zones, one MemoryFd"
    elif op == "private-zone":
        config, _ = b.two_zone_config(shared=False)
        fds = {0: [good], 1: [b.memfd(size=4 * MiB, identity="memfd-1", image=False)]}
        detail = "a MemoryFd for a private zone"
    elif op in ("split-same", "split-different"):
        # One zone as two slots: one memfd sent twice (mapped once), or one memfd per slot (the offload daemon's).
        half = size // 2

        def split(document: dict) -> None:
            m = document["memory_manager_data"]["guest_ram_mappings"]
            m[:] = [dict(m[0], size=half), dict(m[0], slot=1, gpa=half, size=half, file_offset=half)]
        config = b.config_with(split)
        fds = {0: [good], 1: [good if op == "split-same" else b.memfd(identity="memfd-1")]}
        detail = "one zone in two slots, " + ("the same memfd for both" if op == "split-same" else "two memfds")
    messages = b.local(fds, config=config)
    if rng.random() < 0.3:  # stop after Config: what matters is how the fds were taken
        messages = messages[:-2] + [b.abandon()]
    return _case("fds", detail, messages, transport)


# ---------------------------------------------------------------------------------------------
# Memory bombs and floods
# ---------------------------------------------------------------------------------------------


def _big_config(b: Builder, ram: int, shared: bool = True) -> tuple[bytes, list[tuple[int, int]]]:
    """A Config declaring ``ram`` bytes, laid out around the 32-bit hole as chmig does."""
    mappings, gpa, left, slot = [], 0, ram, 0
    while left:
        if gpa == 3 * GiB:
            gpa = 4 * GiB
        n = min(left, (3 * GiB if gpa < 3 * GiB else 64 * GiB) - gpa)
        if n <= 0:  # more than fits below 64 GiB: the mappings stop short (and the Config is refused)
            break
        mappings.append({"slot": slot, "gpa": gpa, "size": n, "zone_id": "mem0", "virtio_mem": False,
                         "file_offset": ram - left})
        gpa, left, slot = gpa + n, left - n, slot + 1

    def change(document: dict) -> None:
        document["vm_config"]["memory"].update(size=ram, shared=shared)
        document["memory_manager_data"]["guest_ram_mappings"] = mappings

    return b.config_with(change), [(m["gpa"], m["gpa"] + m["size"]) for m in mappings]


def k_bomb(rng: random.Random, b: Builder, env: Env) -> Case:
    """Memory bombs: a table covering all RAM and no data, RAM the host lacks, the largest table and JSON."""
    op = rng.choice(["all-ram", "all-ram", "over-host", "max-table", "max-json", "worker-tables"])
    if op == "all-ram":
        # At most a quarter of the host (its total, not what is free now: the case must not depend on the moment).
        ram = rng.choice([1 * GiB, 4 * GiB, min(8 * GiB, env.host_total // 4 // (2 * MiB) * 2 * MiB)])
        shared = rng.random() < 0.7
        config, spans = _big_config(b, ram, shared)
        ranges = [(lo, hi - lo) for lo, hi in spans]
        sent = rng.choice([0, 0, MiB, 20 * MiB])
        table = table_bytes(ranges)
        memory = Message("Memory", Rope([header(4, len(table)), table, zeros(sent)]), p.HEADER_SIZE + len(table))
        return _case("bomb/all-ram", f"{ram >> 30} GiB ({'shared' if shared else 'private'}), a table covering it all, "
                     f"then {sent >> 20} MiB of data", [b.start(), b.config(config), memory], "tcp",
                     rng.choice(["fin", "rst", "hold"]))
    if op == "over-host":
        ram = rng.choice([env.host_total + 2 * MiB, (env.host_total // GiB + 8) * GiB, 63 * GiB, 64 * GiB])
        ram = min(ram // (2 * MiB) * 2 * MiB, 64 * GiB)
        shared = rng.random() < 0.6
        config, spans = _big_config(b, ram, shared)
        return _case("bomb/over-host", f"Config declaring {ram >> 20} MiB ({'shared' if shared else 'private'}), "
                     f"host has {env.host_total >> 20} MiB", [b.start(), b.config(config), *b.precopy()[2:]])
    if op == "max-table":
        n = env.limits.max_table_bytes // 16
        lo, hi = b.rec.slots[0].gpa, b.rec.slots[0].end
        size = rng.choice([0, 1])
        ranges = [(lo + (i * 4099) % (hi - lo - 1), size) for i in range(n)]
        return _case("bomb/max-table", f"the largest table: {n} ranges of {size} byte(s)",
                     [b.start(), b.config(), b.memory(ranges), b.state(), b.complete()])
    if op == "worker-tables":
        n = env.limits.max_table_bytes // 16
        lo = b.rec.slots[0].gpa
        count = 2
        workers = [Worker(f"memory-{i}", b.memory([(lo + (j * 8191) % (1 << 23), 0) for j in range(n)]).rope)
                   for i in range(count)]
        return _case("bomb/worker-tables", f"{count} memory connections, each with the largest table of empty ranges",
                     [b.start(), b.config(), *b.precopy()[2:]], hooks={2: workers})
    # max-json: a Config or State at (or just under) its byte limit
    which = rng.choice(["Config", "State"])
    limit = env.limits.max_config_bytes if which == "Config" else env.limits.max_state_bytes
    doc = copy.deepcopy(b.config_doc if which == "Config" else b.state_doc)
    shape = rng.choice(["string", "numbers", "objects"])
    room = limit - len(_dump(doc)) - 64
    if shape == "string":
        doc["padding"] = "x" * room
    elif shape == "numbers":
        doc["padding"] = _RAW
        count = min(room // 8, env.limits.max_json_values - 100)
        raw = "[" + ",".join(["1234567"] * count) + "]"
        payload = _dump(doc, raw)
    else:
        count = min(room // 3, env.limits.max_json_containers - 100)
        doc["padding"] = _RAW
        payload = _dump(doc, "[" + ",".join(["{}"] * count) + "]")
    if shape == "string":
        payload = _dump(doc)
    messages = b.precopy(config=payload) if which == "Config" else b.precopy(state=payload)
    return _case("bomb/max-json", f"{which} of {len(payload) >> 20} MiB ({shape})", messages)


def k_flood(rng: random.Random, b: Builder, env: Env) -> Case:
    """Many small requests: thousands of Memory requests, 513 MemoryFds."""
    op = rng.choice(["memory", "memory", "memory-fds"])
    if op == "memory":
        n = rng.choice([500, 2000])
        empty = rng.random() < 0.5
        lo = b.rec.slots[0].gpa
        small = [b.memory([] if empty else [(lo + (i * PAGE) % b.rec.ram_size, PAGE)]) for i in range(n)]
        messages = [b.start(), b.config(), *small, *b.precopy()[2:]]
        return _case("flood", f"{n} {'empty' if empty else 'one-page'} Memory requests", messages,
                     rng.choice(["tcp", "unix"]))
    n = env.limits.max_slots + 1
    good = b.memfd()
    messages = [b.start(), *[b.memory_fd(slot, [good]) for slot in range(n)], b.config()]
    return _case("flood", f"{n} MemoryFds (one more than max_slots)", messages, "unix")


@dataclass(frozen=True)
class Kind:
    fn: KindFn
    weight: float


KINDS: dict[str, Kind] = {
    "replay": Kind(k_replay, 2),
    "close": Kind(k_close, 4),
    "close-mid": Kind(k_close_mid, 4),
    "flip": Kind(k_flip, 4),
    "header-command": Kind(k_header_command, 3),
    "header-length": Kind(k_header_length, 3),
    "header-padding": Kind(k_header_padding, 1),
    "out-of-state": Kind(k_out_of_state, 3),
    "config-json": Kind(k_config_json, 5),
    "state-json": Kind(k_state_json, 3),
    "ranges": Kind(k_ranges, 4),
    "workers": Kind(k_workers, 4),
    "fds": Kind(k_fds, 3),
    "bomb": Kind(k_bomb, 1),
    "flood": Kind(k_flood, 1),
}


def build(kind: str, rng: random.Random, b: Builder, env: Env) -> Case:
    return KINDS[kind].fn(rng, b, env)


def choose_kind(rng: random.Random) -> str:
    names = list(KINDS)
    return rng.choices(names, weights=[KINDS[n].weight for n in names])[0]
