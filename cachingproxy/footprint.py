"""A smaller footprint (issue 16): what the supervisor does before it forks, so that its workers share it.

A forked worker shares every page the supervisor held at the fork until one of them writes to it. CPython
writes to objects it only reads (reference counts), and its collector writes to the header of every object it
examines, so without care a worker copies most of what it inherited within seconds. Hence:

1. `preload`: import what each worker imports (aiohttp's web layer, aiobotocore and botocore, diskcache and
   sqlite3, brotli, zstandard, ssl, uvloop) and parse botocore's S3 model once (origin.share_models), in the
   supervisor, instead of once per worker;
2. `freeze`: gc.freeze() right before each fork, so no collection in a worker (nor in the supervisor) examines
   those objects again. Each worker also freezes its own startup heap (hitpath.freeze_heap).

Measured with 2 workers (benchmarks/results/footprint.md): see there for each lever's figures.
"""

from __future__ import annotations

import contextlib
import gc
import importlib

__all__ = ["freeze", "preload"]


def preload() -> None:
    """Import what every worker will import, and parse the S3 model, in this (the supervisor's) process."""
    # serve_socket's own imports; create_app's pull in the rest (aiohttp.web, aiobotocore, diskcache...).
    from . import app, hitpath, origin, tls  # noqa: F401

    with contextlib.suppress(ImportError):  # the `fast` extra: workers.new_event_loop uses it when present
        importlib.import_module("uvloop")
    origin.share_models()


def freeze() -> None:
    """Right before a fork: collect what is garbage now, then keep every survivor out of all later collections.

    Collected first because a frozen object is never freed: the supervisor freezes again before each
    generation it starts (reloads), and only what is alive then is kept.
    """
    gc.collect()
    gc.freeze()
