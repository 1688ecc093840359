"""Directories a daemon keeps a socket or its keys in: no other user may rename, remove or add
entries on the way to them (the agent's socket and data_dir, the server's data_dir).

A user who may write a directory on the socket's path (one it owns, one writable by its group or
by anyone without the sticky bit) can move the agent's socket, or any directory below, aside and
put its own in its place: every workload then asks that user for its identities. So every
directory from / down to the socket's own, and every directory holding a symlink on the way,
must be the daemon's user's or root's and writable by no one else; a root-owned sticky directory
(/tmp) is fine, as no one may rename another's entry in it, and one of its entries another user
made first (a directory or a symlink) is that user's and refused in its turn. Missing directories
are made by the daemon.

A directory its group may write is fine where that group is its owner's private group (named
as the owner, the owner's primary group, and no other user in it): the layout umask 002 assumes,
which Debian and Ubuntu give their users, so a checkout in a home directory stays usable.

Checked once at start: once the chain is safe, only the daemon's user and root can change it.

An operator may vouch for the socket's own directory alone (``socket_dir_shared``): a Kubernetes
``emptyDir`` (0777, not sticky) that only the pod's containers can reach, or a ``root:spire``
0775 directory that a trusted group shares. Its owner is still checked, and so is every
directory above it: only the writers the operator named can replace the socket.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAX_SYMLINKS = 40  # as the kernel's own lookup


def _check(
    key: str,
    path: Path,
    st: os.stat_result,
    uid: int,
    who: Who,
    *,
    shared: bool = False,
    private: bool = False,
) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise who.error(f"{key}: {path} is not a directory")
    if st.st_uid not in (uid, 0):
        raise who.error(
            f"{key}: directory {path} is owned by uid {st.st_uid}, not the {who.daemon}'s user "
            f"(uid {uid}) or root, so that user could replace what the {who.daemon} keeps below it"
        )
    mode = stat.S_IMODE(st.st_mode)
    if shared:  # its writers are the operator's to trust (socket_dir_shared)
        return
    if mode & 0o020 and not mode & 0o002 and _owners_private_group(st):
        mode &= ~0o020  # the group holds the owner alone
    if private and mode & 0o022:
        # A sticky bit keeps others from replacing the daemon's files, not from adding their
        # own under the names it has not written yet (or has just removed), which it reads.
        raise who.error(
            f"{key}: directory {path} has mode {mode:04o}: others may add files to it (a "
            f"sticky bit does not stop that), which the {who.daemon} would read as its own; "
            "give it a directory of its own"
        )
    if mode & 0o020 and not mode & (0o002 | stat.S_ISVTX) and who.group_writable is not None:
        who.group_writable(key, path, mode)  # the daemon's to judge (the server warns)
        return
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise who.error(
            f"{key}: directory {path} has mode {mode:04o}: writable by its group or by others "
            f"without the sticky bit, so they could replace what the {who.daemon} keeps below it"
        )


def _owners_private_group(st: os.stat_result) -> bool:
    """Whether `st`'s group holds its owner alone: named as the owner, the owner's primary
    group, no other member listed and no other user's primary group. Unknown ids are not."""
    try:
        owner = pwd.getpwuid(st.st_uid)
        group = grp.getgrgid(st.st_gid)
    except KeyError:
        return False
    if group.gr_name != owner.pw_name or owner.pw_gid != st.st_gid:
        return False
    if set(group.gr_mem) - {owner.pw_name}:
        return False
    return all(u.pw_gid != st.st_gid or u.pw_uid == st.st_uid for u in pwd.getpwall())


@dataclass(frozen=True)
class Who:
    """The daemon checking (named in its refusals) and the error it refuses with."""

    daemon: str  # "agent", "server"
    error: Callable[[str], Exception]
    # Told of a directory its group (and no one else) may write, in place of a refusal: (key,
    # directory, mode). None: refused, as the agent refuses it.
    group_writable: Callable[[str, Path, int], None] | None = None


def secure_dir(
    path: Path,
    key: str,
    mode: int,
    who: Who,
    *,
    shared: bool = False,
    parent_mode: int | None = None,
    private: bool = False,
) -> Path:
    """Make `path` and any missing parent (with `mode`, as the daemon's user; the parents with
    `parent_mode` where given), check it and every directory on the way to it, following
    symlinks as the kernel does, and return where it resolves to. Raises `who.error` naming
    `key` and the first directory another user could change. `shared`: the directory `path`
    resolves to may be written by its group and others (its owner and the directories above it
    are checked all the same). `private`: the directory `path` resolves to must let no one
    else add entries, sticky bit or not (/tmp itself): the daemon reads the files it finds
    there as its own."""
    uid = os.geteuid()
    todo = list(reversed(Path(os.path.abspath(path)).parts[1:]))  # popped from the end
    current = Path("/")
    _check(key, current, os.lstat(current), uid, who)
    links = 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent  # checked on the way down
            continue
        nxt = current / name
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            # Nothing left to walk: `path` itself (a missing entry is no symlink to follow).
            made = mode if not todo or parent_mode is None else parent_mode
            try:
                os.mkdir(nxt, made)
            except FileExistsError:
                pass  # made meanwhile by another process: checked below like any other
            else:
                os.chmod(nxt, made)  # not left to the umask
            st = os.lstat(nxt)
        if stat.S_ISLNK(st.st_mode):
            # The link sits in `current`, checked: no one else may replace it there, but in a
            # sticky directory (/tmp) its owner may, so there it must be ours or root's too.
            if st.st_uid not in (uid, 0) and os.lstat(current).st_mode & stat.S_ISVTX:
                raise who.error(
                    f"{key}: symlink {nxt} is owned by uid {st.st_uid}, not the "
                    f"{who.daemon}'s user (uid {uid}) or root, so that user could point it "
                    "elsewhere"
                )
            links += 1
            if links > MAX_SYMLINKS:
                raise who.error(f"{key}: too many symlinks on the way to {path}")
            target = Path(os.readlink(nxt))
            if target.is_absolute():
                current = Path("/")
            todo.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
            continue
        _check(key, nxt, st, uid, who, shared=shared and not todo, private=private and not todo)
        current = nxt
    if private:
        # Where the walk ended, checked once more: a link ending in ".." (to "/tmp/x/..")
        # ends it on a directory checked only as one on the way, not as `path`.
        _check(key, current, os.lstat(current), uid, who, private=True)
    return current
