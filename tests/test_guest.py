"""Tests of the chmig test guest: its build, its formulas and its behaviour under real KVM.

The KVM tests boot the guest with a tiny single-threaded-per-vCPU run loop
(``GuestVm`` below) that handles the guest's ports and HLT exits, and
inspect guest memory from the host between rounds.
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from chmig import guest
from chmig.errors import VmError

GUEST_DIR = Path(guest.__file__).with_name("guest")


# ---------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_binary_rebuilds_byte_identical(tmp_path: Path) -> None:
    missing = [tool for tool in ("as", "ld", "objcopy") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"GNU binutils not installed ({', '.join(missing)} missing)")
    out = tmp_path / "guest.bin"
    subprocess.run(["sh", str(GUEST_DIR / "build.sh"), str(out)], check=True, timeout=60)
    assert out.read_bytes() == (GUEST_DIR / "guest.bin").read_bytes()


@pytest.mark.timeout(10)
def test_guest_binary_fits_below_the_program_limit() -> None:
    data = guest.guest_binary()
    assert 0 < len(data) <= guest.PROGRAM_MAX_SIZE
    assert data[0] == 0xFC  # cld: the entry point is byte 0


@pytest.mark.timeout(10)
def test_constants_match_the_assembly() -> None:
    """The .equ values in guest.S are the ones guest.py exports."""
    source = (GUEST_DIR / "guest.S").read_text()
    equ = {}
    for line in source.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == ".equ":
            equ[parts[1].rstrip(",")] = parts[2]
    pairs = {
        "PARAMS": guest.PARAMS_ADDR, "PARAMS_MAGIC": guest.PARAMS_MAGIC,
        "STATUS_BASE": guest.STATUS_ADDR, "ST_ROUNDS": guest.ST_ROUNDS, "ST_ERRORS": guest.ST_ERRORS,
        "ST_LAST_ERROR_GPA": guest.ST_LAST_ERROR_GPA, "ST_TICKS": guest.ST_TICKS,
        "ST_NPAGES": guest.ST_NPAGES, "ST_WINDOW": guest.ST_WINDOW, "ST_NRANGES": guest.ST_NRANGES,
        "ST_LAST_ERROR_KIND": guest.ST_LAST_ERROR_KIND, "ST_INITIALIZED": guest.ST_INITIALIZED,
        "ST_EXPECTED": guest.ST_EXPECTED_AT_ERROR, "ST_FOUND": guest.ST_FOUND_AT_ERROR,
        "ST_ERROR_ADDR": guest.ST_LAST_ERROR_ADDR, "ST_RANGES": guest.ST_RANGES,
        "MAX_VCPUS": guest.MAX_VCPUS, "MAX_RANGES": guest.MAX_RANGES_PER_VCPU,
        "PORT_COM1": guest.PORT_COM1, "PORT_ROUND": guest.PORT_ROUND, "PORT_ERROR": guest.PORT_ERROR,
        "PORT_PACE": guest.PORT_PACE, "PORT_TICK": guest.PORT_TICK, "PACE_PAGES": guest.PACE_PAGES,
        "STAMP_MULTIPLIER": guest.STAMP_MULTIPLIER, "WL_VERIFY": guest.WORKLOAD_VERIFY,
        "WL_COUNTER": guest.WORKLOAD_COUNTER, "WL_IDLE": guest.WORKLOAD_IDLE,
        "ERR_STAMP": guest.ERROR_KIND_STAMP, "ERR_REGISTERS": guest.ERROR_KIND_REGISTERS,
        "ERR_PARAMS": guest.ERROR_KIND_PARAMS,
    }  # fmt: skip
    for name, value in pairs.items():
        assert int(equ[name], 0) == value, name
    assert 1 << int(equ["STATUS_SHIFT"]) == guest.STATUS_SIZE


# ---------------------------------------------------------------------------
# Formulas (pure Python)
# ---------------------------------------------------------------------------


def simulate(npages: int, window: int, rounds: int) -> list[int]:
    """Apply the window rule literally: round r writes generation r on u mod N, u in [(r-1)W, rW)."""
    gen = [0] * npages
    for r in range(1, rounds + 1):
        for u in range((r - 1) * window, r * window):
            gen[u % npages] = r
    return gen


@pytest.mark.timeout(30)
def test_expected_generation_matches_the_window_rule() -> None:
    for npages in range(1, 10):
        for window in range(0, 2 * npages + 2):
            for rounds in range(0, 15):
                want = simulate(npages, window, rounds)
                got = [guest.expected_generation(i, rounds, npages, window) for i in range(npages)]
                assert got == want, (npages, window, rounds)
                following = simulate(npages, window, rounds + 1)
                window_now = [guest.in_next_window(i, rounds, npages, window) for i in range(npages)]
                assert window_now == [following[i] == rounds + 1 for i in range(npages)]


@pytest.mark.timeout(10)
def test_expected_generation_edge_cases() -> None:
    for rounds in range(0, 50):
        assert all(guest.expected_generation(i, rounds, 7, 7) == rounds for i in range(7))
        assert all(guest.expected_generation(i, rounds, 7, 0) == 0 for i in range(7))
    # A long way in, a page a stale copy would carry is never the expected one.
    n, w = 1000, 37
    assert guest.expected_generation(5, 10**6, n, w) != guest.expected_generation(5, 10**6 - n // w - 1, n, w)
    with pytest.raises(VmError):
        guest.expected_generation(7, 1, 7, 1)


@pytest.mark.timeout(10)
def test_stamps() -> None:
    assert guest.stamp_word(0x100000, 0) == 0x100000
    assert guest.stamp_word(0x100008, 1) == 0x100008 ^ guest.STAMP_MULTIPLIER
    page = guest.stamp_page(0x200000, 3)
    assert len(page) == guest.PAGE_SIZE
    assert struct.unpack_from("<Q", page, 4088)[0] == 0x200FF8 ^ (3 * guest.STAMP_MULTIPLIER % 2**64)
    assert guest.window_pages(100, 0) == 0
    assert guest.window_pages(100, 1) == 1
    assert guest.window_pages(10, 1) == 1  # at least one page when dirty_percent > 0
    assert guest.window_pages(100, 100) == 100


@pytest.mark.timeout(10)
def test_split_ranges() -> None:
    mib = guest.MiB
    assert guest.split_ranges([(0, 8 * mib)], 1) == [[(mib, 8 * mib)]]
    shares = guest.split_ranges([(4 * 1024 * mib, 1024 * mib), (0, 3 * 1024 * mib)], 3)
    pages = [sum((e - s) // guest.PAGE_SIZE for s, e in share) for share in shares]
    assert max(pages) - min(pages) <= 1
    assert sum(pages) == (4 * 1024 - 1) * 256
    flat = [r for share in shares for r in share]
    assert flat == sorted(flat) and all(s % guest.PAGE_SIZE == 0 and e > s for s, e in flat)
    assert all(a[1] <= b[0] for a, b in zip(flat, flat[1:]))
    assert shares[2][-1] == (4 * 1024 * mib, 5 * 1024 * mib)
    # Unaligned ranges are trimmed to whole pages; RAM below 1 MiB is never handed out.
    assert guest.split_ranges([(0, mib + 0x2800)], 2) == [[(mib, mib + 0x1000)], [(mib + 0x1000, mib + 0x2000)]]
    # More than 24 ranges for a vCPU is refused.
    many = [(0, 2 * mib)] + [(2 * mib * k, 0x1000) for k in range(2, 40)]
    with pytest.raises(VmError):
        guest.split_ranges(many, 1)
    with pytest.raises(VmError):
        guest.split_ranges([(0, 8 * mib)], 17)
    with pytest.raises(VmError):
        guest.split_ranges([(0, 8 * mib), (4 * mib, 8 * mib)], 1)


@pytest.mark.timeout(10)
def test_boot_image_contents() -> None:
    mem: dict[int, bytes] = {}

    def write(gpa: int, data: bytes) -> None:
        mem[gpa] = bytes(data)

    ram = [(0, 3 * guest.GiB), (4 * guest.GiB, 2 * guest.GiB)]
    guest.build_boot_image(write, ram, 2, "verify", 10)
    pds = mem[guest.PD_ADDR]
    assert len(pds) == 6 * guest.PAGE_SIZE  # every GiB up to 6 GiB, the hole included
    assert struct.unpack_from("<Q", pds, 8 * 1537)[0] == (3 * guest.GiB + 2 * guest.MiB) | 0x87
    assert struct.unpack_from("<Q", mem[guest.PDPT_ADDR], 8 * 5)[0] == (guest.PD_ADDR + 5 * 0x1000) | 7
    assert struct.unpack_from("<Q", mem[guest.PML4_ADDR])[0] == guest.PDPT_ADDR | 7
    magic, workload, ncpus, dirty, _ = struct.unpack_from(guest.PARAMS_FORMAT, mem[guest.PARAMS_ADDR])
    assert (magic, workload, ncpus, dirty) == (guest.PARAMS_MAGIC, guest.WORKLOAD_VERIFY, 2, 10)
    assert mem[guest.PARAMS_ADDR][:8] == b"CHMIGPRM"
    status = guest.decode_status(mem[guest.status_addr(1)])
    assert status["npages"] == sum((e - s) // 4096 for s, e in status["ranges"])
    assert status["window"] == status["npages"] // 10
    assert status["nranges"] == 2 and status["rounds"] == status["initialized"] == 0
    assert mem[guest.PROGRAM_ADDR] == guest.guest_binary()
    with pytest.raises(VmError):
        guest.build_boot_image(write, [(0, 65 * guest.GiB)], 1, "verify", 0)
    with pytest.raises(VmError):
        guest.build_boot_image(write, [(guest.MiB, 8 * guest.MiB)], 1, "verify", 0)
    with pytest.raises(VmError):
        guest.build_boot_image(write, [(0, 8 * guest.MiB)], 1, "bogus", 0)
    with pytest.raises(VmError):
        guest.build_boot_image(write, [(0, 8 * guest.MiB)], 1, "verify", 101)


# ---------------------------------------------------------------------------
# Real KVM
# ---------------------------------------------------------------------------


def _kvm():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not available")
    return pytest.importorskip("chmig.kvm", reason="chmig.kvm is not there yet")


@dataclass
class Event:
    """One thing a vCPU reported: a port write (kind = PORTS name) or an HLT exit ("hlt")."""

    kind: str
    value: int = 0


@dataclass
class GuestVm:
    """A VM running the test guest, with a minimal per-vCPU run loop for the tests."""

    ram_mib: list[tuple[int, int]]
    ncpus: int = 1
    workload: str = "verify"
    dirty_percent: int = 25
    cpl3: bool | None = None  # None: what setup_long_mode picks for the workload
    kvm: object = None
    vm: object = None
    regions: list[tuple[int, mmap.mmap]] = field(default_factory=list)
    vcpus: list = field(default_factory=list)
    serial: list[bytearray] = field(default_factory=list)
    counts: list[dict[str, int]] = field(default_factory=list)
    paces: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        k = _kvm()
        self.mod = k
        self.kvm = k.Kvm()
        self.vm = self.kvm.create_vm()
        self.vm.set_tss_addr(0xFFFBD000)
        ram = [(gpa << 20, size << 20) for gpa, size in self.ram_mib]
        for slot, (gpa, size) in enumerate(ram):
            mem = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.vm.set_user_memory_region(slot, gpa, size, k.address_of(mem))
            self.regions.append((gpa, mem))
        guest.build_boot_image(self.write, ram, self.ncpus, self.workload, self.dirty_percent)
        cpuid = self.kvm.supported_cpuid()
        for i in range(self.ncpus):
            vcpu = self.vm.create_vcpu(i)
            vcpu.set_cpuid2(cpuid)
            mode = self.workload if self.cpl3 is None else ("verify" if self.cpl3 else "idle")
            guest.setup_long_mode(vcpu, i, mode)
            self.vcpus.append(vcpu)
            self.serial.append(bytearray())
            self.counts.append({})
            self.paces.append([])

    def _locate(self, gpa: int, size: int) -> tuple[mmap.mmap, int]:
        for base, mem in self.regions:
            if base <= gpa and gpa + size <= base + len(mem):
                return mem, gpa - base
        raise AssertionError(f"{gpa:#x}+{size:#x} is not inside one RAM region")

    def write(self, gpa: int, data: bytes) -> None:
        mem, off = self._locate(gpa, len(data))
        mem[off : off + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        mem, off = self._locate(gpa, size)
        return mem[off : off + size]

    def status(self, index: int = 0) -> dict:
        return guest.read_status(self.read, index)

    def run_until(self, index: int, stop: Callable[[Event], bool], timeout: float = 30.0) -> Event:
        """Run vCPU ``index`` until ``stop(event)`` is true for a reported event; return it."""
        k = self.mod
        vcpu = self.vcpus[index]
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"vCPU {index}: no stop event within {timeout}s; serial: {self.text(index)[-300:]!r}")
            reason = vcpu.run()
            if reason == k.KVM_EXIT_HLT:
                event = Event("hlt")
            elif reason == k.KVM_EXIT_IO:
                direction, size, port, count, data = vcpu.io_exit()
                assert direction == k.KVM_EXIT_IO_OUT, f"unexpected IN from port {port:#x}"
                if port == guest.PORT_COM1:
                    self.serial[index] += bytes(data[: size * count])
                    continue
                assert port in guest.PORTS and size == 4, f"unexpected OUT to port {port:#x} size {size}"
                event = Event(guest.PORTS[port], int.from_bytes(bytes(data[:4]), "little"))
            else:
                raise AssertionError(f"vCPU {index}: unexpected {vcpu.describe_exit()}")
            self.counts[index][event.kind] = self.counts[index].get(event.kind, 0) + 1
            if event.kind == "pace":
                self.paces[index].append(event.value)
            if stop(event):
                return event

    def run_rounds(self, index: int, n: int, timeout: float = 30.0) -> None:
        """Run vCPU ``index`` until it has reported ``n`` more rounds (it stops at the PORT_ROUND exit)."""
        seen = 0

        def stop(event: Event) -> bool:
            nonlocal seen
            seen += event.kind == "round"
            return seen == n

        self.run_until(index, stop, timeout)

    def text(self, index: int = 0) -> str:
        return self.serial[index].decode("ascii", "replace")

    def owned_page(self, index: int, i: int) -> int:
        return guest.page_gpa(self.status(index)["ranges"], i)

    def check_stamps(self, index: int, pages: list[int]) -> None:
        st = self.status(index)
        for i in pages:
            gpa = guest.page_gpa(st["ranges"], i)
            gen = guest.expected_generation(i, st["rounds"], st["npages"], st["window"])
            assert self.read(gpa, guest.PAGE_SIZE) == guest.stamp_page(gpa, gen), (i, gpa, gen)


@pytest.mark.timeout(60)
def test_verify_one_vcpu_rounds_without_errors() -> None:
    vm = GuestVm([(0, 8)], dirty_percent=25)
    vm.run_rounds(0, 3)
    st = vm.status()
    assert st["rounds"] == 3 and st["errors"] == 0 and st["initialized"] == 1
    assert st["npages"] == 7 * 256 and st["window"] == 7 * 64 and st["nranges"] == 1
    regs = vm.vcpus[0].get_regs()
    assert regs["r15"] == 3
    # First-boot stamping of 1792 pages, then 448 rewritten pages per round: one pace per 256 pages.
    assert vm.paces[0] == [256] * 7 + [256, 192] * 3
    assert vm.text().splitlines()[:3] == [f"cpu 0 round {r:08x} errors 00000000" for r in (1, 2, 3)]
    # The host sees exactly the stamps the formula predicts, window boundaries included.
    n = st["npages"]
    vm.check_stamps(0, [0, 1, 447, 448, 895, 896, 1343, 1344, n - 1])
    vm.run_rounds(0, 3)
    assert vm.status()["rounds"] == 6 and vm.status()["errors"] == 0
    vm.check_stamps(0, list(range(0, n, 61)) + [n - 1])


@pytest.mark.timeout(60)
def test_verify_two_vcpus_two_ram_regions() -> None:
    vm = GuestVm([(0, 6), (8, 6)], ncpus=2, dirty_percent=30)
    failures: list[BaseException] = []

    def drive(index: int) -> None:
        try:
            vm.run_rounds(index, 4, timeout=40)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=drive, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not any(t.is_alive() for t in threads), "a vCPU thread is stuck"
    assert not failures, failures
    shares = guest.split_ranges([(0, 6 << 20), (8 << 20, 6 << 20)], 2)
    for i in range(2):
        st = vm.status(i)
        assert st["rounds"] == 4 and st["errors"] == 0, st
        assert st["ranges"] == shares[i]
        vm.check_stamps(i, list(range(0, st["npages"], 37)) + [st["npages"] - 1])
    assert len(shares[0]) == 2  # vCPU 0's share spans the gap between the regions


@pytest.mark.timeout(60)
def test_flipped_byte_is_reported() -> None:
    vm = GuestVm([(0, 8)], dirty_percent=25)
    vm.run_rounds(0, 2)
    st = vm.status()
    # A page that round 3 does not rewrite, so the damage stays for round 4 too.
    i = next(i for i in range(5, st["npages"]) if not guest.in_next_window(i, 2, st["npages"], st["window"])
             and not guest.in_next_window(i, 3, st["npages"], st["window"]))  # fmt: skip
    gpa = vm.owned_page(0, i)
    gen = guest.expected_generation(i, 2, st["npages"], st["window"])
    word = bytearray(vm.read(gpa + 96, 8))
    word[4] ^= 0x5A
    vm.write(gpa + 96, bytes(word))
    vm.write(gpa + 2000, b"\xee")  # a second bad word in the same page: still one report per round
    event = vm.run_until(0, lambda e: e.kind in ("error", "round"))
    assert event == Event("error", 0)
    st = vm.status()
    assert st["errors"] == 1 and st["last_error_kind"] == guest.ERROR_KIND_STAMP
    assert st["last_error_gpa"] == gpa and st["last_error_addr"] == gpa + 96
    assert st["expected_at_error"] == guest.stamp_word(gpa + 96, gen)
    assert st["found_at_error"] == guest.stamp_word(gpa + 96, gen) ^ (0x5A << 32)
    vm.run_rounds(0, 2)
    st = vm.status()
    assert st["rounds"] == 4 and st["errors"] == 2 and st["last_error_gpa"] == gpa
    assert "errors 00000002" in vm.text().splitlines()[-1]


@pytest.mark.timeout(60)
def test_stale_page_is_reported() -> None:
    vm = GuestVm([(0, 8)], dirty_percent=25)
    vm.run_rounds(0, 3)
    st = vm.status()
    n, w = st["npages"], st["window"]
    i = next(i for i in range(n) if guest.in_next_window(i, 3, n, w))
    gpa = vm.owned_page(0, i)
    old = vm.read(gpa, guest.PAGE_SIZE)  # a perfectly valid stamp, of the previous generation
    vm.run_rounds(0, 1)
    assert vm.status()["errors"] == 0
    new_gen = guest.expected_generation(i, 4, n, w)
    assert vm.read(gpa, guest.PAGE_SIZE) == guest.stamp_page(gpa, new_gen) != old
    vm.write(gpa, old)  # what a migration that forgot to resend this page would deliver
    event = vm.run_until(0, lambda e: e.kind in ("error", "round"))
    assert event.kind == "error"
    st = vm.status()
    assert st["last_error_gpa"] == gpa and st["last_error_addr"] == gpa
    assert st["last_error_kind"] == guest.ERROR_KIND_STAMP
    assert st["expected_at_error"] == guest.stamp_word(gpa, new_gen)
    assert st["found_at_error"] == struct.unpack_from("<Q", old)[0]


@pytest.mark.timeout(60)
def test_register_mismatch_is_reported_once() -> None:
    vm = GuestVm([(0, 4)], dirty_percent=50)
    vm.run_rounds(0, 2)
    regs = vm.vcpus[0].get_regs()
    assert regs["r15"] == 2
    regs["r15"] = 7
    vm.vcpus[0].set_regs(regs)
    event = vm.run_until(0, lambda e: e.kind in ("error", "round"))
    assert event.kind == "error"
    st = vm.status()
    assert st["last_error_kind"] == guest.ERROR_KIND_REGISTERS and st["last_error_gpa"] == 0
    assert (st["expected_at_error"], st["found_at_error"], st["errors"]) == (2, 7, 1)
    vm.run_rounds(0, 3)  # resynced from memory: no further errors, and rounds continue from 2
    st = vm.status()
    assert (st["rounds"], st["errors"]) == (5, 1)
    assert vm.vcpus[0].get_regs()["r15"] == 5
    vm.check_stamps(0, list(range(0, st["npages"], 29)))


@pytest.mark.timeout(60)
def test_xmm15_mismatch_is_reported() -> None:
    """xmm15 is the third copy of the round counter, visible through KVM_GET_FPU."""
    vm = GuestVm([(0, 4)], dirty_percent=50)
    vm.run_rounds(0, 3)
    vcpu = vm.vcpus[0]
    if not hasattr(vcpu, "get_fpu"):
        pytest.skip("chmig.kvm has no get_fpu")
    fpu = vcpu.get_fpu()
    assert int.from_bytes(bytes.fromhex(fpu["xmm"][15])[:8], "little") == 3
    fpu["xmm"][15] = (9).to_bytes(8, "little").hex() + fpu["xmm"][15][16:]
    vcpu.set_fpu(fpu)
    assert vm.run_until(0, lambda e: e.kind in ("error", "round")).kind == "error"
    st = vm.status()
    assert (st["last_error_kind"], st["expected_at_error"], st["found_at_error"]) == (guest.ERROR_KIND_REGISTERS, 3, 9)
    vm.run_rounds(0, 2)
    assert (vm.status()["rounds"], vm.status()["errors"]) == (5, 1)


def snapshot(vm: GuestVm) -> dict:
    """Register state and RAM of vCPU 0 of a stopped VM, its pending port write completed first."""
    vcpu = vm.vcpus[0]
    vcpu.immediate_exit = True
    assert vcpu.run() == vm.mod.KVM_EXIT_INTR  # completes the OUT, enters no guest code
    vcpu.immediate_exit = False
    return {
        "regs": vcpu.get_regs(),
        "sregs": vcpu.get_sregs(),
        "xsave": vcpu.get_xsave(),
        "ram": [(gpa, bytes(mem)) for gpa, mem in vm.regions],
    }


def restore(snap: dict, regs_from: dict | None = None) -> GuestVm:
    """A fresh VM with the snapshot's RAM and the registers of ``regs_from`` (default: the same snapshot)."""
    state = regs_from or snap
    vm = GuestVm([(gpa >> 20, len(ram) >> 20) for gpa, ram in snap["ram"]])
    for gpa, ram in snap["ram"]:
        vm.write(gpa, ram)
    vcpu = vm.vcpus[0]
    vcpu.set_sregs(state["sregs"])
    # KVM_SET_XSAVE, not KVM_SET_FPU: on a vCPU that never ran, KVM_SET_FPU fills the
    # legacy area but leaves XSTATE_BV without SSE, so the guest would see xmm15 = 0.
    vcpu.set_xsave(state["xsave"])
    vcpu.set_regs(state["regs"])
    return vm


