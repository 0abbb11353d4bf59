"""Cloud Hypervisor's option rules, everywhere chmig takes an option string, and ch-remote's request bodies.

Table-driven against cloud-hypervisor at commit ae44c297: ``option_parser/src/lib.rs`` (the parser),
``vmm/src/config.rs`` (``CpusConfig``/``MemoryConfig``/``SerialConfig``/``RestoreConfig::parse``),
``vmm/src/api/mod.rs`` (``VmSendMigrationData``/``VmReceiveMigrationData``: fields, defaults, ``parse``,
``validate`` and its unit tests), ``cloud-hypervisor/src/bin/ch-remote.rs`` (what is sent: serde's compact JSON).
The last tests drive a real chmig VMM over its API socket and the real ``chmig run`` command line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from chmig.apiclient import ApiError
from chmig.apiconfig import (
    RECEIVE_MIGRATION_SYNTAX,
    RESTORE_SYNTAX,
    SEND_MIGRATION_SYNTAX,
    SNAPSHOT_SYNTAX,
    JsonBodyError,
    ReceiveOptions,
    SendOptions,
    check_fields,
    receive_migration_body,
    restore_body,
    send_migration_body,
    snapshot_body,
    snapshot_from_api,
)
from chmig.errors import UsageError
from chmig.options import OptionError, OptionParser
from chmig.snapshot import COPY, ONDEMAND, RestoreConfig
from chmig.vm import (
    CPUS_UNSUPPORTED,
    MEMORY_UNSUPPORTED,
    ZONE_UNSUPPORTED,
    Serial,
    VmConfig,
    cpus_parser,
    memory_parser,
    memory_zone_parser,
    parse_serial,
)

from .conftest import BackgroundCall, Processes

pytestmark = pytest.mark.timeout(120)


def compact(body: dict[str, Any]) -> str:
    """serde_json::to_string's output for a body: no spaces, fields in order."""
    return json.dumps(body, separators=(",", ":"))


def refused(call: Any, *words: str, kind: type[Exception] = UsageError) -> str:
    """``call()`` raises ``kind`` with one line holding every word; the line."""
    with pytest.raises(kind) as caught:
        call()
    line = str(caught.value)
    assert "\n" not in line, line
    for word in words:
        assert word in line, (word, line)
    return line


# ---------------------------------------------------------------------------------------------
# The parser's rules, through chmig's real option parsers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "url"), [
    ('destination_url="unix:/tmp/a,b"', "unix:/tmp/a,b"),  # quotes keep the comma
    ('destination_url=unix:/tmp/"a,b"', "unix:/tmp/a,b"),  # quotes anywhere in the value
    ("destination_url=unix:/tmp/ch=migrate.sock", "unix:/tmp/ch=migrate.sock"),  # split at the first '='
    ("  destination_url=unix:/tmp/x  ", "unix:/tmp/x"),  # the whole input is trimmed
    ("destination_url=unix:/tmp/x,destination_url=unix:/tmp/y", "unix:/tmp/y"),  # the last one wins
    ("destination_url=unix:/tmp/[x]", "unix:/tmp/[x]"),  # balanced brackets are part of the value
])
def test_values_quotes_brackets_and_repeats(text: str, url: str) -> None:
    """lib.rs split_commas/parse_inner/dequote, through send-migration's parser."""
    assert SendOptions.parse(text).destination_url == url


@pytest.mark.parametrize("text", ["destination_url=unix:/tmp/[x", "destination_url=unix:/tmp/x]",
                                  'destination_url="unix:/tmp/x'])
def test_unbalanced_brackets_and_quotes_are_invalid_syntax(text: str) -> None:
    refused(lambda: SendOptions.parse(text), "send-migration: invalid syntax", kind=OptionError)


@pytest.mark.parametrize(("value", "expected"), [
    ("on", True), ("ON", True), ("true", True), ("True", True),
    ("off", False), ("OFF", False), ("false", False), ("FALSE", False),
    ("", False),  # key= is "not given": the default, off
])
def test_toggles(value: str, expected: bool) -> None:
    """lib.rs Toggle, as send-migration's local= and --memory's shared= read it."""
    assert SendOptions.parse(f"destination_url=unix:/tmp/x,local={value}").local is expected
    shared = VmConfig.from_args(None, f"size=32M,shared={value}", [], None).zones[0].shared
    assert shared is (True if value == "" else expected)  # chmig's default is shared=on


@pytest.mark.parametrize("value", ["yes", "1", '"on"', "enabled"])
def test_bad_toggles(value: str) -> None:
    refused(lambda: SendOptions.parse(f"destination_url=unix:/tmp/x,local={value}"),
            "local=", "expected on, off, true or false", kind=OptionError)


@pytest.mark.parametrize(("parse", "text", "key"), [
    (lambda t: SendOptions.parse(t), "destination_url=unix:/tmp/x,local", "local"),
    (lambda t: ReceiveOptions.parse(t), "receiver_url=unix:/tmp/x,memory_mode", "memory_mode"),
    (lambda t: VmConfig.from_args(t, None, [], None), "boot", "boot"),
    (lambda t: VmConfig.from_args(None, t, [], None), "size", "size"),
    (lambda t: RestoreConfig.parse(t), "source_url", "source_url"),
])
def test_a_bare_key_that_needs_a_value_is_invalid_syntax(parse: Any, text: str, key: str) -> None:
    """lib.rs parse_inner: InvalidSyntax; in particular a bare ``local`` is not "on" (issue 11)."""
    refused(lambda: parse(text), "invalid syntax", f"option '{key}' needs a value", kind=OptionError)


