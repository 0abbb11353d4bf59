"""The source side of a migration: precopy over one or many connections, or local by memfd.

Sequence (remote precopy, as Cloud Hypervisor's ``send_migration``)::

    connect ─ Start ─ Config ─ dirty logging on
    iteration 0: every populated page            ┐ VM running;
    iteration n: pages dirtied during n-1        ┘ until converged
    pause ─ final iteration ─ State ─ Complete | CompletePaused

Convergence (``is_precopy_converged``), checked *before* each iteration is sent:
nothing is dirty; or the estimated time to send what is dirty, at the bandwidth
of the previous iteration, fits ``downtime_ms``; or ``timeout_s`` has passed —
then ``timeout_strategy=cancel`` stops the migration and keeps the VM on the
source, ``ignore`` finishes anyway.  The dirty table that converged becomes part
of the final (paused) iteration.

Until the destination acknowledged Complete, any failure leaves the source as
it was: dirty logging off, the VM resumed if it was running, the API serving.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from . import protocol as p
from .errors import ConvergenceError, MigrationError, TransportError, UsageError
from .memory import GuestMemory
from .stats import Iteration, MigrationStats, MiB
from .transfer import expect_ok, request_ok, send_memory, send_request
from .transport import Connection, TlsConfig, Url, connect, parse_url
from .vm import Vm, VmState

log = logging.getLogger(__name__)

#: Chunks queued per worker connection before the producer waits (Cloud Hypervisor: 64).
QUEUED_CHUNKS_PER_WORKER = 64


def _toggle(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    raise UsageError(f"{name} must be true or false")


@dataclass
class SendOptions:
    """``VmSendMigrationData``: Cloud Hypervisor's field names and defaults."""

    destination_url: str
    local: bool = False
    preserve_source: bool = False
    downtime_ms: int = 300
    timeout_s: int = 3600
    timeout_strategy: str = "cancel"
    connections: int = 1
    tls_dir: str | None = None
    memory_mode: str = "precopy"

    @classmethod
    def from_api(cls, body: dict) -> SendOptions:
        options = cls(**body)
        options.timeout_strategy = options.timeout_strategy.lower()
        options.memory_mode = options.memory_mode.lower()
        options.validate()
        return options

    def validate(self) -> None:
        try:
            url = parse_url(self.destination_url)
        except TransportError as exc:
            raise UsageError(f"destination_url {exc}") from None
        if self.downtime_ms <= 0:
            raise UsageError("downtime_ms must be non-zero")
        if self.timeout_s <= 0:
            raise UsageError("timeout_s must be non-zero")
        if self.timeout_strategy not in ("cancel", "ignore"):
            raise UsageError(f"timeout_strategy must be cancel or ignore, got {self.timeout_strategy!r}")
        if not 1 <= self.connections <= p.MAX_CONNECTIONS:
            raise UsageError(f"connections must be 1..{p.MAX_CONNECTIONS}, got {self.connections}")
        if self.connections > 1 and url.scheme != "tcp":
            raise UsageError("connections > 1 is only supported with tcp: URLs")
        if self.local and url.scheme != "unix":
            raise UsageError("--local option is only supported with UNIX sockets")
        if self.memory_mode not in ("precopy", "postcopy"):
            raise UsageError(f"memory_mode must be precopy or postcopy, got {self.memory_mode!r}")
        if self.memory_mode == "postcopy":
            raise UsageError("memory_mode=postcopy is not implemented yet")

    @property
    def url(self) -> Url:
        return parse_url(self.destination_url)

    def tls(self) -> TlsConfig | None:
        return TlsConfig.from_dir(self.tls_dir, role="client") if self.tls_dir else None


# ---------------------------------------------------------------------------------------------
# Memory over N worker connections
# ---------------------------------------------------------------------------------------------


