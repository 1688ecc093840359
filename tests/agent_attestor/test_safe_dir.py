"""secure_dir: the directories on the way to an agent socket, checked against other users."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_attestor.errors import ConfigError
from agent_attestor.safe_dir import secure_dir
from tests.tmpdirs import short_tmpdir
from tests.users import NOBODY

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another uid")


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmpdir("sd-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _private_group_of(uid: int) -> int | None:
    """The private group of user `uid` (named as it, its primary, no one else's), if any."""
    user = pwd.getpwuid(uid)
    try:
        group = grp.getgrgid(user.pw_gid)
    except KeyError:
        return None
    if group.gr_name != user.pw_name or set(group.gr_mem) - {user.pw_name}:
        return None
    if any(u.pw_gid == user.pw_gid and u.pw_uid != uid for u in pwd.getpwall()):
        return None
    return user.pw_gid


def test_a_directory_writable_by_its_owners_private_group_is_accepted(root: Path) -> None:
    """umask 002 with a group of one's own (Debian's and Ubuntu's default for users): a
    checkout in a home directory has 0775 directories no other user can write."""
    private = _private_group_of(os.geteuid())
    if private is None:
        pytest.skip("this user has no private group to test with")
    mine = root / "mine"
    mine.mkdir()
    os.chown(mine, os.geteuid(), private)
    os.chmod(mine, 0o775)
    assert secure_dir(mine / "agent", "socket_path", 0o755) == mine / "agent"
    os.chmod(mine, 0o777)  # others too: refused whatever the group
    with pytest.raises(ConfigError, match="has mode 0777"):
        secure_dir(mine / "agent2", "socket_path", 0o755)


def test_missing_directories_are_made_with_the_mode_asked_whatever_the_umask(root: Path) -> None:
    old = os.umask(0o077)
    try:
        got = secure_dir(root / "a" / "b", "socket_path", 0o755)
    finally:
        os.umask(old)
    assert got == root / "a" / "b"
    for path in (root / "a", root / "a" / "b"):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o755


def test_a_root_owned_sticky_directory_on_the_way_is_accepted(root: Path) -> None:
    sticky = root / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    assert secure_dir(sticky / "agent", "socket_path", 0o755) == sticky / "agent"


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_directory_its_group_or_others_may_write_is_refused(root: Path, mode: int) -> None:
    shared = root / "shared"
    shared.mkdir()
    if os.geteuid() == 0:
        os.chown(shared, 0, NOBODY)  # a group not root's private one
    os.chmod(shared, mode)
    with pytest.raises(ConfigError, match=rf"socket_path: directory {shared} has mode 0{mode:o}"):
        secure_dir(shared / "agent", "socket_path", 0o755)
    assert not (shared / "agent").exists()  # nothing made below it


@as_root
def test_an_ancestor_another_user_owns_is_refused(root: Path) -> None:
    theirs = root / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    (theirs / "agent").mkdir()  # the agent's own, but in a directory `nobody` may rename it in
    with pytest.raises(ConfigError, match=rf"private_dir: directory {theirs} is owned by uid"):
        secure_dir(theirs / "agent", "private_dir", 0o755)


@as_root
def test_a_symlink_is_followed_and_its_target_checked_too(root: Path) -> None:
    theirs = root / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    (root / "link").symlink_to(theirs)
    with pytest.raises(ConfigError, match=rf"directory {theirs} is owned by uid"):
        secure_dir(root / "link" / "agent", "socket_path", 0o755)


@as_root
def test_a_symlink_in_a_directory_another_user_owns_is_refused(root: Path) -> None:
    """The link's target is safe, but `nobody` may point the link elsewhere later."""
    ours = root / "ours"
    ours.mkdir()
    theirs = root / "theirs"
    theirs.mkdir(mode=0o755)
    (theirs / "link").symlink_to(ours)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=rf"directory {theirs} is owned by uid"):
        secure_dir(theirs / "link", "socket_path", 0o755)


def test_a_symlink_within_safe_directories_resolves(root: Path) -> None:
    (root / "real").mkdir()
    (root / "link").symlink_to("real")
    assert secure_dir(root / "link" / "sub", "socket_path", 0o755) == root / "real" / "sub"


