"""One reader for the daemons' small files (secrets given by path, the agent's data-directory
files, runtime files): opened without waiting, checked as the file actually opened, bounded.

A name checked and then opened (stat, then read) can be swapped between the two, and opening a
named pipe waits for a writer (a FIFO at a data file's name hung the agent's start for good).
So the open never blocks (O_NONBLOCK: a regular file reads the same with it), and what is
checked is the open file (fstat): a regular file, of at most the caller's bound, passing the
caller's own check (owner, mode). Each caller words the refusal (SmallFileError) its own way.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

# What a file that is not a regular one is, as a message says it.
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symbolic link"),
)


class SmallFileError(Exception):
    """`path` was not read. `problem` completes "it ..." ("is a FIFO, not a regular file"),
    never quoting the content; `missing`: there is no file at the name; `kind`: what is there
    instead of a regular file; `too_big`: over the caller's bound; `strerror`: the OS's words,
    when it refused the open or read."""

    def __init__(
        self,
        problem: str,
        *,
        missing: bool = False,
        kind: str | None = None,
        too_big: bool = False,
        strerror: str | None = None,
    ) -> None:
        super().__init__(problem)
        self.problem = problem
        self.missing = missing
        self.kind = kind
        self.too_big = too_big
        self.strerror = strerror


def _kind(mode: int) -> str | None:
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a file"


def _not_regular(kind: str) -> SmallFileError:
    return SmallFileError(f"is {kind}, not a regular file", kind=kind)


def _open_refused(path: Path, exc: OSError, follow_links: bool) -> SmallFileError:
    if isinstance(exc, FileNotFoundError):
        return SmallFileError("does not exist", missing=True, strerror=exc.strerror)
    # A socket opens as ENXIO, a link refused by O_NOFOLLOW as ELOOP: say what is there.
    if exc.errno in (errno.ENXIO, errno.ELOOP, errno.EISDIR):
        try:
            mode = (os.stat if follow_links else os.lstat)(path).st_mode
        except OSError:
            mode = stat.S_IFREG
        kind = _kind(mode)
        if kind is not None:
            return _not_regular(kind)
    reason = exc.strerror or str(exc)
    return SmallFileError(f"cannot be read: {reason}", strerror=reason)


def open_regular_file(
    path: Path,
    *,
    follow_links: bool,
    check: Callable[[os.stat_result], str | None] | None = None,
) -> tuple[int, os.stat_result]:
    """`path` opened read-only without waiting, and its fstat: a regular file `check` passes,
    for a reader that seeks (read_small_file reads it whole). The caller closes the descriptor.
    SmallFileError otherwise, as read_small_file says it."""
    # O_NOCTTY: a terminal named here never becomes the daemon's.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    if not follow_links:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _open_refused(path, exc, follow_links) from None
    try:
        st = os.fstat(fd)
        kind = _kind(st.st_mode)
        if kind is not None:
            raise _not_regular(kind)
        problem = check(st) if check is not None else None
        if problem is not None:
            raise SmallFileError(problem)
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            raise SmallFileError(f"cannot be read: {reason}", strerror=reason) from None
        raise
    return fd, st


def check_regular_file(path: Path, *, follow_links: bool) -> None:
    """SmallFileError unless `path` is a regular file, as read_small_file would find it: for a file
    another reader then opens by name (SQLite's), or one too big to read whole."""
    fd, _ = open_regular_file(path, follow_links=follow_links)
    os.close(fd)


def read_small_file(
    path: Path,
    *,
    max_bytes: int,
    follow_links: bool,
    check: Callable[[os.stat_result], str | None] | None = None,
) -> bytes:
    """The bytes of `path`, or SmallFileError: nothing there, not a regular file (a link too, unless
    `follow_links`), refused by `check` (its words: what it returns), over `max_bytes`, or an
    open or read the OS refused.

    `follow_links`: True where links are how files are given (Kubernetes mounts secrets through
    them); False for a daemon's own files, which it never writes as links: one there was
    planted, and is not followed to whatever it names.
    """
    fd, st = open_regular_file(path, follow_links=follow_links, check=check)
    try:
        if st.st_size > max_bytes:
            raise SmallFileError(f"is over {max_bytes} bytes", too_big=True)
        chunks: list[bytes] = []
        left = max_bytes + 1
        while left > 0:  # a file grown since the fstat is bounded too
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SmallFileError(f"cannot be read: {reason}", strerror=reason) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise SmallFileError(f"is over {max_bytes} bytes", too_big=True)
    return data
