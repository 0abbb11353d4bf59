"""Tests for chmig.options: Cloud Hypervisor's option-string rules.

"lib.rs" below means ``option_parser/src/lib.rs`` and "config.rs" means
``vmm/src/config.rs`` in cloud-hypervisor/cloud-hypervisor (commit ae44c297).
"""

from __future__ import annotations

import pytest

from chmig.errors import UsageError
from chmig.options import (
    MAX_LIST_ITEMS,
    U64_MAX,
    OptionError,
    OptionParser,
    dequote,
    parse_integer_list,
    parse_size,
    parse_string_list,
    parse_toggle,
    parse_typed,
    split_commas,
)

pytestmark = pytest.mark.timeout(30)


def memory_parser() -> OptionParser:
    # The keys of CH's own test_option_parser in lib.rs, plus a flag.
    return (
        OptionParser("--memory")
        .add("size")
        .add("mergeable")
        .add("hotplug_method")
        .add("hotplug_size")
        .add("topology")
        .add("cmdline")
        .add_valueless("prefault")
    )


# -- split_commas ------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("a=1,b=2", ["a=1", "b=2"]),
        ("topology=[1,2],x=3", ["topology=[1,2]", "x=3"]),
        ("t=[[1,2],[3,4]]", ["t=[[1,2],[3,4]]"]),
        ('cmdline="console=ttyS0,9600n8",x=1', ['cmdline="console=ttyS0,9600n8"', "x=1"]),
        ('c="[",d=1', ['c="["', "d=1"]),  # brackets inside quotes are not counted
        ('""', ['""']),
        ("", [""]),
        ("  a=1 , b  ", ["a=1 ", " b"]),  # only the whole input is trimmed
        ("a,", ["a", ""]),
    ],
)
def test_split_commas_keeps_bracketed_and_quoted_commas(text: str, pieces: list[str]) -> None:
    """lib.rs split_commas: quotes and brackets stay in the pieces; only ',' at depth 0 splits."""
    assert split_commas(text) == pieces


@pytest.mark.parametrize(
    "text", ["[a,b", "a]", "[a]]", "[[[a]]", '"abc', 'x="', 'x="""', "topology=[[[]]]]"]
)
def test_split_commas_unbalanced_is_an_error(text: str) -> None:
    """lib.rs test_split_commas_unbalanced_bracket / _quote and test_option_parser."""
    with pytest.raises(OptionError, match="invalid syntax"):
        split_commas(text)


def test_option_error_is_a_usage_error_with_where() -> None:
    with pytest.raises(UsageError) as caught:
        memory_parser().parse("topology=[")
    assert str(caught.value).startswith("--memory: invalid syntax")
    assert "unclosed '['" in str(caught.value)
    assert "\n" not in str(caught.value)


# -- parse: keys, values, flags ----------------------------------------------


def test_parse_values_quotes_and_brackets() -> None:
    """lib.rs test_option_parser: the same inputs give the same values."""
    p = memory_parser()
    p.parse("size=128M,mergeable=on,topology=[[1,2],[3,4]]")
    assert p.get("size") == "128M"
    assert p.get("mergeable") == "on"
    assert p.get("topology") == "[[1,2],[3,4]]"
    p.parse('cmdline="console=ttyS0,9600n8"')
    assert p.get("cmdline") == "console=ttyS0,9600n8"


def test_value_split_at_first_equals_and_trimmed() -> None:
    """lib.rs parse_inner: splitn(2, '=') then parts[1].trim()."""
    p = OptionParser("x").add("extra").add("size")
    p.parse("extra=foo=bar,size= 1G \t")
    assert p.get("extra") == "foo=bar"
    assert p.get("size") == "1G"


def test_keys_are_matched_exactly_not_trimmed() -> None:
    """lib.rs parse_inner: parts[0] is looked up as is, so ' size' is unknown."""
    with pytest.raises(OptionError, match="unknown option ' size'"):
        OptionParser("x").add("mem").add("size").parse("mem=1, size=2")