@pytest.mark.parametrize(("parse", "text", "known"), [
    (lambda t: SendOptions.parse(t), "destination_url=unix:/tmp/x,bogus=1",
     "destination_url, local, preserve_source, downtime_ms, timeout_s, timeout_strategy, connections, tls_dir, "
     "memory_mode, fault_connections"),
    (lambda t: ReceiveOptions.parse(t), "receiver_url=unix:/tmp/x,bogus=1",
     "receiver_url, tls_dir, memory_mode, prefetch"),
    (lambda t: VmConfig.from_args(t, None, [], None), "boot=1,bogus=1", "boot"),
    (lambda t: VmConfig.from_args(None, t, [], None), "size=32M,bogus=1", "size, shared"),
    (lambda t: VmConfig.from_args(None, None, [t], None), "id=z,bogus=1", "id, size, shared"),
    (lambda t: RestoreConfig.parse(t), "source_url=file:///x,bogus=1",
     "source_url, prefault, memory_restore_mode, resume"),
    (parse_serial, "bogus", "off, tty, null, file"),
])
def test_an_unknown_key_is_refused_with_the_known_ones(parse: Any, text: str, known: str) -> None:
    """lib.rs UnknownOption; the list names what chmig supports (the unsupported CH keys are not offered)."""
    refused(lambda: parse(text), "unknown option 'bogus'", f"known options: {known}", kind=OptionError)


# ---------------------------------------------------------------------------------------------
# Keys Cloud Hypervisor has and chmig does not: refused by name, never ignored
# ---------------------------------------------------------------------------------------------


def test_add_unsupported_rules() -> None:
    def parser() -> OptionParser:
        return OptionParser("--x").add("a").add_unsupported("u", reason="no u here").add_unsupported(
            "flag", valueless=True)

    assert parser().known == ("a",) and parser().unsupported == ("u", "flag")
    line = refused(lambda: parser().parse("a=1,u=2"), kind=OptionError)
    assert line == "--x: u is a Cloud Hypervisor option that chmig does not support (no u here); supported: a"
    refused(lambda: parser().parse("u"), "u is a Cloud Hypervisor option", kind=OptionError)  # bare
    refused(lambda: parser().parse("flag"), "flag is a Cloud Hypervisor option", kind=OptionError)
    refused(lambda: parser().parse("u=,u=1"), "u is a Cloud Hypervisor option", kind=OptionError)
    # key= is CH's "not given" (convert answers None, the default applies): accepted, whatever came before.
    assert parser().parse("a=1,u=").get("a") == "1"
    assert parser().parse("u=1,u=").get("u") is None
    with pytest.raises(OptionError) as caught:
        parser().parse("u=1")
    assert caught.value.key == "u" and caught.value.known == ("a",)


#: CH's key sets (config.rs), in its order, split as chmig supports them.
CPUS_KEYS = ("boot", "max", "topology", "kvm_hyperv", "max_phys_bits", "affinity", "features", "nested",
             "core_scheduling", "profile")
MEMORY_KEYS = ("size", "file", "mergeable", "hotplug_method", "hotplug_size", "hotplugged_size", "shared",
               "hugepages", "hugepage_size", "prefault", "reserve", "thp")
ZONE_KEYS = ("id", "size", "file", "shared", "hugepages", "hugepage_size", "host_numa_node", "hotplug_size",
             "hotplugged_size", "prefault", "reserve", "mergeable")


def test_vm_options_declare_cloud_hypervisors_whole_key_sets() -> None:
    for parser, keys, unsupported in [(cpus_parser(), CPUS_KEYS, CPUS_UNSUPPORTED),
                                      (memory_parser(), MEMORY_KEYS, MEMORY_UNSUPPORTED),
                                      (memory_zone_parser(), ZONE_KEYS, ZONE_UNSUPPORTED)]:
        assert set(parser.known) | set(parser.unsupported) == set(keys)
        assert set(parser.unsupported) == set(unsupported)
        assert not set(parser.known) & set(parser.unsupported)


UNSUPPORTED_VM_KEYS = (
    [("--cpus", "boot=1", key, "boot") for key in CPUS_UNSUPPORTED]
    + [("--memory", "size=32M", key, "size, shared") for key in MEMORY_UNSUPPORTED]
    + [("--memory-zone", "id=z,size=2M", key, "id, size, shared") for key in ZONE_UNSUPPORTED]
)


def vm_option(option: str, text: str) -> VmConfig:
    """``chmig run OPTION TEXT``'s configuration."""
    return {"--cpus": lambda: VmConfig.from_args(text, None, [], None),
            "--memory": lambda: VmConfig.from_args(None, text, [], None),
            "--memory-zone": lambda: VmConfig.from_args(None, None, [text], None)}[option]()


@pytest.mark.parametrize(("option", "base", "key", "supported"), UNSUPPORTED_VM_KEYS,
                         ids=[f"{o}-{k}" for o, _, k, _ in UNSUPPORTED_VM_KEYS])
def test_unsupported_vm_keys_are_refused_by_name(option: str, base: str, key: str, supported: str) -> None:
    line = refused(lambda: vm_option(option, f"{base},{key}=1"), kind=OptionError)
    assert line == f"{option}: {key} is a Cloud Hypervisor option that chmig does not support; supported: {supported}"
    refused(lambda: vm_option(option, f"{base},{key}"), f"{key} is a Cloud Hypervisor option", kind=OptionError)
    vm_option(option, f"{base},{key}=")  # empty: CH's "not given", which is what chmig does


