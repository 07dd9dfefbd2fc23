"""Fill locks: a second filler of a key waits for the first and is told so; a stuck one costs only a timeout."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from cachingproxy.filllocks import FillLocks
from cachingproxy.models import ObjectMeta


async def test_a_second_fill_waits_for_the_first(tmp_path: Path) -> None:
    first, second = FillLocks(tmp_path), FillLocks(tmp_path)  # as two workers would hold them
    order: list[str] = []
    async with first.hold("k") as flight:
        assert not flight.waited
        waiter = asyncio.create_task(_hold(second, "k", order))
        async with second.hold("other") as unrelated:
            assert not unrelated.waited, "locks are per key"
        await asyncio.sleep(0)
        order.append("first done")
    assert await waiter
    assert order == ["first done", "second holds"]
    assert os.listdir(tmp_path) == [], "lock files live only while their fill runs"


async def _hold(locks: FillLocks, key: str, order: list[str]) -> bool:
    async with locks.hold(key) as flight:
        order.append("second holds")
        return flight.waited


async def test_a_stuck_fill_elsewhere_costs_only_the_timeout(tmp_path: Path) -> None:
    stuck, other = FillLocks(tmp_path), FillLocks(tmp_path, timeout=0.05)
    async with stuck.hold("k"):
        async with asyncio.timeout(5):
            async with other.hold("k") as flight:
                assert flight.waited


async def test_a_published_fill_is_followed_and_its_end_seen(tmp_path: Path) -> None:
    filler, other = FillLocks(tmp_path), FillLocks(tmp_path)
    meta = ObjectMeta(etag='"e"', size=10, last_modified=1.5, headers=(("Content-Type", "text/plain"),))
    async with filler.hold("k") as flight:
        assert flight.follow is None
        filler.publish("k", "/staging/1-x.part", meta)
        async with asyncio.timeout(5), other.hold("k") as followed:
            assert followed.follow is not None and followed.waited
            assert (followed.follow.path, followed.follow.meta) == ("/staging/1-x.part", meta)
            assert not FillLocks.finished(followed.follow)
            done = followed.follow
        # `hold` closed its watch descriptor; a new look after the filler lets go sees the end.
    async with other.hold("k") as again:
        assert again.follow is None and not again.waited, "a record is never read from a free lock"
    assert done.path is not None


async def test_a_dead_fillers_record_is_not_followed(tmp_path: Path) -> None:
    """A record left in a lock file whose holder died is wiped by the next holder before anyone reads it."""
    first, second, third = FillLocks(tmp_path), FillLocks(tmp_path), FillLocks(tmp_path)
    meta = ObjectMeta(etag='"e"', size=10, last_modified=None)
    async with first.hold("k"):
        first.publish("k", "/old.part", meta)
        [lock] = os.listdir(tmp_path)
        left = (tmp_path / lock).read_bytes()
    (tmp_path / lock).write_bytes(left)  # as if its holder had died without unlinking it
    async with second.hold("k") as flight:
        assert flight.follow is None
        follower = asyncio.create_task(_followed_path(third, "k"))
        await asyncio.sleep(0)  # it looks at the lock file once before the record is written
        second.publish("k", "/new.part", meta)
        async with asyncio.timeout(5):
            assert await follower == "/new.part"


async def _followed_path(locks: FillLocks, key: str) -> str | None:
    async with locks.hold(key) as flight:
        assert flight.follow is not None
        return flight.follow.path
