"""userfaultfd from Python: let this process resolve its own page faults.

What it is for
--------------------------------------------------------------------------
For post-copy live migration the destination starts the guest before its
memory has arrived.  Guest memory is registered with a *userfaultfd*; when a
vCPU (inside ``KVM_RUN``) or any other thread touches a page that is not
there yet, the kernel puts that thread to sleep and queues a message on the
userfaultfd.  A fault-handling thread reads the message
(:meth:`Userfaultfd.read_faults`), obtains the page (from the source, over
the network) and installs it atomically with :meth:`Userfaultfd.copy`
(``UFFDIO_COPY``), which also wakes the sleeping thread; the faulting
access then completes as if the page had always been there.

The model, in the kernel's words (``<linux/userfaultfd.h>``):

``UFFDIO_API``
    handshake: we ask for API ``UFFD_API`` and a set of ``UFFD_FEATURE_*``;
    the kernel answers with every feature it *offers* (it enables only those
    asked for).  Done once, in :class:`Userfaultfd`'s constructor.
``UFFDIO_REGISTER`` with a mode
    ``MISSING``: faults on pages that have no page at all (anonymous memory
    never touched, a shmem/memfd page not in the page cache).
    ``MINOR``: (shmem/hugetlbfs only) faults on pages that *are* in the page
    cache but not mapped in this mapping - the contents were put there
    through another mapping or ``pwrite`` to the file, and
    ``UFFDIO_CONTINUE`` maps them.  ``WP``: write-protect faults.
resolution
    ``UFFDIO_COPY`` (copy bytes into a missing page), ``UFFDIO_ZEROPAGE``
    (map zeros), ``UFFDIO_CONTINUE`` (map the page-cache page for a minor
    fault), each waking the faulting threads unless asked not to;
    ``UFFDIO_WAKE`` wakes explicitly.  A page that is already present is
    never overwritten: the kernel answers ``EEXIST``, and the methods here
    skip such a page and go on (two threads faulting on the same page get
    two messages; the second resolution finds the page present).

The userfaultfd is opened non-blocking: poll it (``select.poll`` on
:meth:`Userfaultfd.fileno`) and :meth:`~Userfaultfd.read_faults` returns
``[]`` when nothing is pending.  It is opened through ``/dev/userfaultfd``
(``USERFAULTFD_IOC_NEW``, Linux >= 6.1, access ruled by the device node's
permissions) and falls back to the ``userfaultfd(2)`` system call.  Neither
path sets ``UFFD_USER_MODE_ONLY``: faults raised *by the kernel* on our
behalf - KVM reading guest memory, ``read``/``write`` system calls whose
buffer is registered memory - must reach the handler too, and through the
system call that needs ``CAP_SYS_PTRACE`` (or ``vm.unprivileged_userfaultfd=1``).

The GIL pitfall
--------------------------------------------------------------------------
A thread that touches a not-yet-present registered page sleeps *inside the
page fault*, in the kernel, until the handler resolves it.  If that thread
is running Python code it **holds the GIL** while it sleeps - a plain
``mem[0]`` or ``bytes(mem[a:b])`` on a registered mmap is such an access.
The fault-handling thread then never gets the GIL back, never reads the
fault, and the process deadlocks (for good: nothing will ever wake the
sleeper).  So in a process with a userfaultfd, **only code that releases
the GIL may touch memory that might be missing**:

* vCPU threads inside ``KVM_RUN`` (``fcntl.ioctl`` releases the GIL; the
  fault happens in KVM, kernel side);
* system calls given the memory as a buffer: ``os.write``/``os.pwrite``/
  ``socket.send`` of a ``memoryview`` of the mapping, ``recv_into`` into it
  (they release the GIL before the kernel copies);
* ctypes foreign calls such as ``ctypes.memmove`` (ctypes releases the GIL
  around the C call).

Python-level reads and writes of registered memory are safe only for pages
known to be present (already copied, or the range unregistered).  The
ioctls and the ``os.read`` of this module release the GIL while they are in
the kernel, like any other system call.

The C declarations
--------------------------------------------------------------------------
Like :mod:`chmig.kvm`, the structs are declared with cffi in ABI mode,
copied from ``include/uapi/linux/userfaultfd.h`` (Linux 6.x) with the same
names and order; the constants follow in the header's order (the header
nests some ``#define`` inside the struct they belong to; they follow the
declarations here).  Request numbers come from :mod:`chmig.ioctl`'s
``_IO``/``_IOR``/``_IOWR`` with the struct sizes, as the header's macros do.

Errors are :class:`chmig.errors.UffdError` whose ``where`` names the ioctl
and whose message names the range and the errno text; ``.errno`` holds the
errno when there was one.
"""