def test_vm_options_as_cloud_hypervisor_reads_them() -> None:
    """config.rs defaults: boot 1, size 512M, a zone's size 512M; a zone needs its id."""
    config = VmConfig.from_args(None, None, [], None)
    assert config.cpus == 1 and [(z.id, z.size, z.shared) for z in config.zones] == [("mem0", 512 << 20, True)]
    config = VmConfig.from_args("boot=2,max=", 'size="64M",shared=off', ["id=z1", "id=z2,size=2M,shared=on"], None)
    assert config.cpus == 2
    assert [(z.id, z.size, z.shared) for z in config.zones] == [
        ("mem0", 64 << 20, False), ("z1", 512 << 20, True), ("z2", 2 << 20, True)]
    assert [z.id for z in VmConfig.from_args(None, "size=0", ["id=z,size=4M"], None).zones] == ["z"]
    refused(lambda: VmConfig.from_args(None, None, ["size=2M"], None), "--memory-zone: id is required")
    refused(lambda: VmConfig.from_args(None, None, ["id=,size=2M"], None), "--memory-zone: id is required")
    refused(lambda: VmConfig.from_args("boot=4294967296", None, [], None), "boot=", kind=OptionError)


@pytest.mark.parametrize(("spec", "mode", "path"), [
    ("null", "null", None), ("off", "off", None), ("tty", "tty", None),
    ("file=/tmp/serial.log", "file", "/tmp/serial.log"),
    ('file="/tmp/a,b.log"', "file", "/tmp/a,b.log"),
    ("off=ignored", "off", None),  # a valueless flag ignores what follows '=' (lib.rs)
    ("tty,null", "tty", None),  # several modes: CH's order decides (off, pty, tty, null, file, socket)
    ("null,file=/tmp/x", "null", None),
])
def test_serial_modes(spec: str, mode: str, path: str | None) -> None:
    """config.rs CommonConsoleConfig::parse (SerialConfig)."""
    assert parse_serial(spec) == (mode, path)


@pytest.mark.parametrize(("spec", "words"), [
    ("pty", ("--serial: pty is a Cloud Hypervisor option that chmig does not support", "supported: off, tty")),
    ("socket=/tmp/s", ("--serial: socket is a Cloud Hypervisor option that chmig does not support",)),
    ("socket=", ("socket is a Cloud Hypervisor option",)),
    ("file=", ("--serial: file needs a path",)),
    ("", ("--serial: expected off, null, tty or file=PATH",)),
    ("telnet", ("--serial: unknown option 'telnet'",)),
])
def test_serial_refusals(spec: str, words: tuple[str, ...]) -> None:
    refused(lambda: Serial(spec), *words)


def test_serial_null_discards_and_file_writes(tmp_path: Path) -> None:
    serial = Serial("null")
    for byte in b"hello\n":
        serial.put(byte)
    serial.close()
    out = tmp_path / "serial.log"
    serial = Serial(f"file={out}")
    for byte in b"hello\n":
        serial.put(byte)
    serial.close()
    assert out.read_bytes() == b"hello\n"
    assert Serial().mode == "null"  # CH's default


# ---------------------------------------------------------------------------------------------
# send-migration: CH's parse + validate, rule by rule
# ---------------------------------------------------------------------------------------------


def test_send_migration_defaults_and_values() -> None:
    """mod.rs test_vm_send_migration_data_parse, its accepted strings."""
    options = SendOptions.parse("destination_url=unix:/tmp/migrate.sock,local=on,downtime_ms=200,timeout_s=3600,"
                                "timeout_strategy=cancel")
    assert (options.local, options.downtime_ms, options.timeout_s, options.timeout_strategy, options.connections) \
        == (True, 200, 3600, "cancel", 1)
    options = SendOptions.parse("destination_url=tcp:192.168.1.1:8080")
    assert (options.local, options.preserve_source, options.downtime_ms, options.timeout_s,
            options.timeout_strategy, options.connections, options.tls_dir, options.memory_mode) == \
        (False, False, 300, 3600, "cancel", 1, None, "precopy")
    assert SendOptions.parse("destination_url=tcp:[2001:db8::1]:8080").destination_url == "tcp:[2001:db8::1]:8080"
    assert SendOptions.parse("destination_url=tcp:destination.example:8080").connections == 1
    assert SendOptions.parse("destination_url=tcp:1.2.3.4:5,memory_mode=postcopy").memory_mode == "postcopy"
    assert SendOptions.parse("destination_url=tcp:1.2.3.4:5,timeout_strategy=IGNORE").timeout_strategy == "ignore"
    options = SendOptions.parse("destination_url=unix:/tmp/sock,local=on,preserve_source=on")
    assert options.local and options.preserve_source
    # local= is off (an empty value is "not given"), not on.
    assert SendOptions.parse("destination_url=unix:/tmp/sock,local=").local is False
    assert SendOptions.parse("destination_url=tcp:1.2.3.4:5,connections=128").connections == 128


