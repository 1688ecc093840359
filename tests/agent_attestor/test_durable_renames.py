"""Every file written by temp file and rename has its directory fsynced after the rename: else
a power cut may bring back the old name's file (the old key, a bundle with a root since
removed) or lose the new one, though the file's own bytes were fsynced."""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.app import RuntimeInfo
from server.ca.keys import KeyStore
from svid._clock import FakeClock
from tests.agent_attestor.pki import LocalCa

AGENT = "spiffe://example.org/svid/agent/join_token/t1"


class _Disk:
    """The order of renames and fsyncs as the kernel sees them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[int, int]]] = []

    def renamed(self, target: Path) -> None:
        info = os.stat(Path(target).parent)
        self.events.append(("rename", (info.st_dev, info.st_ino)))

    def synced(self, fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            self.events.append(("dirsync", (info.st_dev, info.st_ino)))

    def unsynced_renames(self) -> list[tuple[int, int]]:
        """Directories with a rename no later fsync of the directory covers."""
        pending: list[tuple[int, int]] = []
        for kind, directory in self.events:
            if kind == "rename":
                pending.append(directory)
            else:
                pending = [d for d in pending if d != directory]
        return pending


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> _Disk:
    seen = _Disk()
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src: object, dst: object, **kw: object) -> None:
        real_replace(src, dst, **kw)  # type: ignore[arg-type]
        seen.renamed(Path(str(dst)))

    def fsync(fd: int) -> None:
        real_fsync(fd)
        seen.synced(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def _svid() -> AgentSvid:
    ca = LocalCa(FakeClock(start=time.time()))
    key = ec.generate_private_key(ec.SECP256R1())
    return AgentSvid(AGENT, (ca.sign_leaf(key.public_key(), AGENT),), key)


def _store(tmp_path: Path) -> AgentStore:
    return AgentStore(tmp_path / "agent_svid.der", tmp_path / "agent_key.der", tmp_path / "b.der")


def _bundle(tmp_path: Path) -> None:
    _store(tmp_path).save_bundle(LocalCa(FakeClock(start=time.time())).bundle().x509_authorities)


def _agent_svid(tmp_path: Path) -> None:
    _store(tmp_path).save_svid(_svid())


def _agent_svid_save_finished_at_load(tmp_path: Path) -> None:
    store = _store(tmp_path)
    svid = _svid()
    store.save_svid(svid)
    # A save killed before its key's last rename: the key waits under the `.next` name.
    store.key_path.rename(store.key_path.with_name(store.key_path.name + ".next"))
    assert store.load_svid() is not None


def _server_key(tmp_path: Path) -> None:
    KeyStore(tmp_path / "keys").save("x509-a", ec.generate_private_key(ec.SECP256R1()))


@pytest.mark.parametrize(
    "write", [_bundle, _agent_svid, _agent_svid_save_finished_at_load, _server_key]
)
def test_each_rename_is_followed_by_an_fsync_of_its_directory(
    disk: _Disk, tmp_path: Path, write: Callable[[Path], None]
) -> None:
    write(tmp_path)
    assert any(kind == "rename" for kind, _ in disk.events)
    assert disk.unsynced_renames() == []


def _refuse_dir_fsync(monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """A filesystem (some FUSE and network ones) whose directories cannot be fsynced."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _runtime_file(tmp_path: Path) -> None:
    RuntimeInfo(str(tmp_path / "api.sock"), "", os.getpid()).write(tmp_path / "agent.json")


@pytest.mark.parametrize(
    "write", [_bundle, _agent_svid, _agent_svid_save_finished_at_load, _server_key, _runtime_file]
)
def test_a_filesystem_that_cannot_fsync_a_directory_still_takes_the_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, write: Callable[[Path], None]
) -> None:
    # EINVAL made every one of these writes fail after its rename: the agent could not write
    # its runtime file at start, nor save its SVID or bundle, on a data_dir it used to run on.
    _refuse_dir_fsync(monkeypatch, errno.EINVAL)
    write(tmp_path)


def test_a_disk_failing_the_directory_fsync_is_still_told(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _refuse_dir_fsync(monkeypatch, errno.EIO)
    with pytest.raises(OSError, match=os.strerror(errno.EIO)):
        _bundle(tmp_path)
