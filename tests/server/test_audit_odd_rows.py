"""Rows someone wrote behind the log that no event holds (JSON that is not, nesting past the
parser, a blob, text that is not UTF-8): `audit verify` and `audit export`, the real CLI on a
real SQLite datastore, name the row rather than crash or fail the read without naming one."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.audit import EventDraft
from server.cli import main
from svid._clock import FakeClock
from tests.server.audit_setup import AGENT, START, Setup, make_setup, sql, verify


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return make_setup(tmp_path, FakeClock(START))


def filled(setup: Setup, n: int) -> Setup:
    """`n` events in one commit, and a checkpoint of them."""
    drafts = [EventDraft("jwt_minted", agent_id=AGENT, credential_id=f"jti-{i}") for i in range(n)]
    setup.log.append_many(drafts)
    setup.checkpointer.checkpoint()
    return setup


def export(setup: Setup, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    out = setup.data_dir / "export.jsonl"
    code = main(["audit", "export", "--data-dir", str(setup.data_dir), "--out", str(out)])
    seen = capsys.readouterr()
    return code, seen.out + seen.err, out.read_text().splitlines()


NOT_UTF8 = "CAST(X'41ff' AS TEXT)"


@pytest.mark.parametrize(
    ("column", "value", "why"),
    [
        ("extra", "'not json'", "Expecting value"),
        ("extra", "'" + "[" * 100_000 + "]" * 100_000 + "'", "recursion"),
        ("reason", "X'ff00'", "bytes is not JSON serializable"),
        ("reason", NOT_UTF8, "a text column holds bytes that are not UTF-8"),
    ],
)
def test_export_names_the_row_it_cannot_read(
    setup: Setup, capsys: pytest.CaptureFixture[str], column: str, value: str, why: str
) -> None:
    """It raised JSONDecodeError, RecursionError or TypeError out of the CLI (a traceback), or
    for text that is not UTF-8 failed the read naming no row."""
    filled(setup, 8)
    sql(setup.db, f"UPDATE audit_events SET {column} = {value} WHERE seq = 5")
    code, said, lines = export(setup, capsys)
    assert code == 1
    assert "cannot export the event at seq 5" in said, said
    assert why in said
    assert "4 events exported before it" in said
    assert "audit verify" in said
    assert [line.split('"seq":')[1].split(",")[0] for line in lines] == ["1", "2", "3", "4"]


@pytest.mark.parametrize(
    ("n", "seq", "column"),
    [
        (8, 1, "event_id"),  # the first row of the first page
        (1500, 1200, "agent_id"),  # a page after the first (PAGE rows each)
        (8, 8, "credential_id"),
    ],
)
def test_verify_names_a_row_whose_text_is_not_utf8(
    setup: Setup, capsys: pytest.CaptureFixture[str], n: int, seq: int, column: str
) -> None:
    """SQLite keeps any bytes as text; the sqlite3 module refused to read the page holding
    them, and verify said "cannot read the audit log", naming no row."""
    filled(setup, n)
    sql(setup.db, f"UPDATE audit_events SET {column} = {NOT_UTF8} WHERE seq = {seq}")
    anchor = ("--anchor", str(setup.checkpoints), "--anchor-key", str(setup.pinned))
    code, said = verify(setup, capsys, *anchor)
    assert code == 1
    assert f"BROKEN at seq {seq} " in said, said
    assert "unreadable: a text column holds bytes that are not UTF-8" in said
    code, said, _ = export(setup, capsys)
    assert code == 1
    assert f"cannot export the event at seq {seq} " in said, said
