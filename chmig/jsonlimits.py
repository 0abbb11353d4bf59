"""JSON from a peer, parsed at a cost bounded by its size: one parser for the wire and the API.

``json.loads`` on hostile input can cost far more than the input's size (a
megabyte of ``[{},{},...]`` is hundreds of megabytes of objects), recurse until
Python gives up, or produce numbers no later ``int()`` can take (``Infinity``,
``1e999``).  :func:`loads_bounded` counts containers and values on the raw
bytes *before* parsing (brackets and separators inside strings count too,
which only makes the bound stricter) and accepts only finite numbers.
"""

from __future__ import annotations

import json
import math


class JsonRefused(ValueError):
    """The document is not JSON, or is JSON that costs more than its bounds allow; the message says which."""


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def loads_bounded(raw: bytes, *, max_containers: int, max_values: int) -> object:
    """Parse ``raw``, or raise :class:`JsonRefused` with a one-line reason."""
    containers = raw.count(b"[") + raw.count(b"{")
    if containers > max_containers:
        raise JsonRefused(f"{containers} objects and arrays (however nested), more than {max_containers}")
    values = raw.count(b",") + raw.count(b":")
    if values > max_values:
        raise JsonRefused(f"{values} values, more than {max_values}")
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise JsonRefused("nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN, 1e999, huge integers
        raise JsonRefused(f"not valid JSON: {exc}") from None
