"""Guest RAM whose slots come as separate files, as Cloud Hypervisor's offload daemon hands them over.

The daemon restores a VM with one new memfd per slot, each holding its slot's
bytes at the slot's ``file_offset``; Cloud Hypervisor maps each slot from its
own fd.  Here: the memory model on such memfds (no KVM), the refusals (each
with its fds closed), and a real guest whose zone spans the 32-bit hole moved
onto per-slot memfds and then migrated locally again — the guest is the judge.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from chmig.destination import Destination
from chmig.errors import ProtocolError, VmError
from chmig.memory import HIGH_RAM_START, LOW_RAM_END, GuestMemory, GuestRamMapping, ZoneConfig
from chmig.receive import Receiver
from chmig.send import Sender, SendOptions, new_stats
from chmig.transport import listen, parse_url
from chmig.units import MiB, PAGE_SIZE
from chmig.vm import Serial, Vm, VmConfig, VmState

from .conftest import requires_kvm
from .wire import config_payload

pytestmark = pytest.mark.timeout(60)

#: One zone as two slots with a gap between them in guest-physical space (as around the 32-bit hole).
ZONE = ZoneConfig("mem0", 8 * MiB, True)
SPLIT = [GuestRamMapping(0, 0, 4 * MiB, "mem0", False, 0),
         GuestRamMapping(1, 16 * MiB, 4 * MiB, "mem0", False, 4 * MiB)]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _open_as(name: str) -> int:
    """How many fds of this process are open on the memfd called ``name``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:{name} ")
        except OSError:
            pass  # the fd listdir itself used
    return count


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def _slot_memfd(mapping: GuestRamMapping, writes: dict[int, bytes] | None = None, size: int | None = None) -> int:
    """A memfd as the offload daemon makes one: ``file_offset + size`` bytes, ``writes`` (by offset into the slot)
    at ``file_offset + offset``, the rest a hole."""
    fd = os.memfd_create(f"test-slot-{mapping.slot}", os.MFD_CLOEXEC)
    os.ftruncate(fd, mapping.file_offset + mapping.size if size is None else size)
    for offset, data in (writes or {}).items():
        assert os.pwrite(fd, data, mapping.file_offset + offset) == len(data)
    return fd


def _marker(slot: int, offset: int) -> bytes:
    return f"slot {slot} at {offset:#x}".encode().ljust(64, b".")


# ---------------------------------------------------------------------------------------------
# The memory model on per-slot files (no KVM)
# ---------------------------------------------------------------------------------------------


def test_each_slot_maps_its_own_file_at_its_file_offset() -> None:
    before = _fds()
    writes = {0: {0: _marker(0, 0), 3 * MiB + 5 * PAGE_SIZE: _marker(0, 3 * MiB + 5 * PAGE_SIZE)},
              1: {PAGE_SIZE: _marker(1, PAGE_SIZE), 4 * MiB - PAGE_SIZE: _marker(1, 4 * MiB - PAGE_SIZE)}}
    fds = {m.slot: _slot_memfd(m, writes[m.slot]) for m in SPLIT}
    # A second, ordinary zone (one memfd for the zone) and a private one, next to the split zone.
    other = ZoneConfig("z1", 4 * MiB, True)
    private = ZoneConfig("z2", 4 * MiB, False)
    mappings = [*SPLIT, GuestRamMapping(2, 20 * MiB, 4 * MiB, "z1", False, 0),
                GuestRamMapping(3, 24 * MiB, 4 * MiB, "z2", False, 0)]
    zone_fd = os.memfd_create("test-z1", os.MFD_CLOEXEC)
    os.ftruncate(zone_fd, other.size)
    os.pwrite(zone_fd, _marker(2, 0), 0)
    memory = GuestMemory.adopt([ZONE, other, private], mappings, {"z1": zone_fd}, slot_fds=fds)
    try:
        regions = {r.mapping.slot: r for r in memory.regions}
        assert memory.zones["mem0"].whole is None and set(memory.zones["mem0"].slots) == {0, 1}
        assert [regions[s].fd for s in (0, 1, 2)] == [fds[0], fds[1], zone_fd]
        assert regions[3].fd == -1 and memory.zones["z2"].whole is not None
        # Two mappings of their own, neither a window of the other.
        spans = sorted((r.host_address, r.host_address + r.size) for r in memory.regions)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
        assert regions[0].backing is not regions[1].backing
        assert (regions[1].backing.offset, regions[1].backing.size) == (4 * MiB, 4 * MiB)
        for slot, spans_written in writes.items():
            for offset, data in spans_written.items():
                gpa = SPLIT[slot].gpa + offset
                assert memory.read(gpa, len(data)) == data
        assert memory.read(20 * MiB, 64) == _marker(2, 0)
        # Writes go to the slot's file, at the slot's file offset.
        memory.write(16 * MiB + 2 * PAGE_SIZE, b"through the mapping")
        assert os.pread(fds[1], 19, 4 * MiB + 2 * PAGE_SIZE) == b"through the mapping"
        # Each slot's bounds hold: nothing reaches past its end into the other mapping.
        with pytest.raises(VmError, match="not inside guest RAM"):
            memory.view(4 * MiB - PAGE_SIZE, 2 * PAGE_SIZE)
        assert [(r.gpa, r.length) for r in memory.populated_table()] == [
            (0, PAGE_SIZE), (3 * MiB + 5 * PAGE_SIZE, PAGE_SIZE),
            (16 * MiB + PAGE_SIZE, 2 * PAGE_SIZE), (20 * MiB - PAGE_SIZE, PAGE_SIZE), (20 * MiB, PAGE_SIZE)]
    finally:
        memory.close()
    assert all(_closed(fd) for fd in [*fds.values(), zone_fd])
    memory.close()  # idempotent
    assert _fds() == before


