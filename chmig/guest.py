"""The chmig test guest: its contract, its boot image and its entry state.

The guest (``chmig/guest/guest.S``, built into ``chmig/guest/guest.bin``) is
a small x86-64 program that makes live migration checkable.  Every vCPU owns
a disjoint share of the RAM above 1 MiB, stamps each of its pages with a value
derived from the page address and a *generation*, rewrites a window of pages
every round and verifies all of them every round.  Which generation a page
must hold is a pure function of the completed-round count (see
:func:`expected_generation`), and that count lives in three places (``r15``,
the low qword of ``xmm15`` and the status block) that must agree, so a page a
migration lost, corrupted or sent stale is detected, and so is register state
that does not belong with the memory it arrived with.

This module holds the numbers of that contract (``docs/guest.md`` documents
them), writes the boot image into guest memory (:func:`build_boot_image`),
puts a vCPU into the guest's 64-bit entry state (:func:`setup_long_mode`) and
decodes what the guest reports (:func:`read_status`).  It has no threads and
no VMM loop: the VMM drives the vCPUs and only needs ``write``/``read``
callables over guest-physical memory here.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any, Callable

from chmig.errors import VmError
from chmig.units import GiB, MiB, PAGE_SIZE  # noqa: F401 - part of this module's vocabulary

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Memory layout (guest-physical).  The first MiB is the "program area": it is
# written by the VMM and the guest but never verified.
# --------------------------------------------------------------------------


PROGRAM_AREA_END = 1 * MiB
"""Verified RAM starts here; everything below is the program area."""

GDT_ADDR = 0x0500
GDT_LIMIT = 5 * 8 - 1
GDT_NULL = 0x0000000000000000
GDT_CODE64 = 0x00AF9B000000FFFF
"""Selector 0x08: 64-bit code (L=1, D=0), present, DPL 0, accessed, G=1."""
GDT_DATA = 0x00CF93000000FFFF
"""Selector 0x10: flat read/write data, present, DPL 0, accessed, D/B=1, G=1."""
GDT_USER_CODE64 = 0x00AFFB000000FFFF
"""Selector 0x1B (entry 0x18, RPL 3): the same 64-bit code segment at DPL 3."""
GDT_USER_DATA = 0x00CFF3000000FFFF
"""Selector 0x23 (entry 0x20, RPL 3): the same flat data segment at DPL 3."""
CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
USER_CODE_SELECTOR = 0x1B
USER_DATA_SELECTOR = 0x23

PML4_ADDR = 0x1000
PDPT_ADDR = 0x2000
PD_ADDR = 0x3000
"""Page directory for GiB ``j`` is at ``PD_ADDR + 0x1000 * j``."""
MAX_PDS = 64
MAX_MAPPED = MAX_PDS * GiB
"""The identity map covers at most 64 GiB of guest-physical space."""
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_USER = 1 << 2
"""Set at every level: the verify and counter workloads run at CPL 3."""
PTE_LARGE = 1 << 7
LARGE_PAGE = 2 * MiB

PARAMS_ADDR = 0x50000
PARAMS_SIZE = 0x1000
PARAMS_MAGIC = int.from_bytes(b"CHMIGPRM", "little")
PARAMS_FORMAT = "<QIIII"
"""magic, workload, ncpus, dirty_percent, reserved."""

STATUS_ADDR = 0x60000
STATUS_SIZE = 512
MAX_VCPUS = 16
MAX_RANGES_PER_VCPU = 24

# Offsets inside a status block.
ST_ROUNDS = 0x00
ST_ERRORS = 0x08
ST_LAST_ERROR_GPA = 0x10
ST_TICKS = 0x18
ST_NPAGES = 0x20
ST_WINDOW = 0x28
ST_NRANGES = 0x30
ST_LAST_ERROR_KIND = 0x38
ST_INITIALIZED = 0x40
ST_EXPECTED_AT_ERROR = 0x48
ST_FOUND_AT_ERROR = 0x50
ST_LAST_ERROR_ADDR = 0x58
"""Extension of the contract: the gpa of the bad word itself (0 for kind 2)."""
ST_RANGES = 0x80

STACK_ADDR = 0x70000
STACK_SIZE = 0x1000
"""vCPU k's stack is [STACK_ADDR + k*STACK_SIZE, +STACK_SIZE); its top is the end."""

