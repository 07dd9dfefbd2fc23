"""One instance per port: a claim held for the instance's lifetime, so that a second one fails at start.

Every worker binds its own SO_REUSEPORT socket (workers.py), and the kernel lets any process of the same user
join that group: a second `cachingproxy serve` on the same port used to start, print "serving", and take
every other connection. The claim is an abstract-namespace Unix socket named after the port (Linux, unix(7)):
the kernel allows one socket per name, drops it when the process dies (even by SIGKILL: no stale lock file),
and scopes it to the network namespace, exactly as it scopes TCP ports. Elsewhere a lock file in the
temporary directory stands in for it.

The port, not the address, is claimed: 0.0.0.0:8080 and 127.0.0.1:8080 overlap, and both would bind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import sys
import tempfile
from typing import IO

__all__ = ["PortClaim", "claim_port"]

_UCRED = struct.Struct("3i")  # struct ucred {pid, uid, gid}, for SO_PEERCRED


class PortClaim:
    """Held while the instance serves `port`; `release()` (or process exit) frees it."""

    def __init__(self, port: int, handle: socket.socket | IO[bytes]) -> None:
        self.port = port
        self._handle = handle

    def release(self) -> None:
        self._handle.close()


def claim_port(port: int) -> PortClaim:
    """Claim `port` for this process. Raises OSError(EADDRINUSE) naming the holder's pid when one is known."""
    linux = sys.platform.startswith("linux")
    return _claim_abstract(port) if linux else _claim_file(port)


def _in_use(port: int, holder: int | None) -> OSError:
    who = f"cachingproxy pid {holder}" if holder else "another cachingproxy instance"
    return OSError(errno.EADDRINUSE, f"Address already in use ({who} serves port {port})")


def _claim_abstract(port: int) -> PortClaim:
    name = f"\0cachingproxy-port-{port}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(name)
        # Listening costs nothing and lets a second instance learn our pid through SO_PEERCRED; nobody accepts,
        # so a few refused instances fill the small backlog, after which they just cannot name the pid.
        sock.listen(8)
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise _in_use(port, _holder(name)) from None
    os.set_inheritable(sock.fileno(), False)  # not passed to anything exec'd; forked workers keep it, as they should
    return PortClaim(port, sock)


def _holder(name: str) -> int | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(name)
            pid, _, _ = _UCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:
            return None
    return pid or None


def _claim_file(port: int) -> PortClaim:
    import fcntl  # POSIX only; imported here so that the module loads anywhere

    handle = open(os.path.join(tempfile.gettempdir(), f"cachingproxy-port-{port}.lock"), "a+b")  # noqa: SIM115
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read(16).decode(errors="replace")
        handle.close()
        raise _in_use(port, int(holder) if holder.isdigit() else None) from None
    except BaseException:
        handle.close()
        raise
    with contextlib.suppress(OSError):
        handle.truncate(0)
        handle.write(str(os.getpid()).encode())
        handle.flush()
    return PortClaim(port, handle)
