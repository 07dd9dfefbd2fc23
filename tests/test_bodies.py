"""Staging files: verification before commit, and crash leftovers removed without touching a sibling's."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from cachingproxy.bodies import new_staging, remove_leftovers
from cachingproxy.models import ObjectMeta


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
