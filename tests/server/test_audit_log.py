"""The hash-chained audit log: appends, tamper detection, export filters, secrets refused."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from server.audit import (
    GENESIS_HASH,
    AuditError,
    AuditLog,
    Break,
    EventDraft,
    EventKind,
    Head,
    SecretInAuditError,
    SqliteAuditStore,
)
from server.audit.event import CANONICAL_FIELDS, canonical_json, chain_hash
from server.audit.log import event_from_row
from server.audit.verify import verify_segment
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from svid._clock import FakeClock
from tests.server.held_ledger import HeldStore

AGENT = "spiffe://example.org/agents/research-bot"
OTHER = "spiffe://example.org/agents/billing-bot"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "datastore.sqlite3"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
def log(db: Path, clock: FakeClock) -> AuditLog:
    return AuditLog(SqliteDataStore(db, clock), clock)


def fill(log: AuditLog, clock: FakeClock, n: int = 5) -> None:
    for i in range(n):
        log.append(
            EventKind.JWT_MINTED,
            agent_id=AGENT if i % 2 == 0 else OTHER,
            task_id=f"task-{i % 3}",
            resource="docs",
            action="read",
            decision="allow" if i != 3 else "deny",
            credential_id=f"jti-{i}",
            policy_ids=("default.cedar:work_within_intent",),
            policy_set_hash="ab" * 32,
            ttl=300,
            latency_us=42.5,
            risk=i,
            extra={"n": i, "note": "ünïcode"},
        )
        clock.advance(10)


def sql(db: Path, statement: str, *args: object) -> None:
    con = sqlite3.connect(db)
    with con:
        con.execute(statement, args)
    con.close()


def test_events_chain_from_genesis_and_verify(log: AuditLog, clock: FakeClock) -> None:
    first = log.append("task_begin", agent_id=AGENT, task_id="t1")
    assert first.seq == 1
    assert first.prev_hash == GENESIS_HASH
    assert first.ts == clock.now()
    assert first.hash == chain_hash(GENESIS_HASH, first.canonical())
    second = log.append("task_end", agent_id=AGENT, task_id="t1")
    assert second.seq == 2
    assert second.prev_hash == first.hash
    result = log.verify()
    assert result.ok, str(result)
    assert result.checked == 2
    assert result.head == Head(2, second.hash)
    assert "OK" in str(result)


def test_canonical_encoding_is_sorted_compact_utf8(log: AuditLog) -> None:
    e = log.append("denial", agent_id=AGENT, reason="naïve", extra={"b": 1, "a": [1, 2]})
    text = e.canonical().decode("utf-8")
    body = json.loads(text)
    # A fixed-order array of every field but hash; extra's keys sorted.
    assert body == [
        list(e.policy_ids) if n == "policy_ids" else getattr(e, n) for n in CANONICAL_FIELDS
    ]
    assert '{"a":[1,2],"b":1}' in text
    assert ", " not in text
    assert ": " not in text
    assert "naïve" in text
    assert text == canonical_json(body).decode("utf-8")


def test_chain_survives_reopening(db: Path, clock: FakeClock) -> None:
    log = AuditLog(SqliteDataStore(db, clock), clock)
    fill(log, clock, 3)
    log.store.close()
    reopened = AuditLog(SqliteDataStore(db, clock), clock)
    e = reopened.append("task_end", agent_id=AGENT)
    assert e.seq == 4
    assert reopened.verify().ok


def test_database_file_is_private(db: Path, log: AuditLog) -> None:
    log.append("task_begin", agent_id=AGENT)
    assert os.stat(db).st_mode & 0o777 == 0o600


def test_an_edited_row_is_named(db: Path, log: AuditLog, clock: FakeClock) -> None:
    fill(log, clock)
    row = sqlite3.connect(db).execute("SELECT event_id FROM audit_events WHERE seq = 3").fetchone()
    sql(db, "UPDATE audit_events SET decision = 'deny' WHERE seq = 3")  # it was "allow"
    result = log.verify()
    assert not result.ok
    assert result.problem is Break.EDITED
    assert result.broken_seq == 3
    assert result.broken_event_id == row[0]
    assert "seq 3" in str(result)


@pytest.mark.parametrize(
    ("column", "value"),
    [("ttl", 86400), ("reason", "nothing to see"), ("ts", 1.0), ("extra", '{"n":2}')],
)
def test_editing_any_field_is_caught(
    db: Path, log: AuditLog, clock: FakeClock, column: str, value: object
) -> None:
    fill(log, clock)
    sql(db, f"UPDATE audit_events SET {column} = ? WHERE seq = 2", value)
    result = log.verify()
    assert (result.ok, result.problem, result.broken_seq) == (False, Break.EDITED, 2)


def test_a_rehashed_edit_breaks_the_next_link(db: Path, log: AuditLog, clock: FakeClock) -> None:
    fill(log, clock)
    store = SqliteAuditStore(db)
    row = next(r for r in store.audit_rows() if r["seq"] == 2)
    forged = event_from_row({**row, "decision": "deny"})
    sql(
        db,
        "UPDATE audit_events SET decision = 'deny', hash = ? WHERE seq = 2",
        forged.compute_hash(),
    )
    result = log.verify()
    assert (result.ok, result.problem, result.broken_seq) == (False, Break.RELINKED, 3)


def test_a_deleted_middle_row_is_named_as_a_gap(db: Path, log: AuditLog, clock: FakeClock) -> None:
    fill(log, clock)
    sql(db, "DELETE FROM audit_events WHERE seq = 3")
    result = log.verify()
    assert not result.ok
    assert result.problem is Break.DELETED
    assert result.broken_seq == 4
    assert "events 3..3 are missing" in result.detail


def test_reordered_rows_are_caught(db: Path, log: AuditLog, clock: FakeClock) -> None:
    fill(log, clock)
    sql(db, "UPDATE audit_events SET seq = 100 WHERE seq = 2")
    sql(db, "UPDATE audit_events SET seq = 2 WHERE seq = 3")
    sql(db, "UPDATE audit_events SET seq = 3 WHERE seq = 100")
    result = log.verify()
    assert not result.ok
    assert result.broken_seq == 2


def test_deleting_the_tail_is_caught_by_the_head_row(
    db: Path, log: AuditLog, clock: FakeClock
) -> None:
    fill(log, clock)
    sql(db, "DELETE FROM audit_events WHERE seq = 5")
    result = log.verify()
    assert not result.ok
    assert result.problem is Break.TRUNCATED
    assert "head records seq 5 but the log ends at seq 4" in result.detail


def test_tail_deletion_with_a_rewritten_head_needs_an_external_anchor(
    db: Path, log: AuditLog, clock: FakeClock
) -> None:
    fill(log, clock)
    anchor = log.head()
    assert anchor is not None
    row = sqlite3.connect(db).execute("SELECT hash FROM audit_events WHERE seq = 4").fetchone()
    sql(db, "DELETE FROM audit_events WHERE seq = 5")
    sql(db, "UPDATE audit_head SET seq = 4, hash = ?", row[0])
    assert log.verify().ok  # undetectable from inside the database alone
    result = log.verify(anchor=anchor)
    assert not result.ok
    assert result.problem is Break.TRUNCATED
    assert "anchor names seq 5" in result.detail


def test_a_wrong_anchor_is_reported(log: AuditLog, clock: FakeClock) -> None:
    fill(log, clock)
    result = log.verify(anchor=Head(2, "00" * 32))
    # A whole chain that disagrees with an anchor: what re-hashing after an edit leaves.
    assert (result.ok, result.problem, result.broken_seq) == (False, Break.RECHAINED, 2)


def test_a_row_inserted_behind_the_log_is_caught(db: Path, log: AuditLog, clock: FakeClock) -> None:
    fill(log, clock, 2)
    con = sqlite3.connect(db)
    cols = [r[1] for r in con.execute("PRAGMA table_info(audit_events)")]
    row = list(con.execute("SELECT * FROM audit_events WHERE seq = 2").fetchone())
    con.close()
    row[cols.index("seq")] = 3
    row[cols.index("event_id")] = "forged"
    sql(db, f"INSERT INTO audit_events VALUES ({', '.join('?' * len(row))})", *row)
    result = log.verify()
    assert not result.ok
    assert result.broken_seq == 3


def test_empty_log_verifies(log: AuditLog) -> None:
    result = log.verify()
    assert result.ok
    assert result.checked == 0
    assert log.head() is None


def test_export_filters(log: AuditLog, clock: FakeClock) -> None:
    start = clock.now()
    fill(log, clock, 6)

    def export(**kw: object) -> list[dict[str, object]]:
        out = io.StringIO()
        n = log.export(out, **kw)  # type: ignore[arg-type]
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert n == len(lines)
        return lines

    everything = export()
    assert [e["seq"] for e in everything] == [1, 2, 3, 4, 5, 6]
    assert everything[0]["hash"]
    assert everything[0]["prev_hash"] == GENESIS_HASH
    assert {e["agent_id"] for e in export(agent=OTHER)} == {OTHER}
    assert [e["seq"] for e in export(task="task-1")] == [2, 5]
    assert [e["seq"] for e in export(decision="deny")] == [4]
    assert [e["seq"] for e in export(since=start + 10, until=start + 30)] == [2, 3]
    assert export(kind="task_end") == []
    assert [e["seq"] for e in export(agent=AGENT, task="task-0")] == [1]


def test_exported_lines_rehash_to_the_chain(log: AuditLog, clock: FakeClock) -> None:
    fill(log, clock, 3)
    out = io.StringIO()
    log.export(out)
    prev = GENESIS_HASH
    for line in out.getvalue().splitlines():
        event = json.loads(line)
        stored = event.pop("hash")
        body = [event[name] for name in CANONICAL_FIELDS]
        assert chain_hash(prev, canonical_json(body)) == stored
        prev = stored


JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmU6Ly90ZC9hIn0.c2lnbmF0dXJl"
PEM = "-----BEGIN PRIVATE KEY-----\nMIGHAgEA\n-----END PRIVATE KEY-----"


@pytest.mark.parametrize(
    "fields",
    [
        {"credential_id": JWT},
        {"reason": f"token was {JWT}"},
        {"extra": {"token": JWT}},
        {"extra": {"chain": [PEM]}},
        {"resource": PEM},
    ],
)
def test_tokens_and_keys_are_refused(log: AuditLog, fields: dict[str, object]) -> None:
    with pytest.raises(SecretInAuditError) as exc:
        log.append("jwt_minted", agent_id=AGENT, **fields)
    assert JWT not in str(exc.value)
    assert "BEGIN" not in str(exc.value)
    assert log.head() is None  # nothing was chained


@pytest.mark.parametrize(
    ("kind", "fields", "needle"),
    [
        ("Not A Kind", {}, "kind"),
        ("denial", {"secret_sauce": 1}, "unknown audit field"),
        ("denial", {"extra": {"blob": "x" * 5000}}, "at most"),
        ("denial", {"extra": {"f": object()}}, "JSON"),
    ],
)
def test_malformed_events_are_refused(
    log: AuditLog, kind: str, fields: dict[str, object], needle: str
) -> None:
    with pytest.raises(AuditError, match=needle):
        log.append(kind, **fields)


def test_append_many_is_one_consecutive_batch(log: AuditLog) -> None:
    events = log.append_many(
        [EventDraft("revocation", credential_id=f"serial-{i}", task_id="t") for i in range(4)]
    )
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert log.verify().ok


def test_concurrent_appends_keep_one_chain(log: AuditLog) -> None:
    def worker(k: int) -> None:
        for i in range(25):
            log.append("jwt_minted", agent_id=AGENT, credential_id=f"{k}-{i}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = log.verify()
    assert result.ok, str(result)
    assert result.checked == 100


def test_a_failed_commit_leaves_no_hole(db: Path, clock: FakeClock) -> None:
    store = FaultInjectingDataStore(SqliteDataStore(db, clock))
    log = AuditLog(store, clock)
    log.append("task_begin", agent_id=AGENT)
    store.inject(AuditError("disk full"), method="write_ledger")
    with pytest.raises(AuditError, match="disk full"):
        log.append("task_end", agent_id=AGENT)
    e = log.append("task_end", agent_id=AGENT)
    assert e.seq == 2
    assert log.verify().ok


def test_a_commit_failing_unexpectedly_fails_every_caller_it_held(
    db: Path, clock: FakeClock
) -> None:
    store = HeldStore(SqliteDataStore(db, clock))
    log = AuditLog(store, clock)
    store.armed = True
    first = threading.Thread(target=log.append, args=("task_begin",), kwargs={"agent_id": AGENT})
    first.start()
    assert store.entered.wait(5)
    # Both queue behind the held commit and are written together; SQLite cannot store the
    # second one's risk (past a 64-bit integer: OverflowError, not a sqlite3.Error).
    good = log.record_later([], [EventDraft("task_end", agent_id=AGENT)])
    bad = log.record_later([], [EventDraft("task_end", agent_id=OTHER, risk=2**64)])
    store.release.set()
    first.join(5)
    for future in (good, bad):
        with pytest.raises(AuditError):  # LedgerError: nothing of the batch kept
            future.result(timeout=5)
    assert [r["seq"] for r in store.audit_rows()] == [1]
    assert log.append("task_end", agent_id=AGENT).seq == 2
    assert log.verify().ok


def test_unopenable_database_is_an_audit_error(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(AuditError, match=r"dir\.db"):
        SqliteAuditStore(tmp_path / "dir.db")


def test_read_only_open_refuses_a_missing_database(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match=r"no audit database at .*missing\.db"):
        SqliteAuditStore(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


def test_tuple_drafts_chain_like_event_drafts(log: AuditLog) -> None:
    values = ("jwt_minted", AGENT, None, None, "aud", None, "allow", None, None, None, "jti-1")
    log.append_tuples([(*values, (), None, 300, None, {"spiffe_id": AGENT})])
    log.append_tuples([(*values, ("p1",), None, 300, None, {})])
    first, second = (event_from_row(r) for r in log.store.audit_rows())
    assert first.extra == {"spiffe_id": AGENT}
    assert second.policy_ids == ("p1",)
    assert first.event_id != second.event_id
    assert log.verify().ok


@pytest.mark.parametrize(
    ("draft", "message"),
    [
        (("Bad Kind",) + (None,) * 15, "lowercase identifier"),
        (("jwt_minted",) + (None,) * 3, "16 values"),
        (("jwt_minted", JWT) + (None,) * 14, "looks like a JWT"),
    ],
)
def test_tuple_drafts_are_checked(log: AuditLog, draft: tuple[object, ...], message: str) -> None:
    with pytest.raises(AuditError, match=message):
        log.append_tuples([draft])
    assert log.head() is None


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("prev_hash", "'not hex'"),
        ("prev_hash", "X'00'"),  # a blob where text was: JSON cannot encode it
        ("extra", "'[1, 2]'"),  # JSON, but not an object
        ("extra", "'\"text\"'"),
        ("extra", "'{\"n\": NaN}'"),  # out of canonical JSON's range
        ("event_id", "X'41'"),
        ("ts", "9e999"),  # stored as infinity
        pytest.param("extra", "'" + "[" * 100_000 + "]" * 100_000 + "'", id="extra-too-deep"),
    ],
)
def test_a_row_that_cannot_be_hashed_is_unreadable(
    db: Path, log: AuditLog, clock: FakeClock, column: str, value: str
) -> None:
    fill(log, clock)
    sql(db, f"UPDATE audit_events SET {column} = {value} WHERE seq = 2")
    result = log.verify()
    assert (result.ok, result.problem, result.broken_seq) == (False, Break.UNREADABLE, 2)
    # The checkpointer's forward check reads rows the same way.
    rows = [r for r in log.store.audit_rows() if r["seq"] > 1]
    first = next(r for r in log.store.audit_rows() if r["seq"] == 1)
    head = log.head()
    assert head is not None
    segment = verify_segment(Head(1, str(first["hash"])), rows, head)
    assert (segment.ok, segment.problem, segment.broken_seq) == (False, Break.UNREADABLE, 2)


POLICY = '["default.cedar:work_within_intent"]'


@pytest.mark.parametrize(
    ("column", "text"),
    [
        # An object whose keys decode as the same ids, carrying text of the attacker's.
        ("policy_ids", '{"default.cedar:work_within_intent":"approved by security@, SEC-1"}'),
        ("policy_ids", POLICY.replace(",", ", ") + " "),
        # A duplicate key: SQLite's JSON functions read the first, Python the last.
        ("extra", '{"n":"payroll","n":1,"note":"ünïcode"}'),
        ("extra", '{"n":1,"note":"\\u00fcn\\u00efcode"}'),
        ("extra", '{"note":"ünïcode","n":1}'),
    ],
)
def test_stored_text_other_than_what_was_hashed_is_an_edit(
    db: Path, log: AuditLog, clock: FakeClock, column: str, text: str
) -> None:
    """The hash covers policy_ids and extra decoded, not their stored text: each rewrite here
    hashes as the event did, yet a reader of the row sees another text."""
    fill(log, clock)
    sql(db, f"UPDATE audit_events SET {column} = ? WHERE seq = 2", text)
    first = next(r for r in log.store.audit_rows() if r["seq"] == 1)
    assert event_from_row(first).compute_hash() == first["hash"]
    result = log.verify()
    assert (result.ok, result.problem, result.broken_seq) == (False, Break.EDITED, 2), result
    assert column in result.detail
    # The checkpointer's forward check reads rows the same way.
    rows = [r for r in log.store.audit_rows() if r["seq"] > 1]
    head = log.head()
    assert head is not None
    segment = verify_segment(Head(1, str(first["hash"])), rows, head)
    assert (segment.ok, segment.problem, segment.broken_seq) == (False, Break.EDITED, 2)


def test_a_duplicate_key_sqlite_reads_otherwise_is_an_edit(
    db: Path, log: AuditLog, clock: FakeClock
) -> None:
    fill(log, clock)
    sql(
        db,
        "UPDATE audit_events SET extra = ? WHERE seq = 2",
        '{"n":"payroll","n":1,"note":"ünïcode"}',
    )
    con = sqlite3.connect(db)
    seen = con.execute("SELECT json_extract(extra, '$.n') FROM audit_events WHERE seq = 2")
    assert seen.fetchone()[0] == "payroll"  # what a SQL reader of the log sees
    con.close()
    assert (log.verify().problem, log.verify().broken_seq) == (Break.EDITED, 2)


def test_policy_ids_other_than_text_are_refused(log: AuditLog) -> None:
    """Verify reads policy_ids as an array of strings only: a draft with another value is
    refused, not recorded as an event that would read as an edit."""
    with pytest.raises(AuditError, match="policy_ids"):
        log.append("probe", policy_ids=("p", 1))
    values = ("jwt_minted", AGENT) + (None,) * 9
    with pytest.raises(AuditError, match="policy_ids"):
        log.append_tuples([(*values, (None,), None, None, None, {})])
    for wrong in ("p1", None):
        with pytest.raises(AuditError, match="policy_ids"):
            log.append_tuples([(*values, wrong, None, None, None, {})])
    assert log.head() is None


def honest_drafts(log: AuditLog, clock: FakeClock) -> None:
    """Events of every shape the log writes: empty and full policy_ids and extra, text that
    JSON escapes, non-ASCII, nested values, floats, through every way in."""
    fill(log, clock)
    log.append("probe")
    log.append(
        "probe",
        policy_ids=("a", "é", 'q"\\', "\u2028", ""),
        extra={"z": [1.5, 1e300, -0.0, None, True], "a": {"y": "\n\x01", "b": []}, "é": ""},
    )
    values = ("jwt_minted", AGENT, None, None, "aud,x", None, "allow", None, None, 2)
    log.append_tuples([(*values, "jti-t", ("p1", "p2"), None, 300.0, 3, {"k": "ü"})])
    log.record([], [(*values, "jti-r", (), None, 60, None, {})])


def test_honest_rows_are_stored_as_hashed_on_sqlite(log: AuditLog, clock: FakeClock) -> None:
    honest_drafts(log, clock)
    result = log.verify()
    assert (result.ok, result.checked) == (True, 9), result


def test_stored_text_is_checked_on_postgresql(postgres_dsn: str, clock: FakeClock) -> None:
    """PostgreSQL stores policy_ids and extra as TEXT too: honest rows read back as written,
    and a duplicate key written behind the log is an edit there as well."""
    import psycopg

    from server.datastore.postgres import PostgresDataStore

    store = PostgresDataStore(postgres_dsn, clock)
    try:
        log = AuditLog(store, clock)
        honest_drafts(log, clock)
        result = log.verify()
        assert (result.ok, result.checked) == (True, 9), result
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(
                "UPDATE audit_events SET extra = %s WHERE seq = 2",
                ('{"n":"payroll","n":1,"note":"ünïcode"}',),
            )
        result = log.verify()
        assert (result.ok, result.problem, result.broken_seq) == (False, Break.EDITED, 2)
    finally:
        store.close()


def test_audit_export_reads_a_postgresql_datastore(
    postgres_dsn: str, clock: FakeClock, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Servers sharing PostgreSQL keep their log there: export read the data_dir's SQLite file
    whatever the config said, and refused ("no audit database") on every one of them."""
    from server.cli import main
    from server.datastore.postgres import PostgresDataStore

    store = PostgresDataStore(postgres_dsn, clock)
    try:
        fill(AuditLog(store, clock), clock)
    finally:
        store.close()
    config = tmp_path / "server.toml"
    config.write_text(
        f'trust_domain = "example.org"\ndata_dir = "{tmp_path / "data"}"\n'
        f'datastore = "{postgres_dsn}"\n'
    )
    for where in (["--config", str(config)], ["--datastore", postgres_dsn]):
        code = main(["audit", "export", "--decision", "deny", *where])
        out = capsys.readouterr()
        assert code == 0, out.err
        exported = [json.loads(line) for line in out.out.splitlines()]
        assert [e["credential_id"] for e in exported] == ["jti-3"]
        assert "exported 1 events" in out.err