def test_unknown_key_names_it_and_lists_known_keys() -> None:
    """lib.rs parse_inner: an undeclared key is UnknownOption(key)."""
    with pytest.raises(OptionError) as caught:
        memory_parser().parse("size=128M,file=/dev/shm")
    err = caught.value
    assert err.key == "file"
    assert err.where == "--memory"
    assert "unknown option 'file'" in str(err)
    assert (
        "known options: size, mergeable, hotplug_method, hotplug_size, topology, cmdline, prefault"
        in str(err)
    )
    assert err.known == memory_parser().known


def test_trailing_comma_is_an_empty_unknown_option() -> None:
    with pytest.raises(OptionError, match="empty option .*stray comma"):
        memory_parser().parse("size=1G,")


def test_bare_key_for_valued_option_is_invalid_syntax() -> None:
    """lib.rs parse_inner: requires_value without '=' is InvalidSyntax (test 'hanging_param')."""
    expected = r"invalid syntax: option 'size' needs a value \(size=\.\.\.\)"
    with pytest.raises(OptionError, match=expected):
        memory_parser().parse("size")


def test_valueless_flags() -> None:
    """lib.rs test_add_valueless: is_set true, get None; parse_inner ignores '=...' after a flag."""
    p = memory_parser()
    assert not p.is_set("prefault")
    p.parse("size=1G,prefault")
    assert p.is_set("prefault")
    assert p.get("prefault") is None
    assert p.toggle("prefault", False) is True
    p2 = memory_parser().parse("prefault=whatever")
    assert p2.is_set("prefault") and p2.get("prefault") is None
    assert memory_parser().toggle("prefault", False) is False


def test_blank_input_sets_nothing() -> None:
    """lib.rs test_empty_input."""
    p = memory_parser().parse("").parse("   \t")
    assert p.items() == {}


def test_key_given_twice_last_wins() -> None:
    """lib.rs parse_inner overwrites value.value, so the last occurrence wins."""
    p = memory_parser().parse("size=1G,size=2G")
    assert p.size("size") == 2 << 30


def test_values_persist_across_parse_calls() -> None:
    """lib.rs: parse() never clears earlier values (test_option_parser relies on it)."""
    p = memory_parser().parse("size=1G").parse("mergeable=on")
    assert p.items() == {"size": "1G", "mergeable": "on"}


def test_empty_value_counts_as_unset_for_get_and_convert() -> None:
    """lib.rs get/convert: 'key=' is set but reads as None; config.rs then uses the default."""
    p = memory_parser().parse("size=,mergeable=")
    assert p.is_set("size")
    assert p.get("size") is None
    assert p.size("size", 42) == 42
    assert p.toggle("mergeable", True) is True
    assert p.items() == {"size": "", "mergeable": ""}


def test_parse_subset_skips_unknown_keys() -> None:
    """lib.rs test_parse_subset_ignores_unknown."""
    p = OptionParser("x").add("known").parse_subset("known=val,unknown=other")
    assert p.get("known") == "val"


def test_bad_option_names_and_undeclared_reads_are_programming_errors() -> None:
    """lib.rs add: names with '"[]=,' panic ("forbidden character in option name")."""
    for name in ["bad=name", "bad,name", "bad[name", 'q"', ""]:
        with pytest.raises(ValueError):
            OptionParser("x").add(name)
    with pytest.raises(KeyError):
        OptionParser("x").get("nope")


# -- dequote -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "plain"),
    [
        ('a"b,c"', "ab,c"),
        ('"say ""hi"""', 'say "hi"'),
        ('a\u03b2"a"""', 'a\u03b2a"'),  # lib.rs check_dequote
        ('""', ""),
        ("plain", "plain"),
    ],
)
def test_dequote(raw: str, plain: str) -> None:
    """lib.rs dequote and its check_dequote test."""
    assert dequote(raw) == plain


def test_quoted_empty_value_is_an_empty_string() -> None:
    """lib.rs get: 'key=""' stores '""' (non-empty), which dequotes to ''."""
    p = memory_parser().parse('cmdline=""')
    assert p.get("cmdline") == ""
    assert p.string("cmdline", "default") == ""


# -- Toggle ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("on", True),
        ("true", True),
        ("ON", True),
        ("True", True),
        ("tRuE", True),
        ("off", False),
        ("false", False),
        ("OFF", False),
        ("False", False),
        ("", False),
    ],
)
def test_toggle_table(value: str, expected: bool) -> None:
    """lib.rs Toggle: lower-cased, on/true → true, off/false/"" → false (test_toggle)."""
    assert parse_toggle(value, "flag") is expected


