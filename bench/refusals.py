"""Resources of one long-lived API VMM that refuses many bad migrations: fds, threads, RSS before and after.

    python3 bench/refusals.py [--count N] [--quick]

One empty ``chmig run --api-socket`` VMM is told N times to ``receive-migration``
on a UNIX socket; each time a raw sender brings a migration that must be refused
(cycling through: a bad memory fd of several kinds, a Config whose VM KVM
refuses, hostile JSON, a range outside RAM, a silent close after Config).
The VMM must answer every one with an error and come back to where it started.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import ROOT  # noqa: F401 - puts this checkout on sys.path

from chmig import protocol as p
from chmig.apiclient import ApiError
from chmig.harness import Processes
from chmig.memory import ZoneConfig, layout
from chmig.vm import VmConfig


def _config(cpuid: list[dict] | None = None) -> bytes:
    zones = [ZoneConfig("mem0", 4 << 20, True)]
    document: dict = {"vm_config": VmConfig(cpus=1, zones=zones).to_json(),
                      "memory_manager_data": {"guest_ram_mappings": [m.to_json() for m in layout(zones)]}}
    if cpuid is not None:
        document["common_cpuid"] = cpuid
    return json.dumps(document).encode()


def _resources(pid: int) -> tuple[int, int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return fds, threads, rss


def _bad_fd(kind: int, tmp: Path) -> int:
    if kind == 0:
        fd = os.memfd_create("small")
        os.ftruncate(fd, 4096)
        return fd
    if kind == 1:
        return os.open("/dev/null", os.O_RDWR)
    if kind == 2:
        read_end, write_end = os.pipe()
        os.close(write_end)
        return read_end
    return os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)


def _refuse_one(path: str, index: int, tmp: Path) -> None:
    """One hostile migration against the listening VMM; returns once the VMM has refused it."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    deadline = time.monotonic() + 10
    while True:
        try:
            sock.connect(path)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    with sock:
        def ask(request: p.Request, payload: bytes = b"", fd: int | None = None) -> bytes:
            if fd is None:
                sock.sendall(request.encode() + payload)
            else:
                sock.sendall(request.encode())
                socket.send_fds(sock, [payload], [fd])
            return sock.recv(16)

        ask(p.Request.start())
        kind = index % 7
        if kind < 4:
            fd = _bad_fd(kind, tmp)
            try:
                ask(p.Request.memory_fd(), p.encode_memory_fd_slot(0), fd)
            finally:
                os.close(fd)
            payload = _config()
            ask(p.Request.config(len(payload)), payload)
        elif kind == 4:
            payload = _config(cpuid=[{"function": n} for n in range(300)])
            ask(p.Request.config(len(payload)), payload)
        elif kind == 5:
            payload = b"[" * 50_000 + b"]" * 50_000
            ask(p.Request.config(len(payload)), payload)
        else:
            payload = _config()
            ask(p.Request.config(len(payload)), payload)
            table = p.MemoryRangeTable([p.MemoryRange(64 << 20, 4096)])
            ask(p.Request.memory(table.byte_length), table.encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="200 refusals")
    args = parser.parse_args()
    if args.quick:
        args.count = 200
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        procs = Processes(tmp, verbose=False)
        try:
            vmm = procs.run()
            pid = vmm.proc.pid
            incoming = str(tmp / "incoming.sock")
            samples = []
            begin = time.monotonic()
            for index in range(args.count):
                if index in (10, args.count - 1):  # after a warm-up, and at the end
                    samples.append((index, *_resources(pid)))
                outcome: list[BaseException | None] = []

                def receive() -> None:
                    try:
                        vmm.call("PUT", "vm.receive-migration", {"receiver_url": f"unix:{incoming}"}, timeout=60)
                        outcome.append(None)
                    except BaseException as exc:  # the expected refusal
                        outcome.append(exc)

                waiter = threading.Thread(target=receive, name="bench-receive")
                waiter.start()
                _refuse_one(incoming, index, tmp)
                waiter.join(60)
                if not outcome or not isinstance(outcome[0], ApiError):
                    print(f"case {index}: expected a refusal, got {outcome}", file=sys.stderr)
                    return 1
            elapsed = time.monotonic() - begin
            samples.append((args.count, *_resources(pid)))
        finally:
            procs.stop_all()
    print(f"\n== {args.count} refused migrations on one API VMM ({elapsed:.1f} s)")
    print("after N refusals | fds | threads | RSS MiB")
    print("-----------------+-----+---------+--------")
    for index, fds, threads, rss in samples:
        print(f"{index:>16} | {fds:>3} | {threads:>7} | {rss / 1024:>6.1f}")
    first, last = samples[0], samples[-1]
    grown = last[1] - first[1], last[2] - first[2]
    print(f"growth from the warm-up sample to the end: {grown[0]:+d} fds, {grown[1]:+d} threads, "
          f"{(last[3] - first[3]) / 1024:+.1f} MiB RSS")
    return 0 if grown == (0, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