def test_numbers_of_the_other_kind_verify_as_their_columns_store_them(log: AuditLog) -> None:
    # latency_us is stored as a float and risk and ttl as integers: an event hashed with the
    # value as given (5, not 5.0) read back as EDITED, a false alarm of tampering.
    event = log.append("probe", latency_us=5, risk=3.0, ttl=300.0)
    assert (event.latency_us, event.risk, event.ttl) == (5.0, 3, 300)
    assert log.verify().ok
    with pytest.raises(AuditError, match="ttl"):
        log.append("probe", ttl=2.5)
    with pytest.raises(AuditError, match="risk"):
        log.append("probe", risk=True)


def test_an_extra_keyed_by_numbers_verifies_as_it_is_stored(log: AuditLog) -> None:
    """JSON keys are text: {10: .., 9: ..} was hashed with its keys sorted as numbers ("9"
    first) but read back from its stored JSON sorted as text ("10" first), a false EDITED.
    Its keys are made text before it is hashed, at every depth and on every way in."""
    by_number = {10: "ten", 9: "nine"}
    as_text = {"10": "ten", "9": "nine"}
    appended = log.append("probe", extra=by_number)
    log.append_many([EventDraft("probe", extra={"runs": [by_number, {True: 1}]})])
    values = ("probe",) + (None,) * 10 + ((), None, None, None)
    log.append_tuples([(*values, by_number)])
    log.record([], [(*values, {"runs": [by_number]})])
    result = log.verify()
    assert (result.ok, result.checked) == (True, 4), result
    assert appended.extra == as_text
    assert [event_from_row(r).extra for r in log.store.audit_rows()] == [
        as_text,
        {"runs": [as_text, {"true": 1}]},
        as_text,
        {"runs": [as_text]},
    ]
    # Keys that JSON cannot order together are refused, as before.
    with pytest.raises(AuditError, match="not JSON-encodable"):
        log.append("probe", extra={1: "a", "b": 2})


