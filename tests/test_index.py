"""The entry index against the pinned diskcache: the documented behaviours index.py relies on."""

from __future__ import annotations

import os
from pathlib import Path

import diskcache

from cachingproxy.index import EntryIndex
from cachingproxy.models import Entry, ObjectMeta


def _commit(index: EntryIndex, tmp_path: Path, key: str, data: bytes) -> Entry:
    entry = Entry(key=key, meta=ObjectMeta(etag=f'"{key}"', size=len(data), last_modified=None), checked_at=0.0)
    staged = tmp_path / f"{key}.part"
    staged.write_bytes(data)
    index.commit(entry, str(staged), len(data))
    assert not staged.exists(), "the staging file is moved into the cache, not copied"
    return entry


def _value_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.val"))


def test_a_committed_body_is_the_staging_file_itself(tmp_path: Path) -> None:
    index = EntryIndex(tmp_path / "db", 10_000_000)
    index.open()
    try:
        staged = tmp_path / "a.part"
        staged.write_bytes(os.urandom(70_000))
        inode = staged.stat().st_ino
        entry = Entry(key="a", meta=ObjectMeta(etag='"a"', size=70_000, last_modified=None), checked_at=0.0)
        index.commit(entry, str(staged), 70_000)
        [value] = _value_files(tmp_path / "db")
        assert value.stat().st_ino == inode
        assert index.entry("a") == entry
    finally:
        index.close()


def test_get_with_read_names_the_value_file(tmp_path: Path) -> None:
    """touch() relinks a body through the handle's `name`: diskcache's Disk.fetch opens the value by path."""
    index = EntryIndex(tmp_path / "db", 10_000_000)
    index.open()
    try:
        entry = _commit(index, tmp_path, "a", os.urandom(50_000))
        handle = index.body(entry)
        assert handle is not None
        with handle:
            assert Path(handle.name) == _value_files(tmp_path / "db")[0]
    finally:
        index.close()


def test_touch_renews_without_copying_or_leaking_files(tmp_path: Path) -> None:
    index = EntryIndex(tmp_path / "db", 10_000_000)
    index.open()
    try:
        data = os.urandom(80_000)
        entry = _commit(index, tmp_path, "a", data)
        reader = index.body(entry)
        assert reader is not None
        with reader:
            [before] = _value_files(tmp_path / "db")
            index.touch([("a", entry.meta.etag), ("gone", '"x"')])
            [after] = _value_files(tmp_path / "db")
            assert after != before and after.stat().st_ino == os.fstat(reader.fileno()).st_ino
            assert reader.read() == data, "a reader of the old name keeps its bytes"
        assert index.entry("a") == entry
        assert index.stats()[0] == 2  # still one entry row and one body row
    finally:
        index.close()


def test_an_unreadable_index_is_moved_aside(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "cache.db").write_bytes(b"not a database" * 100)
    index = EntryIndex(tmp_path / "db", 10_000_000)
    index.open()
    try:
        assert index.available and index.entry("a") is None
        assert [p.name.startswith("db.corrupt-") for p in tmp_path.iterdir() if p.name != "db"] == [True]
    finally:
        index.close()


def _resident_kib(path: Path) -> int:
    """Rss of this process's mappings of `path` (0 when it is not mapped)."""
    total, mapped = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's first line: address range, ..., path
                mapped = len(fields) > 5 and fields[5] == str(path)
            elif mapped and fields[0] == "Rss:":
                total += int(fields[1])
    return total


def test_reading_the_whole_index_leaves_none_of_it_in_the_workers_memory(tmp_path: Path) -> None:
    """diskcache maps up to 64 MiB of its SQLite file by default: a scan (the events sweep, a purge by prefix)
    or a crawl then leaves every page it read resident in each worker, which grows with the cache, not with the
    traffic. Reads go through SQLite's bounded page cache instead (a lookup costs the same, index.py)."""
    index = EntryIndex(tmp_path / "db", 100_000_000)
    index.open()
    try:
        keys = [f"page-{i}.html" for i in range(500)]
        for key in keys:
            _commit(index, tmp_path, key, b"x" * 100)
        assert len(index.keys("")) == len(keys)
        assert index.scans == 1  # every key read
        assert all(index.entry(key) is not None for key in keys)
        assert _resident_kib(tmp_path / "db" / "cache.db") == 0
    finally:
        index.close()


def _variant(index: EntryIndex, tmp_path: Path, entry: Entry, coding: str) -> None:
    staged = tmp_path / f"{entry.key}.{coding}.part"
    staged.write_bytes(b"compressed")
    assert index.put_variant(entry.key, entry.meta.etag, coding, str(staged), 10)


def test_stats_counts_objects_without_reading_every_key(tmp_path: Path) -> None:
    """/stats and /metrics ask every few seconds. Compressed variants are rows but not objects: they are
    counted by their tag, not by reading every key (14 s for 100k objects), which stats did after every change
    to the index, so a dashboard on a filling cache paid a full scan per refresh."""
    index = EntryIndex(tmp_path / "db", 100_000_000)
    index.open()
    try:
        for i in range(3):
            entry = _commit(index, tmp_path, f"k{i}", b"x" * 100)
            _variant(index, tmp_path, entry, "br")
            _variant(index, tmp_path, entry, "gzip")
        assert index.stats()[0] == 6  # an entry row and a body row per object
        _commit(index, tmp_path, "k3", b"y" * 100)
        assert index.stats()[0] == 8
        assert index.purge_prefix("k0") == 1  # its variants go with it
        assert index.stats()[0] == 6
        assert index.scans == 1  # the purge's: stats read no key
    finally:
        index.close()


def test_variants_stored_before_they_were_tagged_are_dropped_once(tmp_path: Path) -> None:
    """An index written before variants carried their tag: stats would count those variants as objects, so
    the first open drops them (they are made again from their body when asked for), and no later open does."""
    directory = tmp_path / "db"
    index = EntryIndex(directory, 100_000_000)
    index.open()
    entry = _commit(index, tmp_path, "a", b"x" * 100)
    index.close()
    (directory / "variants-tagged").unlink()
    with diskcache.Cache(str(directory)) as older:  # what an older version stored: no tag
        older.set(("variant", "a", entry.meta.etag, "br"), b"compressed")
    index.open()
    try:
        assert index.variants("a", entry.meta.etag) == frozenset()
        assert index.stats()[0] == 2
        assert index.entry("a") == entry
        _variant(index, tmp_path, entry, "gzip")
    finally:
        index.close()
    index.open()
    try:
        assert index.variants("a", entry.meta.etag) == frozenset({"gzip"})
        assert index.stats()[0] == 2
    finally:
        index.close()