def test_a_file_on_the_way_is_refused(root: Path) -> None:
    (root / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        secure_dir(root / "file" / "x", "socket_path", 0o755)


@as_root
def test_a_symlink_another_user_made_in_a_sticky_directory_is_refused(root: Path) -> None:
    """/tmp lets `nobody` make /tmp/svid-agent first, as a symlink to a directory that passes
    (root's). The sticky bit lets no one else rename that link, but its owner may replace it
    at any time: between the check and the bind, or once the agent serves, with a directory
    of its own holding its own socket where every workload connects."""
    ours = root / "ours"
    ours.mkdir(mode=0o755)
    sticky = root / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    link = sticky / "svid-agent"
    link.symlink_to(ours)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=rf"socket_path: symlink {link} is owned by uid"):
        secure_dir(link / "public", "socket_path", 0o755)


@as_root
def test_a_symlink_another_user_owns_in_a_directory_only_we_may_write_is_followed(
    root: Path,
) -> None:
    """A link's target cannot be changed, only the link replaced, which takes writing its
    directory: outside a sticky one, whose the link is does not matter."""
    (root / "real").mkdir()
    link = root / "link"
    link.symlink_to("real")
    os.lchown(link, NOBODY, NOBODY)
    assert secure_dir(link / "sub", "socket_path", 0o755) == root / "real" / "sub"


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_a_shared_socket_directory_is_accepted_only_when_the_operator_vouches_for_it(
    root: Path, mode: int
) -> None:
    """A Kubernetes emptyDir (0777, not sticky) or a root:spire 0775 directory: refused by
    default, accepted with socket_dir_shared, as the socket's own directory only."""
    sockets = root / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        os.chown(sockets, 0, NOBODY)  # a group not root's private one
    os.chmod(sockets, mode)
    with pytest.raises(ConfigError, match=rf"directory {sockets} has mode 0{mode:o}"):
        secure_dir(sockets, "socket_path", 0o755)
    assert secure_dir(sockets, "socket_path", 0o755, shared=True) == sockets
    # A directory above the socket's is never the operator's to waive.
    with pytest.raises(ConfigError, match=rf"directory {sockets} has mode 0{mode:o}"):
        secure_dir(sockets / "agent", "socket_path", 0o755, shared=True)
    assert not (sockets / "agent").exists()


def test_a_shared_socket_directory_reached_through_a_symlink_is_the_target(root: Path) -> None:
    shared = root / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    (root / "link").symlink_to(shared)
    assert secure_dir(root / "link", "socket_path", 0o755, shared=True) == shared
    # The link's own directory stays checked: one others may write is refused.
    os.chmod(root, 0o777)
    try:
        with pytest.raises(ConfigError, match=rf"directory {root} has mode 0777"):
            secure_dir(root / "link", "socket_path", 0o755, shared=True)
    finally:
        os.chmod(root, 0o755)


@as_root
def test_a_shared_socket_directory_another_user_owns_is_refused(root: Path) -> None:
    """Vouching for a directory's writers is not vouching for its owner, who may chmod it."""
    theirs = root / "theirs"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=rf"socket_path: directory {theirs} is owned by uid"):
        secure_dir(theirs, "socket_path", 0o755, shared=True)


@pytest.mark.parametrize("target", ["{sticky}/x/..", ".."])
def test_a_private_directory_reached_by_a_link_ending_in_dot_dot_is_checked_as_itself(
    root: Path, target: str
) -> None:
    """A data_dir others may add files to (sticky, as /tmp) is refused however its path ends:
    a link to "/tmp/x/.." (or to ".." from /tmp/x) ended the walk on /tmp, checked only as a
    directory on the way."""
    sticky = root / "sticky"
    (sticky / "x").mkdir(parents=True)
    os.chmod(sticky, 0o1777)
    link = sticky / "x" / "link" if target == ".." else root / "link"
    link.symlink_to(target.format(sticky=sticky))
    with pytest.raises(ConfigError, match="mode 1777: others may add files to it"):
        secure_dir(link, "data_dir", 0o700, private=True)