SEND_REFUSALS = [
    ("local=on,downtime_ms=200", "destination_url is required"),
    ("destination_url=,local=on", "destination_url is required"),
    ("destination_url=tcp:192.168.1.1:8080,downtime_ms=0", "downtime_ms must be non-zero"),
    ("destination_url=unix:/tmp/sock,timeout_s=0", "timeout_s must be non-zero"),
    ("destination_url=tcp:192.168.1.1:8080,connections=0", "connections must be non-zero"),
    ("destination_url=tcp:192.168.1.1:8080,connections=129", "connections must not exceed 128."),
    ("destination_url=unix:/tmp/sock,unknown_field=foo", "unknown option 'unknown_field'"),
    ("destination_url=unix:/tmp/sock,local=yes", "local='yes': expected on, off, true or false"),
    ("destination_url=tcp:192.168.1.1:8080,timeout_strategy=invalid", "expected cancel or ignore"),
    ("destination_url=tcp:192.168.1.1:8080,memory_mode=lazy", "expected precopy or postcopy"),
    ("destination_url=file:///tmp/migration", "destination_url 'file:///tmp/migration': unknown scheme 'file'"),
    ("destination_url=tcp:192.168.1.1", "missing port"),
    ("destination_url=tcp:[2001:db8::1]", "missing port"),
    ("destination_url=unix:", "destination_url 'unix:'"),
    ("destination_url=tcp:192.168.1.1:8080,local=on", "local option is only supported with UNIX sockets."),
    ("destination_url=unix:/tmp/sock,local=on,connections=2",
     "UNIX sockets and connections option cannot be used at the same time."),
    ("destination_url=unix:/tmp/sock,connections=2",
     "UNIX sockets and connections option cannot be used at the same time."),
    ("destination_url=unix:/tmp/sock,tls_dir=/tmp", "UNIX sockets and TLS encryption cannot be used at the same time."),
    ("destination_url=tcp:192.168.1.1:8080,tls_dir=/nonexistent", "invalid TLS configuration for send-migration"),
    ("destination_url=tcp:192.168.1.1:8080,preserve_source=on",
     "preserve_source option is only supported with the local option."),
    ("destination_url=unix:/tmp/sock,preserve_source=on",
     "preserve_source option is only supported with the local option."),
    ("destination_url=unix:/tmp/sock,local=on,memory_mode=postcopy",
     "memory_mode=postcopy and local options are mutually exclusive."),
    ("destination_url=tcp:192.168.1.1:8080,memory_mode=postcopy,connections=4",
     "memory_mode=postcopy currently requires a single connection (connections=1)"),
    # chmig's extension: Fault connections, for postcopy only, 1..16.
    ("destination_url=tcp:1.2.3.4:5,fault_connections=2", "fault_connections (a chmig extension) is only for "
     "memory_mode=postcopy"),
    ("destination_url=tcp:1.2.3.4:5,memory_mode=postcopy,fault_connections=0", "fault_connections must be 1..16"),
    ("destination_url=tcp:1.2.3.4:5,memory_mode=postcopy,fault_connections=17", "fault_connections must be 1..16"),
]


@pytest.mark.parametrize(("text", "words"), SEND_REFUSALS, ids=[w[:40] for _, w in SEND_REFUSALS])
def test_send_migration_refusals(text: str, words: str) -> None:
    """mod.rs VmSendMigrationData::parse/validate: each rule, in CH's words; none names a ``--local`` flag."""
    line = refused(lambda: SendOptions.parse(text), "send-migration: ", words)
    assert "--local" not in line


def test_send_migration_tls_dir_must_hold_the_client_files(tmp_path: Path) -> None:
    """mod.rs validate_tls_dir(Client): ca-cert.pem, client-cert.pem, client-key.pem."""
    refused(lambda: SendOptions.parse(f"destination_url=tcp:1.2.3.4:5,tls_dir={tmp_path}"),
            "invalid TLS configuration for send-migration")
    for name in ("ca-cert.pem", "client-cert.pem", "client-key.pem"):
        (tmp_path / name).write_text("test")
    assert SendOptions.parse(f"destination_url=tcp:1.2.3.4:5,tls_dir={tmp_path}").tls_dir == str(tmp_path)


# ---------------------------------------------------------------------------------------------
# receive-migration
# ---------------------------------------------------------------------------------------------


def test_receive_migration_values() -> None:
    """mod.rs test_vm_receive_migration_data_parse, its accepted strings."""
    assert ReceiveOptions.parse("receiver_url=tcp:192.168.1.1:8080").receiver_url == "tcp:192.168.1.1:8080"
    assert ReceiveOptions.parse("receiver_url=tcp:[2001:db8::1]:8080").memory_mode == "precopy"
    assert ReceiveOptions.parse("receiver_url=unix:/tmp/ch=migrate.sock").receiver_url == \
        "unix:/tmp/ch=migrate.sock"
    options = ReceiveOptions.parse("receiver_url=unix:/tmp/sock,memory_mode=postcopy,prefetch=page")
    assert (options.memory_mode, options.prefetch) == ("postcopy", "page")
    # The fields chmig cannot use, given empty, are CH's "not given".
    assert ReceiveOptions.parse("receiver_url=unix:/tmp/sock,vfio_fds=,iommufd_fd=,zone_updates=").tls_dir is None


