"""``chmig walkthrough`` and ``chmig trace show``: real migrations narrated, traced and drawn.

Each walkthrough runs as a real ``chmig`` process (its output a pipe, not a
terminal) with ``--mermaid`` and ``--trace``; the checks read what a learner
reads: the commands of the flow in order, the proof line, the diagram's
participants and arrows against the trace, and the trace told again by
``trace show`` into the same diagram.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chmig import docs
from chmig import protocol as p
from chmig.channel import RECEIVED, SENT, Message
from chmig.errors import UsageError
from chmig.trace import Narrator, Style, arrows, in_view, mermaid, read_trace, view_of

from .conftest import requires_kvm

#: What each flow must show: the main connection's commands in this order, and the other connections' commands.
FLOW_COMMANDS = {
    "precopy": ("Start, Config, State, Complete", "Memory (memory-0, memory-1)"),
    "local": ("Start, MemoryFd, Config, State, Complete", None),
    "postcopy": ("Start, Config, State, Complete", "PageFault (fault-"),
    "hybrid": ("Start, Config, Memory, Discard, State, Complete", "PageFault (fault-"),
    "offload-snapshot": ("Start, MemoryFd, Config, State, Complete", None),
    "offload-restore": ("Start, MemoryFd, Config, State, Complete", "PageFault (fault-0)"),
    "recovery": ("Start, Config, State, Complete", "PageFault (fault-"),
}
#: Connections each flow must use (as the source names them).
FLOW_CONNECTIONS = {
    "precopy": {"main", "memory-0", "memory-1"},
    "local": {"main"},
    "postcopy": {"main", "fault-0", "fault-1"},
    "hybrid": {"main", "fault-0", "fault-1"},
    "offload-snapshot": {"main"},
    "offload-restore": {"main", "fault-0"},
    # The link breaks once; the source's first attempt to reconnect gets in (the listener never went away).
    "recovery": {"main", "fault-0", "fault-1", "recovery-1-0", "recovery-1-1"},
}


def chmig(*args: str, stdin: str | None = None, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chmig", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TERM": "xterm-256color"})


def _participants(diagram: str) -> list[tuple[str, str]]:
    found = re.findall(r"^    participant \S+ as (source|destination) (\S+)$", diagram, re.M)
    return [(side, connection) for side, connection in found]


def _drawn_arrows(diagram: str) -> list[tuple[str, str, str, str, int]]:
    """(sender, receiver, connection, name, count) of each arrow line."""
    out = []
    for sender, line, receiver, label in re.findall(r"^    (\w+?)(-->>|->>)(\w+): (.*)$", diagram, re.M):
        match = re.match(r"(?:role )?(\w+)(?: ×(\d+))?", label)
        assert match, label
        sender_side, _, connection = sender.partition("_")
        receiver_side = receiver.partition("_")[0]
        out.append((sender_side, receiver_side, connection.replace("_", "-"), match[1], int(match[2] or 1)))
    return out


def _other(side: str) -> str:
    return "destination" if side == "source" else "source"


def check_diagram_against_trace(diagram: str, trace: list[Message]) -> None:
    """One participant line per side and connection; every message drawn, each arrow where its first message is."""
    told = in_view(trace)
    connections = {m.connection for m in told}
    participants = _participants(diagram)
    assert len(participants) == len(set(participants)), participants
    assert set(participants) == {(side, c) for side in ("source", "destination") for c in connections}
    consumed = [False] * len(told)
    main_steps = [i for i, m in enumerate(told) if m.connection == "main"]
    last_first = -1
    for sender, receiver, connection, name, count in _drawn_arrows(diagram):
        assert receiver != sender
        matching = [i for i, m in enumerate(told) if not consumed[i] and m.connection == connection
                    and m.name == name and (m.side if m.direction == SENT else _other(m.side)) == sender]
        assert len(matching) >= count, (sender, connection, name, count)
        first, last = matching[0], matching[count - 1]
        assert first > last_first, f"arrow {name} on {connection} is drawn out of the trace's order"
        last_first = first
        if connection != "main":  # a run of repeats never spans a step of the main connection
            assert not any(first < step < last for step in main_steps), f"{name} ×{count} on {connection}"
        for i in matching[:count]:
            consumed[i] = True
    assert all(consumed), [told[i].name for i, done in enumerate(consumed) if not done]


@requires_kvm
@pytest.mark.timeout(150)
@pytest.mark.parametrize("flow", list(FLOW_COMMANDS))
def test_walkthrough_runs_to_the_end_and_draws_what_happened(flow: str, tmp_path: Path) -> None:
    diagram_file, trace_file = tmp_path / "flow.mmd", tmp_path / "flow.jsonl"
    args = ["walkthrough", flow, "--memory", "32M", "--mermaid", str(diagram_file), "--trace", str(trace_file)]
    step = flow == "local"  # one flow also runs with --step, its Enters coming down a pipe
    run = chmig(*args, *(["--step"] if step else []), stdin="\n" * 20 if step else None)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    # chmig's warnings are told among the messages (a note), not printed on stderr between the lines; none
    # comes once the narration has ended (the handler would print those on stderr, in lower case).
    assert not re.search(r"(?i)\b(warning|error)\b", run.stderr), run.stderr[-3000:]
    if flow == "recovery":
        assert re.search(r"· warning on postcopy-faults: postcopy: .*waiting up to \d+ s for the source to reconnect",
                         out), out[-3000:]
    assert "\x1b" not in out, "escape codes on a non-terminal"
    assert "walkthrough: the guest continued with zero memory mismatches" in out
    main, others = FLOW_COMMANDS[flow]
    assert f"   commands on the main connection, in order: {main}" in out.splitlines()
    if others is None:
        assert "on the other connections" not in out
    else:
        assert f"   on the other connections: {others}" in out
    if step:
        assert out.count("[press Enter:") >= 4
    # Each message line: time, sender → receiver, connection, name, the header's bytes in their fields.
    header_lines = re.findall(r"^ +\+\d+\.\d{3}s source (→|←) destination  (\S+) +(\w+) +([0-9a-f]{2}(?: [0-9a-f]{2}|"
                              r" \|)*)$", out, re.M)
    assert header_lines and all(len(h[3].replace(" ", "").replace("|", "")) in (4, 32) for h in header_lines)
    assert "The receiver goes from Established to Started once it answers Ok." in out
    trace = read_trace(trace_file)
    assert {m.side for m in trace} == {"source", "destination"}  # the walkthrough's trace keeps both ends
    assert {m.connection for m in in_view(trace)} == FLOW_CONNECTIONS[flow]
    diagram = diagram_file.read_text()
    check_diagram_against_trace(diagram, trace)
    # The trace, told again, gives the same diagram.
    shown = chmig("trace", "show", str(trace_file), "--mermaid", str(tmp_path / "again.mmd"))
    assert shown.returncode == 0, shown.stderr
    assert (tmp_path / "again.mmd").read_text() == diagram
    assert "told as the source saw them" in shown.stdout and "\x1b" not in shown.stdout


def test_walkthrough_refuses_a_bad_memory_size_in_one_line() -> None:
    run = chmig("walkthrough", "precopy", "--memory", "lots")
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr


def test_the_committed_traces_draw_the_guide() -> None:
    """`make docs` draws every flow of docs/protocol.md from docs/traces/: the drawing in the file is current."""
    text = (Path(docs.__file__).parent.parent / "docs" / "protocol.md").read_text()
    for flow in docs.FLOW_EXCERPTS:
        trace = read_trace(docs.trace_path(flow))
        assert view_of(trace) == "source" and {m.side for m in trace} == {"source"}
        for block in (f"{flow}-diagram", f"{flow}-narration"):
            assert docs.render_block(block) in text, f"docs/protocol.md: {block} is stale: run `make docs`"
        check_diagram_against_trace(mermaid(trace), trace)
    assert docs.render(text) == text


def test_make_docs_leaves_the_guide_unchanged(tmp_path: Path) -> None:
    root = Path(docs.__file__).parent.parent
    copy = tmp_path / "protocol.md"
    copy.write_text((root / "docs" / "protocol.md").read_text())
    run = subprocess.run([sys.executable, "-m", "chmig.docs", str(copy)], capture_output=True, text=True,
                         cwd=root, timeout=60)
    assert run.returncode == 0 and "up to date" in run.stdout, run.stdout + run.stderr


# ---------------------------------------------------------------------------------------------
# The narrator and the diagram, without sockets
# ---------------------------------------------------------------------------------------------


def _message(t: float, side: str, connection: str, direction: str, kind: str, name: str, data: int = 0,
             summary: str = "") -> Message:
    if kind == "role":
        header = p.ConnectionRole[name.upper()].encode() if name in ("Fault",) else b"\x01\x00"
    elif kind == "request":
        header = p.Request(p.Command[re.sub(r"(?<!^)([A-Z])", r"_\1", name).upper()], 0).encode()
    else:
        header = (p.Response.ok() if name == "Ok" else p.Response.error()).encode()
    return Message(t, side, connection, direction, kind, name, 0, summary, header, data)


def _exchange(t: float, connection: str, name: str, answer: str = "Ok", data: int = 0) -> list[Message]:
    return [_message(t, "source", connection, SENT, "request", name, data),
            _message(t + 0.001, "source", connection, RECEIVED, "response", answer)]


def _precopy_messages(memory_requests: int) -> list[Message]:
    out = _exchange(0.0, "main", "Start") + _exchange(0.01, "main", "Config")
    out.append(_message(0.02, "source", "memory-0", SENT, "role", "PrecopyMemory"))
    for i in range(memory_requests):
        out += _exchange(0.03 + i * 0.01, "memory-0", "Memory", data=1 << 20)
    out += _exchange(1.0, "main", "State") + _exchange(1.1, "main", "Complete")
    return out


def test_narrator_follows_the_state_table_and_counts_repeats() -> None:
    lines: list[str] = []
    narrator = Narrator(lines.append)
    narrator.tell_all(_precopy_messages(10))
    text = "\n".join(lines)
    assert narrator.state is p.ReceiverState.COMPLETED
    for state, command in (("Established", "Start"), ("Started", "Config"), ("Configured", "State"),
                           ("StateReceived", "Complete")):
        target = p.next_receiver_state(p.ReceiverState(state), p.Command[command.upper()]).value
        assert f"The receiver goes from {state} to {target} once it answers Ok." in text
    assert text.count("memory-0   Memory") == 3  # the first few, then counted
    assert "… memory-0: 7 more Memory requests, 7 MiB; answered Ok ×7" in text
    assert [name for _, name in narrator.commands] == ["Start", "Config", *["Memory"] * 10, "State", "Complete"]
    assert narrator.command_summary() == ["commands on the main connection, in order: Start, Config, State, Complete",
                                          "on the other connections: Memory (memory-0)"]
    assert "\x1b" not in text


def test_narrator_tells_an_error_answer_and_the_abort() -> None:
    lines: list[str] = []
    messages = _exchange(0.0, "main", "Start") + _exchange(0.01, "main", "State", answer="Error")
    narrator = Narrator(lines.append)
    narrator.tell_all(messages)
    text = "\n".join(lines)
    assert "Not allowed: can't handle command State in receive state Started" in text and "State was refused: the migration is Aborted." in text
    assert narrator.state is p.ReceiverState.ABORTED


def test_diagram_counts_runs_and_keeps_phases_apart() -> None:
    messages = _precopy_messages(5)
    drawn = [(a.connection, a.name, a.count) for a in arrows(messages)]
    assert drawn == [("main", "Start", 1), ("main", "Ok", 1), ("main", "Config", 1), ("main", "Ok", 1),
                     ("memory-0", "PrecopyMemory", 1), ("memory-0", "Memory", 5), ("memory-0", "Ok", 5),
                     ("main", "State", 1), ("main", "Ok", 1), ("main", "Complete", 1), ("main", "Ok", 1)]
    diagram = mermaid(messages)
    assert "source_memory_0->>destination_memory_0: Memory ×5 (5 MiB)" in diagram
    check_diagram_against_trace(diagram, messages)


def test_a_trace_told_from_both_ends_is_the_source_s_story() -> None:
    source = _precopy_messages(2)
    mirrored = [Message(m.time + 0.0005, "destination", m.connection.replace("memory-0", "memory-7"),
                        RECEIVED if m.direction == SENT else SENT, m.kind, m.name, m.length, m.summary, m.header,
                        m.data) for m in source]
    assert mermaid(source + mirrored) == mermaid(source)
    assert view_of(mirrored) == "destination" and "memory-7" in mermaid(mirrored)


def test_style_is_plain_off_a_terminal(tmp_path: Path) -> None:
    with open(tmp_path / "out", "w") as file:
        assert not Style.for_stream(file).enabled
    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            assert Style.for_stream(tty).enabled == (not os.environ.get("NO_COLOR")
                                                      and os.environ.get("TERM") != "dumb")
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("line, word", [
    ("not json", "not JSON"),
    ('{"time": 1, "side": "middle"}', "side must be"),
    ('{"time": 1, "side": "source", "connection": "main", "direction": "sent", "kind": "request", "name": "Start",'
     ' "length": 0, "summary": "", "header": "0100"}', None),
    ('{"time": 1, "side": "source", "connection": "main", "direction": "sent", "kind": "request", "name": "Start",'
     ' "length": 0, "summary": "", "header": "01zz"}', "not hexadecimal"),
    ('{"time": 1, "side": "source", "connection": "main", "direction": "sent", "kind": "request", "name": "Start",'
     ' "length": -1, "summary": "", "header": "0100"}', "0..2**64-1"),
    ('[1, 2]', "not a JSON object"),
    ("x" * 70000, "longer than"),
])
def test_a_bad_trace_line_is_one_clear_error(tmp_path: Path, line: str, word: str | None) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    if word is None:
        assert len(read_trace(path)) == 1
        return
    with pytest.raises(UsageError) as caught:
        read_trace(path)
    assert word in str(caught.value) and f"{path}:1" in str(caught.value)


def test_trace_show_refuses_a_missing_or_empty_file_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    for name in ("missing.jsonl", "empty.jsonl"):
        run = chmig("trace", "show", str(tmp_path / name))
        assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr


def test_a_counted_request_answered_after_a_new_phase_is_no_error() -> None:
    """A PageFault counted before Complete and answered after it (the count was told at the new phase)."""
    messages = _exchange(0.0, "main", "Start") + _exchange(0.01, "main", "Config") + _exchange(0.02, "main", "State")
    for i in range(4):
        messages.append(_message(0.03 + i * 0.01, "source", "fault-0", RECEIVED, "request", "PageFault", 4096))
        messages.append(_message(0.035 + i * 0.01, "source", "fault-0", SENT, "response", "Ok", 4096))
    messages.append(_message(0.1, "source", "fault-0", RECEIVED, "request", "PageFault", 4096))
    messages += _exchange(0.11, "main", "Complete")
    messages.append(_message(0.2, "source", "fault-0", SENT, "response", "Ok", 4096))
    lines: list[str] = []
    Narrator(lines.append).tell_all(messages)
    assert "         … fault-0: 2 more PageFault requests, 8 KiB; answered Ok ×1" in lines
    drawn = [(a.connection, a.name, a.count) for a in arrows(messages)]
    # The fault run ends at Complete: its last answer is drawn after it.
    assert drawn[-3:] == [("main", "Complete", 1), ("main", "Ok", 1), ("fault-0", "Ok", 1)], drawn


def test_hostile_trace_text_reaches_neither_the_terminal_nor_the_diagram(tmp_path: Path) -> None:
    record = ('{"time": 1, "side": "source", "connection": "main", "direction": "sent", "kind": "request", '
              '"name": "Start;#x", "length": 0, "summary": "\\u001b[2J boom", "header": "01000000000000000000000000000000"}')
    path = tmp_path / "t.jsonl"
    path.write_text(record + "\n")
    shown = chmig("trace", "show", str(path), "--mermaid", str(tmp_path / "t.mmd"))
    assert shown.returncode == 0 and "\x1b" not in shown.stdout and "\\x1b[2J boom" in shown.stdout
    assert "Start#59;#35;x" in (tmp_path / "t.mmd").read_text()
    for bad in ('"connection": "a b;c"', '"time": 1' + "0" * 400, '"data": 1' + "0" * 30):
        path.write_text(record.replace('"connection": "main"', bad if "connection" in bad else '"connection": "main"')
                        .replace('"time": 1', bad if "time" in bad else '"time": 1')
                        .replace('"length": 0', '"length": 0, ' + bad if "data" in bad else '"length": 0') + "\n")
        run = chmig("trace", "show", str(path))
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
