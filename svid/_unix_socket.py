"""Why a Unix socket path cannot be connected to, as the file system tells it.

gRPC reports all of these as "failed to connect" (and retries some until the deadline); the
command lines check first so that their one-line error names the exact problem.
"""

from __future__ import annotations

import enum
import os
import stat
from pathlib import Path


class SocketProblem(enum.Enum):
    MISSING = "does not exist"
    DIRECTORY_DENIED = "permission denied on a directory above it"
    NOT_A_SOCKET = "is not a socket"
    SOCKET_DENIED = "permission denied"


def socket_problem(path: Path) -> SocketProblem | None:
    """What stops this process connecting to the Unix socket at ``path``, or None if nothing
    visible does (a listener may still be missing or hung; only a connection tells that)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return SocketProblem.MISSING
    except PermissionError:
        return SocketProblem.DIRECTORY_DENIED
    if not stat.S_ISSOCK(mode):
        return SocketProblem.NOT_A_SOCKET
    if not os.access(path, os.R_OK | os.W_OK):
        return SocketProblem.SOCKET_DENIED
    return None
