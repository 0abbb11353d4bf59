"""Two test "hosts" on one machine: two network namespaces joined by a veth pair (test tooling).

:func:`two_hosts` makes namespaces ``A`` and ``B`` with unique names, one veth
end in each, addresses from 10.250.0.0/16 as a /30 (``.1`` in A, ``.2`` in B)
that exist only inside those namespaces, loopback up in both, and optionally a
``tbf`` rate limit on A's end (a realistic 1 Gbit/s link: ``tc`` works here,
``netem`` does not).  Neither namespace has a default route, so the only
traffic possible is between the two addresses.  Everything is deleted when the
context ends, whatever happened inside it (deleting a namespace deletes the
veth end in it, and with it the pair).

A command runs on a host with ``ip netns exec NS ...`` (:meth:`TwoHosts.on`);
UNIX sockets are files, so API sockets made inside a namespace are reachable
from the machine itself.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

_counter = itertools.count()


@dataclass(frozen=True)
class TwoHosts:
    """Namespace names, veth ends and addresses of the two hosts."""

    a: str
    b: str
    a_dev: str
    b_dev: str
    a_address: str
    b_address: str

    def on(self, namespace: str, *command: str) -> list[str]:
        """``command`` run inside ``namespace``."""
        return ["ip", "netns", "exec", namespace, *command]


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None if they can): the only reason to skip a two-host test."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns does not work here: {probe.stderr.strip()}"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


@contextmanager
def two_hosts(rate: str | None = None) -> Iterator[TwoHosts]:
    """Two namespaces joined by a veth pair; ``rate`` (e.g. ``1gbit``) puts a tbf qdisc on A's end."""
    number = next(_counter)
    # Unique per process and per call: names must not collide with another test run on this machine.
    token = f"{os.getpid() % 100000:05d}{number % 100:02d}"
    # A /30 out of 10.250.0.0/16 picked from the token (16384 of them); the addresses live only inside
    # these two namespaces, so even a collision with another run could not route anywhere.
    subnet = (os.getpid() * 64 + number) % 16384
    base = f"10.250.{subnet // 64}.{(subnet % 64) * 4}"
    prefix = base.rsplit(".", 1)[0]
    low = int(base.rsplit(".", 1)[1])
    hosts = TwoHosts(
        a=f"chmig-{token}-a", b=f"chmig-{token}-b",
        a_dev=f"cm{token}a", b_dev=f"cm{token}b",  # interface names: at most 15 characters
        a_address=f"{prefix}.{low + 1}", b_address=f"{prefix}.{low + 2}",
    )
    made: list[str] = []
    try:
        for namespace in (hosts.a, hosts.b):
            _ip("netns", "add", namespace)
            made.append(namespace)
        _ip("link", "add", hosts.a_dev, "netns", hosts.a, "type", "veth", "peer", "name", hosts.b_dev,
            "netns", hosts.b)
        for namespace, dev, address in ((hosts.a, hosts.a_dev, hosts.a_address),
                                        (hosts.b, hosts.b_dev, hosts.b_address)):
            _ip("-n", namespace, "addr", "add", f"{address}/30", "dev", dev)
            _ip("-n", namespace, "link", "set", dev, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
        if rate is not None:
            result = subprocess.run(["tc", "-n", hosts.a, "qdisc", "add", "dev", hosts.a_dev, "root", "tbf",
                                     "rate", rate, "burst", "256kb", "latency", "50ms"],
                                    capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                raise RuntimeError(f"tc qdisc add tbf failed: {result.stderr.strip()}")
        yield hosts
    finally:
        errors = []
        for namespace in made:
            try:
                _ip("netns", "del", namespace)
            except RuntimeError as exc:  # try the other one anyway; report both
                errors.append(str(exc))
        if errors:
            raise RuntimeError("; ".join(errors))


def namespaces() -> set[str]:
    """The names ``ip netns list`` shows (to check that a test left none behind)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}
