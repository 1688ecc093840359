"""Several writers on one audit chain: two servers' audit logs over one database file (each its
own datastore object and connection, real threads) make one chain that verifies, with every
acknowledged event in it exactly once, under the seq and id its caller got back."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from server.audit import AuditLog, EventDraft, Head, LedgerError
from server.audit.checkpoint import CHECKPOINT_FILE
from server.audit.checkpointer import Checkpointer
from server.audit.log import _RESEALS
from server.cli import main
from server.datastore import ChainMovedError, Credential
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from svid._clock import FakeClock, SystemClock
from tests.server.fixtures import admit_agents, sqlite_with_agents

AGENT = "spiffe://example.org/svid/agent/join_token/n1"
WORKLOAD = "spiffe://example.org/w"
EXPIRES = 2_000_000_000


def cred(jti: str) -> Credential:
    return Credential("jwt_id", jti, AGENT, WORKLOAD, "", EXPIRES)


def event(jti: str) -> EventDraft:
    return EventDraft("jwt_minted", agent_id=WORKLOAD, node_id=AGENT, credential_id=jti)


def stored(db: Path) -> list[tuple[int, str, str, str]]:
    """(seq, event_id, credential_id, hash) of every stored event, by a connection of its own."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT seq, event_id, credential_id, hash FROM audit_events")
        return [tuple(r) for r in rows.fetchall()]  # type: ignore[misc]
    finally:
        conn.close()