@pytest.mark.timeout(60)
def test_restore_into_a_fresh_vm_continues_cleanly() -> None:
    """What a correct migration does: all of RAM and all of the vCPU state, from one moment."""
    vm = GuestVm([(0, 6)], dirty_percent=20)
    if not hasattr(vm.vcpus[0], "immediate_exit"):
        pytest.skip("chmig.kvm has no immediate_exit")
    vm.run_rounds(0, 3)
    early = snapshot(vm)
    vm.run_rounds(0, 2)
    late = snapshot(vm)
    copy = restore(late)
    copy.run_rounds(0, 3)
    st = copy.status()
    assert (st["rounds"], st["errors"], st["initialized"]) == (8, 0, 1)
    assert copy.text().startswith("cpu 0 round 00000006")  # the entry code did not run again
    # Registers from round 5 with RAM from round 3: caught by the round-counter check.
    mixed = restore(early, regs_from=late)
    assert mixed.run_until(0, lambda e: e.kind in ("error", "round")).kind == "error"
    st = mixed.status()
    assert (st["last_error_kind"], st["expected_at_error"], st["found_at_error"]) == (guest.ERROR_KIND_REGISTERS, 3, 5)
    # RAM from round 3 except the status block from round 5: the stale pages are caught.
    status_page = guest.STATUS_ADDR
    stale = dict(early, ram=[(0, early["ram"][0][1][:status_page] + late["ram"][0][1][status_page:guest.MiB]
                              + early["ram"][0][1][guest.MiB:])])  # fmt: skip
    old = restore(stale, regs_from=late)
    old.run_rounds(0, 1)
    st = old.status()
    n, w = st["npages"], st["window"]
    changed = sum(guest.expected_generation(i, 5, n, w) != guest.expected_generation(i, 3, n, w) for i in range(n))
    assert st["errors"] == changed > 0 and st["last_error_kind"] == guest.ERROR_KIND_STAMP


