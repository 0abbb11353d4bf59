"""Shared helpers of the benchmarks: import path, table header, tables, memory, statistics.

Every benchmark is a plain script (``python3 bench/NAME.py [--quick]``): it
measures chmig and a baseline in the same run and prints one table per
question, each headed by the machine, the date and the commit.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import mmap
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parent.parent
# The benchmarks import chmig from this checkout, and so do the chmig processes they start.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))

GiB = 1 << 30
MiB = 1 << 20
PAGE_SIZE = 4096

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
_libc.memchr.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
_libc.memchr.restype = ctypes.c_void_p
MADV_POPULATE_WRITE = 23


# ---------------------------------------------------------------------------------------------
# Header and tables
# ---------------------------------------------------------------------------------------------


def _commit() -> str:
    """``git rev-parse --short HEAD`` (read-only), plus a mark if chmig/ differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
        # --no-optional-locks: never refresh the index; diff only compares, it changes nothing.
        dirty = subprocess.run(["git", "--no-optional-locks", "diff", "--quiet", "HEAD", "--", "chmig"],
                               cwd=ROOT, capture_output=True, timeout=10).returncode
        return head + (" (+ uncommitted changes in chmig/)" if dirty == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    kvm = "PVM" if Path("/sys/module/kvm_pvm").exists() else "KVM"
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, Linux {platform.release()}, "
            f"/dev/kvm = {kvm}, Python {platform.python_version()}")


_HEADER: str | None = None


def header() -> str:
    global _HEADER
    if _HEADER is None:
        now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        _HEADER = f"machine: {_machine()}\ndate: {now}   commit: {_commit()}"
    return _HEADER


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]], notes: Sequence[str] = ()) -> None:
    """Print one table: title, machine/date/commit, aligned columns, then notes."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = "-+-".join("-" * w for w in widths)
    out = ["", f"== {title}", header(), line,
           " | ".join(c.ljust(w) for c, w in zip(columns, widths)), line]
    for row in cells:
        out.append(" | ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)))
    out.append(line)
    out.extend(f"  {n}" for n in notes)
    print("\n".join(out), flush=True)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.2f}"
        return f"{value:.2g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _numeric(text: str) -> bool:
    return bool(text) and (text[0].isdigit() or (text[0] == "-" and len(text) > 1))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The guest's verdict: a benchmark of a broken migration measures nothing
# ---------------------------------------------------------------------------------------------


class BenchmarkFailed(RuntimeError):
    """What was measured broke (a guest found bad memory): the numbers are void and the run must fail."""


def check_guest(what: str, info: dict) -> None:
    """Raise :class:`BenchmarkFailed`, naming ``what`` (e.g. ``hop tcp, 2 conn (rep 1)``), unless the
    guest in ``info`` (a ``vm.info`` answer, from the API or in-process) runs with zero errors.

    Call it once the guest has re-checked its memory (a full verify round after the migration): before,
    errors a migration caused may not be counted yet.
    """
    guest = info.get("guest") or {}
    if info.get("state") != "Running":
        raise BenchmarkFailed(f"{what}: the guest is {info.get('state')} after the migration, not Running")
    errors = guest.get("errors", 0)
    if errors:
        raise BenchmarkFailed(
            f"{what}: the guest reported {errors} memory error(s) after re-checking its memory "
            f"(last bad page at gpa {guest.get('last_error_gpa', 0):#x}): the migration broke it")


def exit_status(main: Callable[[], int]) -> int:
    """Run a benchmark's ``main``; a :class:`BenchmarkFailed` becomes one clear line on stderr and exit 1.

    Anything else propagates with its traceback (a bug in the benchmark, not a verdict on chmig).
    """
    try:
        return main()
    except BenchmarkFailed as failure:
        print(f"{Path(sys.argv[0]).name}: FAILED: {failure}", file=sys.stderr, flush=True)
        return 1


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    """All samples, for the reader who wants to see the noise."""
    return "/".join(fmt.format(v) for v in values)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def address_of(m: mmap.mmap) -> int:
    holder = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder


def anonymous(size: int) -> mmap.mmap:
    """A fresh ``MAP_PRIVATE|MAP_ANONYMOUS`` mapping: no page is backed yet."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def populate(m: mmap.mmap, size: int | None = None) -> float:
    """``MADV_POPULATE_WRITE`` the whole mapping (what chmig's receiver does); return the seconds it took."""
    address = address_of(m)
    begin = time.perf_counter()
    if _libc.madvise(address, size or len(m), MADV_POPULATE_WRITE) != 0:
        raise OSError(ctypes.get_errno(), f"MADV_POPULATE_WRITE: {os.strerror(ctypes.get_errno())}")
    return time.perf_counter() - begin


def populate_parallel(m: mmap.mmap, threads: int) -> float:
    """``MADV_POPULATE_WRITE`` in ``threads`` threads, one slice each (ctypes releases the GIL); seconds."""
    address, size = address_of(m), len(m)
    part = -(-size // threads // PAGE_SIZE) * PAGE_SIZE

    def one(k: int) -> Callable[[], None]:
        def body() -> None:
            start = k * part
            length = min(part, size - start)
            if length > 0 and _libc.madvise(address + start, length, MADV_POPULATE_WRITE) != 0:
                raise OSError(ctypes.get_errno(), "MADV_POPULATE_WRITE")
        return body

    return run_threads([one(k) for k in range(threads)])


def memchr(address: int, byte: int, size: int) -> int | None:
    """libc ``memchr`` through ctypes: C speed, and ctypes releases the GIL during the call."""
    return _libc.memchr(address, byte, size)


# ---------------------------------------------------------------------------------------------
# Processes and folders
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def processes(prefix: str) -> Iterator["object"]:
    """A temp folder with a :class:`chmig.harness.Processes` in it; every process stopped, folder removed."""
    from chmig.harness import Processes

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    procs = Processes(folder, verbose=False)
    try:
        yield procs
    finally:
        procs.stop_all()
        shutil.rmtree(folder, ignore_errors=True)


def run_threads(targets: Sequence[Callable[[], None]]) -> float:
    """Start one thread per target at once, join them all, re-raise the first error; return the seconds."""
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                fn()
            except BaseException as exc:  # reported to the caller below
                errors.append(exc)
        return body

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - begin
    if errors:
        raise errors[0]
    return elapsed


def socket_pairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    """``n`` connected loopback TCP pairs (sender, receiver), default socket options, as chmig's."""
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        port = listener.getsockname()[1]
        pairs = []
        for _ in range(n):
            sender = socket.create_connection(("127.0.0.1", port))
            receiver, _ = listener.accept()
            pairs.append((sender, receiver))
        return pairs
    finally:
        listener.close()


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got, total = 0, view.nbytes
    while got < total:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError(f"peer closed after {got} of {total} bytes")
        got += n
