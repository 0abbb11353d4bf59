"""Thin, typed access to the Linux KVM API from Python (x86-64 only).

This is the lowest layer of chmig: everything that touches ``/dev/kvm`` goes
through here.  It has three objects, one per kind of KVM file descriptor:

``Kvm``
    ``/dev/kvm`` itself: API version, capabilities, supported CPUID, the list
    of MSRs worth saving, and ``create_vm``.
``VmFd``
    one virtual machine: guest memory slots, the dirty-page log, ``create_vcpu``.
``Vcpu``
    one virtual CPU: ``run`` (``KVM_RUN``), the shared ``struct kvm_run`` page
    that tells why the guest stopped, and every piece of architectural state
    a live migration has to move (registers, FPU/XSAVE, MSRs, events ...),
    bundled as a JSON-serialisable document by ``get_state``/``set_state``.

How the C ABI is reached without a compiler
-------------------------------------------
The structs below are declared with ``cffi`` in ABI mode (``ffi.cdef`` only),
copied from ``<linux/kvm.h>`` and ``<asm/kvm.h>`` (x86-64) with the same
struct names, field names and field order, so you can read them side by side
with the kernel headers.  A struct is allocated with ``ffi.new``, handed to
the kernel as a *mutable* buffer (``ffi.buffer(ptr)``) through
``fcntl.ioctl(fd, request, buffer, True)``, and the kernel writes its answer
straight into that memory.  ``fcntl.ioctl`` releases the GIL while the
system call runs, so a vCPU thread sitting in ``KVM_RUN`` does not block the
rest of the program.

The ioctl request numbers are computed exactly as the header does, with the
``_IO``/``_IOR``/``_IOW``/``_IOWR`` macros from ``<asm-generic/ioctl.h>``:
direction, size of the argument struct, the KVM "magic" type ``KVMIO`` (0xAE)
and a command number.  Those macros, the ioctl call itself and
``address_of`` live in :mod:`chmig.ioctl`, shared with :mod:`chmig.uffd`.

Guest memory
------------
KVM maps guest-physical memory onto ordinary memory of this process.  Make it
with :class:`mmap.mmap` (anonymous or a file), and pass its address::

    mem = mmap.mmap(-1, 2 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    vm.set_user_memory_region(0, 0x0, len(mem), address_of(mem))

``address_of(mem)`` is ``int(ffi.cast("uintptr_t", ffi.from_buffer(mem)))``
with the temporary buffer export released again, so the mmap can still be
closed later.  The caller owns the mmap and must keep it open for as long as
the slot is registered (delete the slot with ``memory_size=0`` first).

Errors
------
Every failing ioctl raises :class:`chmig.errors.KvmError` whose ``where`` is
the ioctl name (``"KVM_SET_SREGS"``) and whose message holds the errno text;
the instance also carries ``.errno``.  A ``KVM_RUN`` interrupted by a signal
is not an error: :meth:`Vcpu.run` returns ``KVM_EXIT_INTR``.
"""

from __future__ import annotations

import errno as _errno
import fcntl
import logging
import mmap
import os
from collections.abc import Iterable, Mapping
from typing import Any, Self

import cffi

from chmig import ioctl as _shared_ioctl
from chmig.errors import KvmError
from chmig.ioctl import _IO, _IOR, _IOW, _IOWR, LINUX_TYPES_CDEF, address_of
from chmig.ioctl import errno_text as _errno_text
from chmig.ioctl import ioctl as _ioctl_raw
from chmig.units import PAGE_SIZE

