"""The snapshot directory (chmig.snapshot_dir) and the offload daemon's Config rules, on real files and memfds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chmig import protocol as p
from chmig.errors import ProtocolError
from chmig.offload import is_snapshot_file
from chmig.snapshot_dir import (
    CHUNK_SIZE,
    MANIFEST,
    ChunkVerifier,
    Manifest,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotWriter,
    copy_into,
    data_spans,
    lock_socket,
    open_memory_file,
    read_json_file,
    read_small_file,
    verify_directory,
    zero_digest,
)
from chmig.units import MiB, PAGE_SIZE

pytestmark = pytest.mark.timeout(60)


def _memfd(size: int, writes: dict[int, bytes]) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    for offset, data in writes.items():
        os.pwrite(fd, data, offset)
    return fd


def _snapshot(target: Path, fd: int, offset: int, size: int) -> None:
    writer = SnapshotWriter(target, is_snapshot_file)
    writer.write_file("state.json", b'{"a": 1}')
    writer.write_memory("memory-0", [(fd, offset, size)], size)
    writer.commit()


def test_a_snapshot_appears_whole_with_its_manifest_and_keeps_holes(tmp_path: Path) -> None:
    fd = _memfd(16 * MiB, {3 * MiB: b"x" * 5000, 13 * MiB: b"y" * PAGE_SIZE, 7 * MiB: bytes(PAGE_SIZE)})
    try:
        _snapshot(tmp_path / "snap", fd, 1 * MiB, 14 * MiB)
    finally:
        os.close(fd)
    names = sorted(os.listdir(tmp_path / "snap"))
    assert names == [MANIFEST, "memory-0", "state.json"]
    assert os.listdir(tmp_path) == ["snap"]  # no temporary directory left beside it
    memory = tmp_path / "snap" / "memory-0"
    assert memory.stat().st_size == 14 * MiB
    # Only the data pages were written: the explicit zero page and the holes stay holes.
    assert memory.stat().st_blocks * 512 <= 4 * PAGE_SIZE
    with open(memory, "rb") as file:
        file.seek(2 * MiB)
        assert file.read(5000) == b"x" * 5000
        file.seek(12 * MiB)
        assert file.read(PAGE_SIZE) == b"y" * PAGE_SIZE
    manifest = Manifest.load(tmp_path / "snap")
    assert manifest is not None
    entry = manifest.files["memory-0"]
    assert entry.size == 14 * MiB and entry.chunks is not None and len(entry.chunks) == 7
    assert entry.chunks[0] == zero_digest()
    assert verify_directory(tmp_path / "snap") == ["memory-0: 14680064 bytes ok", "state.json: 8 bytes ok"]


def test_memoryview_pieces_are_written_back_to_back(tmp_path: Path) -> None:
    first, second = b"a" * PAGE_SIZE, b"b" * (3 * PAGE_SIZE)
    writer = SnapshotWriter(tmp_path / "snap", is_snapshot_file)
    writer.write_memory("memory-ranges", [memoryview(first), memoryview(second)], len(first) + len(second))
    writer.commit()
    assert (tmp_path / "snap" / "memory-ranges").read_bytes() == first + second
    verify_directory(tmp_path / "snap")


def test_pieces_must_fill_the_file(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path / "snap", is_snapshot_file)
    with pytest.raises(SnapshotError, match="bytes of memory for a file of"):
        writer.write_memory("memory-0", [memoryview(b"a" * PAGE_SIZE)], 2 * PAGE_SIZE)
    writer.abort()
    assert os.listdir(tmp_path) == []


def test_a_new_snapshot_replaces_the_old_one_atomically(tmp_path: Path) -> None:
    target = tmp_path / "snap"
    for marker in (b"old", b"new"):
        writer = SnapshotWriter(target, is_snapshot_file)
        writer.write_file("state.json", marker)
        writer.commit()
        assert (target / "state.json").read_bytes() == marker
    assert os.listdir(tmp_path) == ["snap"]


def test_an_aborted_snapshot_leaves_the_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "snap"
    writer = SnapshotWriter(target, is_snapshot_file)
    writer.write_file("state.json", b"old")
    writer.commit()
    writer = SnapshotWriter(target, is_snapshot_file)
    writer.write_file("state.json", b"half")
    writer.abort()
    assert (target / "state.json").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["snap"]


def test_partial_directories_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".snap.partial-{int(dead.stdout)}-abcd"
    stale.mkdir()
    alive = tmp_path / f".snap.partial-{os.getpid()}-ef01"
    alive.mkdir()
    writer = SnapshotWriter(tmp_path / "snap", is_snapshot_file)
    assert not stale.exists() and alive.exists()
    writer.abort()


def test_the_target_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SnapshotError, match="not a directory"):
        SnapshotWriter(tmp_path / "file", is_snapshot_file)


@pytest.mark.parametrize("where", ["data", "hole"])
def test_a_flipped_byte_is_found_in_its_chunk(tmp_path: Path, where: str) -> None:
    fd = _memfd(8 * MiB, {CHUNK_SIZE + 100: b"data" * 1000})
    try:
        _snapshot(tmp_path / "snap", fd, 0, 8 * MiB)
    finally:
        os.close(fd)
    offset = CHUNK_SIZE + 200 if where == "data" else 3 * CHUNK_SIZE + 5
    with open(tmp_path / "snap" / "memory-0", "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(SnapshotCorrupt, match=f"chunk {offset // CHUNK_SIZE}"):
        verify_directory(tmp_path / "snap")
    manifest = Manifest.load(tmp_path / "snap")
    fd, verifier = open_memory_file(tmp_path / "snap", "memory-0", manifest)
    try:
        verifier.check(0, CHUNK_SIZE)  # the chunks before it are fine
        with pytest.raises(SnapshotCorrupt):
            verifier.check(offset, PAGE_SIZE)
    finally:
        os.close(fd)


def test_truncated_and_missing_files_are_named(tmp_path: Path) -> None:
    fd = _memfd(4 * MiB, {0: b"z" * PAGE_SIZE})
    try:
        _snapshot(tmp_path / "snap", fd, 0, 4 * MiB)
    finally:
        os.close(fd)
    os.truncate(tmp_path / "snap" / "memory-0", 2 * MiB)
    with pytest.raises(SnapshotCorrupt, match="memory-0 has 2097152 bytes, the manifest says 4194304"):
        verify_directory(tmp_path / "snap")
    (tmp_path / "snap" / "state.json").unlink()
    manifest = Manifest.load(tmp_path / "snap")
    with pytest.raises(SnapshotError, match="state.json is missing"):
        read_json_file(tmp_path / "snap", "state.json", manifest)


def test_a_changed_json_file_is_refused(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path / "snap", is_snapshot_file)
    writer.write_file("state.json", b'{"a": 1}')
    writer.commit()
    (tmp_path / "snap" / "state.json").write_bytes(b'{"a": 2}')
    with pytest.raises(SnapshotCorrupt, match="does not match its manifest digest"):
        read_json_file(tmp_path / "snap", "state.json", Manifest.load(tmp_path / "snap"))


@pytest.mark.parametrize("manifest", [
    b"not json", b'{"version": 2, "hash": "sha256", "files": {}}',
    b'{"version": 1, "hash": "sha256", "files": {"../x": {"size": 1}}}',
    b'{"version": 1, "hash": "sha256", "files": {"m": {"size": 4194304, "chunk_size": 2097152, "chunks": ["a"]}}}',
    b'{"version": 1, "hash": "sha256", "files": {"m": {"size": -1}}}',
])
def test_a_bad_manifest_is_one_clear_error(tmp_path: Path, manifest: bytes) -> None:
    (tmp_path / MANIFEST).write_bytes(manifest)
    with pytest.raises(SnapshotCorrupt, match="unreadable manifest"):
        Manifest.load(tmp_path)


def test_without_a_manifest_nothing_is_verified_but_sizes_still_are(tmp_path: Path) -> None:
    (tmp_path / "memory-0").write_bytes(b"q" * PAGE_SIZE)
    assert Manifest.load(tmp_path) is None
    fd, verifier = open_memory_file(tmp_path, "memory-0", None, PAGE_SIZE)
    try:
        assert not verifier.verified
        verifier.check_all()
    finally:
        os.close(fd)
    with pytest.raises(SnapshotError, match="has 4096 bytes, the snapshot's configuration says 8192"):
        open_memory_file(tmp_path, "memory-0", None, 2 * PAGE_SIZE)
    with pytest.raises(SnapshotError, match="no manifest.json"):
        verify_directory(tmp_path)


def test_copy_into_keeps_the_files_holes(tmp_path: Path) -> None:
    path = tmp_path / "memory-0"
    with open(path, "wb") as file:
        file.truncate(8 * MiB)
        file.seek(5 * MiB)
        file.write(b"k" * PAGE_SIZE)
    fd = os.open(path, os.O_RDONLY)
    memfd = os.memfd_create("out", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, MiB + 8 * MiB)
        assert copy_into(memfd, MiB, fd, 0, 8 * MiB, "memory-0") == PAGE_SIZE
        assert data_spans(memfd, 0, 9 * MiB) == [(6 * MiB, PAGE_SIZE)]
        assert os.pread(memfd, PAGE_SIZE, 6 * MiB) == b"k" * PAGE_SIZE
    finally:
        os.close(fd)
        os.close(memfd)


def test_one_daemon_per_socket(tmp_path: Path) -> None:
    socket_path = tmp_path / "offload.sock"
    held = lock_socket(socket_path)
    try:
        with pytest.raises(SnapshotError, match="already in use by another daemon"):
            lock_socket(socket_path)
        # Another process sees the lock too (an OFD lock is per open file, not per process).
        other = subprocess.run(
            [sys.executable, "-c", "import sys; from chmig.snapshot_dir import lock_socket; lock_socket(sys.argv[1])",
             str(socket_path)], capture_output=True, text=True)
        assert other.returncode != 0 and "already in use" in other.stderr
    finally:
        os.close(held)
    os.close(lock_socket(socket_path))  # free again once the holder closed it


def test_chunk_verifier_checks_each_chunk_once(tmp_path: Path) -> None:
    fd = _memfd(6 * MiB, {0: b"a" * PAGE_SIZE})
    try:
        _snapshot(tmp_path / "snap", fd, 0, 6 * MiB)
    finally:
        os.close(fd)
    manifest = Manifest.load(tmp_path / "snap")
    fd, verifier = open_memory_file(tmp_path / "snap", "memory-0", manifest)
    try:
        assert isinstance(verifier, ChunkVerifier) and verifier.verified
        verifier.check(0, PAGE_SIZE)
        # Corrupting a chunk already verified is not seen again (each chunk is checked on first use only).
        with open(tmp_path / "snap" / "memory-0", "r+b") as file:
            file.seek(10)
            file.write(b"b")
        verifier.check(0, PAGE_SIZE)
    finally:
        os.close(fd)


# -- the Config, as the offload daemon reads it -----------------------------------------------------


def _config(*mappings: dict) -> dict:
    return {"vm_config": {}, "memory_manager_data": {"guest_ram_mappings": list(mappings)}}


def _slot(slot: int, gpa: int, size: int, file_offset: int = 0, **extra: object) -> dict:
    return {"slot": slot, "gpa": gpa, "size": size, "file_offset": file_offset, **extra}


def test_slot_mappings_read_only_the_four_fields() -> None:
    mappings = p.parse_slot_mappings(_config(_slot(0, 0, 3 << 30, zone_id="mem0", virtio_mem=False),
                                             _slot(1, 4 << 30, 1 << 30, 3 << 30)))
    assert mappings == [p.SlotMapping(0, 0, 3 << 30, 0), p.SlotMapping(1, 4 << 30, 1 << 30, 3 << 30)]


@pytest.mark.parametrize("config, message", [
    ({}, "no memory_manager_data"),
    (_config(), "non-empty list"),
    (_config(_slot(0, 0, 100)), "page-aligned"),
    (_config(_slot(0, 0, 0)), "size > 0"),
    (_config(_slot(0, 0, PAGE_SIZE, 1)), "page-aligned"),
    (_config(_slot(0, 0, 2 * PAGE_SIZE), _slot(1, PAGE_SIZE, PAGE_SIZE)), "overlap"),
    (_config(_slot(0, 0, PAGE_SIZE), _slot(0, PAGE_SIZE, PAGE_SIZE)), "same slot"),
    (_config(_slot(1 << 32, 0, PAGE_SIZE)), "slot as an integer"),
    (_config(_slot(0, -PAGE_SIZE, PAGE_SIZE)), "gpa as an integer"),
    (_config(_slot(0, (1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE)), "beyond 2\\^64"),
    (_config({"slot": 0, "gpa": 0, "size": True, "file_offset": 0}), "size as an integer"),
    (_config(*[_slot(i, i * PAGE_SIZE, PAGE_SIZE) for i in range(513)]), "more than 512"),
])
def test_bad_slot_mappings_are_refused(config: dict, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        p.parse_slot_mappings(json.loads(json.dumps(config)))


def test_every_slot_needs_exactly_one_memory_fd() -> None:
    mappings = [p.SlotMapping(0, 0, PAGE_SIZE, 0), p.SlotMapping(1, PAGE_SIZE, PAGE_SIZE, 0)]
    p.check_slots_covered(mappings, {0, 1})
    with pytest.raises(ProtocolError, match="no MemoryFd for slot 1"):
        p.check_slots_covered(mappings, {0})
    with pytest.raises(ProtocolError, match="slot 7, which the Config does not have"):
        p.check_slots_covered(mappings, {0, 1, 7})


def test_the_snapshot_daemon_refuses_memory_by_copy() -> None:
    p.check_offload_snapshot_request(p.Request.state(10))
    with pytest.raises(ProtocolError, match="only as MemoryFds"):
        p.check_offload_snapshot_request(p.Request.memory(16))


def test_a_target_holding_other_files_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    target = tmp_path / "snap"
    target.mkdir()
    (target / "disk.img").write_bytes(b"precious")
    with pytest.raises(SnapshotError, match="holds 'disk.img', which is not a snapshot file"):
        SnapshotWriter(target, is_snapshot_file)
    assert (target / "disk.img").read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["snap"]


def test_a_symlinked_target_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    writer = SnapshotWriter(tmp_path / "link", is_snapshot_file)
    writer.write_file("state.json", b"{}")
    writer.commit()
    assert (tmp_path / "link").is_symlink() and (real / "state.json").read_bytes() == b"{}"
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_a_hostile_snapshot_directory_gives_clear_errors(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / MANIFEST)  # opening a FIFO for reading would block forever
    with pytest.raises(SnapshotError, match="not a regular file"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST).unlink()
    (tmp_path / "state.json").mkdir()
    with pytest.raises(SnapshotError, match="not a regular file"):
        read_small_file(tmp_path / "state.json")
    (tmp_path / MANIFEST).write_bytes(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(SnapshotCorrupt, match="unreadable manifest"):
        Manifest.load(tmp_path)
