"""A file of the agent's data directory, read only if it is a regular file of the agent's own.

Something else at its name (a directory, a FIFO, a socket, a device, a symbolic link) is the
operator's to mend, and is refused at start with its path (DataFileUnreadableError): a
directory was retried for ever, or crashed the start with a traceback, and reading a FIFO hung
the start for good. The agent writes these files itself, by rename, never as links: a link at
one of their names was put there by someone else, and is not followed to what it names.
"""

from __future__ import annotations

from pathlib import Path

from agent_attestor.errors import DataFileUnreadableError
from svid._small_file import SmallFileError, check_regular_file, read_small_file

# Far above any of them (a trust bundle of a few hundred roots is under 1 MiB): a bigger file
# is not one the agent wrote, and is not read into memory whole.
MAX_BYTES = 16 << 20
_REMEDY = "make it a file this agent's user can read, or remove it"


def _refused(path: Path, what: str, problem: str) -> DataFileUnreadableError:
    return DataFileUnreadableError(f"{what}: cannot read {path}: {problem}; {_REMEDY}")


def read_data_file(path: Path, what: str, max_bytes: int = MAX_BYTES) -> bytes | None:
    """The bytes of `path`; None when there is no file at the name. Anything else (not a regular
    file, a link, over `max_bytes`, a mode this user cannot read, an I/O error):
    DataFileUnreadableError naming it."""
    try:
        return read_small_file(path, max_bytes=max_bytes, follow_links=False)
    except SmallFileError as refused:
        if refused.missing:
            return None
        raise _refused(path, what, refused.strerror or f"it {refused.problem}") from None


def regular_file(path: Path, what: str) -> bool:
    """Whether there is a file at `path` (False: nothing there), checked as read_data_file
    checks it, for a file another reader opens by name (SQLite's). Anything else at the name:
    DataFileUnreadableError naming it."""
    try:
        check_regular_file(path, follow_links=False)
    except SmallFileError as refused:
        if refused.missing:
            return False
        raise _refused(path, what, refused.strerror or f"it {refused.problem}") from None
    return True
