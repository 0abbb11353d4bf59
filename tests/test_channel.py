"""The message layer, role dispatch, owned threads and the module boundaries of the restructuring.

Real KVM guests, real sockets (loopback TCP, UNIX, socket pairs), real threads: the observer must see every
message of a real migration, in order, on every connection, from both ends.
"""

from __future__ import annotations

import ast
import logging
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from chmig import protocol as p
from chmig.channel import RECEIVED, SENT, Channel, Message, MessageLog, Observers
from chmig.errors import InternalError, PeerError, ProtocolError, StuckThreadError
from chmig.memory import GuestMemory
from chmig.receive import Receiver
from chmig.selfcheck import FlatMemory
from chmig.send import Sender, SendOptions, new_stats
from chmig.threads import ThreadGroup
from chmig.transport import Connection, listen, parse_url
from chmig.vm import Serial, Vm, VmConfig, VmState

from .conftest import requires_kvm
from .wire import config_payload

pytestmark = pytest.mark.timeout(90)

PACKAGE = Path(__file__).parent.parent / "chmig"


# ---------------------------------------------------------------------------------------------
# The observer sees a whole real migration
# ---------------------------------------------------------------------------------------------


def _boot(memory: str = "size=32M", zones: list[str] | None = None) -> Vm:
    config = VmConfig.from_args("boot=1", memory, zones or [], "verify,dirty_percent=10")
    vm = Vm(config, GuestMemory.create(config.zones), Serial("off"))
    vm.boot()
    vm.start()
    return vm


def _migrate_in_process(url: str, memory: str = "size=32M", **options: object) -> tuple[MessageLog, Vm, Vm]:
    """Source VM here, Receiver in a thread here, both reporting to one MessageLog."""
    source = _boot(memory, zones=["id=extra,size=4M"] if options.get("local") else None)
    log = MessageLog()
    observers = Observers(log)
    outcome: dict = {}
    with listen(parse_url(url)) as listener:
        receiver = Receiver(listener, observers=observers)

        def receive() -> None:
            try:
                outcome["vm"] = receiver.run(accept_timeout=30)
            except BaseException as exc:  # reported below
                outcome["error"] = exc

        thread = threading.Thread(target=receive, name="test-receiver")
        thread.start()
        send_options = SendOptions(destination_url=str(listener.address), **options)  # type: ignore[arg-type]
        send_options.validate()
        try:
            Sender(source, send_options, new_stats(send_options), observers).run()
        finally:
            thread.join(30)
    assert "error" not in outcome, outcome
    return log, source, outcome["vm"]


def _guest_continues(vm: Vm) -> None:
    start = vm.info()["guest"]["rounds"]
    deadline = time.monotonic() + 30
    while vm.info()["guest"]["rounds"] < start + 2:
        assert time.monotonic() < deadline and not vm.failure, vm.failure
        time.sleep(0.05)
    assert vm.info()["guest"]["errors"] == 0


def _on(log: MessageLog, side: str, connection: str) -> list[tuple[str, str]]:
    return [(m.direction, m.name) for m in log.messages if m.side == side and m.connection == connection]


def _mirror(sequence: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(RECEIVED if d == SENT else SENT, n) for d, n in sequence]


