"""The one durable writer of the daemons' small files (svid/_durable.write_durably): each file's
bytes fsynced before its rename (else a power cut may leave the new name empty), its directory
after, and a link planted at its temporary name never written through."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from agent_attestor.app import RuntimeInfo as AgentRuntimeInfo
from server.runtime import RuntimeInfo as ServerRuntimeInfo
from svid._durable import write_durably
from svid._small_file import SmallFileError


class _Disk:
    """Which files were fsynced (by inode) when each rename happened."""

    def __init__(self) -> None:
        self.synced: set[tuple[int, int]] = set()
        self.renamed: list[tuple[Path, bool]] = []  # (target, its file fsynced before)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> _Disk:
    seen = _Disk()
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src: object, dst: object, **kw: object) -> None:
        info = os.lstat(str(src))
        was_synced = stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) in seen.synced
        real_replace(src, dst, **kw)  # type: ignore[arg-type]
        seen.renamed.append((Path(str(dst)), was_synced))

    def fsync(fd: int) -> None:
        real_fsync(fd)
        info = os.fstat(fd)
        seen.synced.add((info.st_dev, info.st_ino))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def _agent_runtime(path: Path) -> None:
    AgentRuntimeInfo(str(path.parent / "api.sock"), "127.0.0.1:9", os.getpid()).write(path)


def _server_runtime(path: Path) -> None:
    ServerRuntimeInfo("example.org", "127.0.0.1:1", "127.0.0.1:2", "/s", "", 42).write(path)


RUNTIME_FILES = [_agent_runtime, _server_runtime]


@pytest.mark.parametrize("write", RUNTIME_FILES)
def test_a_runtime_file_is_fsynced_before_its_rename(
    disk: _Disk, tmp_path: Path, write: Callable[[Path], None]
) -> None:
    write(tmp_path / "runtime.json")
    assert disk.renamed == [(tmp_path / "runtime.json", True)]


@pytest.mark.parametrize("write", RUNTIME_FILES)
def test_a_link_at_a_runtime_files_temporary_name_is_not_written_through(
    tmp_path: Path, write: Callable[[Path], None]
) -> None:
    # Left by another user where the directory lets them (a demo's /tmp): the old writer opened
    # the name as it found it, and wrote the file the link names.
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "runtime.json.tmp").symlink_to(victim)
    write(tmp_path / "runtime.json")
    assert victim.read_bytes() == b"untouched"
    assert not (tmp_path / "runtime.json").is_symlink()


def test_both_daemons_runtime_files_read_back_and_refuse_what_is_not_theirs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agent.json"
    info = AgentRuntimeInfo("/run/api.sock", "", 7)
    info.write(path)
    assert AgentRuntimeInfo.read(path) == info
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(SmallFileError, match="is a FIFO, not a regular file"):
        AgentRuntimeInfo.read(tmp_path / "fifo.json")


def _chmod_refused(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    # A filesystem refusing chmod (some FUSE and CIFS mounts): not one this host can mount.
    def fchmod(fd: int, mode: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fchmod", fchmod)


@pytest.mark.parametrize("code", [errno.EPERM, errno.ENOTSUP])
def test_a_filesystem_refusing_chmod_is_written_to_when_the_file_is_no_wider_than_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    _chmod_refused(monkeypatch, code)
    old = os.umask(0o077)
    try:
        write_durably(tmp_path / "agent.json", b"{}", 0o644)  # made 0600: narrower, let be
    finally:
        os.umask(old)
    assert (tmp_path / "agent.json").read_bytes() == b"{}"
    assert stat.S_IMODE((tmp_path / "agent.json").stat().st_mode) == 0o600


def test_a_file_left_wider_than_asked_by_a_refused_chmod_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _chmod_refused(monkeypatch, errno.EPERM)
    real_open = os.open

    def wide_open(path: object, flags: int, mode: int = 0o777, *a: object) -> int:
        return real_open(path, flags, 0o666, *a)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", wide_open)
    old = os.umask(0)
    try:
        with pytest.raises(PermissionError):
            write_durably(tmp_path / "key.pem", b"secret", 0o600)
    finally:
        os.umask(old)
    assert not (tmp_path / "key.pem").exists()
    assert not (tmp_path / "key.pem.tmp").exists()
