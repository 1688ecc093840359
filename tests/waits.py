"""Bounded polling, for a test that waits on real threads, sockets or processes: where a
condition can be polled, it is, rather than slept on for a guessed time."""

from __future__ import annotations

import time
from typing import Any


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns a truthy value, which is returned; TimeoutError naming
    `what` once `timeout` seconds have passed without one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
