"""Tests of chmig.kvm against the real /dev/kvm (no mocks).

The guests are a few hand-assembled bytes of 16-bit real-mode code placed at
guest-physical 0x1000, with CS = DS = ES = SS = 0 so that addresses in the
code are guest-physical addresses.

The expected struct sizes, offsets and ioctl numbers are literals taken from
the kernel ABI (x86-64 <linux/kvm.h> and <asm/kvm.h>, compiled with gcc and
printed with sizeof/offsetof): they must never be computed with the module
under test.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from chmig import kvm
from chmig.errors import KvmError
from chmig.kvm import ffi
from chmig.protocol import MemoryRangeTable

pytestmark = pytest.mark.timeout(60)

MEM_SIZE = 2 << 20  # 2 MiB
CODE_GPA = 0x1000
TSS_ADDR = 0xFFFBD000  # the address Cloud Hypervisor uses


def _require_kvm() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: these tests need a real KVM host")


@pytest.fixture
def kvm_dev() -> Iterator[kvm.Kvm]:
    _require_kvm()
    dev = kvm.Kvm()
    yield dev
    dev.close()


class Guest:
    """One VM with one vCPU in real mode and one anonymous memory slot at GPA 0."""

    def __init__(self, dev: kvm.Kvm, code: bytes, *, mem_size: int = MEM_SIZE, flags: int = 0) -> None:
        self.vm = dev.create_vm()
        self.vm.set_tss_addr(TSS_ADDR)
        self.mem_size = mem_size
        self.mem = mmap.mmap(-1, mem_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.mem[CODE_GPA : CODE_GPA + len(code)] = code
        self.vm.set_user_memory_region(0, 0, mem_size, kvm.address_of(self.mem), flags)
        self.vcpu = self.vm.create_vcpu(0)
        self.vcpu.set_cpuid2(dev.supported_cpuid())
        flat = {"base": 0, "selector": 0}
        self.vcpu.set_sregs({name: flat for name in ("cs", "ds", "es", "ss")})
        self.vcpu.set_regs({"rip": CODE_GPA, "rflags": 0x2})

    def close(self) -> None:
        self.vcpu.close()
        self.vm.set_user_memory_region(0, 0, 0, 0)  # delete the slot before unmapping
        self.vm.close()
        self.mem.close()


@pytest.fixture
def make_guest(kvm_dev: kvm.Kvm) -> Iterator[Any]:
    guests: list[Guest] = []

    def make(code: bytes, **kwargs: Any) -> Guest:
        guest = Guest(kvm_dev, code, **kwargs)
        guests.append(guest)
        return guest

    yield make
    for guest in guests:
        guest.close()


def expect_exit(vcpu: kvm.Vcpu, reason: int) -> None:
    actual = vcpu.run()
    assert actual == reason, vcpu.describe_exit()


# --------------------------------------------------------------------------
# ABI: sizes, offsets, ioctl numbers (literals from the kernel headers)
# --------------------------------------------------------------------------

STRUCT_SIZES = {
    "struct kvm_regs": 144,
    "struct kvm_segment": 24,
    "struct kvm_dtable": 16,
    "struct kvm_sregs": 312,
    "struct kvm_fpu": 416,
    "struct kvm_xsave": 4096,
    "struct kvm_xcr": 16,
    "struct kvm_xcrs": 392,
    "struct kvm_msr_entry": 16,
    "struct kvm_msrs": 8,  # header only: entries[] is a flexible array
    "struct kvm_msr_list": 4,  # header only: indices[] is a flexible array
    "struct kvm_mp_state": 4,
    "struct kvm_vcpu_events": 64,
    "struct kvm_debugregs": 128,
    "struct kvm_cpuid_entry2": 40,
    "struct kvm_cpuid2": 8,  # header only: entries[] is a flexible array
    "struct kvm_userspace_memory_region": 32,
    "struct kvm_dirty_log": 16,
    "struct kvm_sync_regs": 520,
    "struct kvm_run": 2352,
}


@pytest.mark.parametrize("ctype,size", sorted(STRUCT_SIZES.items()))
def test_struct_size_matches_kernel_abi(ctype: str, size: int) -> None:
    assert ffi.sizeof(ctype) == size


STRUCT_OFFSETS = [
    ("struct kvm_run", ("request_interrupt_window",), 0),
    ("struct kvm_run", ("immediate_exit",), 1),
    ("struct kvm_run", ("exit_reason",), 8),
    ("struct kvm_run", ("ready_for_interrupt_injection",), 12),
    ("struct kvm_run", ("if_flag",), 13),
    ("struct kvm_run", ("flags",), 14),
    ("struct kvm_run", ("cr8",), 16),
    ("struct kvm_run", ("apic_base",), 24),
    ("struct kvm_run", ("hw",), 32),
    ("struct kvm_run", ("fail_entry",), 32),
    ("struct kvm_run", ("fail_entry", "cpu"), 40),
    ("struct kvm_run", ("ex", "error_code"), 36),
    ("struct kvm_run", ("io",), 32),
    ("struct kvm_run", ("io", "data_offset"), 40),
    ("struct kvm_run", ("debug", "arch", "dr7"), 56),
    ("struct kvm_run", ("mmio",), 32),
    ("struct kvm_run", ("mmio", "data"), 40),
    ("struct kvm_run", ("mmio", "len"), 48),
    ("struct kvm_run", ("mmio", "is_write"), 52),
    ("struct kvm_run", ("internal",), 32),
    ("struct kvm_run", ("internal", "data"), 40),
    ("struct kvm_run", ("emulation_failure", "insn_bytes"), 49),
    ("struct kvm_run", ("system_event",), 32),
    ("struct kvm_run", ("system_event", "data"), 40),
    ("struct kvm_run", ("msr", "data"), 48),
    ("struct kvm_run", ("kvm_valid_regs",), 288),
    ("struct kvm_run", ("kvm_dirty_regs",), 296),
    ("struct kvm_run", ("s",), 304),
    ("struct kvm_segment", ("selector",), 12),
    ("struct kvm_segment", ("type",), 14),
    ("struct kvm_segment", ("unusable",), 22),
    ("struct kvm_sregs", ("gdt",), 192),
    ("struct kvm_sregs", ("cr0",), 224),
    ("struct kvm_sregs", ("efer",), 264),
    ("struct kvm_sregs", ("apic_base",), 272),
    ("struct kvm_sregs", ("interrupt_bitmap",), 280),
    ("struct kvm_fpu", ("fcw",), 128),
    ("struct kvm_fpu", ("last_ip",), 136),
    ("struct kvm_fpu", ("xmm",), 152),
    ("struct kvm_fpu", ("mxcsr",), 408),
    ("struct kvm_vcpu_events", ("interrupt",), 8),
    ("struct kvm_vcpu_events", ("nmi",), 12),
    ("struct kvm_vcpu_events", ("sipi_vector",), 16),
    ("struct kvm_vcpu_events", ("flags",), 20),
    ("struct kvm_vcpu_events", ("smi",), 24),
    ("struct kvm_vcpu_events", ("triple_fault",), 28),
    ("struct kvm_vcpu_events", ("reserved",), 29),
    ("struct kvm_vcpu_events", ("exception_has_payload",), 55),
    ("struct kvm_vcpu_events", ("exception_payload",), 56),
    ("struct kvm_debugregs", ("dr6",), 32),
    ("struct kvm_debugregs", ("dr7",), 40),
    ("struct kvm_debugregs", ("flags",), 48),
    ("struct kvm_xcrs", ("xcrs",), 8),
    ("struct kvm_xcrs", ("padding",), 264),
    ("struct kvm_dirty_log", ("dirty_bitmap",), 8),
]


@pytest.mark.parametrize(
    "ctype,fields,offset", STRUCT_OFFSETS, ids=[f"{c[7:]}.{'.'.join(f)}" for c, f, _ in STRUCT_OFFSETS]
)
def test_field_offset_matches_kernel_abi(ctype: str, fields: tuple[str, ...], offset: int) -> None:
    assert ffi.offsetof(ctype, *fields) == offset


IOCTL_NUMBERS = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_GET_MSR_INDEX_LIST": 0xC004AE02,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_GET_DEBUGREGS": 0x8080AEA1,
    "KVM_SET_DEBUGREGS": 0x4080AEA2,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_GET_XCRS": 0x8188AEA6,
    "KVM_SET_XCRS": 0x4188AEA7,
    "KVM_GET_XSAVE2": 0x9000AECF,
}


@pytest.mark.parametrize("name,number", sorted(IOCTL_NUMBERS.items()))
def test_ioctl_number_matches_kernel_header(name: str, number: int) -> None:
    assert getattr(kvm, name) == number


def test_exit_reason_names() -> None:
    assert kvm.EXIT_REASON_NAMES[2] == "IO"
    assert kvm.EXIT_REASON_NAMES[5] == "HLT"
    assert kvm.EXIT_REASON_NAMES[10] == "INTR"
    assert kvm.EXIT_REASON_NAMES[17] == "INTERNAL_ERROR"
    assert (kvm.KVM_EXIT_IO_IN, kvm.KVM_EXIT_IO_OUT) == (0, 1)
    assert kvm.KVM_MEM_LOG_DIRTY_PAGES == 1


# --------------------------------------------------------------------------
# /dev/kvm
# --------------------------------------------------------------------------


def test_open_checks_api_version(kvm_dev: kvm.Kvm) -> None:
    assert kvm_dev.api_version == 12
    assert kvm_dev.check_extension(kvm.KVM_CAP_USER_MEMORY) > 0
    assert kvm_dev.check_extension(kvm.KVM_CAP_IMMEDIATE_EXIT) > 0
    assert kvm_dev.vcpu_mmap_size() >= ffi.sizeof("struct kvm_run")


def test_missing_device_is_a_clear_kvm_error(tmp_path: Any) -> None:
    with pytest.raises(KvmError) as info:
        kvm.Kvm(str(tmp_path / "no-such-kvm"))
    assert "No such file" in str(info.value)
    assert info.value.where == str(tmp_path / "no-such-kvm")


def test_not_a_kvm_device_is_a_kvm_error(tmp_path: Any) -> None:
    # /dev/null opens fine but refuses the ioctl: still a KvmError, no OSError.
    with pytest.raises(KvmError) as info:
        kvm.Kvm("/dev/null")
    assert info.value.where == "KVM_GET_API_VERSION"


def test_supported_cpuid(kvm_dev: kvm.Kvm) -> None:
    entries = kvm_dev.supported_cpuid()
    assert entries
    assert set(entries[0]) == {"function", "index", "flags", "eax", "ebx", "ecx", "edx"}
    leaf0 = next(e for e in entries if e["function"] == 0)
    vendor = b"".join(leaf0[r].to_bytes(4, "little") for r in ("ebx", "edx", "ecx"))
    assert vendor in (b"GenuineIntel", b"AuthenticAMD", b"HygonGenuine", b"CentaurHauls")


def test_msr_index_list_contains_tsc(kvm_dev: kvm.Kvm) -> None:
    indices = kvm_dev.msr_index_list()
    assert kvm.MSR_IA32_TSC in indices
    assert len(indices) == len(set(indices))


def test_set_tss_addr_above_2gib(kvm_dev: kvm.Kvm) -> None:
    # fcntl.ioctl passes a C int: check addresses >= 2 GiB still arrive intact.
    with kvm_dev.create_vm() as vm:
        vm.set_tss_addr(TSS_ADDR)
    with kvm_dev.create_vm() as vm:
        with pytest.raises(KvmError) as info:
            vm.set_tss_addr(0xFFFFE000)  # above 4 GiB - 3 pages: the kernel says EINVAL
        assert info.value.where == "KVM_SET_TSS_ADDR"
        assert "EINVAL" in str(info.value)


def test_address_of_mmap_leaves_it_closable() -> None:
    mem = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = kvm.address_of(mem)
    assert address and address % 4096 == 0
    assert address == kvm.address_of(mem)
    mem.close()  # no BufferError: the from_buffer export was released


def dirty_page_indices(bitmap: bytes | bytearray) -> list[int]:
    """Page numbers set in a KVM dirty bitmap, through chmig's one decoder (protocol.py)."""
    table = MemoryRangeTable.from_dirty_bitmap(bitmap, 0, page_size=1)
    return [page for rng in table for page in range(rng.gpa, rng.end)]