def test_an_extra_keyed_by_numbers_is_stored_as_before_when_it_verified(
    log: AuditLog,
) -> None:
    """Only what could never verify is stored otherwise: keys already in text order are
    written in the very text they were before the keys were made text."""
    log.append("probe", extra={1: "a", 2: {3: "c"}})
    (row,) = log.store.audit_rows()
    assert row["extra"] == '{"1":"a","2":{"3":"c"}}'
    assert log.verify().ok


def test_tuple_drafts_make_numbers_their_columns_kind(log: AuditLog) -> None:
    """A tuple draft gets EventDraft's conversions (one shared conversion): a ttl of 300.0
    hashed as `300.0` but stored in an integer column read back as 300, a false EDITED."""
    values = ("jwt_minted", AGENT, None, None, "aud", None, "allow", None, None)
    log.append_tuples([(*values, 3.0, "jti-1", (), None, 300.0, None, {})])
    log.append_tuples([(*values, None, "jti-2", (), None, 300, 5, {})])
    log.record([], [(*values, None, "jti-3", (), None, 60.0, 7, {})])
    events = [event_from_row(r) for r in log.store.audit_rows()]
    assert [(e.risk, e.ttl, e.latency_us) for e in events] == [
        (3, 300, None),
        (None, 300, 5.0),
        (None, 60, 7.0),
    ]
    assert [type(e.latency_us) for e in events[1:]] == [float, float]
    assert log.verify().ok, log.verify()
    for bad, message in ((2.5, "ttl"), (True, "ttl"), ("300", "ttl")):
        with pytest.raises(AuditError, match=message):
            log.append_tuples([(*values, None, "jti-4", (), None, bad, None, {})])
    with pytest.raises(AuditError, match="latency_us"):
        log.append_tuples([(*values, None, "jti-4", (), None, None, "5", {})])
    assert log.verify().checked == 3
