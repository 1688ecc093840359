"""What the audit checkpoint and retention tests share: a data directory with a real SQLite
datastore, its audit log and a checkpointer with a real key and file, on a fake clock; and
helpers that fill the log, edit the database behind its back and run `audit verify`."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from server.audit import AuditLog
from server.audit.checkpoint import (
    CHECKPOINT_FILE,
    PUBLIC_KEY_FILE,
)
from server.audit.checkpointer import Checkpointer
from server.audit.event import GENESIS_HASH, event_from_row
from server.audit.retention import Pruner, RetentionPolicy
from server.cli import main
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock

AGENT = "spiffe://example.org/agents/research-bot"
START = 1_800_000_000.0


@dataclasses.dataclass
class Setup:
    data_dir: Path
    store: SqliteDataStore
    log: AuditLog
    checkpointer: Checkpointer
    clock: FakeClock

    @property
    def db(self) -> Path:
        return self.data_dir / "datastore.sqlite3"

    @property
    def checkpoints(self) -> Path:
        return self.data_dir / CHECKPOINT_FILE

    @property
    def pinned(self) -> Path:
        return self.data_dir / PUBLIC_KEY_FILE

    def pruner(self, policy: RetentionPolicy, batch: int = 4, store: object = None) -> Pruner:
        return Pruner(
            store or self.store,  # type: ignore[arg-type]
            self.log,
            self.checkpointer,
            self.clock,
            policy,
            batch=batch,
            pause=0,
        )


def make_setup(tmp_path: Path, clock: FakeClock) -> Setup:
    """A fresh `data` directory under tmp_path, with the log's datastore and checkpoint key."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store = SqliteDataStore(data_dir / "datastore.sqlite3", clock)
    log = AuditLog(store, clock)
    checkpointer = Checkpointer.in_data_dir(
        log,
        data_dir,
        clock,
        interval=60.0,
    )
    return Setup(data_dir, store, log, checkpointer, clock)


def fill(log: AuditLog, clock: FakeClock, n: int, step: float = 1.0) -> None:
    """n events, the clock moved on by `step` seconds after each."""
    for i in range(n):
        log.append("jwt_minted", agent_id=AGENT, credential_id=f"jti-{i}", decision="allow")
        clock.advance(step)


def sql(db: Path, *statements: str) -> None:
    con = sqlite3.connect(db)
    with con:
        for statement in statements:
            con.execute(statement)
    con.close()


def rechain(db: Path, *, after: int = 0, only: int | None = None, **edit: object) -> None:
    """What someone with write access does: apply `edit` to every event after seq `after` (or to
    the one at seq `only`), hash each of them onward from the one before (the pruned base or
    genesis when `after` is 0) and move the head row, so the chain reads whole."""
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    if after:
        prev = con.execute("SELECT hash FROM audit_events WHERE seq = ?", (after,)).fetchone()[0]
    else:
        base = con.execute("SELECT hash FROM audit_base").fetchone()
        prev = GENESIS_HASH if base is None else base[0]
    query = "SELECT * FROM audit_events WHERE seq > ? ORDER BY seq"
    rows = [dict(r) for r in con.execute(query, (after,))]
    with con:
        for row in rows:
            event = event_from_row(row)
            if only is None or event.seq == only:
                event = dataclasses.replace(event, **edit)  # type: ignore[arg-type]
            event = dataclasses.replace(event, prev_hash=prev)
            event = dataclasses.replace(event, hash=event.compute_hash())
            con.execute(
                "UPDATE audit_events SET decision = ?, reason = ?, ts = ?, prev_hash = ?, "
                "hash = ? WHERE seq = ?",
                (event.decision, event.reason, event.ts, event.prev_hash, event.hash, event.seq),
            )
            prev = event.hash
        con.execute("UPDATE audit_head SET hash = ?", (prev,))
    con.close()


def verify(setup: Setup, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["audit", "verify", "--data-dir", str(setup.data_dir), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err