def test_dirty_page_indices() -> None:
    bitmap = (1 << 0 | 1 << 5 | 1 << 64 | 1 << 127).to_bytes(16, "little")
    assert dirty_page_indices(bitmap) == [0, 5, 64, 127]
    assert dirty_page_indices(bytes(16)) == []


# --------------------------------------------------------------------------
# Running guests
# --------------------------------------------------------------------------

# mov al, 0x42 ; out 0x10, al ; hlt
OUT_42_HLT = bytes.fromhex("b042" "e610" "f4")


def test_real_mode_guest_out_then_hlt(make_guest: Any) -> None:
    guest = make_guest(OUT_42_HLT)
    vcpu = guest.vcpu

    expect_exit(vcpu, kvm.KVM_EXIT_IO)
    direction, size, port, count, data = vcpu.io_exit()
    assert (direction, size, port, count) == (kvm.KVM_EXIT_IO_OUT, 1, 0x10, 1)
    assert bytes(data) == b"\x42"
    data.release()
    assert "IO" in vcpu.describe_exit() and "port=0x10" in vcpu.describe_exit()

    expect_exit(vcpu, kvm.KVM_EXIT_HLT)
    assert vcpu.get_regs()["rip"] == CODE_GPA + len(OUT_42_HLT)
    assert vcpu.describe_exit().startswith("exit HLT (5)")
    with pytest.raises(KvmError):
        vcpu.io_exit()  # the last exit is not an IO exit


