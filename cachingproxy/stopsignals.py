"""Which signals stop the proxy, and the log line that says why: pure, for supervisor.py.

SIGTERM and SIGINT stop it gracefully by design. Every other signal whose default action would end the
process (signal(7)) used to do just that, without a word in the log: a stray SIGUSR1, SIGQUIT. Each of them
is logged with what arrived and why the proxy stops, and stops it as gracefully as SIGTERM; SIGHUP reloads
the configuration (RELOAD_SIGNAL, handled by the supervisor); the exit status is 128 plus the
signal number, as a death by that signal would report, so a supervisor that restarts on failure still does.
"""

from __future__ import annotations

import signal

__all__ = ["HANDLED_SIGNALS", "RELOAD_SIGNAL", "STOP_SIGNALS", "UNHANDLED_SIGNALS", "exit_status", "stop_reason"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL = signal.SIGHUP  # `systemctl reload`: read the configuration again (workers.py, reload.py)

_UNHANDLED_NAMES = {
    "SIGQUIT": "the proxy has no quit handling beyond a graceful stop",
    "SIGUSR1": "the proxy does not handle it",
    "SIGUSR2": "the proxy does not handle it",
    "SIGALRM": "the proxy does not handle it",
    "SIGVTALRM": "the proxy does not handle it",
    "SIGPROF": "the proxy does not handle it",
    "SIGIO": "the proxy does not handle it",
    "SIGPWR": "the power supply is failing",
    "SIGXCPU": "the CPU time limit (RLIMIT_CPU) was reached",
}
# Only those this platform has (SIGPWR is Linux's, for one).
UNHANDLED_SIGNALS: dict[signal.Signals, str] = {
    getattr(signal, name): why for name, why in _UNHANDLED_NAMES.items() if hasattr(signal, name)
}
HANDLED_SIGNALS: tuple[signal.Signals, ...] = (*STOP_SIGNALS, RELOAD_SIGNAL, *UNHANDLED_SIGNALS)


def stop_reason(signum: int) -> str:
    """What the log says when `signum` stops the proxy; the supervisor adds how many workers it stops."""
    sig = signal.Signals(signum)
    why = UNHANDLED_SIGNALS.get(sig)
    if why is None:
        return f"{sig.name} received"
    return f"{sig.name} received: {why}, so the proxy stops (gracefully, as for SIGTERM)"


def exit_status(signum: int | None) -> int:
    """0 after SIGTERM/SIGINT (or no signal); 128 + the number after a signal the proxy does not handle."""
    if signum is None or signal.Signals(signum) in STOP_SIGNALS:
        return 0
    return 128 + signum