@pytest.mark.parametrize("value", ["maybe", "yes", "1", "0", " on", "on ", '"on"', "enabled"])
def test_toggle_garbage_is_an_error(value: str) -> None:
    """lib.rs test_toggle_invalid."""
    with pytest.raises(OptionError, match="expected on, off, true or false"):
        parse_toggle(value, "flag")


def test_toggle_through_parser() -> None:
    """config.rs: convert::<Toggle>(key)?.unwrap_or(Toggle(default)); Toggle sees the raw value."""
    p = memory_parser()
    assert p.toggle("mergeable", True) is True  # unset → default
    assert p.parse("mergeable=OFF").toggle("mergeable", True) is False
    with pytest.raises(OptionError, match=r"--memory: mergeable='maybe': expected on"):
        p.parse("mergeable=maybe").toggle("mergeable", False)
    # Toggle implements Parseable itself in lib.rs, without dequote.
    with pytest.raises(OptionError):
        p.parse('mergeable="on"').toggle("mergeable", False)


# -- sizes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1024", 1024),
        ("4096", 4096),
        ("1K", 1024),
        ("2K", 2048),
        ("2M", 2 << 20),
        ("512M", 512 << 20),
        ("1G", 1 << 30),
        ("4G", 4 << 30),
        ("0K", 0),
        (" 1G ", 1 << 30),
        ("+8", 8),  # Rust's u64 parse accepts a leading '+'
        ("1KM", 1 << 20),  # last char picks the unit, all K/M/G stripped
        ("16777215G", 16777215 << 30),
    ],
)
def test_byte_sized(value: str, expected: int) -> None:
    """lib.rs ByteSized::from_str (and its test_byte_sized)."""
    assert parse_size(value, "size") == expected


@pytest.mark.parametrize(
    "value", ["", "xyzK", "1k", "1T", "1.5G", "-1", "1 G", "0x10", "1_000", "G", "1GB", "١٢"]
)
def test_byte_sized_invalid(value: str) -> None:
    """lib.rs test_byte_sized_invalid; lower-case and other suffixes are not units."""
    with pytest.raises(OptionError, match="expected a byte size"):
        parse_size(value, "size")


def test_byte_sized_overflow_is_refused() -> None:
    # Deliberate difference: CH's `<<` would silently drop the high bits.
    with pytest.raises(OptionError, match="does not fit in 64 bits"):
        parse_size("17179869184G", "size")
    assert parse_size(str(U64_MAX), "size") == U64_MAX


def test_size_through_parser_is_dequoted() -> None:
    """lib.rs: ByteSized is a FromStr type, so convert() dequotes before parsing."""
    p = memory_parser().parse('size="512M"')
    assert p.size("size") == 512 << 20
    assert memory_parser().size("size", 7) == 7


# -- integers and numbers ----------------------------------------------------


def test_integer_conversion() -> None:
    """lib.rs test_convert_integer, _unset_returns_none and _invalid_returns_error."""
    p = OptionParser("x").add("count").add("other")
    assert p.integer("count") is None
    assert p.integer("count", 5) == 5
    assert p.parse("count=42").integer("count") == 42
    assert p.parse("count=+7").integer("count") == 7
    assert p.parse('count="9"').integer("count") == 9


@pytest.mark.parametrize(
    "value", ["notanumber", "1.0", "1e3", "0x10", "1_000", "-1", "-0", "+", "1 2", "١٢"]
)
def test_integer_errors_are_clear(value: str) -> None:
    """Rust's u64 FromStr: ASCII digits, optional '+', no '-' for unsigned."""
    p = OptionParser("send-migration").add("count").parse(f"count={value}")
    with pytest.raises(OptionError) as caught:
        p.integer("count")
    assert str(caught.value) == f"send-migration: count={value!r}: expected a non-negative integer"


