"""The shared audit checkpoints (AuditCheckpointStore) on the SQLite datastore's connection."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import sqlite_utils

from server.datastore import checkpoint_queries as cq
from server.datastore.errors import StorageError
from server.datastore.records import FEED_AUDIT_RECORD, AuditRecord, SealedAuditKey


class SqliteCheckpoints:
    """A mixin of SqliteDataStore: its transaction, reads and feed."""

    def _transaction(self) -> AbstractContextManager[sqlite_utils.Database]:
        raise NotImplementedError  # SqliteDataStore's

    def _rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        raise NotImplementedError  # SqliteDataStore's

    def _append_feed(self, db: sqlite_utils.Database, kind: str, keys: Iterable[str]) -> None:
        raise NotImplementedError  # SqliteDataStore's

    def save_audit_record(self, record: AuditRecord) -> bool:
        params = cq.record_params(record)
        try:
            with self._transaction() as db:
                kept = int(db.execute(cq.SAVE_AUDIT_RECORD, params).rowcount) == 1
                if kept:
                    self._append_feed(db, FEED_AUDIT_RECORD, (record.kind,))
                return kept
        except sqlite3.Error as e:
            raise StorageError(f"cannot store the audit {record.kind}: {e}") from e

    def audit_records(self) -> list[AuditRecord]:
        return [
            AuditRecord(str(r["kind"]), int(r["seq"]), float(r["signed_at"]), str(r["line"]))
            for r in self._read("read the audit checkpoints", cq.AUDIT_RECORDS, {})
        ]

    def offer_audit_key(self, key: SealedAuditKey) -> SealedAuditKey:
        params = cq.key_params(key)
        try:
            with self._transaction() as db:
                db.execute(cq.OFFER_AUDIT_KEY, params)
                row = db.execute(cq.AUDIT_KEY).fetchone()
        except sqlite3.Error as e:
            raise StorageError(f"cannot store the audit checkpoint key: {e}") from e
        return cq.key_from(row)

    def audit_rows_after(self, after: int, limit: int) -> list[dict[str, Any]]:
        return self._read(
            "read the audit log", cq.AUDIT_ROWS_AFTER, {"after": after, "limit": limit}
        )

    def _read(self, what: str, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        try:
            return self._rows(sql, params)
        except sqlite3.Error as e:
            raise StorageError(f"cannot {what}: {e}") from e
