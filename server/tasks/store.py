"""Durable task records, issued credentials and out-of-intent violations (`<data_dir>/tasks.db`).

A store of its own rather than tables in the main datastore: the task layer can evolve without
migrating the registration database, and a task record is written once per begin/end while
credentials are written per issuance (batched in one transaction).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from server.audit.store import insert_many
from server.datastore.records import revocation_needed_from
from server.tasks.model import Credential, Task, TaskState

# credentials has no key on (kind, value): those are random 159-bit serials and 128-bit JWT ids,
# each recorded once, and nothing looks a credential up by them (revocation reads by task and
# by agent). An index on them put every insert on a random page: with a million credentials
# live, recording one cost ~55 µs of CPU and a 4 KiB WAL page, ten times the rest of the row.
# (A database made before keeps its key; INSERT OR REPLACE works on both.)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    runtime_id TEXT NOT NULL,
    state TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_agent ON tasks (agent_id, state);
CREATE INDEX IF NOT EXISTS tasks_state ON tasks (state, expires_at);
CREATE TABLE IF NOT EXISTS credentials (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    spiffe_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS credentials_task ON credentials (task_id);
CREATE INDEX IF NOT EXISTS credentials_agent ON credentials (agent_id);
CREATE TABLE IF NOT EXISTS violations (
    agent_id TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS violations_agent ON violations (agent_id, at);
"""


_CRED_SELECT = (
    "SELECT kind, value, agent_id, spiffe_id, task_id, expires_at FROM credentials WHERE "
)


def _task_from(body: str) -> Task:
    data = json.loads(body)
    data["state"] = TaskState(data["state"])
    for key in ("actions", "resources", "policy_ids"):
        data[key] = tuple(data[key])
    return Task(**data)


def _body(task: Task) -> str:
    data = asdict(task)
    data["state"] = task.state.value
    return json.dumps(data, sort_keys=True)


class TaskStore:
    """SQLite, WAL, synchronous=FULL; one connection behind a lock (calls are short)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        path.chmod(0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- tasks ----------------------------------------------------------------------------------

    def put_task(self, task: Task) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO tasks (task_id, agent_id, runtime_id, state, expires_at,"
                " body) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    task.task_id,
                    task.agent_id,
                    task.runtime_id,
                    task.state.value,
                    task.expires_at,
                    _body(task),
                ),
            )

    def get_task(self, task_id: str) -> Task | None:
        with self._lock:
            row = self._db.execute(
                "SELECT body FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
        return None if row is None else _task_from(row[0])

    def list_tasks(
        self,
        *,
        agent_id: str = "",
        state: str = "",
        runtime_ids: Sequence[str] | None = None,
    ) -> list[Task]:
        sql = "SELECT body FROM tasks WHERE 1=1"
        args: list[object] = []
        if agent_id:
            sql += " AND agent_id = ?"
            args.append(agent_id)
        if state:
            sql += " AND state = ?"
            args.append(state)
        if runtime_ids is not None:
            if not runtime_ids:
                return []
            sql += f" AND runtime_id IN ({','.join('?' * len(runtime_ids))})"
            args.extend(runtime_ids)
        sql += " ORDER BY rowid"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_task_from(r[0]) for r in rows]

    def due(self, now: int) -> list[Task]:
        """Active tasks whose TTL has run out."""
        with self._lock:
            rows = self._db.execute(
                "SELECT body FROM tasks WHERE state = ? AND expires_at <= ?",
                (TaskState.ACTIVE.value, now),
            ).fetchall()
        return [_task_from(r[0]) for r in rows]

    def finish(self, task: Task, state: TaskState, at: int, reason: str) -> Task:
        done = replace(task, state=state, ended_at=at, end_reason=reason)
        self.put_task(done)
        return done

    # -- credentials ----------------------------------------------------------------------------

    def record(self, creds: Iterable[Credential]) -> None:
        rows = list(creds)  # a Credential is its row: columns in field order
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                # Multi-row statements: see insert_many for why not executemany.
                insert_many(self._db, "INSERT OR REPLACE INTO credentials", rows)
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back already (a full disk): a second ROLLBACK would
                # raise and hide why the write failed.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _creds(self, where: str, args: tuple[object, ...]) -> list[Credential]:
        # `where` is one of this module's constants, never caller text.
        sql = _CRED_SELECT + where + " ORDER BY kind, value"
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [Credential(*r) for r in rows]

    # A credential counts until no verifier can accept it: a verifier takes a JWT through
    # exp + its leeway, so revoking one that expired a moment ago still matters.
    def task_credentials(self, task_id: str, now: int) -> list[Credential]:
        """Credentials of the task some verifier may still accept at `now`."""
        needed_from = revocation_needed_from(now)
        return self._creds("task_id = ? AND expires_at >= ?", (task_id, needed_from))

    def agent_credentials(self, agent_id: str, now: int) -> list[Credential]:
        """Credentials issued through the agent some verifier may still accept at `now`."""
        needed_from = revocation_needed_from(now)
        return self._creds("agent_id = ? AND expires_at >= ?", (agent_id, needed_from))

    def count_credentials(self, task_id: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM credentials WHERE task_id = ?", (task_id,)
            ).fetchone()
        return int(row[0])

    # -- risk signal ----------------------------------------------------------------------------

    def add_violation(self, agent_id: str, at: int) -> None:
        with self._lock:
            self._db.execute("INSERT INTO violations VALUES (?, ?)", (agent_id, at))

    def violations(self, agent_id: str, since: int) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM violations WHERE agent_id = ? AND at > ?", (agent_id, since)
            ).fetchone()
        return int(row[0])

    def prune(self, now: int, violation_window: int) -> int:
        """Forget credentials no verifier can accept any more and old violations; returns how
        many rows went."""
        with self._lock:
            gone = self._db.execute(
                "DELETE FROM credentials WHERE expires_at < ?", (revocation_needed_from(now),)
            )
            old = self._db.execute(
                "DELETE FROM violations WHERE at <= ?", (now - violation_window,)
            )
            return int(gone.rowcount) + int(old.rowcount)
