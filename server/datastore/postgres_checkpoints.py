"""The shared audit checkpoints (AuditCheckpointStore) on the PostgreSQL datastore."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import psycopg

from server.datastore import checkpoint_queries as cq
from server.datastore.postgres_sql import pg
from server.datastore.records import AUDIT_COLUMNS, FEED_AUDIT_RECORD, AuditRecord, SealedAuditKey

T = TypeVar("T")
Cursor = psycopg.Cursor[Any]


class PostgresCheckpoints:
    """A mixin of PostgresDataStore: its transactions, reads and feed."""

    def _write(self, what: str, work: Callable[[Cursor], T]) -> T:
        raise NotImplementedError  # PostgresDataStore's

    def _tuples(self, what: str, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # PostgresDataStore's

    def _append_feed(self, cur: Cursor, kind: str, keys: Iterable[str]) -> None:
        raise NotImplementedError  # PostgresDataStore's

    def save_audit_record(self, record: AuditRecord) -> bool:
        params = cq.record_params(record)

        def work(cur: Cursor) -> bool:
            kept = int(cur.execute(pg(cq.SAVE_AUDIT_RECORD), params).rowcount) == 1
            if kept:
                self._append_feed(cur, FEED_AUDIT_RECORD, (record.kind,))
            return kept

        return self._write(f"store the audit {record.kind}", work)

    def audit_records(self) -> list[AuditRecord]:
        rows = self._tuples("read the audit checkpoints", cq.AUDIT_RECORDS, {})
        return [AuditRecord(str(k), int(s), float(t), str(line)) for k, s, t, line in rows]

    def offer_audit_key(self, key: SealedAuditKey) -> SealedAuditKey:
        params = cq.key_params(key)

        def work(cur: Cursor) -> tuple[Any, ...]:
            # A concurrent offer waits on the key's row, then does nothing: one stands.
            cur.execute(pg(cq.OFFER_AUDIT_KEY), params)
            row = cur.execute(cq.AUDIT_KEY).fetchone()
            assert row is not None, "the audit key row is missing after its insert"
            return tuple(row)

        row = self._write("store the audit checkpoint key", work)
        return cq.key_from(row)

    def audit_rows_after(self, after: int, limit: int) -> list[dict[str, Any]]:
        rows = self._tuples(
            "read the audit log", cq.AUDIT_ROWS_AFTER, {"after": after, "limit": limit}
        )
        return [dict(zip(AUDIT_COLUMNS, row, strict=True)) for row in rows]
