"""Shared test helpers: real chmig processes driven through their real API sockets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

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


class BackgroundCall:
    """An API call made from a thread (``receive-migration`` blocks until the migration ends)."""

    def __init__(self, vmm: VmmProcess, method: str, action: str, body: dict, timeout: float = 150) -> None:
        import threading

        self.outcome: list[BaseException | None] = []
        #: The call's answer (its JSON), once it returned without an error.
        self.answer: object = None
        self.thread = threading.Thread(target=self._call, args=(vmm, method, action, body, timeout),
                                       name=f"test-{action}")
        self.thread.start()

    def _call(self, vmm: VmmProcess, method: str, action: str, body: dict, timeout: float) -> None:
        try:
            self.answer = vmm.call(method, action, body, timeout=timeout)
            self.outcome.append(None)
        except BaseException as exc:  # the test asserts on it
            self.outcome.append(exc)

    def wait_for_file(self, path: Path | str) -> None:
        """Until ``path`` exists (the receiver's listening socket) or the call ended."""
        while not os.path.exists(path) and self.thread.is_alive():
            self.thread.join(0.05)

    def result(self, timeout: float = 60) -> BaseException | None:
        self.thread.join(timeout)
        assert self.outcome, "the API call did not return"
        return self.outcome[0]


def receive_through_api(vmm: VmmProcess, socket_path: Path) -> BackgroundCall:
    """``vm.receive-migration`` on ``unix:socket_path``, returned once the socket listens."""
    call = BackgroundCall(vmm, "PUT", "vm.receive-migration", {"receiver_url": f"unix:{socket_path}"})
    call.wait_for_file(socket_path)
    return call


#: The throttled link of the convergence tests: slower than a guest rewriting all of its memory.
SLOW_LINK = 64 << 20


@pytest.fixture
def slow_link() -> Iterator[Callable[[str], str]]:
    """Put a throttled proxy (tests/proxy.py) in front of a destination URL."""
    from .proxy import ThrottledProxy

    proxies: list[ThrottledProxy] = []

    def through(url: str) -> str:
        proxies.append(ThrottledProxy(url, SLOW_LINK))
        return proxies[-1].url

    yield through
    for proxy in proxies:
        proxy.close()