RECEIVE_REFUSALS = [
    ("memory_mode=postcopy", "invalid syntax: receiver_url is required"),
    # CH's SYNTAX shows a bare <receiver_url>, but its parser takes the URL for an unknown key: so does chmig.
    ("tcp:127.0.0.1:6000", "unknown option 'tcp:127.0.0.1:6000'", "write receiver_url=<url>"),
    ("unix:/tmp/sock", "unknown option 'unix:/tmp/sock'", "write receiver_url=<url>"),
    ("receiver_url=file:///tmp/migration", "unknown scheme 'file'"),
    ("receiver_url=tcp:192.168.1.1", "missing port"),
    ("receiver_url=unix:/tmp/sock,tls_dir=/tmp", "UNIX sockets and TLS encryption cannot be used at the same time"),
    ("receiver_url=tcp:1.2.3.4:5,tls_dir=/nonexistent", "Invalid TLS configuration for receive-migration"),
    ("receiver_url=unix:/tmp/sock,vfio_fds=[vfio0@5]",
     "vfio_fds is a Cloud Hypervisor option that chmig does not support (chmig's VMs have no VFIO devices)"),
    ("receiver_url=unix:/tmp/sock,iommufd_fd=9", "iommufd_fd is a Cloud Hypervisor option that chmig does not"),
    ("receiver_url=unix:/tmp/sock,zone_updates=[zone1@1]", "zone_updates is a Cloud Hypervisor option"),
    ("receiver_url=unix:/tmp/sock,zone_updates=[]", "zone_updates is a Cloud Hypervisor option"),
    ("receiver_url=unix:/tmp/sock,memory_mode=bogus", "expected precopy or postcopy"),
    ("receiver_url=unix:/tmp/sock,prefetch=1M", "prefetch (a chmig extension) is only for memory_mode=postcopy"),
    ("receiver_url=unix:/tmp/sock,memory_mode=postcopy,prefetch=3M", "prefetch must be page, off or"),
]


@pytest.mark.parametrize(("text", "words"), [(t, w) for t, *w in RECEIVE_REFUSALS],
                         ids=[w[0][:40] for _, *w in RECEIVE_REFUSALS])
def test_receive_migration_refusals(text: str, words: list[str]) -> None:
    refused(lambda: ReceiveOptions.parse(text), "receive-migration: ", *words)


# ---------------------------------------------------------------------------------------------
# The bodies ch-remote sends, byte for byte
# ---------------------------------------------------------------------------------------------


BODIES = [
    (send_migration_body, "destination_url=tcp:192.168.1.1:8080,downtime_ms=150",
     '{"destination_url":"tcp:192.168.1.1:8080","local":false,"preserve_source":false,"downtime_ms":150,'
     '"timeout_s":3600,"timeout_strategy":"Cancel","connections":1,"tls_dir":null,"memory_mode":"Precopy"}'),
    (send_migration_body, "destination_url=unix:/tmp/s,local=on,preserve_source=true,timeout_strategy=Ignore",
     '{"destination_url":"unix:/tmp/s","local":true,"preserve_source":true,"downtime_ms":300,'
     '"timeout_s":3600,"timeout_strategy":"Ignore","connections":1,"tls_dir":null,"memory_mode":"Precopy"}'),
    (send_migration_body, "destination_url=tcp:1.2.3.4:5,memory_mode=postcopy,timeout_s=60",
     '{"destination_url":"tcp:1.2.3.4:5","local":false,"preserve_source":false,"downtime_ms":300,'
     '"timeout_s":60,"timeout_strategy":"Cancel","connections":1,"tls_dir":null,"memory_mode":"Postcopy"}'),
    # chmig's extension appears only when given, after CH's fields.
    (send_migration_body, "destination_url=tcp:1.2.3.4:5,memory_mode=postcopy,fault_connections=4",
     '{"destination_url":"tcp:1.2.3.4:5","local":false,"preserve_source":false,"downtime_ms":300,'
     '"timeout_s":3600,"timeout_strategy":"Cancel","connections":1,"tls_dir":null,"memory_mode":"Postcopy",'
     '"fault_connections":4}'),
    (send_migration_body, "destination_url=tcp:1.2.3.4:5,connections=8",
     '{"destination_url":"tcp:1.2.3.4:5","local":false,"preserve_source":false,"downtime_ms":300,'
     '"timeout_s":3600,"timeout_strategy":"Cancel","connections":8,"tls_dir":null,"memory_mode":"Precopy"}'),
    (receive_migration_body, "receiver_url=tcp:192.168.1.1:8080",
     '{"receiver_url":"tcp:192.168.1.1:8080","tls_dir":null,"memory_mode":"Precopy","vfio_fds":null,'
     '"iommufd_fd":null,"zone_updates":[]}'),
    (receive_migration_body, "receiver_url=unix:/tmp/sock,memory_mode=postcopy",
     '{"receiver_url":"unix:/tmp/sock","tls_dir":null,"memory_mode":"Postcopy","vfio_fds":null,'
     '"iommufd_fd":null,"zone_updates":[]}'),
    (receive_migration_body, "receiver_url=unix:/tmp/sock,memory_mode=postcopy,prefetch=512K",
     '{"receiver_url":"unix:/tmp/sock","tls_dir":null,"memory_mode":"Postcopy","vfio_fds":null,'
     '"iommufd_fd":null,"zone_updates":[],"prefetch":"512K"}'),
    (restore_body, "source_url=file:///snap",
     '{"source_url":"file:///snap","prefault":false,"memory_restore_mode":"Copy","net_fds":null,"vfio_fds":null,'
     '"iommufd_fd":null,"resume":false,"zone_updates":[]}'),
    (restore_body, "source_url=file:///snap,memory_restore_mode=ondemand,resume=true,net_fds=",
     '{"source_url":"file:///snap","prefault":false,"memory_restore_mode":"OnDemand","net_fds":null,'
     '"vfio_fds":null,"iommufd_fd":null,"resume":true,"zone_updates":[]}'),
    (snapshot_body, "file:///snap", '{"destination_url":"file:///snap"}'),
]


