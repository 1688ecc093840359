"""A file of the agent's data directory, read only if it is a regular file.

Something else at its name (a directory, a FIFO, a socket, a device) is the operator's to mend,
and is refused at start with its path (DataFileUnreadableError): a directory was retried for
ever, or crashed the start with a traceback, and reading a FIFO hung the start for good.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent_attestor.errors import DataFileUnreadableError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)
_REMEDY = "make it a file this agent's user can read, or remove it"


def _refused(path: Path, what: str, problem: str) -> DataFileUnreadableError:
    return DataFileUnreadableError(f"{what}: cannot read {path}: {problem}; {_REMEDY}")


def regular_file(path: Path, what: str) -> bool:
    """Whether there is a file at `path` (following a link, as a read does); False when there
    is nothing there. Anything but a regular file: DataFileUnreadableError naming it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise _refused(path, what, exc.strerror or str(exc)) from None
    for test, kind in _KINDS:
        if test(mode):
            raise _refused(path, what, f"it is {kind}, not a regular file")
    return True


def read_data_file(path: Path, what: str) -> bytes | None:
    """The bytes of `path`; None when there is no file at the name. Anything else (not a regular
    file, a mode this user cannot read, an I/O error): DataFileUnreadableError naming it."""
    if not regular_file(path, what):
        return None
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None  # removed since the check
    except OSError as exc:
        raise _refused(path, what, exc.strerror or str(exc)) from None
