"""Logging as ``cloud-hypervisor`` configures it: ``--log-format`` with its tokens, ``-v`` levels, ``--log-file``.

Cloud Hypervisor's logger (``cloud-hypervisor/src/logger.rs``) renders a
format string of ``{token}`` pieces; :class:`LogFormat` renders the same tokens
from a :class:`logging.LogRecord`.  Without ``--log-format`` chmig keeps its own
layout (:data:`CHMIG_LOG_FORMAT`), which its tests and tools read.
"""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timezone
from functools import cached_property

from .errors import UsageError


#: Cloud Hypervisor's default ``--log-format`` (with its program name); chmig's own default is its
#: traditional layout (:data:`CHMIG_LOG_FORMAT`), which the tests and tools that read chmig's logs expect.
CH_DEFAULT_LOG_FORMAT = "chmig: {boottime}s: <{thread}> {level}:{location} -- {msg}"
CHMIG_LOG_FORMAT = "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"

_TIME_FIELDS = ("year", "month", "day", "hour", "minute", "second", "micros", "offset")
#: Every token Cloud Hypervisor knows, in its order; each time field also comes as ``local<field>``.
LOG_FORMAT_TOKENS: tuple[str, ...] = (
    "boottime", "wallclock", "glog", "localglog", "pid", "tid", "thread", "level", "levelchar", "location",
    "msg", *_TIME_FIELDS, *(f"local{name}" for name in _TIME_FIELDS),
)
#: Cloud Hypervisor prints the ``log`` crate's level names; Python's differ only here.
_CH_LEVEL_NAMES = {"WARNING": "WARN"}
#: ``{location}`` is a path relative to the directory holding the chmig package, as Cloud Hypervisor's
#: are relative to its workspace (``chmig/send.py:123``).
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_log_format(text: str) -> list[tuple[bool, str]]:
    """Cloud Hypervisor's ``parse_format``: ``(is_token, text)`` pieces; ``{{`` and ``}}`` are literal braces.

    Raises :class:`UsageError` for an unterminated ``{``, a lone ``}``, or an
    unknown token (naming the known ones).
    """
    pieces: list[tuple[bool, str]] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "{":
            if text.startswith("{{", i):
                literal.append("{")
                i += 2
                continue
            end = text.find("}", i + 1)
            if end < 0:
                raise UsageError(f"unterminated '{{' in format string {text!r}", where="--log-format")
            name = text[i + 1:end]
            if name not in LOG_FORMAT_TOKENS:
                raise UsageError(f"unknown format token '{{{name}}}'; known tokens: "
                                 + ", ".join(f"{{{token}}}" for token in LOG_FORMAT_TOKENS), where="--log-format")
            if literal:
                pieces.append((False, "".join(literal)))
                literal = []
            pieces.append((True, name))
            i = end + 1
        elif char == "}":
            if not text.startswith("}}", i):
                raise UsageError(f"unmatched '}}' in format string {text!r}", where="--log-format")
            literal.append("}")
            i += 2
        else:
            literal.append(char)
            i += 1
    if literal:
        pieces.append((False, "".join(literal)))
    return pieces


class _Moment:
    """A record's time in UTC and in local time, each computed once (so ``{hour}:{minute}`` agree)."""

    def __init__(self, created: float) -> None:
        self.created = created

    @cached_property
    def utc(self) -> datetime:
        return datetime.fromtimestamp(self.created, timezone.utc)

    @cached_property
    def local(self) -> datetime:
        return datetime.fromtimestamp(self.created).astimezone()


def _time_field(name: str, when: datetime) -> str:
    if name == "offset":  # %:z only exists from Python 3.12
        offset = when.utcoffset()
        minutes = int(offset.total_seconds() // 60) if offset is not None else 0
        sign = "-" if minutes < 0 else "+"
        return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    return when.strftime({"year": "%Y", "month": "%m", "day": "%d", "hour": "%H", "minute": "%M",
                          "second": "%S", "micros": "%f"}[name])


class LogFormat(logging.Formatter):
    """A ``--log-format`` string of Cloud Hypervisor's tokens as a :class:`logging.Formatter`.

    Each token maps to what the record carries: ``{boottime}`` is seconds since
    logging started, ``{thread}`` the thread's name (chmig names every thread),
    ``{tid}`` the kernel's thread id, ``{location}`` ``file:line``, ``{msg}``
    the message (and a traceback, when one is logged).
    """

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.pieces = parse_log_format(text)

    def format(self, record: logging.LogRecord) -> str:
        moment = _Moment(record.created)
        return "".join(self._token(text, record, moment) if is_token else text for is_token, text in self.pieces)

    def _token(self, token: str, record: logging.LogRecord, moment: _Moment) -> str:
        if token == "boottime":
            return f"{record.relativeCreated / 1000:>10.6f}"
        if token == "wallclock":  # RFC 3339, microseconds, UTC
            return moment.utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if token == "glog":
            return moment.utc.strftime("%m%d %H:%M:%S.%f")
        if token == "localglog":
            return moment.local.strftime("%m%d %H:%M:%S.%f")
        if token == "pid":
            return str(record.process)
        if token == "tid":  # handlers format in the thread that logs, so this is the record's thread
            return str(threading.get_native_id())
        if token == "thread":
            return record.threadName or "anonymous"
        if token == "level":
            return _CH_LEVEL_NAMES.get(record.levelname, record.levelname)
        if token == "levelchar":
            return _CH_LEVEL_NAMES.get(record.levelname, record.levelname)[:1]
        if token == "location":
            path = record.pathname
            if path.startswith(_SOURCE_ROOT + os.sep):
                path = os.path.relpath(path, _SOURCE_ROOT)
            return f"{path}:{record.lineno}"
        if token == "msg":
            text = record.getMessage()
            if record.exc_info and not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            if record.exc_text:
                text = f"{text}\n{record.exc_text}"
            if record.stack_info:
                text = f"{text}\n{self.formatStack(record.stack_info)}"
            return text
        if token.startswith("local"):
            return _time_field(token[len("local"):], moment.local)
        return _time_field(token, moment.utc)


def configure_logging(verbosity: int, log_file: str | None, log_format: LogFormat | None = None) -> None:
    """Log at warning, info (``-v``) or debug (``-vv`` and more: Python has no trace level)."""
    level = logging.WARNING - 10 * min(verbosity, 2)
    handler: logging.Handler
    if log_file is not None:
        try:
            handler = logging.FileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot open {log_file}: {exc.strerror or exc}", where="--log-file") from None
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(log_format if log_format is not None else logging.Formatter(CHMIG_LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
