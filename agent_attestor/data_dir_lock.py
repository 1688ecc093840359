"""One running agent per data directory, held by an exclusive lock on a file in it.

Two agents on one data directory (a second start of the same unit, a copied config) each saved
their state over the other's, renewed the one agent SVID apart, and the one that stopped first
removed the other's runtime file, internal socket and Workload API socket: the survivor ran on,
serving no one. The lock is the kernel's (flock), so a killed agent leaves none behind: its
descriptor closes with it and the next start takes the lock at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from agent_attestor.errors import ConfigError
from agent_attestor.safe_dir import secure_dir

LOCK_FILE = "agent.lock"


@contextlib.contextmanager
def holding_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold `data_dir` for this process (made 0700 if missing) while the block runs; refused
    with a ConfigError naming it when another agent holds it, when it cannot be made, or when
    another user could change it or a directory above it (safe_dir.py)."""
    fd = _open_lock(data_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise ConfigError(
                f"data_dir: another agent is running on {data_dir}{holder}: stop it first, or "
                "give this agent a data_dir of its own"
            ) from None
        # For the operator reading the refusal above; the lock, not this pid, is what counts.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _open_lock(data_dir: Path) -> int:
    # Checked as the socket's directories are: the agent's key, its SVID, its trust bundle and
    # its workloads' keys are kept here, and another user who may write a directory on the way
    # could put files of its own in their place. (The default private_dir, below data_dir,
    # had it checked; a private_dir given elsewhere left a 0777 data_dir taken without a word.)
    try:
        # Directories made above it are 0755 (as private_dir's are): the socket's directory may
        # be below one of them (/run/svid-agent/state beside /run/svid-agent/public), and one
        # made 0700 kept every other user's workload out while the agent served no one.
        secure_dir(data_dir, "data_dir", 0o700, parent_mode=0o755)
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot create {data_dir}: {exc.strerror or exc}") from None
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(data_dir / LOCK_FILE, flags, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"data_dir: cannot open {data_dir / LOCK_FILE}: {exc.strerror or exc}"
        ) from None


def _holder(fd: int) -> str:
    """' (pid N)' as the holder wrote it, or '' when it wrote nothing readable yet."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {text})" if text.isdigit() else ""
