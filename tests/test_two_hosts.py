"""Live migration between two "hosts": the source in one network namespace, the destination in another.

The two namespaces are joined by a veth pair (:mod:`tests.netns`), optionally
behind a 1 Gbit/s ``tbf`` qdisc, and have no other route: the migration
traffic can only go from A's address to B's.  ``chmig run`` runs inside A,
``chmig receive --listen tcp:<B's address>:0`` inside B; their API sockets are
files, driven from the machine itself.  The guest judges the result: it must
keep counting rounds on B with zero errors.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chmig.harness import Processes, VmmProcess, wait_api
from chmig.transport import CA_CERT_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE

from .conftest import requires_kvm
from .netns import TwoHosts, namespaces, two_hosts, unavailable_reason
from .pki import _make_ca, _make_leaf, _tls_dir

_NO_NETNS = unavailable_reason()
pytestmark = [requires_kvm, pytest.mark.timeout(120),
              pytest.mark.skipif(_NO_NETNS is not None, reason=f"two hosts need network namespaces: {_NO_NETNS}")]

VM_ARGS = ("--cpus", "boot=1", "--memory", "size=32M", "--workload", "verify,dirty_percent=10")
#: tbf at 1 Gbit/s moves about 115 MiB/s here (machine facts); no iteration may beat the link.
TBF_RATE = "1gbit"
TBF_MAX_MIB_S = 130


def _spawn(procs: Processes, hosts: TwoHosts, namespace: str, args: list[str], api: str) -> VmmProcess:
    """Like ``Processes._spawn``, inside ``namespace``; registered with ``procs`` so it is stopped too."""
    procs.count += 1
    log = procs.tmp / f"chmig-{procs.count}.log"
    command = hosts.on(namespace, sys.executable, "-m", "chmig", "-vv", "--log-file", str(log), *args)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    vmm = VmmProcess(proc, api, log)
    procs.started.append(vmm)
    return vmm


def run_on(procs: Processes, hosts: TwoHosts, namespace: str, *vm_args: str) -> VmmProcess:
    """``chmig run`` on one host, its API up."""
    api = str(procs.tmp / f"api-{procs.count + 1}.sock")
    vmm = _spawn(procs, hosts, namespace, ["run", "--api-socket", api, "--serial", "off", *vm_args], api)
    wait_api(vmm)
    return vmm


def receive_on(procs: Processes, hosts: TwoHosts, namespace: str, listen: str, *args: str) -> tuple[VmmProcess, str]:
    """``chmig receive`` on one host → (process, the URL it listens on)."""
    api = str(procs.tmp / f"api-{procs.count + 1}.sock")
    vmm = _spawn(procs, hosts, namespace,
                 ["receive", "--listen", listen, "--api-socket", api, "--serial", "off", *args], api)
    assert vmm.proc.stdout is not None
    line = vmm.proc.stdout.readline()
    if "listening on" not in line:
        raise AssertionError(f"receive did not start: {line!r}\n{vmm.proc.stdout.read()}\n{vmm.tail()}")
    return vmm, line.rsplit("listening on ", 1)[1].strip()


def migrate_between(procs: Processes, hosts: TwoHosts, tls_dir: Path | None = None, **options: object) -> dict:
    """Migrate a guest from A to B; check it continues there; return the source's statistics."""
    source = run_on(procs, hosts, hosts.a, *VM_ARGS)
    before = source.wait_rounds(4)
    tls = ("--tls-dir", str(tls_dir)) if tls_dir else ()
    dest, url = receive_on(procs, hosts, hosts.b, f"tcp:{hosts.b_address}:0", *tls)
    assert url.startswith(f"tcp:{hosts.b_address}:"), url
    if tls_dir:
        options["tls_dir"] = str(tls_dir)
    stats = source.call("PUT", "vm.send-migration", {"destination_url": url, **options}, timeout=150)
    assert stats["status"] == "completed" and stats["downtime_ms"] < 10_000, stats
    assert source.wait_exit(30) == 0, source.tail()
    # The migration came from A's address: the veth pair carried it.
    assert f"incoming migration from tcp:{hosts.a_address}:" in dest.log.read_text(), dest.tail()
    arrived = dest.info()
    assert arrived["state"] == "Running" and arrived["guest"]["errors"] == 0, arrived["guest"]
    assert arrived["guest"]["rounds"] >= before["guest"]["rounds"]
    after = dest.wait_rounds(arrived["guest"]["rounds"] + 2, timeout=30)
    assert after["guest"]["errors"] == 0, after["guest"]
    assert after["migration"]["role"] == "destination" and after["migration"]["status"] == "completed"
    return stats


@pytest.mark.parametrize("connections,rate", [(1, None), (2, None), (2, TBF_RATE)],
                         ids=["connections=1", "connections=2", f"connections=2-tbf-{TBF_RATE}"])
def test_migration_between_two_hosts(procs: Processes, connections: int, rate: str | None) -> None:
    with two_hosts(rate) as hosts:
        try:
            stats = migrate_between(procs, hosts, connections=connections)
        finally:
            procs.stop_all()  # nothing may outlive its namespace
    assert stats["connections"] == connections
    if rate is not None:  # the rate limit on the veth was in the path
        fastest = max(iteration["bandwidth_mib_s"] for iteration in stats["iterations"])
        assert fastest < TBF_MAX_MIB_S, stats["iterations"]
    assert not {hosts.a, hosts.b} & namespaces(), "a namespace was left behind"


def test_tls_migration_between_two_hosts(procs: Processes, tmp_path: Path) -> None:
    """Mutual TLS across the link: the receiver's certificate names B's address."""
    with two_hosts() as hosts:
        try:
            tls_dir = _tls_for(tmp_path / "pki", hosts.b_address)
            migrate_between(procs, hosts, tls_dir=tls_dir, connections=2)
        finally:
            procs.stop_all()
    assert "with TLS" in procs.started[0].log.read_text()


def _tls_for(work: Path, address: str) -> Path:
    """A CA, a server certificate for ``address`` and a client certificate, in one tls_dir for both ends."""
    work.mkdir()
    ca = _make_ca(work, "two-hosts")
    server = _make_leaf(work, ca, "server", f"extendedKeyUsage=serverAuth\nsubjectAltName=IP:{address}\n")
    client = _make_leaf(work, ca, "client", "extendedKeyUsage=clientAuth\n")
    return _tls_dir(work / "tls", {CA_CERT_FILE: ca[0], SERVER_CERT_FILE: server[0], SERVER_KEY_FILE: server[1],
                                   CLIENT_CERT_FILE: client[0], CLIENT_KEY_FILE: client[1]})