__all__ = [
    "ffi",
    "Kvm",
    "VmFd",
    "Vcpu",
    "address_of",
    "EXIT_REASON_NAMES",
    "STATE_VERSION",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Struct declarations
# --------------------------------------------------------------------------
#
# Only the x86-64 parts of the headers are declared.  ``__DECLARE_FLEX_ARRAY``
# (a flexible array member) is written as ``type name[];``: sizeof() does not
# count it, and ``ffi.new("struct kvm_msrs *", {"entries": n, ...})`` allocates
# room for n entries after the fixed part.

ffi = cffi.FFI()
ffi.cdef(
    LINUX_TYPES_CDEF
    + """

    /* ------------------------------------------------------------------ */
    /* <asm/kvm.h> (arch/x86/include/uapi/asm/kvm.h)                       */
    /* ------------------------------------------------------------------ */

    /* Architectural interrupt line count. */
    #define KVM_NR_INTERRUPTS 256

    /* for KVM_GET_REGS and KVM_SET_REGS */
    struct kvm_regs {
        /* out (KVM_GET_REGS) / in (KVM_SET_REGS) */
        __u64 rax, rbx, rcx, rdx;
        __u64 rsi, rdi, rsp, rbp;
        __u64 r8,  r9,  r10, r11;
        __u64 r12, r13, r14, r15;
        __u64 rip, rflags;
    };

    struct kvm_segment {
        __u64 base;
        __u32 limit;
        __u16 selector;
        __u8  type;
        __u8  present, dpl, db, s, l, g, avl;
        __u8  unusable;
        __u8  padding;
    };

    struct kvm_dtable {
        __u64 base;
        __u16 limit;
        __u16 padding[3];
    };

    /* for KVM_GET_SREGS and KVM_SET_SREGS */
    struct kvm_sregs {
        /* out (KVM_GET_SREGS) / in (KVM_SET_SREGS) */
        struct kvm_segment cs, ds, es, fs, gs, ss;
        struct kvm_segment tr, ldt;
        struct kvm_dtable gdt, idt;
        __u64 cr0, cr2, cr3, cr4, cr8;
        __u64 efer;
        __u64 apic_base;
        __u64 interrupt_bitmap[(KVM_NR_INTERRUPTS + 63) / 64];
    };

    /* for KVM_GET_FPU and KVM_SET_FPU */
    struct kvm_fpu {
        __u8  fpr[8][16];
        __u16 fcw;
        __u16 fsw;
        __u8  ftwx;  /* in fxsave format */
        __u8  pad1;
        __u16 last_opcode;
        __u64 last_ip;
        __u64 last_dp;
        __u8  xmm[16][16];
        __u32 mxcsr;
        __u32 pad2;
    };

    struct kvm_msr_entry {
        __u32 index;
        __u32 reserved;
        __u64 data;
    };

    /* for KVM_GET_MSRS and KVM_SET_MSRS */
    struct kvm_msrs {
        __u32 nmsrs; /* number of msrs in entries */
        __u32 pad;

        struct kvm_msr_entry entries[];   /* __DECLARE_FLEX_ARRAY */
    };

    /* for KVM_GET_MSR_INDEX_LIST */
    struct kvm_msr_list {
        __u32 nmsrs; /* number of msrs in entries */
        __u32 indices[];                  /* __DECLARE_FLEX_ARRAY */
    };

    struct kvm_cpuid_entry2 {
        __u32 function;
        __u32 index;
        __u32 flags;
        __u32 eax;
        __u32 ebx;
        __u32 ecx;
        __u32 edx;
        __u32 padding[3];
    };

    /* for KVM_SET_CPUID2 */
    struct kvm_cpuid2 {
        __u32 nent;
        __u32 padding;
        struct kvm_cpuid_entry2 entries[]; /* __DECLARE_FLEX_ARRAY */
    };

    struct kvm_debug_exit_arch {
        __u32 exception;
        __u32 pad;
        __u64 pc;
        __u64 dr6;
        __u64 dr7;
    };

    /* for KVM_GET/SET_VCPU_EVENTS */
    struct kvm_vcpu_events {
        struct {
            __u8 injected;
            __u8 nr;
            __u8 has_error_code;
            __u8 pending;
            __u32 error_code;
        } exception;
        struct {
            __u8 injected;
            __u8 nr;
            __u8 soft;
            __u8 shadow;
        } interrupt;
        struct {
            __u8 injected;
            __u8 pending;
            __u8 masked;
            __u8 pad;
        } nmi;
        __u32 sipi_vector;
        __u32 flags;
        struct {
            __u8 smm;
            __u8 pending;
            __u8 smm_inside_nmi;
            __u8 latched_init;
        } smi;
        struct {
            __u8 pending;
        } triple_fault;
        __u8 reserved[26];
        __u8 exception_has_payload;
        __u64 exception_payload;
    };

    /* for KVM_GET/SET_DEBUGREGS */
    struct kvm_debugregs {
        __u64 db[4];
        __u64 dr6;
        __u64 dr7;
        __u64 flags;
        __u64 reserved[9];
    };

    /* for KVM_CAP_XSAVE and KVM_CAP_XSAVE2 */
    struct kvm_xsave {
        __u32 region[1024];
        __u32 extra[];                    /* __DECLARE_FLEX_ARRAY */
    };

    #define KVM_MAX_XCRS 16

    struct kvm_xcr {
        __u32 xcr;
        __u32 reserved;
        __u64 value;
    };

    struct kvm_xcrs {
        __u32 nr_xcrs;
        __u32 flags;
        struct kvm_xcr xcrs[KVM_MAX_XCRS];
        __u64 padding[16];
    };

    /* kvm_sync_regs struct included by kvm_run struct */
    struct kvm_sync_regs {
        struct kvm_regs regs;
        struct kvm_sregs sregs;
        struct kvm_vcpu_events events;
    };

    /* ------------------------------------------------------------------ */
    /* <linux/kvm.h> (include/uapi/linux/kvm.h)                            */
    /* ------------------------------------------------------------------ */

    /* for KVM_SET_USER_MEMORY_REGION */
    struct kvm_userspace_memory_region {
        __u32 slot;
        __u32 flags;
        __u64 guest_phys_addr;
        __u64 memory_size; /* bytes */
        __u64 userspace_addr; /* start of the userspace allocated memory */
    };

    /* for KVM_GET_DIRTY_LOG */
    struct kvm_dirty_log {
        __u32 slot;
        __u32 padding1;
        union {
            void *dirty_bitmap; /* one bit per page */
            __u64 padding2;
        };
    };

    /* for KVM_SET_MP_STATE */
    struct kvm_mp_state {
        __u32 mp_state;
    };

    /* for KVM_RUN, returned by mmap(vcpu_fd, offset=0) */
    struct kvm_run {
        /* in */
        __u8 request_interrupt_window;
        __u8 immediate_exit;
        __u8 padding1[6];

        /* out */
        __u32 exit_reason;
        __u8 ready_for_interrupt_injection;
        __u8 if_flag;
        __u16 flags;

        /* in (pre_kvm_run), out (post_kvm_run) */
        __u64 cr8;
        __u64 apic_base;

        /* (the s390-only psw_mask/psw_addr fields are not on x86) */
        union {
            /* KVM_EXIT_UNKNOWN */
            struct {
                __u64 hardware_exit_reason;
            } hw;
            /* KVM_EXIT_FAIL_ENTRY */
            struct {
                __u64 hardware_entry_failure_reason;
                __u32 cpu;
            } fail_entry;
            /* KVM_EXIT_EXCEPTION */
            struct {
                __u32 exception;
                __u32 error_code;
            } ex;
            /* KVM_EXIT_IO */
            struct {
                __u8 direction;     /* KVM_EXIT_IO_IN / KVM_EXIT_IO_OUT */
                __u8 size; /* bytes */
                __u16 port;
                __u32 count;
                __u64 data_offset; /* relative to kvm_run start */
            } io;
            /* KVM_EXIT_DEBUG */
            struct {
                struct kvm_debug_exit_arch arch;
            } debug;
            /* KVM_EXIT_MMIO */
            struct {
                __u64 phys_addr;
                __u8  data[8];
                __u32 len;
                __u8  is_write;
            } mmio;
            /* KVM_EXIT_HYPERCALL */
            struct {
                __u64 nr;
                __u64 args[6];
                __u64 ret;
                __u32 longmode;
                __u32 pad;
            } hypercall;
            /* KVM_EXIT_TPR_ACCESS */
            struct {
                __u64 rip;
                __u32 is_write;
                __u32 pad;
            } tpr_access;
            /* (s390_sieic, s390_reset_flags, s390_ucontrol, dcr: not x86) */
            /* KVM_EXIT_INTERNAL_ERROR */
            struct {
                __u32 suberror;
                /* Available with KVM_CAP_INTERNAL_ERROR_DATA: */
                __u32 ndata;
                __u64 data[16];
            } internal;
            /* KVM_INTERNAL_ERROR_EMULATION: an overlay of "internal" */
            struct {
                __u32 suberror;
                __u32 ndata;
                __u64 flags;
                union {
                    struct {
                        __u8  insn_size;
                        __u8  insn_bytes[15];
                    };
                };
                /* Arbitrary debug data may follow. */
            } emulation_failure;
            /* (osi, papr_hcall, s390_tsch, epr: not x86) */
            /* KVM_EXIT_SYSTEM_EVENT */
            struct {
                __u32 type;
                __u32 ndata;
                union {
                    __u64 flags;
                    __u64 data[16];
                };
            } system_event;
            /* (s390_stsi: not x86) */
            /* KVM_EXIT_IOAPIC_EOI */
            struct {
                __u8 vector;
            } eoi;
            /* (hyperv, arm_nisv: not declared here) */
            /* KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR */
            struct {
                __u8 error; /* user -> kernel */
                __u8 pad[7];
                __u32 reason; /* kernel -> user */
                __u32 index; /* kernel -> user */
                __u64 data; /* kernel <-> user */
            } msr;
            /* (xen, riscv_sbi, riscv_csr: not declared here) */
            /* KVM_EXIT_NOTIFY */
            struct {
                __u32 flags;
            } notify;
            /* Fix the size of the union. */
            char padding[256];
        };

        /* 2048 is the size of the char array used to bound/pad the size
         * of the union that holds sync regs (SYNC_REGS_SIZE_BYTES).
         */
        __u64 kvm_valid_regs;
        __u64 kvm_dirty_regs;
        union {
            struct kvm_sync_regs regs;
            char padding[2048];
        } s;
    };
    """
)

# --------------------------------------------------------------------------
# ioctl request numbers (<asm-generic/ioctl.h>, x86 uses the generic layout)
# --------------------------------------------------------------------------
#
# The _IO/_IOR/_IOW/_IOWR macros live in chmig.ioctl (shared with chmig.uffd);
# where the header writes the argument type, the size of it is passed.

_IOC = _shared_ioctl._IOC  # still reachable as kvm._IOC

KVMIO = 0xAE

# ioctls for /dev/kvm fds
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)  # returns a VM fd
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, ffi.sizeof("struct kvm_msr_list"))
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)  # also valid on a VM fd
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)  # in bytes
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, ffi.sizeof("struct kvm_cpuid2"))

# ioctls for VM fds
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, ffi.sizeof("struct kvm_dirty_log"))
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, ffi.sizeof("struct kvm_userspace_memory_region"))
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ffi.sizeof("__u64"))

# ioctls for vcpu fds
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, ffi.sizeof("struct kvm_regs"))
KVM_SET_REGS = _IOW(KVMIO, 0x82, ffi.sizeof("struct kvm_regs"))
KVM_GET_SREGS = _IOR(KVMIO, 0x83, ffi.sizeof("struct kvm_sregs"))
KVM_SET_SREGS = _IOW(KVMIO, 0x84, ffi.sizeof("struct kvm_sregs"))
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, ffi.sizeof("struct kvm_msrs"))
KVM_SET_MSRS = _IOW(KVMIO, 0x89, ffi.sizeof("struct kvm_msrs"))
KVM_GET_FPU = _IOR(KVMIO, 0x8C, ffi.sizeof("struct kvm_fpu"))
KVM_SET_FPU = _IOW(KVMIO, 0x8D, ffi.sizeof("struct kvm_fpu"))
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, ffi.sizeof("struct kvm_cpuid2"))
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, ffi.sizeof("struct kvm_cpuid2"))
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, ffi.sizeof("struct kvm_mp_state"))
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, ffi.sizeof("struct kvm_mp_state"))
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, ffi.sizeof("struct kvm_vcpu_events"))
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, ffi.sizeof("struct kvm_vcpu_events"))
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, ffi.sizeof("struct kvm_debugregs"))
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, ffi.sizeof("struct kvm_debugregs"))
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, ffi.sizeof("struct kvm_xsave"))
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, ffi.sizeof("struct kvm_xsave"))
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, ffi.sizeof("struct kvm_xcrs"))
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, ffi.sizeof("struct kvm_xcrs"))
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, ffi.sizeof("struct kvm_xsave"))

