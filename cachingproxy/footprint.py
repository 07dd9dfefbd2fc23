"""A smaller footprint (issue 16): what the zygote does before it forks the workers, so that they share it.

A forked worker shares every page the zygote held at the fork until one of them writes to it. CPython
writes to objects it only reads (reference counts), and its collector writes to the header of every object it
examines, so without care a worker copies most of what it inherited within seconds. Hence:

1. `preload`: import what each worker imports (aiohttp's web layer, aiobotocore and botocore, diskcache and
   sqlite3, brotli, zstandard, ssl, uvloop) and parse botocore's S3 model once (origin.share_models), in the
   zygote (spawn.py: the short-lived process that forks a batch of workers), instead of once per worker;
2. `tune_malloc`: glibc gives each thread that allocates its own malloc arena (up to 8 per core), and a
   worker has about ten threads (the store's, the log writer, the compressor); what each arena keeps after
   a burst stays resident. Two arenas for the whole process, set here and inherited by every worker. And
   glibc's mmap threshold is pinned: by default, freeing one large block raises it (up to 32 MiB), after
   which buffers of that size come from the heap, where one small allocation made after them keeps the heap
   from shrinking when they are freed (tests/test_footprint.py);
3. `freeze`: gc.freeze() right before each fork, so no collection in a worker examines those objects again
   (the supervisor freezes its own before it forks a zygote, for the same reason). Each worker also freezes
   its own startup heap (hitpath.freeze_heap).

Measured with 2 workers (benchmarks/results/footprint.md): see there for each lever's figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import os

__all__ = ["MALLOC_ARENAS", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "freeze", "preload", "tune_malloc"]

MALLOC_ARENAS = 2
# Blocks from this size up are mapped, and unmapped when freed. Above the 256 KiB that uvloop reads at a time,
# so a cold fill's pieces of S3's stream come from the heap and are reused: at glibc's 128 KiB start each was a
# fresh mapping, 64 page faults, and a cold 100 MiB cost the loop 0.09 s more (benchmarks/results/footprint.md).
MMAP_THRESHOLD = 320 * 1024
# Free memory at the heap's top beyond this goes back to the system. Fixed too (setting either fixes both), and
# above the MiB of pieces that the write-behind frees at once, so that a flush does not hand back pages that
# the next pieces fault in again: at 512 KiB a cold 100 MiB cost 0.05 s more CPU.
TRIM_THRESHOLD = 2 * 1024 * 1024
# glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
# The operator's own settings, read by glibc at start: any of them leaves malloc alone here.
_OPERATOR = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def preload() -> None:
    """Import what every worker will import, and parse the S3 model, in this process (the zygote)."""
    # serve_socket's own imports; create_app's pull in the rest (aiohttp.web, aiobotocore, diskcache...).
    from . import app, hitpath, origin, tls  # noqa: F401

    with contextlib.suppress(ImportError):  # the `fast` extra: worker.new_event_loop uses it when present
        importlib.import_module("uvloop")
    origin.share_models()
    tune_malloc()


def tune_malloc(arenas: int = MALLOC_ARENAS) -> bool:
    """glibc's M_ARENA_MAX, and its mmap and trim thresholds fixed (as the MALLOC_* variables would); False
    where malloc is not glibc's (musl, macOS) or the operator set any of those variables.

    Environment variables would do the same, but only when set before the interpreter starts; mallopt works
    here because the zygote has no other thread, and a fork copies the settings.
    """
    if any(name in os.environ for name in _OPERATOR):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    settings = ((_M_ARENA_MAX, arenas), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all(mallopt(param, value) for param, value in settings)


def freeze() -> None:
    """Right before a fork: collect what is garbage now, then keep every survivor out of all later collections.

    Collected first because a frozen object is never freed: the supervisor freezes again before each
    generation it starts (reloads), and only what is alive then is kept.
    """
    gc.collect()
    gc.freeze()
