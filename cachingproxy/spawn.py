"""How workers come to be: forked by a short-lived process that loaded what they need, then adopted.

A worker forked from the supervisor shares the supervisor's pages until either writes to one, and CPython 3.11
writes to most objects it only reads (reference counts, inline caches), so serving soon copies the code and data
a worker runs. The originals then stayed in the supervisor, which never runs that code: 28 of its 39 MiB of PSS
with 2 workers (benchmarks/results/footprint.md). So the supervisor imports only what supervising needs, and
each batch of workers is forked by a child of it, the zygote, which loads everything the workers need, forks
them and exits; the pages every worker copied go with it. The supervisor is a child subreaper (Linux's
PR_SET_CHILD_SUBREAPER): the workers become its children when the zygote exits, so it waits for them, restarts
them and collects their exit status as if it had forked them itself. Where there is no subreaper (not Linux)
the supervisor loads and forks, as it did before.

A worker's sentinel is the read end of a pipe whose write end only that worker holds: it becomes readable when
the worker exits, whoever forked it (the same trick as multiprocessing's sentinels).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import sys
import time
import traceback
import weakref
from collections.abc import Callable, Sequence

__all__ = ["ADOPTION_TIMEOUT", "ZYGOTE_TIMEOUT", "Worker", "become_subreaper", "die_with_parent", "fork_workers"]

log = logging.getLogger(__name__)

ADOPTION_TIMEOUT = 30.0  # seconds a new worker waits for its zygote to exit (a fork of the rest takes ms)
# Seconds a zygote may take to load and fork (about 1 s); then it is killed. The supervisor waits for it
# without running its loop, so this stays under deploy/'s WatchdogSec (30 s): it pings just before.
ZYGOTE_TIMEOUT = 20.0
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36  # linux/prctl.h


def _prctl(option: int, value: int) -> bool:
    """Linux's prctl(2); False where it failed or there is none."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(option, value)) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Make this process the one that orphaned descendants are given to (Linux 3.4+); False where it cannot."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(parent: int) -> None:
    """Linux: die when the supervisor dies, even by SIGKILL, as one process would.

    SIGKILL, not a graceful SIGTERM: a supervisor that vanished means the proxy crashed, and its restart
    must not share the port and the staging directory with orphans still finishing their fills.
    """
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


class Worker:
    """A worker this process waits for: its pid, a descriptor readable once it exited, and its exit code then
    (negative: the signal that killed it), None while it runs."""

    def __init__(self, pid: int, sentinel: int) -> None:
        self.pid = pid
        self.sentinel = sentinel
        self._exitcode: int | None = None
        weakref.finalize(self, os.close, sentinel)

    @property
    def exitcode(self) -> int | None:
        if self._exitcode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # not ours after all: nothing will ever report it, so count it gone
                self._exitcode = 255
            else:
                if pid:
                    self._exitcode = os.waitstatus_to_exitcode(status)
        return self._exitcode


def fork_workers(slots: Sequence[int], prepare: Callable[[], None], run: Callable[[int], None],
                 zygote: bool) -> dict[int, Worker]:
    """One process per slot running `run(slot)` (its exit status: 0 when it returns, 1 when it raises).

    `prepare` runs once before the forks, in the process that forks: the zygote when `zygote` (this process
    must be a subreaper, become_subreaper), else this one. Call with the signals this process handles blocked:
    neither the zygote nor a new worker must run this process's handlers. Returns the workers that started;
    fewer than `slots` means the zygote failed (it logged why).
    """
    _flush_std()
    pipes = {slot: os.pipe() for slot in slots}  # slot -> (sentinel, the end the worker keeps open)
    pids: dict[int, int] = {}
    try:
        if not zygote:
            prepare()
            sentinels = [sentinel for sentinel, _ in pipes.values()]
            for slot in slots:
                others = [held for other, (_, held) in pipes.items() if other != slot]
                pids[slot] = _fork_worker(slot, run, None, [*sentinels, *others])
        else:
            pids.update(_through_zygote(slots, pipes, prepare, run))
    finally:
        for slot, (sentinel, held) in pipes.items():
            os.close(held)
            if slot not in pids:
                os.close(sentinel)
    return {slot: Worker(pid, pipes[slot][0]) for slot, pid in pids.items()}


def _through_zygote(slots: Sequence[int], pipes: dict[int, tuple[int, int]], prepare: Callable[[], None],
                    run: Callable[[int], None]) -> dict[int, int]:
    told_r, told_w = os.pipe()  # the zygote writes "slot pid" per worker it forked
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            die_with_parent(supervisor)  # a supervisor killed while this loads must not leave workers behind
            os.close(told_r)
            for sentinel, _ in pipes.values():
                os.close(sentinel)
            prepare()
            for i, slot in enumerate(slots):
                later = [pipes[other][1] for other in slots[i + 1:]]
                worker = _fork_worker(slot, run, supervisor, [told_w, *later])
                os.close(pipes[slot][1])  # so that the next worker does not hold this one's end
                os.write(told_w, b"%d %d\n" % (slot, worker))
            status = 0
        except BaseException:
            log.exception("could not start workers")
        finally:
            os._exit(status)
    os.close(told_w)
    _await_zygote(pid)  # the workers it forked are this process's children from now on
    told = b""
    os.set_blocking(told_r, False)  # a worker may still hold the write end for a moment: read what is there
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(told_r, 4096):
            told += chunk
    os.close(told_r)
    return {int(slot): int(worker) for slot, worker in (line.split() for line in told.splitlines())}


def _await_zygote(pid: int) -> None:
    """Reap the zygote; kill it first if it has not finished within ZYGOTE_TIMEOUT (an import that hangs)."""
    with contextlib.suppress(OSError):
        exited = os.pidfd_open(pid)  # readable once it exited
        try:
            if not select.select([exited], [], [], ZYGOTE_TIMEOUT)[0]:
                log.error("the process starting workers did not finish within %.0f s: killed", ZYGOTE_TIMEOUT)
                os.kill(pid, signal.SIGKILL)
        finally:
            os.close(exited)
    os.waitpid(pid, 0)


def _fork_worker(slot: int, run: Callable[[int], None], adopter: int | None, close: Sequence[int]) -> int:
    """Fork the worker for `slot`; it closes `close` (the other workers' ends, which would keep their
    sentinels from ever reporting them) and waits to be adopted when `adopter` is given."""
    _flush_std()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        for fd in close:
            os.close(fd)
        if adopter is not None:
            _await_adoption(adopter)
        run(slot)
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException:
        traceback.print_exc()
    finally:
        _flush_std()
        os._exit(status)


def _flush_std() -> None:
    """Before a fork, and before a worker's os._exit: what is buffered is written once, by its own process
    (multiprocessing does the same)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _await_adoption(adopter: int) -> None:
    """Wait for the zygote to exit, which gives this process to `adopter`; exit if anyone else gets it.

    Polled: the zygote exits within milliseconds of its last fork, and no signal says a parent changed.
    """
    zygote = os.getppid()
    deadline = time.monotonic() + ADOPTION_TIMEOUT
    while (parent := os.getppid()) != adopter:
        if parent != zygote or time.monotonic() > deadline:  # the supervisor died: no one to serve for
            os._exit(1)
        time.sleep(0.002)
