"""Where the agent keeps its internal Workload API socket: the configured private_dir, else
<data_dir>/private, else (a data_dir too deep for a socket path) a directory under $TMPDIR.

The /tmp directory belongs to one data_dir: its name is recorded there, so a restart after a
crash takes up the one the crashed run left, and a clean stop removes it. Its name is still
mkdtemp's (unguessable): a fixed name under /tmp is one another local user could take first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agent_attestor.agent_store import write_file
from agent_attestor.config import AgentConfig
from agent_attestor.data_file import read_data_file
from svid._unix_socket import MAX_UNIX_PATH, unix_path_size

log = logging.getLogger(__name__)
RECORD = "private_dir"  # in data_dir: the /tmp directory this data_dir's agent uses
PREFIX = "svid-agent-"
SOCKET = "api.sock"


@dataclass(frozen=True)
class PrivateDir:
    path: Path
    record: Path | None = None  # set for a /tmp directory of this data_dir's, removed at stop


def resolve_private_dir(config: AgentConfig) -> PrivateDir:
    if config.private_dir is not None:
        return PrivateDir(config.private_dir.resolve())
    candidate = (config.data_dir / "private").resolve()
    if unix_path_size(candidate / SOCKET) <= MAX_UNIX_PATH:
        return PrivateDir(candidate)
    record = config.data_dir / RECORD
    previous = _recorded(record)
    if previous is not None and is_ours(previous):
        return PrivateDir(previous, record)
    path = Path(tempfile.mkdtemp(prefix=PREFIX))
    write_file(record, f"{path}\n".encode(), 0o600)
    return PrivateDir(path, record)


def _recorded(record: Path) -> Path | None:
    try:
        # Read as every data file is: a FIFO at its name hung the start waiting for a writer.
        raw = read_data_file(record, "private_dir record", 4096)
        text = raw.decode().strip() if raw is not None else ""
    except (OSError, UnicodeDecodeError):
        return None
    return Path(text) if text else None


def is_ours(path: Path) -> bool:
    """Whether `path` is a directory an earlier run made for this data_dir and may take up: in
    the temp directory under our prefix (a record edited to name another directory is not
    followed), not a symlink, this user's, entered by no one else."""
    if path.parent != Path(tempfile.gettempdir()) or not path.name.startswith(PREFIX):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False  # gone (a /tmp cleaner, a reboot): a new one is made
    return (
        stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700
    )


def release(private: PrivateDir) -> None:
    """After a clean stop: remove this data_dir's /tmp directory and its record. Only its socket
    is unlinked and the directory removed only if that leaves it empty: never a tree."""
    if private.record is None or not is_ours(private.path):
        return
    with contextlib.suppress(FileNotFoundError):
        (private.path / SOCKET).unlink()
    try:
        private.path.rmdir()
    except OSError as exc:
        log.warning(
            "cannot remove the agent's private directory; the next start takes it up",
            extra={"private_dir": str(private.path), "error": str(exc)},
        )
        return
    private.record.unlink(missing_ok=True)
