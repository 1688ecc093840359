"""Renames that survive a power cut: the one helper every writer by temp file and rename uses.

A rename changes the directory, not the file: fsyncing the file makes its bytes durable, but
until the directory itself is fsynced a power loss may bring back the old name (the old key,
the old bundle) or no file at all. So each rename is followed by an fsync of its directory.
"""

from __future__ import annotations

import contextlib
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


def write_aside(target: Path | str, data: bytes, mode: int) -> Path:
    """`data` in a fresh file of `mode` beside `target` (its `.tmp`), fsynced: the caller renames
    it over `target` (replace_durably) when its other files are in place.

    A fresh file, never one already at the name: a write cut short leaves its `.tmp` behind, and
    a file or symlink planted there must not receive the bytes (O_EXCL, O_NOFOLLOW). The mode is
    set on the open file as well, so a umask cannot widen nor narrow what the caller chose.
    """
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        _set_mode(fd, mode)
        view = memoryview(data)
        while view:  # os.write may take less than asked (a full disk, a signal)
            view = view[os.write(fd, view) :]
        os.fsync(fd)  # before the rename: else a power cut may leave the new name empty
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def _set_mode(fd: int, mode: int) -> None:
    """The mode asked on the open file. A filesystem that refuses chmod (some FUSE and CIFS
    mounts: EPERM, ENOTSUP) is let be when the file came out no wider than asked (O_CREAT
    applied the mode less the umask): the runtime files were written there before fchmod was
    asked, and a refusal stopped the daemon's start. Wider is never let be."""
    try:
        os.fchmod(fd, mode)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED | {errno.EPERM}:
            raise
        if os.fstat(fd).st_mode & 0o7777 & ~mode:
            raise


def write_durably(target: Path | str, data: bytes, mode: int) -> None:
    """`target` holds `data` (file mode `mode`), whole or not at all, and lasts a power cut: the
    one writer of the daemons' small files (keys, runtime files, bundles, records)."""
    tmp = write_aside(target, data, mode)
    try:
        replace_durably(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
