"""One-shot import of the files older versions kept beside the datastore: tasks.db, audit.db.

Those versions wrote tasks, credential records and violations to `<data_dir>/tasks.db`, and the
audit chain to `<data_dir>/audit.db`, outside the migration runner. On the first start of this
version each file still there is copied into the datastore in one transaction, marked done in
`legacy_imports` in that same transaction, and renamed `<name>.imported` (kept as a backup,
never read again). A crash at any point leaves either the old file to import again or the mark.

The audit chain is verified before the copy (a broken chain is not merged: the server refuses to
start and says so) and again, inside the transaction, at its new place: same events, same head,
so checkpoints signed before the upgrade still anchor it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from server.audit.store import SqliteAuditStore
from server.audit.verify import Anchor, verify_snapshot, verify_store
from server.datastore import ledger_queries as lq
from server.datastore import sqlite_audit
from server.datastore.errors import DataStoreError
from server.datastore.records import AUDIT_COLUMNS, AuditSnapshot, Head
from server.datastore.sqlite import SqliteDataStore
from svid._clock import Clock
from svid._durable import fsync_dir

TASKS_FILE = "tasks.db"
AUDIT_FILE = "audit.db"
IMPORTED_SUFFIX = ".imported"
_BATCH = 1000


class LegacyImportError(DataStoreError):
    """An older version's file cannot be imported; the message says which and what to do."""


def import_legacy_files(store: SqliteDataStore, data_dir: Path, clock: Clock) -> list[str]:
    """Import and retire tasks.db and audit.db from `data_dir`; returns the names imported now."""
    imported = []
    for name in (AUDIT_FILE, TASKS_FILE):
        path = data_dir / name
        if not path.is_file():
            continue
        if not _already_imported(store, name):
            _settle(path)
            now = int(clock.now())
            importer = _import_audit if name == AUDIT_FILE else _import_tasks
            if importer(store, path, now):
                imported.append(name)
        _retire(path)
    return imported


def _already_imported(store: SqliteDataStore, name: str) -> bool:
    with store.transaction() as db:
        return db.execute(lq.SELECT_LEGACY_IMPORT, {"name": name}).fetchone() is not None


def _settle(path: Path) -> None:
    """Fold the old file's WAL into it: the last connection to close checkpoints, so the
    read-only connections below see every committed row."""
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()
    except sqlite3.Error as e:
        raise LegacyImportError(f"{path.name}: cannot open it to import: {e}") from e


def _retire(path: Path) -> None:
    for suffix in ("-wal", "-shm", ""):
        part = path.with_name(path.name + suffix)
        if part.exists():
            part.rename(part.with_name(part.name + IMPORTED_SUFFIX))
    fsync_dir(path.parent)  # renamed for good: a power cut must not bring the import back


def _mark(db: sqlite3.Connection, name: str, now: int, detail: str) -> None:
    db.execute(lq.INSERT_LEGACY_IMPORT, {"name": name, "now": now, "detail": detail})


def _import_audit(store: SqliteDataStore, path: Path, now: int) -> str:
    old = SqliteAuditStore(path)
    try:
        before = verify_store(old)
    finally:
        old.close()
    if not before.ok:
        raise LegacyImportError(
            f"{path.name} from an older version does not verify, so it is not merged into the "
            f"datastore: {before}. Keep it as evidence and move it out of the data directory "
            "to start with an empty log."
        )
    anchors = [] if before.head is None else [Anchor(before.head.seq, before.head.hash)]
    src = sqlite_audit.connect_read_only(path)
    try:
        with store.transaction() as db:
            if db.execute(lq.SELECT_LEGACY_IMPORT, {"name": AUDIT_FILE}).fetchone():
                return ""
            if db.execute(lq.COUNT_AUDIT_EVENTS).fetchone()[0]:
                raise LegacyImportError(
                    f"{path.name} from an older version cannot be merged: the datastore already "
                    "holds audit events. Move it out of the data directory (keep it as a record)."
                )
            cursor = src.execute(lq.ALL_AUDIT_ROWS)
            while page := cursor.fetchmany(_BATCH):
                sqlite_audit.insert_many(db, lq.AUDIT_EVENTS_INTO, page)
            if before.head is not None:
                db.execute(lq.UPSERT_AUDIT_HEAD, {"seq": before.head.seq, "hash": before.head.hash})
            after = verify_snapshot(_snapshot_of(db), anchors)
            if not after.ok or after.checked != before.checked or after.head != before.head:
                raise LegacyImportError(f"{path.name}: the imported audit chain differs: {after}")
            detail = f"{after.checked} audit events, head {after.head}"
            _mark(db, AUDIT_FILE, now, detail)
    except sqlite3.Error as e:
        raise LegacyImportError(f"{path.name}: import failed, nothing was kept: {e}") from e
    finally:
        src.close()
    return detail