KVM_API_VERSION = 12

# --------------------------------------------------------------------------
# Constants from <linux/kvm.h>
# --------------------------------------------------------------------------

# Extension capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9  # recommended max vcpus per vm
KVM_CAP_NR_MEMSLOTS = 10  # max memory slots per vm
KVM_CAP_MP_STATE = 14
KVM_CAP_SYNC_MMU = 16
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_MAX_VCPUS = 66  # max vcpus per vm
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_XSAVE2 = 208

# kvm_userspace_memory_region.flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# kvm_run.exit_reason
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_S390_SIEIC = 13
KVM_EXIT_S390_RESET = 14
KVM_EXIT_DCR = 15  # deprecated
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_OSI = 18
KVM_EXIT_PAPR_HCALL = 19
KVM_EXIT_S390_UCONTROL = 20
KVM_EXIT_WATCHDOG = 21
KVM_EXIT_S390_TSCH = 22
KVM_EXIT_EPR = 23
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_S390_STSI = 25
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_ARM_NISV = 28
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_RISCV_SBI = 35
KVM_EXIT_RISCV_CSR = 36
KVM_EXIT_NOTIFY = 37

EXIT_REASON_NAMES: dict[int, str] = dict(
    sorted(
        (value, name[len("KVM_EXIT_") :])
        for name, value in globals().items()
        if name.startswith("KVM_EXIT_") and isinstance(value, int)
    )
)
"""``exit_reason`` number -> short name (``2 -> "IO"``)."""

# kvm_run.io.direction
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# kvm_run.internal.suberror (KVM_EXIT_INTERNAL_ERROR)
KVM_INTERNAL_ERROR_EMULATION = 1  # emulate instruction failed
KVM_INTERNAL_ERROR_SIMUL_EX = 2  # unexpected simultaneous exceptions
KVM_INTERNAL_ERROR_DELIVERY_EV = 3  # unexpected vm-exit due to delivery event
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

INTERNAL_ERROR_NAMES: dict[int, str] = {
    KVM_INTERNAL_ERROR_EMULATION: "EMULATION",
    KVM_INTERNAL_ERROR_SIMUL_EX: "SIMUL_EX",
    KVM_INTERNAL_ERROR_DELIVERY_EV: "DELIVERY_EV",
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "UNEXPECTED_EXIT_REASON",
}

# kvm_run.system_event.type (KVM_EXIT_SYSTEM_EVENT)
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

SYSTEM_EVENT_NAMES: dict[int, str] = {
    KVM_SYSTEM_EVENT_SHUTDOWN: "SHUTDOWN",
    KVM_SYSTEM_EVENT_RESET: "RESET",
    KVM_SYSTEM_EVENT_CRASH: "CRASH",
    KVM_SYSTEM_EVENT_WAKEUP: "WAKEUP",
    KVM_SYSTEM_EVENT_SUSPEND: "SUSPEND",
    KVM_SYSTEM_EVENT_SEV_TERM: "SEV_TERM",
}

# kvm_mp_state.mp_state (not all states are valid on all architectures)
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# kvm_vcpu_events.flags: which fields KVM_SET_VCPU_EVENTS applies
KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x00000020

# kvm_cpuid_entry2.flags
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # (sic: the header's spelling)

# A few MSR numbers (Intel SDM vol. 4) that callers commonly need.
MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_CR_PAT = 0x277
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

KVM_XSAVE_SIZE = 4096  # sizeof(struct kvm_xsave): the legacy KVM_GET_XSAVE size

# The kernel refuses KVM_GET/SET_MSRS with nmsrs >= MAX_IO_MSRS (256).
_MSR_BATCH = 128

# Field names of the structs as the dicts of this module spell them.
REGS_FIELDS: tuple[str, ...] = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags",
)  # fmt: skip
SEGMENT_NAMES: tuple[str, ...] = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
SEGMENT_FIELDS: dict[str, int] = {  # name -> width in bits
    "base": 64, "limit": 32, "selector": 16, "type": 8, "present": 8, "dpl": 8,
    "db": 8, "s": 8, "l": 8, "g": 8, "avl": 8, "unusable": 8,
}  # fmt: skip
DTABLE_NAMES: tuple[str, ...] = ("gdt", "idt")
DTABLE_FIELDS: dict[str, int] = {"base": 64, "limit": 16}
SREGS_SCALARS: tuple[str, ...] = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
FPU_SCALARS: dict[str, int] = {
    "fcw": 16, "fsw": 16, "ftwx": 8, "last_opcode": 16,
    "last_ip": 64, "last_dp": 64, "mxcsr": 32,
}  # fmt: skip

STATE_VERSION = 1
"""Version number written into (and required from) ``Vcpu.get_state`` documents."""

# Hints for the most common VMX entry-failure codes (Intel SDM vol. 3, app. C).
_VMX_ENTRY_FAILURE_HINTS: dict[int, str] = {
    33: "VM-entry failure due to invalid guest state",
    34: "VM-entry failure due to MSR loading",
    41: "VM-entry failure due to machine-check event",
}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _kvm_error(exc: OSError, where: str, what: str = "") -> KvmError:
    """Turn an ``OSError`` from ``fcntl.ioctl`` into a :class:`KvmError`."""
    message = _errno_text(exc.errno)
    if what:
        message = f"{what}: {message}"
    error = KvmError(message, where=where)
    error.errno = exc.errno  # type: ignore[attr-defined]
    return error


def ioctl(fd: int, request: int, arg: Any = 0, *, where: str) -> int:
    """Issue one ioctl and return its integer result.

    ``arg`` is either an ``int`` (passed by value, as for ``KVM_CREATE_VCPU``)
    or a cffi pointer / writable buffer whose memory the kernel may read and
    write in place (see :func:`chmig.ioctl.ioctl`).  Failures raise
    :class:`KvmError` naming ``where``.
    """
    try:
        return _ioctl_raw(fd, request, arg)
    except OSError as exc:
        raise _kvm_error(exc, where) from exc


def _as_int(value: Any, bits: int, what: str, where: str) -> int:
    """Validate that ``value`` is an int that fits in an unsigned ``bits`` field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise KvmError(f"{what} must be an integer, not {type(value).__name__}", where=where)
    if not 0 <= value < 1 << bits:
        raise KvmError(f"{what}={value:#x} does not fit in {bits} unsigned bits", where=where)
    return value


def _as_mapping(value: Any, what: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise KvmError(f"{what} must be an object/dict, not {type(value).__name__}", where=where)
    return value


def _check_keys(
    value: Mapping[str, Any], allowed: Iterable[str], what: str, where: str, *, complete: bool
) -> None:
    allowed = list(allowed)
    unknown = [key for key in value if key not in allowed]
    if unknown:
        raise KvmError(f"{what} has unknown keys {unknown}; allowed: {allowed}", where=where)
    if complete:
        missing = [key for key in allowed if key not in value]
        if missing:
            raise KvmError(f"{what} lacks keys {missing}", where=where)


def _from_hex(value: Any, what: str, where: str) -> bytes:
    if not isinstance(value, str):
        raise KvmError(f"{what} must be a hex string, not {type(value).__name__}", where=where)
    try:
        return bytes.fromhex(value)
    except ValueError as exc:
        raise KvmError(f"{what} is not valid hex: {exc}", where=where) from None


def _struct_from_bytes(ctype: str, data: Any, what: str, where: str) -> Any:
    """Allocate ``ctype`` and fill it from exactly ``sizeof(ctype)`` raw bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise KvmError(f"{what} must be bytes, not {type(data).__name__}", where=where)
    size = ffi.sizeof(ctype)
    if len(data) != size:
        raise KvmError(f"{what} must be {size} bytes ({ctype}), got {len(data)}", where=where)
    pointer = ffi.new(ctype + " *")
    ffi.memmove(pointer, bytes(data), size)
    return pointer


