"""Attacks on the tamper-evident audit log that `audit verify` does not report (attack-audit).

Every test here FAILS ON PURPOSE: each asserts what a tamper-evident log should do and proves,
on a real SQLite datastore, that it does not yet. They are findings, not regressions.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor.checkpoint_store import FILE_NAME, CheckpointStore, PushedCheckpoint
from server.audit import AuditLog, Break, EventKind
from server.audit.checkpoint import CheckpointFile, CheckpointSigner
from server.audit.event import GENESIS_HASH, canonical_json, event_from_row
from server.datastore.records import AUDIT_COLUMNS
from server.datastore.sqlite import SqliteDataStore
from server.issuance.records import task_jwt_record
from server.issuance.task_port import TaskJwtGrant
from svid._clock import FakeClock

AGENT = "spiffe://example.org/agents/research-bot"


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
            agent_id=AGENT,
            credential_id=f"jti-{i}",
            decision="allow",
            policy_ids=("default.cedar:permit_docs",),
            extra={"aud": "docs"},
        )
        clock.advance(10)


def sql(db: Path, statement: str, *args: object) -> None:
    con = sqlite3.connect(db)
    with con:
        con.execute(statement, args)
    con.close()


def rows(db: Path) -> list[dict[str, object]]:
    con = sqlite3.connect(db)
    found = con.execute(f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_events ORDER BY seq")
    out = [dict(zip(AUDIT_COLUMNS, r, strict=True)) for r in found]
    con.close()
    return out


def test_one_audience_with_a_comma_is_recorded_as_two_audiences() -> None:
    """FAILS ON PURPOSE. A field boundary lost before hashing: the event's resource is the
    audiences joined with commas (records.py task_jwt_record, workload_jwt_record via
    issuer.py), and _check_audience allows a comma inside one. A token for the one relying
    party "a,b" and one for the two "a" and "b" leave byte-identical audit events."""
    grant = TaskJwtGrant("task-1", "spiffe://example.org/rt", "", 60, "read", {}, "")
    _, one = task_jwt_record(AGENT, "id", jti="j", expires_at=9, audience=["a,b"], grant=grant)
    _, two = task_jwt_record(AGENT, "id", jti="j", expires_at=9, audience=["a", "b"], grant=grant)
    assert canonical_json(list(one)) != canonical_json(list(two))


def test_the_agent_trades_its_checkpoint_for_one_that_does_not_extend_it(
    db: Path, log: AuditLog, clock: FakeClock, tmp_path: Path
) -> None:
    """FAILS ON PURPOSE. Threat: one server of several is taken over; it holds the trust
    domain's shared checkpoint key (CheckpointSigner.load_shared) and SQL access. It rewrites
    event 2, re-hashes the chain after it, signs the new head (one seq further) and pushes it.
    The agent keeps only the newest checkpoint and keeps any higher seq under the pinned key
    (checkpoint_store.py offer: no check that it extends the one held), so it drops the
    checkpoint that would show RECHAINED, and verify --anchor on its copy passes."""
    signer = CheckpointSigner(ec.generate_private_key(ec.SECP256R1()))
    agent = CheckpointStore(tmp_path / FILE_NAME)
    fill(log, clock, 4)
    head = log.head()
    assert head is not None
    honest = signer.sign(head.seq, head.hash, head.seq, clock.now())
    assert agent.offer(PushedCheckpoint(honest.to_line(), honest.public_key_der()))

    # The rogue server: event 2 rewritten, every later one re-hashed, one event appended.
    prev = GENESIS_HASH
    con = sqlite3.connect(db)
    events = [event_from_row(r) for r in rows(db)]
    events.append(dataclasses.replace(events[-1], seq=5, event_id=events[-1].event_id + "x"))
    for original in events:
        event = original
        if event.seq == 2:
            event = dataclasses.replace(event, decision="deny", reason="no such token")
        event = dataclasses.replace(event, prev_hash=prev)
        event = dataclasses.replace(event, hash=event.compute_hash())
        con.execute("DELETE FROM audit_events WHERE seq = ?", (event.seq,))
        con.execute(
            f"INSERT INTO audit_events ({', '.join(AUDIT_COLUMNS)}) VALUES "
            f"({', '.join('?' for _ in AUDIT_COLUMNS)})",
            [
                canonical_json(list(event.policy_ids)).decode()
                if name == "policy_ids"
                else canonical_json(dict(event.extra)).decode()
                if name == "extra"
                else getattr(event, name)
                for name in AUDIT_COLUMNS
            ],
        )
        prev = event.hash
    con.execute("UPDATE audit_head SET seq = 5, hash = ?", (prev,))
    con.commit()
    con.close()
    forged = signer.sign(5, prev, 5, clock.now() + 60)
    agent.offer(PushedCheckpoint(forged.to_line(), forged.public_key_der()))

    # The server's own file (every line kept) still shows the rewrite:
    server_file = CheckpointFile(tmp_path / "server-checkpoints.jsonl")
    server_file.append(honest)
    server_file.append(forged)
    assert log.verify(anchors=server_file.anchors()[0]).problem is Break.RECHAINED
    # The agent's copy should too, but holds the forged head only:
    result = log.verify(anchors=CheckpointFile(agent.path).anchors()[0])
    assert not result.ok, f"history rewritten behind the agent's checkpoint, yet: {result}"