from __future__ import annotations

import errno as _errno
import functools
import logging
import os
import platform
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Self

import cffi

from chmig.errors import UffdError
from chmig.ioctl import _IO, _IOR, _IOWR, LINUX_TYPES_CDEF, address_of, errno_text, ioctl
from chmig.units import PAGE_SIZE

__all__ = [
    "ffi",
    "address_of",
    "PageFault",
    "Userfaultfd",
    "feature_names",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Struct declarations (include/uapi/linux/userfaultfd.h)
# --------------------------------------------------------------------------
#
# struct uffd_msg is ``__packed`` in the header.  Its natural layout is
# already the packed one - every field sits at the same offset, the nested
# pagefault struct is 24 bytes either way and the whole message 32 bytes -
# so it is declared without ``packed=True``: cffi would pack the nested
# structs too (pagefault would shrink to 20 bytes, unlike gcc's).  The only
# difference left is the alignment of the whole struct (1 in C, 8 here),
# which matters to nobody: messages are decoded from the bytes ``read``
# returned.

ffi = cffi.FFI()
ffi.cdef(
    LINUX_TYPES_CDEF
    + """

    /* ------------------------------------------------------------------ */
    /* <linux/userfaultfd.h> (include/uapi/linux/userfaultfd.h)            */
    /* ------------------------------------------------------------------ */

    /* read() structure */
    struct uffd_msg {
        __u8    event;

        __u8    reserved1;
        __u16   reserved2;
        __u32   reserved3;

        union {
            struct {
                __u64   flags;
                __u64   address;
                union {
                    __u32 ptid;
                } feat;
            } pagefault;

            struct {
                __u32   ufd;
            } fork;

            struct {
                __u64   from;
                __u64   to;
                __u64   len;
            } remap;

            struct {
                __u64   start;
                __u64   end;
            } remove;

            struct {
                /* unused reserved fields */
                __u64   reserved1;
                __u64   reserved2;
                __u64   reserved3;
            } reserved;
        } arg;
    };  /* __packed */

    struct uffdio_api {
        /* userland asks for an API number and the features to enable */
        __u64 api;
        /* kernel answers below with the all available features for the API */
        __u64 features;

        __u64 ioctls;
    };

    struct uffdio_range {
        __u64 start;
        __u64 len;
    };

    struct uffdio_register {
        struct uffdio_range range;
        __u64 mode;

        /*
         * kernel answers which ioctl commands are available for the
         * range, keep at the end as the last 8 bytes aren't read.
         */
        __u64 ioctls;
    };

    struct uffdio_copy {
        __u64 dst;
        __u64 src;
        __u64 len;
        __u64 mode;

        /*
         * "copy" is written by the ioctl and must be at the end: the
         * copy_from_user will not read the last 8 bytes.
         */
        __s64 copy;
    };

    struct uffdio_zeropage {
        struct uffdio_range range;
        __u64 mode;

        /*
         * "zeropage" is written by the ioctl and must be at the end:
         * the copy_from_user will not read the last 8 bytes.
         */
        __s64 zeropage;
    };

    struct uffdio_writeprotect {
        struct uffdio_range range;
        __u64 mode;
    };

    struct uffdio_continue {
        struct uffdio_range range;
        __u64 mode;

        /*
         * Fields below here are written by the ioctl and must be at the end:
         * the copy_from_user will not read past here.
         */
        __s64 mapped;
    };

    struct uffdio_poison {
        struct uffdio_range range;
        __u64 mode;

        /*
         * Fields below here are written by the ioctl and must be at the end:
         * the copy_from_user will not read past here.
         */
        __s64 updated;
    };

    struct uffdio_move {
        __u64 dst;
        __u64 src;
        __u64 len;
        __u64 mode;
        /*
         * "move" is written by the ioctl and must be at the end: the
         * copy_from_user will not read the last 8 bytes.
         */
        __s64 move;
    };

    /* <unistd.h>: the userfaultfd(2) fallback (glibc has no wrapper before 2.36) */
    long syscall(long number, ...);
    """
)

# --------------------------------------------------------------------------
# Constants and ioctl numbers, in the header's order
# --------------------------------------------------------------------------

# ioctls for /dev/userfaultfd
USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)  # arg: open flags (O_CLOEXEC | O_NONBLOCK)

