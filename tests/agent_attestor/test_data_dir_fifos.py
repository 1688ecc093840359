"""The agent's other data-directory files, read at start, are read as data_file reads: a FIFO
at one's name (left by a crashed tool, or put there) is not waited on. Each of these read its
file by name, and the start hung for good waiting for a writer."""

from __future__ import annotations

from pathlib import Path

from agent_attestor.agent_store import AgentStore
from agent_attestor.checkpoint_store import FILE_NAME, CheckpointStore
from agent_attestor.errors import CheckpointUnreadableError
from agent_attestor.private_dir import _recorded
from tests.fifo import make_fifo, raised_without_blocking


def test_a_fifo_at_the_join_token_spending_file_is_no_token_spent(tmp_path: Path) -> None:
    store = AgentStore(tmp_path / "agent_svid.der", tmp_path / "agent_key.der", tmp_path / "b")
    fifo = make_fifo(store.spending_path)
    said: list[str] = []
    assert raised_without_blocking(lambda: said.append(store.spent_unsaved()), fifo) is None
    assert said == [""]


def test_a_fifo_at_the_private_dir_record_is_no_directory_recorded(tmp_path: Path) -> None:
    fifo = make_fifo(tmp_path / "private_dir")
    found: list[Path | None] = []
    assert raised_without_blocking(lambda: found.append(_recorded(fifo)), fifo) is None
    assert found == [None]


def test_a_fifo_at_the_audit_checkpoint_copy_stops_the_start_naming_it(tmp_path: Path) -> None:
    fifo = make_fifo(tmp_path / FILE_NAME)
    raised = raised_without_blocking(lambda: CheckpointStore(fifo), fifo)
    assert isinstance(raised, CheckpointUnreadableError)
    assert f"{fifo}: it is a FIFO, not a regular file" in str(raised)


def test_the_audit_checkpoint_copy_still_reads_through_a_link(tmp_path: Path) -> None:
    # `svid-agent audit checkpoint FILE` reads a file the operator names, links included.
    store = CheckpointStore(tmp_path / FILE_NAME)
    assert store.records == []
    (tmp_path / "real").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert CheckpointStore(tmp_path / "link").records == []


def test_a_recorded_private_dir_is_read_back(tmp_path: Path) -> None:
    (tmp_path / "private_dir").write_text("/tmp/svid-agent-x\n")
    assert _recorded(tmp_path / "private_dir") == Path("/tmp/svid-agent-x")
