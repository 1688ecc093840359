"""One running agent per data directory, held by an exclusive lock on a file in it.

Two agents on one data directory (a second start of the same unit, a copied config) each saved
their state over the other's, renewed the one agent SVID apart, and the one that stopped first
removed the other's runtime file, internal socket and Workload API socket: the survivor ran on,
serving no one. The lock is the kernel's (flock), so a killed agent leaves none behind: its
descriptor closes with it and the next start takes the lock at once.

A rolling update that starts the new agent before it stops the old one (a Kubernetes DaemonSet
with maxSurge, which stops the old pod once the new one is ready) had the new one refused for
ever and the rollout stalled. With `take_over_wait` the new one waits that long for the old one
to stop, saying so, and starts once it has: the old one keeps the data directory and the socket
until its clean stop, so there is never a second writer (nor a socket taken from an agent still
serving on it). Taking the socket over while the old one drained would have had two agents
writing the state file, the SVIDs and the audit checkpoint at once, which the lock is there to
prevent.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from agent_attestor.errors import ConfigError
from agent_attestor.safe_dir import secure_dir

LOCK_FILE = "agent.lock"
# How often a waiting start tries the lock again: the old agent's stop takes seconds.
RETRY_EVERY = 0.2

_log = logging.getLogger("agent_attestor.data_dir_lock")


@contextlib.contextmanager
def holding_data_dir(
    data_dir: Path,
    take_over_wait: float = 0.0,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[None]:
    """Hold `data_dir` for this process (made 0700 if missing) while the block runs; refused
    with a ConfigError naming it when another agent holds it past `take_over_wait` seconds
    (0: at once), when it cannot be made, or when another user could change it or a directory
    above it (safe_dir.py)."""
    fd = _open_lock(data_dir)
    try:
        _lock(fd, data_dir, take_over_wait, clock, sleep)
        # For the operator reading the refusal above; the lock, not this pid, is what counts.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _lock(
    fd: int,
    data_dir: Path,
    wait: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> None:
    deadline = clock() + wait
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            if said:
                _log.info(
                    "data_dir: the other agent stopped; starting", extra={"data_dir": str(data_dir)}
                )
            return
        holder = _holder(fd)
        left = deadline - clock()
        if left <= 0:
            if wait > 0:
                raise ConfigError(
                    f"data_dir: another agent is still running on {data_dir}{holder} after "
                    f"take_over_wait ({wait:g} s): stop it, or give this agent a data_dir of "
                    "its own"
                )
            raise ConfigError(
                f"data_dir: another agent is running on {data_dir}{holder}: stop it first, or "
                "give this agent a data_dir of its own (for a rollout that starts the new agent "
                "before it stops the old one: take_over_wait)"
            )
        if not said:
            # Said once: a start that seems hung is waiting, and for whom.
            _log.warning(
                f"data_dir: another agent is running on {data_dir}{holder}: waiting up to "
                f"{wait:g} s (take_over_wait) for it to stop",
                extra={"data_dir": str(data_dir)},
            )
            said = True
        sleep(min(RETRY_EVERY, left))


def _open_lock(data_dir: Path) -> int:
    # Checked as the socket's directories are: the agent's key, its SVID, its trust bundle and
    # its workloads' keys are kept here, and another user who may write a directory on the way
    # could put files of its own in their place. (The default private_dir, below data_dir,
    # had it checked; a private_dir given elsewhere left a 0777 data_dir taken without a word.)
    try:
        # Directories made above it are 0755 (as private_dir's are): the socket's directory may
        # be below one of them (/run/svid-agent/state beside /run/svid-agent/public), and one
        # made 0700 kept every other user's workload out while the agent served no one.
        # Private: in a sticky world-writable directory (data_dir = /tmp) another user could
        # put a bundle.der of its own CA there before the agent's first save, and the agent,
        # whose rename over another user's file a sticky bit refuses, trusted it at each start.
        secure_dir(data_dir, "data_dir", 0o700, parent_mode=0o755, private=True)
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
