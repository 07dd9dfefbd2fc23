"""The benchmark's docs corpus: small HTML/CSS/JS pages (2-30 KB) and two kinds of large download.

Deterministic (seeded), so every run and every target sees the same bytes. Imported by run.py. Every small
object is a compressible type above the proxy's 1 KiB floor, so each hot key has br/zstd/gzip variants for the
compressed-hit row; the text repeats a small vocabulary, so it compresses better than real pages (br about 1/6).
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["BUCKET", "Corpus", "make_corpus", "seed"]

BUCKET = "docs-bench"
_KINDS = (
    ("html", "text/html; charset=utf-8", 0.6),
    ("css", "text/css; charset=utf-8", 0.2),
    ("js", "text/javascript; charset=utf-8", 0.2),
)
_WORDS = ("cache", "proxy", "bucket", "object", "request", "latency", "origin", "header", "etag", "range", "stale",
          "fresh", "disk", "sendfile", "worker", "process", "socket", "config", "deploy", "office", "mirror", "docs",
          "guide", "api", "reference", "index", "page")


@dataclass(frozen=True)
class Corpus:
    hot: tuple[str, ...]  # small keys requested over and over
    cold: tuple[str, ...]  # small keys each requested once per target, never warmed
    big10: str  # one 10 MiB object, served hot
    big100: str  # 100 MiB, fetched cold once per target (time to last byte)
    big100_fanout: str  # 100 MiB, pulled by 32 clients at once, cold at first (peak RSS)
    sizes: dict[str, int]


def _text(rng: random.Random, kind: str, size: int) -> bytes:
    words = []
    total = 0
    while total < size:
        w = rng.choice(_WORDS)
        words.append(w)
        total += len(w) + 1
    body = " ".join(words)
    if kind == "html":
        doc = f"<!doctype html><html><head><title>t</title></head><body><p>{body}</p></body></html>\n"
    elif kind == "css":
        doc = f"/* {body} */\nbody {{ margin: 0 }}\n"
    else:
        doc = f"// {body}\nexport const ready = true;\n"
    return doc.encode()[:size]


def make_corpus(hot: int = 300, cold: int = 60, seed_value: int = 6) -> tuple[Corpus, dict[str, tuple[bytes, str]]]:
    """The key lists plus {key: (body, content type)} for the small objects (the large ones are made by seed())."""
    rng = random.Random(seed_value)
    objects: dict[str, tuple[bytes, str]] = {}
    keys: list[str] = []
    for i in range(hot + cold):
        ext, ctype, _ = rng.choices(_KINDS, weights=[k[2] for k in _KINDS])[0]
        folder = {"html": "guide", "css": "_static/css", "js": "_static/js"}[ext]
        key = f"{folder}/section-{i // 40:02d}/item-{i:04d}.{ext}"
        objects[key] = (_text(rng, ext, rng.randint(2 * 1024, 30 * 1024)), ctype)
        keys.append(key)
    rng.shuffle(keys)
    sizes = {k: len(v[0]) for k, v in objects.items()}
    big = {"downloads/manual-10m.bin": 10 << 20, "downloads/archive-100m.bin": 100 << 20,
           "downloads/dataset-100m.bin": 100 << 20}
    sizes.update(big)
    big10, big100, fanout = big
    corpus = Corpus(hot=tuple(keys[:hot]), cold=tuple(keys[hot:]), big10=big10, big100=big100,
                    big100_fanout=fanout, sizes=sizes)
    return corpus, objects


def _blob(size: int, salt: int) -> bytes:
    # Random bytes, so no layer can win by compressing; randbytes is fast enough for 210 MiB.
    return random.Random(salt).randbytes(size)


def seed(client: Any, corpus: Corpus, objects: dict[str, tuple[bytes, str]]) -> None:
    """Create the bucket and upload everything straight to moto (not through the shim: counts stay clean).

    Objects are public-read because nginx and the direct fetch send unsigned GETs, which moto refuses on
    private objects (an nginx in front of a private bucket would need a signing module; out of scope here).
    """
    client.create_bucket(Bucket=BUCKET)

    def put(item: tuple[str, tuple[bytes, str]]) -> None:
        key, (body, ctype) = item
        client.put_object(Bucket=BUCKET, Key=key, Body=body, ContentType=ctype, ACL="public-read")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, objects.items()))
    for salt, key in enumerate((corpus.big10, corpus.big100, corpus.big100_fanout)):
        body = _blob(corpus.sizes[key], salt)
        client.put_object(Bucket=BUCKET, Key=key, Body=body, ContentType="application/octet-stream",
                          ACL="public-read")