def test_one_file_per_zone_still_maps_the_zone_once() -> None:
    """The normal case costs what it did: a zone across the 32-bit hole is one mapping, its slots windows of it."""
    zone = ZoneConfig("mem0", LOW_RAM_END + 4 * MiB, True)
    memory = GuestMemory.create([zone])
    try:
        low, high = memory.regions
        assert (high.gpa, high.mapping.file_offset) == (HIGH_RAM_START, LOW_RAM_END)
        assert low.backing is high.backing is memory.zones["mem0"].whole
        assert low.fd == high.fd == memory.zones["mem0"].fd >= 0
        assert high.host_address == low.host_address + LOW_RAM_END
        memory.write(HIGH_RAM_START, b"above the hole")
        assert os.pread(high.fd, 14, LOW_RAM_END) == b"above the hole"
    finally:
        memory.close()


@pytest.mark.parametrize("case", ["unaligned", "too small", "missing slot", "zone and slot", "unknown slot"])
def test_refusals_close_every_fd(case: str) -> None:
    before = _fds()
    mappings = list(SPLIT)
    fds = {m.slot: _slot_memfd(m) for m in SPLIT}
    zone_fds: dict[str, int] = {}
    if case == "unaligned":
        mappings[1] = GuestRamMapping(1, 16 * MiB, 4 * MiB, "mem0", False, 4 * MiB + 512)
        message = r"memory fd for slot 1 of zone 'mem0': file offset 0x400200 is not page aligned"
    elif case == "too small":
        os.ftruncate(fds[1], 8 * MiB - PAGE_SIZE)
        message = rf"memory fd for slot 1 of zone 'mem0' has {8 * MiB - PAGE_SIZE} bytes, needs {8 * MiB} " \
                  rf"\({4 * MiB} \+ {4 * MiB}\)"
    elif case == "missing slot":
        os.close(fds.pop(1))
        message = "slot 1 of zone 'mem0' has no memory fd, but its other slots came as separate files"
    elif case == "zone and slot":
        zone_fds["mem0"] = _slot_memfd(SPLIT[0], size=ZONE.size)
        message = "zone 'mem0' has a memory fd both for the whole zone and for its slots"
    else:
        fds[7] = _slot_memfd(SPLIT[0])
        message = "memory fd for slot 7, which this VM does not have"
    given = [*fds.values(), *zone_fds.values()]
    with pytest.raises(VmError, match=message):
        GuestMemory.adopt([ZONE], mappings, zone_fds, slot_fds=fds)
    assert all(_closed(fd) for fd in given)
    assert _fds() == before


