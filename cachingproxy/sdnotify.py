"""systemd's notify protocol (sd_notify(3)) without a dependency: one datagram per state change to the Unix
socket named by NOTIFY_SOCKET. READY=1 once every worker listens, STOPPING=1 at shutdown, WATCHDOG=1 every
half WATCHDOG_USEC. Only the main process speaks (systemd's default NotifyAccess=main ignores the others).
Without NOTIFY_SOCKET (not under systemd's Type=notify) every call does nothing."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["notify", "watchdog_interval"]

log = logging.getLogger(__name__)


def notify(message: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Send `message` ("READY=1", "STOPPING=1", ...); False when there is no socket or it cannot be reached.

    Never raises: a service manager that went away must not take the proxy with it.
    """
    path = environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket (sd_notify(3))
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("cannot notify the service manager at NOTIFY_SOCKET: %s", exc.strerror or exc)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises; None when
    the watchdog is off or meant for another process (WATCHDOG_PID)."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 2_000_000