PROGRAM_ADDR = 0x80000
PROGRAM_MAX_SIZE = 256 * 1024

# --------------------------------------------------------------------------
# Workloads, error kinds, ports.
# --------------------------------------------------------------------------

WORKLOAD_VERIFY = 0
WORKLOAD_COUNTER = 1
WORKLOAD_IDLE = 2
WORKLOADS: dict[str, int] = {
    "verify": WORKLOAD_VERIFY,
    "counter": WORKLOAD_COUNTER,
    "idle": WORKLOAD_IDLE,
}

ERROR_KIND_STAMP = 1
"""A word of a page differs from the stamp of its expected generation."""
ERROR_KIND_REGISTERS = 2
"""r15, xmm15 and status.rounds disagree."""
ERROR_KIND_PARAMS = 3
"""Extension: the params block or this vCPU's status block is unusable; the vCPU parks."""
ERROR_KINDS: dict[int, str] = {
    0: "none",
    ERROR_KIND_STAMP: "page stamp mismatch",
    ERROR_KIND_REGISTERS: "register state mismatch",
    ERROR_KIND_PARAMS: "bad params",
}

STAMP_MULTIPLIER = 0x9E3779B97F4A7C15
U64_MASK = (1 << 64) - 1

PORT_COM1 = 0x3F8
PORT_ROUND = 0x510
PORT_ERROR = 0x514
PORT_PACE = 0x518
PORT_TICK = 0x51C
PACE_PAGES = 256
"""The guest sends PORT_PACE after every 256 pages (1 MiB) written."""

PORTS: dict[int, str] = {
    PORT_COM1: "com1",
    PORT_ROUND: "round",
    PORT_ERROR: "error",
    PORT_PACE: "pace",
    PORT_TICK: "tick",
}

# --------------------------------------------------------------------------
# Entry state.
# --------------------------------------------------------------------------

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

ENTRY_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG
ENTRY_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
ENTRY_EFER = EFER_LME | EFER_LMA
RFLAGS_FIXED = 0x2
RFLAGS_IOPL3 = 3 << 12
ENTRY_RFLAGS = RFLAGS_FIXED
"""RFLAGS of a CPL-0 entry (the idle workload): interrupts off."""
ENTRY_RFLAGS_USER = RFLAGS_FIXED | RFLAGS_IOPL3
"""RFLAGS of a CPL-3 entry (verify, counter): IOPL 3 so the port writes are allowed."""

USER_MODE_WORKLOADS = frozenset({"verify", "counter"})
"""Workloads entered at CPL 3.  The guest code runs the same at CPL 0 and 3,
but some KVM hosts (PVM, the software-only x86 KVM) emulate CPL-0 guest code
one instruction at a time (about a million instructions a second) and cannot
emulate SSE, while CPL-3 code runs natively everywhere.  Idle needs HLT, which
only CPL 0 may execute, and does next to nothing, so it stays at CPL 0."""

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip


def stack_top(index: int) -> int:
    """Return the initial RSP of vCPU ``index``."""
    return STACK_ADDR + STACK_SIZE * (index + 1)


def status_addr(index: int) -> int:
    """Return the guest-physical address of vCPU ``index``'s status block."""
    return STATUS_ADDR + STATUS_SIZE * index


def stamp_key(generation: int) -> int:
    """Return the XOR key of ``generation``: ``generation * STAMP_MULTIPLIER mod 2**64``."""
    return (generation * STAMP_MULTIPLIER) & U64_MASK


