"""The server's data_dir, made or checked before anything in it is read or written.

It holds the SQLite datastore, the CA's key files and the audit checkpoint key and log: a user
who may write the directory can rename any of them away and put its own in their place (its
files being 0600 stops that user reading them, not replacing them). A 0777 one was taken without
a word. Missing, it is made 0700.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from server.errors import ConfigError

_log = logging.getLogger("svid.server")


def prepare_data_dir(path: Path) -> None:
    """Make `path` (0700) or check it: a directory of this user's or root's that no other user
    may write (a sticky one, such as /tmp, excepted: no one may replace another's entry there).
    Group-writable is warned of, not refused: the group may be the owner's own (umask 002)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
    except FileExistsError:  # exist_ok covers a directory only
        raise ConfigError(f"data_dir: {path} is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"data_dir: cannot make {path}: {exc.strerror or exc}") from None
    uid = os.geteuid()
    if st.st_uid not in (uid, 0):
        raise ConfigError(
            f"data_dir: {path} is owned by uid {st.st_uid}, not the server's user (uid {uid}) "
            "or root, so that user could replace the datastore and keys it holds"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_ISVTX:
        return
    if mode & 0o002:
        raise ConfigError(
            f"data_dir: {path} has mode {mode:04o}: any user may write it, and so replace the "
            "datastore and keys it holds (chmod o-w, or 0700)"
        )
    if mode & 0o020:
        _log.warning(
            "data_dir: its group may write it, and so replace the datastore and keys it holds: "
            "make it 0700 unless that group is the server user's own",
            extra={"data_dir": str(path), "mode": f"{mode:04o}"},
        )
