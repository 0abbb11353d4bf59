"""Traces: every message of a migration as it passed, written down, read back, narrated and drawn.

A trace is what the message layer's observers see (:class:`chmig.channel.Message`),
nothing re-implemented on the side:

* :class:`TraceWriter` is an observer that writes one JSON object per message
  to a file as the messages pass (``--trace FILE`` on ``send-migration``,
  ``receive``, ``receive-migration``, the offload daemon and the walkthrough);
* :func:`read_trace` reads such files back (``chmig trace show FILE...``);
* :class:`Narrator` tells each message in words — time, who sends it to whom
  on which connection, the 16 header bytes split into their fields, the
  payload, what the step is for (:data:`chmig.protocol.COMMAND_PURPOSE`) and
  what the receiver's state becomes (:data:`chmig.protocol.RECEIVER_TRANSITIONS`);
  the walkthrough runs it live, ``trace show`` over a file;
* :func:`mermaid` draws a Mermaid sequence diagram of what happened.

**One view of each message.**  Both ends report every message, one as sent
and the other as received, and they may name a connection differently (the
source's ``memory-0`` is whichever the destination accepted first).  So a
trace is told from one side, the source's when it is there (:func:`view_of`):
a one-sided trace (``receive --trace``) is told from the side it has, and a
trace of both ends (the walkthrough's) exactly as the source's own trace.

**Repeats.**  A migration sends Memory and PageFault requests by the dozen
or the thousand.  The narrator shows the first few of each kind on each
connection in each phase and then counts them; the diagram draws a run of
equal exchanges on one connection as one arrow with a count, until the main
connection moves on.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterable

from . import protocol as p
from .channel import RECEIVED, SENT, Message
from .errors import ProtocolError, UsageError
from .units import GiB, KiB, MiB

log = logging.getLogger(__name__)

#: A trace line longer than this is not one chmig wrote (a message's summary is a few dozen characters).
MAX_LINE_BYTES = 64 * KiB
#: Exchanges of one kind shown per connection and phase before the narrator only counts them.
SHOWN_REPEATS = 3
#: The requests that come by the dozen (or the thousand): past the first few, the narrator counts them.
REPEATING = frozenset({"Memory", "PageFault"})
#: Width of the narration's explaining lines.
TEXT_WIDTH = 100

_SIDES = (p.Side.SOURCE.value, p.Side.DESTINATION.value)
#: A connection's name as chmig gives it (``main``, ``memory-3``, ``fault-0``, ``unannounced``): no characters a
#: Mermaid participant or a terminal would take for something else.
_CONNECTION_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
#: Characters never printed as they are: a peer's Config bytes or a trace file's text must not drive the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_KINDS = ("request", "response", "role")


# ---------------------------------------------------------------------------------------------
# Writing and reading trace files
# ---------------------------------------------------------------------------------------------


class TraceWriter:
    """An observer that appends one JSON line per message to a file, as the messages pass.

    Each line is written (and flushed) before the message goes on the wire, or
    once it was read, so a trace of a migration that failed ends with the
    message it failed on.  A write that fails (a full disk) stops the trace,
    logged once, never the migration.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write the trace file {self.path}: {exc.strerror}", where="--trace") from None
        self._file: IO[str] | None = os.fdopen(fd, "w", encoding="utf-8", buffering=1)
        self._lock = threading.Lock()
        self.messages = 0

    def __call__(self, message: Message) -> None:
        line = json.dumps(message.to_json(), ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(line)
                self.messages += 1
            except OSError as exc:
                log.error("trace %s: %s; no more messages are written to it", self.path, exc.strerror or exc)
                self._close_file()

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:
                log.error("trace %s: %s", self.path, exc.strerror or exc)

    def close(self) -> None:
        with self._lock:
            self._close_file()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _field(record: dict, name: str, kind: type | tuple[type, ...], where: str) -> object:
    value = record.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UsageError(f"field {name!r} is missing or not a {getattr(kind, '__name__', 'number')}", where=where)
    return value


def message_from_json(record: object, where: str = "trace") -> Message:
    """One trace line's object as a :class:`Message`; anything chmig would not have written is refused."""
    if not isinstance(record, dict):
        raise UsageError("not a JSON object", where=where)
    side = _field(record, "side", str, where)
    if side not in _SIDES:
        raise UsageError(f"side must be source or destination, not {side!r}", where=where)
    direction = _field(record, "direction", str, where)
    if direction not in (SENT, RECEIVED):
        raise UsageError(f"direction must be sent or received, not {direction!r}", where=where)
    kind = _field(record, "kind", str, where)
    if kind not in _KINDS:
        raise UsageError(f"kind must be one of {', '.join(_KINDS)}, not {kind!r}", where=where)
    header_hex = _field(record, "header", str, where)
    try:
        header = bytes.fromhex(str(header_hex))
    except ValueError:
        raise UsageError("header is not hexadecimal", where=where) from None
    if len(header) not in (p.ROLE_SIZE, p.HEADER_SIZE):
        raise UsageError(f"header must be {p.HEADER_SIZE} bytes ({p.ROLE_SIZE} for a role), not {len(header)}",
                         where=where)
    data = record.get("data", 0)
    if not isinstance(data, int) or isinstance(data, bool) or not 0 <= data < 1 << 64:
        raise UsageError("field 'data' must be an integer in 0..2**64-1", where=where)
    length = _field(record, "length", int, where)
    if not 0 <= int(length) < 1 << 64:  # type: ignore[call-overload]
        raise UsageError("field 'length' must be an integer in 0..2**64-1", where=where)
    raw_time = _field(record, "time", (int, float), where)
    try:
        when = float(raw_time)  # type: ignore[arg-type]
    except OverflowError:
        when = math.inf
    if not math.isfinite(when):
        raise UsageError("field 'time' must be a finite number of seconds", where=where)
    connection = str(_field(record, "connection", str, where))
    if not _CONNECTION_NAME.fullmatch(connection):
        raise UsageError(f"connection {connection[:80]!r} is not a connection name (main, memory-N, fault-N)",
                         where=where)
    name = str(_field(record, "name", str, where))
    if len(name) > 80:
        raise UsageError("field 'name' is longer than 80 characters", where=where)
    return Message(time=when, side=str(side), connection=connection, direction=str(direction), kind=str(kind),
                   name=name, length=int(length),  # type: ignore[call-overload]
                   summary=str(_field(record, "summary", str, where)), header=header, data=data)


def read_trace(path: str | os.PathLike[str]) -> list[Message]:
    """Every message of a trace file, in its order; a bad line is a one-line error naming it."""
    messages: list[Message] = []
    try:
        with open(path, "rb") as file:
            for number, raw in enumerate(iter(lambda: file.readline(MAX_LINE_BYTES + 1), b""), start=1):
                where = f"{path}:{number}"
                if len(raw) > MAX_LINE_BYTES:
                    raise UsageError(f"line longer than {MAX_LINE_BYTES} bytes: not a chmig trace", where=where)
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except (ValueError, RecursionError) as exc:
                    raise UsageError(f"not JSON ({exc})", where=where) from None
                messages.append(message_from_json(record, where))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}", where="trace") from None
    return messages


