"""`svid-server keys new-kek`: a fresh key-encryption key file, 0600, never over another."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from server.ca.sealing import KeyEncryptionKey
from server.cli import main


def test_new_kek_writes_an_owner_only_key_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kek"
    assert main(["keys", "new-kek", "--out", str(out)]) == 0
    assert os.stat(out).st_mode & 0o777 == 0o600
    kek = KeyEncryptionKey.load(out)
    printed = capsys.readouterr().out
    assert str(out) in printed
    assert out.read_text().strip() not in printed  # the key itself is never printed
    assert main(["keys", "new-kek", "--out", str(tmp_path / "kek2")]) == 0
    assert KeyEncryptionKey.load(tmp_path / "kek2").kek_id != kek.kek_id


def test_new_kek_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kek"
    assert main(["keys", "new-kek", "--out", str(out)]) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["keys", "new-kek", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"{out} already exists; refusing to overwrite" in err
    assert out.read_bytes() == before


@pytest.mark.parametrize("where", ["before", "after"])
def test_new_kek_output_json_is_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    # --output json is JSON for every command: before the command it printed the text line;
    # after it, argparse refused the flag.
    out = tmp_path / "kek"
    flag = ["--output", "json"]
    argv = ["keys", "new-kek", "--out", str(out)]
    assert main([*flag, *argv] if where == "before" else [*argv, *flag]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"key_encryption_key_file": str(out)}
    KeyEncryptionKey.load(out)