@pytest.mark.timeout(60)
def test_bad_params_park_the_vcpu() -> None:
    """At CPL 0 (idle) a vCPU with bad params reports kind 3, says why on COM1 and parks in HLT."""
    vm = GuestVm([(0, 4)], workload="idle")
    vm.write(guest.PARAMS_ADDR, b"NOTMAGIC")
    event = vm.run_until(0, lambda e: e.kind in ("error", "tick"))
    assert event == Event("error", 0)
    assert vm.status()["last_error_kind"] == guest.ERROR_KIND_PARAMS
    vm.run_until(0, lambda e: e.kind == "hlt")
    vm.run_until(0, lambda e: e.kind == "hlt")
    assert "bad params" in vm.text()
    assert vm.status()["ticks"] == 0


@pytest.mark.timeout(60)
def test_bad_params_at_cpl3() -> None:
    """At CPL 3 (verify) the same check reports kind 3 before anything is stamped."""
    vm = GuestVm([(0, 4)])
    struct.pack_into("<I", vm.regions[0][1], guest.PARAMS_ADDR + 12, 0)  # ncpus = 0: vCPU 0 not covered
    event = vm.run_until(0, lambda e: e.kind in ("error", "round", "pace"))
    assert event == Event("error", 0)
    st = vm.status()
    assert st["last_error_kind"] == guest.ERROR_KIND_PARAMS and st["initialized"] == 0 and st["errors"] == 1


