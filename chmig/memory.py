"""Guest RAM: zones backed by memfds (shared) or anonymous memory, laid out like Cloud Hypervisor.

Layout (x86-64, as Cloud Hypervisor's memory manager does it): zones are placed
one after another in guest-physical space starting at 0; RAM never overlaps the
32-bit hole, so a zone that would cross 3 GiB continues at 4 GiB.  Every
contiguous piece is one KVM slot, recorded as a ``guest_ram_mappings`` entry
(``slot``, ``gpa``, ``size``, ``zone_id``, ``virtio_mem``, ``file_offset``) — the
record the migration Config and the offload daemon rely on.

Shared zones are memfds mapped ``MAP_SHARED``: local migration hands the fd to
the destination, and the offload daemon reads it.  Private zones are anonymous
``MAP_PRIVATE`` memory.  A zone is one mapping, its slots windows of it; only
when a zone's slots arrive as separate files (the offload daemon restores a VM
with one memfd per slot, the slot's bytes at its ``file_offset``) does each slot
map its own (:class:`Backing`).

Python never copies guest memory on the data path: callers take a
``memoryview`` of the mapping (:meth:`GuestMemory.view`) and hand it to
``sendall``/``recv_into``.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import logging
import mmap
import os
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Protocol

from .errors import UsageError, VmError
from .jsonlimits import U32_MAX, JsonRefused, get_bool, get_int, get_str
from .protocol import DEFAULT_LIMITS, MemoryRange, MemoryRangeTable
from .snapshot_dir import data_spans
from .units import GiB, MiB, PAGE_SIZE

log = logging.getLogger(__name__)

#: RAM below the 32-bit hole ends here (Cloud Hypervisor's ``MEM_32BIT_RESERVED_START``).
LOW_RAM_END = 3 * GiB
#: RAM above the hole starts here (``RAM_64BIT_START``).
HIGH_RAM_START = 4 * GiB
#: The smallest VM: the guest program's own area is the first MiB.
MIN_RAM = 2 * MiB
#: The largest guest-physical address the guest's page tables can map (64 GiB).
MAX_GUEST_PHYS = 64 * GiB

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_POPULATE_WRITE = 23
#: Free the pages of a private mapping: they read as never touched (a userfaultfd MISSING fault on access).
MADV_DONTNEED = 4
#: Free the pages *and their backing store* of a shared mapping (a hole in the memfd): plain DONTNEED would only
#: unmap them, and the next access would find the old page in the page cache.
MADV_REMOVE = 9
#: No transparent huge pages here: a 4 KiB page received would otherwise fill a whole 2 MiB huge page, whose other
#: pages would then count as present (as received) without having come.
MADV_NOHUGEPAGE = 15


@dataclass(frozen=True)
class ZoneConfig:
    """One ``--memory`` or ``--memory-zone`` option."""

    id: str
    size: int
    shared: bool = True


@dataclass(frozen=True)
class GuestRamMapping:
    """Cloud Hypervisor's ``GuestRamMapping``: one KVM slot of one zone."""

    slot: int
    gpa: int
    size: int
    zone_id: str
    virtio_mem: bool
    file_offset: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> GuestRamMapping:
        """One entry of a peer's ``guest_ram_mappings``, every field of its exact type (serde's rules)."""
        what = "guest_ram_mappings entry"
        try:
            return cls(
                slot=get_int(data, "slot", what, high=U32_MAX),
                gpa=get_int(data, "gpa", what),
                size=get_int(data, "size", what),
                zone_id=get_str(data, "zone_id", what),
                virtio_mem=get_bool(data, "virtio_mem", what, default=False),
                file_offset=get_int(data, "file_offset", what, default=0),
            )
        except JsonRefused as exc:
            raise VmError(f"malformed {exc}", where="memory layout") from None


def layout(zones: Iterable[ZoneConfig]) -> list[GuestRamMapping]:
    """Place zones in guest-physical space, splitting around the 32-bit hole."""
    mappings: list[GuestRamMapping] = []
    gpa = 0
    for zone in zones:
        offset = 0
        while offset < zone.size:
            if gpa == LOW_RAM_END:
                gpa = HIGH_RAM_START
            limit = LOW_RAM_END if gpa < LOW_RAM_END else MAX_GUEST_PHYS
            size = min(zone.size - offset, limit - gpa)
            if size <= 0:
                raise UsageError(f"guest RAM exceeds the largest supported address {MAX_GUEST_PHYS:#x}")
            mappings.append(GuestRamMapping(len(mappings), gpa, size, zone.id, False, offset))
            gpa += size
            offset += size
    return mappings


