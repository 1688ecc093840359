"""The audit checkpoint's published public key and its rotated checkpoint file are written as
every daemon file is (svid/_durable): the bytes fsynced before the rename, and never through a
link left at the temporary name."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from server.audit.checkpoint import (
    PUBLIC_KEY_FILE,
    CheckpointError,
    CheckpointFile,
    CheckpointSigner,
)
from server.audit.rollback import find_rollback
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock
from tests.fifo import make_fifo, raised_without_blocking


def test_the_public_key_is_fsynced_before_its_rename(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    synced: set[tuple[int, int]] = set()
    renamed: list[bool] = []
    real_replace, real_fsync = os.replace, os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        info = os.fstat(fd)
        synced.add((info.st_dev, info.st_ino))

    def replace(src: object, dst: object, **kw: object) -> None:
        info = os.stat(str(src))
        renamed.append((info.st_dev, info.st_ino) in synced)
        real_replace(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    CheckpointSigner.load_or_create(tmp_path)
    assert renamed  # the key file and the public key, each renamed into place
    assert all(renamed)


def test_the_public_key_is_not_written_through_a_link_at_its_temporary_name(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    published = tmp_path / PUBLIC_KEY_FILE
    for tmp in (published.with_suffix(".tmp"), published.with_name(published.name + ".tmp")):
        tmp.symlink_to(victim)
    signer = CheckpointSigner.load_or_create(tmp_path)
    assert victim.read_bytes() == b"untouched"
    assert published.read_bytes() == signer.public_pem()
    assert stat.S_IMODE(published.stat().st_mode) == 0o644


def test_a_link_at_the_rotation_file_name_is_not_truncated_through(tmp_path: Path) -> None:
    signer = CheckpointSigner.load_or_create(tmp_path)
    path = tmp_path / "checkpoints.jsonl"
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    path.with_name(path.name + ".tmp").symlink_to(victim)
    now = time.time()
    line = len(signer.sign(10, "a" * 64, 10, now).to_line()) + 1
    file = CheckpointFile(path, max_bytes=3 * line)
    for seq in range(1, 8):  # rotated at least once
        file.append(signer.sign(seq, f"{seq:064x}", seq, now))
    assert path.with_name(path.name + ".1").exists()
    assert victim.read_bytes() == b"untouched"
    newest = file.last()
    assert newest is not None
    assert newest.seq == 7


def test_a_fifo_at_the_checkpoint_files_name_is_refused_without_waiting(tmp_path: Path) -> None:
    # Opened by name, the writer's read from the end waited for a writer: the server's start
    # (its rollback check) and every checkpoint after it hung for good.
    fifo = make_fifo(tmp_path / "checkpoints.jsonl")
    raised = raised_without_blocking(lambda: CheckpointFile(fifo).last(), fifo)
    assert isinstance(raised, CheckpointError)
    assert str(raised) == f"cannot read {fifo}: it is a FIFO, not a regular file"


def test_a_fifo_at_the_published_keys_name_is_no_rollback_found_without_waiting(
    tmp_path: Path,
) -> None:
    # The start's rollback check read it by name (load_public_key): the start hung for good.
    # Not the key this server published: no rollback to say, and the start rewrites the file.
    fifo = make_fifo(tmp_path / PUBLIC_KEY_FILE)
    store = SqliteDataStore(tmp_path / "datastore.sqlite3", FakeClock(start=time.time()))
    try:
        found: list[object] = []
        assert (
            raised_without_blocking(lambda: found.append(find_rollback(store, tmp_path)), fifo)
            is None
        )
        assert found == [None]
        CheckpointSigner.load_or_create(tmp_path)
        assert (tmp_path / PUBLIC_KEY_FILE).is_file()
    finally:
        store.close()


def test_a_link_at_the_checkpoint_files_name_is_refused_not_appended_through(
    tmp_path: Path,
) -> None:
    signer = CheckpointSigner.load_or_create(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched\n")
    path = tmp_path / "checkpoints.jsonl"
    path.symlink_to(victim)
    with pytest.raises(CheckpointError) as refused:
        CheckpointFile(path).append(signer.sign(1, "1" * 64, 1, time.time()))
    assert str(refused.value) == (
        f"cannot write the checkpoint file: {path} is a symbolic link, not a regular file"
    )
    assert victim.read_bytes() == b"untouched\n"
