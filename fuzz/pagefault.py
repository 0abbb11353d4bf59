"""The PageFault server (the source's end of a postcopy Fault connection), fuzzed in process.

    python -m fuzz.pagefault --cases N --seed S [--only INDEX ...]

:meth:`chmig.channel.Channel.serve_page_faults` answers a destination's
PageFault requests from guest memory.  Each case starts it on one end of a
real socket pair over a real two-slot guest memory (memfd-backed, every page
stamped with its own address), then plays a hostile destination on the other
end: valid requests interleaved with mutated ones (ranges outside RAM, across
the hole between slots, ending at 2^64, empty, unaligned, larger than 1 GiB;
other commands; wrong lengths; a truncated or garbage header; an early close;
a flood).  Per case it checks:

* every valid request is answered Ok with exactly the requested bytes of guest
  memory (compared with the stamped pattern), never more;
* the first invalid one is answered Error (or, for a broken header, the
  connection is closed) and the server ends with a ProtocolError or
  TransportError — never another exception, never an Ok;
* the server returns within a bound, and no fd or thread is left behind.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from chmig import protocol as p
from chmig.channel import Channel
from chmig.errors import ProtocolError, TransportError
from chmig.memory import GuestMemory, ZoneConfig
from chmig.transport import Connection

from .common import Resources, standalone_main

Report = Callable[[str], None]

PAGE = p.PAGE_SIZE
#: Two zones, so two slots with nothing between them: ranges may straddle a slot boundary.
ZONES = [ZoneConfig("mem0", 4 << 20, True), ZoneConfig("mem1", 2 << 20, True)]
BOUND_S = 10.0


@dataclass
class Outcome:
    index: int
    kind: str
    ok: bool
    detail: str = ""


def _stamp(memory: GuestMemory) -> None:
    """Every 8 bytes of guest memory hold their own guest-physical address: any wrong byte shows."""
    for region in memory.regions:
        words = region.size // 8
        pattern = struct.pack(f"<{words}Q", *range(region.gpa, region.end, 8))
        memory.write(region.gpa, pattern)


def _expected(gpa: int, length: int) -> bytes:
    return struct.pack(f"<{length // 8}Q", *range(gpa, gpa + length, 8))


def _valid_range(rng: random.Random, memory: GuestMemory) -> p.MemoryRange:
    end = memory.regions[-1].end
    gpa = rng.randrange(0, end // PAGE) * PAGE
    pages = rng.randint(1, min(64, (end - gpa) // PAGE))
    return p.MemoryRange(gpa, pages * PAGE)


def _hostile(rng: random.Random, memory: GuestMemory) -> tuple[str, bytes]:
    """One mutated request (the wire bytes) and the name of its mutation."""
    end = memory.regions[-1].end
    choice = rng.randrange(11)
    if choice == 0:
        return "outside RAM", p.Request.page_fault().encode() + p.MemoryRange(end, PAGE).encode()
    if choice == 1:
        return "past the end", p.Request.page_fault().encode() + p.MemoryRange(end - PAGE, 2 * PAGE).encode()
    if choice == 2:
        return "ends at 2^64", p.Request.page_fault().encode() + struct.pack("<QQ", (1 << 64) - PAGE, PAGE)
    if choice == 3:
        return "wraps", p.Request.page_fault().encode() + struct.pack("<QQ", (1 << 64) - PAGE, 2 * PAGE)
    if choice == 4:
        return "empty", p.Request.page_fault().encode() + p.MemoryRange(0, 0).encode()
    if choice == 5:
        return "unaligned", p.Request.page_fault().encode() + p.MemoryRange(rng.randrange(1, PAGE), PAGE).encode()
    if choice == 6:
        return "over 1 GiB", p.Request.page_fault().encode() + p.MemoryRange(0, 2 << 30).encode()
    if choice == 7:
        command = rng.choice([c for c in p.Command if c is not p.Command.PAGE_FAULT])
        return f"command {command.wire_name}", p.Request(command, 16).encode() + p.MemoryRange(0, PAGE).encode()
    if choice == 8:
        length = rng.choice([0, 8, 15, 17, 32, 1 << 40])
        return f"length {length}", p.Request(p.Command.PAGE_FAULT, length).encode() + bytes(min(length, 32))
    if choice == 9:
        return "unknown command", struct.pack("<H6sQ", rng.randrange(10, 1 << 16), bytes(6), 16) + bytes(16)
    return "garbage header", os.urandom(16)


def _read(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def run_case(index: int, seed: int, memory: GuestMemory) -> Outcome:
    rng = random.Random(seed * 1_000_003 + index)
    ours, theirs = socket.socketpair()
    theirs.settimeout(BOUND_S)
    source = Channel(Connection(ours, peer="fuzz-destination", is_unix=True), side=p.Side.SOURCE, name="fault-0")
    result: dict = {}

    def serve() -> None:
        try:
            result["served"] = source.serve_page_faults(memory)
        except BaseException as exc:  # judged below
            result["error"] = exc

    thread = threading.Thread(target=serve, name=f"fuzz-pagefault-{index}", daemon=True)
    thread.start()
    kind = "valid only"
    try:
        for _ in range(rng.randint(0, 8)):
            page = _valid_range(rng, memory)
            theirs.sendall(p.Request.page_fault().encode() + page.encode())
            answer = p.Response.decode(_read(theirs, 16))
            if not answer.is_ok or answer.length != page.length:
                return Outcome(index, kind, False, f"valid {page} answered {answer}")
            data = _read(theirs, page.length)
            if data != _expected(page.gpa, page.length):
                return Outcome(index, kind, False, f"valid {page}: wrong bytes")
        ending = rng.randrange(4)
        if ending == 0:
            kind = "clean close"
            theirs.shutdown(socket.SHUT_WR)
        elif ending == 1:
            kind = "truncated request"
            theirs.sendall(p.Request.page_fault().encode()[: rng.randrange(1, 16)])
            theirs.shutdown(socket.SHUT_WR)
        else:
            kind, wire = _hostile(rng, memory)
            theirs.sendall(wire)
            answer_bytes = _read(theirs, 16)
            if answer_bytes:
                answer = p.Response.decode(answer_bytes)
                if answer.is_ok:
                    return Outcome(index, kind, False, f"{kind}: answered Ok with {answer.length} bytes")
            theirs.shutdown(socket.SHUT_WR)
        thread.join(BOUND_S)
        if thread.is_alive():
            return Outcome(index, kind, False, f"the server did not end within {BOUND_S} s")
        error = result.get("error")
        if kind == "clean close":
            return Outcome(index, kind, error is None, f"unexpected {error!r}" if error else "")
        if not isinstance(error, (ProtocolError, TransportError)):
            return Outcome(index, kind, False, f"ended with {error!r}, not a clear protocol or transport error")
        if "\n" in str(error):
            return Outcome(index, kind, False, f"a multi-line error: {error!r}")
        return Outcome(index, kind, True)
    except OSError as exc:
        return Outcome(index, kind, False, f"the fuzzer's socket failed: {exc}")
    finally:
        theirs.close()
        thread.join(BOUND_S)
        source.close()


def run(cases: int, seed: int, report: Report, only: list[int] | None = None) -> int:
    """Run ``cases`` cases (or just ``only``); print a summary; return the number of failures."""
    memory = GuestMemory.create(ZONES)
    try:
        _stamp(memory)
        resources = Resources()
        begin = time.monotonic()
        kinds: dict[str, list[int]] = {}
        failures = 0
        for index in only if only is not None else range(cases):
            outcome = run_case(index, seed, memory)
            counts = kinds.setdefault(outcome.kind, [0, 0])
            counts[0] += 1
            if not outcome.ok:
                counts[1] += 1
                failures += 1
                report(f"pagefault: FAILED case {index} (seed {seed}, --only {index}): {outcome.detail}")
        leaked, counts = resources.compare("pagefault", report)
        failures += leaked
        report(f"pagefault: {sum(c[0] for c in kinds.values())} cases in {time.monotonic() - begin:.1f} s, "
               f"{failures} failures; {counts}")
        for kind, (count, failed) in sorted(kinds.items()):
            report(f"  {kind:<22} {count:>6} cases  {failed:>4} failed")
        return failures
    finally:
        memory.close()


def main() -> int:
    return standalone_main("python -m fuzz.pagefault", __doc__, run)


if __name__ == "__main__":
    sys.exit(main())
