"""portlock: one claim per port, naming the holder; released with the claim (or the process)."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from cachingproxy import portlock
from cachingproxy.portlock import PortClaim

from .conftest import free_port


@pytest.mark.parametrize("claim", [portlock._claim_abstract, portlock._claim_file], ids=["abstract", "file"])
def test_a_port_is_claimed_once_until_released(claim: Callable[[int], PortClaim], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the file fallback's lock files go here
    port = free_port()
    held = claim(port)
    with pytest.raises(OSError) as refused:
        claim(port)
    assert refused.value.errno == errno.EADDRINUSE
    assert refused.value.strerror == f"Address already in use (cachingproxy pid {os.getpid()} serves port {port})"
    other = claim(port + 1 if port < 65535 else port - 1)  # another port is another claim
    held.release()
    claim(port).release()
    other.release()
