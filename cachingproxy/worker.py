"""One worker process: the app on one pre-bound socket, on its own event loop, until the supervisor stops it.

The supervisor (workers.py, supervisor.py) binds the sockets, forks the workers through spawn.py and decides for
all of them; this module is what runs inside a worker once it is forked: `worker_main` resets the signals it
inherited and calls `serve` (by default `serve_socket`), which claims the once-per-cache duties
(`claim_leadership`), builds the app and runs it. What the supervisor tells a worker (its row in the shared
counters, its generation, how to say it stopped accepting) is a `Seat`, passed by argument: nothing is left in
module state for fork to copy.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import multiprocessing.connection
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import Config
from .logsetup import logging_off_the_loop
from .spawn import die_with_parent
from .stopsignals import HANDLED_SIGNALS, RELOAD_SIGNAL, STOP_SIGNALS, UNHANDLED_SIGNALS
from .tally import Slab

if TYPE_CHECKING:
    import asyncio


__all__ = [
    "BACKLOG",
    "Seat",
    "ServeFn",
    "claim_leadership",
    "new_event_loop",
    "serve_socket",
    "worker_main",
]

log = logging.getLogger(__name__)

BACKLOG = 1024  # per worker socket; aiohttp's default of 128 drops SYNs under a burst of new clients
LEADER_LOCK = "admin.lock"  # in [cache] directory; see claim_leadership
LEADER_LOCK_ODD = "admin.1.lock"  # the generations started by an odd number of reloads


@dataclass(frozen=True, slots=True)
class Seat:
    """A supervised worker's place among the others, given by the supervisor when it forks it."""

    slab: Slab  # the counters every worker adds to and /stats totals (tally.py), created before the fork
    row: int  # this worker's row in it
    generation: int  # which configuration it serves: 0 at start, +1 per reload (leadership alternates)
    closed: Callable[[], None]  # tells the supervisor it stopped accepting (a reload waits for that)


# serve(config, socket, seat, ready): blocks until stopped; calls ready() once it accepts connections.
ServeFn = Callable[[Config, socket.socket, Seat, Callable[[], None]], None]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when the optional `fast` extra is installed, the standard one otherwise."""
    import asyncio  # here: the supervisor runs no loop, and asyncio (with ssl) was a third of its memory

    try:
        uvloop: Any = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def serve_socket(config: Config, sock: socket.socket, seat: Seat, ready: Callable[[], None]) -> None:
    """Run the app on one pre-bound socket until the supervisor's SIGTERM; blocking.

    SIGINT is ignored, SIGHUP and the signals stopsignals.py names are logged and ignored: the supervisor
    decides for all workers.
    """
    from aiohttp import web  # here, like __main__: the supervisor never needs it

    from .app import create_app, server_kwargs
    from .hitpath import freeze_heap
    from .tls import proxy_context

    loop = new_event_loop()
    stopping = False

    def stop(signum: int) -> None:
        # Only the first signal stops: a second one raised during cleanup would cut the graceful
        # shutdown short (aiohttp's own handler stays armed until cleanup ends).
        nonlocal stopping
        if not stopping:  # no log line: the supervisor logged why it sent SIGTERM
            stopping = True
            raise web.GracefulExit()

    def ignore(signum: int) -> None:
        log.warning("%s received by worker pid %d: ignored; signals are for the supervisor (pid %d)",
                    signal.Signals(signum).name, os.getpid(), os.getppid())

    # Ctrl-C in a terminal reaches the whole process group; a worker waits for the one SIGTERM its supervisor
    # forwards instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop.add_signal_handler(signal.SIGTERM, stop, signal.SIGTERM)
    for signum in (RELOAD_SIGNAL, *UNHANDLED_SIGNALS):
        loop.add_signal_handler(signum, ignore, signum)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # in case a caller left them blocked
    # Held for the process's lifetime: the kernel releases it when the worker dies, and its successor takes it.
    leadership = claim_leadership(config.cache.directory, seat.generation)
    app = create_app(config, slab=seat.slab, row=seat.row, leader=leadership is not None,
                     check_bucket=leadership is not None)
    app.on_startup.append(freeze_heap)

    async def say_closed(app: web.Application) -> None:
        seat.closed()

    app.on_shutdown.append(say_closed)  # aiohttp runs it once the listening socket is closed
    with logging_off_the_loop():
        # Each worker builds its own SSLContext (after fork): OpenSSL state is not for sharing across processes.
        web.run_app(app, sock=sock, ssl_context=proxy_context(config),
                    shutdown_timeout=config.server.shutdown_timeout,
                    print=lambda _: ready(), handle_signals=False, backlog=BACKLOG, loop=loop,
                    **server_kwargs(config))


def claim_leadership(directory: str, generation: int = 0) -> int | None:
    """Claim the duties that must run once per cache, not once per worker: the admin listener and mirror mode.

    With [server] workers > 1 every worker builds this app on the same cache directory. The first to flock
    LEADER_LOCK keeps its descriptor open for its lifetime; the kernel drops the lock if it dies, and the
    worker that replaces it takes the lock again. Returns the descriptor, -1 when there is no directory to
    coordinate through (acting alone), or None when another process holds the lock.
    """
    try:
        os.makedirs(directory, exist_ok=True)  # before the store opens it: workers elect before building the app
        # At a reload the draining generation keeps its leader while the new one elects its own, on the
        # other of two lock files (supervisor.py runs one reload at a time).
        name = LEADER_LOCK if generation % 2 == 0 else LEADER_LOCK_ODD
        fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def worker_main(serve: ServeFn, config: Config, sock: socket.socket, parent: int, slot: int, slab: Slab,
                row: int, generation: int, ready: multiprocessing.connection.Connection) -> None:
    """A forked worker's first call: the supervisor's signal handling undone, then `serve` until stopped.

    It tells the supervisor through `ready` with (generation, slot, True) once it accepts and (..., False)
    once it stopped accepting.
    """
    for signum in STOP_SIGNALS:  # still blocked: the supervisor's handlers must not run in a worker
        signal.signal(signum, signal.SIG_DFL)
    for signum in (RELOAD_SIGNAL, *UNHANDLED_SIGNALS):  # until `serve` logs them: they are the supervisor's
        signal.signal(signum, signal.SIG_IGN)
    # A stop signal before `serve` installs its handlers just ends the worker (nothing to drain yet).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    die_with_parent(parent)  # now that it is the supervisor's child (spawn.py)
    seat = Seat(slab, row, generation, lambda: ready.send((generation, slot, False)))
    serve(config, sock, seat, lambda: ready.send((generation, slot, True)))
