"""Counters that every worker process adds to and any worker can total.

With `[server] workers = N` a request for /stats or /metrics lands on one worker (SO_REUSEPORT picks it), yet
it must report the whole proxy. The supervisor creates one `Slab` before forking: a shared anonymous
mapping holding one row of 64-bit cells per worker. Each worker writes only its own row, so no cross-process
lock is needed; a reader sums the rows. A worker that restarts keeps adding to its row, so totals never go
backwards when a worker dies.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterable

__all__ = ["Slab", "Tally"]

_CELL = 8  # bytes: one signed 64-bit counter


class Slab:
    """The shared memory behind a Tally: `rows` rows of `width` cells, created before the workers fork.

    It knows no names, so the supervisor need not import what the workers count; each worker lays the
    same names over it in the same order (`Tally`).
    """

    def __init__(self, rows: int, width: int = 1024) -> None:
        self.rows = rows
        self.width = width
        # mmap(-1, ...) is MAP_SHARED | MAP_ANONYMOUS: a child forked after this sees the same pages.
        self._map = mmap.mmap(-1, rows * width * _CELL)
        self.cells = memoryview(self._map).cast("q")


class Tally:
    """Named integer cells over one row of a Slab; `add`/`get` work on this process's row, `totals` on all."""

    def __init__(self, names: Iterable[str], slab: Slab | None = None, row: int = 0) -> None:
        self._index = {name: i for i, name in enumerate(dict.fromkeys(names))}
        self._slab = slab if slab is not None else Slab(1, max(1, len(self._index)))
        if len(self._index) > self._slab.width:
            raise ValueError(f"{len(self._index)} names do not fit a slab {self._slab.width} cells wide")
        if not 0 <= row < self._slab.rows:
            raise ValueError(f"row {row} outside 0..{self._slab.rows - 1}")
        self._cells = self._slab.cells
        self._base = row * self._slab.width
        # Executor threads (cache write errors) and the loop add to the same row: `+=` on a cell is a read
        # and a write, so within a process it takes this lock. Rows are never shared between processes.
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        cell = self._base + self._index[name]
        with self._lock:
            self._cells[cell] += amount

    def cell(self, name: str) -> int:
        """A name's cell in this row, for add_cells (callers on a hot path look names up once)."""
        return self._base + self._index[name]

    def add_cells(self, cells: tuple[int, ...], amounts: tuple[int, ...]) -> None:
        """Several adds under one lock, by cell (`cell`): what a hit counts, in one go."""
        data = self._cells
        with self._lock:
            for cell, amount in zip(cells, amounts, strict=True):
                data[cell] += amount

    def set(self, name: str, value: int) -> None:
        """A gauge in this worker's row (events.py: the consumer's health lease)."""
        with self._lock:
            self._cells[self._base + self._index[name]] = value

    def highest(self, name: str) -> int:
        """The largest value of one cell over all workers' rows: cheap enough for every request."""
        cells, width, i = self._cells, self._slab.width, self._index[name]
        return max(cells[row * width + i] for row in range(self._slab.rows))

    def get(self, name: str) -> int:
        """This worker's own count."""
        return int(self._cells[self._base + self._index[name]])

    def totals(self) -> dict[str, int]:
        """Every name summed over all workers."""
        cells, width, rows = self._cells, self._slab.width, self._slab.rows
        return {name: sum(cells[row * width + i] for row in range(rows)) for name, i in self._index.items()}
