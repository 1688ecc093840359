"""A full disk, for real: a `svid-server run` process whose data directory is a small tmpfs,
filled to the last byte and given its space back while the server runs.

    with served_from_a_small_disk(metrics_address="127.0.0.1:0") as (server, disk):
        disk.fill()   # every write of the server's now fails ENOSPC (SQLITE_FULL)
        disk.free()   # and works again

Skipped where no tmpfs can be mounted (no CAP_SYS_ADMIN)."""

from __future__ import annotations

import errno
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir

# Room for a server's datastore, keys and logs, and little more: filled in a blink.
SIZE = "32m"


@contextmanager
def tmpfs(where: Path, size: str = SIZE) -> Iterator[None]:
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


class SmallDisk:
    """The file system of `where`: `fill` takes its every byte, `free` gives them back."""

    def __init__(self, where: Path) -> None:
        self.filler = where / "filler"

    def fill(self) -> None:
        """Write the filler until the file system has not one byte left."""
        with self.filler.open("wb", buffering=0) as out:
            for chunk in (1 << 20, 4096, 1):
                try:
                    while True:
                        out.write(b"\0" * chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise

    def free(self) -> None:
        self.filler.unlink()


@contextmanager
def served_from_a_small_disk(**overrides: Any) -> Iterator[tuple[ServerProcess, SmallDisk]]:
    """A started server (make_server's `overrides`) whose data directory is a small tmpfs, and
    that disk; the server stopped, the tmpfs unmounted and its root removed after."""
    root = short_tmpdir()
    server = make_server(root, **overrides)
    try:
        with tmpfs(server.data_dir):
            server.start()
            yield server, SmallDisk(server.data_dir)
    finally:
        if server.proc is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