@pytest.mark.parametrize(("build", "text", "expected"), BODIES, ids=[t[:50] for _, t, _ in BODIES])
def test_bodies_are_serdes_compact_json(build: Any, text: str, expected: str) -> None:
    """ch-remote.rs: serde_json::to_string of the parsed struct (every field, in order, enums by variant)."""
    assert compact(build(text)) == expected


def test_bodies_read_back_as_what_was_parsed() -> None:
    for text in ("destination_url=tcp:1.2.3.4:5,connections=4,downtime_ms=10,timeout_strategy=ignore",
                 "destination_url=unix:/tmp/s,local=on,preserve_source=on",
                 "destination_url=tcp:1.2.3.4:5,memory_mode=postcopy,fault_connections=3"):
        parsed = SendOptions.parse(text)
        again = SendOptions.from_api(json.loads(compact(parsed.to_api())))
        assert again == parsed and again.to_api() == parsed.to_api()
    for text in ("receiver_url=tcp:1.2.3.4:5", "receiver_url=unix:/tmp/s,memory_mode=postcopy,prefetch=off"):
        parsed = ReceiveOptions.parse(text)
        assert ReceiveOptions.from_api(json.loads(compact(parsed.to_api()))) == parsed
    config = RestoreConfig.parse("source_url=file:///snap,memory_restore_mode=ondemand,resume=on")
    assert RestoreConfig.from_api(restore_body("source_url=file:///snap,memory_restore_mode=ondemand,resume=on")) \
        == config == RestoreConfig("file:///snap", False, ONDEMAND, True)
    assert snapshot_from_api(snapshot_body("file:///snap")) == "file:///snap"


# ---------------------------------------------------------------------------------------------
# The API side: CH's JSON as ch-remote sends it
# ---------------------------------------------------------------------------------------------


CH_RECEIVE_BODY = {"receiver_url": "unix:/tmp/sock", "tls_dir": None, "memory_mode": "Precopy", "vfio_fds": None,
                   "iommufd_fd": None, "zone_updates": []}


def test_receive_from_api_takes_ch_remotes_body() -> None:
    assert ReceiveOptions.from_api(CH_RECEIVE_BODY) == ReceiveOptions("unix:/tmp/sock")
    assert ReceiveOptions.from_api({"receiver_url": "unix:/tmp/sock"}) == ReceiveOptions("unix:/tmp/sock")
    # Empty lists and null are both "none" for the fields chmig cannot use.
    assert ReceiveOptions.from_api({**CH_RECEIVE_BODY, "vfio_fds": [], "zone_updates": None}).tls_dir is None
    options = ReceiveOptions.from_api({**CH_RECEIVE_BODY, "memory_mode": "Postcopy", "prefetch": "1M"})
    assert (options.memory_mode, options.prefetch) == ("postcopy", "1M")
    assert ReceiveOptions.from_api({**CH_RECEIVE_BODY, "memory_mode": "postcopy"}).memory_mode == "postcopy"


@pytest.mark.parametrize(("changes", "words"), [
    ({"vfio_fds": [{"id": "vfio0", "fd": None}]}, ("vfio_fds: chmig's VMs have no VFIO devices",)),
    ({"vfio_fds": "vfio0@5"}, ("vfio_fds: chmig's VMs have no VFIO devices",)),
    ({"iommufd_fd": 3}, ("iommufd_fd: chmig's VMs have no VFIO devices",)),
    ({"zone_updates": [{"id": "z", "host_numa_node": 0}]}, ("zone_updates: chmig does not place memory zones",)),
    ({"memory_mode": "POSTCOPY"}, ("'memory_mode' must be precopy or postcopy", '"Precopy" or "Postcopy"')),
    ({"memory_mode": None}, ("field 'memory_mode' must be a string, not null",)),
    ({"receiver_url": ["unix:/x"]}, ("field 'receiver_url' must be a string, not an array",)),
    ({"tls_dir": 5}, ("field 'tls_dir' must be a string, not an integer",)),
    ({"receiver_url": "unix:/tmp/sock", "tls_dir": "/tmp"}, ("UNIX sockets and TLS encryption",)),
    ({"fault_connections": 2}, ("unknown field 'fault_connections'", "allowed: receiver_url, tls_dir, "
                                "memory_mode, vfio_fds, iommufd_fd, zone_updates, prefetch")),
])
def test_receive_from_api_refusals(changes: dict, words: tuple[str, ...]) -> None:
    line = refused(lambda: ReceiveOptions.from_api({**CH_RECEIVE_BODY, **changes}), *words)
    assert not line.startswith("vm.receive-migration"), line  # the API's error chain names the route
    refused(lambda: ReceiveOptions.from_api({k: v for k, v in CH_RECEIVE_BODY.items() if k != "receiver_url"}),
            "missing field 'receiver_url'", kind=JsonBodyError)


CH_SEND_BODY = json.loads(compact(send_migration_body("destination_url=tcp:1.2.3.4:5")))


