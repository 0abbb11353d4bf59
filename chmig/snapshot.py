"""Cloud Hypervisor's built-in snapshot and restore (``file://``), written crash-safely and verified before use.

Cloud Hypervisor (``docs/snapshot_restore.md``)::

    ch-remote --api-socket S pause
    ch-remote --api-socket S snapshot file:///DIR          PUT vm.snapshot {"destination_url": "file:///DIR"}
    cloud-hypervisor --api-socket S --restore source_url=file:///DIR[,resume=true][,memory_restore_mode=ondemand]
    ch-remote --api-socket S restore source_url=file:///DIR  PUT vm.restore (a serialized RestoreConfig)

chmig takes the same commands, bodies and options (``chmig run --restore``,
``chmig remote snapshot|restore``; :class:`RestoreConfig` parses both forms).
A snapshot needs a paused VM (409 otherwise, as Cloud Hypervisor refuses
"Trying to snapshot while VM is running"); a restore needs a VMM with no VM,
and leaves the VM paused unless ``resume=true``.

The directory
-------------
Cloud Hypervisor's file names, chmig's contents (a snapshot is restored by chmig):

``config.json``
    The ``vm_config`` object of the VM's migration Config
    (:meth:`~chmig.vm.Vm.migration_config`), indented JSON: the VM's vCPUs,
    memory zones and workload.
``state.json``
    One JSON object: ``memory_manager_data`` (the Config's: the
    ``guest_ram_mappings`` of every slot), ``common_cpuid`` (the Config's, or
    null), ``memory_ranges`` (``[{"gpa": G, "length": L}, ...]``: the guest
    RAM saved, page aligned, not overlapping, in the order their bytes appear
    in ``memory-ranges``) and ``vm_state`` (:meth:`~chmig.vm.Vm.capture_state`:
    vCPUs and devices).
``memory-ranges``
    The bytes of every range of ``memory_ranges``, back to back (Cloud
    Hypervisor's layout): range *i* starts at the sum of the lengths before
    it.  Only RAM that was ever written is saved (``populated_table``); the
    rest of guest RAM restores as zeros.  The file is sparse: a 2 MiB chunk
    that is all zeros is a hole.
``manifest.json``
    :mod:`chmig.snapshot_dir`'s manifest, shared with the offload daemon's
    snapshots (so ``chmig offload verify --input-dir DIR`` checks this one
    too): every file's size and SHA-256, and one SHA-256 per 2 MiB chunk of
    ``memory-ranges``.

Crash safety: everything is written into a temporary directory beside DIR,
each file fsynced, and renamed into place (:class:`~chmig.snapshot_dir.SnapshotWriter`),
so DIR is at every moment nothing, the previous snapshot, or the new one.
DIR may not exist yet (its parent must), or be empty, or hold an earlier
snapshot; a directory holding anything else is refused rather than replaced.

Restore
-------
``memory_restore_mode=copy`` (the default): every file is checked against
the manifest — every chunk of ``memory-ranges`` included — before anything
is built, so a corrupt snapshot is refused with one error naming the file
and byte range; then the VM is built from ``config.json`` and ``state.json``
(:class:`~chmig.destination.Destination`, the same steps a migration
takes), its RAM filled straight from the file (``preadv``, holes skipped),
its state restored.

``memory_restore_mode=ondemand``: the VM is built with empty RAM registered
with userfaultfd, and :class:`~chmig.postcopy.PostcopyPager` brings the pages
in as the guest touches them and in the background, from two
:class:`FileSource` readers of ``memory-ranges`` (one for faults, one for the
pull) instead of Fault connections.  Each chunk is checked against the
manifest the first time a page is read from it; a corrupt chunk fails the
pager and the VMM stops the VM (``vm.info`` says why; with no API the
process exits non-zero) — a guest never runs on a page that did not verify.
``vm.info`` shows the restore as ``migration`` (mode ``restore``), with the
pager's statistics under ``postcopy`` for ``ondemand``.

A snapshot without ``manifest.json`` restores unverified, with a warning;
its files' sizes are still checked against ``state.json``.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from . import protocol as p
from .destination import Destination
from .apiconfig import NULLABLE_FIELDS, RESTORE_FIELDS, check_fields, enum_variant
from .errors import ChmigError, InternalError, MigrationError, ProtocolError, UsageError, VmError
from .jsonlimits import JsonRefused, get_int, get_list, get_object
from .memory import GuestMemory, Region
from .options import OptionParser
from .postcopy import PostcopyPager, PostcopyStats, Prefetch
from .snapshot_dir import (
    MANIFEST,
    ChunkVerifier,
    VerifiedReader,
    Manifest,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotWriter,
    data_spans,
    open_memory_file,
    read_json_file,
)
from .stats import MigrationStats
from .units import MiB, PAGE_SIZE
from .vm import Vm, VmState

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
MEMORY_FILE = "memory-ranges"
#: Every file a snapshot directory may hold: a directory with anything else is never replaced.
SNAPSHOT_FILES = frozenset({CONFIG_FILE, STATE_FILE, MEMORY_FILE, MANIFEST})

COPY, ONDEMAND = "copy", "ondemand"
#: ``memory_restore_mode`` as Cloud Hypervisor's API serializes it (serde's enum names).
_MODE_JSON = {COPY: "Copy", ONDEMAND: "OnDemand"}

#: Every key of Cloud Hypervisor's ``RestoreConfig::parse``.
RESTORE_OPTIONS = ("source_url", "prefault", "memory_restore_mode", "net_fds", "vfio_fds", "iommufd_fd", "resume",
                   "zone_updates")
#: RestoreConfig fields a chmig VM has nothing to apply to: given, they are refused (never silently ignored).
_UNSUPPORTED = {
    "net_fds": "a chmig VM has no network devices to give new fds to",
    "vfio_fds": "a chmig VM has no VFIO devices to give new fds to",
    "iommufd_fd": "a chmig VM has no VFIO devices, so no iommufd",
    "zone_updates": "chmig does not place memory zones on host NUMA nodes",
}
#: The most ``memory_ranges`` a snapshot lists: each is a JSON object, and a State may hold only so many
#: (half of them leaves the rest for the VM's state).  A snapshot with more saves every slot whole instead.
MAX_RANGES = p.DEFAULT_LIMITS.max_json_containers // 2

_ZEROS = memoryview(bytes(max(p.PREFETCH_MAX_BYTES, PAGE_SIZE)))


# ---------------------------------------------------------------------------------------------
# URLs and configurations
# ---------------------------------------------------------------------------------------------


def url_to_path(url: str, what: str | None) -> Path:
    """The directory of a ``file://`` URL (Cloud Hypervisor's ``url_to_path``: the rest after ``file://``)."""
    if not url.startswith("file://") or not url[len("file://"):]:
        raise UsageError(f"could not extract a path from URL {url!r}: expected file:///DIR", where=what)
    return Path(url[len("file://"):])


