"""A smaller footprint (issue 16): what the supervisor does before it forks, so that its workers share it.

A forked worker shares every page the supervisor held at the fork until one of them writes to it. CPython
writes to objects it only reads (reference counts), and its collector writes to the header of every object it
examines, so without care a worker copies most of what it inherited within seconds. Hence:

1. `preload`: import what each worker imports (aiohttp's web layer, aiobotocore and botocore, diskcache and
   sqlite3, brotli, zstandard, ssl, uvloop) and parse botocore's S3 model once (origin.share_models), in the
   supervisor, instead of once per worker;
2. `malloc_arenas`: glibc gives each thread that allocates its own malloc arena (up to 8 per core), and a
   worker has about ten threads (the store's, the log writer, the compressor); what each arena keeps after
   a burst stays resident. Two arenas for the whole process, set here and inherited by every worker;
3. `freeze`: gc.freeze() right before each fork, so no collection in a worker (nor in the supervisor) examines
   those objects again. Each worker also freezes its own startup heap (hitpath.freeze_heap).

Measured with 2 workers (benchmarks/results/footprint.md): see there for each lever's figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import os

__all__ = ["MALLOC_ARENAS", "freeze", "malloc_arenas", "preload"]

MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's malloc.h


def preload() -> None:
    """Import what every worker will import, and parse the S3 model, in this (the supervisor's) process."""
    # serve_socket's own imports; create_app's pull in the rest (aiohttp.web, aiobotocore, diskcache...).
    from . import app, hitpath, origin, tls  # noqa: F401

    with contextlib.suppress(ImportError):  # the `fast` extra: workers.new_event_loop uses it when present
        importlib.import_module("uvloop")
    origin.share_models()
    malloc_arenas(MALLOC_ARENAS)


def malloc_arenas(most: int) -> bool:
    """glibc's M_ARENA_MAX (as MALLOC_ARENA_MAX=most would); False where malloc is not glibc's (musl, macOS).

    An environment variable would do the same, but only when set before the interpreter starts; mallopt
    works here because the supervisor has no other thread yet, and a fork copies the setting.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False  # the operator's own setting, read by glibc at start
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    return bool(mallopt(_M_ARENA_MAX, most))


def freeze() -> None:
    """Right before a fork: collect what is garbage now, then keep every survivor out of all later collections.

    Collected first because a frozen object is never freed: the supervisor freezes again before each
    generation it starts (reloads), and only what is alive then is kept.
    """
    gc.collect()
    gc.freeze()
