"""Tests of chmig.uffd against the real userfaultfd of this kernel (no mocks).

The expected struct sizes, offsets and ioctl numbers are literals from the
kernel ABI (x86-64 ``<linux/userfaultfd.h>``, compiled with gcc and printed
with sizeof/offsetof/the ioctl macros): never computed with the module under
test.

Every access to registered memory that may be missing is made by a helper
thread through code that releases the GIL (``ctypes.memmove``, ``os.write``
of a memoryview, ``os.readv`` into one): a Python-level access would sleep in
the page fault holding the GIL and the test would deadlock (see the module
docstring of chmig.uffd).  The main thread reads registered memory directly
only once every page of it is known to be present.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from chmig import ioctl as chmig_ioctl
from chmig import kvm, uffd
from chmig.errors import UffdError
from chmig.uffd import PageFault, Userfaultfd, address_of, ffi

pytestmark = pytest.mark.timeout(60)

PAGE = 4096
WAIT = 10.0  # seconds any single expected event may take


def _require_userfaultfd() -> None:
    """Skip only if neither /dev/userfaultfd nor the userfaultfd(2) system call gives us one."""
    try:
        fd = uffd._open_userfaultfd(prefer_device=True)
    except UffdError as exc:
        pytest.skip(f"no userfaultfd on this machine: {exc}")
    os.close(fd)


# --------------------------------------------------------------------------
# ABI: sizes, offsets, ioctl numbers (literals from the kernel headers)
# --------------------------------------------------------------------------

STRUCT_SIZES = {
    "struct uffd_msg": 32,
    "struct uffdio_api": 24,
    "struct uffdio_range": 16,
    "struct uffdio_register": 32,
    "struct uffdio_copy": 40,
    "struct uffdio_zeropage": 32,
    "struct uffdio_writeprotect": 24,
    "struct uffdio_continue": 32,
    "struct uffdio_poison": 32,
    "struct uffdio_move": 40,
}


@pytest.mark.parametrize("ctype,size", sorted(STRUCT_SIZES.items()))
def test_struct_size_matches_kernel_abi(ctype: str, size: int) -> None:
    assert ffi.sizeof(ctype) == size


STRUCT_OFFSETS = [
    ("struct uffd_msg", ("event",), 0),
    ("struct uffd_msg", ("reserved1",), 1),
    ("struct uffd_msg", ("reserved2",), 2),
    ("struct uffd_msg", ("reserved3",), 4),
    ("struct uffd_msg", ("arg",), 8),
    ("struct uffd_msg", ("arg", "pagefault", "flags"), 8),
    ("struct uffd_msg", ("arg", "pagefault", "address"), 16),
    ("struct uffd_msg", ("arg", "pagefault", "feat", "ptid"), 24),
    ("struct uffd_msg", ("arg", "fork", "ufd"), 8),
    ("struct uffd_msg", ("arg", "remap", "from"), 8),
    ("struct uffd_msg", ("arg", "remap", "to"), 16),
    ("struct uffd_msg", ("arg", "remap", "len"), 24),
    ("struct uffd_msg", ("arg", "remove", "start"), 8),
    ("struct uffd_msg", ("arg", "remove", "end"), 16),
    ("struct uffdio_api", ("features",), 8),
    ("struct uffdio_api", ("ioctls",), 16),
    ("struct uffdio_register", ("mode",), 16),
    ("struct uffdio_register", ("ioctls",), 24),
    ("struct uffdio_copy", ("mode",), 24),
    ("struct uffdio_copy", ("copy",), 32),
    ("struct uffdio_zeropage", ("zeropage",), 24),
    ("struct uffdio_continue", ("mapped",), 24),
    ("struct uffdio_poison", ("updated",), 24),
    ("struct uffdio_move", ("move",), 32),
]


@pytest.mark.parametrize(
    "ctype,fields,offset", STRUCT_OFFSETS, ids=[f"{c[7:]}.{'.'.join(f)}" for c, f, _ in STRUCT_OFFSETS]
)
def test_field_offset_matches_kernel_abi(ctype: str, fields: tuple[str, ...], offset: int) -> None:
    assert ffi.offsetof(ctype, *fields) == offset


def test_uffd_msg_nested_sizes_match_gcc() -> None:
    # gcc's __packed does not shrink the nested pagefault struct (24 bytes), nor the union.
    msg = ffi.new("struct uffd_msg *")
    assert ffi.sizeof(msg.arg) == 24
    assert ffi.sizeof(msg.arg.pagefault) == 24


IOCTL_NUMBERS = {
    "UFFDIO_API": 0xC018AA3F,
    "UFFDIO_REGISTER": 0xC020AA00,
    "UFFDIO_UNREGISTER": 0x8010AA01,
    "UFFDIO_WAKE": 0x8010AA02,
    "UFFDIO_COPY": 0xC028AA03,
    "UFFDIO_ZEROPAGE": 0xC020AA04,
    "UFFDIO_MOVE": 0xC028AA05,
    "UFFDIO_WRITEPROTECT": 0xC018AA06,
    "UFFDIO_CONTINUE": 0xC020AA07,
    "UFFDIO_POISON": 0xC020AA08,
    "USERFAULTFD_IOC_NEW": 0xAA00,
}


@pytest.mark.parametrize("name,number", sorted(IOCTL_NUMBERS.items()))
def test_ioctl_number_matches_kernel_header(name: str, number: int) -> None:
    assert getattr(uffd, name) == number


def test_constants_match_kernel_header() -> None:
    assert uffd.UFFD_API == 0xAA
    assert (uffd.UFFD_EVENT_PAGEFAULT, uffd.UFFD_EVENT_FORK, uffd.UFFD_EVENT_REMAP) == (0x12, 0x13, 0x14)
    assert (uffd.UFFD_EVENT_REMOVE, uffd.UFFD_EVENT_UNMAP) == (0x15, 0x16)
    assert (uffd.UFFD_PAGEFAULT_FLAG_WRITE, uffd.UFFD_PAGEFAULT_FLAG_WP, uffd.UFFD_PAGEFAULT_FLAG_MINOR) == (1, 2, 4)
    assert (
        uffd.UFFDIO_REGISTER_MODE_MISSING,
        uffd.UFFDIO_REGISTER_MODE_WP,
        uffd.UFFDIO_REGISTER_MODE_MINOR,
    ) == (1, 2, 4)
    assert uffd.UFFDIO_COPY_MODE_DONTWAKE == 1
    assert uffd.UFFDIO_ZEROPAGE_MODE_DONTWAKE == 1
    assert uffd.UFFDIO_CONTINUE_MODE_DONTWAKE == 1
    assert uffd.UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0x1
    assert uffd.UFFD_FEATURE_EVENT_FORK == 0x2
    assert uffd.UFFD_FEATURE_MISSING_SHMEM == 0x20
    assert uffd.UFFD_FEATURE_THREAD_ID == 0x100
    assert uffd.UFFD_FEATURE_MINOR_SHMEM == 0x400
    assert uffd.UFFD_FEATURE_EXACT_ADDRESS == 0x800
    assert uffd.UFFD_FEATURE_MOVE == 0x10000
    assert uffd.UFFD_API_FEATURES == 0x1FFFF  # every feature bit up to MOVE (Linux 6.8 .. 6.18)
    assert uffd.feature_names(0x120) == ["MISSING_SHMEM", "THREAD_ID"]


def test_shared_ioctl_helpers() -> None:
    # The macros read like the kernel's, with sizeof(argtype) passed as a number.
    assert chmig_ioctl._IOWR(0xAA, 0x3F, 24) == 0xC018AA3F
    assert chmig_ioctl._IOR(0xAE, 0x81, 144) == 0x8090AE81
    assert chmig_ioctl._IOW(0xAE, 0x46, 32) == 0x4020AE46
    assert chmig_ioctl._IO(0xAE, 0x80) == 0xAE80
    with pytest.raises(ValueError):
        chmig_ioctl._IOW(0xAE, 0x00, 1 << 14)
    # kvm and uffd both re-export the one address_of (and kvm keeps its macro names).
    assert kvm.address_of is chmig_ioctl.address_of is uffd.address_of
    assert kvm._IOC is chmig_ioctl._IOC and kvm._IOWR is chmig_ioctl._IOWR
    assert kvm.KVM_GET_REGS == 0x8090AE81 and kvm.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    # The generic ioctl raises a plain OSError (callers wrap it).
    with open("/dev/null", "rb") as null, pytest.raises(OSError) as info:
        chmig_ioctl.ioctl(null.fileno(), uffd.UFFDIO_API, ffi.new("struct uffdio_api *"))
    assert info.value.errno == errno.ENOTTY


# --------------------------------------------------------------------------
# Helpers: memory, threads that fault without holding the GIL, a fault waiter
# --------------------------------------------------------------------------


class Background:
    """A daemon thread running ``fn``; ``result()`` joins it (bounded) and returns or re-raises."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._fn = fn
        self._outcome: list[Any] = []
        self.native_id: int | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        assert self.started.wait(WAIT)

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        self.started.set()
        try:
            self._outcome.append(("ok", self._fn()))
        except BaseException as exc:  # handed to the test by result()
            self._outcome.append(("error", exc))

    def done(self, timeout: float = 0.0) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def result(self, timeout: float = WAIT) -> Any:
        assert self.done(timeout), f"{self.thread.name} still blocked after {timeout} s"
        kind, value = self._outcome[0]
        if kind == "error":
            raise value
        return value


