"""Bytes per first view of the sample site, by coding, and what making the variants costs.

    python benchmarks/compression.py > benchmarks/results/compression.md

Every compressible file of `cachingproxy/sample_site` (the types and 1 KiB floor of `[compression]`), compressed
by `variants.compress` (what the proxy stores) and, for comparison, by gzip at level 6 (nginx's `gzip on;
gzip_comp_level 6`, made on every response). Files under 1 KiB and other types count as identity in every column.
"""

from __future__ import annotations

import gzip
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from cachingproxy.config import COMPRESSIBLE_TYPES
from cachingproxy.encoding import compressible
from cachingproxy.variants import compress

SITE = Path(__file__).resolve().parents[1] / "cachingproxy" / "sample_site"
TYPES = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".json": "application/json",
         ".svg": "image/svg+xml", ".png": "image/png", ".zip": "application/zip"}
FIRST_VIEW = ("index.html", "_static/site.css", "_static/site.js", "_static/logo.svg", "_static/diagram.png")
COLUMNS = ("identity", "gzip -6 (nginx)", "gzip", "zstd", "br")


@dataclass(frozen=True)
class FirstView:
    """Bytes of each first-view file per column, their totals, and the seconds spent making each coding."""

    files: dict[str, dict[str, int]]
    totals: dict[str, int]
    seconds: dict[str, float]


def first_view() -> FirstView:
    """The sample site's first view in every column (run.py puts the totals in `make bench`'s table)."""
    files: dict[str, dict[str, int]] = {}
    totals = dict.fromkeys(COLUMNS, 0)
    seconds = dict.fromkeys(("gzip", "zstd", "br"), 0.0)
    for name in FIRST_VIEW:
        data = (SITE / name).read_bytes()
        sizes = {"identity": len(data)}
        if len(data) >= 1024 and compressible(TYPES[Path(name).suffix], COMPRESSIBLE_TYPES):
            sizes["gzip -6 (nginx)"] = len(gzip.compress(data, compresslevel=6))
            for coding in ("gzip", "zstd", "br"):
                started = time.perf_counter()
                sizes[coding] = len(compress(data, coding))
                seconds[coding] += time.perf_counter() - started
        files[name] = {column: sizes.get(column, len(data)) for column in COLUMNS}
        for column in COLUMNS:
            totals[column] += files[name][column]
    return FirstView(files, totals, seconds)


def main() -> None:
    view = first_view()
    print("| file | " + " | ".join(COLUMNS) + " |")
    print("| --- |" + " ---: |" * len(COLUMNS))
    for name, sizes in view.files.items():
        print(f"| `{name}` | " + " | ".join(str(sizes[c]) for c in COLUMNS) + " |")
    print("| **first view** | " + " | ".join(f"**{view.totals[c]}**" for c in COLUMNS) + " |")
    print()
    print("Time to make the variants of the first view, once per version: "
          + ", ".join(f"{c} {s * 1000:.1f} ms" for c, s in view.seconds.items()) + ".")
    # ~2 MB of text that does not repeat itself: page markup around unique hashes (real pages sit between).
    big = b"".join(f'<li><a href="p{i}.html">{hashlib.sha256(str(i).encode()).hexdigest()}</a></li>\n'.encode()
                   for i in range(24_000))
    for coding in ("gzip", "zstd", "br"):
        started = time.perf_counter()
        size = len(compress(big, coding))
        print(f"- {len(big) // 1024} KiB of text as {coding}: {size // 1024} KiB in "
              f"{(time.perf_counter() - started) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
