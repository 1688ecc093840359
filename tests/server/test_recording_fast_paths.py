"""Issuance recording's fast paths against the slower code they replace.

The audit log's shared canonical encoder and split encoding, the draft-tuple secret check, and
multi-row inserts must give what `json`, check_no_secret and executemany give, on good and bad
input. (The ledger that gathers them into group commits: tests/server/test_ledger.py.)
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.audit import AuditError, AuditLog
from server.audit.event import (
    _ENCODER,
    CHECK_MARKERS,
    DRAFT_FIELDS,
    NUMBER_FIELDS,
    canonical_encoder,
    check_no_secret,
    check_policy_ids,
    column_number,
)
from server.audit.log import check_draft_tuple, event_from_row
from server.datastore.sqlite import SqliteDataStore
from server.datastore.sqlite_audit import insert_many
from server.issuance.records import (
    workload_jwt_body,
    workload_jwt_prefix,
    workload_jwt_record,
)
from server.tasks.model import Credential
from server.tasks.store import TaskStore
from svid import MAX_CLOCK_SKEW, MAX_VERIFIER_LEEWAY
from svid._clock import FakeClock
from tests.server.fixtures import sqlite_with_agents

AGENT = "spiffe://example.org/svid/agent/join_token/abc"
WORKLOAD = "spiffe://example.org/bench/w0"
JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
PEM = "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----"


def _log(tmp_path: Path, clock: FakeClock) -> AuditLog:
    return AuditLog(SqliteDataStore(tmp_path / "datastore.sqlite3", clock), clock)


class _Frozen(Mapping[str, Any]):
    """A Mapping that is not a dict (json cannot encode it; the log copies it to a dict)."""

    def __init__(self, **values: Any) -> None:
        self._values = values

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Any:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _outcome(fn: Any, value: Any) -> object:
    try:
        return fn(value)
    except Exception as exc:
        return (type(exc), str(exc))


_VALUES: list[Any] = [
    None,
    0,
    -7,
    1.5,
    1e300,
    "plain",
    "é ünïcode \u2028 🙂",
    'quote " backslash \\ control \x01',
    [],
    [1, "a", None],
    (),
    ("x", "y"),
    {},
    {"b": 1, "a": [1, 2, {"z": None, "y": "é"}]},
    [{"k": [[[]]]}],
    True,
    math.nan,
    math.inf,
    b"bytes",
    {1: "int key"},
    {"s": {1, 2}},
    object(),
]


def test_canonical_encoder_equals_the_json_encoder() -> None:
    encode = canonical_encoder()
    for value in _VALUES:
        assert _outcome(encode, value) == _outcome(_ENCODER.encode, value), value
    circular: list[Any] = []
    circular.append(circular)
    assert _outcome(encode, circular) == _outcome(_ENCODER.encode, circular)
    # A failure leaves nothing behind: the same encoder keeps giving the right answers.
    for value in _VALUES:
        assert _outcome(encode, value) == _outcome(_ENCODER.encode, value), value


def _reference_check(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """check_draft_tuple before its fast path: every value through check_no_secret, every
    number through EventDraft's conversion."""
    if len(values) != len(DRAFT_FIELDS):
        raise AuditError(f"a draft tuple has {len(DRAFT_FIELDS)} values, not {len(values)}")
    kind = values[0]
    import re

    if not isinstance(kind, str) or not re.match(r"^[a-z][a-z0-9_]{0,63}$", kind):
        raise AuditError(f"kind {kind!r} is not a lowercase identifier")
    for name, value in zip(DRAFT_FIELDS, values, strict=True):
        check_no_secret(name, value)
    check_policy_ids(values[DRAFT_FIELDS.index("policy_ids")])
    return tuple(
        column_number(name, value) if name in NUMBER_FIELDS else value
        for name, value in zip(DRAFT_FIELDS, values, strict=True)
    )


def _draft(**changes: Any) -> tuple[Any, ...]:
    base = dict.fromkeys(DRAFT_FIELDS)
    base.update(kind="jwt_minted", agent_id=WORKLOAD, node_id=AGENT, decision="allow")
    base.update(credential_id="abc123", policy_ids=(), ttl=300, extra={})
    base.update(changes)
    return tuple(base[name] for name in DRAFT_FIELDS)


class _Str(str):
    pass