def validate_layout(zones: list[ZoneConfig], mappings: list[GuestRamMapping],
                    max_slots: int = DEFAULT_LIMITS.max_slots) -> None:
    """Check a layout (maybe a peer's) before anything is allocated; raise VmError naming the flaw."""
    sizes = {z.id: z.size for z in zones}
    if len(sizes) != len(zones):
        raise VmError("duplicate memory zone ids", where="memory layout")
    total = sum(sizes.values())
    if not zones or total < MIN_RAM or total > MAX_GUEST_PHYS:
        raise VmError(f"guest RAM of {total} bytes is outside {MIN_RAM}..{MAX_GUEST_PHYS}", where="memory layout")
    seen_slots = set()
    spans = []
    for m in mappings:
        if m.zone_id not in sizes:
            raise VmError(f"slot {m.slot} names unknown zone {m.zone_id!r}", where="memory layout")
        if m.slot in seen_slots or not 0 <= m.slot < max_slots:
            raise VmError(f"bad or duplicate slot number {m.slot}", where="memory layout")
        seen_slots.add(m.slot)
        if m.size <= 0 or m.gpa % PAGE_SIZE or m.size % PAGE_SIZE or m.file_offset % PAGE_SIZE:
            raise VmError(f"slot {m.slot} is empty or not page aligned", where="memory layout")
        if m.file_offset < 0 or m.file_offset + m.size > sizes[m.zone_id]:
            raise VmError(f"slot {m.slot} lies outside zone {m.zone_id!r}", where="memory layout")
        if m.gpa + m.size > MAX_GUEST_PHYS:
            raise VmError(f"slot {m.slot} lies above {MAX_GUEST_PHYS:#x}", where="memory layout")
        spans.append((m.gpa, m.gpa + m.size))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise VmError("guest RAM slots overlap", where="memory layout")
    if sum(m.size for m in mappings) != total:
        raise VmError("guest RAM slots do not cover the zones exactly", where="memory layout")


class PresentPageMap(Protocol):
    """Which pages of guest RAM are present (postcopy's bitmap)."""

    def is_present(self, gpa: int, length: int = PAGE_SIZE) -> bool: ...