def read_memmove(address: int, length: int) -> bytes:
    """Read user memory with ctypes.memmove: a user-mode fault, GIL released by ctypes."""
    buffer = ctypes.create_string_buffer(length)
    ctypes.memmove(buffer, address, length)
    return buffer.raw


def read_via_pipe(mem: mmap.mmap, offset: int, length: int) -> bytes:
    """Read a mapping through os.write of a memoryview: the kernel faults (kernel mode), GIL released."""
    r, w = os.pipe()
    try:
        with memoryview(mem) as view, view[offset : offset + length] as part:
            written = os.write(w, part)
        return os.read(r, written)
    finally:
        os.close(r)
        os.close(w)


def write_via_pipe(mem: mmap.mmap, offset: int, data: bytes) -> int:
    """Write into a mapping with os.readv from a pipe: a kernel-mode *write* fault, GIL released."""
    r, w = os.pipe()
    try:
        os.write(w, data)
        with memoryview(mem) as view, view[offset : offset + len(data)] as part:
            return os.readv(r, [part])
    finally:
        os.close(r)
        os.close(w)


def wait_faults(u: Userfaultfd, count: int = 1, timeout: float = WAIT) -> list[PageFault]:
    """Poll the userfaultfd until ``count`` page faults were read."""
    poller = select.poll()
    poller.register(u.fileno(), select.POLLIN)
    faults: list[PageFault] = []
    deadline = time.monotonic() + timeout
    while len(faults) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(faults)} of {count} faults after {timeout} s: {faults}"
        if poller.poll(remaining * 1000):
            faults += u.read_faults()
    return faults