@pytest.mark.parametrize(
    "draft",
    [
        _draft(),
        _draft(extra={"spiffe_id": WORKLOAD}),
        _draft(resource=JWT),
        _draft(reason="token " + JWT + " leaked"),
        _draft(extra={"token": JWT}),
        _draft(extra={JWT: "as a key"}),
        _draft(extra={"nested": {"deeper": [PEM]}}),
        _draft(extra={"n": 1, "ok": "fine"}),
        _draft(policy_ids=("p1", "p2")),
        _draft(policy_ids=(JWT,)),
        _draft(policy_ids=("p", 1)),
        _draft(policy_ids="p1"),
        _draft(policy_ids=None),
        _draft(policy_ids=["p1"]),
        _draft(credential_id=b"raw bytes"),
        _draft(risk=True),
        _draft(latency_us=1.25),
        _draft(latency_us=5),
        _draft(latency_us="5"),
        _draft(ttl=300.0),
        _draft(ttl=2.5),
        _draft(ttl="300"),
        _draft(risk=3.0),
        _draft(agent_id=_Str(PEM)),
        _draft(agent_id=_Str("plain")),
        _draft(kind="Bad-Kind"),
        _draft(kind=_Str("jwt_minted")),
        _draft(kind=7),
        _draft(extra=_Frozen(a="b")),
        _draft(extra=_Frozen(a=JWT)),
        _draft()[:-1],
        (*_draft(), "one too many"),
    ],
)
def test_draft_tuple_check_refuses_what_check_no_secret_refuses(draft: tuple[Any, ...]) -> None:
    assert _outcome(check_draft_tuple, draft) == _outcome(_reference_check, draft)


def test_sealed_rows_hash_as_the_events_they_store(tmp_path: Path) -> None:
    log = _log(tmp_path, FakeClock(1_800_000_000.25))
    drafts = [
        _draft(),
        _draft(extra={"spiffe_id": WORKLOAD, "é": ["ü", 1, None]}),
        _draft(extra=_Frozen(b=2, a=1)),
        _draft(policy_ids=("default.cedar:x", "other"), risk=3, latency_us=12.5),
        _draft(resource='quote " and \\ and \n'),
        _draft(task_id="task-1", on_behalf_of="user@example.org"),
    ]
    log.append_tuples(drafts * 30)
    rows = list(log.store.audit_rows())
    assert len(rows) == 180
    for row in rows:
        event = event_from_row(row)
        assert event.compute_hash() == event.hash
    assert log.verify().ok
    # What is stored for `extra` is its canonical text, keys sorted.
    assert json.loads(rows[2]["extra"]) == {"a": 1, "b": 2}
    assert rows[2]["extra"] == '{"a":1,"b":2}'


def test_unencodable_extra_fails_as_before_and_leaves_no_hole(tmp_path: Path) -> None:
    log = _log(tmp_path, FakeClock(1_800_000_000))
    log.append_tuples([_draft()])
    with pytest.raises(TypeError):
        log.append_tuples([_draft(extra={"x": object()})])
    with pytest.raises(AuditError, match="bytes encoded"):
        log.append_tuples([_draft(extra={"x": "y" * 5000})])
    log.append_tuples([_draft()])
    assert log.verify().ok
    assert [r["seq"] for r in log.store.audit_rows()] == [1, 2]


def test_insert_many_writes_what_executemany_writes() -> None:
    for width, count in ((1, 0), (1, 1), (3, 7), (6, 166), (6, 167), (21, 47), (21, 48), (21, 500)):
        rows = [
            tuple(f"{i}-{j}" if j % 2 else i * 100 + j for j in range(width)) for i in range(count)
        ]
        columns = ", ".join(f"c{j}" for j in range(width))
        many, multi = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
        for db in (many, multi):
            db.execute(f"CREATE TABLE t ({columns})")
        many.executemany(f"INSERT INTO t VALUES ({', '.join('?' * width)})", rows)
        insert_many(multi, "INSERT INTO t", rows)
        query = "SELECT rowid, * FROM t ORDER BY rowid"
        assert multi.execute(query).fetchall() == many.execute(query).fetchall()
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (a, b)")
    with pytest.raises(sqlite3.ProgrammingError):
        insert_many(db, "INSERT INTO t", [(1, 2), (3,)])
    with pytest.raises(sqlite3.ProgrammingError):
        db.executemany("INSERT INTO t VALUES (?, ?)", [(1, 2), (3,)])


@pytest.mark.parametrize(
    "rows",
    [
        # None in every row of a column (written as NULL), in some rows only (bound), in no
        # row; every column None; one column; a chunk boundary inside (width 21: 47 a chunk).
        [(i, None, f"x{i}", None if i % 2 else i, None) for i in range(9)],
        [(None, None, None)] * 4,
        [(None,)] * 3,
        [(None,), (1,), (None,)],
        [(i, None, "", 0, None, 0.0) for i in range(5)],
        [
            tuple(None if j % 3 == 0 or (j == 4 and i == 60) else f"{i}-{j}" for j in range(21))
            for i in range(100)
        ],
    ],
)
def test_insert_many_writes_none_as_executemany_does(rows: list[tuple[Any, ...]]) -> None:
    width = len(rows[0])
    columns = ", ".join(f"c{j}" for j in range(width))
    many, multi = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
    for db in (many, multi):
        db.execute(f"CREATE TABLE t ({columns})")
    many.executemany(f"INSERT INTO t VALUES ({', '.join('?' * width)})", rows)
    insert_many(multi, "INSERT INTO t", rows)
    query = f"SELECT rowid, {', '.join(f'c{j}, typeof(c{j})' for j in range(width))} FROM t"
    assert multi.execute(query).fetchall() == many.execute(query).fetchall()


