"""The agent's data-directory reader (agent_attestor/data_file.py) checks the file it opened,
not the name: a link planted at a data file's name is refused, not followed; a FIFO is not
waited on; a file past the bound is not read into memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_attestor.data_file import MAX_BYTES, read_data_file, regular_file
from agent_attestor.errors import DataFileUnreadableError
from tests.fifo import make_fifo, raised_without_blocking


def test_a_regular_file_is_read_and_a_missing_one_is_none(tmp_path: Path) -> None:
    (tmp_path / "bundle.der").write_bytes(b"roots")
    assert read_data_file(tmp_path / "bundle.der", "trust bundle file") == b"roots"
    assert read_data_file(tmp_path / "nope", "trust bundle file") is None
    assert regular_file(tmp_path / "bundle.der", "x")
    assert not regular_file(tmp_path / "nope", "x")


def test_a_link_at_a_data_files_name_is_refused_naming_it(tmp_path: Path) -> None:
    # The agent writes these files by rename, never as links: one there was planted, and
    # following it read a file of someone else's choosing as the agent's roots or key.
    elsewhere = tmp_path / "elsewhere.der"
    elsewhere.write_bytes(b"someone else's roots")
    link = tmp_path / "bundle.der"
    link.symlink_to(elsewhere)
    for check in (read_data_file, regular_file):
        with pytest.raises(DataFileUnreadableError) as refused:
            check(link, "trust bundle file")
        assert str(refused.value) == (
            f"trust bundle file: cannot read {link}: it is a symbolic link, not a regular file; "
            "make it a file this agent's user can read, or remove it"
        )


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = make_fifo(tmp_path / "bundle.der.sequence")
    raised = raised_without_blocking(lambda: read_data_file(fifo, "bundle sequence file"), fifo)
    assert isinstance(raised, DataFileUnreadableError)
    assert "it is a FIFO, not a regular file" in str(raised)


def test_a_file_past_the_bound_is_refused_unread(tmp_path: Path) -> None:
    huge = tmp_path / "agent_svid.der"
    with huge.open("wb") as f:
        f.truncate(MAX_BYTES + 1)  # sparse: no time spent writing it
    with pytest.raises(DataFileUnreadableError, match=f"it is over {MAX_BYTES} bytes"):
        read_data_file(huge, "agent SVID file")


def test_an_error_opening_it_is_said_as_the_os_says_it(tmp_path: Path) -> None:
    # A path under a regular file: refused to root too (a mode of 0 is not: CI runs as root).
    (tmp_path / "data").write_bytes(b"")
    blocked = tmp_path / "data" / "agent_key.der"
    with pytest.raises(DataFileUnreadableError, match=f"cannot read {blocked}: Not a directory"):
        read_data_file(blocked, "agent key file")