class Lab:
    """Userfaultfds, mappings and faulting threads of one test, torn down in a safe order.

    Order matters: closing the userfaultfds first wakes every thread still
    sleeping in a fault (it then completes as an ordinary fault); only then
    are the threads joined and the mappings unmapped - unmapping memory a
    thread still waits on would make it crash with SIGSEGV when woken.
    """

    def __init__(self) -> None:
        self.uffds: list[Userfaultfd] = []
        self.maps: list[mmap.mmap] = []
        self.fds: list[int] = []
        self.threads: list[Background] = []

    def uffd(self, features: int = 0, **kwargs: Any) -> Userfaultfd:
        u = Userfaultfd(features, **kwargs)
        self.uffds.append(u)
        return u

    def anon(self, pages: int) -> tuple[mmap.mmap, int]:
        mem = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.maps.append(mem)
        return mem, address_of(mem)

    def memfd(self, pages: int) -> int:
        fd = os.memfd_create("chmig-uffd-test", os.MFD_CLOEXEC)
        self.fds.append(fd)
        os.ftruncate(fd, pages * PAGE)
        return fd

    def map_shared(self, fd: int, pages: int) -> tuple[mmap.mmap, int]:
        mem = mmap.mmap(fd, pages * PAGE, flags=mmap.MAP_SHARED)
        self.maps.append(mem)
        return mem, address_of(mem)

    def start(self, fn: Callable[[], Any], name: str = "toucher") -> Background:
        thread = Background(fn, name)
        self.threads.append(thread)
        return thread

    def close(self) -> None:
        for u in self.uffds:
            u.close()
        for thread in self.threads:
            thread.done(WAIT)
        for mem in self.maps:
            try:
                mem.close()
            except BufferError:  # a thread still blocked holds a view: leave the mapping
                pass
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def lab() -> Iterator[Lab]:
    _require_userfaultfd()
    state = Lab()
    try:
        yield state
    finally:
        state.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --------------------------------------------------------------------------
