"""Staging files: verification before commit, and crash leftovers removed without touching a sibling's."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from cachingproxy.bodies import FellBehind, Staging, new_staging, remove_leftovers
from cachingproxy.models import ObjectMeta
from cachingproxy.writebehind import WriteBehind
from cachingproxy.writer import room_to_make

from .conftest import until


def test_staging_reports_short_and_corrupt_bodies(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    meta = ObjectMeta(etag=f'"{hashlib.md5(data).hexdigest()}"', size=len(data), last_modified=None)
    good, short, bad = (new_staging(tmp_path, "k", meta) for _ in range(3))
    try:
        good.write(data)
        short.write(data[:-1])
        bad.write(data[:-1] + bytes([data[-1] ^ 1]))
        good.sync()
        assert good.problem() is None and good.pread(100, 9_950) == data[9_950:]
        assert short.problem() == f"length {len(data) - 1} != Content-Length {len(data)}"
        assert bad.problem() == "MD5 does not match the ETag"
    finally:
        for staging in (good, short, bad):
            staging.close()
            staging.discard_path()
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_dead_workers_go_and_a_live_siblings_stay(tmp_path: Path) -> None:
    sibling = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=True)
    try:
        live = tmp_path / f"{sibling.pid}-fill.part"
        gone = tmp_path / f"{int(dead.stdout)}-fill.part"
        mine = tmp_path / f"{os.getpid()}-fill.part"  # our own pid at start: a previous life's (pid reuse)
        odd = tmp_path / "half-written.part"
        for path in (live, gone, mine, odd):
            path.write_bytes(b"x")
        remove_leftovers(tmp_path)
        assert list(tmp_path.iterdir()) == [live]
    finally:
        sibling.communicate(b"")


def test_a_body_without_a_disk_keeps_only_its_window() -> None:
    data = os.urandom(100_000)
    staging = Staging(None, None, "k", ObjectMeta(etag='"e"', size=len(data), last_modified=None), window=30_000)
    for at in range(0, len(data), 10_000):
        staging.write(data[at : at + 10_000])
    assert staging.pread(10_000, 70_000) == data[70_000:80_000]
    assert staging.pread(5_000, 95_000) == data[95_000:]
    with pytest.raises(FellBehind):
        staging.pread(10_000, 60_000)
    assert staging.problem() is None and not staging.committable


def test_a_write_that_fails_mid_body_goes_on_in_memory(tmp_path: Path) -> None:
    data = os.urandom(50_000)
    staging = new_staging(tmp_path, "k", ObjectMeta(etag='"e"', size=len(data), last_modified=None))
    try:
        staging.write(data[:20_000])
        assert staging.fd is not None
        os.close(staging.fd)  # the next write fails (EBADF), as ENOSPC would
        staging.fd = os.open(os.devnull, os.O_RDONLY)
        staging.write(data[20_000:])
        assert staging.disk_error is not None and not staging.committable
        assert staging.pread(30_000, 20_000) == data[20_000:]
    finally:
        staging.close()
        staging.discard_path()


def test_a_flush_the_disk_takes_part_of_goes_on_in_memory_from_the_byte_it_stopped_at(tmp_path: Path) -> None:
    """Several chunks go to the file in one writev; when it takes only part of them (the disk filling up) the
    rest, from the very byte it stopped at, is kept in memory, and the digest still covers every byte."""
    data = os.urandom(3 * 40_000)
    meta = ObjectMeta(etag='"e"', size=len(data), last_modified=None)
    staging = new_staging(tmp_path, "k", meta)
    read_end, write_end = os.pipe()
    try:
        assert staging.fd is not None
        os.close(staging.fd)
        os.set_blocking(write_end, False)
        staging.fd = write_end  # a pipe takes 64 KiB, then refuses (EAGAIN), as a full disk would (ENOSPC)
        staging.check_crc32(zlib.crc32(data))
        for at in range(0, len(data), 40_000):
            staging.receive(data[at : at + 40_000])
        staging.flush()
        took = staging.on_disk
        assert 40_000 < took < 80_000 and isinstance(staging.disk_error, BlockingIOError)
        assert os.read(read_end, 1 << 20) == data[:took]
        assert staging.buffered(len(data), took) == data[took:80_000]
        assert staging.buffered(len(data), 80_000) == data[80_000:]
        assert staging.pending == 0 and staging.problem() is None and not staging.committable
    finally:
        staging.fd = None
        staging.close()
        staging.discard_path()
        os.close(read_end)
        os.close(write_end)


@pytest.mark.parametrize(("size", "volume", "limit", "free", "reserved", "evict"), [
    (10, 0, 100, 1000, 0, 0),  # room under both
    (10, 95, 100, 1000, 0, 5),  # the size limit first
    (10, 50, 1000, 5, 0, 5),  # the disk: evict what is missing of the free space
    (10, 50, 1000, 15, 10, 5),  # fills in flight have claimed part of the free space
    (101, 0, 100, 1000, 0, None),  # larger than the cache: never stored
    (60, 50, 1000, 5, 0, None),  # more than evicting everything would free
], ids=["fits", "limit", "disk", "reserved", "over-limit", "cannot-fit"])
def test_room_to_make(size: int, volume: int, limit: int, free: int, reserved: int, evict: int | None) -> None:
    assert room_to_make(size, volume=volume, limit=limit, free=free, reserved=reserved) == evict


async def test_write_behind_holds_at_most_its_limit_ahead_of_the_disk(tmp_path: Path) -> None:
    """The fill reads on from S3 while its writes are behind, readers find those bytes in memory, and past
    the limit the fill waits for the disk: memory does not grow with the object (writebehind.py)."""
    data = os.urandom(40 * 4096)
    staging = new_staging(tmp_path, "k", ObjectMeta(etag='"e"', size=len(data), last_modified=None))
    disk_free = asyncio.Event()

    async def slow_flush(s: Staging) -> None:
        await disk_free.wait()
        await asyncio.to_thread(s.flush)

    behind = WriteBehind(staging, slow_flush, limit=10 * 4096)
    try:
        for at in range(0, 10 * 4096, 4096):
            await behind.put(data[at : at + 4096])  # within the limit: never waits
        assert staging.on_disk == 0 and staging.buffered(4096, 5 * 4096) == data[5 * 4096 : 6 * 4096]
        stuck = asyncio.create_task(behind.put(data[10 * 4096 : 11 * 4096]))
        await until(lambda: staging.pending == 11 * 4096, "the put past the limit handed its chunk over")
        assert not stuck.done()
        disk_free.set()
        await stuck
        for at in range(11 * 4096, len(data), 4096):
            await behind.put(data[at : at + 4096])
            assert staging.pending <= 11 * 4096
        await behind.finish()
        assert staging.pending == 0 and staging.on_disk == len(data) and staging.pread(len(data), 0) == data
    finally:
        staging.close()
        staging.discard_path()


def test_staging_checks_s3s_crc32_instead_of_the_md5(tmp_path: Path) -> None:
    """A body S3 sent a whole-object CRC32 for is checked against it (on the flush thread), not the ETag's MD5:
    the CRC32 decides, whatever the ETag says (a multipart ETag is no MD5 at all)."""
    data = os.urandom(10_000)
    meta = ObjectMeta(etag='"0123456789abcdef0123456789abcdef"', size=len(data), last_modified=None)
    good, bad = (new_staging(tmp_path, "k", meta) for _ in range(2))
    try:
        good.check_crc32(zlib.crc32(data))
        bad.check_crc32(zlib.crc32(data))
        good.write(data[:4096])
        good.write(data[4096:])
        bad.write(data[:-1] + bytes([data[-1] ^ 1]))
        assert good.problem() is None
        assert bad.problem() == "CRC32 does not match S3's checksum"
    finally:
        for staging in (good, bad):
            staging.close()
            staging.discard_path()


async def test_write_behind_flushes_in_batches_and_a_stalled_tail_soon(tmp_path: Path) -> None:
    """One flush per batch, not per chunk (each costs the loop a task and an executor hand-off); bytes short of
    a batch still reach the file within FLUSH_DELAY when S3 stalls, for other workers following the file."""
    data = os.urandom(10 * 4096)
    staging = new_staging(tmp_path, "k", ObjectMeta(etag='"e"', size=len(data), last_modified=None))
    flushes = 0

    async def flush(s: Staging) -> None:  # done in one step of the loop, so each chunk had its chance
        nonlocal flushes
        flushes += 1
        s.flush()

    behind = WriteBehind(staging, flush, limit=8 * 4096, batch=4 * 4096)
    try:
        for at in range(0, 3 * 4096, 4096):
            await behind.put(data[at : at + 4096])
            await asyncio.sleep(0)  # a turn of the loop, in which a flush per chunk would have run
        assert flushes == 0 and staging.buffered(4096, 2 * 4096) == data[2 * 4096 : 3 * 4096]
        await until(lambda: staging.on_disk == 3 * 4096, "the stalled tail written after the delay")
        assert flushes == 1
        for at in range(3 * 4096, 7 * 4096, 4096):
            await behind.put(data[at : at + 4096])
            await asyncio.sleep(0)
        assert flushes == 2 and staging.on_disk == 7 * 4096  # at the batch, without the delay
        for at in range(7 * 4096, len(data), 4096):
            await behind.put(data[at : at + 4096])
        await behind.finish()
        assert staging.pending == 0 and staging.pread(len(data), 0) == data and flushes == 3
    finally:
        staging.close()
        staging.discard_path()


async def test_write_behind_ends_when_its_staging_is_closed_under_it(tmp_path: Path) -> None:
    """A fill cut off mid-body closes its staging with chunks still waiting for the disk; the write-behind
    must then find nothing pending, not start flush after flush that each find nothing to write."""
    staging = new_staging(tmp_path, "k", ObjectMeta(etag='"e"', size=3 * 4096, last_modified=None))
    disk_free = asyncio.Event()
    flushes = 0

    async def slow_flush(s: Staging) -> None:
        nonlocal flushes
        flushes += 1
        await disk_free.wait()
        await asyncio.to_thread(s.flush)

    behind = WriteBehind(staging, slow_flush, limit=4 * 4096, batch=4096)
    try:
        await behind.put(os.urandom(4096))
        await behind.put(os.urandom(4096))  # behind the flush in progress
        staging.close()
        disk_free.set()
        async with asyncio.timeout(10):
            await behind.finish()
        assert staging.pending == 0 and flushes <= 2
    finally:
        staging.close()
        staging.discard_path()
