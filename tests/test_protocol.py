"""The wire format, byte for byte, and the receiver state machine.

The hex vectors below are written from the layout in protocol.rs
(``u16 command | u8[6] headers | u64 length``, little-endian), not produced by
the code under test.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chmig.errors import ProtocolError
from chmig.protocol import (
    DEFAULT_LIMITS,
    FINAL_STATES,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    RECEIVER_TRANSITIONS,
    Command,
    ConnectionRole,
    Limits,
    MemoryRange,
    MemoryRangeTable,
    ReceiverMachine,
    ReceiverState,
    Request,
    Response,
    Status,
    check_page_fault_range,
    check_request_length,
    decode_memory_fd_slot,
    encode_memory_fd_slot,
    next_receiver_state,
    receiver_state_diagram,
)

pytestmark = pytest.mark.timeout(60)

H = bytes.fromhex

REQUEST_VECTORS = [
    (Request.start(), "0100 000000000000 0000000000000000"),
    (Request.config(0x1234), "0200 000000000000 3412000000000000"),
    (Request.state(0x0102030405), "0300 000000000000 0504030201000000"),
    (Request.memory(32), "0400 000000000000 2000000000000000"),
    (Request.complete(), "0500 000000000000 0000000000000000"),
    (Request.abandon(), "0600 000000000000 0000000000000000"),
    (Request.memory_fd(), "0700 000000000000 0400000000000000"),
    (Request.complete_paused(), "0800 000000000000 0000000000000000"),
    (Request.page_fault(), "0900 000000000000 1000000000000000"),
    (Request(Command.INVALID, 0), "0000 000000000000 0000000000000000"),
]


@pytest.mark.parametrize("request_, hexstr", REQUEST_VECTORS, ids=lambda v: getattr(v, "command", v))
def test_request_bytes(request_: Request, hexstr: str) -> None:
    wire = H(hexstr.replace(" ", ""))
    assert len(wire) == 16
    assert request_.encode() == wire
    assert Request.decode(wire) == request_
    assert Request.decode(wire).encode() == wire


def test_response_bytes() -> None:
    ok, err = H("0100000000000000" "0000000000000000"), H("0200000000000000" "0000000000000000")
    assert Response.ok().encode() == ok
    assert Response.error().encode() == err
    assert Response.decode(ok) == Response(Status.OK, 0)
    assert Response.decode(err) == Response(Status.ERROR, 0)
    page = H("0100000000000000" "0010000000000000")
    assert Response.ok(4096).encode() == page
    assert Response.decode(page).length == 4096


def test_memory_range_and_roles_bytes() -> None:
    wire = H("0020000000000000" "0030000000000000")
    assert MemoryRange(0x2000, 0x3000).encode() == wire
    assert MemoryRange.decode(wire) == MemoryRange(0x2000, 0x3000)
    assert ConnectionRole.PRECOPY_MEMORY.encode() == H("0100")
    assert ConnectionRole.FAULT.encode() == H("0200")
    assert ConnectionRole.decode(H("0100")) is ConnectionRole.PRECOPY_MEMORY
    assert ConnectionRole.decode(H("0200")) is ConnectionRole.FAULT
    assert encode_memory_fd_slot(3) == H("03000000")
    assert decode_memory_fd_slot(H("03000000")) == 3


def test_start_version_in_headers_and_rest_ignored() -> None:
    req = Request.decode(H("0100" "0100aabbccdd" "0000000000000000"))
    assert req.sender_version == 1
    assert Request.decode(H("0100" "0000aabbccdd" "0000000000000000")).check_sender_version() == 0


def test_start_version_window() -> None:
    """chmig sends version 0 (Cloud Hypervisor's) by default and accepts 0 and 1 (the newest and the one before)."""
    assert PROTOCOL_VERSION == 0 and Request.start().encode() == H("0100" "000000000000" "0000000000000000")
    assert Request.start(1).encode() == H("0100" "010000000000" "0000000000000000")
    # A version-1 migration that can recover sends its 16-byte token as Start's payload.
    assert Request.start(1, token=True).encode() == H("0100" "010000000000" "1000000000000000")
    assert [Request.start(v).check_sender_version() for v in (0, 1)] == [0, 1]
    for bad in (2, 255, 0xFFFF):
        with pytest.raises(ProtocolError, match=f"version {bad} doesn't match supported versions: 0, 1"):
            Request.start(bad).check_sender_version()


def test_start_payload_is_nothing_in_version_0_and_nothing_or_the_token_in_version_1() -> None:
    from chmig.protocol import Command, ReceiverMachine

    from chmig.errors import InternalError

    for version, lengths, allowed in ((0, {0}, "0"), (1, {0, 16}, "0 or 16")):
        for length in lengths:
            machine = ReceiverMachine()
            machine.begin(Request(Command.START, length, Request.start(version).command_headers))
            assert machine.version == version
        for wrong in {0, 8, 16, 17} - lengths:
            with pytest.raises(ProtocolError, match=f"Start of protocol version {version} carries {allowed} bytes"):
                ReceiverMachine().begin(Request(Command.START, wrong, Request.start(version).command_headers))
    with pytest.raises(InternalError, match="carries no token"):
        Request.start(0, token=True)


def test_recovery_hello_and_token_check() -> None:
    """Version 1: FaultRecovery (3) is followed by token(16) | attempt(u32) | 4 zero bytes; only the token of the
    migration's Start lets such a connection in."""
    from chmig.protocol import (CONNECTION_RULES, ConnectionRole, RECOVERY_HELLO_SIZE, RecoveryHello,
                                check_recovery)

    token = bytes(range(16))
    assert ConnectionRole.FAULT_RECOVERY.encode() == H("0300")
    wire = RecoveryHello(token, 2).encode()
    assert wire == token + H("02000000" "00000000") and len(wire) == RECOVERY_HELLO_SIZE == 24
    assert RecoveryHello.decode(wire) == RecoveryHello(token, 2)
    rule = CONNECTION_RULES[ConnectionRole.FAULT_RECOVERY]
    assert rule.since_version == 1 and rule.hello_size == 24 and rule.commands == {Command.PAGE_FAULT}
    for bad, why in ((wire[:23], "24 bytes"), (token + bytes(8), "attempt 0")):
        with pytest.raises(ProtocolError, match=why):
            RecoveryHello.decode(bad)
    check_recovery(RecoveryHello(token, 1), token)
    with pytest.raises(ProtocolError, match="wrong migration token"):
        check_recovery(RecoveryHello(bytes(16), 1), token)
    with pytest.raises(ProtocolError, match="agreed no token"):
        check_recovery(RecoveryHello(token, 1), None)


def test_discard_is_version_1_only_and_a_range_table() -> None:
    from chmig.errors import InternalError
    from chmig.protocol import Command, ReceiverMachine, ReceiverState, SourceMachine, check_discard_table

    assert Request.discard(32).encode() == H("0a00" "000000000000" "2000000000000000")

    def configured(version: int) -> ReceiverMachine:
        machine = ReceiverMachine()
        for request in (Request.start(version), Request.config(10)):
            machine.begin(request)
            machine.commit()
        return machine

    with pytest.raises(ProtocolError, match="Discard needs protocol version 1, but this migration's Start said "
                                            "version 0"):
        configured(0).begin(Request.discard(16))
    machine = configured(1)
    assert machine.begin(Request.discard(16)) is ReceiverState.CONFIGURED
    machine.commit()
    for bad in (Request.discard(17), Request(Command.DISCARD, 64 << 20)):
        with pytest.raises(ProtocolError, match="memory range table"):
            configured(1).begin(bad)
    started = ReceiverMachine()
    started.begin(Request.start(1))
    started.commit()
    with pytest.raises(ProtocolError, match="can't handle command Discard in receive state Started"):
        started.begin(Request.discard(16))
    with pytest.raises(InternalError, match="needs protocol version 1"):
        SourceMachine().check_send(Command.DISCARD)
    assert SourceMachine(version=1).version == 1
    check_discard_table(MemoryRangeTable([MemoryRange(0x1000, 0x2000)]))
    for bad in (MemoryRange(0x1001, 0x1000), MemoryRange(0x1000, 0x800), MemoryRange(0x1000, 0)):
        with pytest.raises(ProtocolError, match="not whole pages"):
            check_discard_table(MemoryRangeTable([bad]))


@pytest.mark.parametrize(
    "wire, message",
    [
        (H("0b00" + "00" * 14), "unknown command 11"),
        (H("ffff" + "00" * 14), "unknown command 65535"),
        (H("0100" + "00" * 13), "must be 16 bytes, got 15"),
        (b"", "must be 16 bytes, got 0"),
    ],
)
def test_malformed_request(wire: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        Request.decode(wire)


def test_malformed_response_and_role() -> None:
    with pytest.raises(ProtocolError, match="unknown status 3"):
        Response.decode(H("0300" + "00" * 14))
    with pytest.raises(ProtocolError, match="must be 16 bytes"):
        Response.decode(H("01"))
    with pytest.raises(ProtocolError, match="unknown connection role: 99"):
        ConnectionRole.decode((99).to_bytes(2, "little"))
    with pytest.raises(ProtocolError, match="2 bytes"):
        ConnectionRole.decode(b"\x01")
    with pytest.raises(ProtocolError, match="4 bytes"):
        decode_memory_fd_slot(b"\x01\x00")


def test_table_length_not_multiple_of_16() -> None:
    with pytest.raises(ProtocolError, match="not a multiple of 16"):
        MemoryRangeTable.decode(bytes(17))
    with pytest.raises(ProtocolError, match="wraps past the end"):
        MemoryRangeTable.decode(MemoryRange(0xFFFF_FFFF_FFFF_F000, 0x2000).encode())


# -- Cloud Hypervisor's own unit-test examples, as facts ----------------------------------


def _pages(table: MemoryRangeTable) -> list[tuple[int, int]]:
    return [(r.gpa, r.length // 0x1000) for r in table]


def test_ch_dirty_bitmap_example() -> None:
    table = MemoryRangeTable.from_dirty_bitmap([0b1111_1110_1110, 0b1_0000], 0x1000, 0x1000)
    assert _pages(table) == [(0x2000, 3), (0x6000, 7), (0x45000, 1)]
    # The same bitmap as raw bytes, as KVM_GET_DIRTY_LOG fills it.
    raw = (0b1111_1110_1110).to_bytes(8, "little") + (0b1_0000).to_bytes(8, "little")
    assert _pages(MemoryRangeTable.from_dirty_bitmap(raw, 0x1000, 0x1000)) == _pages(table)


def test_bitmap_runs_cross_word_boundaries() -> None:
    table = MemoryRangeTable.from_dirty_bitmap([1 << 63, 0b11, 0, 1 << 63], 0, PAGE_SIZE)
    assert _pages(table) == [(63 * 0x1000, 3), (255 * 0x1000, 1)]
    assert _pages(MemoryRangeTable.from_dirty_bitmap([(1 << 64) - 1] * 3, 0, PAGE_SIZE)) == [(0, 192)]
    assert not MemoryRangeTable.from_dirty_bitmap([0, 0], 0, PAGE_SIZE)


def _chunks(table: MemoryRangeTable, pages: int) -> set[tuple[tuple[int, int], ...]]:
    return {tuple(_pages(chunk)) for chunk in table.partition(pages * 0x1000)}


def test_ch_partition_examples() -> None:
    table = MemoryRangeTable.from_dirty_bitmap([0b11_0011_0011_0011], 0x1000, 0x1000)
    assert _pages(table) == [(0x1000, 2), (0x5000, 2), (0x9000, 2), (0xD000, 2)]
    assert _chunks(table, 2) == {((0x1000, 2),), ((0x5000, 2),), ((0x9000, 2),), ((0xD000, 2),)}
    assert _chunks(table, 5) == {
        ((0x1000, 2), (0x5000, 1)),
        ((0x6000, 1), (0x9000, 2), (0xD000, 2)),
    }


def test_ch_partition_uneven_split() -> None:
    table = MemoryRangeTable.from_dirty_bitmap([0b111], 0x1000, 0x1000)
    assert _chunks(table, 2) == {((0x1000, 1),), ((0x2000, 2),)}


# -- properties --------------------------------------------------------------------------

ranges_st = st.lists(
    st.builds(MemoryRange, st.integers(0, 2**40).map(lambda p: p * PAGE_SIZE), st.integers(1, 64).map(lambda n: n * PAGE_SIZE)),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ranges_st)
def test_table_roundtrip(ranges: list[MemoryRange]) -> None:
    table = MemoryRangeTable(ranges)
    wire = table.encode()
    assert len(wire) == table.byte_length == 16 * len(ranges)
    assert MemoryRangeTable.decode(wire) == table


def _bytes_of(table: MemoryRangeTable) -> list[int]:
    return sorted(page for r in table for page in range(r.gpa, r.end, PAGE_SIZE))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 4096), unique=True, max_size=60).map(sorted),
    st.integers(1, 20),
)
def test_partition_preserves_every_byte_once(pages: list[int], chunk_pages: int) -> None:
    words = [0] * 65
    for p in pages:
        words[p // 64] |= 1 << (p % 64)
    table = MemoryRangeTable.from_dirty_bitmap(words, 0x10000, PAGE_SIZE)
    assert _bytes_of(table) == [0x10000 + p * PAGE_SIZE for p in pages]
    chunks = list(table.partition(chunk_pages * PAGE_SIZE))
    assert all(0 < c.total_bytes <= chunk_pages * PAGE_SIZE for c in chunks)
    assert sorted(b for c in chunks for b in _bytes_of(c)) == _bytes_of(table)


# -- the state machine ------------------------------------------------------------------


def drive(commands: list[Command]) -> ReceiverMachine:
    machine = ReceiverMachine()
    for cmd in commands:
        length = {Command.MEMORY_FD: 4, Command.PAGE_FAULT: 16}.get(cmd, 0)
        machine.begin(Request(cmd, length))
        machine.commit()
    return machine


def test_remote_and_local_flows_complete() -> None:
    C = Command
    assert drive([C.START, C.CONFIG, C.MEMORY, C.MEMORY, C.STATE, C.COMPLETE]).state is ReceiverState.COMPLETED
    assert drive([C.START, C.MEMORY_FD, C.MEMORY_FD, C.CONFIG, C.STATE, C.COMPLETE_PAUSED]).finished


@pytest.mark.parametrize(
    "prefix, bad",
    [
        ([], Command.CONFIG),
        ([], Command.MEMORY),
        ([Command.START], Command.MEMORY),
        ([Command.START], Command.START),
        ([Command.START, Command.CONFIG], Command.MEMORY_FD),
        ([Command.START, Command.CONFIG], Command.COMPLETE),
        ([Command.START, Command.CONFIG, Command.STATE], Command.MEMORY),
        ([Command.START], Command.INVALID),
        ([Command.START, Command.CONFIG], Command.PAGE_FAULT),
    ],
)
def test_wrong_transition_aborts(prefix: list[Command], bad: Command) -> None:
    machine = drive(prefix)
    with pytest.raises(ProtocolError, match=f"can't handle command {bad.wire_name} in receive state"):
        machine.begin(Request(bad, {Command.MEMORY_FD: 4, Command.PAGE_FAULT: 16}.get(bad, 0)))
    assert machine.state is ReceiverState.ABORTED


def test_abandon_from_every_live_state() -> None:
    for state in ReceiverState:
        if state in FINAL_STATES:
            continue
        assert next_receiver_state(state, Command.ABANDON) is ReceiverState.ABORTED
    with pytest.raises(ProtocolError, match="already Completed"):
        next_receiver_state(ReceiverState.COMPLETED, Command.START)


def test_bad_version_aborts() -> None:
    machine = ReceiverMachine()
    with pytest.raises(ProtocolError, match="version 7"):
        machine.begin(Request.start(7))
    assert machine.state is ReceiverState.ABORTED


@pytest.mark.parametrize(
    "request_, message",
    [
        (Request(Command.START, 5), "Start of protocol version 0 carries 0 bytes, but length is 5"),
        (Request(Command.CONFIG, DEFAULT_LIMITS.max_config_bytes + 1), "exceeds the limit"),
        (Request(Command.STATE, 1 << 62), "exceeds the limit"),
        (Request(Command.MEMORY, 17), "not a multiple of 16"),
        (Request(Command.MEMORY, DEFAULT_LIMITS.max_table_bytes + 16), "exceeds the limit"),
        (Request(Command.MEMORY_FD, 8), "MemoryFd payload must be 4 bytes"),
        (Request(Command.PAGE_FAULT, 32), "PageFault payload must be 16 bytes"),
    ],
)
def test_oversized_or_wrong_lengths(request_: Request, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        check_request_length(request_)


def test_limits_are_configurable() -> None:
    small = Limits(max_config_bytes=100)
    with pytest.raises(ProtocolError, match="limit of 100"):
        check_request_length(Request.config(101), small)
    check_request_length(Request.config(100), small)


def test_page_fault_range_checks() -> None:
    check_page_fault_range(MemoryRange(0x1000, 0x1000))
    check_page_fault_range(MemoryRange(0, 1 << 30))
    for rng, message in [
        (MemoryRange(0x1000, 0), "empty"),
        (MemoryRange(0, (1 << 30) + 0x1000), "exceeds the limit"),
        (MemoryRange(0x1001, 0x1000), "not page aligned"),
        (MemoryRange(0x1000, 0x800), "not page aligned"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            check_page_fault_range(rng)


def test_diagram_is_drawn_from_the_table() -> None:
    diagram = receiver_state_diagram()
    for (state, command), target in RECEIVER_TRANSITIONS.items():
        assert f"{state.value} --> {target.value}: {command.wire_name}" in diagram


def test_docs_tables_are_current() -> None:
    """Every table of protocol.py is drawn into docs/protocol.md, and the drawing is current."""
    from pathlib import Path

    from chmig.docs import BLOCKS, render, render_block

    text = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    for name in BLOCKS:
        assert render_block(name) in text, f"docs/protocol.md: block {name} is stale: run `make docs`"
    assert render(text) == text