def _snapshot_of(db: sqlite3.Connection) -> AuditSnapshot:
    """The chain as this (uncommitted) transaction sees it."""
    head_row = db.execute(lq.SELECT_AUDIT_HEAD).fetchone()

    def rows() -> Iterator[dict[str, Any]]:
        cursor = db.execute(lq.ALL_AUDIT_ROWS)
        while page := cursor.fetchmany(_BATCH):
            for r in page:
                yield dict(zip(AUDIT_COLUMNS, r, strict=True))

    head = None if head_row is None else Head(int(head_row[0]), str(head_row[1]))
    return AuditSnapshot((), head, rows)


# The old task store's credential rows have no issuer: they go in with '' (server.tasks.crl
# lists such a serial under every CA); nor an acting workload's agent, nor the token one was
# exchanged for (it had no delegation).
_LEGACY_CREDENTIAL_COLUMNS = ", ".join(
    c for c in lq.CREDENTIAL_COLUMNS if c not in ("issuer", "actor_agent_id", "derived_from")
)
_LEGACY_CREDENTIALS_INTO = f"INSERT INTO credentials ({_LEGACY_CREDENTIAL_COLUMNS})"


def _tables(src: sqlite3.Connection) -> set[str]:
    return {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _import_tasks(store: SqliteDataStore, path: Path, now: int) -> str:
    try:
        src = sqlite_audit.connect_read_only(path)
    except sqlite3.Error as e:
        raise LegacyImportError(f"{path.name}: cannot open it to import: {e}") from e
    try:
        tables = _tables(src)
        with store.transaction() as db:
            if db.execute(lq.SELECT_LEGACY_IMPORT, {"name": TASKS_FILE}).fetchone():
                return ""
            counts = {"tasks": 0, "credentials": 0, "violations": 0}
            if "tasks" in tables:
                # rowid order is the order the old store listed them in.
                cursor = src.execute(
                    "SELECT task_id, agent_id, runtime_id, state, expires_at, body FROM tasks "
                    "ORDER BY rowid"
                )
                for task_id, agent_id, runtime_id, state, expires_at, body in cursor:
                    fields = json.loads(body)
                    db.execute(
                        lq.UPSERT_TASK,
                        {
                            "task_id": task_id,
                            "agent_id": agent_id,
                            "runtime_id": runtime_id,
                            "state": state,
                            "expires_at": expires_at,
                            "created_at": int(fields.get("created_at", 0)),
                            "body": body,
                            "parent_task_id": str(fields.get("parent_task_id", "")),
                        },
                    )
                    counts["tasks"] += 1
            for table, into, columns in (
                ("credentials", _LEGACY_CREDENTIALS_INTO, _LEGACY_CREDENTIAL_COLUMNS),
                ("violations", "INSERT INTO violations (agent_id, at)", "agent_id, at"),
            ):
                if table not in tables:
                    continue
                cursor = src.execute(f"SELECT {columns} FROM {table} ORDER BY rowid")  # noqa: S608
                while page := cursor.fetchmany(_BATCH):
                    sqlite_audit.insert_many(db, into, page)
                    counts[table] += len(page)
            detail = ", ".join(f"{n} {t}" for t, n in counts.items())
            _mark(db, TASKS_FILE, now, detail)
    except (sqlite3.Error, ValueError) as e:
        raise LegacyImportError(f"{path.name}: import failed, nothing was kept: {e}") from e
    finally:
        src.close()
    return detail