class Backing:
    """One host mapping of guest RAM: ``size`` bytes of a file from ``offset`` on (shared), or anonymous memory.

    ``fd`` is -1 for anonymous memory.  A slot lies in its backing at
    ``file_offset - offset``: a zone's whole mapping starts at offset 0, a
    slot's own mapping at that slot's ``file_offset``.
    """

    def __init__(self, fd: int, offset: int, size: int, mapping: mmap.mmap) -> None:
        """Take an existing mapping (and ``fd``, owned from now on); use the constructors below."""
        self.fd = fd
        self.offset = offset
        self.size = size
        self.map = mapping
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))

    @classmethod
    def anonymous(cls, size: int) -> Backing:
        """``size`` bytes of private anonymous memory."""
        return cls(-1, 0, size, mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                          prot=mmap.PROT_READ | mmap.PROT_WRITE))

    @classmethod
    def new_memfd(cls, name: str, size: int) -> Backing:
        """A new sparse memfd of ``size`` bytes, mapped shared."""
        # The name may be a peer's zone id: only a tame version of it goes into the memfd's name.
        fd = os.memfd_create("chmig-" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64], os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return cls.of_file(fd, 0, size, f"zone {name!r}")

    @classmethod
    def of_file(cls, fd: int, offset: int, size: int, what: str) -> Backing:
        """Map ``fd[offset:offset+size]`` shared; ``fd`` is owned from now on (closed even if this fails).

        ``what`` names the memory in errors ("zone 'mem0'", "slot 1 of zone 'mem0'").
        """
        try:
            # mmap takes only page-aligned offsets; saying so beats the kernel's bare EINVAL.
            if offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
                raise VmError(f"memory fd for {what}: file offset {offset:#x} is not page aligned",
                              where="guest memory")
            have = os.fstat(fd).st_size
            if have < offset + size:
                needs = f"{offset + size} ({offset} + {size})" if offset else str(size)
                raise VmError(f"memory fd for {what} has {have} bytes, needs {needs}", where="guest memory")
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                offset=offset)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, offset, size, mapping)

    def close(self, what: str) -> None:
        """Unmap (unless views are still exported) and close the fd; idempotent."""
        if not self.map.closed:
            try:
                self.map.close()
            except BufferError:
                log.warning("%s still has exported views; leaving it mapped", what)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Zone:
    """One zone's memory: mapped whole (one memfd, or anonymous memory), or slot by slot, one file each.

    The whole mapping is the normal case: every slot of the zone is a window
    of it at the slot's ``file_offset``.  Cloud Hypervisor's offload daemon
    restores a VM with one new memfd per slot (the slot's bytes at its
    ``file_offset``), and Cloud Hypervisor maps each slot from its own fd:
    then each slot has its own :class:`Backing` and ``whole`` is None.
    """

    def __init__(self, config: ZoneConfig, fd: int | None = None, slot_fds: dict[int, int] | None = None,
                 mappings: Iterable[GuestRamMapping] = ()) -> None:
        """Map ``fd`` whole, or each of ``mappings`` (this zone's slots) from its fd in ``slot_fds``, or else
        a new memfd (shared) / anonymous memory (private).

        Every fd given is owned from now on, and closed even if this fails.
        """
        self.config = config
        #: The mapping of the whole zone; None when its slots have their own.
        self.whole: Backing | None = None
        #: Each slot's own mapping, by slot number (empty unless the slots came as separate files).
        self.slots: dict[int, Backing] = {}
        pending = dict(slot_fds or {})
        try:
            if pending:
                if fd is not None:
                    raise VmError(f"zone {config.id!r} has a memory fd both for the whole zone and for its slots",
                                  where="guest memory")
                if not config.shared:
                    raise VmError(f"zone {config.id!r} is private, but has memory fds", where="guest memory")
                for m in mappings:
                    if m.slot not in pending:
                        raise VmError(f"slot {m.slot} of zone {config.id!r} has no memory fd, but its other slots "
                                      "came as separate files", where="guest memory")
                    self.slots[m.slot] = Backing.of_file(pending.pop(m.slot), m.file_offset, m.size,
                                                         f"slot {m.slot} of zone {config.id!r}")
                if pending:
                    raise VmError(f"memory fd for slot {min(pending)}, which is not a slot of zone {config.id!r}",
                                  where="guest memory")
            elif config.shared:
                if fd is None:
                    self.whole = Backing.new_memfd(config.id, config.size)
                else:
                    fd, given = None, fd  # of_file owns it from here, even if it fails
                    self.whole = Backing.of_file(given, 0, config.size, f"zone {config.id!r}")
            else:
                if fd is not None:
                    raise VmError(f"zone {config.id!r} is private, but has a memory fd", where="guest memory")
                self.whole = Backing.anonymous(config.size)
        except BaseException:
            for left in [fd, *pending.values()]:
                if left is not None:
                    os.close(left)
            self.close()
            raise

    def backing_of(self, mapping: GuestRamMapping) -> Backing:
        """The mapping that holds slot ``mapping``: its own, or the zone's whole one."""
        own = self.slots.get(mapping.slot)
        if own is not None:
            return own
        if self.whole is None:
            raise VmError(f"slot {mapping.slot} of zone {self.config.id!r} has no memory", where="guest memory")
        return self.whole

    @property
    def fd(self) -> int:
        """The fd of the whole zone: -1 for anonymous memory, and when each slot has its own (see :attr:`Region.fd`)."""
        return self.whole.fd if self.whole is not None else -1

    def close(self) -> None:
        """Unmap the zone and close its fds (idempotent)."""
        if self.whole is not None:
            self.whole.close(f"zone {self.config.id}")
        for slot, backing in self.slots.items():
            backing.close(f"slot {slot} of zone {self.config.id}")


@dataclass
class Region:
    """One slot as the VMM sees it: where it is for the guest and for us."""

    mapping: GuestRamMapping
    zone: Zone
    #: The host mapping that holds this slot: the zone's whole one, or the slot's own.
    backing: Backing

    @property
    def gpa(self) -> int:
        return self.mapping.gpa

    @property
    def size(self) -> int:
        return self.mapping.size

    @property
    def end(self) -> int:
        return self.mapping.gpa + self.mapping.size

    @property
    def fd(self) -> int:
        """The file backing this slot, holding its bytes at ``mapping.file_offset`` (-1 for anonymous memory)."""
        return self.backing.fd

    @property
    def start(self) -> int:
        """Where this slot begins inside its backing's mapping."""
        return self.mapping.file_offset - self.backing.offset

    @property
    def host_address(self) -> int:
        return self.backing.address + self.start