UFFD_API = 0xAA

# Valid ioctl command number range with this API is from 0x00 to 0x3F.
_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_MOVE = 0x05
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_CONTINUE = 0x07
_UFFDIO_POISON = 0x08
_UFFDIO_API = 0x3F

# userfaultfd ioctl ids.  (The header notes UNREGISTER and WAKE "should" have
# been _IOW: the kernel only reads their uffdio_range.  The numbers are ABI.)
UFFDIO = 0xAA
UFFDIO_API = _IOWR(UFFDIO, _UFFDIO_API, ffi.sizeof("struct uffdio_api"))
UFFDIO_REGISTER = _IOWR(UFFDIO, _UFFDIO_REGISTER, ffi.sizeof("struct uffdio_register"))
UFFDIO_UNREGISTER = _IOR(UFFDIO, _UFFDIO_UNREGISTER, ffi.sizeof("struct uffdio_range"))
UFFDIO_WAKE = _IOR(UFFDIO, _UFFDIO_WAKE, ffi.sizeof("struct uffdio_range"))
UFFDIO_COPY = _IOWR(UFFDIO, _UFFDIO_COPY, ffi.sizeof("struct uffdio_copy"))
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, _UFFDIO_ZEROPAGE, ffi.sizeof("struct uffdio_zeropage"))
UFFDIO_MOVE = _IOWR(UFFDIO, _UFFDIO_MOVE, ffi.sizeof("struct uffdio_move"))
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, ffi.sizeof("struct uffdio_writeprotect"))
UFFDIO_CONTINUE = _IOWR(UFFDIO, _UFFDIO_CONTINUE, ffi.sizeof("struct uffdio_continue"))
UFFDIO_POISON = _IOWR(UFFDIO, _UFFDIO_POISON, ffi.sizeof("struct uffdio_poison"))

# uffd_msg.event.  Start at 0x12 and not at 0 to be more strict against bugs.
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

# flags for UFFD_EVENT_PAGEFAULT
UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0  # If this was a write fault
UFFD_PAGEFAULT_FLAG_WP = 1 << 1  # If reason is VM_UFFD_WP
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2  # If reason is VM_UFFD_MINOR

# uffdio_api.features.  UFFD_EVENT_PAGEFAULT and UFFD_PAGEFAULT_FLAG_WRITE are
# implicitly always enabled.  The *_HUGETLBFS/*_SHMEM ones only say what the
# kernel supports (asking for one fails UFFDIO_API on a kernel without it).
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1  # needs CAP_SYS_PTRACE
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7  # no message: the faulting thread gets SIGBUS
UFFD_FEATURE_THREAD_ID = 1 << 8  # uffd_msg.arg.pagefault.feat.ptid is filled in
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11  # the fault address is not masked to the page
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15  # implies UFFD_FEATURE_WP_UNPOPULATED
UFFD_FEATURE_MOVE = 1 << 16  # (Linux 6.8: the last feature bit as of 6.18)

# uffdio_register.mode
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2

# uffdio_copy.mode
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1  # map the page write protected on the fly

# uffdio_zeropage.mode
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0

# uffdio_writeprotect.mode
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

# uffdio_continue.mode
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_WP = 1 << 1

# uffdio_poison.mode
UFFDIO_POISON_MODE_DONTWAKE = 1 << 0

# uffdio_move.mode
UFFDIO_MOVE_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1

# Flags for the userfaultfd(2) system call itself: handle page faults only in
# user mode.  Never used here (see the module docstring: KVM faults are kernel mode).
UFFD_USER_MODE_ONLY = 1

