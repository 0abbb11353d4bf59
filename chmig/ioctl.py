"""The ioctl plumbing that :mod:`chmig.kvm` and :mod:`chmig.uffd` share.

Three things live here, so that each device module only declares its own
structs and request numbers:

* the request-number macros of ``<asm-generic/ioctl.h>`` (x86-64 uses the
  generic layout): ``_IOC``, ``_IO``, ``_IOR``, ``_IOW``, ``_IOWR``.  They
  read like the kernel's, except that where C writes the argument *type*
  (and the macro takes ``sizeof`` of it) Python passes the size itself::

      KVM_GET_REGS = _IOR(KVMIO, 0x81, ffi.sizeof("struct kvm_regs"))

* :func:`ioctl`: one system call on a cffi struct (or an int passed by
  value).  It goes through :func:`fcntl.ioctl`, which **releases the GIL**
  while the kernel works - essential for ``KVM_RUN`` and for userfaultfd,
  where the kernel may block or fault on our behalf.  Failures raise the
  plain :class:`OSError`; each device module wraps it into its own error
  class (``KvmError``, ``UffdError``) with the ioctl's name.

* :func:`address_of`: the address of an mmap's first byte, for the kernel
  structs that carry user addresses (``userspace_addr``, ``uffdio_copy.dst``).
"""

from __future__ import annotations

import errno as _errno
import fcntl
import os
from typing import Any

import cffi

__all__ = [
    "_IOC",
    "_IO",
    "_IOR",
    "_IOW",
    "_IOWR",
    "address_of",
    "errno_text",
    "ioctl",
]

#: No declarations: this FFI only makes buffers of, and casts, other modules' cdata.
ffi = cffi.FFI()

#: ``<linux/types.h>``: the fixed-width types every kernel header's structs are written in (each module's
#: ``cdef`` starts with these).
LINUX_TYPES_CDEF = """
    typedef uint8_t  __u8;
    typedef uint16_t __u16;
    typedef uint32_t __u32;
    typedef uint64_t __u64;
    typedef int32_t  __s32;
    typedef int64_t  __s64;
"""

# --------------------------------------------------------------------------
# Request numbers (<asm-generic/ioctl.h>)
# --------------------------------------------------------------------------
#
#   bits  0..7   command number (nr)
#   bits  8..15  type ("magic": KVMIO 0xAE, UFFDIO 0xAA, ...)
#   bits 16..29  size of the argument struct
#   bits 30..31  direction: none, write (user -> kernel), read (kernel -> user)

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2

_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _IOC(direction: int, type_: int, nr: int, size: int) -> int:
    """Build an ioctl request number like the kernel's ``_IOC`` macro."""
    if not 0 <= size < 1 << _IOC_SIZEBITS:
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(type_: int, nr: int) -> int:
    """``_IO(type, nr)``: an ioctl without a pointer argument."""
    return _IOC(_IOC_NONE, type_, nr, 0)


def _IOR(type_: int, nr: int, size: int) -> int:
    """``_IOR(type, nr, argtype)`` with ``size = sizeof(argtype)``: the kernel writes it back to us."""
    return _IOC(_IOC_READ, type_, nr, size)


def _IOW(type_: int, nr: int, size: int) -> int:
    """``_IOW(type, nr, argtype)`` with ``size = sizeof(argtype)``: we pass it to the kernel."""
    return _IOC(_IOC_WRITE, type_, nr, size)


def _IOWR(type_: int, nr: int, size: int) -> int:
    """``_IOWR(type, nr, argtype)`` with ``size = sizeof(argtype)``: it travels both ways."""
    return _IOC(_IOC_READ | _IOC_WRITE, type_, nr, size)


# --------------------------------------------------------------------------
# Issuing ioctls
# --------------------------------------------------------------------------


def ioctl(fd: int, request: int, arg: Any = 0) -> int:
    """Issue one ioctl and return its (non-negative) integer result.

    ``arg`` is either

    * an ``int``, passed by value (``KVM_CREATE_VCPU``, ``USERFAULTFD_IOC_NEW``).
      :func:`fcntl.ioctl` takes it as a C ``int``: callers with values of
      2**31 or more pass the 32-bit two's complement;
    * a cffi pointer (``ffi.new("struct ... *")``): the kernel reads and
      writes the struct in place - it is handed over as ``ffi.buffer(ptr)``,
      i.e. ``sizeof`` of the pointed-to type;
    * any writable buffer (``ffi.buffer(ptr, size)`` for a struct with a
      flexible array, a ``bytearray``).

    The GIL is released during the system call.  ``fcntl.ioctl`` bounces
    buffers of up to 1024 bytes through a copy of its own and copies the
    result back even when the ioctl fails (so out-fields such as
    ``uffdio_copy.copy`` are visible after an error); larger ones are
    passed directly.  Failures raise :class:`OSError` with ``errno`` set.
    """
    if isinstance(arg, int):
        return fcntl.ioctl(fd, request, arg)
    if isinstance(arg, ffi.CData):
        arg = ffi.buffer(arg)
    return fcntl.ioctl(fd, request, arg, True)


def address_of(buffer: Any) -> int:
    """Return the address of a buffer's first byte (for ``userspace_addr``, ``uffdio_copy.dst`` ...).

    Use it with :class:`mmap.mmap` objects: their memory never moves.  (A
    ``bytearray`` may be reallocated when resized - don't hand one to the
    kernel for longer than one call.)  The temporary ``ffi.from_buffer``
    export is released at once, so the mmap can still be closed later.
    """
    pointer = ffi.from_buffer(buffer)
    try:
        return int(ffi.cast("uintptr_t", pointer))
    finally:
        ffi.release(pointer)


def errno_text(err: int | None) -> str:
    """``"Invalid argument (EINVAL)"``: the message and the symbolic name, for one-line errors."""
    if err is None:
        return "unknown error"
    name = _errno.errorcode.get(err, str(err))
    return f"{os.strerror(err)} ({name})"
