"""One reader for the small secret files the daemons are given by path (the agent's join token,
the server's key-encryption key): read only if the daemon's own user owns it and no one else
can reach it.

Every check looks at the file actually opened (svid/_small_file.py), not at a name that could
be swapped between a check and the open. Messages name the file and its mode or owner, never
its content.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from svid._daemon_config import ErrorType
from svid._small_file import SmallFileError, read_small_file


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

    def owner_only(st: os.stat_result) -> str | None:
        if st.st_uid != os.geteuid():
            return (
                f"is owned by uid {st.st_uid}, not by {spec.owner} (uid {os.geteuid()}); that "
                "user could change it under the daemon"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            return (
                f"has mode {mode:04o}; it must be accessible to its owner alone (chmod 600 {path})"
            )
        return None

    try:
        # Links followed: Kubernetes mounts secrets through symlinks.
        return read_small_file(path, max_bytes=spec.max_bytes, follow_links=True, check=owner_only)
    except SmallFileError as refused:
        if refused.missing:
            said = spec.missing.format(path=path, reason=refused.strerror)
        elif refused.kind is not None:
            said = f"{path} is not a regular file"
        elif refused.strerror is not None:
            said = spec.unreadable.format(path=path, reason=refused.strerror)
        else:
            said = f"{path} {refused.problem}"
        raise error(f"{spec.setting}: {said}") from None
