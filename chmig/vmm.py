"""The VMM process: owns at most one VM, serves the API, runs migrations, decides when to exit.

``chmig run`` with VM options boots a VM; with only ``--api-socket`` it starts
an empty VMM (as ``cloud-hypervisor --api-socket`` does) that waits for a
``vm.receive-migration``.  The main thread only waits for the exit event; the
vCPUs, the API server and migrations run in their own named threads.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import ApiServer

from . import __version__
from .errors import UsageError, VmError
from .memory import GuestMemory
from .stats import MigrationStats
from .vm import Serial, Vm, VmConfig, VmState

log = logging.getLogger(__name__)


class Vmm:
    """One VMM: its VM (or none), the migration in progress, and the process's exit."""

    def __init__(self, serial_spec: str = "tty") -> None:
        self.serial_spec = serial_spec
        self.vm: Vm | None = None
        self.lock = threading.RLock()
        self.exit_event = threading.Event()
        self.exit_code = 0
        #: Statistics of the last migration (sent or received), for vm.info.
        self.migration: MigrationStats | None = None
        #: Set when the process should end once the current API reply is out.
        self.exit_after_reply = False
        #: What is using the VM exclusively right now ("send-migration", ...), if anything.
        self.busy: str | None = None
        #: Without an API there is nobody to ask what happened: a failed VM ends the process.
        self.exit_on_vm_failure = False

    # -- lifecycle -------------------------------------------------------------------------------

    def boot(self, config: VmConfig) -> Vm:
        """Create, boot and start a fresh VM."""
        with self.lock:
            if self.vm is not None and self.vm.state != VmState.SHUTDOWN:
                raise VmError("a VM already exists")
            memory = GuestMemory.create(config.zones)
            try:
                vm = Vm(config, memory, Serial(self.serial_spec))
            except BaseException:
                memory.close()
                raise
            vm.on_stop = self._vm_failed
            vm.boot()
            vm.start()
            self.vm = vm
            log.info("VM booted: %d vCPUs, %d MiB, workload %s", config.cpus, memory.total_size >> 20,
                     config.workload.kind)
            return vm

    def adopt(self, vm: Vm) -> None:
        """Take over a VM built by an incoming migration."""
        with self.lock:
            vm.on_stop = self._vm_failed
            self.vm = vm

    def _vm_failed(self, vm: Vm) -> None:
        log.error("the VM stopped: %s", vm.failure)
        if self.exit_on_vm_failure:
            self.exit_code = 1
            self.exit_event.set()

    def require_vm(self) -> Vm:
        if self.vm is None:
            raise VmError("no VM is created")
        return self.vm

    def _require_idle(self, what: str) -> None:
        if self.busy:
            raise VmError(f"cannot {what}: a {self.busy} is in progress")

    # -- API actions -----------------------------------------------------------------------------

    def ping(self) -> dict:
        return {"build_version": f"chmig {__version__}", "version": __version__, "pid": os.getpid(), "features": ["kvm"]}

    def info(self) -> dict:
        vm = self.require_vm()
        info = vm.info()
        if self.migration is not None:
            info["migration"] = self.migration.to_json()
        return info

    def pause(self) -> None:
        with self.lock:
            self._require_idle("pause")
            self.require_vm().pause()

    def resume(self) -> None:
        with self.lock:
            self._require_idle("resume")
            self.require_vm().resume()

    def shutdown_vm(self) -> None:
        with self.lock:
            self._require_idle("shut down")
            self.require_vm()
            self._drop_vm()

    def shutdown_vmm(self) -> None:
        self.exit_after_reply = True

    def retire_vm(self) -> None:
        """The VM now lives elsewhere: drop it here, and end the process once the API has replied."""
        with self.lock:
            self._drop_vm()
            self.exit_after_reply = True

    def send_migration(self, options: dict) -> dict:
        """Run an outgoing migration; answer its statistics (Cloud Hypervisor answers 204, no body)."""
        from . import send

        with self.lock:
            self._require_idle("send a migration")
            vm = self.require_vm()
            if vm.state not in (VmState.RUNNING, VmState.PAUSED):
                raise VmError(f"cannot migrate a VM that is {vm.state}")
            self.busy = "send-migration"
        try:
            return send.send_migration(self, send.SendOptions.from_api(options)).to_json()
        finally:
            self.busy = None

    def receive_migration(self, options: dict) -> None:
        from . import receive

        with self.lock:
            if self.vm is not None:
                raise VmError("cannot receive a migration: this VMM already has a VM")
            self._require_idle("receive a migration")
            self.busy = "receive-migration"
        try:
            receive.receive_into_vmm(self, receive.ReceiveOptions.from_api(options))
        finally:
            self.busy = None

    # -- the end ---------------------------------------------------------------------------------

    def _drop_vm(self) -> None:
        """Stop the VM and release its KVM fds and memory."""
        if self.vm is not None:
            self.vm.close()
            self.vm.memory.close()
            self.vm = None

    def close(self) -> None:
        with self.lock:
            self._drop_vm()


def install_exit_signals(vmm: Vmm) -> None:
    """SIGTERM and SIGINT end the process cleanly (the main thread is waiting on the exit event)."""

    def handler(signum: int, frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        vmm.exit_event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def start_api(vmm: Vmm, api_socket: str | None) -> ApiServer | None:
    """Serve the API on ``api_socket`` (if given) from its own thread."""
    from .api import ApiServer

    if not api_socket:
        return None
    server = ApiServer(api_socket, vmm)
    server.start()
    return server


def wait_for_exit(vmm: Vmm, server: ApiServer | None) -> int:
    """Block until the VMM is told to exit (API, signal, VM failure); clean up; return the exit code."""
    install_exit_signals(vmm)
    try:
        vmm.exit_event.wait()
    finally:
        if server is not None:
            server.stop()
        vmm.close()
    return vmm.exit_code


def main_run(args: argparse.Namespace) -> int:
    """``chmig run``."""
    vm_options = args.cpus or args.memory or args.memory_zone or args.workload
    vmm = Vmm(args.serial)
    vmm.exit_on_vm_failure = not args.api_socket
    if not vm_options:
        if not args.api_socket:
            raise UsageError("nothing to run: give VM options (--cpus, --memory, --workload) or --api-socket")
        log.info("empty VMM: waiting for a restore or an incoming migration")
    else:
        Serial(args.serial).close()  # reject a bad --serial before booting anything
        vmm.boot(VmConfig.from_args(args.cpus, args.memory, args.memory_zone, args.workload))
    try:
        server = start_api(vmm, args.api_socket)
    except BaseException:
        vmm.close()
        raise
    return wait_for_exit(vmm, server)