# The header's summary masks (they precede the definitions there).
UFFD_API_REGISTER_MODES = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP | UFFDIO_REGISTER_MODE_MINOR
UFFD_API_FEATURES = (
    UFFD_FEATURE_PAGEFAULT_FLAG_WP
    | UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP
    | UFFD_FEATURE_MISSING_HUGETLBFS
    | UFFD_FEATURE_MISSING_SHMEM
    | UFFD_FEATURE_SIGBUS
    | UFFD_FEATURE_THREAD_ID
    | UFFD_FEATURE_MINOR_HUGETLBFS
    | UFFD_FEATURE_MINOR_SHMEM
    | UFFD_FEATURE_EXACT_ADDRESS
    | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    | UFFD_FEATURE_WP_UNPOPULATED
    | UFFD_FEATURE_POISON
    | UFFD_FEATURE_WP_ASYNC
    | UFFD_FEATURE_MOVE
)
UFFD_API_IOCTLS = 1 << _UFFDIO_REGISTER | 1 << _UFFDIO_UNREGISTER | 1 << _UFFDIO_API
UFFD_API_RANGE_IOCTLS = (
    1 << _UFFDIO_WAKE
    | 1 << _UFFDIO_COPY
    | 1 << _UFFDIO_ZEROPAGE
    | 1 << _UFFDIO_MOVE
    | 1 << _UFFDIO_WRITEPROTECT
    | 1 << _UFFDIO_CONTINUE
    | 1 << _UFFDIO_POISON
)
UFFD_API_RANGE_IOCTLS_BASIC = (
    1 << _UFFDIO_WAKE | 1 << _UFFDIO_COPY | 1 << _UFFDIO_WRITEPROTECT | 1 << _UFFDIO_CONTINUE | 1 << _UFFDIO_POISON
)

# --------------------------------------------------------------------------
# Names, for messages
# --------------------------------------------------------------------------

FEATURE_NAMES: dict[int, str] = {
    value: name[len("UFFD_FEATURE_") :]
    for name, value in list(globals().items())
    if name.startswith("UFFD_FEATURE_") and isinstance(value, int)
}
"""Feature bit -> short name (``1 << 5 -> "MISSING_SHMEM"``)."""

EVENT_NAMES: dict[int, str] = {
    UFFD_EVENT_PAGEFAULT: "PAGEFAULT",
    UFFD_EVENT_FORK: "FORK",
    UFFD_EVENT_REMAP: "REMAP",
    UFFD_EVENT_REMOVE: "REMOVE",
    UFFD_EVENT_UNMAP: "UNMAP",
}

_MODE_NAMES: dict[int, str] = {
    UFFDIO_REGISTER_MODE_MISSING: "MISSING",
    UFFDIO_REGISTER_MODE_WP: "WP",
    UFFDIO_REGISTER_MODE_MINOR: "MINOR",
}

_MSG_SIZE = 32  # sizeof(struct uffd_msg), the unit of read()


def _bit_names(mask: int, names: dict[int, str]) -> list[str]:
    out = [name for bit, name in sorted(names.items()) if mask & bit]
    unknown = mask & ~sum(names)
    if unknown:
        out.append(f"{unknown:#x}")
    return out


def feature_names(mask: int) -> list[str]:
    """``["MISSING_SHMEM", "THREAD_ID"]`` for a ``UFFD_FEATURE_*`` mask (unknown bits in hex)."""
    return _bit_names(mask, FEATURE_NAMES)


def _mode_text(mode: int) -> str:
    return "|".join(_bit_names(mode, _MODE_NAMES)) or "0"


# --------------------------------------------------------------------------
# Opening a userfaultfd
# --------------------------------------------------------------------------

USERFAULTFD_DEVICE = "/dev/userfaultfd"

#: __NR_userfaultfd per machine (x86-64: arch/x86/entry/syscalls/syscall_64.tbl).
_SYSCALL_NUMBERS: dict[str, int] = {"x86_64": 323, "aarch64": 282}


@functools.cache
def _libc() -> Any:
    """The C library, for ``syscall(2)`` (loaded on first use only)."""
    return ffi.dlopen(None)


def _userfaultfd_device(flags: int) -> int:
    """``open("/dev/userfaultfd")`` + ``USERFAULTFD_IOC_NEW``: a new userfaultfd; raises OSError."""
    device = os.open(USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    try:
        return ioctl(device, USERFAULTFD_IOC_NEW, flags)
    finally:
        os.close(device)


def _userfaultfd_syscall(flags: int) -> int:
    """``userfaultfd(flags)`` through ``syscall(2)``; raises OSError."""
    machine = platform.machine()
    number = _SYSCALL_NUMBERS.get(machine)
    if number is None:
        raise OSError(_errno.ENOSYS, f"no userfaultfd system call number known for {machine}")
    fd = int(_libc().syscall(number, ffi.cast("int", flags)))
    if fd < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))
    return fd


