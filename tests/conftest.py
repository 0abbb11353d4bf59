"""Shared test helpers: real chmig processes driven through their real API sockets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from chmig.api import ApiError, request

from .pki import Pki

HAVE_KVM = os.path.exists("/dev/kvm")
requires_kvm = pytest.mark.skipif(not HAVE_KVM, reason="no /dev/kvm on this machine: these tests run a real KVM guest")


@dataclass
class VmmProcess:
    """A ``chmig run`` or ``chmig receive`` process and its API socket."""

    proc: subprocess.Popen[str]
    api: str
    log: Path
    stdout_lines: list[str] = field(default_factory=list)

    def call(self, method: str, action: str, body: dict | None = None, timeout: float = 120) -> Any:
        return request(self.api, method, action, body, timeout=timeout)

    def info(self) -> dict:
        return self.call("GET", "vm.info")

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 30, what: str = "condition") -> dict:
        """Poll vm.info until ``predicate`` holds (tests may poll; the product never does)."""
        deadline = time.monotonic() + timeout
        last: dict | str = {}
        while time.monotonic() < deadline:
            try:
                last = self.info()
                if predicate(last):
                    return last
            except ApiError as exc:
                last = str(exc)
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last info: {json.dumps(last)[:2000]}\n{self.tail()}")

    def wait_rounds(self, rounds: int, timeout: float = 30) -> dict:
        return self.wait_for(lambda i: i["guest"]["rounds"] >= rounds, timeout, f"{rounds} guest rounds")

    def tail(self, lines: int = 40) -> str:
        try:
            return "--- log ---\n" + "\n".join(self.log.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()


def _wait_api(proc: VmmProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise AssertionError(f"chmig exited with {proc.proc.returncode} before its API came up\n{proc.tail()}")
        try:
            proc.call("GET", "vmm.ping", timeout=5)
            return
        except ApiError:
            time.sleep(0.05)
    raise AssertionError(f"API did not come up\n{proc.tail()}")


class Processes:
    """Starts chmig processes in a test's tmp_path and stops them all at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.started: list[VmmProcess] = []
        self.count = 0

    def _spawn(self, args: list[str], api: str) -> VmmProcess:
        self.count += 1
        log = self.tmp / f"chmig-{self.count}.log"
        cmd = [sys.executable, "-m", "chmig", "-vv", "--log-file", str(log), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        vmm = VmmProcess(proc, api, log)
        self.started.append(vmm)
        return vmm

    def run(self, *args: str, serial: str = "off") -> VmmProcess:
        """``chmig run ... --api-socket`` with its API up."""
        api = str(self.tmp / f"api-{self.count + 1}.sock")
        vmm = self._spawn(["run", "--api-socket", api, "--serial", serial, *args], api)
        _wait_api(vmm)
        return vmm

    def receive(self, listen: str, *args: str) -> tuple[VmmProcess, str]:
        """``chmig receive --listen URL --api-socket`` → (process, the address it listens on)."""
        api = str(self.tmp / f"api-{self.count + 1}.sock")
        vmm = self._spawn(["receive", "--listen", listen, "--api-socket", api, "--serial", "off", *args], api)
        assert vmm.proc.stdout is not None
        line = vmm.proc.stdout.readline()
        vmm.stdout_lines.append(line)
        if "listening on" not in line:
            raise AssertionError(f"receive did not start: {line!r}\n{vmm.proc.stdout.read()}\n{vmm.tail()}")
        return vmm, line.rsplit("listening on ", 1)[1].strip()

    def stop_all(self) -> None:
        for vmm in self.started:
            vmm.stop()


@pytest.fixture
def procs(tmp_path: Path):  # noqa: ANN201
    processes = Processes(tmp_path)
    yield processes
    processes.stop_all()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificate directories: ``good`` (both roles, one CA) and ``stranger`` (another CA)."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make test certificates")
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def tls_dirs(pki: Pki) -> dict[str, Path]:
    return {"good": pki.good, "other": pki.stranger}
