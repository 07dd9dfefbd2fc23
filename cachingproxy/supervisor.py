"""The supervisor's loop (workers.py tells the story: restarts, stops, reload by generations).

`Supervisor` keeps what the loop knows as attributes: the generation serving, the one a reload is starting,
those draining, and what was asked (a stop, a reload) and found (a failure). Each turn of the loop waits for
something to happen, then runs a fixed sequence of short decisions, each a method reading and changing that
state; the order matters, and `_turn` is where it is written down. Signal handlers only note what was asked
and wake the loop, except that a stop signal forwards SIGTERM to every worker at once.
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
from .sdnotify import notify, watchdog_interval
from .spawn import Worker, become_subreaper
from .stopsignals import HANDLED_SIGNALS, RELOAD_SIGNAL, UNHANDLED_SIGNALS, exit_status, stop_reason
from .worker import ServeFn

__all__ = ["Supervisor"]

# The name the log lines carry (`%(name)s`) from before this module was split out of workers.py: operators
# filter on it.
log = logging.getLogger("cachingproxy.workers")

RESTART_WINDOW = 60.0  # a worker that died this many times within this many seconds is a crash loop: give up
RESTART_LIMIT = 5


def _banner(config: Config, url: str, n: int) -> str:
    sites = config.sites
    where = f"{sites[0].mount}/" if len(sites) == 1 else "/ (" + ", ".join(
        f"{site.name}: {' '.join(site.hosts) or 'any host'} {site.mount or '/'}" for site in sites) + ")"
    return f"cachingproxy: serving {url}{where} with {n} worker{'s' if n > 1 else ''} (pid {os.getpid()})"


def _ready(banner: str) -> None:
    notify("READY=1\nSTATUS=" + banner.removeprefix("cachingproxy: "))  # systemd Type=notify


class Supervisor:
    """Start one worker per socket, restart those that die, stop them all on SIGTERM/SIGINT, and on SIGHUP
    reload: a new generation of workers on the new configuration, then the old one stopped gracefully."""

    def __init__(self, config: Config, socks: list[socket.socket], serve: ServeFn, url: str,
                 path: str | None) -> None:
        self.n = len(socks)
        self.socks = socks
        self.url = url
        self.path = path  # read again on SIGHUP; None: nothing to reload
        adopts = become_subreaper()  # workers are then forked by a zygote that exits (spawn.py)
        # Each worker sends (generation, slot, True) once it accepts and (..., False) once it stopped accepting.
        self.ready_r, ready_w = multiprocessing.connection.Pipe(duplex=False)
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # a signal handler's nudge to the loop
        self.current = Generation(0, config, new_slab(config, self.n))
        self.starting: Generation | None = None  # a reload's generation until every worker of it serves
        self.retiring: list[Generation] = []  # replaced, draining their in-flight responses
        self.retire_kill_at = float("inf")
        self.restarts: list[float] = []
        self.stopping = False
        self.failed = False
        self.stopped_by: int | None = None
        self.reload_asked = False
        self.kill_at = float("inf")
        self.first_ready = True
        self.reloaded = False  # a new generation took over; READY=1 once the old one stopped accepting
        # systemd's watchdog (WATCHDOG_USEC): pinged from the loop, which also restarts dead workers.
        self.ping = watchdog_interval()
        self.next_ping = time.monotonic()
        self.spawner = Spawner(serve, socks, os.getpid(), ready_w, adopts, watchdog=self.ping is not None)

    def run(self) -> int:
        """Serve until no worker is left; the exit status for the CLI."""
        previous = {signum: signal.signal(signum, self._on_signal) for signum in HANDLED_SIGNALS}
        try:
            self.current.starting = set(range(self.n))
            self._spawn_current(list(range(self.n)))
            while self._live():
                self._turn()
        finally:
            self._stop_all(signal.SIGKILL)  # only reached with workers left on an exception in the loop
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(self.wake_r)
            os.close(self.wake_w)
            for sock in self.socks:
                sock.close()
        return 1 if self.failed else exit_status(self.stopped_by)

    def _turn(self) -> None:
        """One pass of the loop: wait, then every decision in the order they depend on each other."""
        self._wait()
        self._ping_watchdog()
        self._drain_ready()
        self._announce_first_ready()
        self._promote_started()
        self._announce_reload_done()
        self._reap_retiring()
        self._kill_overdue_retiring()
        self._check_starting()
        self._reap_current()
        self._start_asked_reload()
        self._kill_after_deadline()

    # What the loop acts on

    def _every(self) -> list[Generation]:
        return [self.current, *([self.starting] if self.starting is not None else []), *self.retiring]

    def _live(self) -> bool:
        return bool(self.current.procs or self.starting is not None or self.retiring)

    def _grace(self) -> float:
        # The longest drain any live worker was configured with: a reload may have raised shutdown_timeout,
        # and a worker drains by its own generation's setting, not by the one the proxy started with.
        return max(gen.config.server.shutdown_timeout for gen in self._every()) + 5.0

    def _stop_all(self, signum: int = signal.SIGTERM) -> None:
        for gen in self._every():
            gen.signal(signum)

    def _give_up(self) -> None:
        """Stop every worker and exit 1: workers cannot be started or keep dying."""
        self.failed = self.stopping = True
        self.kill_at = time.monotonic() + self._grace()
        notify("STOPPING=1")
        self._stop_all()

    def _retire(self, gen: Generation) -> None:
        """Tell `gen` to finish its responses and stop, and give it until the grace period ends."""
        gen.signal(signal.SIGTERM)
        self.retiring.append(gen)
        self.retire_kill_at = time.monotonic() + self._grace()

    def _spawn_current(self, slots: list[int]) -> None:
        """Fork `slots` of the serving generation; stop everything if some did not start."""
        try:
            self.spawner.spawn(self.current, slots)
        except NoWorkers as exc:
            log.error("%s: stopping", exc)
            self._give_up()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Wake the loop; a reload is only noted, the first stop signal forwards SIGTERM to every worker."""
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"x")
        if signum == RELOAD_SIGNAL:
            self.reload_asked = True  # acted on in the loop, outside the handler
            return
        if not self.stopping:
            self.stopping = True
            self.stopped_by = signum
            self.kill_at = time.monotonic() + self._grace()
            (log.warning if signum in UNHANDLED_SIGNALS else log.info)(
                "%s: stopping %d workers (any still running in %.0f s are killed)", stop_reason(signum),
                len(self.current.procs), self.kill_at - time.monotonic())
            notify("STOPPING=1")
            self._stop_all()

    # The loop's steps, in the order _turn runs them

    def _wait(self) -> None:
        """Sleep until a worker speaks or exits, a signal arrives, or the watchdog is due (1 s at most)."""
        wait = 1.0 if self.ping is None else max(0.0, min(1.0, self.next_ping - time.monotonic()))
        sentinels = [p.sentinel for gen in self._every() for p in gen.procs.values()]
        multiprocessing.connection.wait([self.ready_r, self.wake_r, *sentinels], timeout=wait)
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 64)

    def _ping_watchdog(self) -> None:
        """Tell systemd the supervisor is alive, when its watchdog is on and a ping is due."""
        if self.ping is not None and time.monotonic() >= self.next_ping:
            notify("WATCHDOG=1")
            self.next_ping = time.monotonic() + self.ping

    def _drain_ready(self) -> None:
        """Record which workers now accept, or stopped accepting, by what they sent on the pipe."""
        while self.ready_r.poll():  # drained every time, or wait() would return at once forever
            number, slot, accepting = self.ready_r.recv()
            for gen in self._every():
                if gen.number == number:
                    gen.starting.discard(slot)
                    (gen.listening.add if accepting else gen.listening.discard)(slot)

    def _announce_first_ready(self) -> None:
        """Print the banner and tell systemd READY=1, once, when every first worker accepts."""
        if self.first_ready and not self.current.starting:
            self.first_ready = False
            # Printed once every worker has opened its cache and accepts: scripts and tests wait for it.
            banner = _banner(self.current.config, self.url, self.n)
            print(banner, flush=True)
            _ready(banner)

    def _promote_started(self) -> None:
        """A reload's generation that fully accepts becomes the serving one; the old one retires."""
        if self.starting is not None and not self.starting.starting and not self.stopping:
            # Every new worker accepts: the old ones stop accepting and finish what they are sending.
            self._retire(self.current)
            self.current, self.starting = self.starting, None
            self.reloaded = True

    def _announce_reload_done(self) -> None:
        """Log the reload done and tell systemd READY=1 once no retiring worker accepts any more."""
        if self.reloaded and not self.stopping and all(gen.quiet() for gen in self.retiring):
            # Only now does every new connection reach the new configuration.
            self.reloaded = False
            log.info("reload: done; %d workers on the new configuration, the previous ones finish their "
                     "responses", self.n)
            _ready(_banner(self.current.config, self.url, self.n))

    def _reap_retiring(self) -> None:
        """Forget retiring workers that exited (a bad exit fails the stop) and generations with none left."""
        for gen in self.retiring[:]:
            for slot, proc in list(gen.procs.items()):
                if proc.exitcode is not None:
                    del gen.procs[slot]
                    self.failed |= self.stopping and proc.exitcode not in (0, -signal.SIGTERM)
            if not gen.procs:
                self.retiring.remove(gen)

    def _kill_overdue_retiring(self) -> None:
        """SIGKILL retiring workers still running after their grace period."""
        if self.retiring and time.monotonic() > self.retire_kill_at:
            log.error("previous workers still running %.0f s after a reload: killing them", self._grace())
            for gen in self.retiring:
                gen.signal(signal.SIGKILL)
            self.retire_kill_at = float("inf")

    def _check_starting(self) -> None:
        """Abandon a reload whose new worker died while starting; at a stop, retire the starting generation."""
        if self.starting is None:
            return
        died = [(slot, p.exitcode) for slot, p in self.starting.procs.items() if p.exitcode is not None]
        if died and not self.stopping:
            log.error("reload failed: a new worker exited with %s while starting; still serving the "
                      "previous configuration", died[0][1])
            self._retire(self.starting)
            self.starting = None
            notify("READY=1")
        elif self.stopping:
            self.retiring.append(self.starting)
            self.starting = None

    def _reap_current(self) -> None:
        """Forget serving workers that exited: at a stop a bad exit fails it, otherwise the worker restarts."""
        for slot, proc in list(self.current.procs.items()):
            if proc.exitcode is None:
                continue
            del self.current.procs[slot]
            if self.stopping:
                # -SIGTERM: the stop arrived before the worker had its handlers, i.e. while starting.
                self.failed |= proc.exitcode not in (0, -signal.SIGTERM)
                continue
            self._restart(slot, proc)

    def _restart(self, slot: int, proc: Worker) -> None:
        """Start `slot` again, unless that makes more than RESTART_LIMIT within RESTART_WINDOW: then stop."""
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
        if len(self.restarts) > RESTART_LIMIT:
            log.error("worker %d exited with %s; %d restarts within %.0fs: stopping", slot,
                      proc.exitcode, RESTART_LIMIT, RESTART_WINDOW)
            self._give_up()
        else:
            log.error("worker %d (pid %s) exited with %s: restarting it", slot, proc.pid, proc.exitcode)
            self.current.listening.discard(slot)
            self._spawn_current([slot])

    def _start_asked_reload(self) -> None:
        """Start the reload SIGHUP asked for, once no other is starting or draining and no stop is under way."""
        if self.reload_asked and not self.stopping and self.starting is None and not self.retiring:
            # One reload at a time: the next waits until the previous generation has drained (the
            # leadership lock alternates between two files, one per live generation).
            self.reload_asked = False
            self.starting = self._begin_reload()

    def _begin_reload(self) -> Generation | None:
        """Validate the file; start the next generation on it, or log why not and keep the running one."""
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        if self.path is None:
            log.warning("SIGHUP received: no configuration file to read again; nothing changed")
            notify("READY=1")
            return None
        from .reload import load_for_reload  # here: only a reload needs it

        result = load_for_reload(self.path, self.current.config)
        if isinstance(result, list):
            for problem in result:
                log.error("reload: %s", problem)
            log.error("reload refused: %d problem%s; still serving the previous configuration", len(result),
                      "s" if len(result) > 1 else "")
            notify("READY=1")
            return None
        for kept in result.kept:
            log.warning("reload: %s is kept as it is; changing it needs a restart", kept)
        same_layout = tuple(s.name for s in result.config.sites) == tuple(s.name for s in self.current.config.sites)
        # The same sites lay the same counter cells over the slab: totals go on. Otherwise a new slab, and the
        # counters start again from zero, as at a restart.
        slab = self.current.slab if same_layout else new_slab(result.config, self.n)
        gen = Generation(self.current.number + 1, result.config, slab)
        log.info("reload: configuration %s is valid; starting %d new workers", result.digest, self.n)
        gen.starting = set(range(self.n))
        try:
            self.spawner.spawn(gen, list(range(self.n)))
        except NoWorkers as exc:
            log.error("reload failed: %s; still serving the previous configuration", exc)
            self._retire(gen)
            notify("READY=1")
            return None
        return gen

    def _kill_after_deadline(self) -> None:
        """SIGKILL every worker still running after the shutdown deadline, and fail the stop."""
        if self._live() and time.monotonic() > self.kill_at:
            log.error("workers still running after the shutdown timeout: killing them")
            self.failed = True
            self._stop_all(signal.SIGKILL)
            self.kill_at = float("inf")
