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

This module binds and claims the port, then runs the supervisor's loop (supervisor.py) until every worker has
exited; generation.py keeps track of one generation of workers and forks them, and worker.py is what runs in
each worker.
"""

from __future__ import annotations

import os
import socket

from .config import Config
from .portlock import claim_port
from .supervisor import Supervisor
from .worker import BACKLOG, ServeFn, serve_socket

__all__ = [
    "bind_sockets",
    "default_workers",
    "resolve_workers",
    "run_workers",
]


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
        return Supervisor(config, socks, serve, f"{scheme}://{host}:{port}", path).run()
    finally:
        if claim is not None:
            claim.release()