@dataclass(frozen=True)
class RestoreConfig:
    """Cloud Hypervisor's ``RestoreConfig``: from ``--restore``/``ch-remote restore`` options or the API body."""

    source_url: str
    prefault: bool = False
    memory_restore_mode: str = COPY
    resume: bool = False

    @property
    def directory(self) -> Path:
        return url_to_path(self.source_url, "source_url")

    @classmethod
    def parse(cls, text: str, what: str = "--restore") -> RestoreConfig:
        """``source_url=file:///DIR[,prefault=on|off][,memory_restore_mode=copy|ondemand][,resume=true|false]``
        by Cloud Hypervisor's option rules (``RestoreConfig::parse``, its whole key set: the keys a chmig VM
        has nothing to apply to are refused by name, ``key=`` being CH's "not given")."""
        options = OptionParser(what)
        for key in RESTORE_OPTIONS:  # CH's order
            if key in _UNSUPPORTED:
                options.add_unsupported(key, reason=_UNSUPPORTED[key])
            else:
                options.add(key)
        options.parse(text)
        source_url = options.get("source_url")
        if source_url is None:
            raise UsageError("source_url missing", where=what)
        config = cls(source_url, options.toggle("prefault", False),
                     _restore_mode(options.get("memory_restore_mode") or COPY, what), options.toggle("resume", False))
        config.validate(what)
        return config

    @classmethod
    def from_api(cls, body: Any, where: str | None = None) -> RestoreConfig:
        """A ``vm.restore`` body as ``ch-remote`` sends it: every field checked here (:func:`check_fields`).

        The fields chmig cannot use may be null or empty, as ``ch-remote``
        sends them; otherwise they are refused with the reason.  The enum is
        CH's ``"Copy"``/``"OnDemand"`` or lower case.
        """
        if isinstance(body, dict):
            for key, why in _UNSUPPORTED.items():
                if body.get(key) not in (None, []):
                    raise UsageError(f"{key}: {why}", where=where)
        body = check_fields(body, RESTORE_FIELDS, required=("source_url",), nullable=NULLABLE_FIELDS, where=where)
        mode = COPY
        if "memory_restore_mode" in body:
            mode = enum_variant(body["memory_restore_mode"], "memory_restore_mode", tuple(_MODE_JSON.values()), where)
        config = cls(body["source_url"], body.get("prefault", False), mode, body.get("resume", False))
        config.validate(where)
        return config

    def validate(self, what: str | None) -> None:
        url_to_path(self.source_url, what)
        if self.memory_restore_mode == ONDEMAND and self.prefault:
            raise UsageError("'prefault' cannot be combined with 'memory_restore_mode=ondemand'", where=what)

    def to_api(self) -> dict[str, Any]:
        """The body ``ch-remote restore`` sends: the whole RestoreConfig, serialized by serde."""
        return {"source_url": self.source_url, "prefault": self.prefault,
                "memory_restore_mode": _MODE_JSON[self.memory_restore_mode], "net_fds": None, "vfio_fds": None,
                "iommufd_fd": None, "resume": self.resume, "zone_updates": []}