def test_integer_ranges() -> None:
    p = OptionParser("x").add("n").parse("n=256")
    with pytest.raises(OptionError, match="expected an integer from 0 to 255"):
        p.integer("n", maximum=255)
    with pytest.raises(OptionError, match="does not fit|expected a non-negative integer"):
        OptionParser("x").add("n").parse(f"n={U64_MAX + 1}").integer("n")
    assert OptionParser("x").add("n").parse("n=-3").integer("n", minimum=None) == -3


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", 1.0), ("1.5", 1.5), ("-2.", -2.0), (".5", 0.5), ("1e3", 1000.0), ("+1E-2", 0.01)],
)
def test_number(value: str, expected: float) -> None:
    assert OptionParser("x").add("f").parse(f"f={value}").number("f") == expected


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity", "nan", "NaN", "1e400"])
def test_non_finite_numbers_refused(value: str) -> None:
    p = OptionParser("x").add("f").parse(f"f={value}")
    with pytest.raises(OptionError, match="expected a finite number"):
        p.number("f")


@pytest.mark.parametrize("value", ["abc", "1_0", "1.2.3", "e5", "0x1p3"])
def test_bad_numbers_refused(value: str) -> None:
    p = OptionParser("x").add("f").parse(f"f={value}")
    with pytest.raises(OptionError, match="expected a number"):
        p.number("f")


# -- lists -------------------------------------------------------------------


def test_integer_list() -> None:
    """lib.rs IntegerList (test_integer_list_single_values / _ranges)."""
    assert parse_integer_list("[1,3,5]", "k") == [1, 3, 5]
    assert parse_integer_list("[0,2-4,7]", "k") == [0, 2, 3, 4, 7]
    assert parse_integer_list("5", "k") == [5]
    p = memory_parser().parse("topology=[0,2-3]")
    assert p.integer_list("topology") == [0, 2, 3]


@pytest.mark.parametrize("value", ["[5-3]", "[5-5]", "[1-2-3]", "[]", "[1, 2]", "[a]", '"[1]"'])
def test_integer_list_errors(value: str) -> None:
    """lib.rs test_integer_list_invalid_range / _too_many_dashes; items are not trimmed."""
    with pytest.raises(OptionError):
        parse_integer_list(value, "k")


def test_integer_list_expansion_is_capped() -> None:
    with pytest.raises(OptionError, match="more than"):
        parse_integer_list(f"[0-{MAX_LIST_ITEMS}]", "k")
    assert len(parse_integer_list(f"[1-{MAX_LIST_ITEMS}]", "k")) == MAX_LIST_ITEMS


def test_string_list() -> None:
    """lib.rs test_string_list / test_string_list_no_brackets; StringList uses split_commas."""
    assert parse_string_list("[foo,bar,baz]", "k") == ["foo", "bar", "baz"]
    assert parse_string_list("foo,bar", "k") == ["foo", "bar"]
    assert parse_string_list('[a,"b,c"]', "k") == ["a", '"b,c"']


# -- parse_typed -------------------------------------------------------------


FIELDS: dict[str, type] = {"local": bool, "downtime": int, "ratio": float, "url": str}


def test_parse_typed_types() -> None:
    got = parse_typed(
        'url="tcp:1.2.3.4:6000",local=ON,downtime=300,ratio=0.5', FIELDS, "send-migration"
    )
    assert got == {"url": "tcp:1.2.3.4:6000", "local": True, "downtime": 300, "ratio": 0.5}
    assert type(got["local"]) is bool and type(got["downtime"]) is int


def test_parse_typed_only_given_keys() -> None:
    """config.rs reads 'key=' through convert(), which answers None: treated as not given."""
    assert parse_typed("local=off", FIELDS, "x") == {"local": False}
    assert parse_typed("downtime=,local=", FIELDS, "x") == {}
    assert parse_typed("", FIELDS, "x") == {}


def test_parse_typed_refuses_unknown_and_bad_values() -> None:
    with pytest.raises(OptionError) as caught:
        parse_typed("locale=on", FIELDS, "send-migration")
    assert str(caught.value) == (
        "send-migration: unknown option 'locale'; known options: local, downtime, ratio, url"
    )
    with pytest.raises(OptionError, match="local='yes': expected on, off, true or false"):
        parse_typed("local=yes", FIELDS, "x")
    with pytest.raises(OptionError, match="downtime='3s': expected a non-negative integer"):
        parse_typed("downtime=3s", FIELDS, "x")
    with pytest.raises(OptionError, match="expected a finite number"):
        parse_typed("ratio=nan", FIELDS, "x")
    with pytest.raises(TypeError):
        parse_typed("x=1", {"x": list}, "x")
