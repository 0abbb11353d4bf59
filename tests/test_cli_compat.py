"""chmig's command line as a Cloud Hypervisor user drives it: real ``chmig run``/``remote`` subprocesses.

``--api-socket path=|fd=|PATH`` really serving, ``--log-format`` and ``-v``
before and after the subcommand in a real log, ``chmig remote`` built like
``ch-remote`` (its verbs, their ``about`` texts and syntax strings), bad input
as one line with exit 2 (an API failure: exit 1), and the progress and
"listening" lines of a real migration between two chmig processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from chmig import __version__, apiconfig
from chmig.harness import VmmProcess, wait_api

from .conftest import Processes, requires_kvm
from .proxy import ThrottledProxy

pytestmark = pytest.mark.timeout(120)

VM_ARGS = ("--cpus", "boot=1", "--memory", "size=32M", "--workload", "verify,dirty_percent=10")
#: A precopy of a few seconds: the first iteration takes ~1.5 s on the slow link, then the downtime goal no
#: iteration meets makes it iterate until timeout_s, and finish anyway.
SLOW_SEND = "downtime_ms=1,timeout_s=3,timeout_strategy=ignore"
SLOW_LINK = 24 << 20

#: ``ch-remote``'s verbs that chmig serves, with their ``about`` texts (cloud-hypervisor/src/bin/ch-remote.rs,
#: ``get_cli_commands_sorted``), and chmig's own verbs (cancel-migration, migration-start-postcopy); in ch-remote's sorted order.
CH_REMOTE_VERBS = {
    "boot": "Boot a created VM",
    "cancel-migration": None,
    "delete": "Delete a VM",
    "info": "Info on the VM",
    "migration-start-postcopy": None,
    "pause": "Pause the VM",
    "ping": "Ping the VMM to check for API server availability",
    "receive-migration": "Receive a VM migration",
    "restore": "Restore VM from a snapshot",
    "resume": "Resume the VM",
    "send-migration": "Initiate a VM migration",
    "shutdown": "Shutdown the VM",
    "shutdown-vmm": "Shutdown the VMM",
    "snapshot": "Create a snapshot from VM",
}
SYNTAX = {
    "receive-migration": apiconfig.RECEIVE_MIGRATION_SYNTAX,
    "restore": apiconfig.RESTORE_SYNTAX,
    "send-migration": apiconfig.SEND_MIGRATION_SYNTAX,
    "snapshot": apiconfig.SNAPSHOT_SYNTAX,
}


def chmig(*args: str, timeout: float = 100, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chmig", *args], capture_output=True, text=True, timeout=timeout,
                          **kwargs)  # type: ignore[call-overload]


def words(text: str) -> str:
    """``text`` with its whitespace runs as single spaces (help output wraps lines)."""
    return " ".join(text.split())


def one_error_line(result: subprocess.CompletedProcess[str], prefix: str, code: int = 2) -> str:
    lines = result.stderr.splitlines()
    assert result.returncode == code, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{prefix}: error: "), result.stderr
    return lines[0]


def spawn(tmp_path: Path, api: str, *args: str, pass_fds: tuple[int, ...] = ()) -> VmmProcess:
    """``chmig run ARGS`` whose API answers on ``api`` (however ARGS name its socket), logging to a file."""
    log = tmp_path / f"run-{time.monotonic_ns()}.log"
    proc = subprocess.Popen([sys.executable, "-m", "chmig", "run", *args, "--log-file", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, pass_fds=pass_fds)
    vmm = VmmProcess(proc, api, log)
    try:
        wait_api(vmm)
    except BaseException:
        vmm.stop()
        raise
    return vmm


def shut_down(vmm: VmmProcess) -> None:
    """``remote shutdown-vmm``, as a user ends it, and the process is gone."""
    try:
        result = chmig("remote", "--api-socket", vmm.api, "shutdown-vmm")
        assert result.returncode == 0, result.stderr
        assert vmm.wait_exit(30) == 0, vmm.tail()
    finally:
        vmm.stop()


# ---------------------------------------------------------------------------------------------
# --api-socket path=P | fd=N | P
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["path={}", "{}", 'path="{}"'])
def test_api_socket_by_path(tmp_path: Path, form: str) -> None:
    """``path=P``, a bare ``P`` and a quoted ``path="P"`` (Cloud Hypervisor's OptionParser dequotes) all serve on P."""
    api = str(tmp_path / "api.sock")
    vmm = spawn(tmp_path, api, "--api-socket", form.format(api))
    ping = json.loads(chmig("remote", "--api-socket", api, "ping").stdout)
    assert ping["version"] == __version__
    shut_down(vmm)
    assert not os.path.exists(api)


def test_api_socket_by_inherited_fd(tmp_path: Path) -> None:
    """``--api-socket fd=N``: the VMM serves on a listening socket it inherits (and creates no file ``fd=N``)."""
    api = str(tmp_path / "inherited.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(api)
    listener.listen()
    try:
        fd = listener.fileno()
        vmm = spawn(tmp_path, api, "--api-socket", f"fd={fd}", pass_fds=(fd,))
    finally:
        listener.close()  # the VMM holds its own copy
    assert json.loads(chmig("remote", "--api-socket", api, "ping").stdout)["version"] == __version__
    assert not list(Path.cwd().glob("fd=*")) and not (tmp_path / f"fd={fd}").exists()
    shut_down(vmm)


def test_fd_wins_over_path(tmp_path: Path) -> None:
    """Cloud Hypervisor's rule: with both ``fd=`` and ``path=``, the fd is used and the path left alone."""
    api = str(tmp_path / "inherited.sock")
    ignored = tmp_path / "ignored.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(api)
    listener.listen()
    try:
        fd = listener.fileno()
        vmm = spawn(tmp_path, api, "--api-socket", f"path={ignored},fd={fd}", pass_fds=(fd,))
    finally:
        listener.close()
    assert not ignored.exists()
    shut_down(vmm)


def test_api_socket_fd_that_is_not_a_socket(tmp_path: Path) -> None:
    """An fd that is a regular file, or not open at all: one usage line, exit 2 (no traceback, no hang)."""
    with open(tmp_path / "plain", "w") as plain:
        fd = plain.fileno()
        one_error_line(chmig("run", "--api-socket", f"fd={fd}", "--log-file", str(tmp_path / "a.log"),
                             pass_fds=(fd,)), "chmig run")
    one_error_line(chmig("run", "--api-socket", "fd=999", "--log-file", str(tmp_path / "b.log")), "chmig run")


def test_event_monitor_bad_values_are_one_line(tmp_path: Path) -> None:
    """``--event-monitor`` is stored raw by the command line and refused by the VMM: still one line, exit 2."""
    api = str(tmp_path / "api.sock")
    for value in ("bogus", "path=/nonexistent/dir/events.json", "fd=999"):
        line = one_error_line(chmig("run", "--api-socket", api, "--event-monitor", value), "chmig run")
        assert "--event-monitor" in line, line
        assert not os.path.exists(api)


# ---------------------------------------------------------------------------------------------
# --serial: null by default
# ---------------------------------------------------------------------------------------------


@requires_kvm
@pytest.mark.parametrize("serial, shown", [((), False), (("--serial", "null"), False), (("--serial", "tty"), True)])
def test_serial_is_null_by_default(tmp_path: Path, serial: tuple[str, ...], shown: bool) -> None:
    """Cloud Hypervisor's default: the guest's console goes nowhere unless asked (tty proves it has something)."""
    api = str(tmp_path / "api.sock")
    vmm = spawn(tmp_path, api, "--api-socket", api, *VM_ARGS, *serial)
    try:
        vmm.wait_rounds(2)
        assert chmig("remote", "--api-socket", api, "shutdown-vmm").returncode == 0
        assert vmm.wait_exit(30) == 0, vmm.tail()
        assert vmm.proc.stdout is not None
        output = vmm.proc.stdout.read()  # the log goes to its file: only the guest's console can be here
    finally:
        vmm.stop()
    assert bool(output) == shown, output[:500]


def test_bad_serial_is_one_line(tmp_path: Path) -> None:
    line = one_error_line(chmig("run", *VM_ARGS, "--serial", "pty"), "chmig run")
    assert "--serial" in line, line
    # An empty VMM checks it too, before it serves: the VM it receives or restores would need it.
    line = one_error_line(chmig("run", "--api-socket", str(tmp_path / "api.sock"), "--serial",
                                "file=/nonexistent/dir/serial.log"), "chmig run")
    assert "/nonexistent/dir/serial.log" in line, line


def test_a_listen_address_that_cannot_be_bound_is_one_usage_line(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        line = one_error_line(chmig("receive", "--listen", f"tcp:127.0.0.1:{port}"), "chmig receive")
        assert "in use" in line, line
    finally:
        taken.close()
    line = one_error_line(chmig("receive", "--listen", "unix:/nonexistent/dir/in.sock"), "chmig receive")
    assert "/nonexistent/dir/in.sock" in line, line


# ---------------------------------------------------------------------------------------------
# -v anywhere, --log-format, in a real VMM's log
# ---------------------------------------------------------------------------------------------


def test_log_format_and_verbosity_before_and_after_the_subcommand(tmp_path: Path) -> None:
    """``chmig -v run -v``: the two count together (debug); ``--log-format`` after the subcommand shapes the log."""
    api = str(tmp_path / "api.sock")
    log = tmp_path / "vmm.log"
    proc = subprocess.Popen([sys.executable, "-m", "chmig", "-v", "--log-file", str(log), "run", "-v",
                             "--api-socket", api, "--log-format", "[{levelchar}] {level} <{thread}> {location} {msg}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    vmm = VmmProcess(proc, api, log)
    wait_api(vmm)
    shut_down(vmm)
    lines = log.read_text().splitlines()
    assert lines, "nothing logged"
    pattern = re.compile(r"\[([EWID])\] (ERROR|WARN|INFO|DEBUG) <[^>]+> chmig/[a-z_]+\.py:\d+ ")
    shaped = [line for line in lines if pattern.match(line)]
    assert shaped and all(m.group(1) == m.group(2)[0] for m in map(pattern.match, shaped)), lines[:10]
    assert any(" DEBUG " in line for line in shaped), "-v before and -v after should make -vv (debug)"


def test_one_v_is_info_not_debug(tmp_path: Path) -> None:
    api = str(tmp_path / "api.sock")
    log = tmp_path / "vmm.log"
    proc = subprocess.Popen([sys.executable, "-m", "chmig", "run", "--api-socket", api, "-v", "--log-file", str(log),
                             "--log-format", "{level} {msg}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    vmm = VmmProcess(proc, api, log)
    wait_api(vmm)
    shut_down(vmm)
    text = log.read_text()
    assert "INFO " in text and "DEBUG " not in text, text[:2000]


# ---------------------------------------------------------------------------------------------
# chmig remote: ch-remote's verbs
# ---------------------------------------------------------------------------------------------


def test_remote_help_lists_exactly_the_supported_verbs_in_ch_remote_order() -> None:
    result = chmig("remote", "--help")
    assert result.returncode == 0, result.stderr
    listed = re.findall(r"^    ([a-z][a-z-]*)(?:\s|$)", result.stdout, re.MULTILINE)
    assert listed == list(CH_REMOTE_VERBS), listed
    text = words(result.stdout)
    for verb, about in CH_REMOTE_VERBS.items():
        if about is not None:
            assert f"{verb} {about}" in text, verb
    assert "ch-remote has no such verb" in text  # cancel-migration says it is chmig's own


@pytest.mark.parametrize("verb", sorted(CH_REMOTE_VERBS))
def test_each_verb_has_its_help_and_syntax(verb: str) -> None:
    result = chmig("remote", "--api-socket", "/nonexistent", verb, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: chmig remote {verb}")
    if verb in SYNTAX:
        assert words(SYNTAX[verb]) in words(result.stdout), result.stdout


@pytest.mark.parametrize("argv, prefix, what", [
    (("remote", "--api-socket", "/x", "frob"), "chmig remote", "invalid choice: 'frob'"),
    (("remote", "--api-socket", "/x", "add-disk", "path=/d"), "chmig remote", "invalid choice: 'add-disk'"),
    (("remote", "info"), "chmig remote", "the following arguments are required: --api-socket"),
    (("remote", "--api-socket", "/x"), "chmig remote", "the following arguments are required: VERB"),
    (("remote", "--api-socket", "/x", "info", "extra"), "chmig remote info", "unrecognized arguments: extra"),
    (("remote", "--api-socket", "/x", "send-migration"), "chmig remote send-migration",
     "the following arguments are required: send_migration_config"),
    (("remote", "--api-socket", "/x", "snapshot"), "chmig remote snapshot",
     "the following arguments are required: snapshot_config"),
    (("remote", "--api-socket", "/x", "send-migration", "destination_url=tcp:127.0.0.1:1,bogus=1"), "chmig remote",
     "unknown option 'bogus'"),
    (("remote", "--api-socket", "/x", "restore", "source_url=file:///x,frob=on"), "chmig remote",
     "unknown option 'frob'"),
])
def test_bad_remote_command_lines_are_one_line(argv: tuple[str, ...], prefix: str, what: str) -> None:
    line = one_error_line(chmig(*argv), prefix)
    assert what in line, line


def test_remote_api_failure_is_one_line_exit_1(tmp_path: Path) -> None:
    """No socket, or an action the VMM refuses (no VM to pause): one line, exit 1."""
    one_error_line(chmig("remote", "--api-socket", str(tmp_path / "none.sock"), "ping"), "chmig remote", code=1)
    api = str(tmp_path / "api.sock")
    vmm = spawn(tmp_path, api, "--api-socket", api)
    try:
        line = one_error_line(chmig("remote", "--api-socket", api, "pause"), "chmig remote", code=1)
        assert "vm.pause" in line, line
        one_error_line(chmig("remote", "--api-socket", api, "info"), "chmig remote", code=1)
    finally:
        shut_down(vmm)


# ---------------------------------------------------------------------------------------------
# A real migration: the progress line, and receive-migration's "listening on"
# ---------------------------------------------------------------------------------------------


PROGRESS = re.compile(r"chmig remote: (?:(precopy|final|local) iteration (\d+): [\d.]+/[\d.]+ MiB|state|postcopy)"
                      r"(, \d+ MiB/s)?(, dirty \d+ MiB/s)?(, estimated downtime \d+ ms)?")


@contextlib.contextmanager
def sending(procs: Processes, *flags: str, **popen: object) -> Iterator[subprocess.Popen[str]]:
    """``chmig remote ... send-migration`` of a small VM over a slow link (a few seconds of precopy)."""
    source = procs.run(*VM_ARGS)
    source.wait_rounds(1)
    dest, url = procs.receive("tcp:127.0.0.1:0")
    proxy = ThrottledProxy(url, SLOW_LINK)
    try:
        yield subprocess.Popen([sys.executable, "-m", "chmig", "remote", "--api-socket", source.api, *flags,
                                "send-migration", f"destination_url={proxy.url},{SLOW_SEND}"],
                               text=True, **popen)  # type: ignore[call-overload]
        assert dest.wait_for(lambda i: i["state"] == "Running", what="the VM running on the destination")
    finally:
        proxy.close()


@requires_kvm
def test_send_migration_progress_lines_when_not_a_terminal(procs: Processes) -> None:
    began = time.monotonic()
    with sending(procs, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        out, err = proc.communicate(timeout=90)
    took = time.monotonic() - began
    assert proc.returncode == 0, err
    assert json.loads(out)["status"] == "completed"
    lines = err.splitlines()
    assert lines, "no progress line"
    assert all(PROGRESS.fullmatch(line) for line in lines), lines
    assert "\r" not in err and "\x1b" not in err  # plain lines for a log or a pipe
    assert len(lines) <= 1 + took / 2, lines  # at most one line every 2 s
    assert len(set(lines)) == len(lines), lines  # a new line only for a new iteration or phase


@requires_kvm
def test_send_migration_quiet_has_no_progress(procs: Processes) -> None:
    with sending(procs, "--quiet", stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    assert err == ""
    assert json.loads(out)["status"] == "completed"


@requires_kvm
def test_send_migration_progress_on_a_terminal_is_one_line_rewritten(procs: Processes) -> None:
    master, slave = os.openpty()
    try:
        with sending(procs, stdout=subprocess.PIPE, stderr=slave) as proc:
            os.close(slave)
            slave = -1
            out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0
        seen = b""
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = seen.decode()
    assert "\n" not in text, text  # one line, rewritten in place
    updates = [part.removesuffix("\x1b[K") for part in text.split("\r") if part]
    assert len(updates) >= 2 and updates[-1] == "", text  # shown, then cleared at the end
    assert all(PROGRESS.fullmatch(update) for update in updates[:-1]), updates
    assert json.loads(out)["status"] == "completed"


@requires_kvm
def test_receive_migration_says_when_it_listens(procs: Processes, tmp_path: Path) -> None:
    """A script reads ``listening on`` from ``remote receive-migration`` and starts the sender: no sleep."""
    source = procs.run(*VM_ARGS)
    dest = procs.run()  # an empty VMM, as cloud-hypervisor --api-socket
    address = f"unix:{tmp_path}/migrate.sock"
    receiving = subprocess.Popen([sys.executable, "-m", "chmig", "remote", "--api-socket", dest.api,
                                  "receive-migration", f"receiver_url={address}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert receiving.stderr is not None
        ready, _, _ = select.select([receiving.stderr], [], [], 30)
        assert ready, "no 'listening on' line within 30 s"
        assert receiving.stderr.readline() == f"chmig remote: listening on {address}\n"
        sent = chmig("remote", "--api-socket", source.api, "--quiet", "send-migration", f"destination_url={address}")
        assert sent.returncode == 0, sent.stderr
        out, err = receiving.communicate(timeout=60)
        assert receiving.returncode == 0, err
        assert err == ""
        assert dest.wait_for(lambda i: i["state"] == "Running", what="the VM running on the destination")
    finally:
        if receiving.poll() is None:
            receiving.send_signal(signal.SIGTERM)
            receiving.wait(10)


@requires_kvm
def test_receive_migration_quiet(procs: Processes, tmp_path: Path) -> None:
    source = procs.run(*VM_ARGS)
    dest = procs.run()
    address = f"unix:{tmp_path}/migrate.sock"
    receiving = subprocess.Popen([sys.executable, "-m", "chmig", "remote", "--api-socket", dest.api,
                                  "receive-migration", "--quiet", f"receiver_url={address}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(f"{tmp_path}/migrate.sock"):  # tests may poll; the product never does
            assert time.monotonic() < deadline and receiving.poll() is None, "the receiver never listened"
            time.sleep(0.05)
        assert chmig("remote", "--api-socket", source.api, "-q", "send-migration",
                     f"destination_url={address}").returncode == 0
        out, err = receiving.communicate(timeout=60)
        assert receiving.returncode == 0 and err == "", err
    finally:
        if receiving.poll() is None:
            receiving.send_signal(signal.SIGTERM)
            receiving.wait(10)
