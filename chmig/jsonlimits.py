"""JSON from a peer: parsed at a cost bounded by its size, and read strictly, for the wire and the API.

``json.loads`` on hostile input can cost far more than the input's size (a
megabyte of ``[{},{},...]`` is hundreds of megabytes of objects), recurse until
Python gives up, or produce numbers no later ``int()`` can take (``Infinity``,
``1e999``).  :func:`loads_bounded` counts containers and values on the raw
bytes *before* parsing (brackets and separators inside strings count too,
which only makes the bound stricter), accepts only UTF-8 (as serde_json does;
``json.loads`` would guess UTF-16 or UTF-32) and only finite numbers.

The ``get_*`` functions read one field the way Cloud Hypervisor's serde does:
an integer must be an int in its range (never a bool, a float or a string), a
flag a bool, a name a short printable string.  Coercing instead (``int()``,
``bool("false")``) would turn a peer's mistake into a different VM.  Their
errors show at most a few characters of the peer's value: a message must stay
one short line whatever was sent.
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
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonRefused(f"not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise JsonRefused("nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN, 1e999, huge integers
        raise JsonRefused(f"not valid JSON: {str(exc)[:200]}") from None


# ---------------------------------------------------------------------------------------------
# Reading fields strictly, as Cloud Hypervisor's serde does: an integer is an int, a flag is a bool
# ---------------------------------------------------------------------------------------------

U64_MAX = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
_MISSING: object = object()


def _shown(value: object) -> str:
    """A peer's value in an error message: its type, and at most a few characters of it."""
    text = repr(value)
    return f"{type(value).__name__} {text[:24]}{'…' if len(text) > 24 else ''}"


def _take(obj: dict, key: str, what: str, default: object) -> object:
    if not isinstance(obj, dict):
        raise JsonRefused(f"{what} must be an object, not {_shown(obj)}")
    if key in obj:
        return obj[key]
    if default is _MISSING:
        raise JsonRefused(f"{what}.{key} is missing")
    return default


def get_object(obj: dict, key: str, what: str) -> dict:
    value = _take(obj, key, what, _MISSING)
    if not isinstance(value, dict):
        raise JsonRefused(f"{what}.{key} must be an object, not {_shown(value)}")
    return value


def get_list(obj: dict, key: str, what: str, max_items: int, default: object = _MISSING) -> list:
    value = _take(obj, key, what, default)
    if not isinstance(value, list):
        raise JsonRefused(f"{what}.{key} must be an array, not {_shown(value)}")
    if len(value) > max_items:
        raise JsonRefused(f"{what}.{key} has {len(value)} items, more than {max_items}")
    return value


def get_int(obj: dict, key: str, what: str, low: int = 0, high: int = U64_MAX, default: object = _MISSING) -> int:
    value = _take(obj, key, what, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise JsonRefused(f"{what}.{key} must be an integer, not {_shown(value)}")
    if not low <= value <= high:
        raise JsonRefused(f"{what}.{key}={str(value)[:24]} is outside {low}..{high}")
    return value


def get_number(obj: dict, key: str, what: str, low: float, high: float, default: object = _MISSING) -> float:
    value = _take(obj, key, what, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise JsonRefused(f"{what}.{key} must be a number, not {_shown(value)}")
    if not low <= value <= high:
        raise JsonRefused(f"{what}.{key}={str(value)[:24]} is outside {low:g}..{high:g}")
    return float(value)


def get_bool(obj: dict, key: str, what: str, default: object = _MISSING) -> bool:
    value = _take(obj, key, what, default)
    if not isinstance(value, bool):
        raise JsonRefused(f"{what}.{key} must be true or false, not {_shown(value)}")
    return value


def get_str(obj: dict, key: str, what: str, max_length: int = 128, default: object = _MISSING) -> str:
    """A short printable string (names and ids: they end up in file names and log lines)."""
    value = _take(obj, key, what, default)
    if not isinstance(value, str):
        raise JsonRefused(f"{what}.{key} must be a string, not {_shown(value)}")
    if not 0 < len(value) <= max_length or not value.isprintable():
        raise JsonRefused(f"{what}.{key} must be 1..{max_length} printable characters, not {_shown(value)}")
    return value
