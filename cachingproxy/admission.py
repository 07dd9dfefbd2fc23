"""Which keys a per-worker memo should admit: those seen twice (issue 16, a smaller footprint).

A memo of the hit path (a path's decoding, a version's negotiation) pays for itself on the second request
for the same thing. A stream of keys never asked for again (a crawler, a 404 scan, cold fills) would fill it
with one-off entries instead: an LRU bounded by a count of 1024 then takes minutes of such traffic to fill,
growing all the while (benchmarks/results/footprint.md, "Third round: growth"), and pushes the hot set out.
`SecondSight` is the doorkeeper of TinyLFU (Einziger, Friedman, Manes, ACM TOS 2017) in its simplest form, with
a fixed footprint like nginx's keys_zone: one table of hashes, allocated at the start, whatever comes.
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable

__all__ = ["SecondSight", "ThisSecond"]


class SecondSight:
    """`again(key)`: whether `key` was seen since its slot was last taken by another key. One 8-byte slot per
    hash bucket, so the table never grows; a collision only costs a memo entry (the two keys take turns)."""

    __slots__ = ("_mask", "_seen")

    def __init__(self, slots: int = 4096) -> None:
        if slots < 1 or slots & (slots - 1):
            raise ValueError("slots must be a power of two")
        self._mask = slots - 1
        self._seen = array("q", bytes(8 * slots))  # zeros: a key whose hash is 0 is simply admitted at once

    def again(self, key: Hashable) -> bool:
        h = hash(key)
        i = h & self._mask
        if self._seen[i] == h:
            return True
        self._seen[i] = h
        return False

    def seen(self, key: Hashable) -> bool:
        """`again` without taking note: for a look that is not a request of its own (one path tried twice)."""
        h = hash(key)
        return self._seen[h & self._mask] == h

    @property
    def nbytes(self) -> int:
        return self._seen.itemsize * len(self._seen)


class ThisSecond:
    """The second a memo's entries were made in. A memo keyed by heads that carry Age or the TTL left (new
    every second) is only ever asked again within its second: `turned(now)` says when it should be emptied."""

    __slots__ = ("_second",)

    def __init__(self) -> None:
        self._second = 0

    def turned(self, now: float) -> bool:
        """Whether `now` is in another second than the last call's (then it becomes the current one)."""
        second = int(now)
        if second == self._second:
            return False
        self._second = second
        return True
