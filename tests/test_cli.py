"""The command line, as a user runs it: real subprocesses."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

SUBCOMMANDS = ("run", "remote", "receive", "offload", "demo", "selfcheck")


def chmig(*args: str, timeout: float = 50) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chmig", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_the_subcommands() -> None:
    result = chmig("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name: str) -> None:
    result = chmig(name, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: chmig" in result.stdout


def test_help_offers_the_walkthrough_and_its_flows() -> None:
    assert "walkthrough" in chmig("--help").stdout
    flows = chmig("walkthrough", "--help").stdout
    for flow in ("precopy", "local", "postcopy", "offload-snapshot", "offload-restore"):
        assert flow in flows
    assert chmig("walkthrough").returncode == 2  # a flow must be named


def test_selfcheck_runs_a_full_exchange_over_loopback() -> None:
    result = chmig("selfcheck")
    assert result.returncode == 0, result.stderr
    for step in ("Start", "Config", "Memory", "State", "Complete"):
        assert f"-> {step}" in result.stdout
    assert "arrived intact" in result.stdout


def test_selfcheck_over_a_unix_socket(tmp_path) -> None:  # noqa: ANN001
    result = chmig("selfcheck", "--url", f"unix:{tmp_path}/sock")
    assert result.returncode == 0, result.stderr
    assert "arrived intact" in result.stdout


def test_bad_url_is_one_clear_line() -> None:
    result = chmig("selfcheck", "--url", "udp:1.2.3.4:5")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chmig selfcheck: error:"), result.stderr


# ---------------------------------------------------------------------------------------------
# cloud-hypervisor's command line: -V, -v anywhere, --log-file, --log-format, one line for bad input
# ---------------------------------------------------------------------------------------------


def one_error_line(result: subprocess.CompletedProcess[str], prefix: str) -> str:
    """The single stderr line of a refused command (exit 2), never a usage block or a traceback."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{prefix}: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("argv", [("-V",), ("--version",), ("remote", "-V"), ("remote", "--version")])
def test_version(argv: tuple[str, ...]) -> None:
    from chmig import __version__

    result = chmig(*argv)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"chmig {__version__}\n"


def test_verbosity_and_log_file_after_the_subcommand(tmp_path) -> None:  # noqa: ANN001
    """``chmig run -v --log-file F`` is accepted (the old parser refused it); the error stays one line."""
    log = tmp_path / "run.log"
    result = chmig("run", "-v", "--log-file", str(log))
    line = one_error_line(result, "chmig run")
    assert "nothing to run" in line
    assert log.exists()


@pytest.mark.parametrize("argv, prefix, what", [
    (("run", "--frob"), "chmig run", "unrecognized arguments: --frob (see chmig run --help)"),
    (("run", "--log-format", "{nope}"), "chmig run",
     "unknown format token '{nope}'; known tokens: {boottime}, {wallclock}"),
    (("run", "--log-format", "{level"), "chmig run", "unterminated '{'"),
    (("run", "--log-format", "a}b"), "chmig run", "unmatched '}'"),
    (("--log-file", "/nonexistent/dir/chmig.log", "run"), "chmig run",
     "--log-file: cannot open /nonexistent/dir/chmig.log"),
    (("run", "--api-socket", "fd=abc"), "chmig run", "argument --api-socket: fd='abc'"),
    (("run", "--api-socket", "fd="), "chmig run", "fd= needs a file descriptor number"),
    (("run", "--api-socket", "path="), "chmig run", "path= needs a socket path"),
    (("run", "--api-socket", "path=/tmp/x.sock,mode=0600"), "chmig run",
     "unknown option 'mode'; known options: path, fd"),
    (("run", "--api-socket", ""), "chmig run", "needs a socket path"),
    (("receive",), "chmig receive", "the following arguments are required: --listen"),
    (("demo", "--cpus", "boot=two"), "chmig demo", "--cpus"),
    (("demo", "--memory", "size=1G,hugepages=on"), "chmig demo", "hugepages"),
    (("offload", "verify", "--input-dir", "/x", "--frob"), "chmig offload verify", "unrecognized arguments: --frob"),
    ((), "chmig", "the following arguments are required: COMMAND (see chmig --help)"),
])
def test_bad_command_lines_are_one_line(argv: tuple[str, ...], prefix: str, what: str) -> None:
    line = one_error_line(chmig(*argv), prefix)
    assert what in line, line


def test_a_usage_error_of_a_handler_is_exit_2() -> None:
    """Not only argparse's complaints: a UsageError raised once running (a bad --memory) is bad input too."""
    line = one_error_line(chmig("run", "--memory", "size=banana", "--serial", "off"), "chmig run")
    assert "banana" in line


def test_a_bind_error_is_one_usage_line(tmp_path) -> None:  # noqa: ANN001
    line = one_error_line(chmig("run", "--api-socket", "path=/nonexistent/dir/x.sock", "--log-file",
                                str(tmp_path / "log")), "chmig run")
    assert "/nonexistent/dir/x.sock" in line


def test_log_format_tokens_render() -> None:
    """The tokens map to the record's fields; {{ }} are braces; the time fields agree with each other."""
    import logging
    import re

    from chmig.cli import LogFormat

    record = logging.LogRecord("chmig.test", logging.WARNING, __file__, 42, "hello %s", ("world",), None)
    record.threadName = "vcpu-0"
    text = LogFormat("{{{level}}} {levelchar} <{thread}> {location} -- {msg} [{pid}] "
                     "{wallclock} {glog} {year}-{month}-{day}T{hour}:{minute}:{second}.{micros}{offset}").format(record)
    assert text.startswith("{WARN} W <vcpu-0> tests/test_cli.py:42 -- hello world [")
    stamp = re.search(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{6})Z (\d{4} \d\d:\d\d:\d\d\.\d{6}) "
                      r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{6})\+00:00$", text)
    assert stamp, text
    assert stamp.group(8) == f"{stamp.group(2)}{stamp.group(3)} {stamp.group(4)}:{stamp.group(5)}:" \
                             f"{stamp.group(6)}.{stamp.group(7)}"
    assert stamp.groups()[:7] == stamp.groups()[8:], text
    boot = LogFormat("{boottime}s").format(record)
    assert re.fullmatch(r" *\d+\.\d{6}s", boot) and len(boot) == 11, boot
