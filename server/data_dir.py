"""The server's data_dir, made or checked before anything in it is read or written.

It holds the SQLite datastore, the CA's key files and the audit checkpoint key and log: a user
who may write the directory can rename any of them away and put its own in their place (its
files being 0600 stops that user reading them, not replacing them). A 0777 one was taken without
a word. Missing, it is made 0700.

Every directory on the way to it is checked as the agent's are (svid/_safe_dir.py): one another
user may write lets that user rename the whole data_dir aside and put its own in its place, so a
0700 data_dir in a 0777 directory was no better than a 0777 one.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
from pathlib import Path

from server.errors import ConfigError
from svid._safe_dir import Who, secure_dir

_log = logging.getLogger("svid.server")


def _warn_group_writable(key: str, path: Path, mode: int) -> None:
    _log.warning(
        f"{key}: a directory above it its group may write, and so replace the datastore and "
        "keys below it: make it writable by its owner alone unless that group is trusted",
        extra={"directory": str(path), "mode": f"{mode:04o}"},
    )


# Group-writable is warned of, as for the data_dir itself: a Kubernetes fsGroup volume
# (root:fsGroup 2775) with the data_dir made below it is such a directory.
_SERVER = Who("server", ConfigError, _warn_group_writable)


def prepare_data_dir(path: Path) -> None:
    """Make `path` (0700) or check it: a directory of this user's or root's that no other user
    may write (a sticky one, such as /tmp, excepted: no one may replace another's entry there),
    in directories no other user may change. Group-writable is warned of, not refused, for the
    data_dir itself: the group may be the owner's own (umask 002), or a Kubernetes fsGroup."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Its own mode is judged below (warned of where only its group may write it); it is
        # followed to where it resolves, and the directories holding symlinks on the way checked.
        path = secure_dir(path, "data_dir", 0o700, _SERVER, shared=True)
        st = os.stat(path)
    except FileExistsError:  # exist_ok covers a directory only
        raise ConfigError(f"data_dir: {path} is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot make {path}: {exc.strerror or exc}") from None
    _refuse_unwritable(path)  # a sticky one too
    # Its owner (this user or root) was checked with the directories above it.
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_ISVTX:
        return
    if mode & 0o002:
        raise ConfigError(
            f"data_dir: {path} has mode {mode:04o}: any user may write it, and so replace the "
            "datastore and keys it holds (chmod o-w, or 0700)"
        )
    if mode & 0o020:
        # Not "make it 0700": a server that writes a root:group directory through that group
        # would be locked out of it. Owned by the server's user, chown changes nothing.
        _log.warning(
            "data_dir: its group may write it, and so replace the datastore and keys it holds: "
            "give it to the server's user alone (chown it to that user, then chmod 0700) unless "
            "every member of that group is trusted",
            extra={"data_dir": str(path), "mode": f"{mode:04o}"},
        )


def _refuse_unwritable(path: Path) -> None:
    """A data_dir this user may not write (root's, made by hand or by a volume mount) failed at
    the first file opened in it with "[Errno 13] Permission denied: '<data_dir>/<file>'",
    naming neither the directory nor the fix."""
    if os.access(path, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
        return
    uid = os.geteuid()
    try:
        user = f"{pwd.getpwuid(uid).pw_name}, uid {uid}"
    except KeyError:  # a uid with no passwd entry (a container's)
        user = f"uid {uid}"
    raise ConfigError(
        f"data_dir: {path} is not writable by the server's user ({user}): chown it to that "
        "user (then chmod 0700), or run the server as its owner"
    )
