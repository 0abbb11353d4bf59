"""Drive chmig processes through their API sockets: for the demo, the benchmarks and the tests.

A :class:`Processes` starts ``chmig run`` and ``chmig receive`` processes in a
folder and stops them all at the end; a :class:`VmmProcess` is one of them with
its API socket.  Waiting here polls ``vm.info`` with a short sleep: these are
tools that watch another process from outside, not the product's own logic.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .apiclient import ApiError, request


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


def wait_api(proc: VmmProcess, timeout: float = 30) -> None:
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

    def __init__(self, tmp_path: Path, verbose: bool = True) -> None:
        self.tmp = tmp_path
        self.verbose = verbose
        self.started: list[VmmProcess] = []
        self.count = 0

    def _spawn(self, args: list[str], api: str) -> VmmProcess:
        self.count += 1
        log = self.tmp / f"chmig-{self.count}.log"
        cmd = [sys.executable, "-m", "chmig", "-vv" if self.verbose else "-v", "--log-file", str(log), *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        vmm = VmmProcess(proc, api, log)
        self.started.append(vmm)
        return vmm

    def run(self, *args: str, serial: str = "off") -> VmmProcess:
        """``chmig run ... --api-socket`` with its API up."""
        api = str(self.tmp / f"api-{self.count + 1}.sock")
        vmm = self._spawn(["run", "--api-socket", api, "--serial", serial, *args], api)
        wait_api(vmm)
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