def _restore_mode(value: str, what: str) -> str:
    """``copy`` or ``ondemand``, any case (Cloud Hypervisor's ``FromStr``; its JSON says ``Copy``/``OnDemand``)."""
    mode = value.lower()
    if mode not in (COPY, ONDEMAND):
        raise UsageError(f"memory_restore_mode={value!r}: expected copy or ondemand", where=what)
    return mode


# ---------------------------------------------------------------------------------------------
# Snapshot
# ---------------------------------------------------------------------------------------------


@dataclass
class SnapshotResult:
    """What a snapshot wrote, for the log line."""

    directory: Path
    ranges: int = 0
    memory_bytes: int = 0
    data_bytes: int = 0
    write_ms: float = 0.0

    def summary(self) -> str:
        rate = self.memory_bytes / MiB / (self.write_ms / 1000) if self.write_ms else 0.0
        return (f"snapshot written to {self.directory}: {self.ranges} memory range(s), {self.memory_bytes / MiB:.1f} "
                f"MiB of RAM ({self.data_bytes / MiB:.1f} MiB of data) in {self.write_ms:.0f} ms ({rate:.0f} MiB/s)")


def region_file(region: Region) -> tuple[int, int] | None:
    """The file holding ``region``'s bytes and the offset of its first byte there; None for anonymous memory.

    The one place here that knows how guest memory exposes its backing files
    (a zone's memfd, or one file per slot for memory an offload daemon handed over).
    """
    fd = region.fd
    return (fd, region.mapping.file_offset) if fd >= 0 else None


def _ranges_to_save(memory: GuestMemory) -> list[tuple[int, int]]:
    """Guest RAM that was ever written, cut at slot boundaries (Cloud Hypervisor saves the same)."""
    ranges = [piece for rng in memory.populated_table() for piece in memory.split(rng)]
    if len(ranges) > MAX_RANGES:
        # RAM too fragmented for a restore to read the list: every slot whole costs only holes in the sparse file.
        log.info("snapshot: %d memory ranges, more than %d: saving every slot whole", len(ranges), MAX_RANGES)
        return memory.ram_ranges()
    return ranges


