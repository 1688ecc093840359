"""The /tmp directory of an agent whose data_dir is too deep for a socket path: one per
data_dir, and a stop removes its own only, whatever other agents run on the machine."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_attestor.config import AgentConfig, build_config
from agent_attestor.private_dir import RECORD, release, resolve_private_dir

DEEP = "/".join(["a-rather-long-directory-name"] * 5)


@pytest.fixture
def tmpdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """$TMPDIR for these agents, so what they leave is counted apart from the machine's /tmp."""
    path = Path(tempfile.mkdtemp(prefix="svt", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    yield path
    for left in path.iterdir():
        left.rmdir()
    path.rmdir()


def _config(tmp_path: Path, name: str) -> AgentConfig:
    return build_config({}, {"data_dir": str(tmp_path / name / DEEP)})


def test_each_data_dir_has_its_own_and_a_stop_removes_its_own_only(
    tmp_path: Path, tmpdir: Path
) -> None:
    one, two = _config(tmp_path, "one"), _config(tmp_path, "two")
    first, second = resolve_private_dir(one), resolve_private_dir(two)
    assert first.path != second.path
    assert {first.path.parent, second.path.parent} == {tmpdir}
    (second.path / "api.sock").touch()
    release(first)
    assert list(tmpdir.iterdir()) == [second.path]
    assert not first.record or not first.record.exists()
    # A crashed run's directory is taken up by the next start of its data_dir, not another's.
    assert resolve_private_dir(two).path == second.path
    release(second)
    assert list(tmpdir.iterdir()) == []


@pytest.mark.parametrize("planted", ["other dir", "symlink", "open to others"])
def test_a_recorded_dir_that_is_not_ours_is_neither_used_nor_removed(
    tmp_path: Path, tmpdir: Path, planted: str
) -> None:
    config = _config(tmp_path, "one")
    made = resolve_private_dir(config)
    made.path.rmdir()  # gone (a /tmp cleaner), and something else in its place or named
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    if planted == "other dir":
        assert made.record is not None
        made.record.write_text(f"{target}\n")
    elif planted == "symlink":
        made.path.symlink_to(target)
    else:
        made.path.mkdir()
        os.chmod(made.path, 0o777)
    again = resolve_private_dir(config)
    assert again.path not in (made.path, target)
    assert again.path.parent == tmpdir
    release(again)
    assert target.is_dir()
    assert (config.data_dir / RECORD).exists() is False
    if planted == "symlink":
        made.path.unlink()
    elif planted == "open to others":
        made.path.rmdir()