def stamp_word(addr: int, generation: int) -> int:
    """Return the 8-byte value the word at ``addr`` holds under ``generation``."""
    return addr ^ stamp_key(generation)


def stamp_page(gpa: int, generation: int) -> bytes:
    """Return the 4 KiB content of page ``gpa`` stamped with ``generation``."""
    key = stamp_key(generation)
    return struct.pack("<512Q", *(a ^ key for a in range(gpa, gpa + PAGE_SIZE, 8)))


def expected_generation(i: int, rounds: int, npages: int, window: int) -> int:
    """Return the generation local page ``i`` holds after ``rounds`` completed rounds.

    Round ``r`` (1-based) rewrites the local pages ``u mod npages`` for ``u``
    in ``[(r-1)*window, r*window)`` with generation ``r``; generation 0 is the
    first-boot stamp.  So the page holds the generation of the last position
    ``u < rounds*window`` with ``u ≡ i (mod npages)``, or 0 if there is none.
    This is the formula the guest evaluates (with 64-bit arithmetic, so it is
    exact while ``rounds * window < 2**64``).
    """
    if not 0 <= i < npages:
        raise VmError(f"page index {i} outside 0..{npages - 1}", where="expected_generation")
    total = rounds * window
    if window == 0 or total <= i:
        return 0
    u = i + npages * ((total - 1 - i) // npages)
    return u // window + 1


def window_pages(npages: int, dirty_percent: int) -> int:
    """Return the pages a vCPU rewrites per round: ``npages*dirty_percent//100``, ≥ 1 if any."""
    window = npages * dirty_percent // 100
    if dirty_percent > 0 and npages > 0:
        window = max(window, 1)
    return window


def in_next_window(i: int, rounds: int, npages: int, window: int) -> bool:
    """Return whether local page ``i`` is rewritten by round ``rounds + 1``."""
    if npages == 0 or window == 0:
        return False
    start = (rounds * window) % npages
    return (i - start) % npages < window


# --------------------------------------------------------------------------
# The program.
# --------------------------------------------------------------------------

GUEST_DIR = Path(__file__).with_name("guest")
"""The folder with guest.S, guest.ld, build.sh and the built guest.bin."""


def guest_binary() -> bytes:
    """Return the flat guest program (``chmig/guest/guest.bin``), loaded at PROGRAM_ADDR."""
    path = GUEST_DIR / "guest.bin"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VmError(f"cannot read the guest program ({exc}); run sh chmig/guest/build.sh", where=str(path)) from exc
    if not data or len(data) > PROGRAM_MAX_SIZE:
        raise VmError(f"guest program is {len(data)} bytes, want 1..{PROGRAM_MAX_SIZE}", where="guest.bin")
    return data


# --------------------------------------------------------------------------
# RAM split and boot image.
# --------------------------------------------------------------------------


def _normalized_ram(ram_ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return the RAM ranges as sorted, page-trimmed (start, end) pairs; reject overlaps."""
    spans: list[tuple[int, int]] = []
    for gpa, size in sorted(ram_ranges):
        if gpa < 0 or size < 0:
            raise VmError(f"bad RAM range gpa={gpa:#x} size={size:#x}", where="guest RAM layout")
        start = -(-gpa // PAGE_SIZE) * PAGE_SIZE
        end = (gpa + size) // PAGE_SIZE * PAGE_SIZE
        if spans and gpa < spans[-1][1]:
            raise VmError(f"RAM range at {gpa:#x} overlaps the previous one", where="guest RAM layout")
        if end > start:
            spans.append((start, end))
    return spans


def split_ranges(ram_ranges: list[tuple[int, int]], ncpus: int) -> list[list[tuple[int, int]]]:
    """Split the RAM above 1 MiB into ``ncpus`` disjoint shares of (nearly) equal page count.

    ``ram_ranges`` are (gpa, size) pairs in any order.  Pages are dealt out
    in address order: vCPU k gets global pages ``[k*T//ncpus, (k+1)*T//ncpus)``
    of the ``T`` pages above 1 MiB, as a list of page-aligned (start, end)
    ranges, end exclusive.  Raises VmError if a share needs more than
    MAX_RANGES_PER_VCPU ranges or ``ncpus`` is out of range.
    """
    if not 1 <= ncpus <= MAX_VCPUS:
        raise VmError(f"ncpus {ncpus} outside 1..{MAX_VCPUS}", where="guest RAM split")
    spans = []
    for start, end in _normalized_ram(ram_ranges):
        start = max(start, PROGRAM_AREA_END)
        if end > start:
            spans.append((start, end))
    total = sum((end - start) // PAGE_SIZE for start, end in spans)
    shares: list[list[tuple[int, int]]] = []
    span_index = 0
    cursor = spans[0][0] if spans else 0
    for k in range(ncpus):
        want = (k + 1) * total // ncpus - k * total // ncpus
        share: list[tuple[int, int]] = []
        while want > 0:
            start, end = spans[span_index]
            take = min(want, (end - cursor) // PAGE_SIZE)
            share.append((cursor, cursor + take * PAGE_SIZE))
            cursor += take * PAGE_SIZE
            want -= take
            if cursor == end and span_index + 1 < len(spans):
                span_index += 1
                cursor = spans[span_index][0]
        if len(share) > MAX_RANGES_PER_VCPU:
            raise VmError(
                f"vCPU {k}'s share of RAM needs {len(share)} ranges, the guest takes {MAX_RANGES_PER_VCPU}",
                where="guest RAM split",
            )
        shares.append(share)
    return shares


def gdt_bytes() -> bytes:
    """Return the guest's GDT: null, code (0x08), data (0x10), user code (0x1B), user data (0x23)."""
    return struct.pack("<5Q", GDT_NULL, GDT_CODE64, GDT_DATA, GDT_USER_CODE64, GDT_USER_DATA)


def page_table_bytes(top: int) -> tuple[bytes, bytes, bytes]:
    """Return (PML4, PDPT, PDs) identity-mapping [0, top rounded up to 1 GiB) with 2 MiB pages."""
    ngib = max(1, -(-top // GiB))
    if ngib > MAX_PDS:
        raise VmError(
            f"guest RAM reaches {top:#x}, the guest maps at most {MAX_MAPPED >> 30} GiB",
            where="guest page tables",
        )
    table = PTE_PRESENT | PTE_WRITABLE | PTE_USER
    pml4 = struct.pack("<Q", PDPT_ADDR | table).ljust(PAGE_SIZE, b"\0")
    pdpt = struct.pack(f"<{ngib}Q", *(PD_ADDR + PAGE_SIZE * j | table for j in range(ngib))).ljust(PAGE_SIZE, b"\0")
    flags = table | PTE_LARGE
    pds = struct.pack(f"<{ngib * 512}Q", *(n * LARGE_PAGE | flags for n in range(ngib * 512)))
    return pml4, pdpt, pds


def params_bytes(workload: int, ncpus: int, dirty_percent: int) -> bytes:
    """Return the 4 KiB params block."""
    return struct.pack(PARAMS_FORMAT, PARAMS_MAGIC, workload, ncpus, dirty_percent, 0).ljust(PARAMS_SIZE, b"\0")


def status_bytes(ranges: list[tuple[int, int]], dirty_percent: int) -> bytes:
    """Return a first-boot status block: counters zero, npages/window/nranges/ranges filled."""
    npages = sum((end - start) // PAGE_SIZE for start, end in ranges)
    block = bytearray(STATUS_SIZE)
    struct.pack_into("<QQQ", block, ST_NPAGES, npages, window_pages(npages, dirty_percent), len(ranges))
    for n, (start, end) in enumerate(ranges):
        struct.pack_into("<QQ", block, ST_RANGES + 16 * n, start, end)
    return bytes(block)


def build_boot_image(
    write: Callable[[int, bytes], None],
    ram_ranges: list[tuple[int, int]],
    ncpus: int,
    workload: str,
    dirty_percent: int,
) -> None:
    """Write the guest's boot image into guest memory through ``write(gpa, data)``.

    Writes the GDT, the identity page tables (up to the top of the highest RAM
    range rounded up to 1 GiB), the params block, one first-boot status block
    per vCPU (its share of RAM from :func:`split_ranges`, npages, window) and
    the program.  ``ram_ranges`` are (gpa, size) pairs and must cover the
    first MiB.
    """
    if workload not in WORKLOADS:
        raise VmError(f"unknown guest workload {workload!r}; want one of {', '.join(WORKLOADS)}", where="guest boot image")
    if not 0 <= dirty_percent <= 100:
        raise VmError(f"dirty_percent {dirty_percent} outside 0..100", where="guest boot image")
    spans = _normalized_ram(ram_ranges)
    if not spans or spans[0][0] != 0 or spans[0][1] < PROGRAM_AREA_END:
        raise VmError("guest RAM must cover the first MiB (the program area)", where="guest boot image")
    shares = split_ranges(ram_ranges, ncpus)
    program = guest_binary()
    top = max(gpa + size for gpa, size in ram_ranges)
    pml4, pdpt, pds = page_table_bytes(top)

    write(GDT_ADDR, gdt_bytes())
    write(PML4_ADDR, pml4)
    write(PDPT_ADDR, pdpt)
    write(PD_ADDR, pds)
    write(PARAMS_ADDR, params_bytes(WORKLOADS[workload], ncpus, dirty_percent))
    write(STATUS_ADDR, bytes(STATUS_SIZE * MAX_VCPUS))
    for k, share in enumerate(shares):
        write(status_addr(k), status_bytes(share, dirty_percent))
    write(PROGRAM_ADDR, program)
    npages = [sum((e - s) // PAGE_SIZE for s, e in share) for share in shares]
    log.info(
        "guest boot image: workload %s, %d vCPU(s), dirty %d%%, %d pages per vCPU (%s), %d bytes of program",
        workload, ncpus, dirty_percent, npages[0] if npages else 0,
        "equal" if len(set(npages)) <= 1 else f"up to {max(npages)}", len(program),
    )  # fmt: skip


def setup_long_mode(vcpu: Any, index: int, workload: str = "verify") -> None:
    """Put ``vcpu`` into the guest's 64-bit entry state as vCPU ``index`` for ``workload``.

    Flat segments from the GDT at GDT_ADDR, paging on with CR3 = PML4_ADDR,
    SSE enabled (CR0.MP, CR4.OSFXSR|OSXMMEXCPT; the guest uses xmm registers),
    interrupts off; RIP = PROGRAM_ADDR, RSP = its stack top, RDI = ``index``,
    every other GPR zero.  Verify and counter start at CPL 3 with IOPL 3, idle
    at CPL 0 (see USER_MODE_WORKLOADS); pass the same workload as to
    :func:`build_boot_image`.  ``vcpu`` is a chmig.kvm.Vcpu (dict sregs/regs).
    """
    if not 0 <= index < MAX_VCPUS:
        raise VmError(f"vCPU index {index} outside 0..{MAX_VCPUS - 1}", where="setup_long_mode")
    if workload not in WORKLOADS:
        raise VmError(f"unknown guest workload {workload!r}; want one of {', '.join(WORKLOADS)}", where="setup_long_mode")
    user = workload in USER_MODE_WORKLOADS
    dpl = 3 if user else 0
    sregs = vcpu.get_sregs()
    code = {
        "base": 0, "limit": 0xFFFFFFFF, "selector": USER_CODE_SELECTOR if user else CODE_SELECTOR,
        "type": 0xB, "present": 1, "dpl": dpl, "db": 0, "s": 1, "l": 1, "g": 1, "avl": 0, "unusable": 0,
    }  # fmt: skip
    data = {
        "base": 0, "limit": 0xFFFFFFFF, "selector": USER_DATA_SELECTOR if user else DATA_SELECTOR,
        "type": 0x3, "present": 1, "dpl": dpl, "db": 1, "s": 1, "l": 0, "g": 1, "avl": 0, "unusable": 0,
    }  # fmt: skip
    sregs["cs"] = dict(sregs["cs"], **code)
    for name in ("ds", "es", "fs", "gs", "ss"):
        sregs[name] = dict(sregs[name], **data)
    sregs["gdt"] = dict(sregs["gdt"], base=GDT_ADDR, limit=GDT_LIMIT)
    sregs["idt"] = dict(sregs["idt"], base=0, limit=0)
    sregs["cr0"] = ENTRY_CR0
    sregs["cr3"] = PML4_ADDR
    sregs["cr4"] = ENTRY_CR4
    sregs["efer"] = ENTRY_EFER
    vcpu.set_sregs(sregs)
    regs = {name: 0 for name in GPR_NAMES}
    rflags = ENTRY_RFLAGS_USER if user else ENTRY_RFLAGS
    regs.update(rip=PROGRAM_ADDR, rsp=stack_top(index), rdi=index, rflags=rflags)
    vcpu.set_regs(regs)
    log.debug("vCPU %d: long mode entry at %#x, CPL %d, rsp %#x", index, PROGRAM_ADDR, dpl, stack_top(index))


# --------------------------------------------------------------------------
# Reading what the guest reports.
# --------------------------------------------------------------------------

_STATUS_FIELDS = (
    ("rounds", ST_ROUNDS),
    ("errors", ST_ERRORS),
    ("last_error_gpa", ST_LAST_ERROR_GPA),
    ("ticks", ST_TICKS),
    ("npages", ST_NPAGES),
    ("window", ST_WINDOW),
    ("nranges", ST_NRANGES),
    ("last_error_kind", ST_LAST_ERROR_KIND),
    ("initialized", ST_INITIALIZED),
    ("expected_at_error", ST_EXPECTED_AT_ERROR),
    ("found_at_error", ST_FOUND_AT_ERROR),
    ("last_error_addr", ST_LAST_ERROR_ADDR),
)


def decode_status(block: bytes) -> dict[str, Any]:
    """Decode a 512-byte status block into a dict (see :func:`read_status`)."""
    if len(block) < STATUS_SIZE:
        raise VmError(f"status block is {len(block)} bytes, want {STATUS_SIZE}", where="guest status")
    status: dict[str, Any] = {name: struct.unpack_from("<Q", block, off)[0] for name, off in _STATUS_FIELDS}
    nranges = min(status["nranges"], MAX_RANGES_PER_VCPU)
    status["ranges"] = [struct.unpack_from("<QQ", block, ST_RANGES + 16 * n) for n in range(nranges)]
    return status


def read_status(read: Callable[[int, int], bytes], index: int) -> dict[str, Any]:
    """Read and decode vCPU ``index``'s status block through ``read(gpa, size)``.

    Keys: rounds, errors, last_error_gpa, ticks, npages, window, nranges,
    last_error_kind, initialized, expected_at_error, found_at_error,
    last_error_addr and ranges (a list of (start, end)).
    """
    if not 0 <= index < MAX_VCPUS:
        raise VmError(f"vCPU index {index} outside 0..{MAX_VCPUS - 1}", where="read_status")
    return decode_status(bytes(read(status_addr(index), STATUS_SIZE)))


def page_gpa(ranges: list[tuple[int, int]], i: int) -> int:
    """Return the gpa of local page ``i`` of a vCPU owning ``ranges`` (in order)."""
    for start, end in ranges:
        n = (end - start) // PAGE_SIZE
        if i < n:
            return start + i * PAGE_SIZE
        i -= n
    raise VmError("page index beyond the vCPU's ranges", where="page_gpa")