def write_snapshot(vm: Vm, destination_url: str) -> SnapshotResult:
    """Write the paused ``vm`` to the directory of ``destination_url``; the caller keeps it paused meanwhile."""
    directory = url_to_path(destination_url, "destination_url").resolve()
    if vm.state != VmState.PAUSED:
        raise VmError(f"cannot snapshot a VM that is {vm.state}: pause it first (Cloud Hypervisor: "
                      "\"Trying to snapshot while VM is running\")")
    begin = time.monotonic()
    migration = vm.migration_config()
    memory = vm.memory
    views: list[memoryview] = []
    if not directory.exists() and not directory.parent.is_dir():
        raise SnapshotError("its parent directory does not exist", where=str(directory))
    writer = SnapshotWriter(directory, lambda name: name in SNAPSHOT_FILES)
    try:
        pieces: list[tuple[int, int, int] | memoryview] = []
        ranges: list[dict[str, int]] = []
        for gpa, length in _ranges_to_save(memory):
            region = memory.region_of(gpa, length)
            backing = region_file(region)
            if backing is not None:
                fd, base = backing
                pieces.append((fd, base + gpa - region.gpa, length))
            else:
                views.append(memory.view(gpa, length))
                pieces.append(views[-1])
            ranges.append({"gpa": gpa, "length": length})
        size = sum(r["length"] for r in ranges)
        state = {"memory_manager_data": migration["memory_manager_data"],
                 "common_cpuid": migration.get("common_cpuid"), "memory_ranges": ranges,
                 "vm_state": vm.capture_state()}
        writer.write_file(CONFIG_FILE, json.dumps(migration["vm_config"], indent=2).encode() + b"\n")
        writer.write_file(STATE_FILE, json.dumps(state, separators=(",", ":")).encode())
        data = writer.write_memory(MEMORY_FILE, pieces, size)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        for view in views:
            view.release()
    result = SnapshotResult(directory, len(ranges), size, data, round((time.monotonic() - begin) * 1000, 3))
    log.info("%s", result.summary())
    return result


# ---------------------------------------------------------------------------------------------
# Restore: the directory
# ---------------------------------------------------------------------------------------------


class SavedRange:
    """One range of ``memory_ranges``: ``length`` bytes of guest RAM at ``gpa``, at ``offset`` in the file."""

    __slots__ = ("gpa", "length", "offset")

    def __init__(self, gpa: int, length: int, offset: int) -> None:
        self.gpa = gpa
        self.length = length
        self.offset = offset

    @property
    def end(self) -> int:
        return self.gpa + self.length


