"""docs/usage.md works as written: its ```sh blocks, run in order as one script, and it shows every command.

The script runs in a fresh empty directory with the venv's ``bin`` first on ``PATH`` (so ``chmig`` is this
checkout's), under ``set -euo pipefail``: any failing command fails the test, and the test shows the
script's whole output.  A ``trap`` ends any background job the doc left behind, and the test then checks
that no process of the script's session is left.  As root, the script runs in a network namespace of its own
(loopback only), so the doc's fixed TCP ports cannot collide with another test run on this machine.

The completeness check reads the commands from the parser itself (``chmig.cli.build_parser``) and the remote
verbs from ``chmig.remote.VERBS``, so a command added later fails it until the doc shows it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chmig.cli import build_parser
from chmig.remote import VERBS

from .conftest import requires_kvm

DOC = Path(__file__).resolve().parent.parent / "docs" / "usage.md"


#: Forms of a command that the doc must show besides the bare command (each a regular expression matched
#: against the ```sh blocks): the variants the issue names.
REQUIRED_FORMS = {
    "run: boot a VM": r"chmig run [^\n]*--memory size=\S+",
    "run: an empty VMM": r"chmig run --api-socket \S+ &",
    "run --restore": r"chmig run [^\n]*--restore source_url=file://",
    "receive: precopy": r"chmig receive --listen tcp:\S+ --api-socket",
    "receive --memory-mode postcopy": r"chmig receive [^\n]*--memory-mode postcopy",
    "send-migration connections=": r"send-migration destination_url=tcp:\S+,connections=\d",
    "send-migration memory_mode=postcopy": r"send-migration destination_url=\S+,memory_mode=postcopy",
    "send-migration local=on": r"send-migration destination_url=unix:\S+,local=on",
    "shared memory": r"--memory size=\S+,shared=on",
    "snapshot file://": r"snapshot file://",
    "restore source_url=file://": r"remote [^\n]* restore source_url=file://",
    "offload restore --ondemand": r"offload restore [^\n]*--ondemand",
}

#: The whole doc must run well within this (it takes a few seconds; the suite's budget is tight).
SCRIPT_TIMEOUT_S = 90

_FENCE = re.compile(r"^```sh[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def sh_blocks(text: str) -> list[str]:
    """The ```sh blocks of ``text``, in order."""
    return _FENCE.findall(text)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse offers no public way to list sub-commands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def expected_commands() -> set[str]:
    """Every command a user can type: ``run``, ``remote VERB`` for every verb, ``offload MODE`` ..."""
    commands: set[str] = set()
    for name, sub in _subcommands(build_parser()).items():
        nested = set(_subcommands(sub))
        if name == "remote":
            nested |= {verb.name for verb in VERBS}
        if nested:
            commands.update(f"{name} {child}" for child in nested)
        else:
            commands.add(name)
    return commands


def shown_commands(script: str) -> set[str]:
    """The commands ``script`` runs: ``chmig``'s first word naming a command, then the first naming one of
    its sub-commands (options and their values, socket paths ... are skipped)."""
    tree = {name: set(_subcommands(sub)) for name, sub in _subcommands(build_parser()).items()}
    tree["remote"] |= {verb.name for verb in VERBS}
    script = script.replace("\\\n", " ")
    shown: set[str] = set()
    for match in re.finditer(r"(?<![\w.-])chmig((?:[ \t]+[^\s;&|()]+)*)", script):
        words = match.group(1).split()
        command = next((word for word in words if word in tree), None)
        if command is None:
            continue
        rest = words[words.index(command) + 1:]
        child = next((word for word in rest if word in tree[command]), None)
        if tree[command] and child is not None:
            shown.add(f"{command} {child}")
        elif not tree[command]:
            shown.add(command)
    return shown


def test_doc_shows_every_command() -> None:
    script = "\n".join(sh_blocks(DOC.read_text()))
    expected, shown = expected_commands(), shown_commands(script)
    missing = sorted(expected - shown)
    assert not missing, f"docs/usage.md has no ```sh example of: {', '.join(missing)}"
    forms = [name for name, pattern in REQUIRED_FORMS.items() if not re.search(pattern, script)]
    assert not forms, f"docs/usage.md has no ```sh example of: {', '.join(forms)}"


def test_shown_commands_reads_the_forms_the_doc_uses() -> None:
    """The completeness check's reader on the shapes of command line the doc has."""
    script = ("chmig -v run --api-socket s.sock &\n"
              "until chmig remote --api-socket s.sock ping >/dev/null 2>&1; do sleep 0.1; done\n"
              "x=$(chmig remote --api-socket s.sock -q send-migration destination_url=unix:m.sock)\n"
              "chmig offload restore --socket r.sock \\\n  --input-dir d --resume\n"
              ".venv/bin/chmig demo && python -m chmig selfcheck\n"
              "chmig-like run; chmig --version\n")
    assert shown_commands(script) == {"run", "remote ping", "remote send-migration", "offload restore", "demo",
                                      "selfcheck"}


def _session_processes(session: int) -> list[str]:
    """Processes still in ``session`` (the script's): their pids and command lines."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == session and fields[0] != "Z":
            left.append(f"{entry.name}: {cmdline or stat[:stat.rindex(')') + 1]}")
    return left


def _own_network_namespace() -> list[str]:
    """A prefix that runs the script in a network namespace of its own with loopback up (root only), or []."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return []
    probe = subprocess.run(["unshare", "--net", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return []
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


#: Before the doc's blocks: stop at the first failing command and say which it was; on exit, end the
#: background jobs still running (the doc ends its own; this is for a failure midway) and reap them.
PREAMBLE = """\
set -euo pipefail
trap 'echo "usage.sh: line $LINENO: exit status $?: $BASH_COMMAND" >&2' ERR
trap 'status=$?; kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; exit $status' EXIT
"""


@requires_kvm
@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 30)
def test_usage_doc_runs_as_written(tmp_path: Path) -> None:
    blocks = sh_blocks(DOC.read_text())
    assert blocks, "docs/usage.md has no ```sh block"
    script = tmp_path / "usage.sh"
    script.write_text(PREAMBLE + "\n".join(f"# --- block {n}\n{block}" for n, block in enumerate(blocks, 1)))
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    output = tmp_path / "output.txt"
    begin = time.monotonic()
    with output.open("wb") as out:
        process = subprocess.Popen([*_own_network_namespace(), "bash", str(script)], cwd=work, env=env,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=SCRIPT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            left = _session_processes(process.pid)
            if left or status is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    elapsed = time.monotonic() - begin
    text = output.read_text(errors="replace")
    assert status is not None, f"docs/usage.md did not finish in {SCRIPT_TIMEOUT_S} s; its output:\n{text}"
    assert status == 0, (f"docs/usage.md failed (exit status {status}) after {elapsed:.1f} s; the script "
                         f"({script}, one '# --- block N' line before each block) said:\n{text}")
    assert not left, "processes left behind by docs/usage.md:\n" + "\n".join(left) + f"\nits output:\n{text}"