# ---------------------------------------------------------------------------------------------
# The destination: MemoryFds of one zone as different files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing slot", "too small", "private zone", "unknown slot"])
def test_destination_refusals_are_the_peers_fault_and_leak_nothing(case: str) -> None:
    zones = [ZONE]
    mappings = list(SPLIT)
    fds = {m.slot: _slot_memfd(m) for m in SPLIT}
    if case == "missing slot":
        zones = [ZONE, ZoneConfig("z1", 4 * MiB, True)]
        mappings = [SPLIT[0], GuestRamMapping(1, 8 * MiB, 2 * MiB, "mem0", False, 4 * MiB),
                    GuestRamMapping(2, 16 * MiB, 2 * MiB, "mem0", False, 6 * MiB),
                    GuestRamMapping(3, 20 * MiB, 4 * MiB, "z1", False, 0)]
        fds = {0: _slot_memfd(mappings[0]), 2: _slot_memfd(mappings[2]), 3: _slot_memfd(mappings[3])}
        message = "no MemoryFd for slot 1 of zone 'mem0'"
    elif case == "too small":
        os.ftruncate(fds[1], 4 * MiB)
        message = f"memory fd for slot 1 of zone 'mem0' has {4 * MiB} bytes, needs {8 * MiB}"
    elif case == "private zone":
        zones = [ZoneConfig("mem0", 8 * MiB, False)]
        message = "zone 'mem0' is private, but arrived as a MemoryFd"
    else:
        fds[9] = _slot_memfd(SPLIT[1])
        message = "MemoryFd for slot 9, which the Config does not have"
    given = list(fds.values())
    before = _fds()
    destination = Destination()
    for slot, fd in fds.items():
        destination.add_memory_fd(slot, fd)
    with pytest.raises(ProtocolError, match=message) as raised:
        destination.configure(config_payload(zones, mappings))
    assert raised.value.where == "Config"
    assert destination.vm is None and not destination.memory_fds
    assert all(_closed(fd) for fd in given)
    assert _fds() == before - len(given)


@requires_kvm
def test_destination_maps_one_file_once_and_different_files_per_slot() -> None:
    """Same file for every slot of a zone: one mapping, the duplicates closed; different files: one per slot."""
    zones = [ZONE, ZoneConfig("z1", 8 * MiB, True)]
    mappings = [*SPLIT, GuestRamMapping(2, 20 * MiB, 4 * MiB, "z1", False, 0),
                GuestRamMapping(3, 24 * MiB, 4 * MiB, "z1", False, 4 * MiB)]
    same = _slot_memfd(mappings[2], size=8 * MiB)  # named test-slot-2
    fds = {0: _slot_memfd(SPLIT[0]), 1: _slot_memfd(SPLIT[1]), 2: same, 3: os.dup(same)}
    destination = Destination()
    for slot, fd in fds.items():
        destination.add_memory_fd(slot, fd)
    vm = destination.configure(config_payload(zones, mappings))
    try:
        assert destination.mode == "local"
        regions = {r.mapping.slot: r for r in vm.memory.regions}
        assert [regions[s].fd for s in range(4)] == [fds[0], fds[1], same, same]
        assert regions[2].backing is regions[3].backing is vm.memory.zones["z1"].whole
        # The zone's fd and the one Python's mmap keeps for itself: the duplicate was closed (by its number
        # alone that cannot be told, the VM may have reused it).
        assert _open_as("test-slot-2") == 2
        assert vm.memory.zones["mem0"].whole is None
    finally:
        destination.discard()
    assert all(_closed(fd) for fd in fds.values())


# ---------------------------------------------------------------------------------------------
# A real guest across the 32-bit hole, on one memfd per slot
# ---------------------------------------------------------------------------------------------

#: 3 GiB + 64 MiB: the zone spans the hole, its second slot at 4 GiB with file offset 3 GiB.  Memfds are
#: sparse, but the verify workload stamps every page: about 3 GiB per copy of the guest, a second a round.
HOLE_ZONE = f"size={(LOW_RAM_END >> 20) + 64}M"


def _wait_rounds(vm: Vm, more: int = 2, timeout: float = 40) -> dict:
    """Every vCPU completes ``more`` rounds; the guest reports zero errors."""
    targets = [s["rounds"] + more for s in vm.info()["guest"]["vcpus"]]
    deadline = time.monotonic() + timeout
    while True:
        info = vm.info()
        assert not vm.failure, vm.failure
        assert info["guest"]["errors"] == 0, info["guest"]
        if all(v["rounds"] >= t for v, t in zip(info["guest"]["vcpus"], targets)):
            return info
        assert time.monotonic() < deadline, f"no {more} more rounds: {info['guest']}"
        time.sleep(0.05)