def test_io_in_data_view_is_writable(make_guest: Any) -> None:
    # in al, 0x11 ; out 0x10, al ; hlt
    guest = make_guest(bytes.fromhex("e411" "e610" "f4"))
    vcpu = guest.vcpu

    expect_exit(vcpu, kvm.KVM_EXIT_IO)
    direction, size, port, count, data = vcpu.io_exit()
    assert (direction, size, port, count) == (kvm.KVM_EXIT_IO_IN, 1, 0x11, 1)
    data[0] = 0x99  # the device's answer, read by the guest on the next KVM_RUN
    data.release()

    expect_exit(vcpu, kvm.KVM_EXIT_IO)
    direction, _, port, _, data = vcpu.io_exit()
    assert (direction, port, bytes(data)) == (kvm.KVM_EXIT_IO_OUT, 0x10, b"\x99")
    data.release()
    expect_exit(vcpu, kvm.KVM_EXIT_HLT)


def test_mmio_exit_outside_memory(make_guest: Any) -> None:
    # DS = 0x1000 (base 0x10000); mov byte [0x8000], 0x5a ; hlt   -> GPA 0x18000
    guest = make_guest(bytes.fromhex("c60600805a" "f4"), mem_size=0x10000)
    vcpu = guest.vcpu
    vcpu.set_sregs({"ds": {"base": 0x10000, "selector": 0x1000}})

    expect_exit(vcpu, kvm.KVM_EXIT_MMIO)
    phys_addr, length, is_write, data = vcpu.mmio_exit()
    assert (phys_addr, length, is_write, bytes(data)) == (0x18000, 1, True, b"\x5a")
    data.release()
    assert "phys_addr=0x18000" in vcpu.describe_exit()
    expect_exit(vcpu, kvm.KVM_EXIT_HLT)


