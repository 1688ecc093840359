"""One reader for the small secret files the daemons are given by path (the agent's join token,
the server's key-encryption key): read only if the daemon's own user owns it and no one else
can reach it.

Every check looks at the file actually opened (fstat), not at a name that could be swapped
between a check and the open. Messages name the file and its mode or owner, never its content.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from svid._daemon_config import ErrorType


@dataclass(frozen=True)
class SecretFile:
    """What a caller calls its secret file, each message prefixed with `setting`."""

    setting: str  # the config key that names the file
    owner: str  # whose file it must be, as the message says it: "the agent's user"
    max_bytes: int  # anything bigger is the wrong file
    # str.format templates of {path} and {reason} (the OS's strerror).
    missing: str = "{path} does not exist"
    unreadable: str = "cannot read {path}: {reason}"


def read_owner_only(path: Path, spec: SecretFile, error: ErrorType) -> bytes:
    """The bytes of `path`, or `error` naming the file: missing, unreadable, not a regular file,
    owned by another user, or reachable by group or others."""
    try:
        # O_NONBLOCK: opening a named pipe waits for a writer, and a device may wait too; a
        # regular file reads the same with or without it. O_NOCTTY: a terminal named here never
        # becomes the daemon's. No O_NOFOLLOW: Kubernetes mounts secrets through symlinks.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        said = spec.missing if isinstance(exc, FileNotFoundError) else spec.unreadable
        raise error(f"{spec.setting}: " + said.format(path=path, reason=exc.strerror)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{spec.setting}: {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise error(
                f"{spec.setting}: {path} is owned by uid {st.st_uid}, not by {spec.owner} "
                f"(uid {os.geteuid()}); that user could change it under the daemon"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise error(
                f"{spec.setting}: {path} has mode {mode:04o}; it must be accessible to its owner "
                f"alone (chmod 600 {path})"
            )
        data = os.read(fd, spec.max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > spec.max_bytes:
        raise error(f"{spec.setting}: {path} is over {spec.max_bytes} bytes")
    return data