# ---------------------------------------------------------------------------------------------
# One view of each message
# ---------------------------------------------------------------------------------------------


def view_of(messages: Iterable[Message]) -> str | None:
    """The side a trace is told from: the source's when it is there (None: no messages)."""
    sides = {m.side for m in messages}
    if p.Side.SOURCE.value in sides:
        return p.Side.SOURCE.value
    return p.Side.DESTINATION.value if sides else None


def in_view(messages: Iterable[Message]) -> list[Message]:
    """The messages as one side saw them (:func:`view_of`), in time order (stable: a file's order breaks ties)."""
    listed = list(messages)
    side = view_of(listed)
    return sorted((m for m in listed if m.side == side), key=lambda m: m.time)


def other_side(side: str) -> str:
    return p.Side.DESTINATION.value if side == p.Side.SOURCE.value else p.Side.SOURCE.value


def sender_of(message: Message) -> str:
    """Which end sent it (a message the destination received was sent by the source)."""
    return message.side if message.direction == SENT else other_side(message.side)


def size_text(count: int) -> str:
    """A byte count the way a person reads it: 4 KiB, 1.5 MiB, 2 GiB."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if count >= unit:
            value = count / unit
            return f"{value:.0f} {name}" if value == int(value) else f"{value:.1f} {name}"
    return f"{count} bytes"


def header_fields(header: bytes) -> str:
    """The header bytes split into their fields: ``u16 | 6 bytes | u64`` (a role: its 2 bytes)."""
    if len(header) != p.HEADER_SIZE:
        return header.hex(" ")
    return f"{header[:2].hex(' ')} | {header[2:8].hex(' ')} | {header[8:].hex(' ')}"


# ---------------------------------------------------------------------------------------------
# The diagram
# ---------------------------------------------------------------------------------------------


@dataclass
class Arrow:
    """One arrow of the sequence diagram: a message, or a run of equal ones on one connection."""

    sender: str
    connection: str
    kind: str
    name: str
    count: int = 1
    data: int = 0

    @property
    def receiver(self) -> str:
        return other_side(self.sender)

    def label(self) -> str:
        """The arrow's text; ``#`` and ``;`` as Mermaid's entity codes (they would end or cut the line)."""
        text = f"role {self.name}" if self.kind == "role" else self.name
        text = re.sub(r"[#;]", lambda match: f"#{ord(match.group())};", text)
        if self.count > 1:
            text += f" ×{self.count}"
        if self.data:
            text += f" ({size_text(self.data)})"
        return text


@dataclass
class _Run:
    """The exchanges of one kind repeating on one connection: its request arrow and (once seen) its answer's."""

    request: Arrow
    response: Arrow | None = None
    answered: bool = False


