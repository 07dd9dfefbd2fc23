"""spawn.py: workers forked by a zygote that loads what they need and exits, then adopted by the supervisor.

Run in a fresh interpreter each: becoming a subreaper and forking are process-wide, not for pytest's process."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux's")

_ADOPTED = """
import os, select, signal, sys
from cachingproxy.spawn import become_subreaper, fork_workers
assert become_subreaper()
me = os.getpid()
told_r, told_w = os.pipe()

def prepare():
    import json  # loaded by the zygote only: the workers have it, the supervisor does not
    os.write(told_w, b"prepared in %d\\n" % os.getpid())

def run(slot):
    os.write(told_w, b"slot %d pid %d parent %d json %d\\n" % (slot, os.getpid(), os.getppid(), "json" in sys.modules))
    if slot == 1:
        raise RuntimeError("a worker that fails exits 1")
    if slot == 2:
        raise SystemExit(3)
    if slot == 3:
        signal.pause()  # until killed

assert "json" not in sys.modules
print("said once")  # buffered (stdout is a pipe): flushed before the forks, or every process would write it
workers = fork_workers([0, 1, 2, 3], prepare, run, zygote=True)
assert sorted(workers) == [0, 1, 2, 3]
assert "json" not in sys.modules
os.kill(workers[3].pid, signal.SIGKILL)
for slot, worker in workers.items():
    select.select([worker.sentinel], [], [], 30)  # readable once that worker exited
    while worker.exitcode is None:  # the pipe closes a moment before the process can be reaped
        pass
print("exits", [workers[slot].exitcode for slot in range(4)])
os.close(told_w)
lines = os.read(told_r, 65536).decode().splitlines()
prepared = [line for line in lines if line.startswith("prepared")]
assert len(prepared) == 1 and prepared[0] != f"prepared in {me}", prepared
for line in lines:
    if line.startswith("slot"):
        assert line.endswith(f"parent {me} json 1"), line
said = {line.split()[1] for line in lines if line.startswith("slot")}
assert said in ({"0", "1", "2"}, {"0", "1", "2", "3"}), lines  # slot 3 may be killed before it says
try:
    os.waitpid(-1, os.WNOHANG)
except ChildProcessError:
    print("no child left: the zygote was reaped")
"""

_FAILED = """
import os
from cachingproxy.spawn import become_subreaper, fork_workers
assert become_subreaper()

def prepare():
    raise ImportError("a module the workers need is missing")

print("started", fork_workers([0, 1], prepare, lambda slot: None, zygote=True))
"""

_HUNG = """
import signal, time
from cachingproxy import spawn
assert spawn.become_subreaper()
spawn.ZYGOTE_TIMEOUT = 0.5
began = time.monotonic()
started = spawn.fork_workers([0], signal.pause, lambda slot: None, zygote=True)  # a load that never ends
print("started", started, "within", time.monotonic() - began < 30)
"""

_DIRECT = """
import os, select
from cachingproxy.spawn import fork_workers
me = os.getpid()
loaded = []
print("said once")
workers = fork_workers([0, 1], lambda: loaded.append(1), lambda slot: os._exit(10 + slot if os.getppid() == me else 99),
                       zygote=False)
for worker in workers.values():
    select.select([worker.sentinel], [], [], 30)
    while worker.exitcode is None:
        pass
print("prepared here", loaded, "exits", [workers[0].exitcode, workers[1].exitcode])
"""


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)


def test_workers_forked_by_a_zygote_are_adopted_and_report_their_exits() -> None:
    """What the zygote loads reaches the workers and not the supervisor; each worker's parent is the
    supervisor; exit codes and sentinels report as multiprocessing's did; the zygote leaves no child behind."""
    done = _run(_ADOPTED)
    assert done.returncode == 0, done.stderr
    assert "exits [0, 1, 3, -9]" in done.stdout and done.stdout.count("said once") == 1
    assert "no child left: the zygote was reaped" in done.stdout
    assert "RuntimeError: a worker that fails exits 1" in done.stderr


def test_a_zygote_that_cannot_load_starts_nothing_and_says_why() -> None:
    done = _run(_FAILED)
    assert done.returncode == 0, done.stderr
    assert "started {}" in done.stdout
    assert "could not start workers" in done.stderr and "a module the workers need is missing" in done.stderr


def test_a_zygote_that_hangs_is_killed_and_starts_nothing() -> None:
    done = _run(_HUNG)
    assert done.returncode == 0, done.stderr
    assert "started {} within True" in done.stdout
    assert "did not finish within 0 s: killed" in done.stderr


def test_without_a_zygote_the_caller_loads_and_forks() -> None:
    done = _run(_DIRECT)
    assert done.returncode == 0, done.stderr
    assert "prepared here [1] exits [10, 11]" in done.stdout and done.stdout.count("said once") == 1
