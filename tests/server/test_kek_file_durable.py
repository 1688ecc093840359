"""`svid-server keys new-kek` (KeyEncryptionKey.write_new) makes its new file's name durable: a
power cut after it must not lose the KEK every key sealed under it needs."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from server.ca.sealing import KeyEncryptionKey


def test_the_new_kek_file_and_its_directory_are_fsynced(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        info = os.fstat(fd)
        synced.append((info.st_dev, info.st_ino))

    monkeypatch.setattr(os, "fsync", fsync)
    kek = KeyEncryptionKey.generate()
    path = tmp_path / "kek"
    kek.write_new(path)
    monkeypatch.undo()
    file_info, dir_info = path.stat(), tmp_path.stat()
    assert (file_info.st_dev, file_info.st_ino) in synced
    # The creation of the name is in the directory: only its fsync makes it last.
    assert synced[-1] == (dir_info.st_dev, dir_info.st_ino)
    assert stat.S_IMODE(file_info.st_mode) == 0o600
    assert KeyEncryptionKey.load(path).kek_id == kek.kek_id
