"""A listener's backlog filled, as a running daemon's is when its loop is stalled under a burst
of callers."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


def fill_backlog(path: Path) -> list[socket.socket]:
    """Connect to the listener at `path` (made with listen(0), never accepting) until the next
    connect is refused for a full backlog; the callers, for the test to close. Skips the test
    where the backlog does not fill."""
    callers: list[socket.socket] = []
    for _ in range(64):  # bounded: listen(0) takes one connection, Linux's backlog at most
        caller = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        caller.setblocking(False)
        callers.append(caller)
        try:
            caller.connect(str(path))
        except BlockingIOError:
            return callers
    for caller in callers:
        caller.close()
    pytest.skip("the listener's backlog did not fill")
