"""The command line, as a user runs it: real subprocesses."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

SUBCOMMANDS = ("run", "remote", "receive", "offload", "walkthrough", "demo", "selfcheck")


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


def test_unimplemented_subcommand_says_so() -> None:
    result = chmig("walkthrough")
    assert result.returncode != 0
    assert "not implemented yet" in result.stderr


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