@requires_kvm
def test_observer_sees_every_message_of_a_two_connection_precopy() -> None:
    # 160 MiB: iteration 0 alone is three 64 MiB chunks, so both workers surely carry memory.
    log, source, dest = _migrate_in_process("tcp:127.0.0.1:0", "size=160M", connections=2)
    try:
        _guest_continues(dest)
        main = _on(log, "source", "main")
        assert main == [(SENT, "Start"), (RECEIVED, "Ok"), (SENT, "Config"), (RECEIVED, "Ok"),
                        (SENT, "State"), (RECEIVED, "Ok"), (SENT, "Complete"), (RECEIVED, "Ok")]
        assert _on(log, "destination", "main") == _mirror(main)
        connections = {(m.side, m.connection) for m in log.messages}
        assert connections == {(side, name) for side in ("source", "destination")
                               for name in ("main", "memory-0", "memory-1")}
        for side in ("source", "destination"):
            for name in ("memory-0", "memory-1"):
                sequence = _on(log, side, name)
                role_direction = SENT if side == "source" else RECEIVED
                assert sequence[0] == (role_direction, "PrecopyMemory")
                pairs = sequence[1:]
                assert pairs and len(pairs) % 2 == 0
                request, answer = (SENT, RECEIVED) if side == "source" else (RECEIVED, SENT)
                assert pairs == [(request, "Memory"), (answer, "Ok")] * (len(pairs) // 2)
        # Memory went over the workers, between Config's Ok and State, and nowhere else.
        for side in ("source", "destination"):
            ordered = [m for m in log.messages if m.side == side]
            config_ok = next(i for i, m in enumerate(ordered) if m.connection == "main" and m.name == "Ok"
                             and ordered[i - 1].name == "Config")
            state = next(i for i, m in enumerate(ordered) if m.name == "State")
            memory = [i for i, m in enumerate(ordered) if m.name == "Memory"]
            assert memory and config_ok < min(memory) and max(memory) < state
        # Every header is the 16 bytes that went over the wire.
        for message in log.messages:
            if message.kind == "role":
                assert message.header == p.ConnectionRole.PRECOPY_MEMORY.encode()
            elif message.kind == "request":
                assert p.Request.decode(message.header).command.wire_name == message.name
                assert message.length == p.Request.decode(message.header).length
            else:
                assert p.Response.decode(message.header).status.name.capitalize() == message.name
        first_memory = next(m for m in log.messages if m.name == "Memory" and m.side == "source")
        assert "ranges" in first_memory.summary and "bytes follow" in first_memory.summary
    finally:
        dest.close()
        source.close()


@requires_kvm
def test_observer_sees_every_message_of_a_local_migration(tmp_path: Path) -> None:
    log, source, dest = _migrate_in_process(f"unix:{tmp_path}/local.sock", local=True)
    try:
        _guest_continues(dest)
        slots = len(source.memory.regions)
        assert slots == 2
        main = _on(log, "source", "main")
        assert main == ([(SENT, "Start"), (RECEIVED, "Ok")] + [(SENT, "MemoryFd"), (RECEIVED, "Ok")] * slots
                        + [(SENT, "Config"), (RECEIVED, "Ok"), (SENT, "State"), (RECEIVED, "Ok"),
                           (SENT, "Complete"), (RECEIVED, "Ok")])
        assert _on(log, "destination", "main") == _mirror(main)
        assert {m.connection for m in log.messages} == {"main"}
        fds = [m.summary for m in log.messages if m.name == "MemoryFd"]
        assert all(re.fullmatch(r"slot \d+, fd \d+", s) for s in fds), fds
        assert dest.state == VmState.RUNNING
    finally:
        dest.close()
        source.close()


def test_a_failing_observer_does_not_break_the_channel(caplog: pytest.LogCaptureFixture) -> None:
    def broken(message: Message) -> None:
        raise RuntimeError("observer bug")

    log = MessageLog()
    a, b = _pair(Observers(broken, log))
    a.send_request(p.Request.start())
    assert b.read_request(lambda r: None).command is p.Command.START
    assert [m.name for m in log.messages] == ["Start", "Start"]
    assert "observer" in caplog.text


# ---------------------------------------------------------------------------------------------
# The message layer on a socket pair: rules, responses, PageFault both ways
# ---------------------------------------------------------------------------------------------


def _pair(observers: Observers | None = None) -> tuple[Channel, Channel]:
    left, right = socket.socketpair()
    observers = observers or Observers()
    return (Channel(Connection(left, peer="left", is_unix=True), side="source", observers=observers),
            Channel(Connection(right, peer="right", is_unix=True), side="destination", observers=observers))


def test_a_refused_request_is_reported_before_its_payload_is_read() -> None:
    log = MessageLog()
    source, destination = _pair(Observers(log))
    machine = p.ReceiverMachine()
    source.send_request(p.Request.config(5), b"hello")
    with pytest.raises(ProtocolError, match="can't handle command Config in receive state Established"):
        destination.read_request(machine.begin)
    refused = log.messages[-1]
    assert (refused.side, refused.direction, refused.name) == ("destination", RECEIVED, "Config")
    assert refused.summary.startswith("refused: ")
    assert destination.conn.read_exact(5) == b"hello"  # the payload was left unread


def test_an_answer_with_a_payload_is_a_protocol_error() -> None:
    source, destination = _pair()
    source.send_request(p.Request.start())
    destination.read_request(lambda r: None)
    destination.answer(p.Response.ok(length=8))
    with pytest.raises(ProtocolError, match="answer to Start carries a payload of 8 bytes"):
        source.expect_ok(p.Command.START)


def test_the_source_follows_the_table() -> None:
    machine = p.SourceMachine()
    with pytest.raises(InternalError, match="tried to send Config: can.t handle command Config in receive state Established"):
        machine.check_send(p.Command.CONFIG)
    assert machine.acknowledged(p.Command.START) is p.ReceiverState.STARTED
    assert machine.check_send(p.Command.ABANDON) is p.ReceiverState.ABORTED


def test_connection_rules_table() -> None:
    memory_rule = p.connection_rule(p.ConnectionRole.PRECOPY_MEMORY)
    assert memory_rule.commands == {p.Command.MEMORY} and memory_rule.requester is p.Side.SOURCE
    assert p.connection_rule(p.ConnectionRole.FAULT).commands == {p.Command.PAGE_FAULT}
    with pytest.raises(ProtocolError, match="only Memory requests are allowed on PrecopyMemory connections"):
        p.check_connection_request(p.ConnectionRole.PRECOPY_MEMORY, p.Request.state(2))
    with pytest.raises(ProtocolError, match="only PageFault requests are allowed on Fault connections"):
        p.check_connection_request(p.ConnectionRole.FAULT, p.Request.memory(16))
    with pytest.raises(ProtocolError, match="not allowed"):
        p.connection_rule(p.ConnectionRole.INVALID)


def test_page_faults_are_served_from_memory_and_bad_ranges_refused() -> None:
    log = MessageLog()
    observers = Observers(log)
    fault_source, fault_destination = _pair(observers)
    fault_source.name = fault_destination.name = "fault-0"
    memory = FlatMemory(bytes(range(256)) * (64 * 1024 // 256))  # 64 KiB
    served: dict = {}

    def serve() -> None:
        try:
            served["pages"] = fault_source.serve_page_faults(memory)
        except BaseException as exc:  # the refused range ends the connection
            served["error"] = exc

    thread = threading.Thread(target=serve, name="test-fault-server")
    thread.start()
    page = bytearray(8192)
    assert fault_destination.request_page(p.MemoryRange(0x2000, 0x2000), memoryview(page)) == 0x2000
    assert bytes(page) == bytes(memory.data[0x2000:0x4000])
    fault_destination.conn.write_all(p.Request.page_fault().encode() + p.MemoryRange(0x10000, 0x1000).encode())
    assert p.Response.decode(fault_destination.conn.read_exact(16)).status is p.Status.ERROR
    thread.join(10)
    assert isinstance(served.get("error"), ProtocolError), served
    assert "outside memory" in str(served["error"])
    names = [(m.side, m.direction, m.name) for m in log.messages]
    assert names[:4] == [("destination", SENT, "PageFault"), ("source", RECEIVED, "PageFault"),
                         ("source", SENT, "Ok"), ("destination", RECEIVED, "Ok")]
    assert all(m.connection == "fault-0" for m in log.messages)


def test_page_fault_ranges_are_checked_before_asking() -> None:
    _, fault_destination = _pair()
    for page, message in [(p.MemoryRange(0, 0), "empty range"), (p.MemoryRange(0x1001, 0x1000), "aligned"),
                          (p.MemoryRange(0, 2 << 30), "exceeds the limit")]:
        with pytest.raises(ProtocolError, match=message):
            fault_destination.request_page(page, None)


def test_a_page_fault_answered_error_is_the_peers_refusal() -> None:
    fault_source, fault_destination = _pair()

    def refuse() -> None:
        fault_source.read_request(lambda r: None)
        fault_source.answer_error()

    thread = threading.Thread(target=refuse, name="test-refuser")
    thread.start()
    with pytest.raises(PeerError, match="answered Error"):
        fault_destination.request_page(p.MemoryRange(0x1000, 0x1000), memoryview(bytearray(4096)))
    thread.join(10)


# ---------------------------------------------------------------------------------------------
# Role dispatch on the destination
# ---------------------------------------------------------------------------------------------



class _RawSender:
    """A raw-socket source that configures a Receiver running in a thread."""

    def __init__(self, limits: p.Limits) -> None:
        self.listener = listen(parse_url("tcp:127.0.0.1:0"))
        self.receiver = Receiver(self.listener, limits=limits)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-receiver")
        self.thread.start()
        addr = self.listener.address
        self.address = (addr.host, addr.port)
        self.sock = socket.create_connection(self.address, timeout=20)

    def _run(self) -> None:
        try:
            self.receiver.run(accept_timeout=20).close()
        except BaseException as exc:
            self.error = exc

    def request(self, request: p.Request, payload: bytes = b"") -> p.Response:
        self.sock.sendall(request.encode() + payload)
        return p.Response.decode(self.sock.recv(16))

    def close(self) -> None:
        self.sock.close()
        self.listener.abort()
        self.thread.join(20)
        self.listener.close()


@pytest.fixture
def raw_sender() -> Iterator[_RawSender]:
    sender = _RawSender(p.Limits(role_timeout_s=0.5))
    yield sender
    sender.close()


@requires_kvm
def test_role_dispatch(raw_sender: _RawSender, caplog: pytest.LogCaptureFixture) -> None:
    """A Fault connection is handed over; a bad role and a late role are dropped with one log line each."""
    caplog.set_level(logging.WARNING)
    assert raw_sender.request(p.Request.start()).is_ok
    payload = config_payload()
    assert raw_sender.request(p.Request.config(len(payload)), payload).is_ok

    fault = socket.create_connection(raw_sender.address, timeout=10)
    fault.sendall(p.ConnectionRole.FAULT.encode())
    handed = raw_sender.receiver.fault_connections.get(timeout=10)
    assert handed.name == "fault-0" and handed.side == "destination"

    bad = socket.create_connection(raw_sender.address, timeout=10)
    bad.sendall(struct.pack("<H", 7))
    assert bad.recv(16) == b""
    late = socket.create_connection(raw_sender.address, timeout=10)
    begin = time.monotonic()
    assert late.recv(16) == b""  # dropped after role_timeout_s, having said nothing
    assert time.monotonic() - begin < 5
    for sock in (fault, bad, late):
        sock.close()

    dropped = [r for r in caplog.records if "dropping additional connection" in r.getMessage()]
    assert len(dropped) == 2, [r.getMessage() for r in caplog.records]
    assert any("unknown connection role: 7" in r.getMessage() for r in dropped)
    assert any("silent for 0.5 s" in r.getMessage() for r in dropped), \
        [r.getMessage() for r in dropped]
    # Neither probe touched the migration: it carries on and can be abandoned cleanly.
    assert raw_sender.request(p.Request.abandon()).is_ok
    raw_sender.thread.join(20)
    assert raw_sender.error is not None and "abandoned" in str(raw_sender.error)
    assert raw_sender.receiver.threads.alive() == []


# ---------------------------------------------------------------------------------------------
# Owned threads
# ---------------------------------------------------------------------------------------------


def test_thread_group_stops_and_joins() -> None:
    group = ThreadGroup("test")
    stop = threading.Event()
    group.start("test-waiter", stop.wait, stopper=stop.set)
    assert group.alive() == ["test-waiter"]
    group.close(timeout=5)
    assert group.alive() == []
    with pytest.raises(RuntimeError, match="stopping"):
        group.start("too-late", lambda: None)


def test_a_thread_that_ignores_its_stop_is_reported_not_leaked(caplog: pytest.LogCaptureFixture) -> None:
    group = ThreadGroup("test")
    release = threading.Event()
    group.start("test-stubborn", release.wait)  # no stopper, and it does not look at group.stopping
    begin = time.monotonic()
    with pytest.raises(StuckThreadError, match="test-stubborn"):
        group.close(timeout=0.2)
    assert time.monotonic() - begin < 2
    assert "did not stop" in caplog.text
    assert group.alive() == ["test-stubborn"]  # still listed: nobody pretends it ended
    release.set()
    group.join(5)
    assert group.alive() == []


# ---------------------------------------------------------------------------------------------
# Module boundaries
# ---------------------------------------------------------------------------------------------

#: Encoding or decoding a Request, Response, role, range table or MemoryFd slot.
_WIRE_CODING = re.compile(
    r"(Request|Response|ConnectionRole|MemoryRange\w*|\btable|\brng|\bpage)\b[\w.()\[\], ]*\.(encode|decode)\("
    r"|(encode|decode)_memory_fd_slot|struct\.(pack|unpack)\(\s*[\"']<H6sQ"
)


def test_only_the_message_layer_encodes_messages() -> None:
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name in ("protocol.py", "channel.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _WIRE_CODING.search(line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_grep_would_catch_an_offender() -> None:
    assert _WIRE_CODING.search("conn.write_all(p.Request.start().encode())")
    assert _WIRE_CODING.search("response = p.Response.decode(data)")
    assert _WIRE_CODING.search("sock.sendall(p.ConnectionRole.FAULT.encode())")
    assert _WIRE_CODING.search("payload = table.encode()")
    assert not _WIRE_CODING.search('json.dumps(document).encode()')


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[-1] if node.level else node.module or "")
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_send_and_receive_do_not_import_the_vmm_or_the_api() -> None:
    for name in ("send.py", "receive.py", "destination.py", "channel.py"):
        imported = _imports(PACKAGE / name)
        assert not imported & {"vmm", "api", "chmig.vmm", "chmig.api"}, (name, imported)


def test_importing_the_protocol_imports_no_vm_code() -> None:
    code = "import sys, chmig.protocol; print(sorted(m for m in sys.modules if m.startswith('chmig')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert eval(result.stdout) == ["chmig", "chmig.errors", "chmig.jsonlimits", "chmig.protocol", "chmig.units"]


def test_no_constructor_starts_a_thread() -> None:
    """Threads are started by owners (start()/open()/run()), never in __init__."""
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "__init__":
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Attribute) and inner.attr == "start" and isinstance(
                            inner.value, (ast.Name, ast.Attribute)):
                        offenders.append(f"{path.name}:{inner.lineno}")
    assert not offenders, offenders


def test_pagefault_fuzz_smoke() -> None:
    """The PageFault server's fuzzer (fuzz/pagefault.py), a fixed-seed smoke: every case must hold."""
    from fuzz import pagefault

    lines: list[str] = []
    assert pagefault.run(200, seed=1, report=lines.append) == 0, "\n".join(lines)
