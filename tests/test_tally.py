"""Tally: counts made in forked worker processes add up in every worker's view."""

from __future__ import annotations

import os

import pytest

from cachingproxy.tally import Slab, Tally


def test_rows_written_in_forked_children_are_totalled_in_the_parent() -> None:
    slab = Slab(rows=3, width=16)
    tally = Tally(["hits", "misses"], slab, row=0)
    tally.add("hits", 5)
    children = []
    for row in (1, 2):
        pid = os.fork()
        if pid == 0:  # a worker: counts into its own row only, then exits without running pytest's teardown
            worker = Tally(["hits", "misses"], slab, row=row)  # as each worker builds its own over the slab
            for _ in range(1000):
                worker.add("hits")
            worker.add("misses", row)
            os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    assert tally.totals() == {"hits": 2005, "misses": 3}
    assert (tally.get("hits"), tally.get("misses")) == (5, 0)  # the parent's own row is untouched


def test_a_row_outside_the_slab_or_too_many_names_are_refused() -> None:
    with pytest.raises(ValueError):
        Tally(["hits"], Slab(rows=2, width=4), row=2)
    with pytest.raises(ValueError):
        Tally(["a", "b", "c"], Slab(rows=1, width=2))
