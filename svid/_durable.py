"""Renames that survive a power cut: the one helper every writer by temp file and rename uses.

A rename changes the directory, not the file: fsyncing the file makes its bytes durable, but
until the directory itself is fsynced a power loss may bring back the old name (the old key,
the old bundle) or no file at all. So each rename is followed by an fsync of its directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(directory: Path | str) -> None:
    """Make the entries of `directory` (renames, creations, removals in it) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: Path | str, target: Path | str) -> None:
    """os.replace(source, target), then the fsync of target's directory that makes it last.

    Both names must be in one directory (a rename across directories would need both synced).
    """
    os.replace(source, target)
    fsync_dir(Path(target).parent)
