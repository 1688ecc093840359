"""Standard output for svidd's command lines: a reader that goes away early is not an error."""

from __future__ import annotations

import os
import sys

# What a shell reports for a process killed by SIGPIPE (128 + 13), as `yes | head` shows it.
CLOSED_BY_READER = 141


def flush_stdout() -> None:
    """Flush now, so a closed pipe shows up inside the CLI's error handling, not at exit.
    Nothing to flush where the process started without a stdout (`>&-`: sys.stdout is None)."""
    if sys.stdout is not None:
        sys.stdout.flush()


def stdout_closed_by_reader() -> int:
    """Call in ``except BrokenPipeError`` (`... | head` stopped reading): the exit code to return.

    Python flushes stdout again at exit and would print "Exception ignored ... BrokenPipeError";
    pointing the descriptor at /dev/null makes that last flush succeed quietly.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return CLOSED_BY_READER
