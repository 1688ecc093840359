"""The admin socket's file-system guard.

grpc does not expose the peer's SO_PEERCRED, so access control is the file mode: the socket
lives in a directory owned by the server's user, made 0700 when it is the socket's own, and is
itself 0600. Only that user (and root) can connect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from server.errors import ConfigError
from svid._unix_socket import is_listening

_log = logging.getLogger("svid.server")


def prepare(path: Path) -> None:
    """Create the private directory and clear a stale socket; refuse if another server is live."""
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as exc:  # a file on the way: "[Errno 17] File exists: '<a parent>'"
        raise ConfigError(
            f"admin_socket: cannot make its directory {directory}: {exc.strerror or exc}"
        ) from None
    if info.st_uid != os.geteuid():
        raise ConfigError(f"admin_socket: directory {directory} belongs to another user")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        # Made private only if it is the socket's own: tightening a directory others use
        # (/run, say, for a server running as root) would lock them out of it. The socket
        # itself is 0600 either way (lock_down).
        if any(p != path for p in directory.iterdir()):
            _log.warning(
                "admin_socket: directory %s is open to other users (mode %o) and holds other "
                "files: left as it is; a directory of its own is made private",
                directory,
                mode,
            )
        else:
            os.chmod(directory, 0o700)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"admin_socket: {path} exists and is not a socket")
        # Not waiting: a blocking connect to a running server whose backlog was full held this
        # start until that server accepted.
        if is_listening(path):
            raise ConfigError(f"admin_socket: another server is listening on {path}")
        path.unlink()  # stale: left by a server that did not stop cleanly


@contextlib.contextmanager
def created_private() -> Iterator[None]:
    """The socket made under this is 0600 from its creation. gRPC binds and listens at once, and
    a file's mode is checked at connect() only: a socket made under a looser umask and locked
    down after the server started let another user connect in between and keep that
    connection. The umask is the process's, so this is held only around the bind, at start-up."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def lock_down(path: Path) -> None:
    os.chmod(path, 0o600)
