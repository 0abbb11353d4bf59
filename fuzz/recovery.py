"""Postcopy recovery's listener (protocol version 1), fuzzed in process: who gets in as the source?

    python -m fuzz.recovery --cases N --seed S [--only INDEX ...]

A recoverable postcopy destination keeps its port after State
(:class:`chmig.receive.RecoveryAcceptor`): a connection that announces role
FaultRecovery and proves the migration's token with a 24-byte hello is handed
to the pager as the source's next attempt.  Each case starts a real acceptor
on a loopback listener with a random token and a short ``role_timeout_s``,
opens one to four connections, and sends on each the valid role and hello,
mutated at most once: a bit flipped anywhere (role, token, attempt, padding),
cut short then closed, cut short then silent, cut short then reset, another
role, attempt 0, random bytes, nothing at all, or valid and followed by extra
bytes.  Per case it checks:

* a connection is handed over exactly when its first 26 bytes are role 3, the
  right token and an attempt of at least 1 (the 4 padding bytes are ignored,
  as Cloud Hypervisor ignores unused header bytes), with that attempt;
* every other connection is closed unanswered (not one byte comes back) within
  ``role_timeout_s`` and a margin;
* after the acceptor is closed no fd is left open, no thread left running, and
  the port is free.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from chmig import protocol as p
from chmig.channel import Channel, Observers
from chmig.receive import RecoveryAcceptor
from chmig.transport import listen, parse_url

Report = Callable[[str], None]

ROLE_TIMEOUT_S = 0.2
LIMITS = p.Limits(role_timeout_s=ROLE_TIMEOUT_S)
HELLO_END = p.ROLE_SIZE + p.RECOVERY_HELLO_SIZE
KINDS = ("valid", "flip", "short-close", "short-silent", "short-reset", "other-role", "attempt-0", "random",
         "nothing", "extra-bytes")


@dataclass
class Sent:
    kind: str
    wire: bytes
    #: How the connection ends after ``wire``: ``keep`` (stays open, silent), ``close`` (FIN) or ``reset``.
    then: str


def make_connection(rng: random.Random, token: bytes) -> Sent:
    attempt = rng.choice([1, 2, 7, 0xFFFFFFFF])
    valid = p.ConnectionRole.FAULT_RECOVERY.encode() + p.RecoveryHello(token, attempt).encode()
    kind = rng.choice(KINDS)
    if kind == "valid":
        return Sent(kind, valid, "keep")
    if kind == "flip":
        wire = bytearray(valid)
        bit = rng.randrange(len(wire) * 8)
        wire[bit // 8] ^= 1 << (bit % 8)
        return Sent(kind, bytes(wire), "keep")
    if kind.startswith("short-"):
        return Sent(kind, valid[:rng.randrange(HELLO_END)], kind.removeprefix("short-").replace("silent", "keep"))
    if kind == "other-role":
        role = rng.choice([0, 1, 2, 4, 0xFFFF])
        return Sent(kind, role.to_bytes(2, "little") + valid[2:], "keep")
    if kind == "attempt-0":
        return Sent(kind, valid[:2] + token + bytes(8), "keep")
    if kind == "random":
        return Sent(kind, rng.randbytes(rng.choice([1, 26, 4096])), "keep")
    if kind == "nothing":
        return Sent(kind, b"", rng.choice(["keep", "close"]))
    return Sent(kind, valid + rng.randbytes(rng.randrange(1, 64)), "keep")


def expected_attempt(sent: Sent, token: bytes) -> int | None:
    """The attempt the acceptor must hand over for ``sent``, or None when it must refuse it."""
    wire = sent.wire
    if len(wire) < HELLO_END or wire[:2] != p.ConnectionRole.FAULT_RECOVERY.encode():
        return None
    if wire[2:2 + p.TOKEN_SIZE] != token:
        return None
    attempt = int.from_bytes(wire[2 + p.TOKEN_SIZE:2 + p.TOKEN_SIZE + 4], "little")
    return attempt or None


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def run_case(seed: int, index: int) -> tuple[str, list[str]]:
    """One case; returns its kinds and its problems (none: it passed)."""
    rng = random.Random(f"recovery-{seed}-{index}")
    token = rng.randbytes(p.TOKEN_SIZE)
    plans = [make_connection(rng, token) for _ in range(rng.randint(1, 4))]
    kinds = ",".join(plan.kind for plan in plans)
    fds_before = _open_fds()
    threads_before = set(threading.enumerate())
    arrived: list[tuple[int, Channel]] = []
    lock = threading.Lock()
    got_one = threading.Condition(lock)

    def arrive(attempt: int, channel: Channel) -> None:
        with got_one:
            arrived.append((attempt, channel))
            got_one.notify_all()

    listener = listen(parse_url("tcp:127.0.0.1:0"))
    address = (listener.address.host, listener.address.port)
    acceptor = RecoveryAcceptor(listener, token, arrive, Observers(), LIMITS)
    acceptor.start()
    problems: list[str] = []
    socks: list[socket.socket] = []
    try:
        for plan in plans:
            sock = socket.create_connection(address, timeout=5)
            socks.append(sock)
            if plan.wire:
                sock.sendall(plan.wire)
            if plan.then == "close":
                sock.shutdown(socket.SHUT_WR)
            elif plan.then == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, (1).to_bytes(4, "little") + bytes(4))
                sock.close()
        wanted = [expected_attempt(plan, token) for plan in plans]
        handed = sum(attempt is not None for attempt in wanted)
        with got_one:
            got_one.wait_for(lambda: len(arrived) >= handed, timeout=5)
        attempts = sorted(attempt for attempt, _ in arrived)
        if attempts != sorted(a for a in wanted if a is not None):
            problems.append(f"handed over attempts {attempts}, expected {sorted(a for a in wanted if a is not None)}")
        deadline = time.monotonic() + ROLE_TIMEOUT_S + 3
        for plan, sock, attempt in zip(plans, socks, wanted):
            if attempt is not None or plan.then == "reset":
                continue
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                answer = sock.recv(64)
            except (ConnectionResetError, BrokenPipeError):
                answer = b""
            except TimeoutError:
                problems.append(f"{plan.kind}: not closed within {ROLE_TIMEOUT_S + 3:g} s")
                continue
            if answer:
                problems.append(f"{plan.kind}: answered {answer[:16].hex()} (a refused connection gets nothing)")
    finally:
        acceptor.close()
        for _, channel in arrived:
            channel.close()
        for sock in socks:
            sock.close()
    left = [t.name for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    if left:
        problems.append(f"threads left: {left}")
    leaked = _open_fds() - fds_before
    if leaked:
        problems.append(f"fds left: {sorted(leaked)}")
    try:
        socket.create_connection(address, timeout=2).close()
        problems.append("the port still accepts connections after close")
    except ConnectionRefusedError:
        pass
    return kinds, problems


def run(cases: int, seed: int, report: Report, only: Iterable[int] | None = None) -> int:
    """Run ``cases`` cases (or just ``only``); print a summary; return the number of failures."""
    begin = time.monotonic()
    failures = 0
    count = 0
    # Each refusal is one warning line from chmig, by design: thousands of them would bury the report.
    quiet = [logging.getLogger(name) for name in ("chmig.receive", "chmig.transport")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        failures, count = _run_cases(cases, seed, report, only)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    report(f"recovery: {count} cases in {time.monotonic() - begin:.1f} s, {failures} failures")
    return failures


def _run_cases(cases: int, seed: int, report: Report, only: Iterable[int] | None) -> tuple[int, int]:
    failures = 0
    count = 0
    for index in (only if only is not None else range(cases)):
        count += 1
        try:
            kinds, problems = run_case(seed, index)
        except Exception as exc:  # the harness itself: still a failure, with the case to replay
            kinds, problems = "?", [f"the case raised {exc!r}"]
        if problems:
            failures += 1
            report(f"recovery: FAILED case {index} (seed {seed}, --only {index}) [{kinds}]: {'; '.join(problems)}")
    return failures, count


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz.recovery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", type=int, nargs="+")
    args = parser.parse_args()
    return 1 if run(args.cases, args.seed, lambda line: print(line, flush=True), args.only) else 0


if __name__ == "__main__":
    sys.exit(main())
