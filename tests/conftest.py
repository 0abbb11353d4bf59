"""Shared test helpers: real chmig processes driven through their real API sockets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chmig.harness import Processes, VmmProcess  # noqa: F401 - re-exported for the tests

from .pki import Pki

HAVE_KVM = os.path.exists("/dev/kvm")
requires_kvm = pytest.mark.skipif(not HAVE_KVM, reason="no /dev/kvm on this machine: these tests run a real KVM guest")


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