class SnapshotImage:
    """A snapshot directory opened for a restore: its JSON checked, ``memory-ranges`` open at the right size.

    Nothing of the VM is built here; a flaw is one :class:`SnapshotError`
    naming the directory and the file.
    """

    def __init__(self, directory: Path, limits: p.Limits = p.DEFAULT_LIMITS) -> None:
        self.directory = directory
        if not directory.is_dir():
            raise SnapshotError("no such snapshot directory" if not directory.exists() else "is not a directory",
                                where=str(directory))
        if (directory / "migration_config.json").exists() and not (directory / CONFIG_FILE).exists():
            raise SnapshotError("is an offload daemon's snapshot (migration_config.json, memory-<slot>): restore it "
                                "with chmig offload restore and vm.receive-migration", where=str(directory))
        self.manifest = Manifest.load(directory)
        vm_config = self._json(CONFIG_FILE, limits)
        state = self._json(STATE_FILE, limits)
        try:
            if not isinstance(vm_config, dict):
                raise JsonRefused(f"{CONFIG_FILE} must be a JSON object")
            if not isinstance(state, dict):
                raise JsonRefused(f"{STATE_FILE} must be a JSON object")
            self.vm_config = vm_config
            self.memory_manager_data = get_object(state, "memory_manager_data", STATE_FILE)
            self.common_cpuid = state.get("common_cpuid")
            self.vm_state = get_object(state, "vm_state", STATE_FILE)
            self.ranges = _saved_ranges(get_list(state, "memory_ranges", STATE_FILE, MAX_RANGES))
        except JsonRefused as exc:
            raise SnapshotError(f"not a chmig snapshot: {exc}", where=str(directory)) from None
        self.size = sum(r.length for r in self.ranges)
        self.fd, self.verifier = open_memory_file(directory, MEMORY_FILE, self.manifest, self.size)
        if self.manifest is None:
            log.warning("%s has no %s: restoring it unverified (only the files' sizes are checked)", directory,
                        MANIFEST)

    def _json(self, name: str, limits: p.Limits) -> object:
        raw = read_json_file(self.directory, name, self.manifest)
        try:
            return p.decode_json_payload(raw, name, limits)
        except ProtocolError as exc:
            raise SnapshotError(f"{name} is not valid JSON: {exc.message}", where=str(self.directory)) from None

    @property
    def verified(self) -> bool:
        return self.manifest is not None

    def config_payload(self) -> bytes:
        """The migration Config this snapshot describes, as a destination takes it."""
        return json.dumps({"vm_config": self.vm_config, "memory_manager_data": self.memory_manager_data,
                           "common_cpuid": self.common_cpuid}).encode()

    def state_payload(self) -> bytes:
        return json.dumps(self.vm_state).encode()

    def check_inside(self, memory: GuestMemory) -> None:
        """Every saved range lies in the guest RAM that ``config.json`` describes."""
        for saved in self.ranges:
            try:
                for _ in memory.split(p.MemoryRange(saved.gpa, saved.length)):
                    pass
            except VmError:
                raise SnapshotError(f"{STATE_FILE}: memory range {saved.gpa:#x}+{saved.length:#x} is not inside the "
                                    f"guest RAM that {CONFIG_FILE} describes", where=str(self.directory)) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _saved_ranges(items: list) -> list[SavedRange]:
    """``memory_ranges`` with their file offsets (in file order), checked: page aligned and not overlapping."""
    ranges = []
    offset = 0
    for index, item in enumerate(items):
        what = f"memory_ranges[{index}]"
        if not isinstance(item, dict):
            raise JsonRefused(f"{what} must be an object")
        gpa, length = get_int(item, "gpa", what), get_int(item, "length", what, low=1)
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise JsonRefused(f"{what} ({gpa:#x}+{length:#x}) is not page aligned")
        ranges.append(SavedRange(gpa, length, offset))
        offset += length
    by_gpa = sorted(ranges, key=lambda r: r.gpa)
    for before, after in zip(by_gpa, by_gpa[1:]):
        if after.gpa < before.end:
            raise JsonRefused(f"memory ranges {before.gpa:#x}+{before.length:#x} and {after.gpa:#x}+{after.length:#x} "
                              "overlap")
    return ranges


# ---------------------------------------------------------------------------------------------
# Restore on demand: memory-ranges as the pager's page source
# ---------------------------------------------------------------------------------------------


class SavedMemory:
    """``memory-ranges`` shared by the :class:`FileSource` readers of one restore; the last one to close it
    closes the file."""

    def __init__(self, image: SnapshotImage, readers: int) -> None:
        self.directory = image.directory
        self.fd, image.fd = image.fd, -1  # ours from now on
        self.verifier: ChunkVerifier = image.verifier
        self._by_gpa = sorted(image.ranges, key=lambda r: r.gpa)
        self._starts = [r.gpa for r in self._by_gpa]
        self._readers = readers
        self._lock = threading.Lock()

    def reader(self) -> VerifiedReader:
        """A reader of memory-ranges for one thread."""
        return VerifiedReader(self.verifier)

    def read(self, gpa: int, into: memoryview, reader: VerifiedReader) -> None:
        """Guest RAM ``[gpa, gpa+len(into))`` as the snapshot has it: verified chunks, zeros where nothing was saved."""
        end = gpa + len(into)
        index = bisect.bisect_right(self._starts, gpa) - 1
        if index < 0 or self._by_gpa[index].end <= gpa:
            index += 1
        position = gpa
        while index < len(self._by_gpa) and self._by_gpa[index].gpa < end:
            saved = self._by_gpa[index]
            low, high = max(saved.gpa, gpa), min(saved.end, end)
            _zero(into[position - gpa : low - gpa])
            at = saved.offset + (low - saved.gpa)
            try:
                # Checked on the very bytes used: a corrupt chunk fails the restore, never the guest.
                reader.read(at, into[low - gpa : high - gpa])
            except OSError as exc:
                raise SnapshotError(f"cannot read {MEMORY_FILE} at byte {at}: {exc.strerror or exc}",
                                    where=str(self.directory)) from None
            position = high
            index += 1
        _zero(into[position - gpa :])

    def release(self) -> None:
        with self._lock:
            self._readers -= 1
            last = self._readers == 0
        if last:
            os.close(self.fd)


