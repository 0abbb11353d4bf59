"""Moving guest memory over a connection, and the request/response helpers both sides share.

Guest memory is never copied by Python: the sender hands ``sendall`` a
``memoryview`` of the guest mapping, the receiver ``recv_into``s straight into
one.  The receiver checks every range of a table against guest RAM before it
reads a single byte of data.
"""

from __future__ import annotations

import logging

from . import protocol as p
from .errors import PeerError, ProtocolError
from .memory import GuestMemory
from .transport import Connection

log = logging.getLogger(__name__)


def send_request(conn: Connection, request: p.Request, payload: bytes = b"") -> None:
    """One request and its payload (Config/State JSON; never guest memory) in one write."""
    conn.write_all(request.encode() + payload)


def expect_ok(conn: Connection, step: str) -> p.Response:
    """Read the Response to ``step``; anything but Ok stops the migration."""
    response = p.Response.decode(conn.read_exact(p.HEADER_SIZE, what=f"response to {step}"))
    if not response.is_ok:
        raise PeerError(f"the destination answered {response.status.name.capitalize()}", where=step)
    return response


def request_ok(conn: Connection, request: p.Request, payload: bytes = b"") -> None:
    """Send one request and require Ok (Start, Config, State, Complete...)."""
    send_request(conn, request, payload)
    expect_ok(conn, request.command.wire_name)


def send_memory(conn: Connection, memory: GuestMemory, table: p.MemoryRangeTable) -> int:
    """Protocol step *Memory* (sender): header, table, then every range's bytes; wait for Ok."""
    conn.write_all(p.Request.memory(table.byte_length).encode() + table.encode())
    for rng in table:
        for gpa, length in memory.split(rng):
            with memory.view(gpa, length) as view:
                conn.write_all(view)
    expect_ok(conn, "Memory")
    return table.total_bytes


def receive_memory(conn: Connection, memory: GuestMemory, request: p.Request, populate: bool = True) -> int:
    """Protocol step *Memory* (receiver): read the table, check it, receive the bytes in place.

    The request's length has already been checked against the limits.  Every
    range is checked against guest RAM before any data is read, so a hostile
    table cannot make us write outside guest memory.
    """
    table = p.MemoryRangeTable.decode(conn.read_exact(request.length, what="memory range table"))
    pieces = []
    for rng in table:
        if rng.length == 0:
            continue
        try:
            pieces.extend(memory.split(rng))
        except Exception as exc:
            raise ProtocolError(f"range {rng.gpa:#x}+{rng.length:#x} is not inside guest RAM", where="Memory") from exc
    for gpa, length in pieces:
        if populate:
            memory.populate_range(gpa, length)
        with memory.view(gpa, length) as view:
            conn.read_exact_into(view, what=f"memory at {gpa:#x}")
    return table.total_bytes