def arrows(messages: Iterable[Message]) -> list[Arrow]:
    """The diagram's arrows, in the order of the trace (its :func:`in_view`).

    An exchange (request and answer) equal to the one before it on the same
    connection joins that one's arrows, which count it; every message of the
    main connection ends the other connections' runs (so no run is drawn
    across a step of the main connection: the phases stay apart), and an
    answer that differs (an Error among Oks) gets its own arrow.
    """
    result: list[Arrow] = []
    runs: dict[str, _Run] = {}
    for message in in_view(messages):
        sender, connection = sender_of(message), message.connection
        if connection == p.MAIN_CONNECTION:  # every step of the main connection ends the other runs
            runs = {name: run for name, run in runs.items() if name == p.MAIN_CONNECTION}
        run = runs.get(connection)
        if message.kind == "request":
            if run is not None and run.answered and run.request.name == message.name and run.request.sender == sender:
                run.request.count += 1
                run.request.data += message.data
                run.answered = False
                continue
            arrow = Arrow(sender, connection, "request", message.name, data=message.data)
            result.append(arrow)
            runs[connection] = _Run(arrow)
        elif message.kind == "response":
            if run is not None and not run.answered:
                run.answered = True
                if run.response is None:
                    run.response = Arrow(sender, connection, "response", message.name, data=message.data)
                    result.append(run.response)
                    continue
                if run.response.name == message.name:
                    run.response.count += 1
                    run.response.data += message.data
                    continue
            result.append(Arrow(sender, connection, "response", message.name, data=message.data))
            runs.pop(connection, None)
        else:
            result.append(Arrow(sender, connection, "role", message.name))
            runs.pop(connection, None)
    return result


def _participant(side: str, connection: str) -> str:
    return f"{side}_{connection}".replace("-", "_")


