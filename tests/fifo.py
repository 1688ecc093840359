"""A secret file reader handed a named pipe: it must refuse it, not wait for a writer."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

WAIT = 5.0


def make_fifo(path: Path) -> Path:
    os.mkfifo(path, 0o600)
    return path


def raised_without_blocking(read: Callable[[], object], fifo: Path) -> BaseException | None:
    """What `read()` raised (None: it returned), failing the test if it was still blocked
    after WAIT s; a blocked reader is released by a writer, so the test run goes on."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            read()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WAIT)
    if thread.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # lets the open return
        thread.join(WAIT)
        raise AssertionError(f"reading {fifo} blocked waiting for a writer")
    return outcome[0]
