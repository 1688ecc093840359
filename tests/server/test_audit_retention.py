"""Audit retention: the oldest events go behind a signed prune record, and `audit verify`
still proves the rest (from the base), catches a forged base, and takes old checkpoints in its
stride. Real SQLite files, a real checkpoint key and file, a fake clock."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from server.audit import AuditLog, Break
from server.audit.checkpoint import (
    CHECKPOINT_FILE,
    PRUNE,
    PUBLIC_KEY_FILE,
    Checkpoint,
    CheckpointError,
    CheckpointFile,
    CheckpointSigner,
    load_public_key,
)
from server.audit.checkpointer import Checkpointer
from server.audit.retention import DAY, Cut, Pruner, RetentionPolicy
from server.cli import main
from server.datastore.errors import StorageError
from server.datastore.records import Credential, Head
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from svid import AuditCheckpointError
from svid._clock import FakeClock
from tests.clocks import SteppedClock
from tests.server.audit_setup import AGENT, START, Setup, make_setup, rechain, sql, verify
from tests.server.audit_setup import fill as fill_events
from tests.server.fixtures import admit_agents

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def setup(tmp_path: Path, clock: FakeClock) -> Setup:
    return make_setup(tmp_path, clock)


def fill(log: AuditLog, clock: FakeClock, n: int, step: float = DAY) -> None:
    """One event a day unless told otherwise."""
    fill_events(log, clock, n, step)


def seqs(db: Path) -> list[int]:
    con = sqlite3.connect(db)
    rows = [r[0] for r in con.execute("SELECT seq FROM audit_events ORDER BY seq")]
    con.close()
    return rows


def hash_at(db: Path, seq: int) -> str:
    con = sqlite3.connect(db)
    row = con.execute("SELECT hash FROM audit_events WHERE seq = ?", (seq,)).fetchone()
    con.close()
    return str(row[0])


def base_row(db: Path) -> tuple[int, str] | None:
    con = sqlite3.connect(db)
    row = con.execute("SELECT seq, hash FROM audit_base").fetchone()
    con.close()
    return None if row is None else (row[0], row[1])


def lines(setup: Setup) -> list[Checkpoint]:
    return [Checkpoint.parse(line) for line in setup.checkpoints.read_text().splitlines()]


def pinned_verify(setup: Setup, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    return verify(
        setup,
        capsys,
        "--anchor",
        str(setup.checkpoints),
        "--anchor-key",
        str(setup.pinned),
        *extra,
    )


# -- policy -----------------------------------------------------------------------------------


def test_the_policy_cuts_by_age_and_by_count_and_off_is_off() -> None:
    assert RetentionPolicy(0, 0).cut(1000.0, 50) is None
    assert RetentionPolicy(100, 0).cut(1000.0, 50) == Cut(before=900.0)
    assert RetentionPolicy(0, 10).cut(1000.0, 50) == Cut(through=40)
    both = RetentionPolicy(100, 10).cut(1000.0, 50)
    assert both == Cut(before=900.0, through=40)


# -- pruning ----------------------------------------------------------------------------------


def test_events_older_than_retention_go_and_the_chain_verifies_from_the_base(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, setup.clock, 10)  # one a day: ts = start + 0d .. 9d, now = start + 10d
    setup.checkpointer.checkpoint()
    hash6 = hash_at(setup.db, 6)
    report = setup.pruner(RetentionPolicy(max_age=4.5 * DAY)).prune()
    # Older than 4.5 days at start + 10d: written before start + 5.5d, seqs 1..6.
    assert report.removed == 6
    assert report.base == Head(6, hash6)
    assert seqs(setup.db) == [7, 8, 9, 10]
    assert base_row(setup.db) == (6, hash6)
    code, out = pinned_verify(setup, capsys)
    assert code == 0, out
    assert "audit chain OK: 4 events" in out
    assert "6 events pruned through seq 6 (signed by the prune record of" in out
    assert "matches the checkpoint of" in out
    # Again at once: nothing more is old enough, and no new record is signed.
    assert setup.pruner(RetentionPolicy(max_age=4.5 * DAY)).prune().removed == 0
    assert [cp.kind for cp in lines(setup)] == ["checkpoint", PRUNE]


def test_the_prune_record_is_signed_with_the_pinned_key_before_anything_goes(
    setup: Setup,
) -> None:
    fill(setup.log, setup.clock, 9)
    expected = hash_at(setup.db, 5)
    setup.pruner(RetentionPolicy(max_age=0, max_events=4)).prune()
    (record,) = [cp for cp in lines(setup) if cp.kind == PRUNE]
    assert (record.seq, record.hash, record.count) == (5, expected, 5)
    assert record.time == setup.clock.now()
    _, key = load_public_key(setup.pinned)
    record.verify_signature(key)
    # `kind` is signed: the same line passed off as a checkpoint does not verify.
    as_checkpoint = dataclasses.replace(record, kind="checkpoint")
    with pytest.raises(AuditCheckpointError, match="signature does not verify"):
        as_checkpoint.verify_signature(key)
    line = json.loads(setup.checkpoints.read_text().splitlines()[-1])
    assert line["kind"] == "prune"
    line["kind"] = "checkpoint"
    with pytest.raises(AuditCheckpointError, match="unknown kind"):
        Checkpoint.parse(json.dumps(line))


def test_the_prune_record_signs_the_time_its_last_removed_event_was_written(
    setup: Setup,
) -> None:
    """Without it a key holder's prune of the last hour reads like one of last year's."""
    fill(setup.log, setup.clock, 9)
    written = START + 4 * DAY  # seq 5, the fifth of one event a day
    setup.pruner(RetentionPolicy(max_age=0, max_events=4)).prune()
    (record,) = [cp for cp in lines(setup) if cp.kind == PRUNE]
    assert record.last_ts == written
    _, key = load_public_key(setup.pinned)
    record.verify_signature(key)
    with pytest.raises(AuditCheckpointError, match="signature does not verify"):
        dataclasses.replace(record, last_ts=written - 400 * DAY).verify_signature(key)
    # A record signed before it existed (no last_ts) still verifies: its bytes are unchanged.
    signer = CheckpointSigner.load_or_create(setup.data_dir)
    old = signer.sign(5, record.hash, 5, record.time, PRUNE)
    assert "last_ts" not in old.to_line()
    Checkpoint.parse(old.to_line()).verify_signature(key)
    # Only prune records carry it.
    line = json.loads(signer.sign(5, record.hash, 5, record.time).to_line())
    line["last_ts"] = written
    with pytest.raises(AuditCheckpointError, match="only prune records"):
        Checkpoint.parse(json.dumps(line))


def test_a_count_bound_keeps_the_newest_events(setup: Setup) -> None:
    fill(setup.log, setup.clock, 11, step=1)
    report = setup.pruner(RetentionPolicy(max_age=0, max_events=3)).prune()
    assert report.removed == 8
    assert seqs(setup.db) == [9, 10, 11]


def test_retention_off_keeps_everything(setup: Setup) -> None:
    fill(setup.log, setup.clock, 5, step=400 * DAY)
    assert setup.pruner(RetentionPolicy(0, 0)).prune().removed == 0
    assert seqs(setup.db) == [1, 2, 3, 4, 5]
    assert not setup.checkpoints.exists() or not [c for c in lines(setup) if c.kind == PRUNE]


def test_only_a_prefix_goes_even_when_a_clock_step_wrote_older_events_later(
    tmp_path: Path,
) -> None:
    clock = SteppedClock(FakeClock(1_800_000_000.0))  # a step back moves its offset
    store = SqliteDataStore(tmp_path / "datastore.sqlite3", clock)
    log = AuditLog(store, clock)
    checkpointer = Checkpointer.in_data_dir(
        log,
        tmp_path,
        clock,
        interval=60.0,
    )
    for day in (0, 1, 2, 0.5, 1.5):  # the last two written after a step back
        clock.offset = day * DAY
        log.append("jwt_minted", agent_id=AGENT)
    clock.offset = 3 * DAY
    pruner = Pruner(store, log, checkpointer, clock, RetentionPolicy(1.8 * DAY), pause=0)
    assert pruner.prune().removed == 2  # older than day 1.2: days 0 and 1
    # Seq 3 (day 2) is young enough to stay, so seq 4 (day 0.5) stays behind it.
    assert seqs(tmp_path / "datastore.sqlite3") == [3, 4, 5]


def test_everything_can_go_and_the_log_carries_on(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, setup.clock, 5)
    setup.clock.advance(10 * DAY)
    setup.pruner(RetentionPolicy(max_age=DAY)).prune()
    assert seqs(setup.db) == []
    code, out = pinned_verify(setup, capsys)
    assert code == 0, out
    assert "audit chain OK: 0 events, head seq 5" in out
    fill(setup.log, setup.clock, 2)
    setup.checkpointer.checkpoint()
    code, out = pinned_verify(setup, capsys)
    assert code == 0, out
    assert "audit chain OK: 2 events, head seq 7" in out


def test_a_base_that_is_not_a_link_of_the_chain_is_refused(setup: Setup) -> None:
    fill(setup.log, setup.clock, 5)
    with pytest.raises(StorageError, match="missing or has another hash"):
        setup.store.prune_audit(Head(3, "ab" * 32), setup.clock.now())
    assert seqs(setup.db) == [1, 2, 3, 4, 5]
    assert base_row(setup.db) is None


# -- verify after pruning ---------------------------------------------------------------------


@pytest.fixture
def pruned(setup: Setup) -> Setup:
    """10 events, checkpoints at 3 and 10, pruned through 6 (batches of 4: bases 4, then 6)."""
    fill(setup.log, setup.clock, 3)
    setup.checkpointer.checkpoint()
    fill(setup.log, setup.clock, 7)
    setup.checkpointer.checkpoint()
    setup.pruner(RetentionPolicy(max_age=0, max_events=4)).prune()
    assert seqs(setup.db) == [7, 8, 9, 10]
    return setup


def test_checkpoints_of_pruned_events_are_no_false_alarm(
    pruned: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(pruned.log, pruned.clock, 1)
    code, out = pinned_verify(pruned, capsys)
    assert code == 0, out
    assert "1 older checkpoint(s) name pruned events" in out
    assert "matches the checkpoint of" in out


def test_a_base_moved_further_without_a_prune_record_is_forged(
    pruned: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    hash8 = hash_at(pruned.db, 8)
    pruned.store.close()
    sql(
        pruned.db,
        "DELETE FROM audit_events WHERE seq <= 8",
        f"UPDATE audit_base SET seq = 8, hash = '{hash8}'",
    )
    code, out = verify(pruned, capsys)
    assert code == 0  # the database alone cannot tell
    assert "unchecked without a checkpoint file" in out
    code, out = pinned_verify(pruned, capsys)
    assert code == 1
    assert f"BROKEN at seq 8: {Break.FORGED_BASE}" in out
    assert "no signed prune record reaches that far" in out


def test_a_prune_between_the_reading_of_the_anchors_and_the_snapshot_is_no_false_alarm(
    setup: Setup, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verify of a live server reads the checkpoint file, then the log; a prune that signs
    its record and moves the base in between must not read as a forged base."""
    import server.audit.cli as audit_cli

    fill(setup.log, setup.clock, 10)
    setup.checkpointer.checkpoint()
    read_anchors = audit_cli._anchors
    reads: list[int] = []

    def read_then_prune(anchor: str | None, key: Path | None) -> tuple[list[object], str]:
        found = read_anchors(anchor, key)
        reads.append(len(found[0]))
        if len(reads) == 1:  # the server prunes right after the verify read its file
            assert setup.pruner(RetentionPolicy(max_age=4.5 * DAY)).prune().removed == 6
        return found

    monkeypatch.setattr(audit_cli, "_anchors", read_then_prune)
    code, out = pinned_verify(setup, capsys)
    assert code == 0, out
    assert "6 events pruned through seq 6 (signed by the prune record of" in out
    assert reads == [1, 2]  # read again, with the prune record


