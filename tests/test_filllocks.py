"""Fill locks: a second filler of a key waits for the first and is told so; a stuck one costs only a timeout."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from cachingproxy.filllocks import FillLocks


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
