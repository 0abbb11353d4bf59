"""Guest RAM: zones backed by memfds (shared) or anonymous memory, laid out like Cloud Hypervisor.

Layout (x86-64, as Cloud Hypervisor's memory manager does it): zones are placed
one after another in guest-physical space starting at 0; RAM never overlaps the
32-bit hole, so a zone that would cross 3 GiB continues at 4 GiB.  Every
contiguous piece is one KVM slot, recorded as a ``guest_ram_mappings`` entry
(``slot``, ``gpa``, ``size``, ``zone_id``, ``virtio_mem``, ``file_offset``) — the
record the migration Config and the offload daemon rely on.

Shared zones are memfds mapped ``MAP_SHARED``: local migration hands the fd to
the destination, and the offload daemon reads it.  Private zones are anonymous
``MAP_PRIVATE`` memory.

Python never copies guest memory on the data path: callers take a
``memoryview`` of the mapping (:meth:`GuestMemory.view`) and hand it to
``sendall``/``recv_into``.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Protocol

from .errors import UsageError, VmError
from .jsonlimits import U32_MAX, JsonRefused, get_bool, get_int, get_str
from .protocol import DEFAULT_LIMITS, MemoryRange, MemoryRangeTable
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


class Zone:
    """One zone's backing: a memfd (shared) or anonymous memory, mapped whole."""

    def __init__(self, config: ZoneConfig, fd: int | None = None) -> None:
        """Map ``fd`` (owned from now on, closed even if this fails) or a new memfd / anonymous memory."""
        self.config = config
        self.fd = -1
        try:
            if config.shared:
                if fd is None:
                    # The zone id may be a peer's: only a tame version of it goes into the memfd's name.
                    name = re.sub(r"[^A-Za-z0-9_.-]", "_", config.id)[:64]
                    fd = os.memfd_create(f"chmig-{name}", os.MFD_CLOEXEC)
                    os.ftruncate(fd, config.size)
                elif os.fstat(fd).st_size < config.size:
                    raise VmError(
                        f"memory fd for zone {config.id!r} has {os.fstat(fd).st_size} bytes, needs {config.size}",
                        where="guest memory",
                    )
                self.map = mmap.mmap(fd, config.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                self.fd = fd
            else:
                self.map = mmap.mmap(-1, config.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:
            log.warning("zone %s still has exported views; leaving it mapped", self.config.id)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Region:
    """One slot as the VMM sees it: where it is for the guest and for us."""

    mapping: GuestRamMapping
    zone: Zone

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
    def host_address(self) -> int:
        return self.zone.address + self.mapping.file_offset


class GuestMemory:
    """All guest RAM: zones, their slots, and bounds-checked access by guest-physical address."""

    def __init__(self, zones: list[Zone], mappings: list[GuestRamMapping]) -> None:
        self.zones = {z.config.id: z for z in zones}
        self.regions = sorted((Region(m, self.zones[m.zone_id]) for m in mappings), key=lambda r: r.gpa)
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
    def adopt(cls, zone_configs: list[ZoneConfig], mappings: list[GuestRamMapping], fds: dict[str, int]) -> GuestMemory:
        """Build the zones; every fd in ``fds`` is owned from now on (closed if this fails)."""
        zones: list[Zone] = []
        pending = dict(fds)
        try:
            for config in zone_configs:
                zones.append(Zone(config, pending.pop(config.id, None)))
        except BaseException:
            for zone in zones:
                zone.close()
            for fd in pending.values():
                os.close(fd)
            raise
        return cls(zones, mappings)

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
        start = region.mapping.file_offset + gpa - region.gpa
        return memoryview(region.zone.map)[start : start + length]

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

    def populated_table(self) -> MemoryRangeTable:
        """Every page that was ever written: iteration 0 sends only these.

        memfds: ``SEEK_DATA``/``SEEK_HOLE`` skip the holes.  Anonymous memory:
        ``/proc/self/pagemap`` tells which pages are present or swapped out
        (never-touched pages read as zero).
        """
        table = MemoryRangeTable()
        for region in self.regions:
            if region.zone.fd >= 0:
                spans = _data_spans(region.zone.fd, region.mapping.file_offset, region.size)
            else:
                spans = _resident_spans(region.host_address, region.size)
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

    def close(self) -> None:
        """Unmap every zone and close its fd (idempotent)."""
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


def _data_spans(fd: int, offset: int, size: int) -> list[tuple[int, int]]:
    """The non-hole parts of ``fd[offset:offset+size]``, relative to ``offset``."""
    spans = []
    pos, end = offset, offset + size
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if data >= end:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        spans.append((data - offset, hole - data))
        pos = hole
    return spans


def _resident_spans(address: int, size: int) -> list[tuple[int, int]]:
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
        log.debug("pagemap unreadable (%s): sending all pages", exc)
        return [(0, size)]
    if len(raw) < pages * 8:
        return [(0, size)]
    # The top byte of each little-endian entry holds bits 56..63: 0xC0 = present or swapped.
    touched = bytes(raw[7::8]).translate(_TOUCHED)
    return [(m.start() * PAGE_SIZE, (m.end() - m.start()) * PAGE_SIZE) for m in re.finditer(rb"\x01+", touched)]


_TOUCHED = bytes(1 if b & 0xC0 else 0 for b in range(256))