def _zero(view: memoryview) -> None:
    while len(view):
        step = min(len(view), len(_ZEROS))
        view[:step] = _ZEROS[:step]
        view = view[step:]


class FileSource:
    """A :class:`~chmig.postcopy.PageSource` reading the pages of an on-demand restore from ``memory-ranges``.

    Pages always come inline (the pager copies them in with ``UFFDIO_COPY``).
    A file has no peer: nothing to time out or reset, and nothing to watch
    while idle.
    """

    def __init__(self, saved: SavedMemory, name: str) -> None:
        self.saved = saved
        self.name = name
        self._reader = saved.reader()
        self._closed = False

    def request_page(self, page: p.MemoryRange, into: memoryview | None) -> int:
        if into is None or len(into) != page.length:
            raise InternalError(f"{self.name}: no buffer of {page.length} bytes for {page.gpa:#x}", where="restore")
        self.saved.read(page.gpa, into, self._reader)
        return page.length

    def set_timeout(self, seconds: float | None) -> None:
        """A read of a local file does not hang the way a silent peer does."""

    def reset(self) -> None:
        """A reader is never blocked for long: the pager's stop event ends its loop."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.saved.release()


# ---------------------------------------------------------------------------------------------
# Restore
# ---------------------------------------------------------------------------------------------


@dataclass
class RestoreStats(MigrationStats):
    """A restore's statistics: ``migration`` in ``vm.info``, mode ``restore`` (``postcopy`` when on demand)."""

    memory_restore_mode: str = COPY
    #: Whether the snapshot had a manifest (every byte used was checked against it).
    verified: bool = False
    #: Copy: checking every chunk of memory-ranges before the VM was built.
    verify_ms: float | None = None
    #: The size of memory-ranges (``total_bytes`` counts what was copied into guest RAM).
    snapshot_bytes: int = 0

    def summary(self) -> str:
        seconds = (self.total_time_ms or self.elapsed() * 1000) / 1000
        head = (f"restore ({self.memory_restore_mode}) from {self.url} {self.status} after {seconds:.2f} s")
        if self.error:
            return f"{head}: {self.error}"
        text = (f"{head}: {self.snapshot_bytes / MiB:.1f} MiB saved, "
                f"{'verified' if self.verified else 'unverified (no manifest)'}")
        if self.verify_ms is not None:
            text += f" in {self.verify_ms:.0f} ms"
        if self.postcopy is not None:
            return f"{text}; pages follow on demand"
        return f"{text}; {self.total_bytes / MiB:.1f} MiB copied into guest RAM"


_T = TypeVar("_T")


def _from_snapshot(image: SnapshotImage, name: str, step: Callable[[], _T]) -> _T:
    """A destination step whose input came from the file ``name``: its refusal names the snapshot, not a peer."""
    try:
        return step()
    except ProtocolError as exc:
        raise SnapshotError(f"{name}: {exc.message}", where=str(image.directory)) from None