# --------------------------------------------------------------------------
# /dev/kvm
# --------------------------------------------------------------------------


class _OwnedFd:
    """A KVM file descriptor this object owns: ``close()`` is idempotent, ``with`` closes it."""

    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Kvm(_OwnedFd):
    """The KVM subsystem, reached through ``/dev/kvm``."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        """Open ``path`` and check that it speaks KVM API version 12."""
        self.path = path
        try:
            self.fd: int = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = ""
            if exc.errno == _errno.ENOENT:
                hint = " (is the kvm module loaded, or does this machine lack virtualisation?)"
            elif exc.errno == _errno.EACCES:
                hint = " (are you root or in the 'kvm' group?)"
            raise KvmError(f"cannot open: {_errno_text(exc.errno)}{hint}", where=path) from exc
        try:
            self.api_version: int = ioctl(self.fd, KVM_GET_API_VERSION, 0, where="KVM_GET_API_VERSION")
        except KvmError:
            os.close(self.fd)
            raise
        if self.api_version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmError(
                f"{path} speaks KVM API version {self.api_version}, chmig needs {KVM_API_VERSION}",
                where="KVM_GET_API_VERSION",
            )
        logger.debug("opened %s (fd %d), KVM API version %d", path, self.fd, self.api_version)

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 if ``cap`` is unsupported, else >0 (often a limit)."""
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap, where="KVM_CHECK_EXTENSION")

    def vcpu_mmap_size(self) -> int:
        """Size of the ``struct kvm_run`` area (plus extra pages) to mmap per vCPU."""
        return ioctl(self.fd, KVM_GET_VCPU_MMAP_SIZE, 0, where="KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[dict[str, int]]:
        """``KVM_GET_SUPPORTED_CPUID``: the CPUID leaves KVM can virtualise.

        Each entry is ``{"function", "index", "flags", "eax", "ebx", "ecx",
        "edx"}``.  The buffer starts at 128 entries and doubles on ``E2BIG``.
        """
        nent = 128
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
            size = ffi.sizeof("struct kvm_cpuid2") + nent * ffi.sizeof("struct kvm_cpuid_entry2")
            try:
                _ioctl_raw(self.fd, KVM_GET_SUPPORTED_CPUID, ffi.buffer(cpuid, size))
            except OSError as exc:
                if exc.errno == _errno.E2BIG and nent < 1 << 16:
                    nent *= 2
                    continue
                raise _kvm_error(exc, "KVM_GET_SUPPORTED_CPUID") from exc
            return [_cpuid_entry_to_dict(cpuid.entries[i]) for i in range(cpuid.nent)]

    def msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: MSRs a VMM should save and restore.

        First asked with room for 0 entries: the kernel answers ``E2BIG`` and
        writes the real count into ``nmsrs``; the buffer grows until it fits.
        """
        capacity = 0
        while True:
            msr_list = ffi.new("struct kvm_msr_list *", {"nmsrs": capacity, "indices": capacity})
            size = ffi.sizeof("struct kvm_msr_list") + capacity * ffi.sizeof("__u32")
            try:
                _ioctl_raw(self.fd, KVM_GET_MSR_INDEX_LIST, ffi.buffer(msr_list, size))
            except OSError as exc:
                if exc.errno == _errno.E2BIG and capacity < 1 << 16:
                    # The kernel reports the needed count in nmsrs; grow anyway
                    # in case this Python copied the buffer back only on success.
                    capacity = max(msr_list.nmsrs, capacity * 2, 64)
                    continue
                raise _kvm_error(exc, "KVM_GET_MSR_INDEX_LIST") from exc
            return [msr_list.indices[i] for i in range(msr_list.nmsrs)]

    def create_vm(self) -> VmFd:
        """``KVM_CREATE_VM`` (machine type 0): a new, empty virtual machine."""
        for attempt in range(10):
            try:
                vm_fd = _ioctl_raw(self.fd, KVM_CREATE_VM, 0)
                break
            except OSError as exc:
                # KVM_CREATE_VM may fail with EINTR when a signal arrives; retry.
                if exc.errno == _errno.EINTR and attempt < 9:
                    continue
                raise _kvm_error(exc, "KVM_CREATE_VM") from exc
        os.set_inheritable(vm_fd, False)
        return VmFd(vm_fd, self.vcpu_mmap_size())

    # close() (inherited): VMs created from /dev/kvm stay alive after it is closed.


def _cpuid_entry_to_dict(entry: Any) -> dict[str, int]:
    return {
        "function": entry.function,
        "index": entry.index,
        "flags": entry.flags,
        "eax": entry.eax,
        "ebx": entry.ebx,
        "ecx": entry.ecx,
        "edx": entry.edx,
    }


# --------------------------------------------------------------------------
# A virtual machine
# --------------------------------------------------------------------------


class VmFd(_OwnedFd):
    """One KVM virtual machine (the fd returned by ``KVM_CREATE_VM``)."""

    def __init__(self, fd: int, vcpu_mmap_size: int) -> None:
        self.fd = fd
        self._vcpu_mmap_size = vcpu_mmap_size
        self._xsave_size: int | None = None
        # slot -> memory_size, to size dirty bitmaps as the kernel will fill them.
        self._slot_sizes: dict[int, int] = {}

    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (some answers are per-VM, e.g. XSAVE2)."""
        return ioctl(self.fd, KVM_CHECK_EXTENSION, cap, where="KVM_CHECK_EXTENSION")

    def set_tss_addr(self, addr: int) -> None:
        """``KVM_SET_TSS_ADDR``: 3 pages of guest-physical space KVM may use (Intel).

        The address is passed by value.  ``fcntl.ioctl`` only takes a C ``int``
        there, so an address >= 2 GiB is passed as its 32-bit two's complement;
        the CPU zero-extends the 32-bit register, so the kernel sees the
        intended unsigned value (it rejects anything above 4 GiB - 3 pages).
        """
        _as_int(addr, 32, "TSS address", "KVM_SET_TSS_ADDR")
        arg = addr - (1 << 32) if addr >= 1 << 31 else addr
        ioctl(self.fd, KVM_SET_TSS_ADDR, arg, where="KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        """``KVM_SET_IDENTITY_MAP_ADDR``: one page for the real-mode identity map (Intel)."""
        value = ffi.new("__u64 *", _as_int(addr, 64, "identity map address", "KVM_SET_IDENTITY_MAP_ADDR"))
        ioctl(self.fd, KVM_SET_IDENTITY_MAP_ADDR, value, where="KVM_SET_IDENTITY_MAP_ADDR")

    def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        flags: int = 0,
    ) -> None:
        """``KVM_SET_USER_MEMORY_REGION``: map host memory as guest-physical memory.

        ``userspace_addr`` comes from :func:`address_of` on an mmap the caller
        keeps open.  ``memory_size=0`` deletes the slot; calling again with
        the same slot and a different ``flags`` (e.g. adding
        ``KVM_MEM_LOG_DIRTY_PAGES``) changes the slot in place.
        """
        where = "KVM_SET_USER_MEMORY_REGION"
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = _as_int(slot, 32, "slot", where)
        region.flags = _as_int(flags, 32, "flags", where)
        region.guest_phys_addr = _as_int(guest_phys_addr, 64, "guest_phys_addr", where)
        region.memory_size = _as_int(memory_size, 64, "memory_size", where)
        region.userspace_addr = _as_int(userspace_addr, 64, "userspace_addr", where)
        try:
            _ioctl_raw(self.fd, KVM_SET_USER_MEMORY_REGION, region)
        except OSError as exc:
            detail = (
                f"slot {slot} gpa {guest_phys_addr:#x} size {memory_size:#x} "
                f"hva {userspace_addr:#x} flags {flags:#x}"
            )
            raise _kvm_error(exc, where, detail) from exc
        if memory_size:
            self._slot_sizes[slot] = memory_size
        else:
            self._slot_sizes.pop(slot, None)
        logger.debug(
            "memory slot %d: gpa %#x size %#x hva %#x flags %#x",
            slot, guest_phys_addr, memory_size, userspace_addr, flags,
        )  # fmt: skip

    def get_dirty_log(self, slot: int, memory_size: int) -> bytearray:
        """``KVM_GET_DIRTY_LOG``: which pages of ``slot`` the guest wrote since last time.

        Returns the raw bitmap: one bit per 4 KiB page (bit *n* of the
        little-endian bitmap = page *n* of the slot), ``ceil(pages / 64)``
        64-bit words.  KVM clears the log as it hands it over, so each call
        reports the writes since the previous one.  The slot must have been
        registered with ``KVM_MEM_LOG_DIRTY_PAGES``.

        The kernel writes a bitmap as large as *the slot* needs, so a
        ``memory_size`` that differs from the one registered through this
        object is refused rather than risking a write past the buffer.
        """
        where = "KVM_GET_DIRTY_LOG"
        _as_int(memory_size, 64, "memory_size", where)
        registered = self._slot_sizes.get(slot)
        if registered is not None and registered != memory_size:
            raise KvmError(
                f"slot {slot} is {registered:#x} bytes, not {memory_size:#x}: the bitmap would be the wrong size",
                where=where,
            )
        pages = (memory_size + PAGE_SIZE - 1) // PAGE_SIZE
        words = max(1, (pages + 63) // 64)
        bitmap = ffi.new("__u64[]", words)
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = _as_int(slot, 32, "slot", where)
        log.dirty_bitmap = bitmap
        try:
            _ioctl_raw(self.fd, KVM_GET_DIRTY_LOG, log)
        except OSError as exc:
            hint = ""
            if exc.errno == _errno.ENOENT:
                hint = f"slot {slot} has no dirty log (registered without KVM_MEM_LOG_DIRTY_PAGES?)"
            raise _kvm_error(exc, where, hint) from exc
        return bytearray(ffi.buffer(bitmap))

    def xsave_size(self) -> int:
        """Bytes of XSAVE state per vCPU: ``KVM_CAP_XSAVE2`` on this VM, at least 4096."""
        if self._xsave_size is None:
            size = self.check_extension(KVM_CAP_XSAVE2)
            self._xsave_size = max(size, KVM_XSAVE_SIZE)
        return self._xsave_size

    def create_vcpu(self, index: int) -> Vcpu:
        """``KVM_CREATE_VCPU`` with vCPU id ``index``, and mmap its ``struct kvm_run``."""
        _as_int(index, 31, "vcpu index", "KVM_CREATE_VCPU")
        vcpu_fd = ioctl(self.fd, KVM_CREATE_VCPU, index, where="KVM_CREATE_VCPU")
        os.set_inheritable(vcpu_fd, False)
        try:
            return Vcpu(index, vcpu_fd, self._vcpu_mmap_size, self.xsave_size())
        except BaseException:
            os.close(vcpu_fd)
            raise

    # close() (inherited): vCPUs keep the VM alive in the kernel until they are closed.


# --------------------------------------------------------------------------
# A virtual CPU
# --------------------------------------------------------------------------


class Vcpu(_OwnedFd):
    """One virtual CPU: ``KVM_RUN`` plus its architectural state.

    ``run_struct`` is a cffi ``struct kvm_run *`` pointing into the shared
    page mmapped from the vCPU fd: KVM fills it in on every exit.
    """

    def __init__(self, index: int, fd: int, mmap_size: int, xsave_size: int = KVM_XSAVE_SIZE) -> None:
        self.index = index
        self.fd = fd
        self.xsave_size = xsave_size
        try:
            self._mmap: mmap.mmap | None = mmap.mmap(
                fd, mmap_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except OSError as exc:
            raise KvmError(f"cannot mmap struct kvm_run: {_errno_text(exc.errno)}", where="mmap(vcpu_fd)") from exc
        self._run_buffer = ffi.from_buffer(self._mmap)
        self.run_struct: Any = ffi.cast("struct kvm_run *", self._run_buffer)

    # ----------------------------------------------------------------- running

    def run(self) -> int:
        """``KVM_RUN``: enter the guest until it needs the VMM; return ``exit_reason``.

        A signal delivered to this thread (or ``immediate_exit`` set
        beforehand) makes KVM return ``EINTR``: that is reported as
        ``KVM_EXIT_INTR``, not raised.  ``immediate_exit`` is not cleared
        here; the caller decides when to clear it.
        """
        try:
            fcntl.ioctl(self.fd, KVM_RUN, 0)
        except OSError as exc:
            if exc.errno == _errno.EINTR:
                return KVM_EXIT_INTR
            raise _kvm_error(exc, "KVM_RUN", f"vcpu {self.index}") from exc
        return int(self.run_struct.exit_reason)

    @property
    def immediate_exit(self) -> bool:
        """``kvm_run.immediate_exit``: when set, ``KVM_RUN`` returns ``EINTR`` at once.

        Set it from any thread, then signal the vCPU thread: a signal that
        lands just before ``KVM_RUN`` is entered is not lost that way.
        """
        return bool(self.run_struct.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.run_struct.immediate_exit = 1 if value else 0

    @property
    def exit_reason(self) -> int:
        """``kvm_run.exit_reason`` of the last exit."""
        return int(self.run_struct.exit_reason)

    def _expect_exit(self, reason: int, what: str) -> None:
        actual = int(self.run_struct.exit_reason)
        if actual != reason:
            raise KvmError(
                f"last exit is {EXIT_REASON_NAMES.get(actual, actual)}, not {EXIT_REASON_NAMES[reason]}",
                where=what,
            )

    def io_exit(self) -> tuple[int, int, int, int, memoryview]:
        """Decode a ``KVM_EXIT_IO``: ``(direction, size, port, count, data)``.

        ``data`` is a view of ``size * count`` bytes inside ``struct kvm_run``
        at ``io.data_offset``: for OUT it holds what the guest wrote, for IN
        write the answer into it before the next ``run()``.
        """
        self._expect_exit(KVM_EXIT_IO, "io_exit")
        io = self.run_struct.io
        length = io.size * io.count
        start = io.data_offset
        assert self._mmap is not None
        if start + length > len(self._mmap):
            raise KvmError(f"io data {start:#x}+{length} lies outside the kvm_run mapping", where="io_exit")
        data = memoryview(self._mmap)[start : start + length]
        return int(io.direction), int(io.size), int(io.port), int(io.count), data

    def mmio_exit(self) -> tuple[int, int, bool, memoryview]:
        """Decode a ``KVM_EXIT_MMIO``: ``(phys_addr, len, is_write, data)``.

        ``data`` views ``kvm_run.mmio.data[:len]``: for a write it holds the
        value, for a read put the value there before the next ``run()``.
        """
        self._expect_exit(KVM_EXIT_MMIO, "mmio_exit")
        mmio = self.run_struct.mmio
        length = min(int(mmio.len), 8)
        start = ffi.offsetof("struct kvm_run", "mmio", "data")
        assert self._mmap is not None
        data = memoryview(self._mmap)[start : start + length]
        return int(mmio.phys_addr), length, bool(mmio.is_write), data

    def describe_exit(self) -> str:
        """Human-readable account of the last exit, for an "unexpected exit" error."""
        run = self.run_struct
        reason = int(run.exit_reason)
        text = f"exit {EXIT_REASON_NAMES.get(reason, 'UNKNOWN_REASON')} ({reason})"
        if reason == KVM_EXIT_UNKNOWN:
            text += f": hardware_exit_reason={run.hw.hardware_exit_reason:#x}"
        elif reason == KVM_EXIT_FAIL_ENTRY:
            code = int(run.fail_entry.hardware_entry_failure_reason)
            text += f": hardware_entry_failure_reason={code:#x} cpu={run.fail_entry.cpu}"
            hint = _VMX_ENTRY_FAILURE_HINTS.get(code & 0xFFFF)
            if hint:
                text += f" ({hint})"
        elif reason == KVM_EXIT_EXCEPTION:
            text += f": exception={run.ex.exception} error_code={run.ex.error_code:#x}"
        elif reason == KVM_EXIT_IO:
            io = run.io
            direction = "OUT" if io.direction == KVM_EXIT_IO_OUT else "IN"
            text += f": {direction} port={io.port:#x} size={io.size} count={io.count}"
        elif reason == KVM_EXIT_MMIO:
            mmio = run.mmio
            kind = "write" if mmio.is_write else "read"
            data = bytes(ffi.buffer(mmio.data, min(int(mmio.len), 8))).hex()
            text += f": {kind} phys_addr={mmio.phys_addr:#x} len={mmio.len} data={data}"
        elif reason == KVM_EXIT_DEBUG:
            arch = run.debug.arch
            text += f": exception={arch.exception} pc={arch.pc:#x} dr6={arch.dr6:#x} dr7={arch.dr7:#x}"
        elif reason == KVM_EXIT_INTERNAL_ERROR:
            internal = run.internal
            suberror = int(internal.suberror)
            ndata = min(int(internal.ndata), 16)
            text += f": suberror={INTERNAL_ERROR_NAMES.get(suberror, '?')} ({suberror})"
            if ndata:
                text += " data=[" + ", ".join(f"{internal.data[i]:#x}" for i in range(ndata)) + "]"
            failure = run.emulation_failure
            if (
                suberror == KVM_INTERNAL_ERROR_EMULATION
                and failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
            ):
                size = min(int(failure.insn_size), 15)
                text += f" insn_bytes={bytes(ffi.buffer(failure.insn_bytes, size)).hex()}"
        elif reason == KVM_EXIT_SYSTEM_EVENT:
            event = run.system_event
            event_type = int(event.type)
            ndata = min(int(event.ndata), 16)
            text += f": type={SYSTEM_EVENT_NAMES.get(event_type, '?')} ({event_type})"
            if ndata:
                text += " data=[" + ", ".join(f"{event.data[i]:#x}" for i in range(ndata)) + "]"
        elif reason == KVM_EXIT_SHUTDOWN:
            text += ": the guest shut down (usually a triple fault)"
        elif reason in (KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR):
            text += f": msr index={run.msr.index:#x} data={run.msr.data:#x} reason={run.msr.reason:#x}"
        try:
            regs = self.get_regs()
            text += f"; rip={regs['rip']:#x} rflags={regs['rflags']:#x}"
        except KvmError:
            pass
        return text

    # --------------------------------------------------------------- registers

    def get_regs(self) -> dict[str, int]:
        """``KVM_GET_REGS``: general-purpose registers, keyed by ``struct kvm_regs`` field."""
        regs = ffi.new("struct kvm_regs *")
        ioctl(self.fd, KVM_GET_REGS, regs, where="KVM_GET_REGS")
        return {name: int(getattr(regs, name)) for name in REGS_FIELDS}

    def set_regs(self, regs: Mapping[str, int]) -> None:
        """``KVM_SET_REGS``.  Keys missing from ``regs`` keep their current value."""
        ioctl(self.fd, KVM_SET_REGS, self._regs_struct(regs, complete=False), where="KVM_SET_REGS")

    def _regs_struct(self, regs: Any, *, complete: bool, where: str = "KVM_SET_REGS") -> Any:
        regs = _as_mapping(regs, "regs", where)
        _check_keys(regs, REGS_FIELDS, "regs", where, complete=complete)
        struct = ffi.new("struct kvm_regs *")
        if not complete:
            ioctl(self.fd, KVM_GET_REGS, struct, where="KVM_GET_REGS")
        for name, value in regs.items():
            setattr(struct, name, _as_int(value, 64, f"regs.{name}", where))
        return struct

    def get_sregs(self) -> dict[str, Any]:
        """``KVM_GET_SREGS``: segments, descriptor tables, control registers, EFER ...

        Segments (``cs`` ... ``ldt``) are dicts of ``struct kvm_segment``
        fields, ``gdt``/``idt`` are ``{"base", "limit"}``, ``interrupt_bitmap``
        is a list of four 64-bit words, the rest are ints.
        """
        sregs = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, KVM_GET_SREGS, sregs, where="KVM_GET_SREGS")
        result: dict[str, Any] = {}
        for name in SEGMENT_NAMES:
            segment = getattr(sregs, name)
            result[name] = {field: int(getattr(segment, field)) for field in SEGMENT_FIELDS}
        for name in DTABLE_NAMES:
            table = getattr(sregs, name)
            result[name] = {field: int(getattr(table, field)) for field in DTABLE_FIELDS}
        for name in SREGS_SCALARS:
            result[name] = int(getattr(sregs, name))
        result["interrupt_bitmap"] = [int(word) for word in sregs.interrupt_bitmap]
        return result

    def set_sregs(self, sregs: Mapping[str, Any]) -> None:
        """``KVM_SET_SREGS``.  Keys (and segment fields) left out keep their current value."""
        ioctl(self.fd, KVM_SET_SREGS, self._sregs_struct(sregs, complete=False), where="KVM_SET_SREGS")

    def _sregs_struct(self, sregs: Any, *, complete: bool, where: str = "KVM_SET_SREGS") -> Any:
        sregs = _as_mapping(sregs, "sregs", where)
        keys = (*SEGMENT_NAMES, *DTABLE_NAMES, *SREGS_SCALARS, "interrupt_bitmap")
        _check_keys(sregs, keys, "sregs", where, complete=complete)
        struct = ffi.new("struct kvm_sregs *")
        if not complete:
            ioctl(self.fd, KVM_GET_SREGS, struct, where="KVM_GET_SREGS")
        for name, value in sregs.items():
            if name in SEGMENT_NAMES or name in DTABLE_NAMES:
                fields = SEGMENT_FIELDS if name in SEGMENT_NAMES else DTABLE_FIELDS
                value = _as_mapping(value, f"sregs.{name}", where)
                _check_keys(value, fields, f"sregs.{name}", where, complete=complete)
                target = getattr(struct, name)
                for field, bits in fields.items():
                    if field in value:
                        setattr(target, field, _as_int(value[field], bits, f"sregs.{name}.{field}", where))
            elif name == "interrupt_bitmap":
                if not isinstance(value, (list, tuple)) or len(value) != 4:
                    raise KvmError("sregs.interrupt_bitmap must be a list of 4 integers", where=where)
                for i, word in enumerate(value):
                    struct.interrupt_bitmap[i] = _as_int(word, 64, f"sregs.interrupt_bitmap[{i}]", where)
            else:
                setattr(struct, name, _as_int(value, 64, f"sregs.{name}", where))
        return struct

    def get_fpu(self) -> dict[str, Any]:
        """``KVM_GET_FPU``: x87/SSE state.  ``fpr``/``xmm`` are lists of 16-byte hex strings."""
        fpu = ffi.new("struct kvm_fpu *")
        ioctl(self.fd, KVM_GET_FPU, fpu, where="KVM_GET_FPU")
        result: dict[str, Any] = {
            "fpr": [bytes(ffi.buffer(fpu.fpr[i])).hex() for i in range(8)],
            "xmm": [bytes(ffi.buffer(fpu.xmm[i])).hex() for i in range(16)],
        }
        for name in FPU_SCALARS:
            result[name] = int(getattr(fpu, name))
        return result

    def set_fpu(self, fpu: Mapping[str, Any]) -> None:
        """``KVM_SET_FPU`` from a :meth:`get_fpu` dict (all keys required)."""
        ioctl(self.fd, KVM_SET_FPU, self._fpu_struct(fpu), where="KVM_SET_FPU")

    @staticmethod
    def _fpu_struct(fpu: Any, where: str = "KVM_SET_FPU") -> Any:
        fpu = _as_mapping(fpu, "fpu", where)
        _check_keys(fpu, ("fpr", "xmm", *FPU_SCALARS), "fpu", where, complete=True)
        struct = ffi.new("struct kvm_fpu *")
        for name, count in (("fpr", 8), ("xmm", 16)):
            rows = fpu[name]
            if not isinstance(rows, (list, tuple)) or len(rows) != count:
                raise KvmError(f"fpu.{name} must be a list of {count} hex strings", where=where)
            for i, row in enumerate(rows):
                data = _from_hex(row, f"fpu.{name}[{i}]", where)
                if len(data) != 16:
                    raise KvmError(f"fpu.{name}[{i}] must be 16 bytes, got {len(data)}", where=where)
                ffi.memmove(getattr(struct, name)[i], data, 16)
        for name, bits in FPU_SCALARS.items():
            setattr(struct, name, _as_int(fpu[name], bits, f"fpu.{name}", where))
        return struct

    # ------------------------------------------------------------- XSAVE, XCRs

    def get_xsave(self) -> bytes:
        """``KVM_GET_XSAVE`` (4096 bytes), or ``KVM_GET_XSAVE2`` when the VM's
        ``KVM_CAP_XSAVE2`` size is larger (dynamic features such as AMX)."""
        size = self.xsave_size
        extra = (size - KVM_XSAVE_SIZE) // 4
        xsave = ffi.new("struct kvm_xsave *", {"extra": extra})
        if size > KVM_XSAVE_SIZE:
            ioctl(self.fd, KVM_GET_XSAVE2, ffi.buffer(xsave, size), where="KVM_GET_XSAVE2")
        else:
            ioctl(self.fd, KVM_GET_XSAVE, ffi.buffer(xsave, size), where="KVM_GET_XSAVE")
        return bytes(ffi.buffer(xsave, size))

    def set_xsave(self, data: bytes) -> None:
        """``KVM_SET_XSAVE`` with :meth:`get_xsave` bytes.

        Shorter data (e.g. 4096 bytes from a host without XSAVE2) is padded
        with zeros; longer data is accepted only if the excess is all zero.
        """
        ioctl(self.fd, KVM_SET_XSAVE, self._xsave_buffer(data), where="KVM_SET_XSAVE")

    def _xsave_buffer(self, data: Any, where: str = "KVM_SET_XSAVE") -> Any:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise KvmError(f"xsave must be bytes, not {type(data).__name__}", where=where)
        data = bytes(data)
        size = self.xsave_size
        if len(data) < KVM_XSAVE_SIZE:
            raise KvmError(f"xsave must be at least {KVM_XSAVE_SIZE} bytes, got {len(data)}", where=where)
        if len(data) > size:
            if any(data[size:]):
                raise KvmError(f"xsave is {len(data)} bytes, this VM supports only {size}", where=where)
            data = data[:size]
        xsave = ffi.new("struct kvm_xsave *", {"extra": (size - KVM_XSAVE_SIZE) // 4})
        ffi.memmove(xsave, data, len(data))
        return ffi.buffer(xsave, size)

    def get_xcrs(self) -> list[tuple[int, int]]:
        """``KVM_GET_XCRS``: extended control registers as ``(xcr, value)`` (XCR0 = 0)."""
        xcrs = ffi.new("struct kvm_xcrs *")
        ioctl(self.fd, KVM_GET_XCRS, xcrs, where="KVM_GET_XCRS")
        count = min(int(xcrs.nr_xcrs), 16)
        return [(int(xcrs.xcrs[i].xcr), int(xcrs.xcrs[i].value)) for i in range(count)]

    def set_xcrs(self, xcrs: Iterable[tuple[int, int]]) -> None:
        """``KVM_SET_XCRS`` from ``(xcr, value)`` pairs."""
        ioctl(self.fd, KVM_SET_XCRS, self._xcrs_struct(xcrs), where="KVM_SET_XCRS")

    @staticmethod
    def _xcrs_struct(xcrs: Any, where: str = "KVM_SET_XCRS") -> Any:
        if isinstance(xcrs, (str, bytes, Mapping)) or not isinstance(xcrs, Iterable):
            raise KvmError("xcrs must be a list of (xcr, value) pairs", where=where)
        pairs = list(xcrs)
        if len(pairs) > 16:
            raise KvmError(f"at most 16 xcrs (KVM_MAX_XCRS), got {len(pairs)}", where=where)
        struct = ffi.new("struct kvm_xcrs *")
        struct.nr_xcrs = len(pairs)
        for i, pair in enumerate(pairs):
            if isinstance(pair, Mapping):
                _check_keys(pair, ("xcr", "value"), f"xcrs[{i}]", where, complete=True)
                pair = (pair["xcr"], pair["value"])
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise KvmError(f"xcrs[{i}] must be an (xcr, value) pair", where=where)
            struct.xcrs[i].xcr = _as_int(pair[0], 32, f"xcrs[{i}].xcr", where)
            struct.xcrs[i].value = _as_int(pair[1], 64, f"xcrs[{i}].value", where)
        return struct

    # -------------------------------------------------------------------- MSRs

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """``KVM_GET_MSRS``: read MSRs; those KVM refuses to read are left out.

        KVM processes the entries in order and returns how many succeeded,
        so entry number *n* is the one that failed: it is skipped (logged at
        debug level) and the batch goes on after it.
        """
        wanted = [_as_int(i, 32, "msr index", "KVM_GET_MSRS") for i in indices]
        values: dict[int, int] = {}
        skipped: list[int] = []
        position = 0
        while position < len(wanted):
            batch = wanted[position : position + _MSR_BATCH]
            msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(batch), "entries": len(batch)})
            for i, index in enumerate(batch):
                msrs.entries[i].index = index
            done = ioctl(self.fd, KVM_GET_MSRS, self._msrs_buffer(msrs, len(batch)), where="KVM_GET_MSRS")
            for i in range(done):
                values[int(msrs.entries[i].index)] = int(msrs.entries[i].data)
            if done < len(batch):
                skipped.append(batch[done])
                position += done + 1
            else:
                position += len(batch)
        if skipped:
            logger.debug("vcpu %d: KVM_GET_MSRS skipped unreadable MSRs %s", self.index, [hex(i) for i in skipped])
        return values

    def set_msrs(self, values: Mapping[int, int]) -> list[int]:
        """``KVM_SET_MSRS``: write MSRs in order; those KVM refuses are skipped.

        Returns the indices that were skipped (also logged at debug level).
        """
        where = "KVM_SET_MSRS"
        items = [
            (_as_int(index, 32, "msr index", where), _as_int(value, 64, f"msr {index:#x}", where))
            for index, value in _as_mapping(values, "msrs", where).items()
        ]
        skipped: list[int] = []
        position = 0
        while position < len(items):
            batch = items[position : position + _MSR_BATCH]
            msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(batch), "entries": len(batch)})
            for i, (index, value) in enumerate(batch):
                msrs.entries[i].index = index
                msrs.entries[i].data = value
            done = ioctl(self.fd, KVM_SET_MSRS, self._msrs_buffer(msrs, len(batch)), where=where)
            if done < len(batch):
                skipped.append(batch[done][0])
                position += done + 1
            else:
                position += len(batch)
        if skipped:
            logger.debug("vcpu %d: KVM_SET_MSRS skipped unwritable MSRs %s", self.index, [hex(i) for i in skipped])
        return skipped

    @staticmethod
    def _msrs_buffer(msrs: Any, count: int) -> Any:
        size = ffi.sizeof("struct kvm_msrs") + count * ffi.sizeof("struct kvm_msr_entry")
        return ffi.buffer(msrs, size)

    # ------------------------------------------------- MP state, events, debug

    def get_mp_state(self) -> int:
        """``KVM_GET_MP_STATE``: ``KVM_MP_STATE_RUNNABLE``, ``_HALTED``, ..."""
        state = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, KVM_GET_MP_STATE, state, where="KVM_GET_MP_STATE")
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        """``KVM_SET_MP_STATE`` (without an in-kernel LAPIC only RUNNABLE is accepted)."""
        state = ffi.new("struct kvm_mp_state *")
        state.mp_state = _as_int(mp_state, 32, "mp_state", "KVM_SET_MP_STATE")
        ioctl(self.fd, KVM_SET_MP_STATE, state, where="KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> bytes:
        """``KVM_GET_VCPU_EVENTS``: pending exceptions/interrupts/NMI/SMI, raw 64 bytes.

        Decode with ``ffi.from_buffer("struct kvm_vcpu_events *", data)``.
        """
        events = ffi.new("struct kvm_vcpu_events *")
        ioctl(self.fd, KVM_GET_VCPU_EVENTS, events, where="KVM_GET_VCPU_EVENTS")
        return bytes(ffi.buffer(events))

    def set_vcpu_events(self, data: bytes) -> None:
        """``KVM_SET_VCPU_EVENTS`` from :meth:`get_vcpu_events` bytes (``flags`` selects fields)."""
        events = _struct_from_bytes("struct kvm_vcpu_events", data, "vcpu_events", "KVM_SET_VCPU_EVENTS")
        ioctl(self.fd, KVM_SET_VCPU_EVENTS, events, where="KVM_SET_VCPU_EVENTS")

    def get_debugregs(self) -> bytes:
        """``KVM_GET_DEBUGREGS``: DR0-3, DR6, DR7 as raw ``struct kvm_debugregs`` (128 bytes)."""
        debugregs = ffi.new("struct kvm_debugregs *")
        ioctl(self.fd, KVM_GET_DEBUGREGS, debugregs, where="KVM_GET_DEBUGREGS")
        return bytes(ffi.buffer(debugregs))

    def set_debugregs(self, data: bytes) -> None:
        """``KVM_SET_DEBUGREGS`` from :meth:`get_debugregs` bytes."""
        debugregs = _struct_from_bytes("struct kvm_debugregs", data, "debugregs", "KVM_SET_DEBUGREGS")
        ioctl(self.fd, KVM_SET_DEBUGREGS, debugregs, where="KVM_SET_DEBUGREGS")

    # -------------------------------------------------------------------- CPUID

    def set_cpuid2(self, entries: Iterable[Mapping[str, int]]) -> None:
        """``KVM_SET_CPUID2``: the CPUID leaves the guest sees (dicts as from ``supported_cpuid``)."""
        where = "KVM_SET_CPUID2"
        rows = list(entries)
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": len(rows), "entries": len(rows)})
        fields = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
        for i, row in enumerate(rows):
            row = _as_mapping(row, f"cpuid[{i}]", where)
            _check_keys(row, fields, f"cpuid[{i}]", where, complete=False)
            for field in fields:
                setattr(cpuid.entries[i], field, _as_int(row.get(field, 0), 32, f"cpuid[{i}].{field}", where))
        size = ffi.sizeof("struct kvm_cpuid2") + len(rows) * ffi.sizeof("struct kvm_cpuid_entry2")
        ioctl(self.fd, KVM_SET_CPUID2, ffi.buffer(cpuid, size), where=where)

    # ------------------------------------------------------------ whole state

    def get_state(self, msr_indices: Iterable[int]) -> dict[str, Any]:
        """Snapshot of everything migration moves for this vCPU, as plain JSON data.

        ``{"version": 1, "regs": {...}, "sregs": {...}, "fpu": {...},
        "xsave": hex, "xcrs": [{"xcr", "value"}], "msrs": {"0x10": value, ...},
        "mp_state": int, "vcpu_events": hex, "debugregs": hex}``.  MSRs that
        cannot be read are left out.
        """
        msrs = self.get_msrs(msr_indices)
        return {
            "version": STATE_VERSION,
            "regs": self.get_regs(),
            "sregs": self.get_sregs(),
            "fpu": self.get_fpu(),
            "xcrs": [{"xcr": xcr, "value": value} for xcr, value in self.get_xcrs()],
            "xsave": self.get_xsave().hex(),
            "msrs": {f"{index:#x}": value for index, value in msrs.items()},
            "vcpu_events": self.get_vcpu_events().hex(),
            "mp_state": self.get_mp_state(),
            "debugregs": self.get_debugregs().hex(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`get_state` document into this (fresh) vCPU.

        The whole document is validated and converted first, so a malformed
        one raises :class:`KvmError` before anything is written.  Then the
        pieces go in dependency order: sregs (modes, CR0/CR4/EFER) before
        regs; FPU, then XCRs before XSAVE (XCR0 says which XSAVE components
        are live); MSRs (including the TSC); vCPU events; MP state; debug
        registers.  CPUID must already be set (``set_cpuid2``): several MSRs
        are only writable when CPUID advertises their feature.
        """
        where = "set_state"
        state = _as_mapping(state, "vCPU state", where)
        keys = (
            "version", "regs", "sregs", "fpu", "xcrs", "xsave",
            "msrs", "vcpu_events", "mp_state", "debugregs",
        )  # fmt: skip
        _check_keys(state, keys, "vCPU state", where, complete=True)
        if isinstance(state["version"], bool) or state["version"] != STATE_VERSION:
            raise KvmError(f"vCPU state version {state['version']!r} is not {STATE_VERSION}", where=where)

        try:
            sregs = self._sregs_struct(state["sregs"], complete=True, where=where)
            regs = self._regs_struct(state["regs"], complete=True, where=where)
            fpu = self._fpu_struct(state["fpu"], where=where)
            xcrs = self._xcrs_struct(state["xcrs"], where=where)
            xsave = self._xsave_buffer(_from_hex(state["xsave"], "xsave", where), where=where)
            msrs: dict[int, int] = {}
            for key, value in _as_mapping(state["msrs"], "msrs", where).items():
                try:
                    index = int(key, 0) if isinstance(key, str) else key
                except ValueError:
                    raise KvmError(f"msr key {key!r} is not a number like '0x10'", where=where) from None
                msrs[_as_int(index, 32, f"msr index {key!r}", where)] = _as_int(value, 64, f"msrs[{key!r}]", where)
            events = _struct_from_bytes(
                "struct kvm_vcpu_events", _from_hex(state["vcpu_events"], "vcpu_events", where), "vcpu_events", where
            )
            mp_state = _as_int(state["mp_state"], 32, "mp_state", where)
            debugregs = _struct_from_bytes(
                "struct kvm_debugregs", _from_hex(state["debugregs"], "debugregs", where), "debugregs", where
            )
        except KvmError:
            raise
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            # Belt and braces: any shape problem the checks above missed.
            raise KvmError(f"malformed vCPU state: {exc}", where=where) from exc

        ioctl(self.fd, KVM_SET_SREGS, sregs, where="KVM_SET_SREGS")
        ioctl(self.fd, KVM_SET_REGS, regs, where="KVM_SET_REGS")
        ioctl(self.fd, KVM_SET_FPU, fpu, where="KVM_SET_FPU")
        ioctl(self.fd, KVM_SET_XCRS, xcrs, where="KVM_SET_XCRS")
        ioctl(self.fd, KVM_SET_XSAVE, xsave, where="KVM_SET_XSAVE")
        self.set_msrs(msrs)  # refused MSRs are skipped and logged at debug level
        ioctl(self.fd, KVM_SET_VCPU_EVENTS, events, where="KVM_SET_VCPU_EVENTS")
        mp = ffi.new("struct kvm_mp_state *", {"mp_state": mp_state})
        ioctl(self.fd, KVM_SET_MP_STATE, mp, where="KVM_SET_MP_STATE")
        ioctl(self.fd, KVM_SET_DEBUGREGS, debugregs, where="KVM_SET_DEBUGREGS")

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Unmap ``struct kvm_run`` and close the vCPU fd (idempotent)."""
        if self._mmap is not None:
            ffi.release(self._run_buffer)
            self.run_struct = None
            try:
                self._mmap.close()
            except BufferError:
                # Someone still holds an io_exit()/mmio_exit() view; the mapping
                # goes away when the last view is dropped.
                logger.debug("vcpu %d: kvm_run views still alive, unmapping later", self.index)
            self._mmap = None
        super().close()