# Opening, the API handshake, closing
# --------------------------------------------------------------------------


def test_open_offers_features_and_records_the_request(lab: Lab) -> None:
    wanted = uffd.UFFD_FEATURE_THREAD_ID | uffd.UFFD_FEATURE_MISSING_SHMEM
    u = lab.uffd(wanted)
    assert u.fd >= 0 and u.fileno() == u.fd
    assert u.requested == wanted
    assert u.features & wanted == wanted  # the kernel offers what it enabled (and more)
    # UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER are always there.
    assert u.ioctls & (1 << 0x3F | 1 << 0x00 | 1 << 0x01) == (1 << 0x3F | 1 << 0x00 | 1 << 0x01)
    flags = int(open(f"/proc/self/fdinfo/{u.fd}").read().split("flags:")[1].split()[0], 8)
    assert flags & os.O_NONBLOCK and flags & os.O_CLOEXEC
    assert os.readlink(f"/proc/self/fd/{u.fd}") == "anon_inode:[userfaultfd]"


def test_feature_not_offered_is_named(lab: Lab) -> None:
    before = open_fds()
    with pytest.raises(UffdError) as info:
        lab.uffd(uffd.UFFD_FEATURE_THREAD_ID | 1 << 40)
    assert info.value.where == "UFFDIO_API"
    assert "0x10000000000" in str(info.value) and "does not offer" in str(info.value)
    assert "THREAD_ID" not in str(info.value)  # offered, so not blamed
    assert info.value.errno == errno.EINVAL  # type: ignore[attr-defined]
    assert open_fds() == before  # neither the fd nor the probe's leaked


def test_close_is_idempotent_and_releases_the_fd(lab: Lab) -> None:
    before = open_fds()
    u = Userfaultfd()
    assert open_fds() == before + 1  # the /dev/userfaultfd node was closed again
    u.close()
    assert open_fds() == before
    u.close()
    assert open_fds() == before
    with pytest.raises(UffdError):
        u.fileno()
    with Userfaultfd() as v:
        assert open_fds() == before + 1
    assert v.fd == -1 and open_fds() == before


