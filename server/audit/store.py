"""Where audit events are kept: the datastore's audit role, and a read-only opener for tools.

The events live in the server's one datastore (`AuditStore`, server/datastore/base.py), where
each commits in the same transaction as the credentials it records. The `audit_head` row holds
the last (seq, hash) and is written with the events, so a truncated tail is visible as long as
the head row is intact; only an anchor kept elsewhere (a signed checkpoint,
server/audit/checkpoint.py) also survives someone who rewrites the head.

`SqliteAuditStore` opens a SQLite file read-only for `audit verify` and `audit export`: the
datastore, or an audit.db of an older version not imported yet. It changes nothing in it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from server.audit.errors import AuditError
from server.datastore import sqlite_audit
from server.datastore.base import AuditStore, JtiClaim, RemovalClaim
from server.datastore.chain import Resealer
from server.datastore.errors import StorageError
from server.datastore.records import (
    AUDIT_TABLES,
    AuditRow,
    AuditSnapshot,
    BundleWrite,
    Credential,
    EventFilter,
    Head,
    TaskRecord,
)
from server.datastore.sqlite_audit import insert_many

__all__ = [
    "AUDIT_TABLES",
    "AuditSnapshot",
    "AuditStore",
    "EventFilter",
    "Head",
    "SqliteAuditStore",
    "insert_many",
]


class SqliteAuditStore:
    """A read-only `AuditStore` on a SQLite file holding the audit tables. Thread-safe."""

    def __init__(self, path: Path) -> None:
        self._path = path
        if not path.is_file():
            raise AuditError(f"no audit database at {path}")
        try:
            self._db = sqlite_audit.connect_read_only(path)
        except sqlite3.Error as e:
            raise AuditError(f"cannot open audit database {path}: {e}") from e
        try:
            # The server's own check at start: a newer server's schema is not read on.
            sqlite_audit.refuse_newer_schema(self._db)
        except StorageError as e:
            self._db.close()
            raise AuditError(f"audit database {path}: {e}") from None
        except sqlite3.Error as e:
            self._db.close()
            raise AuditError(f"cannot read audit database {path}: {e}") from e
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path

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
        del jtis, now, reseal, bundles, tasks, claims
        raise AuditError(f"audit database {self._path} is open read-only")

    def audit_head(self) -> Head | None:
        with self._lock:
            try:
                return sqlite_audit.read_head(self._db)
            except sqlite3.Error as e:
                raise AuditError(f"cannot read audit database {self._path}: {e}") from e

    def audit_rows(self, where: EventFilter | None = None) -> Iterator[dict[str, Any]]:
        def fetch(sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
            with self._lock:
                try:
                    try:
                        return self._db.execute(sql, params).fetchall()
                    except sqlite3.OperationalError:
                        if self._db.text_factory is sqlite_audit.LENIENT_TEXT:
                            raise
                        # Text that is not UTF-8 in a row: read it again, such text kept, so
                        # the reader names that row (sqlite_audit.LENIENT_TEXT).
                        self._db.text_factory = sqlite_audit.LENIENT_TEXT
                        return self._db.execute(sql, params).fetchall()
                except sqlite3.Error as e:
                    raise AuditError(f"cannot read audit database {self._path}: {e}") from e

        return sqlite_audit.page_rows(fetch, where)

    @contextlib.contextmanager
    def audit_snapshot(self) -> Iterator[AuditSnapshot]:
        try:
            with sqlite_audit.snapshot(self._path) as snap:
                yield snap
        except StorageError as e:
            raise AuditError(f"{e} ({self._path})") from e

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _conforms(store: SqliteAuditStore) -> AuditStore:
    return store  # mypy checks the reader still implements the audit role
