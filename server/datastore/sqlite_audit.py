"""Reading the audit chain out of a SQLite file: one consistent snapshot, or pages of rows.

Shared by the datastore (server/datastore/sqlite.py) and the read-only tools' opener
(server/audit/store.py): both read the same tables, the tools without changing the file.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

from server.datastore import ledger_queries as lq
from server.datastore import queries as q
from server.datastore.errors import StorageError
from server.datastore.migrations import refuse_newer
from server.datastore.records import (
    AUDIT_COLUMNS,
    AUDIT_TABLES,
    AuditSnapshot,
    EventFilter,
    Head,
)

PAGE = 1000
BUSY_TIMEOUT_MS = 5000
# The sqlite3 module's decoding of a text value, but bytes that are not UTF-8 (written behind
# the log: SQLite stores whatever it is given) kept as lone surrogates instead of failing the
# whole read with no row named. No event holds one (its hash is over UTF-8), so verify then
# finds that row UNREADABLE, and export names it. Only once a read failed: honest logs are
# read at the module's own speed (this costs a third more per row).
LENIENT_TEXT = functools.partial(str, encoding="utf-8", errors="surrogateescape")
# SQLite's default parameter limit before 3.32: multi-row INSERTs stay under it everywhere.
_MAX_PARAMS = 999


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that can change nothing in the file (nor create it)."""
    uri = f"file:{urllib.parse.quote(str(path.absolute()))}?mode=ro"
    db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return db


def schema_versions(db: sqlite3.Connection) -> list[int]:
    """The migrations the file records, in order; none for a file no server started on (or an
    audit.db of an older version, which has no schema table)."""
    found = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    return sorted(int(r[0]) for r in db.execute(q.MIGRATION_VERSIONS)) if found else []


def refuse_newer_schema(db: sqlite3.Connection) -> None:
    """StorageError when a newer server migrated the file (migrations.refuse_newer): a reader
    of this release would take its rows in their old meaning."""
    refuse_newer(schema_versions(db))


def insert_many(db: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]]) -> None:
    """`db.executemany(head + " VALUES (?, ...)", rows)` as multi-row INSERTs of up to
    _MAX_PARAMS parameters each, in the caller's transaction.

    Why: the sqlite3 module releases the GIL around every statement step, so executemany
    released it once per row; with signing threads waiting for the GIL, each release handed it
    away and the writer queued to get it back, hundreds of times per flush. Here it is once per
    chunk. And a column that is None in every row of a chunk is written as a NULL literal, not
    bound: the sqlite3 module binds None through its adapter lookup, five times the cost of
    binding an int (an issuance event has seven such columns; binding was most of a row's
    insert). Rows go in the same order, with the same values; a row of the wrong width is an
    error, as it is for executemany.
    """
    if not rows:
        return
    width = len(rows[0])
    per = max(1, _MAX_PARAMS // width)
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        if any(len(row) != width for row in chunk):
            raise sqlite3.ProgrammingError(
                f"every row needs {width} values; one has a different number"
            )
        nulls = _null_columns(chunk)
        bound = _bound_values(width, nulls)
        db.execute(
            _values_sql(head, width, nulls, len(chunk)),
            list(chain.from_iterable(map(bound, chunk))) if bound else [],
        )


def _null_columns(chunk: Sequence[Sequence[Any]]) -> tuple[int, ...]:
    """The columns that are None in every row of `chunk` (by identity: None, nothing equal)."""
    candidates = [i for i, value in enumerate(chunk[0]) if value is None]
    return tuple(i for i in candidates if all(row[i] is None for row in chunk))


@functools.lru_cache(maxsize=256)
def _bound_values(width: int, nulls: tuple[int, ...]) -> Callable[[Sequence[Any]], Any] | None:
    """What a row binds: its values but those of `nulls`, as a sequence (None: nothing)."""
    kept = [i for i in range(width) if i not in nulls]
    if not kept:
        return None
    if len(kept) == width:
        return tuple
    get = operator.itemgetter(*kept)
    return get if len(kept) > 1 else lambda row: (get(row),)


@functools.lru_cache(maxsize=256)
def _values_sql(head: str, width: int, nulls: tuple[int, ...], count: int) -> str:
    one = "(" + ", ".join("NULL" if i in nulls else "?" for i in range(width)) + ")"
    return f"{head} VALUES {', '.join([one] * count)}"


def read_head(db: sqlite3.Connection) -> Head | None:
    row = db.execute(lq.SELECT_AUDIT_HEAD).fetchone()
    return None if row is None else Head(int(row[0]), str(row[1]))


def read_base(db: sqlite3.Connection) -> Head | None:
    row = db.execute(lq.SELECT_AUDIT_BASE).fetchone()
    return None if row is None else Head(int(row[0]), str(row[1]))


def page_rows(
    fetch: Callable[[str, dict[str, Any]], list[tuple[Any, ...]]],
    where: EventFilter | None,
) -> Iterator[dict[str, Any]]:
    """Rows matching `where` in seq order, a page per `fetch` call: a large log streams, and no
    lock is held while the caller works on a page."""
    sql, params = lq.audit_page(where or EventFilter())
    after = -(2**63)
    while True:
        page = fetch(sql, {**params, "after": after, "limit": PAGE})
        for row in page:
            yield dict(zip(AUDIT_COLUMNS, row, strict=True))
        if len(page) < PAGE:
            return
        after = page[-1][0]


def _paged(cursor: sqlite3.Cursor) -> Iterator[tuple[Any, ...]]:
    """`cursor`'s rows, fetched PAGE at a time."""
    while page := cursor.fetchmany(PAGE):
        yield from page


@contextlib.contextmanager
def snapshot(path: Path) -> Iterator[AuditSnapshot]:
    """One read transaction on a read-only connection of its own: in WAL mode it sees one
    committed state from its first read to its end, and writers go on meanwhile. Creates
    nothing, so dropped tables are reported as missing."""
    try:
        db = connect_read_only(path)
    except sqlite3.Error as e:
        raise StorageError(f"cannot open the audit log for reading: {e}") from e
    try:
        # BEGIN is deferred: the snapshot is taken by the first SELECT, and every later one
        # in this transaction reads the same state.
        db.execute("BEGIN")
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = tuple(t for t in AUDIT_TABLES if t not in names)
        head = read_head(db) if "audit_head" in names else None
        # A log of a version before retention has no base table: it was never pruned.
        base = read_base(db) if "audit_base" in names else None

        def rows() -> Iterator[dict[str, Any]]:
            if "audit_events" not in names:
                return
            after: int | None = None
            cursor = db.execute(lq.ALL_AUDIT_ROWS)
            try:
                for r in _paged(cursor):
                    yield dict(zip(AUDIT_COLUMNS, r, strict=True))
                    after = r[0]
            except sqlite3.OperationalError:
                if db.text_factory is LENIENT_TEXT:
                    raise
                # A value that is not UTF-8 failed its page: read on from the last row given,
                # in the same transaction (the same snapshot), such text kept (LENIENT_TEXT).
                db.text_factory = LENIENT_TEXT
                start = -(2**63) if after is None else after
                for r in _paged(db.execute(lq.AUDIT_ROWS_AFTER, {"after": start})):
                    yield dict(zip(AUDIT_COLUMNS, r, strict=True))

        yield AuditSnapshot(missing, head, rows, base)
    except (sqlite3.Error, ValueError) as e:
        raise StorageError(f"cannot read the audit log: {e}") from e
    finally:
        db.close()
