"""The events after the last signed checkpoint, rewritten or cut behind a running server that
committed them: never signed away, by a checkpoint nor by a prune record.

The chain is read back from the last signed head only. Someone who can write the database
edited the server's own events after it (or made their times old), re-hashed them onward with
the head row, or cut the log back to a seq after it: the chain read back whole, the
checkpointer signed the forged head and the pruner deleted young events behind a valid prune
record, and `audit verify --anchor` passed. The server knows the last event it committed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from server.audit import LedgerError
from server.audit.checkpoint import PRUNE, CheckpointError
from server.audit.checkpointer import Checkpointer
from server.audit.retention import DAY, RetentionPolicy
from server.cli import main
from server.datastore.records import Head
from svid._clock import FakeClock
from tests.server.audit_setup import START, Setup, fill, make_setup, rechain, verify


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    made = make_setup(tmp_path, FakeClock(START))
    # As the server wires it: the datastore shared (records), so stored heads are read back.
    made.checkpointer = Checkpointer.in_data_dir(
        made.log, made.data_dir, made.clock, interval=60.0, records=made.store
    )
    return made


def cut_back(db: Path, to: int) -> None:
    con = sqlite3.connect(db)
    with con:
        digest = con.execute("SELECT hash FROM audit_events WHERE seq = ?", (to,)).fetchone()[0]
        con.execute("DELETE FROM audit_events WHERE seq > ?", (to,))
        con.execute("UPDATE audit_head SET seq = ?, hash = ?", (to, digest))
    con.close()


def anchored(setup: Setup, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    pinned = ("--anchor", str(setup.checkpoints), "--anchor-key", str(setup.pinned))
    return verify(setup, capsys, *pinned)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda db: rechain(db, after=5, decision="deny"),
        lambda db: cut_back(db, 6),
    ],
    ids=["rewritten", "cut-back"],
)
def test_a_checkpoint_refuses_a_stored_head_without_the_servers_own_last_event(
    setup: Setup, capsys: pytest.CaptureFixture[str], tamper: object
) -> None:
    fill(setup.log, setup.clock, 5)
    setup.checkpointer.checkpoint()  # seq 5
    fill(setup.log, setup.clock, 3)  # 6..8, this server's own, not signed yet
    before = setup.checkpoints.read_text()
    tamper(setup.db)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match="own last event, seq 8"):
        setup.checkpointer.checkpoint()
    assert setup.checkpoints.read_text() == before  # nothing signed
    code, said = anchored(setup, capsys)
    assert code == 0, said  # nothing after the newest anchor is known: the refusal is the alarm


def test_a_prune_refuses_to_sign_away_young_events_made_to_look_old(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, setup.clock, 5, step=1.0)  # old by the time of the prune
    setup.checkpointer.checkpoint()  # seq 5
    setup.clock.advance(40 * DAY)
    fill(setup.log, setup.clock, 3, step=1.0)  # 6..8: young, not signed yet
    rechain(setup.db, after=5, ts=START + 10)  # made to look 40 days old
    with pytest.raises(CheckpointError, match="does not run on to seq 8"):
        setup.pruner(RetentionPolicy(max_age=30 * DAY)).prune()
    con = sqlite3.connect(setup.db)
    kept = [r[0] for r in con.execute("SELECT seq FROM audit_events ORDER BY seq")]
    con.close()
    assert kept == list(range(1, 9))  # nothing went
    assert "prune" not in setup.checkpoints.read_text()  # nor was signed


def test_the_loss_is_not_signed_after_the_server_wrote_on_past_it(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server's next write finds the stored head behind its own (LedgerError) and goes on
    from it; its next commit then made the forged chain hold "its own last event", and the
    checkpoint after it signed the cut-back chain."""
    fill(setup.log, setup.clock, 5)
    setup.checkpointer.checkpoint()  # seq 5
    fill(setup.log, setup.clock, 3)
    cut_back(setup.db, 6)
    with pytest.raises(LedgerError, match="cut back or rewritten"):
        setup.log.append("probe")
    setup.log.append("probe")  # seq 7 again, on the cut-back chain
    before = setup.checkpoints.read_text()
    for _ in range(2):
        with pytest.raises(CheckpointError, match="own last event, seq 8"):
            setup.checkpointer.checkpoint()
    assert setup.checkpoints.read_text() == before


def test_the_next_signed_head_is_found_past_a_later_prune_record(setup: Setup) -> None:
    """A prune record signed lately names an old seq: reading on past it finds the checkpoint
    right after a prune's target, so the prune reads back a checkpoint interval of events,
    not everything since its target."""
    sign = setup.checkpointer._signer.sign
    for line in (
        sign(10, "a" * 64, 10, START),
        sign(20, "b" * 64, 20, START + 60),
        sign(5, "c" * 64, 5, START + 90, PRUNE, last_ts=START),
        sign(30, "d" * 64, 30, START + 120),
    ):
        setup.checkpointer._file.append(line)
    assert setup.checkpointer.signed_from(15) == Head(20, "b" * 64)
    assert setup.checkpointer.signed_from(31) is None


def test_a_prune_by_hand_stops_at_the_last_signed_head(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """`audit prune` beside a running server commits nothing itself: it took the stored head
    as it found it, so the server's events after its last checkpoint, made to look old and
    re-hashed, were signed away and deleted, and verify passed."""
    fill(setup.log, setup.clock, 5, step=1.0)
    setup.checkpointer.checkpoint()  # seq 5
    setup.clock.advance(40 * DAY)
    fill(setup.log, setup.clock, 3, step=1.0)  # 6..8: the server's, young, not signed yet
    rechain(setup.db, after=5, ts=START + 10)
    before = str(setup.clock.now() - 30 * DAY)
    code = main(["audit", "prune", "--data-dir", str(setup.data_dir), "--before", before])
    assert code == 0, capsys.readouterr()
    con = sqlite3.connect(setup.db)
    kept = [r[0] for r in con.execute("SELECT seq FROM audit_events ORDER BY seq")]
    con.close()
    assert kept == [6, 7, 8]  # the old events went, the unsigned ones stay
