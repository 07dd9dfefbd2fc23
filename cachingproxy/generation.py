"""A generation of workers: the processes the supervisor (supervisor.py) started on one configuration, and how a
batch of them is forked (through spawn.py's zygote) onto the supervisor's listening sockets.

The supervisor decides when to start, restart, retire or kill them; this module only keeps track of one
generation and starts the slots it is asked for.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from .config import Config
from .footprint import freeze, preload
from .sdnotify import notify
from .spawn import Worker, fork_workers
from .stopsignals import HANDLED_SIGNALS
from .tally import Slab
from .worker import ServeFn, serve_socket, worker_main

__all__ = ["Generation", "NoWorkers", "Spawner", "new_slab"]


class NoWorkers(Exception):
    """The zygote could not start every worker it was asked for (it logged why)."""


def _prepare() -> None:
    """In the zygote (without one, in the supervisor): what every worker loads, then kept from the collector
    so that the workers go on sharing it (footprint.py)."""
    preload()
    freeze()


def new_slab(config: Config, n: int) -> Slab:
    # Two rows per slot: the generation starting at a reload writes the rows the draining one does not.
    # Each site adds about a hundred cells (counters.cell_names, metrics.slots); Tally refuses to start if
    # they ever outgrow this.
    return Slab(rows=2 * n, width=1024 + 256 * len(config.sites))


class Generation:
    """The workers started on one configuration: slot -> process, and the slots not yet serving."""

    def __init__(self, number: int, config: Config, slab: Slab) -> None:
        self.number = number
        self.config = config
        self.slab = slab
        self.procs: dict[int, Worker] = {}
        self.starting: set[int] = set()
        self.listening: set[int] = set()  # slots accepting connections (said ready, not yet closed)

    def quiet(self) -> bool:
        """No worker of this generation accepts new connections any more."""
        return not (self.listening & {slot for slot, p in self.procs.items() if p.exitcode is None})

    def signal(self, signum: int) -> None:
        for proc in self.procs.values():
            if proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)


@dataclass(frozen=True, slots=True)
class Spawner:
    """What every worker the supervisor starts is given, whichever generation it belongs to."""

    serve: ServeFn
    socks: Sequence[socket.socket]  # one per slot, open in the supervisor for the proxy's lifetime
    parent: int  # the supervisor's pid: a worker dies with it
    ready: multiprocessing.connection.Connection  # where workers say they accept, then that they stopped
    adopts: bool  # a subreaper: a zygote forks the workers (spawn.py)
    watchdog: bool  # systemd's watchdog is on (sdnotify.watchdog_interval)

    def spawn(self, gen: Generation, slots: list[int]) -> None:
        """Fork the workers of `gen` for `slots`; raises NoWorkers when some of them did not start."""
        n = len(self.socks)

        # Each slot's listening socket stays open here for the proxy's lifetime and every generation's
        # worker for that slot accepts from it, as nginx's workers share the master's: at a reload old and
        # new workers both hold it, so when the old one closes its copy, connections waiting in the queue
        # are still there for the new one (closing the last copy of a socket resets its queue).
        def run(slot: int) -> None:
            worker_main(self.serve, gen.config, self.socks[slot], self.parent, slot, gen.slab,
                        (gen.number % 2) * n + slot, gen.number, self.ready)

        # Blocked across the forks so a signal can never find a worker the supervisor's loop does not know yet, nor
        # run the supervisor's handler in the zygote or a worker; a worker resets them, then unblocks.
        if self.watchdog:  # the supervisor's loop does not run until the zygote is done (spawn.ZYGOTE_TIMEOUT)
            notify("WATCHDOG=1")
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        if self.adopts:  # this process's own objects too: the zygote's collections would copy every page they are on
            freeze()
        try:
            started = fork_workers(slots, _prepare if self.serve is serve_socket else freeze, run,
                                   zygote=self.adopts)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        gen.procs.update(started)
        if len(started) < len(slots):
            raise NoWorkers(f"{len(slots) - len(started)} of {len(slots)} workers did not start (see above)")