def test_credentials_are_recorded_and_read_back(tmp_path: Path) -> None:
    store = TaskStore(
        SqliteDataStore(
            sqlite_with_agents(tmp_path / "datastore.sqlite3", AGENT, tasks=["task-1"]),
            FakeClock(1000),
        )
    )
    creds = [
        Credential("x509_serial", format(i, "x"), AGENT, WORKLOAD, "task-1" if i % 3 else "", 2000)
        for i in range(400)
    ]
    store.record(creds)
    assert store.count_credentials("task-1") == sum(1 for c in creds if c.task_id == "task-1")
    assert store.agent_credentials(AGENT, now=1000) == sorted(creds, key=lambda c: c.value)
    # A verifier with the widest leeway may accept them until exp + MAX_VERIFIER_LEEWAY, by a
    # clock up to MAX_CLOCK_SKEW behind this one.
    kept = int(MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW)
    assert len(store.agent_credentials(AGENT, now=2000 + kept)) == 400
    assert store.agent_credentials(AGENT, now=2001 + kept) == []


# -- audit bodies a signing worker drafts (server.issuance.records) -------------------------------


def logs_own_body(values: tuple[Any, ...]) -> str | None:
    """What AuditLog.record_later takes as a draft's body, the slow way: the log's own check,
    then every value but `extra` through its canonical encoder; None where the check refuses."""
    try:
        values = check_draft_tuple(values)
    except AuditError:
        return None
    return canonical_encoder()(values[:-1])


_TEXT = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["eyJ", "x-----BEGIN", 'q"\\', "\u2028", "", "a,b"]
)


@settings(max_examples=300, deadline=None)
@given(agent=_TEXT, spiffe_id=_TEXT, jti=_TEXT, audience=_TEXT, ttl=st.integers(-5, 10**9))
def test_a_workers_audit_body_is_the_logs_own(
    agent: str, spiffe_id: str, jti: str, audience: str, ttl: int
) -> None:
    _, event = workload_jwt_record(
        agent, spiffe_id, jti=jti, issued_at=1000, expires_at=1000 + ttl, audience=audience
    )
    drafted = workload_jwt_body(workload_jwt_prefix(agent, spiffe_id), jti, audience, ttl)
    logs = logs_own_body(event)
    if drafted is not None:
        assert drafted == logs
    # None only where the log's check looks closer: a secret marker or a NUL in some value.
    assert (drafted is None) == any(
        marker in value for value in (agent, spiffe_id, jti, audience) for marker in CHECK_MARKERS
    )


def test_events_recorded_with_drafted_bodies_are_the_events_recorded_without(
    tmp_path: Path,
) -> None:
    clock = FakeClock(1_800_000_000.5)
    records = [
        workload_jwt_record(
            AGENT, WORKLOAD, jti=f"j{i}", issued_at=1000, expires_at=1300, audience=f"aud-{i}"
        )
        for i in range(20)
    ]
    credentials = [credential for credential, _ in records]
    events = [event for _, event in records]
    prefix = workload_jwt_prefix(AGENT, WORKLOAD)
    bodies = [workload_jwt_body(prefix, f"j{i}", f"aud-{i}", 300) for i in range(20)]
    bodies[3] = None  # a draft left to the log: checked and encoded there
    stored = []
    for name, given_bodies in (("plain", None), ("drafted", bodies)):
        store = SqliteDataStore(sqlite_with_agents(tmp_path / f"{name}.sqlite3", AGENT), clock)
        log = AuditLog(store, clock)
        log.record_later(credentials, events, given_bodies).result(10)
        assert log.verify().ok
        stored.append([dict(row) for row in store.audit_rows()])
        store.close()
    plain, drafted = stored
    # Each log has its own random event-id prefix, so its own hashes: those are checked by
    # verify() above (which hashes what is stored); the stored values must be the same.
    for row in plain + drafted:
        for column in ("event_id", "prev_hash", "hash"):
            row.pop(column)
    assert drafted == plain
    assert len(plain) == 20


def test_a_draft_left_to_the_log_is_still_checked(tmp_path: Path) -> None:
    log = _log(tmp_path, FakeClock(1_800_000_000))
    credential, event = workload_jwt_record(
        AGENT, WORKLOAD, jti="j", issued_at=1000, expires_at=1300, audience=JWT
    )
    assert workload_jwt_body(workload_jwt_prefix(AGENT, WORKLOAD), "j", JWT, 300) is None
    with pytest.raises(AuditError):
        log.record_later([credential], [event], [None])
    assert list(log.store.audit_rows()) == []