def test_immediate_exit_returns_intr_promptly(make_guest: Any) -> None:
    guest = make_guest(OUT_42_HLT)
    vcpu = guest.vcpu
    vcpu.immediate_exit = True
    assert vcpu.immediate_exit is True
    assert guest.vcpu.run_struct.immediate_exit == 1

    start = time.monotonic()
    assert vcpu.run() == kvm.KVM_EXIT_INTR
    assert time.monotonic() - start < 1.0
    assert vcpu.get_regs()["rip"] == CODE_GPA  # the guest did not run

    vcpu.immediate_exit = False
    expect_exit(vcpu, kvm.KVM_EXIT_IO)  # and runs normally afterwards


def test_signal_kicks_a_busy_vcpu_out_of_kvm_run(make_guest: Any) -> None:
    """The VMM's "pause" pattern: set immediate_exit, then signal the vCPU thread."""
    guest = make_guest(bytes.fromhex("ebfe"))  # jmp $  (spins forever)
    vcpu = guest.vcpu
    exits: list[int] = []

    def vcpu_thread() -> None:
        while True:
            reason = vcpu.run()
            exits.append(reason)
            if reason == kvm.KVM_EXIT_INTR:
                return

    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    try:
        thread = threading.Thread(target=vcpu_thread, name="vcpu0", daemon=True)
        thread.start()
        time.sleep(0.2)
        assert thread.is_alive() and exits == []  # spinning inside KVM_RUN, GIL released
        vcpu.immediate_exit = True
        assert thread.ident is not None
        signal.pthread_kill(thread.ident, signal.SIGUSR1)
        thread.join(10)
        assert not thread.is_alive()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert exits == [kvm.KVM_EXIT_INTR]
    assert vcpu.get_regs()["rip"] == CODE_GPA