def test_send_from_api_takes_ch_remotes_body_and_chmigs_leniency() -> None:
    assert SendOptions.from_api(CH_SEND_BODY) == SendOptions("tcp:1.2.3.4:5")
    assert SendOptions.from_api({"destination_url": "tcp:1.2.3.4:5"}) == SendOptions("tcp:1.2.3.4:5")
    lenient = SendOptions.from_api({"destination_url": "tcp:1.2.3.4:5", "timeout_strategy": "ignore",
                                    "memory_mode": "postcopy", "fault_connections": 4})
    assert (lenient.timeout_strategy, lenient.memory_mode, lenient.fault_connections) == ("ignore", "postcopy", 4)


@pytest.mark.parametrize(("changes", "words"), [
    ({"timeout_strategy": "CANCEL"}, ("'timeout_strategy' must be cancel or ignore", '"Cancel" or "Ignore"')),
    ({"timeout_strategy": "pray"}, ("cancel or ignore",)),
    ({"memory_mode": 1}, ("field 'memory_mode' must be a string, not an integer",)),
    ({"memory_mode": "Lazy"}, ("'memory_mode' must be precopy or postcopy", "not 'Lazy'")),
    ({"local": None}, ("field 'local' must be a boolean, not null",)),
    ({"local": "on"}, ("field 'local' must be a boolean, not a string",)),
    ({"connections": 1.5}, ("field 'connections' must be an integer, not a number",)),
    ({"connections": True}, ("field 'connections' must be an integer, not a boolean",)),
    ({"connections": 0}, ("connections must be non-zero",)),
    ({"connections": 2**32}, ("'connections' is out of range",)),
    ({"downtime_ms": 0}, ("downtime_ms must be non-zero",)),
    ({"downtime_ms": 2**64}, ("'downtime_ms' is out of range",)),
    ({"timeout_s": -1}, ("'timeout_s' is out of range",)),
    ({"destination_url": "unix:/tmp/s", "connections": 2}, ("UNIX sockets and connections option",)),
    ({"preserve_source": True}, ("preserve_source option is only supported with the local option.",)),
    ({"local": True}, ("local option is only supported with UNIX sockets.",)),
    ({"prefetch": "1M"}, ("unknown field 'prefetch'", "allowed: destination_url, local, preserve_source")),
    ({"vfio_fds": None}, ("unknown field 'vfio_fds'",)),
])
def test_send_from_api_refusals(changes: dict, words: tuple[str, ...]) -> None:
    # No "vm.send-migration:" prefix: the API's error chain names the route already.
    line = refused(lambda: SendOptions.from_api({**CH_SEND_BODY, **changes}), *words)
    assert not line.startswith("vm.send-migration"), line
    assert "--local" not in line


@pytest.mark.parametrize("body", [None, [], "destination_url=tcp:1.2.3.4:5", 5])
def test_a_body_that_is_not_an_object(body: Any) -> None:
    refused(lambda: SendOptions.from_api(body), "the request body must be a JSON object", kind=JsonBodyError)
    refused(lambda: ReceiveOptions.from_api(body), "the request body must be a JSON object", kind=JsonBodyError)
    refused(lambda: RestoreConfig.from_api(body), "the request body must be a JSON object", kind=JsonBodyError)


def test_check_fields() -> None:
    fields = {"a": str, "n": int, "b": bool}
    assert check_fields({"a": "x", "n": 0}, fields, required=("a",)) == {"a": "x", "n": 0}
    refused(lambda: check_fields({"a": None}, fields, nullable=("a",), required=("a",)), "'a' must be a string")
    assert check_fields({"a": None}, fields, nullable=("a",)) == {"a": None}
    refused(lambda: check_fields({"\x00evil": 1}, fields), "unknown field '\\x00evil' (allowed: a, n, b)",
            kind=JsonBodyError)
    refused(lambda: check_fields({"b": 1}, fields), "field 'b' must be a boolean, not an integer")


# ---------------------------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value", "why"), [
    ("net_fds", "[net0@[3,4]]", "network devices"),
    ("vfio_fds", "[vfio0@5]", "VFIO devices"),
    ("iommufd_fd", "9", "iommufd"),
    ("zone_updates", "[zone1@1]", "NUMA"),
])
def test_restore_refuses_chs_keys_it_cannot_use_by_name(key: str, value: str, why: str) -> None:
    """config.rs RestoreConfig::parse: CH's whole key set; the four chmig cannot use, refused by name."""
    line = refused(lambda: RestoreConfig.parse(f"source_url=file:///snap,{key}={value}"), kind=OptionError)
    assert line.startswith(f"--restore: {key} is a Cloud Hypervisor option that chmig does not support (")
    assert why in line and line.endswith("; supported: source_url, prefault, memory_restore_mode, resume")
    assert RestoreConfig.parse(f"source_url=file:///snap,{key}=") == RestoreConfig("file:///snap")
    refused(lambda: RestoreConfig.from_api({"source_url": "file:///snap", key: [1] if key != "iommufd_fd" else 9}),
            f"{key}: ", why)


def test_restore_from_api() -> None:
    assert RestoreConfig.from_api(json.loads(compact(restore_body("source_url=file:///snap")))) == \
        RestoreConfig("file:///snap", False, COPY, False)
    assert RestoreConfig.from_api({"source_url": "file:///snap", "memory_restore_mode": "ondemand"}).\
        memory_restore_mode == ONDEMAND
    refused(lambda: RestoreConfig.from_api({"source_url": "file:///snap", "memory_restore_mode": "ONDEMAND"}),
            "copy or ondemand", '"Copy" or "OnDemand"', kind=JsonBodyError)
    refused(lambda: RestoreConfig.from_api({"source_url": "file:///snap", "zone_updates": None, "x": 1}),
            "unknown field 'x'", kind=JsonBodyError)


