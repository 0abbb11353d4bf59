"""Cloud Hypervisor's ``key=value,key=value`` option strings, parsed by CH's rules.

Every option string chmig accepts (``--memory size=512M,shared=on``,
``send-migration destination_url=...,local=on``, API shortcuts) goes through
this one parser, so a string that Cloud Hypervisor accepts means the same thing
here and a string CH refuses is refused here too.

Which CH rules this mirrors, and where they live in the cloud-hypervisor
repository (read at commit ae44c297, 2026-08-22; ``option_parser/src/lib.rs``
last changed in d419338a):

``option_parser/src/lib.rs``
    * ``split_commas``: the whole input is trimmed, then split on commas that
      are outside ``[...]`` and outside ``"..."``.  Inside quotes only ``"`` is
      special (brackets there are not counted).  Quotes and brackets stay in
      the pieces.  A ``]`` with no open ``[``, an unclosed ``[`` or an unclosed
      ``"`` is an error.  ``""`` splits into ``['']`` (one empty piece).
    * ``OptionParser::parse``: blank input sets nothing.  Each piece is split
      at its first ``=``; the part before it is the key, matched exactly (not
      trimmed, case-sensitive).  An undeclared key is ``UnknownOption``.  A key
      declared with ``add`` and given without ``=`` is ``InvalidSyntax``; its
      value is the text after ``=``, trimmed.  A key declared with
      ``add_valueless`` is just marked as set, and anything after its ``=`` is
      ignored.  A key given twice: the last one wins (the value is simply
      overwritten).  Values persist across ``parse`` calls on one parser.
    * ``OptionParser::parse_subset``: the same, but unknown keys are skipped.
    * ``OptionParser::get``: unset or empty (``key=``) is ``None``; otherwise
      the value passed through ``dequote`` (quotes removed, ``""`` right after
      a closing quote is a literal ``"``).  So ``key=""`` gives ``''``.
    * ``OptionParser::convert``: unset or empty is ``None`` (the caller's
      default).  Plain ``FromStr`` types (integers, floats, strings,
      ``ByteSized``) see the *dequoted* value; ``Toggle``, ``IntegerList`` and
      ``StringList`` see the *raw* value, quotes included (so ``x="on"`` is not
      a valid Toggle).
    * ``Toggle``: lower-cased, ``on``/``true`` → true, ``off``/``false``/empty
      → false, anything else an error.
    * ``ByteSized``: trimmed; the last character picks the shift (``K`` 10,
      ``M`` 20, ``G`` 30, upper case only, binary units); then *all* trailing
      ``K``/``M``/``G`` are stripped and the rest parsed as a ``u64``.
    * ``IntegerList``: trimmed, all leading/trailing ``[``/``]`` stripped,
      split on ``,``; each item ``n`` or ``a-b`` with ``a < b`` (inclusive).
    * ``StringList``: trimmed, brackets stripped, then ``split_commas``.
    * Option names containing ``" [ ] = ,`` are a programming error (``add``
      panics); here :meth:`OptionParser.add` raises :class:`ValueError`.

``vmm/src/config.rs``
    * Toggles are read as ``convert::<Toggle>(key)?.unwrap_or(Toggle(default))``
      so ``key=`` means "use the default", which :meth:`OptionParser.toggle`
      reproduces.  Valueless flags (``console=off``, ``pty``...) are read with
      ``is_set``.

Keys chmig does not support
---------------------------
Cloud Hypervisor has keys chmig has nothing to apply to (``--cpus max=``,
``--memory hugepages=``, ``receive-migration vfio_fds=``).  They are declared
with :meth:`OptionParser.add_unsupported`, so a user who gives one is told so
*by name* ("max is a Cloud Hypervisor option that chmig does not support;
supported: boot") instead of hearing "unknown option" or, worse, having it
silently ignored.  An *empty* value (``max=``) is accepted: CH's ``convert``
reads ``key=`` as "not given" and applies its default, and chmig already
behaves as that default, so the string means the same in both.  A bare
unsupported key, or an unsupported valueless flag, is refused.  The check runs
after the whole string is parsed, so ``max=4,max=`` is accepted exactly as CH,
where the last value wins, reads it as unset.

Integers follow Rust's ``str::parse``: ASCII digits with one optional leading
``+`` (``-`` only for signed ranges); no spaces, no ``_``, no ``0x``.

Deliberate differences, each safer than CH:

* a byte size that does not fit in 64 bits is refused (CH's ``<<`` silently
  drops the high bits);
* an integer list may expand to at most :data:`MAX_LIST_ITEMS` items (CH
  would try to allocate whatever range it is given);
* asking for a key that was never declared raises :class:`KeyError` (CH
  answers ``None``), because that is always a typo in chmig, never user input;
* :meth:`OptionParser.toggle` on a valueless flag answers whether it was
  given (CH never converts flags, so there is nothing to disagree with).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from typing import TypeVar

from chmig.errors import UsageError

__all__ = [
    "MAX_LIST_ITEMS",
    "U32_MAX",
    "U64_MAX",
    "OptionError",
    "OptionParser",
    "dequote",
    "parse_integer",
    "parse_integer_list",
    "parse_number",
    "parse_size",
    "parse_string_list",
    "parse_toggle",
    "parse_typed",
    "split_commas",
]

U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1

# Guards memory, not correctness: "[0-4294967295]" is a valid CH IntegerList
# but nobody means it, and expanding it would take gigabytes.
MAX_LIST_ITEMS = 1 << 16

# Rust's str::trim strips Unicode White_Space, which is *not* Python's
# str.isspace (that one also includes U+001C..U+001F).  Spelled out so a value
# trims identically in both implementations.
_RUST_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)

# Characters CH forbids in option names: with them a key could never match, or
# could change how split_commas sees the rest of the string.
_FORBIDDEN_IN_NAMES = frozenset('"[]=,')

# Rust's integer FromStr: optional sign, then one or more ASCII digits.
_INTEGER = re.compile(r"[+-]?[0-9]+", re.ASCII)
# Rust's f64 FromStr decimal grammar (inf/nan are handled separately, since
# they are refused anyway): digits with optional fraction, or a bare fraction,
# then an optional exponent.
_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
_FLOAT_SPECIAL = re.compile(r"[+-]?(?:inf|infinity|nan)", re.ASCII | re.IGNORECASE)

_SIZE_SHIFTS = {"K": 10, "M": 20, "G": 30}
_SIZE_HINT = "a byte size: an integer with an optional K, M or G suffix (e.g. 4096, 2K, 512M, 1G)"

_T = TypeVar("_T")


class OptionError(UsageError):
    """An option string or one of its values is wrong.

    ``where`` is the option string's owner (``--memory``, ``send-migration``);
    ``key`` the offending key when there is one; ``known`` the declared keys,
    filled in for an unknown key so the message can list them.
    """

    def __init__(
        self,
        message: str,
        *,
        where: str | None = None,
        key: str | None = None,
        known: Iterable[str] = (),
    ) -> None:
        self.key = key
        self.known = tuple(known)
        super().__init__(message, where=where or None)


def _trim(text: str) -> str:
    return text.strip(_RUST_WHITESPACE)


def _show(value: str) -> str:
    # repr() makes stray spaces, empty strings and control characters visible
    # in a one-line message.
    return repr(value)


def split_commas(text: str, *, what: str | None = None) -> list[str]:
    """Split ``text`` on commas outside ``[...]`` and ``"..."`` (CH ``split_commas``).

    Quotes and brackets are kept in the pieces; an empty input gives ``['']``.
    Raises :class:`OptionError` for a stray ``]``, an unclosed ``[`` or an
    unclosed ``"``.
    """
    pieces: list[str] = []
    current: list[str] = []
    depth = 0
    in_quotes = False
    for char in _trim(text):
        if char == '"':
            in_quotes = not in_quotes
        elif in_quotes:
            pass  # inside quotes only '"' is special, as in CH
        elif char == "[":
            depth += 1
        elif char == "]":
            if depth == 0:
                raise OptionError(
                    f"invalid syntax in {_show(text)}: ']' without a matching '['",
                    where=what,
                )
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    pieces.append("".join(current))
    if in_quotes:
        raise OptionError(f"invalid syntax in {_show(text)}: unclosed '\"'", where=what)
    if depth:
        raise OptionError(f"invalid syntax in {_show(text)}: unclosed '['", where=what)
    return pieces


def dequote(value: str) -> str:
    """Remove quotes the way CH's ``dequote`` does: ``a"b,c"`` → ``ab,c``.

    A quote that reopens right after a closing quote stands for a literal
    quote, so ``"a""b"`` → ``a"b`` (CSV-style doubling inside quotes).
    """
    out: list[str] = []
    previous = ""
    in_quotes = False
    for char in value:
        if char == '"':
            if previous == '"' and not in_quotes:
                out.append('"')
            in_quotes = not in_quotes
        else:
            out.append(char)
        previous = char
    return "".join(out)


def parse_toggle(value: str, key: str, *, what: str | None = None) -> bool:
    """CH ``Toggle``: ``on``/``true`` → True, ``off``/``false``/``""`` → False, any case."""
    lowered = value.lower()
    if lowered in ("on", "true"):
        return True
    if lowered in ("off", "false", ""):
        return False
    raise OptionError(
        f"{key}={_show(value)}: expected on, off, true or false", where=what, key=key
    )


def parse_integer(
    value: str,
    key: str,
    *,
    minimum: int | None = 0,
    maximum: int | None = U64_MAX,
    what: str | None = None,
) -> int:
    """An integer as Rust's ``str::parse`` reads one, within ``[minimum, maximum]``.

    The default range is CH's usual ``u64``; pass ``minimum=None`` for a
    signed value.  A ``-`` sign is refused when the range is unsigned, exactly
    as ``"-0".parse::<u64>()`` fails.
    """
    if minimum is not None and maximum is not None:
        expected = f"an integer from {minimum} to {maximum}"
        if minimum == 0 and maximum == U64_MAX:
            expected = "a non-negative integer"
    elif minimum is not None:
        expected = f"an integer >= {minimum}"
    elif maximum is not None:
        expected = f"an integer <= {maximum}"
    else:
        expected = "an integer"
    unsigned = minimum is not None and minimum >= 0
    if not _INTEGER.fullmatch(value) or (unsigned and value.startswith("-")):
        raise OptionError(f"{key}={_show(value)}: expected {expected}", where=what, key=key)
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise OptionError(f"{key}={_show(value)}: expected {expected}", where=what, key=key)
    return number


def parse_number(value: str, key: str, *, what: str | None = None) -> float:
    """A finite float in Rust's ``f64`` syntax; ``inf``, ``nan`` and overflow are refused."""
    if _FLOAT_SPECIAL.fullmatch(value):
        raise OptionError(
            f"{key}={_show(value)}: expected a finite number", where=what, key=key
        )
    if not _FLOAT.fullmatch(value):
        raise OptionError(f"{key}={_show(value)}: expected a number", where=what, key=key)
    number = float(value)
    if not math.isfinite(number):  # e.g. 1e400 overflows to inf
        raise OptionError(
            f"{key}={_show(value)}: expected a finite number", where=what, key=key
        )
    return number


def parse_size(value: str, key: str, *, what: str | None = None) -> int:
    """CH ``ByteSized``: ``4096``, ``2K``, ``512M``, ``1G`` (binary units) → bytes.

    Like CH, the *last* character picks the unit and every trailing K/M/G is
    then dropped, so ``1KM`` is 1 MiB; lower-case suffixes are not units.
    """
    trimmed = _trim(value)
    shift = _SIZE_SHIFTS.get(trimmed[-1:], 0)
    digits = trimmed.rstrip("KMG")
    if not _INTEGER.fullmatch(digits) or digits.startswith("-"):
        raise OptionError(f"{key}={_show(value)}: expected {_SIZE_HINT}", where=what, key=key)
    size = int(digits) << shift
    if size > U64_MAX:
        raise OptionError(
            f"{key}={_show(value)}: byte size does not fit in 64 bits", where=what, key=key
        )
    return size


def parse_integer_list(value: str, key: str, *, what: str | None = None) -> list[int]:
    """CH ``IntegerList``: ``[0,2-4,7]`` → ``[0, 2, 3, 4, 7]`` (u64 items, ranges inclusive)."""
    body = _trim(value).strip("[]")
    result: list[int] = []
    for item in body.split(","):
        bounds = item.split("-")
        if len(bounds) > 2:
            raise OptionError(
                f"{key}={_show(value)}: bad list item {_show(item)}, expected N or A-B",
                where=what,
                key=key,
            )
        numbers: list[int] = []
        for bound in bounds:
            # Rust parses each bound untrimmed, so "[1, 2]" is an error there too.
            if not _INTEGER.fullmatch(bound) or bound.startswith("-"):
                raise OptionError(
                    f"{key}={_show(value)}: bad list item {_show(bound)}, "
                    "expected a non-negative integer",
                    where=what,
                    key=key,
                )
            number = int(bound)
            if number > U64_MAX:
                raise OptionError(
                    f"{key}={_show(value)}: list item {bound} does not fit in 64 bits",
                    where=what,
                    key=key,
                )
            numbers.append(number)
        start, end = numbers[0], numbers[-1]
        if len(numbers) == 2 and start >= end:
            raise OptionError(
                f"{key}={_show(value)}: bad range {_show(item)}, start must be below end",
                where=what,
                key=key,
            )
        if len(result) + (end - start + 1) > MAX_LIST_ITEMS:
            raise OptionError(
                f"{key}={_show(value)}: list expands to more than {MAX_LIST_ITEMS} items",
                where=what,
                key=key,
            )
        result.extend(range(start, end + 1))
    return result


def parse_string_list(value: str, key: str, *, what: str | None = None) -> list[str]:
    """CH ``StringList``: ``[a,b]`` or ``a,b`` → ``['a', 'b']`` (pieces kept verbatim)."""
    return split_commas(_trim(value).strip("[]"), what=what)


class OptionParser:
    """CH's ``OptionParser``: declare keys, :meth:`parse`, then read typed values.

    >>> p = OptionParser("--memory").add("size").add("shared").add_valueless("prefault")
    >>> p.parse("size=1G,shared=on,prefault").size("size")
    1073741824
    """

    def __init__(self, what: str) -> None:
        self.what = what
        # key -> whether it needs "=value"; dict keeps declaration order, which
        # is the order the "known options" list in errors shows.
        self._requires_value: dict[str, bool] = {}
        # key -> raw value as stored by parse ("" for a valueless flag or
        # "key="); None while unset.
        self._values: dict[str, str | None] = {}
        # Cloud Hypervisor keys chmig does not support -> why (or None); they
        # are in _requires_value too, so parse recognises them.
        self._unsupported: dict[str, str | None] = {}

    # -- declaring ---------------------------------------------------------

    def _declare(self, key: str, requires_value: bool) -> OptionParser:
        if not key or _FORBIDDEN_IN_NAMES.intersection(key):
            raise ValueError(f"bad option name {key!r}: must be non-empty without \" [ ] = ,")
        self._requires_value[key] = requires_value
        self._values[key] = None  # CH's insert resets a re-declared key too
        self._unsupported.pop(key, None)  # add_unsupported marks it again after this
        return self

    def add(self, key: str) -> OptionParser:
        """Declare ``key``, which must be given as ``key=value``."""
        return self._declare(key, True)

    def add_valueless(self, key: str) -> OptionParser:
        """Declare a flag given bare (``key``); a ``=value`` after it is ignored, as in CH."""
        return self._declare(key, False)

    def add_all(self, keys: Iterable[str]) -> OptionParser:
        for key in keys:
            self.add(key)
        return self

    def add_unsupported(
        self, *keys: str, reason: str | None = None, valueless: bool = False
    ) -> OptionParser:
        """Declare Cloud Hypervisor keys chmig does not support: given, they are refused by name.

        ``key=`` (empty: CH's "not given") is accepted, since chmig behaves as
        CH's default; any other value, a bare key and a ``valueless`` flag are
        refused with "KEY is a Cloud Hypervisor option that chmig does not
        support (REASON); supported: ..." once the whole string is parsed.
        """
        for key in keys:
            self._declare(key, not valueless)
            self._unsupported[key] = reason
        return self

    @property
    def known(self) -> tuple[str, ...]:
        """The supported keys, in declaration order (what an error lists as usable)."""
        return tuple(k for k in self._requires_value if k not in self._unsupported)

    @property
    def unsupported(self) -> tuple[str, ...]:
        """The Cloud Hypervisor keys declared with :meth:`add_unsupported`."""
        return tuple(self._unsupported)

    # -- parsing -----------------------------------------------------------

    def parse(self, text: str) -> OptionParser:
        """Parse ``key=value,...``; a repeated key: the last wins. Raises :class:`OptionError`."""
        self._parse(text, ignore_unknown=False)
        return self

    def parse_subset(self, text: str) -> OptionParser:
        """Like :meth:`parse` but skip undeclared keys (CH ``parse_subset``)."""
        self._parse(text, ignore_unknown=True)
        return self

    def _parse(self, text: str, *, ignore_unknown: bool) -> None:
        if not _trim(text):
            return
        for piece in split_commas(text, what=self.what):
            key, has_equals, value = piece.partition("=")
            requires_value = self._requires_value.get(key)
            if requires_value is None:
                if ignore_unknown:
                    continue
                raise self._unknown(key, text)
            if not requires_value:
                self._values[key] = ""
            elif not has_equals:
                if key in self._unsupported:
                    raise self._refuse_unsupported(key)
                raise OptionError(
                    f"invalid syntax: option {key!r} needs a value ({key}=...)",
                    where=self.what,
                    key=key,
                )
            else:
                self._values[key] = _trim(value)
        # After the loop, so that the last occurrence of a key decides, as in CH.
        for key in self._unsupported:
            value = self._values[key]
            if value is not None and (value or not self._requires_value[key]):
                raise self._refuse_unsupported(key)

    def _refuse_unsupported(self, key: str) -> OptionError:
        reason = self._unsupported[key]
        supported = ", ".join(self.known) or "none"
        return OptionError(
            f"{key} is a Cloud Hypervisor option that chmig does not support"
            + (f" ({reason})" if reason else "")
            + f"; supported: {supported}",
            where=self.what,
            key=key,
            known=self.known,
        )

    def _unknown(self, key: str, text: str) -> OptionError:
        known = ", ".join(self.known) or "none"
        if key:
            problem = f"unknown option {_show(key)}"
        else:
            problem = f"empty option in {_show(text)} (stray comma?)"
        return OptionError(
            f"{problem}; known options: {known}", where=self.what, key=key, known=self.known
        )

    # -- reading -----------------------------------------------------------

    def _raw(self, key: str) -> str | None:
        """The stored value, None when unset or empty (CH ``convert``'s first step)."""
        if key not in self._values:
            raise KeyError(f"{self.what}: option {key!r} was never declared")
        return self._values[key] or None

    def _convert(self, key: str, convert: Callable[[str], _T], *, dequoted: bool) -> _T | None:
        raw = self._raw(key)
        if raw is None:
            return None
        return convert(dequote(raw) if dequoted else raw)

    def is_set(self, key: str) -> bool:
        """Whether ``key`` appeared in the input, with or without a value."""
        if key not in self._values:
            raise KeyError(f"{self.what}: option {key!r} was never declared")
        return self._values[key] is not None

    def get(self, key: str) -> str | None:
        """The dequoted value; None when unset, given as ``key=``, or a flag (CH ``get``)."""
        raw = self._raw(key)
        return None if raw is None else dequote(raw)

    def string(self, key: str, default: str | None = None) -> str | None:
        """Like :meth:`get` with a default; ``key=""`` gives ``''``, as in CH."""
        value = self.get(key)
        return default if value is None else value

    def toggle(self, key: str, default: bool) -> bool:
        """CH ``convert::<Toggle>(key).unwrap_or(Toggle(default))``; a flag answers is_set."""
        if not self._requires_value.get(key, True):
            return True if self.is_set(key) else default
        value = self.toggle_or_none(key)
        return default if value is None else value

    def toggle_or_none(self, key: str) -> bool | None:
        """CH ``convert::<Toggle>(key)``: None when the key was not given (or given empty)."""
        # Toggle gets the raw value in CH, quotes and all.
        return self._convert(key, lambda v: parse_toggle(v, key, what=self.what), dequoted=False)

    def integer(
        self,
        key: str,
        default: int | None = None,
        *,
        minimum: int | None = 0,
        maximum: int | None = U64_MAX,
    ) -> int | None:
        """An integer (u64 range unless told otherwise), or ``default`` when unset or empty."""
        value = self._convert(
            key,
            lambda v: parse_integer(v, key, minimum=minimum, maximum=maximum, what=self.what),
            dequoted=True,
        )
        return default if value is None else value

    def number(self, key: str, default: float | None = None) -> float | None:
        """A finite float, or ``default`` when unset or empty."""
        value = self._convert(key, lambda v: parse_number(v, key, what=self.what), dequoted=True)
        return default if value is None else value

    def size(self, key: str, default: int | None = None) -> int | None:
        """A CH ``ByteSized`` in bytes, or ``default`` when unset or empty."""
        value = self._convert(key, lambda v: parse_size(v, key, what=self.what), dequoted=True)
        return default if value is None else value

    def integer_list(self, key: str, default: list[int] | None = None) -> list[int] | None:
        """A CH ``IntegerList`` (raw value, so a quoted list is refused as in CH)."""
        value = self._convert(
            key, lambda v: parse_integer_list(v, key, what=self.what), dequoted=False
        )
        return default if value is None else value

    def string_list(self, key: str, default: list[str] | None = None) -> list[str] | None:
        """A CH ``StringList`` (raw value; quotes stay in the items, as in CH)."""
        value = self._convert(
            key, lambda v: parse_string_list(v, key, what=self.what), dequoted=False
        )
        return default if value is None else value

    def items(self) -> dict[str, str]:
        """Every key that was given, with its dequoted value (``''`` for flags and ``key=``)."""
        return {
            key: dequote(value) for key, value in self._values.items() if value is not None
        }


def parse_typed(
    text: str, fields: dict[str, type], what: str
) -> dict[str, bool | int | float | str]:
    """Parse ``key=value,...`` into a JSON-ready dict, typed by ``fields``.

    ``fields`` maps each allowed key to ``bool`` (CH Toggle), ``int`` (u64),
    ``float`` (finite) or ``str``.  Only keys that were given appear in the
    result; ``key=`` counts as not given, since CH's ``convert`` answers None
    for it and the caller's default applies.
    """
    parser = OptionParser(what).add_all(fields)
    parser.parse(text)
    result: dict[str, bool | int | float | str] = {}
    for key, kind in fields.items():
        value: bool | int | float | str | None
        if kind is bool:  # before int: bool is a subclass of int
            # Not toggle(): that needs a default, and here "not given" must stay None.
            value = parser.toggle_or_none(key)
        elif kind is int:
            value = parser.integer(key)
        elif kind is float:
            value = parser.number(key)
        elif kind is str:
            value = parser.string(key)
        else:
            raise TypeError(f"parse_typed: field {key!r} has unsupported type {kind!r}")
        if value is not None:
            result[key] = value
    return result
