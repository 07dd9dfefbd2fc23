"""Serving on every core: N worker processes on one port, one shared cache directory.

`run_workers(config, n)` binds one listening socket per worker with SO_REUSEPORT, so the kernel spreads new
connections across the workers by hash (no thundering herd, and no accept imbalance as with one shared
socket). Bind errors therefore surface once, in the supervisor, before anything forks. SO_REUSEPORT would
also let a second instance join the port: the supervisor first claims the port for its lifetime
(portlock.py), so a second instance fails with "Address already in use" as nginx does. Workers are forked
(not spawned), by a short-lived child of the supervisor that loads what they need and exits (spawn.py), so the
supervisor stays small: the config is already parsed and nothing has opened a loop, a thread or a file yet;
each worker then builds its own app, S3 client and diskcache connections. The supervisor forwards SIGTERM/SIGINT
once to every worker (as SIGTERM, like the signals the proxy does not handle, which it logs first:
stopsignals.py), restarts a worker that dies on its own, and exits 0 when all workers stopped cleanly;
workers die with it if it is killed. There is always a supervisor, even for one worker: it is what reloads.

Reload (SIGHUP to the supervisor), as nginx does it: the supervisor reads the file again and validates it
completely (reload.py); a bad file changes nothing. A good one gets a new generation of workers on new
SO_REUSEPORT sockets on the same port; once every one of them accepts, the old generation gets SIGTERM, stops
accepting and finishes its in-flight responses under the configuration they started with (within
[server] shutdown_timeout), while new connections already go to the new workers.

Misses stay single-flight across workers through filllocks.FillLocks (one lock file per key being filled).

This module is the supervisor; generation.py keeps track of one generation of workers and forks them, and
worker.py is what runs in each worker.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from types import FrameType

from .config import Config
from .generation import Generation, NoWorkers, Spawner, new_slab
from .portlock import claim_port
from .sdnotify import notify, watchdog_interval
from .spawn import become_subreaper
from .stopsignals import HANDLED_SIGNALS, RELOAD_SIGNAL, UNHANDLED_SIGNALS, exit_status, stop_reason
from .worker import BACKLOG, ServeFn, serve_socket

__all__ = [
    "bind_sockets",
    "default_workers",
    "resolve_workers",
    "run_workers",
]

log = logging.getLogger(__name__)

RESTART_WINDOW = 60.0  # a worker that died this many times within this many seconds is a crash loop: give up
RESTART_LIMIT = 5


def default_workers() -> int:
    """Cores this process may run on (the affinity mask, which honours taskset and cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(configured: int) -> int:
    """`[server] workers`: 0 means one per core."""
    return configured if configured > 0 else default_workers()


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


def run_workers(config: Config, n: int, *, serve: ServeFn = serve_socket, path: str | None = None) -> int:
    """Serve `config` with `n` processes (0: one per core); returns the exit status for the CLI.

    `path`: the configuration file, read again on SIGHUP (reload.py); None: SIGHUP is logged and ignored.
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
        return _supervise(config, socks, serve, f"{scheme}://{host}:{port}", path)
    finally:
        if claim is not None:
            claim.release()


def _banner(config: Config, url: str, n: int) -> str:
    sites = config.sites
    where = f"{sites[0].mount}/" if len(sites) == 1 else "/ (" + ", ".join(
        f"{site.name}: {' '.join(site.hosts) or 'any host'} {site.mount or '/'}" for site in sites) + ")"
    return f"cachingproxy: serving {url}{where} with {n} worker{'s' if n > 1 else ''} (pid {os.getpid()})"


def _supervise(config: Config, socks: list[socket.socket], serve: ServeFn, url: str, path: str | None) -> int:
    """Start one worker per socket, restart those that die, stop them all on SIGTERM/SIGINT, and on SIGHUP
    reload: a new generation of workers on the new configuration, then the old one stopped gracefully."""
    n = len(socks)
    adopts = become_subreaper()  # workers are then forked by a zygote that exits (spawn.py)
    # Each worker sends (generation, slot, True) once it accepts and (..., False) once it stopped accepting.
    ready_r, ready_w = multiprocessing.connection.Pipe(duplex=False)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # a signal handler's nudge to the loop below
    parent = os.getpid()
    current = Generation(0, config, new_slab(config, n))
    starting: Generation | None = None  # a reload's generation until every worker of it serves
    retiring: list[Generation] = []  # replaced, draining their in-flight responses
    retire_kill_at = float("inf")
    restarts: list[float] = []
    stopping = False
    failed = False
    stopped_by: int | None = None
    reload_asked = False
    kill_at = float("inf")
    first_ready = True
    reloaded = False  # a new generation took over; READY=1 once the old one stopped accepting

    def give_up() -> None:
        nonlocal failed, stopping, kill_at
        failed = stopping = True
        kill_at = time.monotonic() + grace()
        notify("STOPPING=1")
        stop_all()

    def every() -> list[Generation]:
        return [current, *([starting] if starting is not None else []), *retiring]

    def grace() -> float:
        # The longest drain any live worker was configured with: a reload may have raised shutdown_timeout,
        # and a worker drains by its own generation's setting, not by the one the proxy started with.
        return max(gen.config.server.shutdown_timeout for gen in every()) + 5.0

    def stop_all(signum: int = signal.SIGTERM) -> None:
        for gen in every():
            gen.signal(signum)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping, kill_at, stopped_by, reload_asked
        with contextlib.suppress(BlockingIOError):
            os.write(wake_w, b"x")
        if signum == RELOAD_SIGNAL:
            reload_asked = True  # acted on in the loop below, outside the handler
            return
        if not stopping:
            stopping = True
            stopped_by = signum
            kill_at = time.monotonic() + grace()
            (log.warning if signum in UNHANDLED_SIGNALS else log.info)(
                "%s: stopping %d workers (any still running in %.0f s are killed)", stop_reason(signum),
                len(current.procs), kill_at - time.monotonic())
            notify("STOPPING=1")
            stop_all()

    def begin_reload() -> Generation | None:
        """Validate the file; start the next generation on it, or log why not and keep the running one."""
        nonlocal retire_kill_at
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        if path is None:
            log.warning("SIGHUP received: no configuration file to read again; nothing changed")
            notify("READY=1")
            return None
        from .reload import load_for_reload  # here: only a reload needs it

        result = load_for_reload(path, current.config)
        if isinstance(result, list):
            for problem in result:
                log.error("reload: %s", problem)
            log.error("reload refused: %d problem%s; still serving the previous configuration", len(result),
                      "s" if len(result) > 1 else "")
            notify("READY=1")
            return None
        for kept in result.kept:
            log.warning("reload: %s is kept as it is; changing it needs a restart", kept)
        same_layout = tuple(s.name for s in result.config.sites) == tuple(s.name for s in current.config.sites)
        # The same sites lay the same counter cells over the slab: totals go on. Otherwise a new slab, and the
        # counters start again from zero, as at a restart.
        slab = current.slab if same_layout else new_slab(result.config, n)
        gen = Generation(current.number + 1, result.config, slab)
        log.info("reload: configuration %s is valid; starting %d new workers", result.digest, n)
        gen.starting = set(range(n))
        try:
            spawner.spawn(gen, list(range(n)))
        except NoWorkers as exc:
            log.error("reload failed: %s; still serving the previous configuration", exc)
            gen.signal(signal.SIGTERM)
            retiring.append(gen)
            retire_kill_at = time.monotonic() + grace()
            notify("READY=1")
            return None
        return gen

    previous = {signum: signal.signal(signum, on_signal) for signum in HANDLED_SIGNALS}
    # systemd's watchdog (WATCHDOG_USEC): pinged from this loop, which also restarts dead workers.
    ping = watchdog_interval()
    next_ping = time.monotonic()
    spawner = Spawner(serve, socks, parent, ready_w, adopts, watchdog=ping is not None)
    try:
        current.starting = set(range(n))
        try:
            spawner.spawn(current, list(range(n)))
        except NoWorkers as exc:
            log.error("%s: stopping", exc)
            give_up()
        while current.procs or starting is not None or retiring:
            wait = 1.0 if ping is None else max(0.0, min(1.0, next_ping - time.monotonic()))
            sentinels = [p.sentinel for gen in every() for p in gen.procs.values()]
            multiprocessing.connection.wait([ready_r, wake_r, *sentinels], timeout=wait)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 64)
            if ping is not None and time.monotonic() >= next_ping:
                notify("WATCHDOG=1")
                next_ping = time.monotonic() + ping
            while ready_r.poll():  # drained every time, or wait() would return at once forever
                number, slot, accepting = ready_r.recv()
                for gen in every():
                    if gen.number == number:
                        gen.starting.discard(slot)
                        (gen.listening.add if accepting else gen.listening.discard)(slot)
            if first_ready and not current.starting:
                first_ready = False
                # Printed once every worker has opened its cache and accepts: scripts and tests wait for it.
                banner = _banner(current.config, url, n)
                print(banner, flush=True)
                notify("READY=1\nSTATUS=" + banner.removeprefix("cachingproxy: "))  # systemd Type=notify
            if starting is not None and not starting.starting and not stopping:
                # Every new worker accepts: the old ones stop accepting and finish what they are sending.
                current.signal(signal.SIGTERM)
                retiring.append(current)
                retire_kill_at = time.monotonic() + grace()
                current, starting = starting, None
                reloaded = True
            if reloaded and not stopping and all(gen.quiet() for gen in retiring):
                # Only now does every new connection reach the new configuration.
                reloaded = False
                log.info("reload: done; %d workers on the new configuration, the previous ones finish their "
                         "responses", n)
                notify("READY=1\nSTATUS=" + _banner(current.config, url, n).removeprefix("cachingproxy: "))
            for gen in retiring[:]:
                for slot, proc in list(gen.procs.items()):
                    if proc.exitcode is not None:
                        del gen.procs[slot]
                        failed |= stopping and proc.exitcode not in (0, -signal.SIGTERM)
                if not gen.procs:
                    retiring.remove(gen)
            if retiring and time.monotonic() > retire_kill_at:
                log.error("previous workers still running %.0f s after a reload: killing them", grace())
                for gen in retiring:
                    gen.signal(signal.SIGKILL)
                retire_kill_at = float("inf")
            if starting is not None:
                died = [(slot, p.exitcode) for slot, p in starting.procs.items() if p.exitcode is not None]
                if died and not stopping:
                    log.error("reload failed: a new worker exited with %s while starting; still serving the "
                              "previous configuration", died[0][1])
                    starting.signal(signal.SIGTERM)
                    retiring.append(starting)
                    retire_kill_at = time.monotonic() + grace()
                    starting = None
                    notify("READY=1")
                elif stopping:
                    retiring.append(starting)
                    starting = None
            for slot, proc in list(current.procs.items()):
                if proc.exitcode is None:
                    continue
                del current.procs[slot]
                if stopping:
                    # -SIGTERM: the stop arrived before the worker had its handlers, i.e. while starting.
                    failed |= proc.exitcode not in (0, -signal.SIGTERM)
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
                if len(restarts) > RESTART_LIMIT:
                    log.error("worker %d exited with %s; %d restarts within %.0fs: stopping", slot,
                              proc.exitcode, RESTART_LIMIT, RESTART_WINDOW)
                    give_up()
                else:
                    log.error("worker %d (pid %s) exited with %s: restarting it", slot, proc.pid, proc.exitcode)
                    current.listening.discard(slot)
                    try:
                        spawner.spawn(current, [slot])
                    except NoWorkers as exc:
                        log.error("%s: stopping", exc)
                        give_up()
            if reload_asked and not stopping and starting is None and not retiring:
                # One reload at a time: the next waits until the previous generation has drained (the
                # leadership lock alternates between two files, one per live generation).
                reload_asked = False
                starting = begin_reload()
            if (current.procs or starting is not None or retiring) and time.monotonic() > kill_at:
                log.error("workers still running after the shutdown timeout: killing them")
                failed = True
                stop_all(signal.SIGKILL)
                kill_at = float("inf")
    finally:
        stop_all(signal.SIGKILL)  # only reached with workers left on an exception in this loop
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(wake_r)
        os.close(wake_w)
        for sock in socks:
            sock.close()
    return 1 if failed else exit_status(stopped_by)
