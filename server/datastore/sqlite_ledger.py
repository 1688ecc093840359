"""The ledger half of the SQLite datastore: tasks, violations, credentials and the audit chain.

A mixin of `SqliteDataStore` (server/datastore/sqlite.py), which supplies the connection, the
lock and the transactions: one file, one writer, one migration runner for every table.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import sqlite_utils

from server.datastore import ledger_queries as lq
from server.datastore import queries as q
from server.datastore import sqlite_audit
from server.datastore.base import JtiClaim, RemovalClaim
from server.datastore.chain import Resealer, rows_to_write
from server.datastore.errors import (
    AgentRemovedError,
    BundleRefusedError,
    JtiHeldError,
    RemovalClaimLostError,
    StorageError,
    TaskEndedMeanwhileError,
    held_message,
)
from server.datastore.records import (
    FEED_FOREIGN_BUNDLE,
    FEED_TASK,
    AuditMark,
    AuditRow,
    AuditSnapshot,
    BundleWrite,
    Credential,
    EventFilter,
    Head,
    Removal,
    TaskCursor,
    TaskRecord,
    credential_chains,
    credential_tasks,
    holding_agents,
    revocation_needed_from,
)

# OR ROLLBACK: a failed insert ends the whole transaction, as write_ledger's error does anyway.
# A plain INSERT of many rows may abort midway in a transaction, so SQLite copied every page
# it touched that the transaction had dirtied already into a statement journal, spilled past
# 64 KiB to a temp file: more pages written per group commit than its WAL frames (strace, JWT
# batch load: 164 temp-file pages to 110 WAL frames per commit).
_CREDENTIALS_INTO = lq.CREDENTIALS_INTO.replace("INSERT INTO", "INSERT OR ROLLBACK INTO", 1)
_AUDIT_EVENTS_INTO = lq.AUDIT_EVENTS_INTO.replace("INSERT INTO", "INSERT OR ROLLBACK INTO", 1)
# The credential prune's two steps (prune_credentials), by rowid: the next :limit expired rows
# past rowid :after, read off the write lock, then those deleted under it, the expiry checked
# again. No index leads by expires_at: one would cost every insert on the issuance path.
_EXPIRED_CREDENTIALS = (
    "SELECT rowid FROM credentials WHERE rowid > :after AND expires_at < :needed_from "
    "ORDER BY rowid LIMIT :limit"
)
_PRUNE_CREDENTIALS_BY_ROWID = (
    "DELETE FROM credentials WHERE rowid IN (SELECT value FROM json_each(:rowids)) "
    "AND expires_at < :needed_from"
)
# Expired credentials one prune transaction deletes at most (prune_credentials): about 5 ms
# under the write lock at 1 M rows (bench/test_bench_audit_retention.py), an issuance commit's
# wait at worst; 1000 held it twice as long, 200 spent more on commits than it saved.
PRUNE_CHUNK = 500


def _task_from(row: Mapping[str, Any]) -> TaskRecord:
    return TaskRecord(
        task_id=row["task_id"],
        agent_id=row["agent_id"],
        runtime_id=row["runtime_id"],
        state=row["state"],
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        body=row["body"],
        parent_task_id=row["parent_task_id"],
    )


def _removal_params(removal: Removal) -> dict[str, Any]:
    return {
        "agent_id": removal.agent_id,
        "reason": removal.reason,
        "started_at": removal.started_at,
    }


def _task_params(task: TaskRecord) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "agent_id": task.agent_id,
        "runtime_id": task.runtime_id,
        "state": task.state,
        "expires_at": task.expires_at,
        "created_at": task.created_at,
        "body": task.body,
        "parent_task_id": task.parent_task_id,
    }


class SqliteLedger:
    """Task records, credential ledger and audit chain on the datastore's connection."""

    _path: Path
    _lock: threading.RLock

    def _transaction(self) -> AbstractContextManager[sqlite_utils.Database]:
        raise NotImplementedError  # SqliteDataStore's

    def _rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        raise NotImplementedError  # SqliteDataStore's

    def _refuse_moved(self, what: str = "write to the datastore") -> None:
        raise NotImplementedError  # SqliteDataStore's

    def _append_feed(self, db: sqlite_utils.Database, kind: str, keys: Iterable[str]) -> None:
        raise NotImplementedError  # SqliteDataStore's

    def _write(self, what: str, sql: str, params: Mapping[str, Any]) -> int:
        try:
            with self._transaction() as db:
                return int(db.execute(sql, dict(params)).rowcount)
        except sqlite3.Error as e:
            raise StorageError(f"cannot {what}: {e}") from e

    def _read(self, what: str, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        try:
            return self._rows(sql, params)
        except sqlite3.Error as e:
            raise StorageError(f"cannot {what}: {e}") from e

    # -- tasks ----------------------------------------------------------------------------------

    def put_task(self, task: TaskRecord) -> None:
        try:
            with self._transaction() as db:
                db.execute(lq.UPSERT_TASK, _task_params(task))
                self._append_feed(db, FEED_TASK, (task.task_id,))
        except sqlite3.Error as e:
            raise StorageError(f"cannot record the task: {e}") from e

    def swap_task(self, task: TaskRecord, expected_state: str) -> bool:
        params = {**_task_params(task), "expected_state": expected_state}
        try:
            with self._transaction() as db:
                if db.execute(lq.SWAP_TASK, params).rowcount != 1:
                    return False
                self._append_feed(db, FEED_TASK, (task.task_id,))
                return True
        except sqlite3.Error as e:
            raise StorageError(f"cannot record the task: {e}") from e

    def get_task(self, task_id: str) -> TaskRecord | None:
        rows = self._read("read the task", lq.SELECT_TASK, {"task_id": task_id})
        return _task_from(rows[0]) if rows else None

    def list_tasks(
        self,
        *,
        agent_id: str = "",
        state: str = "",
        runtime_ids: Sequence[str] | None = None,
        after: TaskCursor | None = None,
        limit: int = 0,
    ) -> list[TaskRecord]:
        page = lq.task_page(
            agent_id=agent_id, state=state, runtime_ids=runtime_ids, after=after, limit=limit
        )
        if page is None:
            return []
        return [_task_from(r) for r in self._read("list tasks", *page)]

    def sub_tasks(self, parent_task_id: str, state: str) -> list[TaskRecord]:
        params = {"parent_task_id": parent_task_id, "state": state}
        return [_task_from(r) for r in self._read("list sub-tasks", lq.SUB_TASKS, params)]

    def due_tasks(self, state: str, now: int) -> list[TaskRecord]:
        rows = self._read("list due tasks", lq.DUE_TASKS, {"state": state, "now": now})
        return [_task_from(r) for r in rows]

    def add_violation(self, agent_id: str, node_id: str, at: int) -> None:
        params = {"agent_id": agent_id, "node_id": node_id, "at": at}
        self._write("record the violation", lq.INSERT_VIOLATION, params)

    def count_violations(self, agent_id: str, node_id: str, since: int) -> int:
        params = {"agent_id": agent_id, "node_id": node_id, "since": since}
        return int(self._read("count violations", lq.COUNT_VIOLATIONS, params)[0]["n"])

    def prune_violations(self, before: int) -> int:
        return self._write("prune violations", lq.PRUNE_VIOLATIONS, {"before": before})

    def prune_tasks(self, state: str, before: int) -> int:
        params = {"state": state, "before": before}
        return self._write("prune tasks", lq.PRUNE_TASKS, params)

    # -- credentials ----------------------------------------------------------------------------

    def write_ledger(
        self,
        credentials: Sequence[Credential],
        audit_rows: Sequence[AuditRow],
        jtis: Sequence[JtiClaim] = (),
        now: int = 0,
        reseal: Resealer | None = None,
        *,
        bundles: Sequence[BundleWrite] = (),
        tasks: Sequence[TaskRecord] = (),
        claims: Sequence[RemovalClaim] = (),
    ) -> None:
        if not credentials and not audit_rows and not jtis and not bundles and not tasks:
            return
        holding_tasks = credential_tasks(credentials)
        try:
            with self._transaction() as db:
                if claims:
                    lost = [
                        c
                        for c in claims
                        if db.execute(q.REMOVAL_CLAIMED_BY, c._asdict()).fetchone() is None
                    ]
                    if lost:
                        raise RemovalClaimLostError(lost)
                # Under the write lock: a removal or a task's end commits before these reads
                # or after this write, and then its revocations find these credentials.
                chains = {
                    jti: [r[0] for r in db.execute(lq.CHAIN_AGENTS, {"task_id": t, "jti": jti})]
                    for t, jti in credential_chains(credentials)
                }
                agents = holding_agents(credentials, chains)
                if agents:
                    params = {"agent_ids": json.dumps(agents)}
                    refused = [r[0] for r in db.execute(lq.NOT_ADMITTED_AGENTS, params)]
                    if refused:
                        raise AgentRemovedError(refused, chains)
                if holding_tasks:
                    params = {"task_ids": json.dumps(holding_tasks)}
                    refused = [r[0] for r in db.execute(lq.NOT_ACTIVE_TASKS, params)]
                    if refused:
                        raise TaskEndedMeanwhileError(refused)
                if audit_rows:
                    # Under the write lock BEGIN IMMEDIATE took: no other writer can move the
                    # head between this read and the commit.
                    stored = sqlite_audit.read_head(db.conn)
                    audit_rows = rows_to_write(stored, audit_rows, reseal)
                if jtis:
                    # Before anything is written: a held one rolls the whole write back.
                    held = [
                        (c.issuer, c.jti)
                        for c in jtis
                        if db.execute(q.CLAIM_JTI, {**c._asdict(), "now": now}).rowcount != 1
                    ]
                    if held:
                        raise JtiHeldError(held_message(held), held)
                if bundles:
                    self._put_bundles(db, bundles)
                for task in tasks:
                    db.execute(lq.UPSERT_TASK, _task_params(task))
                if tasks:
                    self._append_feed(db, FEED_TASK, [t.task_id for t in tasks])
                # Multi-row statements: see insert_many for why not executemany.
                sqlite_audit.insert_many(db.conn, _CREDENTIALS_INTO, credentials)
                if audit_rows:
                    sqlite_audit.insert_many(db.conn, _AUDIT_EVENTS_INTO, audit_rows)
                    last = audit_rows[-1]
                    db.execute(lq.UPSERT_AUDIT_HEAD, {"seq": last[0], "hash": last[-1]})
        except sqlite3.Error as e:
            raise StorageError(
                f"cannot commit {len(credentials)} credential record(s) and {len(audit_rows)} "
                f"audit event(s): {e}"
            ) from e

    def resume_removal(self, removal: Removal) -> bool:
        params = _removal_params(removal)
        return self._write("store the removal", q.RESUME_REMOVAL, params) == 1

    def _put_bundles(self, db: sqlite_utils.Database, bundles: Sequence[BundleWrite]) -> None:
        """Store (or remove) the foreign bundles in the ledger's transaction: one the store
        refuses (a higher sequence stored; no bundle to remove) rolls the whole write back,
        the events recording it with it."""
        refused = [
            (i, b)
            for i, b in enumerate(bundles)
            if db.execute(*q.ledger_bundle_write(b)).rowcount != 1
        ]
        if refused:
            raise BundleRefusedError(
                [b.bundle.trust_domain for _, b in refused if not b.remove],
                [b.bundle.trust_domain for _, b in refused if b.remove],
                positions=[i for i, _ in refused],
            )
        self._append_feed(db, FEED_FOREIGN_BUNDLE, [b.bundle.trust_domain for b in bundles])

    def _credentials(self, sql: str, params: Mapping[str, Any]) -> list[Credential]:
        rows = self._read("read credentials", sql, params)
        return [Credential(*r.values()) for r in rows]

    def task_credentials(self, task_id: str, now: int) -> list[Credential]:
        params = {"task_id": task_id, "needed_from": revocation_needed_from(now)}
        return self._credentials(lq.TASK_CREDENTIALS, params)

    def agent_credentials(self, agent_id: str, now: int) -> list[Credential]:
        params = {"agent_id": agent_id, "needed_from": revocation_needed_from(now)}
        return self._credentials(lq.AGENT_CREDENTIALS, params)

    def workload_jwt(self, jti: str, expires_at: int, spiffe_id: str) -> Credential | None:
        params = {"jti": jti, "expires_at": expires_at, "spiffe_id": spiffe_id}
        found = self._credentials(lq.WORKLOAD_JWT, params)
        return found[0] if found else None

    def count_credentials(self, task_id: str) -> int:
        rows = self._read("count credentials", lq.COUNT_CREDENTIALS, {"task_id": task_id})
        return int(rows[0]["n"])

    def count_credentials_of(self, task_ids: Sequence[str]) -> dict[str, int]:
        ids = sorted(set(task_ids))
        counts: dict[str, int] = {}
        for start in range(0, len(ids), lq.COUNT_CREDENTIALS_BATCH):
            batch = ids[start : start + lq.COUNT_CREDENTIALS_BATCH]
            for row in self._read("count credentials", *lq.count_credentials_of(batch)):
                counts[row["task_id"]] = int(row["n"])
        return counts

    def prune_credentials(self, now: int) -> int:
        """Expired rows found by reads on a connection of its own, deleted by rowid a chunk at
        a time: a write holds SQLite's lock (and the store's) only to delete rows it knows.

        With no index on expires_at, one DELETE by it scanned the whole table under the write
        lock, every issuance commit waiting (over 100 ms at 1 M rows). A read in WAL mode
        blocks no writer, and off the store's lock none of this process's either. Each read
        goes on in rowid order from the last chunk's end, so the table is read once however
        many chunks it takes; the expired rows are mostly the oldest, so the early chunks are
        found early. A row inserted meanwhile past the read's position may be seen or left to
        the next prune; one whose expiry is not past is never deleted, as the delete checks it
        again (a rowid freed meanwhile may be a newer row's). A failure midway leaves only
        rows nobody needs deleted, and the next prune takes the rest.
        """
        needed_from = revocation_needed_from(now)
        # The reader opens the path: gone, SQLite says only that it cannot open a file.
        self._refuse_moved("prune credentials")
        try:
            reader = sqlite_audit.connect_read_only(self._path)
        except sqlite3.Error as e:
            self._refuse_moved("prune credentials")
            raise StorageError(f"cannot prune credentials: {e}") from e
        gone = 0
        after = -(2**63)
        try:
            while True:
                found = {"after": after, "needed_from": needed_from, "limit": PRUNE_CHUNK}
                rowids = [r[0] for r in reader.execute(_EXPIRED_CREDENTIALS, found)]
                if rowids:
                    chunk = {"rowids": json.dumps(rowids), "needed_from": needed_from}
                    gone += self._write("prune credentials", _PRUNE_CREDENTIALS_BY_ROWID, chunk)
                if len(rowids) < PRUNE_CHUNK:
                    return gone
                after = rowids[-1]
        except sqlite3.Error as e:
            self._refuse_moved("prune credentials")
            raise StorageError(f"cannot prune credentials: {e}") from e
        finally:
            reader.close()

    # -- audit chain ----------------------------------------------------------------------------

    def audit_head(self) -> Head | None:
        rows = self._read("read the audit head", lq.SELECT_AUDIT_HEAD, {})
        return Head(int(rows[0]["seq"]), str(rows[0]["hash"])) if rows else None

    def audit_rows(self, where: EventFilter | None = None) -> Iterator[dict[str, Any]]:
        def fetch(sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
            return [tuple(r.values()) for r in self._read("read the audit log", sql, params)]

        return sqlite_audit.page_rows(fetch, where)

    def audit_base(self) -> Head | None:
        rows = self._read("read the audit base", lq.SELECT_AUDIT_BASE, {})
        return Head(int(rows[0]["seq"]), str(rows[0]["hash"])) if rows else None

    def audit_marks(self, after: int, limit: int) -> list[AuditMark]:
        rows = self._read("read the audit log", lq.AUDIT_MARKS, {"after": after, "limit": limit})
        return [AuditMark(int(r["seq"]), float(r["ts"]), str(r["hash"])) for r in rows]

    def prune_audit(self, through: Head, now: float) -> int:
        try:
            with self._transaction() as db:
                base = sqlite_audit.read_base(db.conn)
                if base is not None and base.seq >= through.seq:
                    return 0
                found = db.execute(lq.AUDIT_HASH_AT, {"seq": through.seq}).fetchone()
                # The base must be a real link of the chain, or verify could never start
                # from it: refuse to cut where the log was already changed behind our back.
                if found is None or found[0] != through.hash:
                    raise StorageError(
                        f"cannot prune the audit log through seq {through.seq}: the event "
                        "there is missing or has another hash"
                    )
                removed = int(db.execute(lq.PRUNE_AUDIT_EVENTS, {"seq": through.seq}).rowcount)
                params = {"seq": through.seq, "hash": through.hash, "now": now}
                db.execute(lq.UPSERT_AUDIT_BASE, params)
                return removed
        except sqlite3.Error as e:
            raise StorageError(f"cannot prune the audit log: {e}") from e

    def audit_snapshot(self) -> AbstractContextManager[AuditSnapshot]:
        # A connection of its own: a snapshot must not hold the writer's lock while a verify
        # walks millions of rows. Opened by path: one naming another file, or none, would
        # have it verify that file's log, or fail without saying why.
        self._refuse_moved("read the audit log")
        return sqlite_audit.snapshot(self._path)
