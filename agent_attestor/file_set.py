"""Several files in one directory replaced as one set (`svid-agent api fetch x509 --write`): every
new file is written and fsynced before the first rename, and a rename that fails puts the ones
already made back, so a failure leaves the old set whole rather than a new certificate beside
the key of the old one."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from svid._durable import fsync_dir


@dataclass(frozen=True)
class NewFile:
    name: str  # a name in the set's directory
    data: bytes = field(repr=False)  # a key among them
    mode: int


def replace_together(directory: Path, files: Sequence[NewFile]) -> None:
    """Each of `files` written to a fresh temp file in `directory` (created with its mode, so a
    key is 0600 before its first byte), fsynced, then renamed over its name in the order given.

    Separate renames are never seen at once: a reader of several of the files can still meet
    two sets between two renames. The order given says which pairing a reader can meet; the
    renames follow each other with nothing between them, to keep that window to microseconds.
    An OSError names the file of the set it was about (never a temp file)."""
    staged: list[tuple[Path, Path]] = []  # (temp file, name it replaces)
    try:
        for new in files:
            target = directory / new.name
            temp = directory / f".{new.name}.{secrets.token_hex(8)}.tmp"
            _write_new(temp, target, new.data, new.mode)
            staged.append((temp, target))
        _rename_all(staged)
    finally:
        for temp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()


def _write_new(temp: Path, target: Path, data: bytes, mode: int) -> None:
    # O_EXCL|O_NOFOLLOW: a file or symlink another user planted at the name (a directory
    # others can write) is refused, never written through.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, mode)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(target)) from None


def _rename_all(staged: list[tuple[Path, Path]]) -> None:
    """Renames each temp file over its target; if one fails, the targets already replaced get
    their old file back (kept meanwhile as a hard link or a copy), or are removed if they had
    none."""
    kept: list[Path | None] = []
    try:
        for _, target in staged:
            kept.append(_keep_old(target))
        done = 0
        try:
            for temp, target in staged:
                try:
                    os.replace(temp, target)
                except OSError as exc:
                    raise OSError(exc.errno, exc.strerror, str(target)) from None
                done += 1
        except BaseException:
            for i in reversed(range(done)):
                old, target = kept[i], staged[i][1]
                with contextlib.suppress(OSError):  # the first failure is the one to report
                    if old is not None:
                        os.replace(old, target)
                    else:
                        target.unlink()
            raise
        if staged:  # the renames on disk, so a power cut after 'Written' keeps them
            fsync_dir(staged[0][1].parent)
    finally:
        for old in kept:
            if old is not None:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()


def _keep_old(target: Path) -> Path | None:
    """A hard link to what `target` is now (a symlink as itself, not followed), or a copy of it
    where the file system has no hard links; None when there is nothing there."""
    old = target.with_name(f".{target.name}.{secrets.token_hex(8)}.old")
    try:
        found = os.lstat(target)
        if stat.S_ISDIR(found.st_mode):  # no rename replaces it: refused before any is made
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        try:
            os.link(target, old, follow_symlinks=False)
        except OSError:
            _copy_old(target, old, found)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(target)) from None
    return old


def _copy_old(target: Path, old: Path, found: os.stat_result) -> None:
    if stat.S_ISLNK(found.st_mode):
        os.symlink(os.readlink(target), old)
        return
    if not stat.S_ISREG(found.st_mode):  # a FIFO would block the read
        raise OSError(errno.EINVAL, "neither a file nor a symlink")
    # O_NONBLOCK: one swapped for a FIFO since the lstat does not block the read either.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    with os.fdopen(os.open(target, flags), "rb") as f:
        data = f.read()
    # Its own mode from the first byte (an old key stays 0600).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with os.fdopen(os.open(old, flags, stat.S_IMODE(found.st_mode)), "wb") as f:
            f.write(data)
    except BaseException:
        old.unlink(missing_ok=True)
        raise