class MemorySender:
    """Sends memory tables, over the main connection or over N ``PrecopyMemory`` workers.

    With workers, :meth:`send` cuts the table into chunks of at most 64 MiB and
    queues them (bounded: the producer waits when the queue is full); each
    worker thread sends a chunk and waits for its Ok.  :meth:`send` returns once
    every chunk is acknowledged — the gate at the end of each iteration — or
    raises as soon as any worker failed.
    """

    def __init__(self, main: Connection, memory: GuestMemory, options: SendOptions, stats: MigrationStats) -> None:
        self.main = main
        self.memory = memory
        self.workers: list[Connection] = []
        self._threads: list[threading.Thread] = []
        self._cond = threading.Condition()
        self._queue: deque[p.MemoryRangeTable | None] = deque()
        self._capacity = QUEUED_CHUNKS_PER_WORKER * options.connections
        self._outstanding = 0
        self._error: BaseException | None = None
        if options.connections > 1:
            tls = options.tls()
            try:
                for n in range(options.connections):
                    conn = connect(options.url, tls)
                    conn.set_nodelay()
                    self.workers.append(conn)
                    conn.write_all(p.ConnectionRole.PRECOPY_MEMORY.encode())
            except BaseException:
                self.close()
                raise
            for n, conn in enumerate(self.workers):
                thread = threading.Thread(target=self._worker, args=(conn,), name=f"migrate-send-memory-{n}")
                self._threads.append(thread)
                thread.start()
            log.info("sending memory over %d connections", len(self.workers))

    def send(self, table: p.MemoryRangeTable) -> int:
        """Send ``table`` and wait until all of it is acknowledged; return its bytes."""
        if not table:
            return 0
        if not self.workers:
            return send_memory(self.main, self.memory, table)
        for chunk in table.partition(p.PRECOPY_CHUNK_SIZE):
            with self._cond:
                self._cond.wait_for(lambda: len(self._queue) < self._capacity or self._error is not None)
                self._raise_worker_error()
                self._queue.append(chunk)
                self._outstanding += 1
                self._cond.notify_all()
        with self._cond:
            self._cond.wait_for(lambda: self._outstanding == 0 or self._error is not None)
            self._raise_worker_error()
        return table.total_bytes

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            raise MigrationError(f"a memory connection failed: {self._error}", where="Memory")

    def _worker(self, conn: Connection) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: bool(self._queue))
                    chunk = self._queue.popleft()
                    self._cond.notify_all()
                if chunk is None:  # the owner is closing
                    return
                send_memory(conn, self.memory, chunk)
                with self._cond:
                    self._outstanding -= 1
                    self._cond.notify_all()
        except BaseException as exc:  # reported to the producer, which raises it
            log.error("%s: %s", threading.current_thread().name, exc)
            with self._cond:
                if self._error is None:
                    self._error = exc
                self._cond.notify_all()

    def close(self) -> None:
        """Stop the workers (a None each, and a socket shutdown for one stuck in I/O) and join them."""
        with self._cond:
            self._queue.clear()
            self._queue.extend([None] * len(self._threads))
            self._cond.notify_all()
        if self._error is not None or self._outstanding:
            for conn in self.workers:
                conn.shutdown()
        for thread in self._threads:
            thread.join(timeout=30)
        for conn in self.workers:
            conn.close()
        self._threads.clear()
        self.workers.clear()


# ---------------------------------------------------------------------------------------------
# The migration
# ---------------------------------------------------------------------------------------------


