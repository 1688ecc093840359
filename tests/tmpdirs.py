"""A short temporary directory, for tests that bind Unix sockets in it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def short_tmpdir(prefix: str = "sv") -> Path:
    """A fresh directory directly under /tmp, named by `prefix`: a Unix socket's path must stay
    under 108 bytes, which pytest's tmp_path (deep below the temp dir) can pass."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def removed_after(prefix: str = "sv") -> Iterator[Path]:
    """Generator for a pytest fixture: yields a `short_tmpdir(prefix)`, removes it after."""
    path = short_tmpdir(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
