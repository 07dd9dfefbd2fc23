"""Serving on every core: N worker processes on one port, one shared cache directory.

`run_workers(config, n)` binds one listening socket per worker with SO_REUSEPORT, so the kernel spreads new
connections across the workers by hash (no thundering herd, and no accept imbalance as with one shared
socket). Bind errors therefore surface once, in the supervisor, before anything forks. SO_REUSEPORT would
also let a second instance join the port: the supervisor first claims the port for its lifetime
(portlock.py), so a second instance fails with "Address already in use" as nginx does. Workers are forked
(not spawned): the config is already parsed and nothing has opened a loop, a thread or a file yet; each
worker then builds its own app, S3 client and diskcache connections. The supervisor forwards SIGTERM/SIGINT
once to every worker (as SIGTERM, like the signals the proxy does not handle yet, which it logs first:
stopsignals.py), restarts a worker that dies on its own, and exits 0 when all workers stopped cleanly;
workers die with it if it is killed.

Misses stay single-flight across workers through filllocks.FillLocks (one lock file per key being filled).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from .config import Config
from .logsetup import logging_off_the_loop
from .portlock import claim_port
from .sdnotify import notify, watchdog_interval
from .stopsignals import HANDLED_SIGNALS, STOP_SIGNALS, UNHANDLED_SIGNALS, exit_status, stop_reason
from .tally import Slab

if TYPE_CHECKING:
    import asyncio


__all__ = [
    "bind_sockets",
    "default_workers",
    "new_event_loop",
    "resolve_workers",
    "run_workers",
    "serve_socket",
]

log = logging.getLogger(__name__)

BACKLOG = 1024  # per worker socket; aiohttp's default of 128 drops SYNs under a burst of new clients
RESTART_WINDOW = 60.0  # a worker that died this many times within this many seconds is a crash loop: give up
RESTART_LIMIT = 5
LEADER_LOCK = "admin.lock"  # in [cache] directory; see claim_leadership
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

# serve(config, socket, supervised, ready): blocks until stopped; calls ready() once it accepts connections.
ServeFn = Callable[[Config, socket.socket, bool, Callable[[], None]], None]

# The counters every worker adds to and /stats totals (tally.py): created by the supervisor before it forks,
# and this process's row in it, set in each worker. Module state because fork is how they travel.
_slab: Slab | None = None
_row = 0
_stopped_by: int | None = None  # the signal that stopped serve_socket, for the exit status of a single worker


def default_workers() -> int:
    """Cores this process may run on (the affinity mask, which honours taskset and cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(configured: int) -> int:
    """`[server] workers`: 0 means one per core."""
    return configured if configured > 0 else default_workers()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when the optional `fast` extra is installed, the standard one otherwise."""
    import asyncio  # here: the supervisor runs no loop, and asyncio (with ssl) was a third of its memory

    try:
        uvloop: Any = importlib.import_module("uvloop")
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def bind_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """`n` listening TCP sockets on one address with SO_REUSEPORT; port 0 picks one free port for all."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
            address = sock.getsockname()  # the real port, when 0 was asked for
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def serve_socket(config: Config, sock: socket.socket, supervised: bool, ready: Callable[[], None]) -> None:
    """Run the app on one pre-bound socket until SIGTERM (and SIGINT when not supervised); blocking.

    Unsupervised, the signals the proxy does not handle (stopsignals.py) stop it too, with a log line saying
    why; a supervised worker logs and ignores them: the supervisor decides for all workers.
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
        global _stopped_by
        if not stopping:
            stopping = True
            _stopped_by = signum
            if not supervised:  # a worker's SIGTERM comes from the supervisor, which logged why
                (log.warning if signum in UNHANDLED_SIGNALS else log.info)("%s", stop_reason(signum))
                notify("STOPPING=1")
            raise web.GracefulExit()

    def ignore(signum: int) -> None:
        log.warning("%s received by worker pid %d: ignored; signals are for the supervisor (pid %d)",
                    signal.Signals(signum).name, os.getpid(), os.getppid())

    if supervised:
        # Ctrl-C in a terminal reaches the whole process group; a supervised worker waits for the one
        # SIGTERM its supervisor forwards instead.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        loop.add_signal_handler(signal.SIGTERM, stop, signal.SIGTERM)
        for signum in UNHANDLED_SIGNALS:
            loop.add_signal_handler(signum, ignore, signum)
    else:
        for signum in HANDLED_SIGNALS:
            loop.add_signal_handler(signum, stop, signum)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # in case a caller left them blocked
    ping = watchdog_interval() if not supervised else None
    if ping is not None:
        # From the serving loop itself, so a loop that hangs stops the pings and systemd restarts the proxy.
        def watchdog() -> None:
            notify("WATCHDOG=1")
            loop.call_later(ping, watchdog)

        loop.call_soon(watchdog)
    # Held for the process's lifetime: the kernel releases it when the worker dies, and its successor takes it.
    leadership = claim_leadership(config.cache.directory)
    app = create_app(config, slab=_slab, row=_row, leader=leadership is not None,
                     check_bucket=leadership is not None)
    app.on_startup.append(freeze_heap)
    with logging_off_the_loop():
        # Each worker builds its own SSLContext (after fork): OpenSSL state is not for sharing across processes.
        web.run_app(app, sock=sock, ssl_context=proxy_context(config),
                    shutdown_timeout=config.server.shutdown_timeout,
                    print=lambda _: ready(), handle_signals=False, backlog=BACKLOG, loop=loop,
                    **server_kwargs(config))


def claim_leadership(directory: str) -> int | None:
    """Claim the duties that must run once per cache, not once per worker: the admin listener and mirror mode.

    With [server] workers > 1 every worker builds this app on the same cache directory. The first to flock
    LEADER_LOCK keeps its descriptor open for its lifetime; the kernel drops the lock if it dies, and the
    worker that replaces it takes the lock again. Returns the descriptor, -1 when there is no directory to
    coordinate through (acting alone), or None when another process holds the lock.
    """
    try:
        os.makedirs(directory, exist_ok=True)  # before the store opens it: workers elect before building the app
        fd = os.open(os.path.join(directory, LEADER_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _die_with_parent(parent: int) -> None:
    """Linux: die when the supervisor dies, even by SIGKILL, as one process would.

    SIGKILL, not a graceful SIGTERM: a supervisor that vanished means the proxy crashed, and its restart
    must not share the port and the staging directory with orphans still finishing their fills.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the supervisor died before prctl took effect
        os._exit(1)


def _worker_main(serve: ServeFn, config: Config, sock: socket.socket, parent: int, slot: int,
                 ready: multiprocessing.connection.Connection) -> None:
    for signum in STOP_SIGNALS:  # still blocked: the supervisor's handlers must not run in a worker
        signal.signal(signum, signal.SIG_DFL)
    for signum in UNHANDLED_SIGNALS:  # until `serve` logs them: a SIGHUP to the process group is the supervisor's
        signal.signal(signum, signal.SIG_IGN)
    # A stop signal before `serve` installs its handlers just ends the worker (nothing to drain yet).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    _die_with_parent(parent)
    global _row
    _row = slot
    serve(config, sock, True, lambda: ready.send(slot))


def run_workers(config: Config, n: int, *, serve: ServeFn = serve_socket) -> int:
    """Serve `config` with `n` processes (0: one per core); returns the exit status for the CLI.

    Raises OSError when the address cannot be bound (before any worker starts).
    """
    n = resolve_workers(n)
    server = config.server
    # Claimed before binding: a socket bound even for a moment joins the running instance's SO_REUSEPORT
    # group, and the connections the kernel queued on it would be reset when it closes.
    claim = claim_port(server.port) if server.port else None
    try:
        socks = bind_sockets(server.host, server.port, n)
        host, port = socks[0].getsockname()[:2]
        if claim is None:  # port 0: the kernel picked a free port; claimed all the same
            try:
                claim = claim_port(port)
            except OSError:
                for sock in socks:
                    sock.close()
                raise
        scheme = "https" if server.tls_certificate else "http"
        return _run(config, socks, serve, f"{scheme}://{host}:{port}")
    finally:
        if claim is not None:
            claim.release()


def _run(config: Config, socks: list[socket.socket], serve: ServeFn, url: str) -> int:
    n = len(socks)
    sites = config.sites
    where = f"{sites[0].mount}/" if len(sites) == 1 else "/ (" + ", ".join(
        f"{site.name}: {' '.join(site.hosts) or 'any host'} {site.mount or '/'}" for site in sites) + ")"
    banner = (f"cachingproxy: serving {url}{where} with {n} worker"
              f"{'s' if n > 1 else ''} (pid {os.getpid()})")

    def announce() -> None:
        # Printed once every worker has opened its cache and accepts: scripts and tests wait for this line.
        print(banner, flush=True)
        notify("READY=1\nSTATUS=" + banner.removeprefix("cachingproxy: "))  # systemd Type=notify: started

    if n == 1:
        # One worker needs no supervisor: serve in this process, with this process's signals.
        for sock in socks[1:]:
            sock.close()
        serve(config, socks[0], False, announce)
        return exit_status(_stopped_by)
    return _supervise(config, socks, serve, announce)


def _supervise(config: Config, socks: list[socket.socket], serve: ServeFn, announce: Callable[[], None]) -> int:
    global _slab
    # A restarted worker gets its slot back, and with it its row. Each site adds about a hundred cells
    # (counters.cell_names, metrics.slots); Tally refuses to start if they ever outgrow this.
    _slab = Slab(rows=len(socks), width=1024 + 256 * len(config.sites))
    ctx = multiprocessing.get_context("fork")
    ready_r, ready_w = ctx.Pipe(duplex=False)  # each worker sends its slot once it serves
    waiting_for = set(range(len(socks)))
    parent = os.getpid()
    address = socks[0].getsockname()
    workers: dict[int, multiprocessing.process.BaseProcess] = {}
    restarts: list[float] = []
    stopping = False
    failed = False
    stopped_by: int | None = None
    kill_at = float("inf")

    def spawn(slot: int, sock: socket.socket | None) -> None:
        if sock is None:
            sock = bind_sockets(address[0], address[1], 1)[0]
        # Blocked across fork so a signal can never find a worker the loop below does not know yet, nor
        # run the supervisor's handler inside a worker; the worker resets them, then unblocks.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            proc = ctx.Process(target=_worker_main, args=(serve, config, sock, parent, slot, ready_w),
                               name=f"cachingproxy-worker-{slot}")
            proc.start()
            workers[slot] = proc
        finally:
            # The worker owns its socket now; keeping a copy here would leave a listening socket that
            # nobody accepts on (its share of new connections would hang) if that worker died.
            sock.close()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def stop_all(signum: int = signal.SIGTERM) -> None:
        for proc in workers.values():
            if proc.pid is not None and proc.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping, kill_at, stopped_by
        if not stopping:
            stopping = True
            stopped_by = signum
            kill_at = time.monotonic() + config.server.shutdown_timeout + 5.0
            (log.warning if signum in UNHANDLED_SIGNALS else log.info)(
                "%s: stopping %d workers", stop_reason(signum), len(workers))
            notify("STOPPING=1")
            stop_all()

    previous = {signum: signal.signal(signum, on_signal) for signum in HANDLED_SIGNALS}
    # systemd's watchdog (WATCHDOG_USEC): pinged from this loop, which also restarts dead workers.
    ping = watchdog_interval()
    next_ping = time.monotonic()
    try:
        for slot, sock in enumerate(socks):
            spawn(slot, sock)
        while workers:
            wait = 1.0 if ping is None else max(0.0, min(1.0, next_ping - time.monotonic()))
            multiprocessing.connection.wait([ready_r, *(p.sentinel for p in workers.values())], timeout=wait)
            if ping is not None and time.monotonic() >= next_ping:
                notify("WATCHDOG=1")
                next_ping = time.monotonic() + ping
            while ready_r.poll():  # drained every time, or wait() would return at once forever
                slot = ready_r.recv()
                if waiting_for:
                    waiting_for.discard(slot)
                    if not waiting_for:
                        announce()
            for slot, proc in list(workers.items()):
                if proc.exitcode is None:
                    continue
                del workers[slot]
                if stopping:
                    # -SIGTERM: the stop arrived before the worker had its handlers, i.e. while starting.
                    failed |= proc.exitcode not in (0, -signal.SIGTERM)
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
                if len(restarts) > RESTART_LIMIT:
                    log.error("worker %d exited with %s; %d restarts within %.0fs: stopping", slot,
                              proc.exitcode, RESTART_LIMIT, RESTART_WINDOW)
                    failed = stopping = True
                    kill_at = now + config.server.shutdown_timeout + 5.0
                    stop_all()
                else:
                    log.error("worker %d (pid %s) exited with %s: restarting it", slot, proc.pid, proc.exitcode)
                    spawn(slot, None)
            if workers and time.monotonic() > kill_at:
                log.error("%d workers still running after the shutdown timeout: killing them", len(workers))
                failed = True
                stop_all(signal.SIGKILL)
                kill_at = float("inf")
    finally:
        stop_all(signal.SIGKILL)  # only reached with workers left on an exception in this loop
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 1 if failed else exit_status(stopped_by)
