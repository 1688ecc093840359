"""The owner-only secret file reader both daemons use (join token file, KEK file)."""

from __future__ import annotations

from pathlib import Path

import pytest

from svid._secret_file import SecretFile, read_owner_only
from tests.fifo import make_fifo, raised_without_blocking

SPEC = SecretFile(setting="secret_file", owner="the daemon's user", max_bytes=16)


def _file(tmp_path: Path, data: bytes = b"s3cr3t", mode: int = 0o600) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_an_owner_only_file_is_read(tmp_path: Path) -> None:
    assert read_owner_only(_file(tmp_path), SPEC, ValueError) == b"s3cr3t"
    assert read_owner_only(_file(tmp_path, mode=0o400), SPEC, ValueError) == b"s3cr3t"


@pytest.mark.parametrize("target", ["/dev/null", "/dev/zero", "dir"])
def test_a_device_or_a_directory_is_not_a_regular_file(tmp_path: Path, target: str) -> None:
    path = tmp_path if target == "dir" else Path(target)
    with pytest.raises(ValueError, match=f"^secret_file: {path} is not a regular file$"):
        read_owner_only(path, SPEC, ValueError)


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = make_fifo(tmp_path / "secret")
    raised = raised_without_blocking(lambda: read_owner_only(fifo, SPEC, ValueError), fifo)
    assert str(raised) == f"secret_file: {fifo} is not a regular file"


def test_a_file_others_can_reach_or_too_big_is_refused_without_its_content(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"has mode 0640; .* \(chmod 600 ") as loose:
        read_owner_only(_file(tmp_path, mode=0o640), SPEC, ValueError)
    assert "s3cr3t" not in str(loose.value)
    with pytest.raises(ValueError, match="is over 16 bytes"):
        read_owner_only(_file(tmp_path, b"x" * 17), SPEC, ValueError)


def test_a_missing_file_is_worded_as_the_caller_words_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"^secret_file: {tmp_path / 'nope'} does not exist$"):
        read_owner_only(tmp_path / "nope", SPEC, ValueError)
    worded = SecretFile("kek_file", "the server's user", 16, missing="cannot read {path}: {reason}")
    with pytest.raises(ValueError, match=r"^kek_file: cannot read .*nope: No such file"):
        read_owner_only(tmp_path / "nope", worded, ValueError)