def _open_userfaultfd(prefer_device: bool = True) -> int:
    """Open a userfaultfd with ``O_CLOEXEC | O_NONBLOCK`` (before ``UFFDIO_API``).

    Tries ``/dev/userfaultfd`` then the ``userfaultfd(2)`` system call, or
    the other way round when ``prefer_device`` is false.  Raises
    :class:`UffdError` naming every way that failed and why.
    """
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    ways = [("device", _userfaultfd_device), ("syscall", _userfaultfd_syscall)]
    if not prefer_device:
        ways.reverse()
    failures: list[str] = []
    for name, opener in ways:
        try:
            fd = opener(flags)
        except OSError as exc:
            what = f"{USERFAULTFD_DEVICE}" if name == "device" else "userfaultfd(2)"
            hint = ""
            if exc.errno == _errno.ENOENT and name == "device":
                hint = " (the device appeared in Linux 6.1)"
            elif exc.errno in (_errno.EPERM, _errno.EACCES):
                hint = (
                    " (needs read/write access to the device node)"
                    if name == "device"
                    else " (needs CAP_SYS_PTRACE or sysctl vm.unprivileged_userfaultfd=1)"
                )
            failures.append(f"{what}: {exc.strerror or errno_text(exc.errno)}{hint}")
            logger.debug("userfaultfd via %s failed: %s", name, exc)
            continue
        logger.debug("userfaultfd %d opened via %s", fd, name)
        return fd
    raise UffdError("cannot open a userfaultfd: " + "; ".join(failures), where="userfaultfd")


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------


class PageFault(NamedTuple):
    """One decoded ``struct uffd_msg`` of event ``UFFD_EVENT_PAGEFAULT``."""

    flags: int
    """``UFFD_PAGEFAULT_FLAG_*``."""
    address: int
    """The faulting address as the kernel reports it: page aligned unless
    ``UFFD_FEATURE_EXACT_ADDRESS`` was enabled - mask it before resolving."""
    ptid: int
    """The faulting thread's id (``threading.get_native_id``) with ``UFFD_FEATURE_THREAD_ID``, else 0."""

    @property
    def write(self) -> bool:
        """The access was a write (``UFFD_PAGEFAULT_FLAG_WRITE``)."""
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WRITE)

    @property
    def wp(self) -> bool:
        """A write-protect fault (``UFFD_PAGEFAULT_FLAG_WP``, registered with ``MODE_WP``)."""
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_WP)

    @property
    def minor(self) -> bool:
        """A minor fault: the page is in the page cache, resolve with ``continue_range``."""
        return bool(self.flags & UFFD_PAGEFAULT_FLAG_MINOR)


# --------------------------------------------------------------------------
# The userfaultfd
# --------------------------------------------------------------------------

#: Back-to-back EAGAINs without progress before a resolution gives up.  The
#: kernel says EAGAIN while the address space is changing (a pending
#: fork/remap/remove/unmap event that nobody has read yet).
_MAX_STALLS = 2000
_STALL_SLEEP = 0.001