# ---------------------------------------------------------------------------------------------
# SYNTAX strings: CH's text, then chmig's additions
# ---------------------------------------------------------------------------------------------


def test_syntax_strings_are_chs_text_with_chmigs_extensions_marked() -> None:
    assert SEND_MIGRATION_SYNTAX.startswith(
        'VM send migration parameters "destination_url=<url>[,local=on|off,preserve_source=on|off,'
        "downtime_ms=<milliseconds>,timeout_s=<seconds>,timeout_strategy=cancel|ignore,connections=<amount>,"
        'tls_dir=<path>,memory_mode=precopy|postcopy]" (chmig extensions: "[,fault_connections=<amount>]"')
    assert '"memory_mode=hybrid[,postcopy_after_s=<seconds>]"' in SEND_MIGRATION_SYNTAX
    assert RECEIVE_MIGRATION_SYNTAX.startswith(
        'VM receive migration parameters "<receiver_url>" or "receiver_url=<url>[,tls_dir=<path>]'
        "[,memory_mode=precopy|postcopy][,vfio_fds=<list_of_vfio_ids_with_their_associated_fd>][,iommufd_fd=<fd>]"
        '[,zone_updates=[<id@host_numa_node>]]" (chmig extensions: "[,prefetch=<size>|page|off]"')
    assert RESTORE_SYNTAX.startswith(
        'Restore from a VM snapshot. \nRestore parameters "source_url=<source_url>,prefault=on|off,'
        "memory_restore_mode=copy|ondemand,net_fds=<list_of_net_ids_with_their_associated_fds>,")
    assert "`id@host_numa_node`\n(chmig: " in RESTORE_SYNTAX
    assert SNAPSHOT_SYNTAX == "<destination_url>"


# ---------------------------------------------------------------------------------------------
# The real thing: a chmig VMM over its API socket, and the command line
# ---------------------------------------------------------------------------------------------


def test_api_takes_ch_remotes_bodies_end_to_end(procs: Processes, tmp_path: Path) -> None:
    """ch-remote's receive body (``vfio_fds``/``iommufd_fd`` null, ``zone_updates`` empty) and send body, as
    sent, migrate a VM; the same receive body with any of those fields given is refused 400 by name."""
    source = procs.run("--cpus", "boot=1", "--memory", "size=32M", "--workload", "counter")
    empty = procs.run()
    sock = tmp_path / "migrate.sock"
    for field, value in [("vfio_fds", [{"id": "vfio0", "fd": None}]), ("iommufd_fd", 3),
                         ("zone_updates", [{"id": "z", "host_numa_node": 0}])]:
        body = {**receive_migration_body(f"receiver_url=unix:{sock}"), field: value}
        with pytest.raises(ApiError) as caught:
            empty.call("PUT", "vm.receive-migration", body)
        assert caught.value.status == 400 and f"{field}: chmig" in str(caught.value), str(caught.value)
    body = receive_migration_body(f"receiver_url=unix:{sock}")
    receiving = BackgroundCall(empty, "PUT", "vm.receive-migration", body)
    receiving.wait_for_file(sock)
    source.call("PUT", "vm.send-migration", send_migration_body(f"destination_url=unix:{sock}"), timeout=90)
    assert receiving.result(60) is None
    assert empty.info()["state"] == "Running"


def chmig(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chmig", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("args", "words"), [
    (("--cpus", "boot=1,max=4"), ("--cpus: max is a Cloud Hypervisor option that chmig does not support",
                                  "supported: boot")),
    (("--memory", "size=32M,hugepages=on"), ("--memory: hugepages is a Cloud Hypervisor option",)),
    (("--memory", "size=32M", "--memory-zone", "id=z,size=2M,host_numa_node=0"),
     ("--memory-zone: host_numa_node is a Cloud Hypervisor option",)),
    (("--cpus", "boot"), ("--cpus: invalid syntax",)),
])
def test_run_refuses_unsupported_keys_in_one_line(tmp_path: Path, args: tuple[str, ...],
                                                  words: tuple[str, ...]) -> None:
    done = chmig("run", "--api-socket", str(tmp_path / "api.sock"), "--serial", "off", *args)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "api.sock").exists()


def test_bodies_match_the_recorded_ch_remote_requests() -> None:
    """The api helper's fixtures (tests/ch_remote_requests.py), written from ch-remote's source independently of
    apiconfig.py: every body a supported verb sends is the body apiconfig builds from the same argument."""
    from .ch_remote_requests import SUPPORTED

    builders = {"send-migration": send_migration_body, "receive-migration": receive_migration_body,
                "restore": restore_body, "snapshot": snapshot_body}
    values = {"PORT": "6000", "PATH": "/tmp/chmig-x.sock", "DIR": "/tmp/chmig-snapshot"}
    checked = 0
    for recorded in SUPPORTED:
        if recorded.verb not in builders:
            continue
        argument = recorded.argv[1]
        for key, value in values.items():
            argument = argument.replace("{" + key + "}", value)
        assert compact(builders[recorded.verb](argument)).encode() == recorded.render(**values)[3], recorded.argv
        checked += 1
    assert checked >= 8