class Sender:
    """One outgoing migration of ``vm``; :meth:`run` either hands the VM over or leaves it be."""

    def __init__(self, vm: Vm, options: SendOptions, stats: MigrationStats) -> None:
        self.vm = vm
        self.options = options
        self.stats = stats
        self.was_running = vm.state == VmState.RUNNING
        self.paused_by_us = False
        self.handed_over = False
        self.downtime_begin = time.monotonic()
        self.conn: Connection | None = None
        self.memory_sender: MemorySender | None = None

    def run(self) -> None:
        options = self.options
        self.conn = connect(options.url, options.tls())
        # A small final iteration stalled 44 ms on Nagle + delayed ACK without this (bench/precopy.py).
        self.conn.set_nodelay()
        try:
            self._migrate()
        except BaseException as exc:
            self._roll_back(exc)
            raise
        finally:
            if self.memory_sender is not None:
                self.memory_sender.close()
            self.conn.close()

    def _migrate(self) -> None:
        conn, vm = self.conn, self.vm
        assert conn is not None
        request_ok(conn, p.Request.start())
        if self.options.local:
            self._send_memory_fds()
        config = json_bytes(vm.migration_config())
        request_ok(conn, p.Request.config(len(config)), config)
        if self.options.local:
            self._pause()
        else:
            self.memory_sender = MemorySender(conn, vm.memory, self.options, self.stats)
            self._precopy()
        capture_begin = time.monotonic()
        state = json_bytes(vm.capture_state())
        self.stats.state_capture_ms = _ms_since(capture_begin)
        send_begin = time.monotonic()
        request_ok(conn, p.Request.state(len(state)), state)
        self.stats.send_state_ms = _ms_since(send_begin)
        complete_begin = time.monotonic()
        request_ok(conn, p.Request.complete() if self.was_running else p.Request.complete_paused())
        self.handed_over = True
        self.stats.complete_ms = _ms_since(complete_begin)
        self.stats.downtime_ms = _ms_since(self.downtime_begin)

    def _send_memory_fds(self) -> None:
        """Local migration: one MemoryFd (slot number + memfd as SCM_RIGHTS) per slot."""
        memory = self.vm.memory
        if not memory.shared:
            raise MigrationError("local migration requires shared memory (memory shared=on)", where="MemoryFd")
        assert self.conn is not None
        for region in memory.regions:
            self.conn.write_all(p.Request.memory_fd().encode())
            self.conn.send_fds(p.encode_memory_fd_slot(region.mapping.slot), [region.zone.fd])
            expect_ok(self.conn, "MemoryFd")
        self.stats.mode = "local"

    def _pause(self) -> None:
        self.downtime_begin = time.monotonic()
        if self.vm.state == VmState.RUNNING:
            self.vm.pause()
            self.paused_by_us = True

    def _precopy(self) -> None:
        """Iterations while the VM runs, then the paused final iteration (``do_memory_migration``)."""
        vm = self.vm
        assert self.memory_sender is not None
        vm.start_dirty_log()
        bandwidth = 0.0  # bytes per second, of the last iteration
        last_log_read = time.monotonic()
        number = 0
        while True:
            begin = time.monotonic()
            if number == 0:
                table = vm.memory.populated_table()
                dirty_rate = 0.0
            else:
                table = vm.dirty_table()
                dirty_rate = table.total_bytes / max(begin - last_log_read, 1e-6)
            last_log_read = begin
            estimated = table.total_bytes / bandwidth if bandwidth else None
            if self._converged(table, estimated):
                break
            transfer_begin = time.monotonic()
            self.memory_sender.send(table)
            duration = time.monotonic() - transfer_begin
            bandwidth = table.total_bytes / max(duration, 1e-6)
            self._record(number, table, duration, bandwidth, dirty_rate, estimated)
            number += 1
        remaining = table
        self._pause()
        final_begin = time.monotonic()
        final = vm.dirty_table()
        final_dirty_rate = final.total_bytes / max(final_begin - last_log_read, 1e-6)
        final.extend(remaining)
        vm.stop_dirty_log()
        self.memory_sender.send(final)
        # Close the workers now: the destination waits for them to end before it restores State.
        self.memory_sender.close()
        duration = time.monotonic() - final_begin
        self.stats.final_iteration_ms = round(duration * 1000, 3)
        self._record(number, final, duration, final.total_bytes / max(duration, 1e-6), final_dirty_rate,
                     final.total_bytes / bandwidth if bandwidth else None, final=True)

    def _converged(self, table: p.MemoryRangeTable, estimated_s: float | None) -> bool:
        if not table:
            log.debug("precopy: nothing left to transfer")
            return True
        if estimated_s is not None and estimated_s * 1000 <= self.options.downtime_ms:
            log.debug("precopy: target downtime can be met: %.1f ms", estimated_s * 1000)
            return True
        if self.stats.elapsed() >= self.options.timeout_s:
            if self.options.timeout_strategy == "cancel":
                raise ConvergenceError(
                    f"precopy did not converge within {self.options.timeout_s} s "
                    f"(estimated downtime {estimated_s * 1000 if estimated_s else float('inf'):.0f} ms, "
                    f"goal {self.options.downtime_ms} ms)",
                    where="precopy",
                )
            log.info("precopy: timeout of %d s reached, finishing anyway (timeout_strategy=ignore)",
                     self.options.timeout_s)
            return True
        return False

    def _record(self, number: int, table: p.MemoryRangeTable, duration: float, bandwidth: float,
                dirty_rate: float, estimated: float | None, final: bool = False) -> None:
        iteration = Iteration(
            iteration=number,
            bytes=table.total_bytes,
            ranges=len(table),
            duration_ms=round(duration * 1000, 3),
            bandwidth_mib_s=round(bandwidth / MiB, 1),
            dirty_rate_mib_s=round(dirty_rate / MiB, 1),
            estimated_downtime_ms=None if estimated is None else round(estimated * 1000, 3),
            final=final,
        )
        self.stats.iterations.append(iteration)
        self.stats.total_bytes += table.total_bytes
        log.debug("precopy iteration %s", iteration)

    def _roll_back(self, exc: BaseException) -> None:
        """The migration failed before hand-over: leave the source as it was."""
        if self.handed_over:
            return
        try:
            self.vm.stop_dirty_log()
        except Exception as stop_error:  # keep the original error; this one is only logged
            log.warning("could not turn dirty logging off: %s", stop_error)
        if isinstance(exc, ConvergenceError) and self.conn is not None:
            try:  # a healthy connection: tell the destination to drop its half-built VM
                send_request(self.conn, p.Request.abandon())
                expect_ok(self.conn, "Abandon")
            except Exception:
                pass
        if self.paused_by_us and self.vm.state == VmState.PAUSED:
            self.vm.resume()
        log.warning("migration failed, the VM stays here (%s): %s", self.vm.state, exc)


def json_bytes(document: dict) -> bytes:
    import json

    return json.dumps(document, separators=(",", ":")).encode()


def _ms_since(begin: float) -> float:
    return round((time.monotonic() - begin) * 1000, 3)


def send_migration(vmm, options: SendOptions) -> MigrationStats:  # noqa: ANN001 - Vmm (import cycle)
    """``vm.send-migration``: run the migration; on success the VM is gone (unless preserve_source)."""
    vm = vmm.require_vm()
    stats = MigrationStats(role="source", url=options.destination_url, connections=options.connections,
                           mode="local" if options.local else options.memory_mode,
                           downtime_goal_ms=options.downtime_ms)
    vmm.migration = stats
    sender = Sender(vm, options, stats)
    try:
        sender.run()
    except BaseException as exc:
        status = "cancelled" if isinstance(exc, ConvergenceError) else "failed"
        stats.finish(status, str(exc))
        log.warning(stats.summary())
        raise
    stats.finish("completed")
    log.info(stats.summary())
    if options.preserve_source:
        log.info("preserve_source=on: the source VM stays here, paused")
    else:
        vmm.retire_vm()
    return stats
