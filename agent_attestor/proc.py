"""What /proc says about a process, read so that a reused pid cannot lend its identity.

The kernel gives the peer's pid at connect time; by the time we read /proc the process may have
exited and its pid been handed to another. We hold a pidfd (from SO_PEERPIDFD where the kernel has
it, else pidfd_open at accept), and bracket every /proc read with the process start time: if the
start time changed, or the pidfd's process is gone, the reads cannot be trusted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable
from typing import TypeVar

from agent_attestor.errors import ProcessGoneError

SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux >= 6.5

T = TypeVar("T")


def start_time(pid: int, proc_root: str = "/proc") -> int:
    """Field 22 of /proc/<pid>/stat: clock ticks after boot when the process started."""
    try:
        with open(f"{proc_root}/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGoneError(f"process {pid} has exited") from exc
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    return int(rest[19])


def peer_pidfd(sock: socket.socket, pid: int) -> int | None:
    """A pidfd for the peer: the kernel's own (exact), else one opened by pid (best effort)."""
    with contextlib.suppress(OSError):
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
        if fd > 0:
            return fd
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def is_alive(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, we may just not signal it
    return True


def read_stable(pid: int, pidfd: int | None, read: Callable[[], T]) -> T:
    """Run `read` (which looks at /proc/<pid>) and prove the pid still named the same process."""
    before = start_time(pid)
    if pidfd is not None and not is_alive(pidfd):
        raise ProcessGoneError(f"process {pid} has exited")
    result = read()
    after = start_time(pid)
    if before != after:
        raise ProcessGoneError(f"pid {pid} was reused while attesting")
    # While the pidfd's process lives (or is an unreaped zombie) its pid cannot be reused, so the
    # reads above were about it.
    if pidfd is not None and not is_alive(pidfd):
        raise ProcessGoneError(f"process {pid} exited while attesting")
    return result


O_CLOEXEC = 0o2000000  # as /proc/<pid>/fdinfo/<fd> reports it in `flags:` (octal)


def holds_close_on_exec(pid: int, ino: int, proc_root: str = "/proc") -> bool:
    """Whether process `pid` holds socket inode `ino` in a descriptor marked close-on-exec.

    Such a descriptor cannot survive an exec, so the image `pid` runs now is the one that
    created it, or one that took it in itself (received it, or flagged an inherited one)."""
    target = f"socket:[{ino}]"
    fd_dir = f"{proc_root}/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    # A connection is usually among the newest descriptors: look from the top.
    for fd in sorted(fds, key=lambda name: -int(name) if name.isdigit() else 0):
        try:
            if os.readlink(f"{fd_dir}/{fd}") != target:
                continue
            with open(f"{proc_root}/{pid}/fdinfo/{fd}", "rb") as f:
                info = f.read()
        except OSError:
            continue  # closed meanwhile
        for line in info.splitlines():
            if line.startswith(b"flags:") and int(line.split()[1], 8) & O_CLOEXEC:
                return True
    return False