def test_a_base_with_another_hash_is_forged(
    pruned: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone rewrote the first kept event and re-hashed onward from a made-up base."""
    pruned.store.close()
    sql(pruned.db, f"UPDATE audit_base SET hash = '{'ab' * 32}'")
    code, out = pinned_verify(pruned, capsys)
    assert code == 1
    assert str(Break.FORGED_BASE) in out
    assert "signed hash" in out


def test_a_base_invented_on_a_log_never_pruned_is_forged(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, setup.clock, 6)
    setup.checkpointer.checkpoint()
    hash3 = hash_at(setup.db, 3)
    setup.store.close()
    sql(
        setup.db,
        "DELETE FROM audit_events WHERE seq <= 3",
        f"INSERT INTO audit_base (id, seq, hash, pruned_at) VALUES (1, 3, '{hash3}', 0)",
    )
    code, out = pinned_verify(setup, capsys)
    assert (code, str(Break.FORGED_BASE) in out) == (1, True)


def test_a_noted_anchor_behind_a_base_nothing_signed_is_a_forged_base(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator noted `2:HASH` (as verify prints). Someone with SQL access deletes events
    1..3 and writes a base row naming event 3: no prune happened. The noted anchor is not
    dropped as naming a pruned event: no signed prune record vouches for the base."""
    fill(setup.log, setup.clock, 5)
    noted = {seq: hash_at(setup.db, seq) for seq in (2, 3)}
    setup.store.close()
    sql(
        setup.db,
        "DELETE FROM audit_events WHERE seq <= 3",
        f"INSERT INTO audit_base (id, seq, hash, pruned_at) VALUES (1, 3, '{noted[3]}', 0)",
    )
    for seq in (2, 3):
        code, out = verify(setup, capsys, "--anchor", f"{seq}:{noted[seq]}")
        assert code == 1, out
        assert f"BROKEN at seq 3: {Break.FORGED_BASE}" in out
        assert f"the anchor seq {seq} names seq {seq}" in out
        assert "(seq 3)" in out
    # An anchor after the base is looked for as ever.
    assert verify(setup, capsys, "--anchor", f"4:{hash_at(setup.db, 4)}")[0] == 0


def test_a_noted_anchor_after_a_signed_base_still_verifies(
    pruned: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only an anchor at or before the base is judged so: one after it is matched as ever,
    and the signed checkpoint file still takes its own pruned checkpoints in its stride."""
    code, out = verify(pruned, capsys, "--anchor", f"8:{hash_at(pruned.db, 8)}")
    assert code == 0, out
    code, out = verify(pruned, capsys, "--anchor", f"5:{'ab' * 32}")
    assert (code, str(Break.FORGED_BASE) in out) == (1, True)
    assert pinned_verify(pruned, capsys)[0] == 0


def test_a_dropped_base_row_shows_as_deleted_events(
    pruned: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    pruned.store.close()
    sql(pruned.db, "DELETE FROM audit_base")
    code, out = verify(pruned, capsys)
    assert code == 1
    assert f"{Break.DELETED}: events 1..6 are missing" in out


def test_truncation_and_rechaining_of_the_kept_events_are_still_caught(
    pruned: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    db = pruned.db
    pruned.store.close()
    backup = db.read_bytes()
    # A cut tail with its head row fixed.
    hash8 = hash_at(db, 8)
    sql(
        db,
        "DELETE FROM audit_events WHERE seq > 8",
        f"UPDATE audit_head SET seq = 8, hash = '{hash8}'",
    )
    code, out = pinned_verify(pruned, capsys)
    assert (code, f"{Break.TRUNCATED}" in out) == (1, True)
    # Everything kept deleted, head row too: the base alone is left.
    db.write_bytes(backup)
    sql(db, "DELETE FROM audit_events", "DELETE FROM audit_head")
    code, out = pinned_verify(pruned, capsys)
    assert (code, f"{Break.TRUNCATED}" in out) == (1, True)
    # An edit re-hashed from the (true) base onward.
    db.write_bytes(backup)
    rechain(db, only=8, decision="deny")
    code, out = verify(pruned, capsys)
    assert code == 0  # the chain has no key
    code, out = pinned_verify(pruned, capsys)
    assert code == 1
    assert "BROKEN at seq 10 (event" in out
    assert str(Break.RECHAINED) in out


def test_a_chain_rewritten_behind_a_checkpoint_is_not_signed_away_by_a_prune(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    # The checkpointer refuses to sign over a rewritten history; a prune past its last good
    # checkpoint would sign the forged hash instead, and from then on the forgery would verify.
    fill(setup.log, setup.clock, 5)
    setup.checkpointer.checkpoint()  # seq 5, signed
    fill(setup.log, setup.clock, 5)
    rechain(setup.db, only=3, decision="deny")
    before = setup.checkpoints.read_text()
    with pytest.raises(CheckpointError, match="from the signed seq 5 to seq 7"):
        setup.pruner(RetentionPolicy(max_age=0, max_events=3)).prune()
    assert seqs(setup.db) == list(range(1, 11))  # nothing went
    assert base_row(setup.db) is None
    assert setup.checkpoints.read_text() == before  # and nothing was signed
    code, out = pinned_verify(setup, capsys)
    assert code == 1
    assert str(Break.RECHAINED) in out


def test_the_anchor_file_must_keep_prunes_and_checkpoints_in_order(
    setup: Setup, clock: FakeClock
) -> None:
    signer = CheckpointSigner.load_or_create(setup.data_dir)
    file = CheckpointFile(setup.checkpoints)
    file.append(signer.sign(9, "a" * 64, 9, clock.now()))
    file.append(signer.sign(6, "b" * 64, 6, clock.now(), PRUNE))
    file.append(signer.sign(4, "c" * 64, 4, clock.now(), PRUNE))
    with pytest.raises(CheckpointError, match="line 3: a prune through seq 4 comes after one"):
        file.anchors()
    setup.checkpoints.write_text("")
    file.append(signer.sign(6, "b" * 64, 6, clock.now(), PRUNE))
    file.append(signer.sign(5, "d" * 64, 5, clock.now()))
    with pytest.raises(CheckpointError, match="checkpoint seq 5 comes after a prune through"):
        file.anchors()
    setup.checkpoints.write_text("")
    file.append(signer.sign(6, "b" * 64, 6, clock.now(), PRUNE))
    file.append(signer.sign(6, "e" * 64, 6, clock.now()))
    with pytest.raises(CheckpointError, match="two different hashes"):
        file.anchors()


# -- crashes and concurrency ------------------------------------------------------------------


class FailingBatch(FaultInjectingDataStore):
    """The datastore, with one delete batch (the `fail_at`-th) failing as a full disk would."""

    def __init__(self, inner: SqliteDataStore, fail_at: int) -> None:
        super().__init__(inner)
        self.batches = 0
        self.fail_at = fail_at

    def prune_audit(self, through: Head, now: float) -> int:
        self.batches += 1
        if self.batches == self.fail_at:
            raise StorageError("cannot prune the audit log: disk I/O error")
        return super().prune_audit(through, now)


def test_a_prune_cut_short_leaves_a_verifiable_log_and_the_next_run_finishes_it(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, setup.clock, 12)
    setup.checkpointer.checkpoint()
    # Batches of 4 through seq 10: the first (through 4) commits, the second fails.
    faulty = FailingBatch(setup.store, fail_at=2)
    with pytest.raises(StorageError):
        setup.pruner(RetentionPolicy(max_age=0, max_events=2), store=faulty).prune()
    base = base_row(setup.db)
    assert base is not None
    assert base[0] == 4
    code, out = pinned_verify(setup, capsys)
    assert code == 0, out
    assert "4 events pruned through seq 4 (a prune through seq 10 cut short" in out
    # The next run carries on to 10 under the record already signed.
    report = setup.pruner(RetentionPolicy(max_age=0, max_events=2)).prune()
    assert report.removed == 6
    assert [cp.kind for cp in lines(setup)].count(PRUNE) == 1
    code, out = pinned_verify(setup, capsys)
    assert code == 0, out
    assert "10 events pruned through seq 10 (signed by the prune record" in out


def test_a_prune_signed_but_not_begun_still_verifies(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, setup.clock, 6)
    faulty = FaultInjectingDataStore(setup.store)
    faulty.inject(StorageError("disk full"), method="prune_audit")
    with pytest.raises(StorageError):
        setup.pruner(RetentionPolicy(max_age=0, max_events=1), store=faulty).prune()
    assert base_row(setup.db) is None
    code, out = pinned_verify(setup, capsys)
    assert code == 0, out
    assert "matches the prune record of" in out
    # And the record is an anchor like any other: a re-hashed log fails against it.
    setup.store.close()
    rechain(setup.db, only=2, decision="deny")
    code, out = pinned_verify(setup, capsys)
    assert (code, str(Break.RECHAINED) in out) == (1, True)


def test_issuance_goes_on_while_a_prune_runs(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [("jwt_minted", AGENT, None, None, None, None, "allow", None, None, None, f"j{i}",
             (), None, 300, None, {}) for i in range(2000)]  # fmt: skip
    for _ in range(10):
        setup.log.append_tuples(rows)
    setup.clock.advance(DAY)
    admit_agents(setup.store, AGENT)
    stop = threading.Event()
    appended: list[float] = []
    errors: list[BaseException] = []

    def issue() -> None:
        i = 0
        while not stop.is_set():
            cred = Credential("jwt", f"live-{i}", AGENT, AGENT, "", 2_000_000_000)
            t0 = time.perf_counter()
            try:
                setup.log.record([cred], [(*rows[0][:10], f"live-{i}", *rows[0][11:])])
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
                return
            appended.append(time.perf_counter() - t0)
            i += 1

    thread = threading.Thread(target=issue)
    thread.start()
    try:
        report = setup.pruner(RetentionPolicy(max_age=0.5 * DAY), batch=1000).prune()
    finally:
        stop.set()
        thread.join(10)
    assert not errors, errors
    assert report.removed == 20_000
    assert appended, "no credential was issued while the prune ran"
    setup.checkpointer.checkpoint()
    code, out = pinned_verify(setup, capsys)
    assert code == 0, out
    assert f"audit chain OK: {len(appended)} events" in out


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from server.audit import AuditLog
    from server.audit.checkpoint import CheckpointSigner
    from server.datastore.sqlite import SqliteDataStore
    from svid._clock import SystemClock

    data = Path(sys.argv[1])
    data.mkdir()
    clock = SystemClock()
    log = AuditLog(SqliteDataStore(data / "datastore.sqlite3", clock), clock)
    CheckpointSigner.load_or_create(data)
    row = ("jwt_minted", "spiffe://example.org/a", None, None, None, None, "allow", None, None,
           None, "jti", (), None, 300, None, {})
    for _ in range(30):
        log.append_tuples([row] * 1000)
    """
)


def test_kill_9_in_the_middle_of_a_prune_leaves_a_verifiable_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", WRITER, str(data)], check=True, cwd=REPO, env=env)
    db = data / "datastore.sqlite3"
    prune = [
        sys.executable, "-m", "server.cli", "audit", "prune", "--data-dir", str(data),
        "--through-seq", "25000", "--batch", "100",
    ]  # fmt: skip
    child = subprocess.Popen(prune, cwd=REPO, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            base = base_row(db) if db.exists() else None
            if base is not None and base[0] >= 1000:
                break
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    base = base_row(db)
    assert base is not None
    assert 1000 <= base[0] < 25_000, "the kill did not land in the middle of the prune"
    anchor = ["--anchor", str(data / CHECKPOINT_FILE), "--anchor-key", str(data / PUBLIC_KEY_FILE)]
    code = main(["audit", "verify", "--data-dir", str(data), *anchor])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "a prune through seq 25000 cut short" in out
    code = main(["audit", "prune", "--data-dir", str(data), "--through-seq", "25000"])
    assert code == 0
    assert "the log starts after seq 25000" in capsys.readouterr().out
    code = main(["audit", "verify", "--data-dir", str(data), *anchor])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "audit chain OK: 5000 events" in out
    assert "25000 events pruned through seq 25000 (signed by the prune record" in out


def test_the_prune_command_needs_the_servers_key(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    store = SqliteDataStore(tmp_path / "datastore.sqlite3", clock)
    fill(AuditLog(store, clock), clock, 3)
    store.close()
    code = main(["audit", "prune", "--data-dir", str(tmp_path), "--through-seq", "2"])
    assert code == 1
    assert "no audit checkpoint key" in capsys.readouterr().err
    assert seqs(tmp_path / "datastore.sqlite3") == [1, 2, 3]


def test_the_prune_command_says_a_postgresql_datastore_prunes_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It looked for a SQLite file in data_dir and said there was no datastore, on servers
    whose config names their PostgreSQL one."""
    config = tmp_path / "server.toml"
    config.write_text(
        f'trust_domain = "example.org"\ndata_dir = "{tmp_path}"\n'
        'datastore = "postgresql://svidd@127.0.0.1:1/svidd"\n'
    )
    assert main(["audit", "prune", "--config", str(config), "--through-seq", "2"]) == 1
    said = capsys.readouterr().err
    assert "the config's datastore is PostgreSQL" in said
    assert "audit_retention_days" in said


def test_the_prune_command_refuses_a_batch_past_int64(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    # SQLite raised OverflowError binding it: a traceback, with nothing pruned.
    fill(setup.log, setup.clock, 3)
    argv = ["audit", "prune", "--data-dir", str(setup.data_dir), "--through-seq", "2"]
    assert main([*argv, "--batch", str(2**63)]) == 1
    assert capsys.readouterr().err == f"svid-server: error: --batch: must be at most {2**63 - 1}\n"
    assert seqs(setup.db) == [1, 2, 3]


def test_the_prune_command_takes_a_time(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    fill(setup.log, setup.clock, 5)
    before = 1_800_000_000.0 + 2.5 * DAY
    code = main(
        ["audit", "prune", "--data-dir", str(setup.data_dir), "--before", str(before),
         "--output", "json"]
    )  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["removed"], report["pruned_through"]) == (3, 3)
    assert report["record"]["kind"] == "prune"
    assert seqs(setup.db) == [4, 5]


def test_the_prune_command_applies_the_configured_policy(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, setup.clock, 6, step=1)
    config = tmp_path / "server.toml"
    config.write_text(
        f'trust_domain = "example.org"\ndata_dir = "{setup.data_dir}"\n'
        "audit_retention_days = 0\naudit_max_events = 0\n"
    )
    assert main(["audit", "prune", "--config", str(config)]) == 1
    assert "retention is off" in capsys.readouterr().err
    config.write_text(config.read_text().replace("audit_max_events = 0", "audit_max_events = 2"))
    assert main(["audit", "prune", "--config", str(config)]) == 0
    assert "removed 4 events; the log starts after seq 4" in capsys.readouterr().out
    assert seqs(setup.db) == [5, 6]


def retention_verify(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> tuple[int, str]:
    """verify --anchor stating a 30-day retention was always in force."""
    return pinned_verify(setup, capsys, "--min-prune-age-days", "30")


def test_a_prune_of_events_younger_than_the_retention_is_a_young_prune(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A key holder prunes through the head: the log and its record verify, but the record
    says when the removed events were written, and verify holds that against the retention."""
    fill(setup.log, setup.clock, 10)
    setup.checkpointer.checkpoint()
    setup.pruner(RetentionPolicy(max_age=30 * DAY)).prune(Cut(through=10))
    assert seqs(setup.db) == []
    code, out = retention_verify(setup, capsys, tmp_path)
    assert code == 1, out
    assert f"BROKEN: {Break.YOUNG_PRUNE}" in out
    assert "the prune record through seq 10 removes events written less than 30 days" in out
    # Without the flag (every manual prune of recent events) it is not held against one.
    assert pinned_verify(setup, capsys)[0] == 0


def test_a_prune_record_signing_a_false_time_is_caught_by_a_checkpoint_before_it(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The key holder signs its prune's last removed event as a year old: a checkpoint signed
    a week ago names fewer events, so the events it removes were written since."""
    fill(setup.log, setup.clock, 3)
    setup.checkpointer.checkpoint()
    fill(setup.log, setup.clock, 7)
    signer = CheckpointSigner.load_or_create(setup.data_dir)
    lie = signer.sign(
        10, hash_at(setup.db, 10), 10, setup.clock.now(), PRUNE, last_ts=START - 365 * DAY
    )
    CheckpointFile(setup.checkpoints).append(lie)
    code, out = retention_verify(setup, capsys, tmp_path)
    assert code == 1, out
    assert f"BROKEN: {Break.YOUNG_PRUNE}" in out
    assert "removes events written after a checkpoint signed at" in out


def test_a_prune_of_events_older_than_the_retention_verifies(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fill(setup.log, setup.clock, 40)
    setup.checkpointer.checkpoint()
    assert setup.pruner(RetentionPolicy(max_age=30 * DAY)).prune().removed == 10
    code, out = retention_verify(setup, capsys, tmp_path)
    assert code == 0, out
    assert "10 events pruned through seq 10" in out


def test_an_honest_prune_under_a_shorter_retention_still_verifies_after_raising_it(
    setup: Setup, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Retention was 10 days when the prune was signed; the operator raised it to 30 since.
    The config's value today does not judge past records: only --min-prune-age-days does,
    and the operator states the smallest retention ever in force."""
    fill(setup.log, setup.clock, 40)
    setup.checkpointer.checkpoint()
    assert setup.pruner(RetentionPolicy(max_age=10 * DAY)).prune().removed == 30
    setup.checkpointer.checkpoint()
    config = tmp_path / "server.toml"
    config.write_text(
        f'trust_domain = "example.org"\ndata_dir = "{setup.data_dir}"\naudit_retention_days = 30\n'
    )
    code, out = pinned_verify(setup, capsys, "--config", str(config))
    assert code == 0, out
    code, out = pinned_verify(setup, capsys, "--config", str(config), "--min-prune-age-days", "10")
    assert code == 0, out
    # Stating a longer retention than the one the prune ran under flags it, as it should.
    code, out = pinned_verify(setup, capsys, "--min-prune-age-days", "30")
    assert code == 1, out
    assert f"BROKEN: {Break.YOUNG_PRUNE}" in out
    assert "--min-prune-age-days is 30" in out


def test_min_prune_age_days_needs_an_anchor_file(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, setup.clock, 3)
    code, out = verify(setup, capsys, "--min-prune-age-days", "10")
    assert code != 0
    assert "--min-prune-age-days: needs --anchor FILE" in out


# -- the ticker -------------------------------------------------------------------------------


def test_the_pruner_prunes_on_its_interval(setup: Setup) -> None:
    fill(setup.log, setup.clock, 50, step=1)
    pruner = Pruner(
        setup.store,
        setup.log,
        setup.checkpointer,
        setup.clock,
        RetentionPolicy(0, 5),
        interval=0.02,
        batch=4,
        pause=0,
    )

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(pruner.run(stop))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if seqs(setup.db) == [46, 47, 48, 49, 50]:
                break
        stop.set()
        await task

    asyncio.run(run())
    assert seqs(setup.db) == [46, 47, 48, 49, 50]


class GatedStore(FaultInjectingDataStore):
    """The datastore, with every delete batch waiting until the test lets it go."""

    def __init__(self, inner: SqliteDataStore) -> None:
        super().__init__(inner)
        self.entered = threading.Event()
        self.release = threading.Event()

    def prune_audit(self, through: Head, now: float) -> int:
        self.entered.set()
        assert self.release.wait(10)
        return super().prune_audit(through, now)


def test_a_shutdown_waits_for_the_batch_in_flight_and_starts_no_other(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, setup.clock, 20, step=1)
    gated = GatedStore(setup.store)
    pruner = Pruner(
        gated, setup.log, setup.checkpointer, setup.clock, RetentionPolicy(0, 2),
        interval=0.01, batch=4, pause=0,
    )  # fmt: skip

    async def run() -> None:
        task = asyncio.create_task(pruner.run(asyncio.Event()))
        assert await asyncio.to_thread(gated.entered.wait, 10)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # the datastore must not be closed under the batch
        gated.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    base = base_row(setup.db)
    assert base is not None
    assert base[0] == 4
    setup.store.close()
    code, out = pinned_verify(setup, capsys)
    assert code == 0, out
    assert "a prune through seq 18 cut short" in out


def test_a_record_signed_further_by_another_process_is_reused(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    fill(setup.log, setup.clock, 20, step=1)
    server_side = setup.pruner(RetentionPolicy(0, 15))  # reads the file now: no record yet
    # `audit prune --through-seq 16` beside it, cut short after its first batch.
    faulty = FailingBatch(setup.store, fail_at=2)
    with pytest.raises(StorageError):
        setup.pruner(RetentionPolicy(0, 0), store=faulty).prune(Cut(through=16))
    assert server_side.prune().removed == 1  # seq 5, under the record through 16
    assert [(cp.kind, cp.seq) for cp in lines(setup)] == [(PRUNE, 16)]
    code, out = pinned_verify(setup, capsys)
    assert code == 0, out