def _copy_to_slot_memfds(memory: GuestMemory) -> dict[int, int]:
    """What the offload daemon hands over: per slot, a new memfd of ``file_offset + size`` bytes with the slot's
    bytes at ``file_offset`` — only the populated pages copied, so the new memfds stay sparse too."""
    fds = {r.mapping.slot: _slot_memfd(r.mapping) for r in memory.regions}
    for rng in memory.populated_table():
        for gpa, length in memory.split(rng):
            region = memory.region_of(gpa, length)
            offset = region.mapping.file_offset + gpa - region.gpa
            with memory.view(gpa, length) as view:
                done = 0
                while done < length:  # the kernel copies straight from the guest's mapping
                    done += os.pwrite(fds[region.mapping.slot], view[done:], offset + done)
    return fds


def _migrate_locally(source: Vm, tmp_path: Path) -> Vm:
    """An in-process local migration (memfds over a UNIX socket) from ``source`` to a new Receiver's VM."""
    outcome: dict = {}
    with listen(parse_url(f"unix:{tmp_path}/local.sock")) as listener:
        receiver = Receiver(listener)

        def receive() -> None:
            try:
                outcome["vm"] = receiver.run(accept_timeout=30)
            except BaseException as exc:  # asserted on below
                outcome["error"] = exc

        thread = threading.Thread(target=receive, name="test-slots-receiver")
        thread.start()
        options = SendOptions(destination_url=str(listener.address), local=True)
        options.validate()
        try:
            Sender(source, options, new_stats(options)).run()
        finally:
            thread.join(30)
    assert "error" not in outcome, outcome
    return outcome["vm"]


@pytest.fixture
def vms() -> Iterator[list[Vm]]:
    made: list[Vm] = []
    yield made
    for vm in made:
        vm.close()


@requires_kvm
@pytest.mark.timeout(120)
def test_a_guest_across_the_hole_runs_on_one_memfd_per_slot(vms: list[Vm], tmp_path: Path) -> None:
    config = VmConfig.from_args("boot=2", HOLE_ZONE, ["id=z1,size=8M"], "verify,dirty_percent=10")
    source = Vm(config, GuestMemory.create(config.zones), Serial("off"))
    vms.append(source)
    assert [(m.slot, m.gpa, m.zone_id, m.file_offset) for m in source.memory.mappings] == [
        (0, 0, "mem0", 0), (1, HIGH_RAM_START, "mem0", LOW_RAM_END), (2, HIGH_RAM_START + 64 * MiB, "z1", 0)]
    source.boot()
    source.start()
    _wait_rounds(source)
    source.pause()
    payload = json.dumps(source.migration_config()).encode()
    state = json.dumps(source.capture_state()).encode()
    before = source.info()["guest"]
    fds = _copy_to_slot_memfds(source.memory)
    vms.remove(source)
    source.close()  # the guest now lives only in the per-slot memfds

    destination = Destination()
    for slot, fd in fds.items():
        destination.add_memory_fd(slot, fd)
    try:
        vm = destination.configure(payload)
        destination.restore(state)
        destination.complete(resume=True)
        vms.append(destination.take())
    finally:
        destination.discard()
    assert destination.mode == "local" and vm.state == VmState.RUNNING
    mem0 = vm.memory.zones["mem0"]
    assert mem0.whole is None and {s: b.fd for s, b in mem0.slots.items()} == {0: fds[0], 1: fds[1]}
    assert vm.memory.zones["z1"].whole is not None and vm.memory.zones["z1"].fd == fds[2]
    inodes = [os.fstat(fds[s]).st_ino for s in (0, 1)]
    arrived = _wait_rounds(vm)
    assert all(a["rounds"] > b["rounds"] for a, b in zip(arrived["guest"]["vcpus"], before["vcpus"]))

    # Migrating on from per-slot memory hands over each slot's own file, and the next VM maps it per slot too.
    final = _migrate_locally(vm, tmp_path)
    vms.append(final)
    slots = final.memory.zones["mem0"].slots
    assert final.memory.zones["mem0"].whole is None and set(slots) == {0, 1}
    assert [os.fstat(slots[s].fd).st_ino for s in (0, 1)] == inodes
    _wait_rounds(final)

    # The guest reads the slot's own file at its file offset: a word changed there is a page it reports.
    high = final.memory.region_of(HIGH_RAM_START, PAGE_SIZE)
    target = HIGH_RAM_START + 32 * MiB
    deadline = time.monotonic() + 30
    while final.info()["guest"]["last_error_gpa"] != target:
        assert time.monotonic() < deadline, final.info()["guest"]
        # Again until seen: the guest may rewrite the page (its dirty window) before it checks it.
        os.pwrite(high.fd, bytes(8), high.mapping.file_offset + target - high.gpa)
        time.sleep(0.2)
