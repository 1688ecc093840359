"""Why a Unix socket path cannot be connected to, as the file system tells it; how long a path
one may have; and the gRPC target that names one.

gRPC reports all of these as "failed to connect" (and retries some until the deadline); the
command lines check first so that their one-line error names the exact problem.
"""

from __future__ import annotations

import enum
import os
import socket
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


def is_listening(path: Path) -> bool:
    """True when a process listens on the Unix socket at ``path``: a connection is taken, or
    refused for a full backlog only (a running daemon, however busy). The connect does not wait:
    a blocking one waits for room in a full backlog, as long as the listener does not accept, and
    held a starting daemon's probe with it; a non-blocking one fails at once with EAGAIN, which is
    a listener. Refused, or anything else, is no one listening."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(os.fsencode(path))
    except BlockingIOError:  # EAGAIN: its backlog full
        return True
    except OSError:  # refused: no one listens
        return False
    finally:
        probe.close()
    return True


def grpc_unix_target(path: Path) -> str:
    """The gRPC target of the Unix socket at ``path``.

    gRPC reads the target as a URI: a "?" or "#" in the path began a query or fragment, and a
    "%" an escape, so the path is percent-encoded (its bytes, whatever the locale).
    """
    return "unix:" + urllib.parse.quote(os.fsencode(path), safe="/")


def unix_uri(path: Path) -> str:
    """``unix:///...``, the SPIFFE_ENDPOINT_SOCKET value naming the Unix socket at ``path``
    (absolute). A URI, which gRPC and every SPIFFE client decode: its path percent-encoded as
    the gRPC target's is, or a "%41" in a directory name named another path ("A"), and a "#"
    or "?" began a fragment or query that clients refuse."""
    return "unix://" + urllib.parse.quote(os.fsencode(path), safe="/")


def unix_uri_path(uri_path: str) -> Path:
    """The file a ``unix://`` URI's (still encoded) path names, as gRPC reads it."""
    return Path(os.fsdecode(urllib.parse.unquote_to_bytes(uri_path)))
