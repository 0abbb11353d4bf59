"""A loopback self-check: one complete migration exchange between two threads.

The source thread sends Start, Config, one Memory request, State and Complete
over a real socket; the destination thread follows the receiver state machine
from :mod:`chmig.protocol` and writes the memory into its own buffer.  Every
message is printed with its header bytes, so the output doubles as a first
lesson in the wire format.  No KVM is involved: this checks the protocol and
the transport on a fresh machine.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Callable

from . import protocol as p
from .errors import ChmigError, MigrationError
from .transfer import expect_ok
from .transport import Connection, connect, listen, parse_url

log = logging.getLogger(__name__)

MEMORY_SIZE = 4 * p.MiB


class Trace:
    """Collects one line per message, from both threads, in order."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._lock = threading.Lock()

    def __call__(self, who: str, what: str, header: bytes | None = None) -> None:
        line = f"{who:<11} {what}"
        if header is not None:
            line = f"{line:<58} {header.hex(' ', 2)}"
        with self._lock:
            self._emit(line)


def _receive(conn: Connection, memory: bytearray, trace: Trace) -> dict:
    """The destination: the receiver state machine driving a plain buffer."""
    machine = p.ReceiverMachine()
    received: dict = {}
    while not machine.finished:
        header = conn.read_exact(p.HEADER_SIZE, what="request header")
        request = p.Request.decode(header)
        try:
            target = machine.begin(request)
            payload = b""
            if request.command is p.Command.MEMORY:
                table = p.MemoryRangeTable.decode(conn.read_exact(request.length, what="range table"))
                view = memoryview(memory)
                for rng in table:
                    if rng.end > len(memory):
                        raise MigrationError(f"range {rng.gpa:#x}+{rng.length:#x} outside memory", where="Memory")
                    conn.read_exact_into(view[rng.gpa : rng.end])
                received.setdefault("ranges", []).extend((r.gpa, r.length) for r in table)
            elif request.length:
                payload = conn.read_exact(request.length, what=request.command.wire_name)
            if request.command is p.Command.CONFIG:
                received["config"] = json.loads(payload)
            elif request.command is p.Command.STATE:
                received["state"] = json.loads(payload)
            machine.commit()
            response = p.Response.ok()
        except ChmigError:
            machine.fail()
            response = p.Response.error()
            target = machine.state
        trace("dest", f"<- {request.command.wire_name}: now {target.value}", header)
        conn.write_all(response.encode())
        trace("dest", f"-> {response.status.name.capitalize()}", response.encode())
    return received


def _send(conn: Connection, memory: bytes, trace: Trace) -> None:
    """The source: the remote-migration flow with one Memory iteration."""

    def request(req: p.Request, payload: bytes = b"", note: str = "") -> None:
        trace("source", f"-> {req.command.wire_name} {note}".rstrip(), req.encode())
        conn.write_all(req.encode() + payload)

    request(p.Request.start(), note=f"(protocol version {p.PROTOCOL_VERSION})")
    expect_ok(conn, "Start")
    config = json.dumps({"vm_config": {"memory": {"size": len(memory)}}, "memory_manager_data": {}}).encode()
    request(p.Request.config(len(config)), config, f"({len(config)} bytes of JSON)")
    expect_ok(conn, "Config")
    table = p.MemoryRangeTable([p.MemoryRange(0x1000, 0x3000), p.MemoryRange(0x200000, 0x100000)])
    request(p.Request.memory(table.byte_length), table.encode(), f"({len(table)} ranges, {table.total_bytes} bytes)")
    view = memoryview(memory)
    for rng in table:
        conn.write_all(view[rng.gpa : rng.end])
    expect_ok(conn, "Memory")
    state = json.dumps({"vcpus": [{"rip": 0x80000}]}).encode()
    request(p.Request.state(len(state)), state, f"({len(state)} bytes of JSON)")
    expect_ok(conn, "State")
    request(p.Request.complete())
    expect_ok(conn, "Complete")


def run(url: str = "tcp:127.0.0.1:0", emit: Callable[[str], None] = print) -> bool:
    """Run the exchange over ``url``; print the trace; return True when the memory arrived intact."""
    trace = Trace(emit)
    source_memory = os.urandom(MEMORY_SIZE)
    dest_memory = bytearray(MEMORY_SIZE)
    results: dict = {}
    errors: list[BaseException] = []

    with listen(parse_url(url)) as listener:
        emit(f"self-check: destination listening on {listener.address}")

        def destination() -> None:
            try:
                with listener.accept(timeout=30) as conn:
                    results.update(_receive(conn, dest_memory, trace))
            except BaseException as exc:  # reported by the owner below
                errors.append(exc)

        thread = threading.Thread(target=destination, name="selfcheck-destination")
        thread.start()
        try:
            with connect(listener.address) as conn:
                _send(conn, source_memory, trace)
        finally:
            thread.join(timeout=30)
    if errors:
        raise errors[0]
    intact = all(
        dest_memory[gpa : gpa + length] == source_memory[gpa : gpa + length] for gpa, length in results["ranges"]
    )
    moved = sum(length for _, length in results["ranges"])
    emit(f"self-check: {moved} bytes of memory arrived {'intact' if intact else 'CORRUPTED'}; "
         f"config and state received: {'config' in results and 'state' in results}")
    return intact