def mermaid(messages: Iterable[Message], comment: str | None = None) -> str:
    """A Mermaid ``sequenceDiagram`` of the trace: a participant per side and connection, an arrow per run.

    The source's connections stand left in the order they first carried a
    message, the destination's mirror them on the right, so each connection's
    arrows span the middle and the main connection's the whole width.
    """
    drawn = arrows(messages)
    connections: list[str] = []
    for arrow in drawn:
        if arrow.connection not in connections:
            connections.append(arrow.connection)
    lines = ["sequenceDiagram"]
    if comment:
        lines.extend(f"    %% {line}" for line in comment.splitlines())
    for connection in connections:
        lines.append(f"    participant {_participant('source', connection)} as source {connection}")
    for connection in reversed(connections):
        lines.append(f"    participant {_participant('destination', connection)} as destination {connection}")
    for arrow in drawn:
        line = "-->>" if arrow.kind == "response" else "->>"
        lines.append(f"    {_participant(arrow.sender, arrow.connection)}{line}"
                     f"{_participant(arrow.receiver, arrow.connection)}: {arrow.label()}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The narration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """A stretch of a migration the narration gives a heading (and ``--step`` a pause)."""

    title: str
    explains: str


#: The phases, by the message that opens them (narration only: what is allowed is protocol.py's business).
PHASES: dict[str, Phase] = {
    "Start": Phase("Handshake", "the source opens the main connection and says which protocol version it speaks"),
    "MemoryFd": Phase("Memory by file descriptor",
                      "each RAM slot's memfd crosses the UNIX socket: both ends will map the same pages"),
    "Config": Phase("Configuration", "the receiver builds an empty VM of the same shape (an offload daemon keeps "
                                     "the configuration to write it out)"),
    "PrecopyMemory": Phase("Memory connections",
                           "more connections announce themselves and carry the memory, the main one only control"),
    "Memory": Phase("Memory", "guest RAM crosses while the VM keeps running on the source (precopy): everything "
                              "once, then what the guest dirtied meanwhile, then the rest while it is paused"),
    "Fault": Phase("Fault connections", "the source opens them; the destination will ask for pages on them"),
    "State": Phase("State", "the VM's vCPUs' and devices' state crosses (a VMM paused the VM for it; an offload "
                            "daemon sends what it read from the snapshot)"),
    "Complete": Phase("Hand-over", "Complete: from its Ok on, the VM belongs to the receiver"),
    "CompletePaused": Phase("Hand-over", "CompletePaused: from its Ok on, the (paused) VM belongs to the "
                                         "receiver"),
    "Discard": Phase("The switch to postcopy", "the VM is paused on the source, and the pages it wrote since they "
                                               "were sent are dropped on the destination: they will come by "
                                               "PageFault, the rest is there already"),
    "PageFault": Phase("Pages on demand", "the destination asks for the pages it lacks: first touches of the "
                                          "running guest, and a background pull of the rest"),
    "Abandon": Phase("Abandon", "the source gives the migration up"),
}


class Style:
    """Emphasis for a terminal; nothing at all (plain lines) for a pipe or a file, or with NO_COLOR."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream: IO[str]) -> Style:
        try:
            tty = stream.isatty()
        except (AttributeError, ValueError):
            tty = False
        return cls(tty and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb")

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled else text

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def dim(self, text: str) -> str:
        return self._wrap("2", text)


PLAIN = Style(False)


@dataclass
class _Repeats:
    """Exchanges of one kind on one connection that were counted, not shown."""

    count: int = 0
    data: int = 0
    answers: dict[str, int] = field(default_factory=dict)


class Narrator:
    """Tells a migration message by message, as an observer (live) or over a trace (``trace show``).

    ``view`` is the side whose reports are told (:func:`view_of`); the other
    side's reports of the same messages are ignored.  ``on_phase`` is called
    with each new phase before its first message is told (the walkthrough's
    ``--step`` waits there: the message waits with it).  Thread-safe: every
    connection's thread reports here.
    """

    def __init__(self, emit: Callable[[str], None], *, view: str = p.Side.SOURCE.value, style: Style = PLAIN,
                 shown_repeats: int = SHOWN_REPEATS, on_phase: Callable[[Phase], None] | None = None,
                 origin: float | None = None) -> None:
        self._emit = emit
        self.view = view
        self.style = style
        self.shown_repeats = shown_repeats
        self.on_phase = on_phase
        self.origin = origin
        self._lock = threading.RLock()
        self.state = p.ReceiverState.ESTABLISHED
        #: The protocol version the migration's Start named (it decides which commands exist).
        self.version = p.PROTOCOL_VERSION
        self._pending_state: p.ReceiverState | None = None
        self._phases_seen: set[str] = set()
        self.phases: list[Phase] = []
        #: Per connection: requests of each kind shown in this phase.
        self._shown: dict[tuple[str, str], int] = {}
        #: Per connection: the request whose answer is awaited, and whether it was counted instead of shown.
        self._open: dict[str, tuple[str, bool]] = {}
        self._repeats: dict[tuple[str, str], _Repeats] = {}
        #: ``(connection, command)`` of every request told or counted, in order.
        self.commands: list[tuple[str, str]] = []
        #: What was explained once already (a command's purpose, an Ok's meaning, a role): not told again.
        self._explained: set[str] = set()
        #: Fault connections seen: after Complete, pages still come over them.
        self._fault_connections = False
        #: Set once the story is over: notes that still come (the ends shutting down) are not told.
        self.closed = False

    # -- output ------------------------------------------------------------------------------------

    def say(self, text: str = "") -> None:
        with self._lock:
            self._emit(text)

    def note(self, text: str) -> bool:
        """A line from outside the wire (an event of a VMM, a step of the walkthrough), among the messages;
        False (nothing told) once the narration is closed."""
        with self._lock:
            if self.closed:
                return False
            self._emit(self.style.dim(f"         · {text}"))
            return True

    def close(self) -> None:
        """No more notes (the narration's end was told); a note from now on is refused."""
        with self._lock:
            self.closed = True

    def _explain_once(self, key: str, text: str) -> None:
        if key not in self._explained:
            self._explained.add(key)
            self._explain(text)

    def _explain(self, text: str) -> None:
        text = _printable(text)
        for line in textwrap.wrap(text, TEXT_WIDTH - 9, break_long_words=False, break_on_hyphens=False):
            self._emit(f"         {line}")

    # -- the observer --------------------------------------------------------------------------------

    def __call__(self, message: Message) -> None:
        if message.side != self.view:
            return
        with self._lock:
            self._tell(message)

    def tell_all(self, messages: Iterable[Message]) -> None:
        """Narrate a whole trace (the view is the trace's own, :func:`view_of`)."""
        ordered = list(messages)
        self.view = view_of(ordered) or self.view
        for message in in_view(ordered):
            self(message)
        self.finish()

    def command_summary(self) -> list[str]:
        """The commands of the migration: the main connection's in order (a run of one counted), then the
        other connections' commands, each with the connections it came on."""
        main: list[list] = []  # [name, count] of each run of one command
        others: dict[str, list[str]] = {}
        for connection, name in self.commands:
            if connection != p.MAIN_CONNECTION:
                if connection not in others.setdefault(name, []):
                    others[name].append(connection)
            elif main and main[-1][0] == name:
                main[-1][1] += 1
            else:
                main.append([name, 1])
        told = ", ".join(name if count == 1 else f"{name} ×{count}" for name, count in main)
        lines = [f"commands on the main connection, in order: {told}"]
        if others:
            lines.append("on the other connections: " + "; ".join(f"{name} ({', '.join(connections)})"
                                                                 for name, connections in others.items()))
        return lines

    def finish(self) -> None:
        """Count what was only counted (call once the migration is over)."""
        with self._lock:
            self._flush_repeats()

    def _tell(self, message: Message) -> None:
        if self.origin is None:
            self.origin = message.time
        sender = sender_of(message)
        phase = PHASES.get(message.name) if message.kind != "response" else None
        if phase is not None and phase.title not in self._phases_seen:
            self._begin_phase(phase)
        connection = message.connection
        if message.kind == "request":
            self.commands.append((connection, message.name))
            key = (connection, message.name)
            shown = self._shown.get(key, 0)
            counted = shown >= self.shown_repeats and message.name in REPEATING
            self._open[connection] = (message.name, counted)
            purpose, transition = self._advance(message)
            if counted:
                repeats = self._repeats.setdefault(key, _Repeats())
                repeats.count += 1
                repeats.data += message.data
                return
            self._shown[key] = shown + 1
            self._line(message, sender)
            self._explain_once(f"request {message.name}", purpose)
            if transition:
                self._explain(transition)
            if shown + 1 == self.shown_repeats and message.name in REPEATING:
                self._explain(f"(more {message.name} requests on {connection} are counted, not shown)")
            return
        if message.kind == "response":
            command, counted = self._open.pop(connection, ("", False))
            if counted and message.name == "Ok":
                repeats = self._repeats.get((connection, command))
                if repeats is not None:  # (None: its request was counted before a new phase told the count)
                    repeats.answers[message.name] = repeats.answers.get(message.name, 0) + 1
                return
            self._line(message, sender)
            self._explain_response(message, command)
            return
        self._line(message, sender)
        self._explain_role(message)

    def _begin_phase(self, phase: Phase) -> None:
        self._flush_repeats()
        self._shown.clear()
        self._phases_seen.add(phase.title)
        self.phases.append(phase)
        self._emit("")
        self._emit(self.style.bold(f"== {phase.title}: {phase.explains}"))
        if self.on_phase is not None:
            self.on_phase(phase)

    def _flush_repeats(self) -> None:
        for (connection, command), repeats in self._repeats.items():
            answers = ", ".join(f"{name} ×{count}" for name, count in repeats.answers.items()) or "not answered"
            data = f", {size_text(repeats.data)}" if repeats.data else ""
            self._emit(f"         … {connection}: {repeats.count} more {command} requests{data}; answered {answers}")
        self._repeats.clear()

    def _line(self, message: Message, sender: str) -> None:
        elapsed = message.time - (self.origin if self.origin is not None else message.time)
        arrow = "source → destination" if sender == p.Side.SOURCE.value else "source ← destination"
        name = _printable(message.name)
        self._emit(f"{elapsed:+8.3f}s {arrow}  {message.connection:<10} {self.style.bold(f'{name:<14}')} "
                   f"{self.style.dim(header_fields(message.header))}")
        if message.summary:
            self._explain(message.summary)

    def _advance(self, message: Message) -> tuple[str, str]:
        """What a request is for, and (on the main connection) where its Ok leads the receiver, by the table."""
        try:
            command = p.Command[_constant(message.name)]
        except KeyError:
            return "Not a command of the protocol: the receiver refuses it.", ""
        purpose = f"{message.name}: {p.COMMAND_PURPOSE[command]}."
        if message.connection != p.MAIN_CONNECTION:
            return purpose, ""
        if command is p.Command.START and len(message.header) == p.HEADER_SIZE:
            self.version = int.from_bytes(message.header[2:4], "little")
        try:
            target = p.next_receiver_state(self.state, command, self.version)
        except ProtocolError as exc:  # the table does not allow it here
            self._pending_state = p.ReceiverState.ABORTED
            return purpose, f"Not allowed: {exc.message}; the receiver answers Error and aborts."
        self._pending_state = target
        if target is self.state:
            return purpose, f"The receiver stays {target.value}."
        return purpose, f"The receiver goes from {self.state.value} to {target.value} once it answers Ok."

    def _explain_response(self, message: Message, command_name: str) -> None:
        if message.name != "Ok":
            if message.connection == p.MAIN_CONNECTION:
                self.state = p.ReceiverState.ABORTED
                self._explain(f"{command_name or 'the request'} was refused: the migration is Aborted.")
            else:
                self._explain(f"{command_name or 'the request'} was refused; this connection ends.")
            return
        if message.connection == p.MAIN_CONNECTION:
            if self._pending_state is not None:
                self.state, self._pending_state = self._pending_state, None
            if self.state is p.ReceiverState.COMPLETED and self._fault_connections:
                self._explain(f"Ok: the receiver is {self.state.value}: the VM runs there now, and asks for the "
                              "pages it still lacks on the Fault connections until it has them all.")
            elif self.state in p.FINAL_STATES:
                self._explain(f"Ok: the receiver is {self.state.value}; the migration is over.")
            else:
                accepted = _either([c.wire_name for c in p.accepted_next(self.state, self.version)])
                self._explain(f"Ok: the receiver is {self.state.value} now and accepts {accepted} next "
                              "(or Abandon).")
            return
        try:
            command = p.Command[_constant(command_name)]
        except KeyError:
            return
        if command is p.Command.PAGE_FAULT and not message.data:
            self._explain_once("ok PageFault in place", f"Ok, {p.OK_PAGE_IN_SHARED_MEMORY}.")
        elif command in p.OK_MEANS:
            self._explain_once(f"ok {command.wire_name}", f"Ok: {p.OK_MEANS[command]}.")

    def _explain_role(self, message: Message) -> None:
        if message.name == p.ConnectionRole.FAULT.wire_name:
            self._fault_connections = True
        try:
            role = p.ConnectionRole[_constant(message.name)]
            rule = p.CONNECTION_RULES[role]
        except KeyError:
            self._explain("not a role of the protocol: the receiver drops this connection")
            return
        allowed = ", ".join(sorted(c.wire_name for c in rule.commands))
        if f"role {rule.role.wire_name}" in self._explained:
            self._explain(f"Another {rule.role.wire_name} connection.")
            return
        self._explain_once(f"role {rule.role.wire_name}", f"A new connection announces its role, {rule.role.wire_name} ({rule.role.value}): "
                      f"{rule.purpose}. It may carry only {allowed}, sent by the {rule.requester.value}.")


def _printable(text: str) -> str:
    """``text`` with control characters shown as ``\\xNN``, never sent to the terminal as they are."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def _either(names: list[str]) -> str:
    """``A``, ``A or B``, ``A, B or C``."""
    return " or ".join(names) if len(names) < 3 else f"{', '.join(names[:-1])} or {names[-1]}"


def _constant(wire_name: str) -> str:
    """``CompletePaused`` → ``COMPLETE_PAUSED``: the enum member of a wire name."""
    out = []
    for index, char in enumerate(wire_name):
        if char.isupper() and index:
            out.append("_")
        out.append(char.upper())
    return "".join(out)


# ---------------------------------------------------------------------------------------------
# chmig trace show
# ---------------------------------------------------------------------------------------------


def add_arguments(trace: argparse.ArgumentParser) -> None:
    actions = trace.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="narrate a trace file (or several: both ends of one migration) and "
                                           "draw it")
    show.add_argument("files", nargs="+", metavar="FILE", help="a trace written by --trace")
    show.add_argument("--mermaid", metavar="OUT", help="also write a Mermaid sequence diagram to OUT")


def main_trace(args: argparse.Namespace) -> int:
    """``chmig trace show FILE... [--mermaid OUT]``."""
    messages: list[Message] = []
    for name in args.files:
        messages.extend(read_trace(name))
    if not messages:
        raise UsageError("the trace holds no messages", where=", ".join(args.files))
    narrator = Narrator(lambda line: print(line), style=Style.for_stream(sys.stdout))
    view = view_of(messages)
    told = sum(1 for m in messages if m.side == view)
    print(f"{len(messages)} messages in {len(args.files)} file(s), told as the {view} saw them ({told} of them)")
    narrator.tell_all(messages)
    if args.mermaid:
        write_mermaid(args.mermaid, messages)
        print(f"\nMermaid sequence diagram: {args.mermaid}")
    return 0


def write_mermaid(path: str | os.PathLike[str], messages: Iterable[Message], comment: str | None = None) -> None:
    try:
        Path(path).write_text(mermaid(messages, comment))
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}", where="--mermaid") from None
