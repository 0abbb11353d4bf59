"""A loopback self-check: one complete migration exchange between two threads.

The source thread sends Start, Config, one Memory request, State and Complete
over a real socket; the destination thread follows the receiver state machine
from :mod:`chmig.protocol` and writes the memory into its own buffer.  Both
sides speak through the message layer (:mod:`chmig.channel`), and the printed
trace is an observer of it: every message, both directions, with its header
bytes — a first lesson in the wire format.  No KVM is involved: this checks
the protocol and the transport on a fresh machine.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Callable, Iterator

from . import protocol as p
from .channel import SENT, Channel, IncomingRequest, Message, Observers
from .errors import ChmigError, VmError
from .threads import ThreadGroup
from .transport import connect, listen, parse_url
from .units import MiB

log = logging.getLogger(__name__)

MEMORY_SIZE = 4 * MiB


class FlatMemory:
    """A plain buffer as "guest memory" from address 0 (the message layer's MemoryTarget)."""

    def __init__(self, data: bytearray | bytes) -> None:
        self.data = bytearray(data)

    def split(self, rng: p.MemoryRange) -> Iterator[tuple[int, int]]:
        if rng.end > len(self.data):
            raise VmError(f"range {rng.gpa:#x}+{rng.length:#x} is outside memory", where="self-check")
        yield rng.gpa, rng.length

    def view(self, gpa: int, length: int) -> memoryview:
        return memoryview(self.data)[gpa : gpa + length]

    def populate_range(self, gpa: int, length: int) -> None:
        pass


def trace_printer(emit: Callable[[str], None]) -> Callable[[Message], None]:
    """An observer that prints one line per message: who, which way, what, and the header bytes."""
    lock = threading.Lock()

    def observe(message: Message) -> None:
        arrow = "->" if message.direction == SENT else "<-"
        line = f"{message.side:<11} {arrow} {message.name:<14} {message.header.hex(' ', 2)}"
        if message.summary:
            line += f"  {message.summary}"
        with lock:
            emit(line)

    return observe


def _receive(channel: Channel, memory: FlatMemory) -> dict:
    """The destination: the receiver state machine driving a plain buffer."""
    machine = p.ReceiverMachine()
    received: dict = {"ranges": []}
    while not machine.finished:
        try:
            incoming: IncomingRequest = channel.read_request(machine.begin)
            if incoming.table is not None:
                channel.receive_memory(memory, incoming.table, populate=False)
                received["ranges"].extend((r.gpa, r.length) for r in incoming.table)
            elif incoming.command in (p.Command.CONFIG, p.Command.STATE):
                received[incoming.command.wire_name.lower()] = json.loads(incoming.payload)
            machine.commit()
        except ChmigError as exc:
            machine.fail()
            channel.answer_error(exc.message)
            raise
        channel.answer_ok()
    return received


def _send(channel: Channel, memory: FlatMemory) -> None:
    """The source: the remote-migration flow with one Memory iteration, as the table allows it."""
    machine = p.SourceMachine()

    def step(request: p.Request, payload: bytes = b"") -> None:
        machine.check_send(request.command)
        channel.request_ok(request, payload)
        machine.acknowledged(request.command)

    step(p.Request.start())
    config = json.dumps({"vm_config": {"memory": {"size": len(memory.data)}}, "memory_manager_data": {}}).encode()
    step(p.Request.config(len(config)), config)
    table = p.MemoryRangeTable([p.MemoryRange(0x1000, 0x3000), p.MemoryRange(0x200000, 0x100000)])
    machine.check_send(p.Command.MEMORY)
    channel.send_memory(memory, table)
    machine.acknowledged(p.Command.MEMORY)
    state = json.dumps({"vcpus": [{"rip": 0x80000}]}).encode()
    step(p.Request.state(len(state)), state)
    step(p.Request.complete())


def run(url: str = "tcp:127.0.0.1:0", emit: Callable[[str], None] = print) -> bool:
    """Run the exchange over ``url``; print the trace; return True when the memory arrived intact."""
    observers = Observers(trace_printer(emit))
    source_memory = FlatMemory(os.urandom(MEMORY_SIZE))
    dest_memory = FlatMemory(bytearray(MEMORY_SIZE))
    results: dict = {}
    errors: list[BaseException] = []

    with listen(parse_url(url)) as listener:
        emit(f"self-check: destination listening on {listener.address}")

        def destination() -> None:
            try:
                with Channel(listener.accept(timeout=30), side=p.Side.DESTINATION, observers=observers) as channel:
                    results.update(_receive(channel, dest_memory))
            except BaseException as exc:  # reported by the owner below
                errors.append(exc)

        threads = ThreadGroup("selfcheck")
        threads.start("selfcheck-destination", destination, stopper=listener.abort)
        try:
            with Channel(connect(listener.address), side=p.Side.SOURCE, observers=observers) as channel:
                _send(channel, source_memory)
        finally:
            threads.close(timeout=30)
    if errors:
        raise errors[0]
    intact = all(dest_memory.data[gpa : gpa + length] == source_memory.data[gpa : gpa + length]
                 for gpa, length in results["ranges"])
    moved = sum(length for _, length in results["ranges"])
    emit(f"self-check: {moved} bytes of memory arrived {'intact' if intact else 'CORRUPTED'}; "
         f"config and state received: {'config' in results and 'state' in results}")
    return intact