def test_syscall_fallback(lab: Lab) -> None:
    try:
        fd = uffd._userfaultfd_syscall(os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        pytest.skip(f"the userfaultfd(2) system call is not available here: {exc}")
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    os.close(fd)
    fd = uffd._open_userfaultfd(prefer_device=False)
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    os.close(fd)

    # A whole fault cycle on a syscall-made userfaultfd.
    u = lab.uffd(uffd.UFFD_FEATURE_THREAD_ID, prefer_device=False)
    mem, base = lab.anon(1)
    u.register(base, PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
    reader = lab.start(lambda: read_memmove(base, PAGE))
    (fault,) = wait_faults(u)
    assert fault.address == base and fault.ptid == reader.native_id
    page = bytearray(b"s" * PAGE)
    assert u.copy(base, address_of(page), PAGE) == PAGE
    assert reader.result() == bytes(page)


def test_read_faults_returns_empty_when_nothing_is_pending(lab: Lab) -> None:
    u = lab.uffd()
    assert u.read_faults() == []
    mem, base = lab.anon(2)
    u.register(base, 2 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
    assert u.read_faults() == []
    with pytest.raises(UffdError):
        u.read_faults(0)


# --------------------------------------------------------------------------
# Faults resolved
# --------------------------------------------------------------------------


def test_anonymous_fault_resolved_by_copy(lab: Lab) -> None:
    u = lab.uffd(uffd.UFFD_FEATURE_THREAD_ID)
    mem, base = lab.anon(4)
    ioctls = u.register(base, 4 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
    assert ioctls & (1 << 0x03) and ioctls & (1 << 0x04) and ioctls & (1 << 0x02)  # COPY, ZEROPAGE, WAKE

    reader = lab.start(lambda: read_memmove(base + PAGE + 100, 50))  # user-mode read of page 1
    (fault,) = wait_faults(u)
    assert fault.address == base + PAGE  # masked to the page (no UFFD_FEATURE_EXACT_ADDRESS)
    assert fault.ptid == reader.native_id
    assert not fault.write and not fault.minor and not fault.wp
    assert not reader.done(0.1)  # still asleep in the fault

    page = bytearray(range(256)) * (PAGE // 256)
    assert u.copy(base + PAGE, address_of(page), PAGE) == PAGE
    assert reader.result() == bytes(page[100:150])
    assert mem[PAGE : 2 * PAGE] == page  # present now: safe to read from Python


def test_kernel_mode_fault_via_write_syscall(lab: Lab) -> None:
    u = lab.uffd()
    mem, base = lab.anon(2)
    u.register(base, 2 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)

    reader = lab.start(lambda: read_via_pipe(mem, 0, 2 * PAGE))  # write(2) from the mapping
    page0 = bytearray(b"0" * PAGE)
    page1 = bytearray(b"1" * PAGE)
    (fault,) = wait_faults(u)
    assert fault.address == base and fault.ptid == 0  # no UFFD_FEATURE_THREAD_ID asked for
    assert u.copy(base, address_of(page0), PAGE) == PAGE
    (fault,) = wait_faults(u)
    assert fault.address == base + PAGE
    assert u.copy(base + PAGE, address_of(page1), PAGE) == PAGE
    assert reader.result() == bytes(page0 + page1)


def test_write_fault_is_flagged(lab: Lab) -> None:
    u = lab.uffd()
    mem, base = lab.anon(1)
    u.register(base, PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)

    writer = lab.start(lambda: write_via_pipe(mem, 10, b"written"))  # readv(2) into the mapping
    (fault,) = wait_faults(u)
    assert fault.write and fault.address == base
    page = bytearray(b"." * PAGE)
    assert u.copy(base, address_of(page), PAGE) == PAGE
    assert writer.result() == 7
    assert mem[:20] == b".........." + b"written" + b"..."  # the copy first, then the write on top


def test_memfd_missing_fault_resolved_by_copy(lab: Lab) -> None:
    u = lab.uffd(uffd.UFFD_FEATURE_MISSING_SHMEM)
    fd = lab.memfd(2)
    mem, base = lab.map_shared(fd, 2)
    u.register(base, 2 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)

    reader = lab.start(lambda: read_memmove(base + PAGE, PAGE))
    (fault,) = wait_faults(u)
    assert fault.address == base + PAGE and not fault.minor
    page = bytearray(b"m" * PAGE)
    assert u.copy(base + PAGE, address_of(page), PAGE) == PAGE
    assert reader.result() == bytes(page)
    assert os.pread(fd, PAGE, PAGE) == bytes(page)  # UFFDIO_COPY filled the shared page cache


def test_memfd_minor_fault_resolved_by_continue(lab: Lab) -> None:
    u = lab.uffd(uffd.UFFD_FEATURE_MISSING_SHMEM | uffd.UFFD_FEATURE_MINOR_SHMEM)
    fd = lab.memfd(2)
    mem, base = lab.map_shared(fd, 2)
    ioctls = u.register(base, 2 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING | uffd.UFFDIO_REGISTER_MODE_MINOR)
    assert ioctls & (1 << 0x07)  # UFFDIO_CONTINUE

    # Page 0 arrives through the file (the "second mapping"): it is in the page
    # cache but not mapped here, so touching it here is a *minor* fault.
    os.pwrite(fd, b"c" * PAGE, 0)
    reader = lab.start(lambda: read_memmove(base, PAGE))
    (fault,) = wait_faults(u)
    assert fault.minor and fault.address == base
    assert u.continue_range(base, PAGE) == PAGE
    assert reader.result() == b"c" * PAGE

    # Page 1 is not in the page cache at all: a missing fault, which CONTINUE cannot resolve.
    reader = lab.start(lambda: read_memmove(base + PAGE, PAGE))
    (fault,) = wait_faults(u)
    assert not fault.minor and fault.address == base + PAGE
    with pytest.raises(UffdError) as info:
        u.continue_range(base + PAGE, PAGE)
    assert info.value.where == "UFFDIO_CONTINUE"
    page = bytearray(b"C" * PAGE)
    assert u.copy(base + PAGE, address_of(page), PAGE) == PAGE
    assert reader.result() == bytes(page)

    # Continuing a page that is mapped already is skipped (EEXIST), not an error.
    assert u.continue_range(base, 2 * PAGE) == 0


def test_copy_skips_a_present_page_without_overwriting_it(lab: Lab) -> None:
    u = lab.uffd()
    mem, base = lab.anon(4)
    u.register(base, 4 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
    early = bytearray(b"E" * PAGE)
    assert u.copy(base + 2 * PAGE, address_of(early), PAGE) == PAGE

    late = bytearray(b"L" * 4 * PAGE)
    assert u.copy(base, address_of(late), 4 * PAGE) == 3 * PAGE  # page 2 not counted
    assert mem[: 2 * PAGE] == b"L" * 2 * PAGE
    assert mem[2 * PAGE : 3 * PAGE] == b"E" * PAGE  # never overwritten
    assert mem[3 * PAGE :] == b"L" * PAGE

    # Everything present: nothing copied, nothing raised.
    assert u.copy(base, address_of(late), 4 * PAGE) == 0
    assert u.copy(base, address_of(late), 4 * PAGE, wake=False) == 0
    assert mem[2 * PAGE : 3 * PAGE] == b"E" * PAGE


def test_copy_skips_a_present_first_page(lab: Lab) -> None:
    u = lab.uffd()
    mem, base = lab.anon(3)
    u.register(base, 3 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
    first = bytearray(b"1" * PAGE)
    assert u.copy(base, address_of(first), PAGE) == PAGE
    rest = bytearray(b"r" * 3 * PAGE)
    assert u.copy(base, address_of(rest), 3 * PAGE) == 2 * PAGE
    assert mem[:] == b"1" * PAGE + b"r" * 2 * PAGE


def test_kernel_convention_of_the_copy_field(lab: Lab) -> None:
    """What the raw UFFDIO_COPY reports (the rules copy() is built on).

    Present page after some copied ones: the ioctl fails with EAGAIN and
    ``copy`` holds the bytes copied.  Present first page: it fails with
    EEXIST and ``copy`` holds -EEXIST.  (And fcntl.ioctl copies the struct
    back even when the ioctl fails, or none of this would be visible.)
    """
    u = lab.uffd()
    mem, base = lab.anon(4)
    u.register(base, 4 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
    src = bytearray(b"x" * 4 * PAGE)
    assert u.copy(base + 2 * PAGE, address_of(src), PAGE) == PAGE

    arg = ffi.new("struct uffdio_copy *", {"dst": base, "src": address_of(src), "len": 4 * PAGE})
    with pytest.raises(OSError) as info:
        chmig_ioctl.ioctl(u.fd, uffd.UFFDIO_COPY, arg)
    assert info.value.errno == errno.EAGAIN and arg.copy == 2 * PAGE

    arg = ffi.new("struct uffdio_copy *", {"dst": base + 2 * PAGE, "src": address_of(src), "len": 2 * PAGE})
    with pytest.raises(OSError) as info:
        chmig_ioctl.ioctl(u.fd, uffd.UFFDIO_COPY, arg)
    assert info.value.errno == errno.EEXIST and arg.copy == -errno.EEXIST
    assert u.copy(base + 3 * PAGE, address_of(src), PAGE) == PAGE


def test_zeropage(lab: Lab) -> None:
    u = lab.uffd()
    mem, base = lab.anon(2)
    u.register(base, 2 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)

    reader = lab.start(lambda: read_memmove(base, 2 * PAGE))
    (fault,) = wait_faults(u)
    assert fault.address == base
    assert u.zeropage(base, 2 * PAGE) == 2 * PAGE  # both pages at once, the faulting one woken
    assert reader.result() == bytes(2 * PAGE)
    assert u.zeropage(base, 2 * PAGE) == 0  # present: skipped
    assert u.read_faults() == []


def test_wake(lab: Lab) -> None:
    u = lab.uffd()
    mem, base = lab.anon(1)
    u.register(base, PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)

    reader = lab.start(lambda: read_memmove(base, 8))
    wait_faults(u)
    page = bytearray(b"w" * PAGE)
    assert u.copy(base, address_of(page), PAGE, wake=False) == PAGE
    assert not reader.done(0.3)  # the page is there, but nobody woke the reader
    u.wake(base, PAGE)
    assert reader.result() == b"w" * 8


def test_unregister_makes_the_memory_ordinary_again(lab: Lab) -> None:
    u = lab.uffd()
    mem, base = lab.anon(2)
    u.register(base, 2 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
    u.unregister(base, 2 * PAGE)
    reader = lab.start(lambda: read_memmove(base, 2 * PAGE))
    assert reader.result() == bytes(2 * PAGE)  # no fault message: an ordinary zero page
    assert u.read_faults() == []
    mem[0:5] = b"plain"  # and Python itself may touch it again
    assert mem[0:5] == b"plain"


def test_two_threads_faulting_on_the_same_page(lab: Lab) -> None:
    u = lab.uffd(uffd.UFFD_FEATURE_THREAD_ID)
    mem, base = lab.anon(1)
    u.register(base, PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)

    first = lab.start(lambda: read_memmove(base, 16), "toucher-1")
    second = lab.start(lambda: read_memmove(base + 64, 16), "toucher-2")
    faults = wait_faults(u, 2)  # one message per faulting thread
    assert {f.address for f in faults} == {base}
    assert {f.ptid for f in faults} == {first.native_id, second.native_id}

    page = bytearray(b"t" * PAGE)
    copied = [u.copy(f.address, address_of(page), PAGE) for f in faults]
    assert copied == [PAGE, 0]  # the second finds the page present: EEXIST skipped, woken, no error
    assert first.result() == b"t" * 16
    assert second.result() == b"t" * 16


def test_close_wakes_a_waiting_thread(lab: Lab) -> None:
    u = lab.uffd()
    mem, base = lab.anon(1)
    u.register(base, PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
    reader = lab.start(lambda: read_memmove(base, 8))
    wait_faults(u)
    u.close()  # the kernel drops the registration and wakes the reader ...
    assert reader.result() == bytes(8)  # ... whose retried fault is ordinary: a zero page


# --------------------------------------------------------------------------
# Errors and other events
# --------------------------------------------------------------------------


def test_copy_to_unregistered_memory_is_a_one_line_uffd_error(lab: Lab) -> None:
    u = lab.uffd()
    mem, base = lab.anon(1)
    page = bytearray(PAGE)
    with pytest.raises(UffdError) as info:
        u.copy(base, address_of(page), PAGE)
    assert info.value.where == "UFFDIO_COPY"
    assert info.value.errno == errno.ENOENT  # type: ignore[attr-defined]
    text = str(info.value)
    assert text.startswith("UFFDIO_COPY: ") and "\n" not in text
    assert f"{base:#x}" in text and "ENOENT" in text


def test_bad_ranges_are_refused_before_the_kernel(lab: Lab) -> None:
    u = lab.uffd()
    mem, base = lab.anon(2)
    with pytest.raises(UffdError, match="not aligned"):
        u.register(base + 1, PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
    with pytest.raises(UffdError, match="bad range"):
        u.register(base, 0, uffd.UFFDIO_REGISTER_MODE_MISSING)
    with pytest.raises(UffdError, match="not aligned"):
        u.copy(base, 0, 100)


def test_minor_mode_on_anonymous_memory_is_a_clear_error(lab: Lab) -> None:
    u = lab.uffd()
    mem, base = lab.anon(1)
    with pytest.raises(UffdError) as info:
        u.register(base, PAGE, uffd.UFFDIO_REGISTER_MODE_MINOR)
    assert info.value.where == "UFFDIO_REGISTER"
    assert "MINOR" in str(info.value) and "EINVAL" in str(info.value)


def test_closed_userfaultfd_refuses_operations(lab: Lab) -> None:
    u = lab.uffd()
    u.close()
    with pytest.raises(UffdError, match="closed"):
        u.register(0x10000, PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
    with pytest.raises(UffdError, match="closed"):
        u.read_faults()


def test_non_pagefault_events_are_skipped(lab: Lab) -> None:
    u = lab.uffd(uffd.UFFD_FEATURE_EVENT_REMOVE)
    mem, base = lab.anon(2)
    u.register(base, 2 * PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)
    page = bytearray(b"z" * PAGE)
    u.copy(base, address_of(page), PAGE)

    # madvise(MADV_DONTNEED) raises UFFD_EVENT_REMOVE and waits until it is
    # read: call it through ctypes (GIL released), not mmap.madvise.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advisor = lab.start(lambda: libc.madvise(base, PAGE, mmap.MADV_DONTNEED))
    poller = select.poll()
    poller.register(u.fileno(), select.POLLIN)
    assert poller.poll(WAIT * 1000)
    assert u.read_faults() == []  # the REMOVE event was read and skipped
    assert advisor.result() == 0

    # The page is missing again: a new fault.
    reader = lab.start(lambda: read_memmove(base, 4))
    (fault,) = wait_faults(u)
    assert fault.address == base
    u.copy(base, address_of(page), PAGE)
    assert reader.result() == b"zzzz"


# --------------------------------------------------------------------------
# A vCPU faulting on registered guest memory
# --------------------------------------------------------------------------


def test_vcpu_fault_resolved_by_copy(lab: Lab) -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: this test needs a real KVM host")
    u = lab.uffd()
    mem, base = lab.anon(16)
    # mov al, [0x2000] ; out 0x10, al ; hlt   (real mode, DS = 0)
    code = bytes.fromhex("a00020" "e610" "f4")
    mem[0x1000 : 0x1000 + len(code)] = code
    u.register(base + 0x2000, PAGE, uffd.UFFDIO_REGISTER_MODE_MISSING)

    with kvm.Kvm() as dev, dev.create_vm() as vm:
        vm.set_tss_addr(0xFFFBD000)
        vm.set_user_memory_region(0, 0, 16 * PAGE, base)
        vcpu = vm.create_vcpu(0)
        try:
            vcpu.set_cpuid2(dev.supported_cpuid())
            flat = {"base": 0, "selector": 0}
            vcpu.set_sregs({name: flat for name in ("cs", "ds", "es", "ss")})
            vcpu.set_regs({"rip": 0x1000, "rflags": 0x2})

            runner = lab.start(vcpu.run, "vcpu0")  # KVM_RUN releases the GIL
            (fault,) = wait_faults(u)
            assert fault.address == base + 0x2000
            page = bytearray(b"\x5a" * PAGE)
            assert u.copy(base + 0x2000, address_of(page), PAGE) == PAGE
            assert runner.result() == kvm.KVM_EXIT_IO
            _, _, port, _, data = vcpu.io_exit()
            assert (port, bytes(data)) == (0x10, b"\x5a")
            data.release()
        finally:
            vcpu.close()
            vm.set_user_memory_region(0, 0, 0, 0)