@dataclass
class Restore:
    """One restore, run by the VMM on the thread of its task; :meth:`run` returns the VM, ready and adopted next.

    With ``ondemand`` the VM is returned with its pager running
    (:attr:`pager`); the VMM owns the pager from then on.
    """

    config: RestoreConfig
    serial_spec: str = "off"
    limits: p.Limits = p.DEFAULT_LIMITS
    stats: RestoreStats = field(init=False)
    pager: PostcopyPager | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.stats = RestoreStats(role="destination", mode="restore", url=self.config.source_url, connections=0,
                                  memory_restore_mode=self.config.memory_restore_mode)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise MigrationError("the restore was cancelled", where="restore")

    def run(self) -> Vm:
        """Check the snapshot, build the VM, fill (or page in) its RAM, restore its state; paused unless resume."""
        log.info("restoring %s (memory_restore_mode=%s%s%s)", self.config.source_url, self.config.memory_restore_mode,
                 ", prefault" if self.config.prefault else "", ", resume" if self.config.resume else "")
        destination = Destination(self.serial_spec, self.limits)
        image: SnapshotImage | None = None
        try:
            image = SnapshotImage(self.config.directory.resolve(), self.limits)
            self._build(image, destination)
        except BaseException as exc:
            self.stats.finish("cancelled" if self._cancelled.is_set() else "failed", str(exc))
            self._discard(destination)
            log.error("%s", self.stats.summary())
            raise
        finally:
            if image is not None:
                image.close()
        self.stats.restore_ms = destination.restore_ms
        self.stats.resume_ms = destination.resume_ms
        self.stats.finish("completed")
        log.info("%s", self.stats.summary())
        return destination.take()

    def _build(self, image: SnapshotImage, destination: Destination) -> None:
        self.stats.verified = image.verified
        self.stats.snapshot_bytes = image.size
        self._check_cancelled()
        vm = _from_snapshot(image, CONFIG_FILE, lambda: destination.configure(image.config_payload()))
        image.check_inside(vm.memory)
        if self.config.memory_restore_mode == COPY:
            begin = time.monotonic()
            self._copy(image, destination)  # checked as it is copied, before the VM ever runs
            self.stats.verify_ms = round((time.monotonic() - begin) * 1000, 3)
        else:
            self._page_in(image, vm)
        self._check_cancelled()
        # Faults are served before the state is loaded (as in a postcopy receive): loading it may touch RAM.
        _from_snapshot(image, STATE_FILE, lambda: destination.restore(image.state_payload()))
        if self.pager is not None and self.pager.stats.status == "failed":
            # Known before the VM ever ran: refuse the restore itself (later, the VMM stops the VM instead).
            raise SnapshotError(f"memory_restore_mode=ondemand failed before the VM ran: {self.pager.error}",
                                where="restore")
        destination.complete(self.config.resume)

    def _copy(self, image: SnapshotImage, destination: Destination) -> None:
        """Fill guest RAM from memory-ranges, range by range, reading only where the file holds data."""
        memory = destination.memory
        assert memory is not None
        if self.config.prefault:
            for region in memory.regions:
                memory.populate_range(region.gpa, region.size)
        reader = VerifiedReader(image.verifier)
        for saved in image.ranges:
            self._check_cancelled()
            # Fresh guest RAM is zeros already: the file's holes need no copying, and stay unallocated.  Every
            # byte copied was checked against the manifest as it was read (a corrupt chunk fails the restore).
            for start, length in data_spans(image.fd, saved.offset, saved.length):
                with memory.view(saved.gpa + start, length) as view:
                    reader.read(saved.offset + start, view)
                self.stats.total_bytes += length

    def _page_in(self, image: SnapshotImage, vm: Vm) -> None:
        """Register the empty RAM with userfaultfd and start the pager on two readers of memory-ranges."""
        saved = SavedMemory(image, readers=2)
        sources = [FileSource(saved, f"{MEMORY_FILE}-faults"), FileSource(saved, f"{MEMORY_FILE}-pull")]
        try:
            self.pager = PostcopyPager(vm.memory, sources, Prefetch(), self.limits,
                                       PostcopyStats(role="destination", counts_bytes_into=self.stats))
        except BaseException:
            for source in sources:
                source.close()
            raise
        self.stats.postcopy = self.pager.stats
        self.pager.register()
        self.pager.start()

    def _discard(self, destination: Destination) -> None:
        if self.pager is not None:
            self.pager.stop("the restore failed")
            try:
                self.pager.close()
            except ChmigError as exc:
                log.error("discarding the restore: %s", exc)
            self.pager = None
        destination.discard()

    def take_pager(self) -> PostcopyPager | None:
        """The running pager, for the VMM to own with the VM (None for a copy restore)."""
        pager, self.pager = self.pager, None
        return pager


__all__ = ["COPY", "CONFIG_FILE", "MEMORY_FILE", "ONDEMAND", "STATE_FILE", "FileSource", "Restore", "RestoreConfig",
           "RestoreStats", "SavedMemory", "SnapshotCorrupt", "SnapshotError", "SnapshotImage", "SnapshotResult",
           "url_to_path", "write_snapshot"]