def credential_values(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT value FROM credentials").fetchall()]
    finally:
        conn.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return sqlite_with_agents(tmp_path / "datastore.sqlite3", AGENT)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


def test_two_servers_appending_concurrently_make_one_chain(db: Path, clock: FakeClock) -> None:
    stores = [SqliteDataStore(db, clock), SqliteDataStore(db, clock)]
    logs = [AuditLog(s, clock) for s in stores]
    acknowledged: list[tuple[int, str, str, str]] = []
    recorded: list[str] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    go = threading.Barrier(8)

    def appender(log: AuditLog, name: str) -> None:
        go.wait()
        try:
            for i in range(40):
                jtis = [f"{name}-{i}-{k}" for k in range(1 + i % 3)]
                events = log.append_many([event(j) for j in jtis])
                with lock:
                    acknowledged.extend(
                        (e.seq, e.event_id, str(e.credential_id), e.hash) for e in events
                    )
        except BaseException as e:  # the test reports it below
            failures.append(e)

    def recorder(log: AuditLog, name: str) -> None:
        go.wait()
        try:
            for i in range(40):
                jti = f"{name}-{i}"
                log.record([cred(jti)], [event(jti)])
                with lock:
                    recorded.append(jti)
        except BaseException as e:
            failures.append(e)

    threads = [
        threading.Thread(target=role, args=(log, f"{role.__name__}{n}-{k}"))
        for n, log in enumerate(logs)
        for role in (appender, recorder)
        for k in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []

    rows = stored(db)
    seqs = [r[0] for r in rows]
    assert sorted(seqs) == list(range(1, len(rows) + 1))  # no seq twice, no hole
    # Every acknowledged event is there exactly once, as its caller was told (seq, id, hash).
    assert sorted(acknowledged) == sorted(r for r in rows if r[2] in {a[2] for a in acknowledged})
    credential_ids = [r[2] for r in rows]
    assert len(credential_ids) == len(set(credential_ids)) == len(acknowledged) + len(recorded)
    assert sorted(credential_values(db)) == sorted(recorded)
    assert set(recorded) <= set(credential_ids)
    for log in logs:
        result = log.verify()
        assert result.ok, str(result)
        assert result.checked == len(rows)
    # Both wrote, and both know a head on the one chain.
    assert {r[1].rsplit("-", 1)[0] for r in rows} == {log._id_prefix[:-1] for log in logs}
    heads = {log.committed_head() for log in logs}
    assert heads <= {Head(r[0], r[3]) for r in rows}
    assert Head(len(rows), rows[-1][3]) in heads  # whoever wrote last
    for s in stores:
        s.close()


def test_a_log_behind_another_writer_seals_its_events_on_the_stored_head(
    db: Path, clock: FakeClock
) -> None:
    first = AuditLog(SqliteDataStore(db, clock), clock)
    second = AuditLog(SqliteDataStore(db, clock), clock)  # reads the head now: empty
    first.append_many([event("a1"), event("a2")])
    (mine,) = second.append_many([event("b1")])
    assert (mine.seq, mine.event_id) == (3, f"{second._id_prefix}3")
    assert second.committed_head() == Head(3, mine.hash)
    later = first.append_many([event("a3")])  # and the first follows the second
    assert later[0].seq == 4
    assert [r[:3] for r in stored(db)] == [
        (1, f"{first._id_prefix}1", "a1"),
        (2, f"{first._id_prefix}2", "a2"),
        (3, f"{second._id_prefix}3", "b1"),
        (4, f"{first._id_prefix}4", "a3"),
    ]
    assert first.verify().ok


def test_a_log_behind_another_writer_commits_in_one_write_under_the_stores_lock(
    db: Path, clock: FakeClock
) -> None:
    """Sealed again inside the store's transaction (chain.rows_to_write): no second trip to
    the lock, which under load another writer wins again."""
    first = AuditLog(SqliteDataStore(db, clock), clock)
    faulty = FaultInjectingDataStore(SqliteDataStore(db, clock))
    second = AuditLog(faulty, clock)  # reads the head now: empty
    first.append_many([event("a1")])
    second.record([cred("b1")], [event("b1")])
    assert faulty.calls.count("write_ledger") == 1
    assert [r[:3] for r in stored(db)] == [
        (1, f"{first._id_prefix}1", "a1"),
        (2, f"{second._id_prefix}2", "b1"),
    ]
    assert credential_values(db) == ["b1"]
    assert second.committed_head() == Head(2, stored(db)[-1][3])
    assert second.verify().ok


def test_three_servers_recording_at_once_on_postgresql_never_give_up(postgres_dsn: str) -> None:
    """Three servers' logs on one PostgreSQL schema, three recording threads each: every
    call is committed. (Resealing outside the store's lock, about one commit in 70 gave up
    after _RESEALS lost races and its caller got LedgerError, UNAVAILABLE on the wire.)"""
    from server.datastore.postgres import PostgresDataStore

    clock = SystemClock()
    stores = [PostgresDataStore(postgres_dsn, clock) for _ in range(3)]
    admit_agents(stores[0], AGENT)
    logs = [AuditLog(s, clock) for s in stores]
    failures: list[BaseException] = []
    go = threading.Barrier(9)

    def recorder(log: AuditLog, name: str) -> None:
        go.wait()
        for i in range(150):
            try:
                log.record([cred(f"{name}-{i}")], [event(f"{name}-{i}")])
            except LedgerError as e:
                failures.append(e)

    threads = [
        threading.Thread(target=recorder, args=(log, f"s{n}-{k}"))
        for n, log in enumerate(logs)
        for k in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert [str(f) for f in failures][:3] == []
        result = logs[0].verify()
        assert result.ok, str(result)
        assert result.checked == 9 * 150
    finally:
        for s in stores:
            s.close()


def test_a_head_gone_back_is_refused_not_chained_onto(db: Path, clock: FakeClock) -> None:
    store = SqliteDataStore(db, clock)
    log = AuditLog(store, clock)
    log.append_many([event(f"e{i}") for i in range(3)])
    # Another writer never removes events: a stored head behind this log's commit is a cut.
    conn = sqlite3.connect(db)
    with conn:
        (digest,) = conn.execute("SELECT hash FROM audit_events WHERE seq = 2").fetchone()
        conn.execute("DELETE FROM audit_events WHERE seq = 3")
        conn.execute("UPDATE audit_head SET seq = 2, hash = ?", (digest,))
    conn.close()
    with pytest.raises(LedgerError, match="last commit at seq 3: the log was cut back"):
        log.record([cred("late")], [event("late")])
    assert [r[0] for r in stored(db)] == [1, 2]
    assert credential_values(db) == []
    store.close()


def test_a_chain_that_keeps_moving_fails_after_bounded_reseals(db: Path, clock: FakeClock) -> None:
    faulty = FaultInjectingDataStore(SqliteDataStore(db, clock))
    log = AuditLog(faulty, clock)
    faulty.inject(ChainMovedError("moved", None), method="write_ledger", count=_RESEALS + 1)
    with pytest.raises(LedgerError, match=f"gave up after {_RESEALS} reseals"):
        log.record([cred("x")], [event("x")])
    assert faulty.calls.count("write_ledger") == _RESEALS + 1
    assert stored(db) == []
    # One refusal short of the bound, the call goes through.
    faulty.inject(ChainMovedError("moved", None), method="write_ledger", count=_RESEALS)
    log.record([cred("y")], [event("y")])
    assert [r[2] for r in stored(db)] == ["y"]
    assert log.verify().ok


def test_audit_verify_and_checkpoints_pass_after_two_writers(
    tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two servers on one data dir: one checkpoint key and file, one chain."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    logs = [AuditLog(SqliteDataStore(data_dir / "datastore.sqlite3", clock), clock) for _ in "ab"]
    checkpointers = [
        Checkpointer.in_data_dir(
            log,
            data_dir,
            clock,
            interval=60.0,
        )
        for log in logs
    ]
    for n in range(6):
        logs[n % 2].append_many([event(f"{n}-{k}") for k in range(3)])
        # The writer that is behind signs after the one that is ahead: its file stays in order.
        checkpointers[n % 2].checkpoint(force=True)
        checkpointers[1 - n % 2].checkpoint(force=True)
    code = main(["audit", "verify", "--data-dir", str(data_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "audit chain OK: 18 events" in out
    anchor = str(data_dir / CHECKPOINT_FILE)
    code = main(["audit", "verify", "--data-dir", str(data_dir), "--anchor", anchor])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "audit chain OK: 18 events" in out
    assert "matches the checkpoint" in out