@pytest.mark.timeout(60)
def test_idle_refuses_cpl3() -> None:
    """The idle workload needs HLT; entered at CPL 3 it reports kind 3 instead of faulting."""
    vm = GuestVm([(0, 4)], workload="idle", cpl3=True)
    event = vm.run_until(0, lambda e: e.kind in ("error", "tick", "hlt"))
    assert event == Event("error", 0)
    assert vm.status()["last_error_kind"] == guest.ERROR_KIND_PARAMS


@pytest.mark.timeout(30)
def test_entry_state() -> None:
    vm = GuestVm([(0, 4)], ncpus=2)
    regs = vm.vcpus[1].get_regs()
    assert (regs["rip"], regs["rsp"], regs["rdi"]) == (guest.PROGRAM_ADDR, 0x72000, 1)
    assert regs["rflags"] & 0x3000 == 0x3000  # IOPL 3 at CPL 3
    sregs = vm.vcpus[1].get_sregs()
    assert sregs["cs"]["dpl"] == 3 and sregs["cs"]["l"] == 1 and sregs["cr3"] == guest.PML4_ADDR
    assert sregs["efer"] & guest.ENTRY_EFER == guest.ENTRY_EFER
    assert sregs["gdt"] == {"base": guest.GDT_ADDR, "limit": guest.GDT_LIMIT}
    idle = GuestVm([(0, 4)], workload="idle")
    assert idle.vcpus[0].get_sregs()["cs"]["dpl"] == 0
    assert idle.vcpus[0].get_regs()["rflags"] == guest.ENTRY_RFLAGS
    with pytest.raises(VmError):
        guest.setup_long_mode(vm.vcpus[0], 16)


