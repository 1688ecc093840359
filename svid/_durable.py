"""Renames that survive a power cut: the one helper every writer by temp file and rename uses.

A rename changes the directory, not the file: fsyncing the file makes its bytes durable, but
until the directory itself is fsynced a power loss may bring back the old name (the old key,
the old bundle) or no file at all. So each rename is followed by an fsync of its directory.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

# A filesystem that cannot fsync a directory says so with one of these (some FUSE and network
# filesystems: EINVAL; a read-only descriptor refused: EBADF; no support at all: ENOTSUP). The
# rename is done by then and the file's bytes are fsynced: what it cannot promise is more than
# such a filesystem ever gave, and failing the write made the agent unable to start there (its
# runtime file) or to save anything, where it used to. PostgreSQL and SQLite ignore them too.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP})


def fsync_dir(directory: Path | str) -> None:
    """Make the entries of `directory` (renames, creations, removals in it) durable, where its
    filesystem can; one that cannot fsync a directory (_UNSUPPORTED) is let be."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise  # EIO, ENOSPC: the disk failed, and the caller is told
    finally:
        os.close(fd)


def replace_durably(source: Path | str, target: Path | str) -> None:
    """os.replace(source, target), then the fsync of target's directory that makes it last.

    Both names must be in one directory (a rename across directories would need both synced).
    """
    os.replace(source, target)
    fsync_dir(Path(target).parent)