# --------------------------------------------------------------------------
# Dirty log
# --------------------------------------------------------------------------


def test_dirty_log_reports_written_page_and_clears(make_guest: Any) -> None:
    # mov byte [0x2000], 1 ; hlt
    guest = make_guest(bytes.fromhex("c606002001" "f4"))
    vm, vcpu = guest.vm, guest.vcpu

    with pytest.raises(KvmError) as info:
        vm.get_dirty_log(0, MEM_SIZE)  # slot registered without dirty logging
    assert info.value.where == "KVM_GET_DIRTY_LOG"

    # Turn dirty logging on for the existing slot, as a migration does.
    vm.set_user_memory_region(0, 0, MEM_SIZE, kvm.address_of(guest.mem), kvm.KVM_MEM_LOG_DIRTY_PAGES)
    bitmap = vm.get_dirty_log(0, MEM_SIZE)
    assert isinstance(bitmap, bytearray)
    assert len(bitmap) == (MEM_SIZE // 4096 + 63) // 64 * 8  # 512 pages -> 8 words -> 64 bytes
    assert dirty_page_indices(bitmap) == []  # writes by this process are not logged

    expect_exit(vcpu, kvm.KVM_EXIT_HLT)
    assert guest.mem[0x2000] == 1
    # Exactly the page the guest wrote: KVM itself wrote nothing in this slot
    # (reading the code page does not dirty it).
    assert dirty_page_indices(vm.get_dirty_log(0, MEM_SIZE)) == [0x2000 // 4096]
    # Reading the log cleared it.
    assert dirty_page_indices(vm.get_dirty_log(0, MEM_SIZE)) == []


def test_dirty_log_refuses_a_wrong_slot_size(make_guest: Any) -> None:
    guest = make_guest(OUT_42_HLT, flags=kvm.KVM_MEM_LOG_DIRTY_PAGES)
    with pytest.raises(KvmError, match="wrong size"):
        guest.vm.get_dirty_log(0, MEM_SIZE // 2)  # the kernel would write 64 bytes into 32


# --------------------------------------------------------------------------
# MSRs
# --------------------------------------------------------------------------

BOGUS_MSR = 0x12345678  # no such MSR: KVM refuses to read or write it


def test_get_msrs_skips_unreadable(make_guest: Any, caplog: Any) -> None:
    vcpu = make_guest(OUT_42_HLT).vcpu
    caplog.set_level("DEBUG", logger="chmig.kvm")
    values = vcpu.get_msrs([kvm.MSR_IA32_TSC, BOGUS_MSR, kvm.MSR_IA32_SYSENTER_CS])
    assert set(values) == {kvm.MSR_IA32_TSC, kvm.MSR_IA32_SYSENTER_CS}
    assert values[kvm.MSR_IA32_TSC] > 0
    assert "0x12345678" in caplog.text


def test_set_msrs_skips_unwritable(make_guest: Any) -> None:
    vcpu = make_guest(OUT_42_HLT).vcpu
    skipped = vcpu.set_msrs({kvm.MSR_IA32_SYSENTER_CS: 0x10, BOGUS_MSR: 1, kvm.MSR_IA32_SYSENTER_ESP: 0x7000})
    assert skipped == [BOGUS_MSR]
    assert vcpu.get_msrs([kvm.MSR_IA32_SYSENTER_CS, kvm.MSR_IA32_SYSENTER_ESP]) == {
        kvm.MSR_IA32_SYSENTER_CS: 0x10,
        kvm.MSR_IA32_SYSENTER_ESP: 0x7000,
    }


def test_many_msrs_in_several_batches(kvm_dev: kvm.Kvm, make_guest: Any) -> None:
    vcpu = make_guest(OUT_42_HLT).vcpu
    indices = kvm_dev.msr_index_list()
    # 300 bogus MSRs (more than one ioctl batch) around the real ones.
    wanted = [0x40000 + i for i in range(150)] + indices + [0x50000 + i for i in range(150)]
    values = vcpu.get_msrs(wanted)
    assert kvm.MSR_IA32_TSC in values
    assert not any(0x40000 <= index < 0x60000 for index in values)


# --------------------------------------------------------------------------
# Whole vCPU state
# --------------------------------------------------------------------------

# mov al, 1 ; out 0x10, al ; mov al, 2 ; out 0x10, al ; hlt
TWO_OUTS = bytes.fromhex("b001" "e610" "b002" "e610" "f4")
TSC_TOLERANCE = 60 * 10**10  # cycles: a minute at 10 GHz, far more than a test takes


def _customise(vcpu: kvm.Vcpu) -> None:
    """Give the vCPU state that differs from a fresh vCPU in every part."""
    vcpu.set_regs({
        "rax": 0x1122334455667788, "rbx": 0xB, "rcx": 0xC, "rdx": 0xD,
        "rsi": 0x51, "rdi": 0xD1, "rsp": 0x7FF0, "rbp": 0xB9,
        "r8": 8, "r9": 9, "r10": 10, "r11": 11, "r12": 12, "r13": 13, "r14": 14, "r15": 0xFFFFFFFFFFFFFFFF,
    })  # fmt: skip
    vcpu.set_sregs({"gdt": {"base": 0x500, "limit": 0x27}, "idt": {"base": 0, "limit": 0x3FF}, "cr2": 0x1234})
    fpu = vcpu.get_fpu()
    fpu["xmm"][3] = bytes(range(16)).hex()
    fpu["mxcsr"] = 0x1FA0
    vcpu.set_fpu(fpu)
    vcpu.set_msrs({
        kvm.MSR_IA32_SYSENTER_CS: 0x10,
        kvm.MSR_IA32_SYSENTER_ESP: 0xFFFF800000001000,
        kvm.MSR_IA32_SYSENTER_EIP: 0xFFFF800000002000,
        kvm.MSR_STAR: 0x0023001000000000,
        kvm.MSR_LSTAR: 0xFFFFFFFF81000000,
        kvm.MSR_KERNEL_GS_BASE: 0xFFFF888000000000,
        kvm.MSR_IA32_TSC: 1 << 40,
    })  # fmt: skip
    debugregs = bytearray(vcpu.get_debugregs())
    debugregs[0:8] = (0xDEAD0000).to_bytes(8, "little")  # DR0
    vcpu.set_debugregs(bytes(debugregs))


def _assert_same_state(restored: dict[str, Any], original: dict[str, Any]) -> None:
    assert set(restored) == set(original)
    for key in original:
        if key == "msrs":
            continue
        assert restored[key] == original[key], key
    assert set(restored["msrs"]) == set(original["msrs"])
    for index, value in original["msrs"].items():
        if index == "0x10":  # the TSC kept counting between save and compare
            assert 0 <= restored["msrs"][index] - value < TSC_TOLERANCE
        else:
            assert restored["msrs"][index] == value, index


def test_state_round_trip_into_fresh_vm(kvm_dev: kvm.Kvm, make_guest: Any) -> None:
    msr_indices = kvm_dev.msr_index_list()
    source = make_guest(TWO_OUTS).vcpu
    _customise(source)

    state = source.get_state(msr_indices)
    assert state["version"] == 1
    assert state["regs"]["rax"] == 0x1122334455667788
    assert state["sregs"]["gdt"] == {"base": 0x500, "limit": 0x27}
    assert state["msrs"]["0x174"] == 0x10
    assert len(bytes.fromhex(state["xsave"])) == source.xsave_size
    document = json.loads(json.dumps(state))  # really JSON-serialisable

    target = make_guest(TWO_OUTS).vcpu
    target.set_state(document)
    _assert_same_state(target.get_state(msr_indices), state)


def test_state_moves_a_running_guest(kvm_dev: kvm.Kvm, make_guest: Any) -> None:
    """Stop a guest between two OUTs, move its vCPU and memory, finish it elsewhere."""
    msr_indices = kvm_dev.msr_index_list()
    source_guest = make_guest(TWO_OUTS)
    source = source_guest.vcpu
    expect_exit(source, kvm.KVM_EXIT_IO)
    assert bytes(source.io_exit()[4]) == b"\x01"
    # Let KVM complete the pending OUT before saving (KVM API doc, KVM_RUN).
    source.immediate_exit = True
    assert source.run() == kvm.KVM_EXIT_INTR
    source.immediate_exit = False
    state = json.loads(json.dumps(source.get_state(msr_indices)))

    target_guest = make_guest(b"")
    target_guest.mem[:] = source_guest.mem[:]
    target = target_guest.vcpu
    target.set_state(state)
    expect_exit(target, kvm.KVM_EXIT_IO)
    assert bytes(target.io_exit()[4]) == b"\x02"
    expect_exit(target, kvm.KVM_EXIT_HLT)


def test_xsave_and_xcrs(make_guest: Any) -> None:
    vcpu = make_guest(OUT_42_HLT).vcpu
    xcrs = vcpu.get_xcrs()
    assert xcrs[0][0] == 0 and xcrs[0][1] & 1  # XCR0 always has x87
    vcpu.set_xcrs(xcrs)
    data = vcpu.get_xsave()
    assert len(data) == vcpu.xsave_size >= 4096
    vcpu.set_xsave(data)
    assert vcpu.get_xsave() == data
    with pytest.raises(KvmError, match="at least 4096"):
        vcpu.set_xsave(data[:4000])


def test_xsave2_path_with_a_larger_buffer(make_guest: Any) -> None:
    """Exercise KVM_GET_XSAVE2 as on a host with AMX (KVM_CAP_XSAVE2 > 4096).

    The kernel writes only its own XSAVE size into the bigger buffer and
    reads only that much back, so pretending the size is 8192 is safe.
    """
    vcpu = make_guest(OUT_42_HLT).vcpu
    legacy = vcpu.get_xsave()
    vcpu.xsave_size = 8192
    big = vcpu.get_xsave()
    assert len(big) == 8192 and big[:4096] == legacy[:4096]
    vcpu.set_xsave(big)
    vcpu.set_xsave(legacy)  # a 4096-byte document from an older host is padded
    vcpu.xsave_size = len(legacy)
    vcpu.set_xsave(big)  # excess that is all zero is dropped
    with pytest.raises(KvmError, match="supports only"):
        vcpu.set_xsave(legacy + b"\x01" * 4096)


def test_describe_exit_decodes_error_exits(make_guest: Any) -> None:
    """KVM fills struct kvm_run; here the test writes it to check the decoding."""
    vcpu = make_guest(OUT_42_HLT).vcpu
    run = vcpu.run_struct

    run.exit_reason = kvm.KVM_EXIT_FAIL_ENTRY
    run.fail_entry.hardware_entry_failure_reason = 0x80000021
    run.fail_entry.cpu = 3
    text = vcpu.describe_exit()
    assert "FAIL_ENTRY" in text and "0x80000021" in text and "cpu=3" in text and "invalid guest state" in text

    run.exit_reason = kvm.KVM_EXIT_INTERNAL_ERROR
    run.emulation_failure.suberror = kvm.KVM_INTERNAL_ERROR_EMULATION
    run.emulation_failure.ndata = 4
    run.emulation_failure.flags = kvm.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
    run.emulation_failure.insn_size = 2
    run.emulation_failure.insn_bytes[0:2] = [0x0F, 0x0B]
    text = vcpu.describe_exit()
    assert "INTERNAL_ERROR" in text and "suberror=EMULATION" in text and "insn_bytes=0f0b" in text

    run.exit_reason = kvm.KVM_EXIT_SYSTEM_EVENT
    run.system_event.type = kvm.KVM_SYSTEM_EVENT_RESET
    run.system_event.ndata = 0
    assert "type=RESET" in vcpu.describe_exit()

    run.exit_reason = 200
    assert "(200)" in vcpu.describe_exit()


def _valid_state(vcpu: kvm.Vcpu, kvm_dev: kvm.Kvm) -> dict[str, Any]:
    return json.loads(json.dumps(vcpu.get_state(kvm_dev.msr_index_list())))


MALFORMATIONS = {
    "not a dict": lambda s: ["version", 1],
    "missing key": lambda s: {k: v for k, v in s.items() if k != "xsave"},
    "unknown key": lambda s: {**s, "lapic": "00"},
    "wrong version": lambda s: {**s, "version": 2},
    "version as bool": lambda s: {**s, "version": True},
    "regs not a dict": lambda s: {**s, "regs": [1, 2, 3]},
    "reg not an int": lambda s: {**s, "regs": {**s["regs"], "rax": "0x10"}},
    "reg negative": lambda s: {**s, "regs": {**s["regs"], "rip": -1}},
    "reg too big": lambda s: {**s, "regs": {**s["regs"], "rip": 1 << 64}},
    "reg missing": lambda s: {**s, "regs": {k: v for k, v in s["regs"].items() if k != "rflags"}},
    "segment field missing": lambda s: {
        **s, "sregs": {**s["sregs"], "cs": {k: v for k, v in s["sregs"]["cs"].items() if k != "g"}}
    },
    "segment field too wide": lambda s: {**s, "sregs": {**s["sregs"], "ds": {**s["sregs"]["ds"], "selector": 1 << 16}}},
    "interrupt_bitmap short": lambda s: {**s, "sregs": {**s["sregs"], "interrupt_bitmap": [0, 0, 0]}},
    "fpu row count": lambda s: {**s, "fpu": {**s["fpu"], "fpr": s["fpu"]["fpr"][:7]}},
    "fpu row not hex": lambda s: {**s, "fpu": {**s["fpu"], "xmm": ["zz" * 16] * 16}},
    "xsave not hex": lambda s: {**s, "xsave": "not hex"},
    "xsave too short": lambda s: {**s, "xsave": "00" * 100},
    "xsave not a string": lambda s: {**s, "xsave": 12},
    "xcrs not a list": lambda s: {**s, "xcrs": {"xcr": 0, "value": 1}},
    "xcr entry bad": lambda s: {**s, "xcrs": [{"xcr": 0}]},
    "msr key not a number": lambda s: {**s, "msrs": {**s["msrs"], "tsc": 1}},
    "msr value null": lambda s: {**s, "msrs": {**s["msrs"], "0x174": None}},
    "msrs a list": lambda s: {**s, "msrs": [16, 1]},
    "mp_state string": lambda s: {**s, "mp_state": "RUNNABLE"},
    "vcpu_events wrong size": lambda s: {**s, "vcpu_events": "00" * 63},
    "debugregs an int": lambda s: {**s, "debugregs": 0},
}


@pytest.mark.parametrize("name", sorted(MALFORMATIONS))
def test_malformed_state_is_a_kvm_error_and_changes_nothing(kvm_dev: kvm.Kvm, make_guest: Any, name: str) -> None:
    vcpu = make_guest(OUT_42_HLT).vcpu
    valid = _valid_state(vcpu, kvm_dev)
    vcpu.set_regs({"rax": 0xAAAA})
    before = vcpu.get_regs()

    with pytest.raises(KvmError) as info:
        vcpu.set_state(MALFORMATIONS[name](valid))
    assert info.value.where == "set_state"
    assert vcpu.get_regs() == before  # validation happens before any write


def test_set_regs_rejects_unknown_names(make_guest: Any) -> None:
    vcpu = make_guest(OUT_42_HLT).vcpu
    with pytest.raises(KvmError, match="unknown keys"):
        vcpu.set_regs({"eax": 1})
    with pytest.raises(KvmError, match="unknown keys"):
        vcpu.set_sregs({"cs": {"bse": 0}})


def test_closed_vcpu_is_gone(make_guest: Any) -> None:
    guest = make_guest(OUT_42_HLT)
    vcpu = guest.vcpu
    expect_exit(vcpu, kvm.KVM_EXIT_IO)
    view = vcpu.io_exit()[4]  # a view still alive while closing must not break close()
    vcpu.close()
    vcpu.close()  # idempotent
    assert vcpu.fd == -1 and vcpu.run_struct is None
    assert bytes(view) == b"\x42"
    view.release()
