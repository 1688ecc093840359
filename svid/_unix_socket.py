"""Why a Unix socket path cannot be connected to, as the file system tells it; how long a path
one may have; and the gRPC target that names one.

gRPC reports all of these as "failed to connect" (and retries some until the deadline); the
command lines check first so that their one-line error names the exact problem.
"""

from __future__ import annotations

import enum
import os
import stat
import urllib.parse
from pathlib import Path

# sun_path holds 108 bytes, the last the terminating NUL.
MAX_UNIX_PATH = 107


def unix_path_size(path: Path) -> int:
    """The bytes `path` takes in sun_path, as the kernel counts them: a non-ASCII character is
    two to four, and a name that is no UTF-8 (a surrogate-escaped byte) its own bytes."""
    return len(os.fsencode(path))


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


def grpc_unix_target(path: Path) -> str:
    """The gRPC target of the Unix socket at ``path``.

    gRPC reads the target as a URI: a "?" or "#" in the path began a query or fragment, and a
    "%" an escape, so the path is percent-encoded (its bytes, whatever the locale).
    """
    return "unix:" + urllib.parse.quote(os.fsencode(path), safe="/")