class Userfaultfd:
    """One userfaultfd: register memory, read its faults, resolve them.

    All methods may be called from several threads at once (each call uses
    its own argument struct); :meth:`close` must not race with the others.
    """

    fd: int
    requested: int
    """The ``UFFD_FEATURE_*`` asked for, and so enabled."""
    features: int
    """The features the kernel offered in its ``UFFDIO_API`` answer (all it supports)."""
    ioctls: int
    """``uffdio_api.ioctls``: bit ``_UFFDIO_x`` set for each ioctl the fd accepts."""

    def __init__(self, features: int = 0, *, prefer_device: bool = True) -> None:
        """Open a userfaultfd (``O_CLOEXEC | O_NONBLOCK``) and do the ``UFFDIO_API`` handshake.

        ``/dev/userfaultfd`` with ``USERFAULTFD_IOC_NEW`` is tried first, then
        the ``userfaultfd(2)`` system call (the other way round when
        ``prefer_device`` is false).  ``features`` (``UFFD_FEATURE_*``) are
        enabled; one the kernel does not offer is a :class:`UffdError`
        naming it.
        """
        self.fd = -1
        if isinstance(features, bool) or not isinstance(features, int) or not 0 <= features < 1 << 64:
            raise UffdError(f"features must be a 64-bit unsigned int, not {features!r}", where="UFFDIO_API")
        self.requested = features
        self.fd = _open_userfaultfd(prefer_device)
        try:
            api = ffi.new("struct uffdio_api *", {"api": UFFD_API, "features": features})
            try:
                ioctl(self.fd, UFFDIO_API, api)
            except OSError as exc:
                raise self._api_error(exc, features, prefer_device) from exc
            self.features = int(api.features)
            self.ioctls = int(api.ioctls)
        except BaseException:
            self.close()
            raise
        logger.debug(
            "userfaultfd %d: features %s enabled, %#x offered, ioctls %#x",
            self.fd, feature_names(features), self.features, self.ioctls,
        )  # fmt: skip

    @staticmethod
    def _api_error(exc: OSError, features: int, prefer_device: bool) -> UffdError:
        """Explain a failed ``UFFDIO_API``: which asked-for features the kernel lacks, if that is why."""
        where = "UFFDIO_API"
        text = errno_text(exc.errno)
        message = f"asking for features {feature_names(features) or 'none'}: {text}"
        if exc.errno == _errno.EPERM and features & UFFD_FEATURE_EVENT_FORK:
            message += " (UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE)"
        elif exc.errno == _errno.EINVAL and features:
            # The kernel zeroes the answer on failure, and a userfaultfd takes
            # UFFDIO_API once: ask a throwaway one what is on offer.
            try:
                with Userfaultfd(0, prefer_device=prefer_device) as probe:
                    offered = probe.features
            except UffdError:
                offered = None
            if offered is not None and features & ~offered:
                lacking = features & ~offered
                known = [f"UFFD_FEATURE_{FEATURE_NAMES[bit]}" for bit in sorted(FEATURE_NAMES) if lacking & bit]
                unknown = lacking & ~sum(FEATURE_NAMES)
                if unknown:
                    known.append(f"unknown feature bits {unknown:#x}")
                message = f"this kernel does not offer {', '.join(known)} (it offers {offered:#x}): {text}"
        error = UffdError(message, where=where)
        error.errno = exc.errno  # type: ignore[attr-defined]
        return error

    # ----------------------------------------------------------------- basics

    def fileno(self) -> int:
        """The fd, for ``select.poll``/``selectors`` (readable when a message is pending)."""
        self._require_open("fileno")
        return self.fd

    def close(self) -> None:
        """Close the userfaultfd (idempotent).

        The kernel then unregisters every range and wakes every thread still
        waiting on a fault here: they retry the access as an ordinary fault
        (a missing anonymous page becomes a zero page).
        """
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"fd={self.fd}" if self.fd >= 0 else "closed"
        return f"<Userfaultfd {state} features={feature_names(self.requested)}>"

    def _require_open(self, where: str) -> None:
        if self.fd < 0:
            raise UffdError("the userfaultfd is closed", where=where)

    @staticmethod
    def _check_range(address: int, length: int, where: str) -> None:
        """Page-aligned, non-empty, inside the 64-bit space: else the kernel would say a bare EINVAL."""
        for name, value in (("address", address), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise UffdError(f"{name} must be an int, not {type(value).__name__}", where=where)
        if length <= 0 or address < 0 or address + length > 1 << 64:
            raise UffdError(f"bad range [{address:#x}, +{length:#x})", where=where)
        if address % PAGE_SIZE or length % PAGE_SIZE:
            raise UffdError(
                f"range [{address:#x}, +{length:#x}) is not aligned to the {PAGE_SIZE}-byte page", where=where
            )

    @staticmethod
    def _error(exc: OSError, where: str, what: str, hint: str = "") -> UffdError:
        error = UffdError(f"{what}: {errno_text(exc.errno)}{hint}", where=where)
        error.errno = exc.errno  # type: ignore[attr-defined]
        return error

    # ----------------------------------------------------------- registration

    def register(self, address: int, length: int, mode: int) -> int:
        """``UFFDIO_REGISTER`` ``[address, address+length)`` in ``mode`` (``UFFDIO_REGISTER_MODE_*``).

        Returns ``uffdio_register.ioctls``: bit ``_UFFDIO_COPY`` etc. for each
        resolution ioctl the range supports.
        """
        where = "UFFDIO_REGISTER"
        self._require_open(where)
        self._check_range(address, length, where)
        arg = ffi.new("struct uffdio_register *", {"range": {"start": address, "len": length}, "mode": mode})
        try:
            ioctl(self.fd, UFFDIO_REGISTER, arg)
        except OSError as exc:
            hint = ""
            if exc.errno == _errno.EINVAL:
                hint = (
                    " (the range must lie in mappings that support the mode:"
                    " MINOR only on shmem/hugetlbfs, and no holes)"
                )
            elif exc.errno == _errno.EBUSY:
                hint = " (already registered with another userfaultfd)"
            raise self._error(exc, where, f"[{address:#x}, +{length:#x}) mode {_mode_text(mode)}", hint) from exc
        return int(arg.ioctls)

    def unregister(self, address: int, length: int) -> None:
        """``UFFDIO_UNREGISTER``: the range faults normally again (threads waiting on it are woken)."""
        where = "UFFDIO_UNREGISTER"
        self._require_open(where)
        self._check_range(address, length, where)
        arg = ffi.new("struct uffdio_range *", {"start": address, "len": length})
        try:
            ioctl(self.fd, UFFDIO_UNREGISTER, arg)
        except OSError as exc:
            raise self._error(exc, where, f"[{address:#x}, +{length:#x})") from exc

    def wake(self, address: int, length: int) -> None:
        """``UFFDIO_WAKE``: wake the threads waiting on faults in the range (after a DONTWAKE resolution)."""
        where = "UFFDIO_WAKE"
        self._require_open(where)
        self._check_range(address, length, where)
        arg = ffi.new("struct uffdio_range *", {"start": address, "len": length})
        try:
            ioctl(self.fd, UFFDIO_WAKE, arg)
        except OSError as exc:
            raise self._error(exc, where, f"[{address:#x}, +{length:#x})") from exc

    # -------------------------------------------------------------- resolving

    def copy(self, dst: int, src: int, length: int, *, wake: bool = True) -> int:
        """``UFFDIO_COPY`` of ``[src, src+length)`` to the missing pages at ``dst``.

        Finished whatever happens short of an error: a partial copy goes on
        with the rest; ``EAGAIN`` retries the rest; a page already present
        (``EEXIST``) is skipped - never overwritten - and, when ``wake``,
        woken (``UFFDIO_WAKE``: another resolution raced us, its waiters may
        be ours too).  Returns the bytes actually copied (skipped pages not
        counted).  Any other errno raises :class:`UffdError` naming
        ``UFFDIO_COPY``, the range and the errno.

        ``src`` must be memory that is present (a ``bytearray``, ``bytes``, an
        mmap that is not registered); ``dst`` and ``length`` must be aligned
        to ``PAGE_SIZE`` (4 KiB: the page a present page is skipped by -
        hugetlbfs pages are not handled).
        """
        where = "UFFDIO_COPY"
        self._require_open(where)
        self._check_range(dst, length, where)
        if isinstance(src, bool) or not isinstance(src, int) or src < 0:
            raise UffdError(f"src must be an address (int), not {src!r}", where=where)
        arg = ffi.new("struct uffdio_copy *")
        arg.mode = 0 if wake else UFFDIO_COPY_MODE_DONTWAKE

        def prepare(offset: int) -> None:
            arg.dst = dst + offset
            arg.src = src + offset
            arg.len = length - offset
            arg.copy = 0

        return self._resolve(where, UFFDIO_COPY, arg, "copy", prepare, dst, length, wake)

    def zeropage(self, dst: int, length: int, *, wake: bool = True) -> int:
        """``UFFDIO_ZEROPAGE``: map zero pages on the missing pages of the range; same rules as :meth:`copy`."""
        where = "UFFDIO_ZEROPAGE"
        self._require_open(where)
        self._check_range(dst, length, where)
        arg = ffi.new("struct uffdio_zeropage *")
        arg.mode = 0 if wake else UFFDIO_ZEROPAGE_MODE_DONTWAKE

        def prepare(offset: int) -> None:
            arg.range.start = dst + offset
            arg.range.len = length - offset
            arg.zeropage = 0

        return self._resolve(where, UFFDIO_ZEROPAGE, arg, "zeropage", prepare, dst, length, wake)

    def continue_range(self, dst: int, length: int, *, wake: bool = True) -> int:
        """``UFFDIO_CONTINUE``: map the page-cache pages of the range (minor faults); same rules as :meth:`copy`.

        A page that is not in the page cache at all is an error (``EFAULT``):
        it needs :meth:`copy` (MISSING mode) or a write to the file first.
        """
        where = "UFFDIO_CONTINUE"
        self._require_open(where)
        self._check_range(dst, length, where)
        arg = ffi.new("struct uffdio_continue *")
        arg.mode = 0 if wake else UFFDIO_CONTINUE_MODE_DONTWAKE

        def prepare(offset: int) -> None:
            arg.range.start = dst + offset
            arg.range.len = length - offset
            arg.mapped = 0

        return self._resolve(where, UFFDIO_CONTINUE, arg, "mapped", prepare, dst, length, wake)

    def _resolve(
        self,
        where: str,
        request: int,
        arg: Any,
        count_field: str,
        prepare: Callable[[int], None],
        dst: int,
        length: int,
        wake: bool,
    ) -> int:
        """Drive one COPY/ZEROPAGE/CONTINUE over the whole range (see :meth:`copy`).

        The kernel's convention: the ioctl's last field (``copy``,
        ``zeropage``, ``mapped``) holds the bytes done or ``-errno``.  When
        some pages were done before a failure the ioctl fails with ``EAGAIN``
        and the field holds the bytes done; when the very first page fails,
        the ioctl fails with that page's errno and the field holds
        ``-errno``.  (A range the kernel refuses before starting - EINVAL,
        ENOENT - leaves the field untouched: it is zeroed before each call.)
        """
        done = 0  # bytes of the range dealt with: resolved or skipped
        resolved = 0
        skipped = 0
        stalls = 0
        while done < length:
            prepare(done)
            try:
                ioctl(self.fd, request, arg)
            except OSError as exc:
                count = int(getattr(arg, count_field))
                if count > 0:  # a partial resolution (the ioctl said EAGAIN): go on after it
                    done += count
                    resolved += count
                    stalls = 0
                elif exc.errno == _errno.EEXIST:  # the page at `done` is present: leave it alone
                    if wake:
                        self.wake(dst + done, PAGE_SIZE)
                    done += PAGE_SIZE
                    skipped += 1
                    stalls = 0
                elif exc.errno == _errno.EAGAIN:  # the address space is changing: try again
                    stalls += 1
                    if stalls > _MAX_STALLS:
                        raise self._error(
                            exc, where, f"[{dst + done:#x}, +{length - done:#x}) kept failing",
                            " (a fork/remap/remove/unmap event is pending: read it with read_faults)",
                        ) from exc  # fmt: skip
                    if stalls > 10:
                        time.sleep(_STALL_SLEEP)
                else:
                    what = f"[{dst + done:#x}, +{length - done:#x})"
                    if done:
                        what += f" (of [{dst:#x}, +{length:#x}))"
                    hint = " (is the range registered with this userfaultfd?)" if exc.errno == _errno.ENOENT else ""
                    raise self._error(exc, where, what, hint) from exc
            else:
                resolved += length - done
                done = length
        if skipped:
            logger.debug("%s [%#x, +%#x): skipped %d present page(s)", where, dst, length, skipped)
        return resolved

    # --------------------------------------------------------------- messages

    def read_faults(self, max_messages: int = 64) -> list[PageFault]:
        """Read the pending messages without blocking; return the page faults ([] when none).

        ``os.read`` releases the GIL.  Other events (fork, remap, remove,
        unmap: only delivered when their feature was asked for) are logged
        at debug level and skipped - a fork event's new userfaultfd is
        closed, so the child's faults are not left waiting on nobody.
        """
        where = "read(userfaultfd)"
        self._require_open(where)
        if isinstance(max_messages, bool) or not isinstance(max_messages, int) or max_messages < 1:
            raise UffdError(f"max_messages must be a positive int, not {max_messages!r}", where=where)
        try:
            data = os.read(self.fd, _MSG_SIZE * max_messages)
        except BlockingIOError:
            return []
        except OSError as exc:
            raise self._error(exc, where, "reading messages") from exc
        if not data or len(data) % _MSG_SIZE:
            raise UffdError(
                f"read {len(data)} bytes: not a whole number of {_MSG_SIZE}-byte struct uffd_msg", where=where
            )
        faults: list[PageFault] = []
        for msg in ffi.from_buffer("struct uffd_msg[]", data):
            event = int(msg.event)
            if event == UFFD_EVENT_PAGEFAULT:
                pagefault = msg.arg.pagefault
                faults.append(PageFault(int(pagefault.flags), int(pagefault.address), int(pagefault.feat.ptid)))
            elif event == UFFD_EVENT_FORK:
                ufd = int(msg.arg.fork.ufd)
                logger.debug("userfaultfd %d: fork event, closing the child's userfaultfd %d", self.fd, ufd)
                try:
                    os.close(ufd)
                except OSError:
                    pass
            else:
                logger.debug(
                    "userfaultfd %d: skipping %s event", self.fd, EVENT_NAMES.get(event, f"unknown {event:#x}")
                )
        return faults