@pytest.mark.timeout(60)
def test_counter_workload_ticks() -> None:
    vm = GuestVm([(0, 4)], workload="counter")
    ticks = 0

    def stop(event: Event) -> bool:
        nonlocal ticks
        assert event.kind == "tick", event
        ticks += 1
        return ticks == 2

    vm.run_until(0, stop)
    st = vm.status()
    assert st["ticks"] == 2 << 26 and vm.vcpus[0].get_regs()["r15"] == st["ticks"]
    assert vm.text().splitlines() == [f"cpu 0 tick {t:016x}" for t in (1 << 26, 2 << 26)]
    assert st["rounds"] == st["errors"] == 0


@pytest.mark.timeout(60)
def test_idle_workload_ticks() -> None:
    vm = GuestVm([(0, 4)], workload="idle")
    ticks = 0

    def stop(event: Event) -> bool:
        nonlocal ticks
        assert event.kind in ("hlt", "tick"), event
        ticks += event.kind == "tick"
        return ticks == 3

    vm.run_until(0, stop)
    assert vm.counts[0] == {"hlt": 3, "tick": 3}
    assert vm.status()["ticks"] == 3


@pytest.mark.timeout(120)
def test_verify_throughput(record_property) -> None:
    """Time the check pass on a 64 MiB VM (nothing rewritten) and report GiB/s per vCPU."""
    vm = GuestVm([(0, 64)], dirty_percent=0)
    vm.run_rounds(0, 1)  # first boot stamping + one round: everything touched once
    st = vm.status()
    checked = st["npages"] * guest.PAGE_SIZE
    times = []
    for _ in range(5):
        # From the PORT_ROUND exit to the first COM1 byte of the next round's line
        # is exactly the register check + the check pass (the rewrite pass is empty).
        start = time.perf_counter()
        k = vm.mod
        while True:
            reason = vm.vcpus[0].run()
            assert reason == k.KVM_EXIT_IO
            if vm.vcpus[0].io_exit()[2] == guest.PORT_COM1:
                break
        times.append(time.perf_counter() - start)
        vm.run_rounds(0, 1)
    best = min(times)
    rate = checked / best / guest.GiB
    record_property("verify_gib_per_s", rate)
    print(f"\nverify check pass: {checked >> 20} MiB in {best * 1e3:.2f} ms = {rate:.2f} GiB/s per vCPU")
    assert vm.status()["errors"] == 0
    assert rate > 0.2