class GuestMemory:
    """All guest RAM: zones, their slots, and bounds-checked access by guest-physical address."""

    def __init__(self, zones: list[Zone], mappings: list[GuestRamMapping]) -> None:
        self.zones = {z.config.id: z for z in zones}
        self.regions = sorted((Region(m, self.zones[m.zone_id], self.zones[m.zone_id].backing_of(m))
                               for m in mappings), key=lambda r: r.gpa)
        # Slot start addresses, for an O(log n) lookup: a peer's table may hold a million ranges.
        self._starts = [r.gpa for r in self.regions]
        #: During postcopy, which pages are here (:class:`chmig.postcopy.PresentPages`); None when all are.
        #: Python code holding the GIL must not touch a page that is not (see :meth:`readable`).
        self.present: PresentPageMap | None = None

    @classmethod
    def create(cls, zone_configs: list[ZoneConfig], fds: dict[str, int] | None = None) -> GuestMemory:
        """Allocate (or, with ``fds`` by zone id, adopt) the backing of every zone."""
        mappings = layout(zone_configs)
        validate_layout(zone_configs, mappings)
        return cls.adopt(zone_configs, mappings, fds or {})

    @classmethod
    def adopt(cls, zone_configs: list[ZoneConfig], mappings: list[GuestRamMapping],
              fds: dict[str, int] | None = None, *, slot_fds: dict[int, int] | None = None) -> GuestMemory:
        """Build the zones from ``fds`` (one file per zone, by zone id) and ``slot_fds`` (one file per slot,
        by slot number; the slot's bytes at its ``file_offset``); zones in neither get new memory.

        A zone takes either one fd or one per slot.  Every fd given is owned
        from now on (closed if this fails, by :meth:`close` otherwise).
        """
        zones: list[Zone] = []
        pending_zones = dict(fds or {})
        pending_slots = dict(slot_fds or {})
        try:
            slots_of: dict[str, list[GuestRamMapping]] = {}
            for m in mappings:
                slots_of.setdefault(m.zone_id, []).append(m)
            known = {config.id for config in zone_configs}
            known_slots = {m.slot for m in mappings if m.zone_id in known}
            # An fd nothing would take would stay open for ever: refuse it instead.
            stray = [f"zone {z!r}" for z in pending_zones if z not in known]
            stray += [f"slot {s}" for s in pending_slots if s not in known_slots]
            if stray:
                raise VmError(f"memory fd for {stray[0]}, which this VM does not have", where="guest memory")
            for config in zone_configs:
                mine = slots_of.get(config.id, [])
                own = {m.slot: pending_slots.pop(m.slot) for m in mine if m.slot in pending_slots}
                zones.append(Zone(config, pending_zones.pop(config.id, None), own, mine))
            return cls(zones, mappings)
        except BaseException:
            for zone in zones:
                zone.close()
            for fd in [*pending_zones.values(), *pending_slots.values()]:
                os.close(fd)
            raise

    @property
    def mappings(self) -> list[GuestRamMapping]:
        return [r.mapping for r in self.regions]

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def shared(self) -> bool:
        return all(z.config.shared for z in self.zones.values())

    def ram_ranges(self) -> list[tuple[int, int]]:
        return [(r.gpa, r.size) for r in self.regions]

    def region_of(self, gpa: int, length: int) -> Region:
        """The slot holding ``[gpa, gpa+length)`` whole, or a clear error — never a write outside RAM."""
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index >= 0:
            region = self.regions[index]
            if gpa < region.end and gpa + length <= region.end:
                return region
        raise VmError(f"range {gpa:#x}+{length:#x} is not inside guest RAM", where="guest memory")

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest memory (no copy); the caller must release it."""
        region = self.region_of(gpa, length)
        start = region.start + gpa - region.gpa
        return memoryview(region.backing.map)[start : start + length]

    def split(self, rng: MemoryRange) -> Iterator[tuple[int, int]]:
        """Cut a range at slot boundaries (a sender's range may span two adjacent slots)."""
        gpa, end = rng.gpa, rng.end
        while gpa < end:
            region = self.region_of(gpa, 1)
            stop = min(end, region.end)
            yield gpa, stop - gpa
            gpa = stop

    def readable(self, gpa: int, length: int) -> bool:
        """May Python read ``[gpa, gpa+length)`` now?  Not while postcopy has not brought it in.

        Reading a page userfaultfd still waits for would block this thread in
        the kernel with the GIL held, and the fault thread could never resolve
        it (see :mod:`chmig.postcopy`).
        """
        present = self.present
        if present is None:
            return True
        return all(present.is_present(piece, size) for piece, size in self.split(MemoryRange(gpa, length)))

    def read(self, gpa: int, length: int) -> bytes:
        with self.view(gpa, length) as v:
            return bytes(v)

    def write(self, gpa: int, data: bytes) -> None:
        with self.view(gpa, len(data)) as v:
            v[:] = data

    def populated_table(self, strict: bool = False) -> MemoryRangeTable:
        """Every page that was ever written: iteration 0 sends only these.

        memfds: ``SEEK_DATA``/``SEEK_HOLE`` skip the holes.  Anonymous memory:
        ``/proc/self/pagemap`` tells which pages are present or swapped out
        (never-touched pages read as zero).  An unreadable pagemap means "all
        of it" (sending too much is safe) — unless ``strict``, where it is an
        error (a hybrid destination must never take a page for present).
        """
        table = MemoryRangeTable()
        for region in self.regions:
            if region.fd >= 0:
                # Every backing file holds the slot at its file_offset, whether the zone's or the slot's own.
                spans = data_spans(region.fd, region.mapping.file_offset, region.size)
            else:
                spans = _resident_spans(region.host_address, region.size, strict)
            for offset, length in spans:
                table.append(MemoryRange(region.gpa + offset, length))
        return table

    def populate_range(self, gpa: int, length: int) -> None:
        """Fault in ``[gpa, gpa+length)`` with one ``MADV_POPULATE_WRITE`` before data lands there.

        Receiving into never-touched memory is bound by one page fault per page;
        populating the range first batches those faults (measured in
        bench/precopy.py), and doing it per range spreads the work over every
        receiving connection.  Already-present pages cost next to nothing.
        """
        region = self.region_of(gpa, length)
        address = region.host_address + gpa - region.gpa
        start = address & ~(PAGE_SIZE - 1)
        if _libc.madvise(start, address + length - start, MADV_POPULATE_WRITE) != 0:
            log.debug("MADV_POPULATE_WRITE failed at gpa %#x: %s", gpa, os.strerror(ctypes.get_errno()))

    def no_huge_pages(self) -> None:
        """``MADV_NOHUGEPAGE`` on all of guest RAM (a postcopy or hybrid destination, before any page arrives)."""
        for region in self.regions:
            if _libc.madvise(region.host_address, region.size, MADV_NOHUGEPAGE) != 0:
                log.debug("MADV_NOHUGEPAGE failed at gpa %#x: %s", region.gpa, os.strerror(ctypes.get_errno()))

    def discard(self, rng: MemoryRange) -> None:
        """Drop the pages of ``rng`` (page aligned, inside guest RAM): afterwards they are missing, as if never
        written — a hybrid migration's stale copies, to be fetched again by postcopy."""
        for gpa, length in self.split(rng):
            region = self.region_of(gpa, length)
            advice = MADV_REMOVE if region.zone.config.shared else MADV_DONTNEED
            if _libc.madvise(region.host_address + gpa - region.gpa, length, advice) != 0:
                error = ctypes.get_errno()
                raise VmError(f"cannot drop the pages at {gpa:#x}+{length:#x}: {os.strerror(error)}", where="Discard")

    def close(self) -> None:
        """Unmap every zone (or each of its slots) and close their fds (idempotent)."""
        for zone in self.zones.values():
            zone.close()


def host_available_memory() -> int | None:
    """``MemAvailable`` of this host in bytes (None if the kernel does not say)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _resident_spans(address: int, size: int, strict: bool = False) -> list[tuple[int, int]]:
    """The pages of anonymous memory that were ever touched: present in RAM *or swapped out*.

    ``/proc/self/pagemap`` has one u64 per page whose bit 63 says "present"
    and bit 62 "swapped"; ``mincore`` would miss swapped pages, which then
    would never be sent (they are not dirty either) — silent data loss on a
    host that swaps.  Never-touched pages read as zero and need not be sent.
    """
    pages = size // PAGE_SIZE
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            pagemap.seek(address // PAGE_SIZE * 8)
            raw = bytearray()
            while len(raw) < pages * 8:
                chunk = pagemap.read(pages * 8 - len(raw))
                if not chunk:
                    break
                raw += chunk
    except OSError as exc:
        if strict:
            raise VmError(f"cannot read /proc/self/pagemap: {exc.strerror or exc}", where="populated pages") from None
        log.debug("pagemap unreadable (%s): sending all pages", exc)
        return [(0, size)]
    if len(raw) < pages * 8:
        if strict:
            raise VmError("/proc/self/pagemap is shorter than guest RAM", where="populated pages")
        return [(0, size)]
    # The top byte of each little-endian entry holds bits 56..63: 0xC0 = present or swapped.
    touched = bytes(raw[7::8]).translate(_TOUCHED)
    return [(m.start() * PAGE_SIZE, (m.end() - m.start()) * PAGE_SIZE) for m in re.finditer(rb"\x01+", touched)]


_TOUCHED = bytes(1 if b & 0xC0 else 0 for b in range(256))

