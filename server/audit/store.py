"""Where audit events are kept: a protocol and its SQLite implementation.

The audit database is its own file (e.g. `<data_dir>/audit.db`) so it can be shipped and retained
apart from the datastore. WAL with synchronous=FULL: a committed event survives power loss. The
`audit_head` row holds the last (seq, hash) and is written in the same transaction as the events,
so a truncated tail is visible as long as the head row is intact; only an anchor kept elsewhere
(a signed checkpoint, server/audit/checkpoint.py) also survives someone who rewrites the head.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from server.audit.errors import AuditError
from server.audit.event import CANONICAL_FIELDS


@dataclass(frozen=True)
class Head:
    """The newest event of a log: publish it elsewhere to anchor the chain against truncation."""

    seq: int
    hash: str


@dataclass(frozen=True)
class EventFilter:
    agent_id: str | None = None
    task_id: str | None = None
    since: float | None = None
    until: float | None = None
    decision: str | None = None
    kind: str | None = None


class AuditStore(Protocol):
    def head(self) -> Head | None:
        """The recorded head, or None for an empty log."""
        ...

    def append(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Store sealed rows (consecutive seqs; columns CANONICAL_FIELDS then hash, with
        policy_ids and extra as JSON text) and the new head in one durable transaction."""
        ...

    def rows(self, where: EventFilter | None = None) -> Iterator[dict[str, Any]]:
        """Raw rows in seq order, as stored (not validated); `where` narrows them."""
        ...

    def snapshot(self) -> AbstractContextManager[AuditSnapshot]:
        """The tables, the head and every row as of one instant, for a verify that must not
        mistake appends landing meanwhile for tampering."""
        ...

    def close(self) -> None: ...


AUDIT_TABLES = ("audit_events", "audit_head")


@dataclass(frozen=True)
class AuditSnapshot:
    """What one read transaction saw. `rows` streams inside that transaction: use it before
    the snapshot's context ends."""

    missing_tables: tuple[str, ...]
    head: Head | None
    rows: Callable[[], Iterator[dict[str, Any]]]


_PAGE = 1000
_COLUMNS = (*CANONICAL_FIELDS, "hash")
# SQLite's default parameter limit before 3.32: multi-row INSERTs stay under it everywhere.
_MAX_PARAMS = 999


def insert_many(db: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]]) -> None:
    """`db.executemany(head + " VALUES (?, ...)", rows)` as multi-row INSERTs of up to
    _MAX_PARAMS parameters each, in the caller's transaction.

    Why: the sqlite3 module releases the GIL around every statement step, so executemany
    released it once per row; with signing threads waiting for the GIL, each release handed it
    away and the writer queued to get it back, hundreds of times per flush. Here it is once per
    chunk. Rows go in the same order, with the same bindings; a row of the wrong width is an
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
        db.execute(_values_sql(head, width, len(chunk)), [v for row in chunk for v in row])


@functools.lru_cache(maxsize=256)
def _values_sql(head: str, width: int, count: int) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return f"{head} VALUES {', '.join([one] * count)}"


# No index on event_id (nothing looks events up by it, and it cannot repeat: it is the log's
# random prefix plus seq, the primary key) nor on ts (only `audit export --since/--until` reads
# it, and that walks the log in seq order anyway). Each index costs every append a B-tree insert;
# a database made before keeps its unique event_id index and loses the ts one (when opened to
# write: read-only tools leave the file as it is).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    seq INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL,
    ts REAL NOT NULL,
    kind TEXT NOT NULL,
    agent_id TEXT,
    node_id TEXT,
    on_behalf_of TEXT,
    resource TEXT,
    action TEXT,
    decision TEXT,
    reason TEXT,
    task_id TEXT,
    risk INTEGER,
    credential_id TEXT,
    policy_ids TEXT NOT NULL,
    policy_set_hash TEXT,
    ttl INTEGER,
    latency_us REAL,
    extra TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_agent ON audit_events (agent_id, seq);
CREATE INDEX IF NOT EXISTS audit_events_task ON audit_events (task_id, seq);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL
);
"""


class SqliteAuditStore:
    """AuditStore on one SQLite file, created 0600. Thread-safe."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        """Open (and with `create`, make) the database.

        Tools that only read pass create=False: the file is then opened read-only and nothing
        in it is created or changed, so a verify sees dropped tables as dropped.
        """
        self._path = path
        self._read_only = not create
        if not create and not path.is_file():
            raise AuditError(f"no audit database at {path}")
        try:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
                # Create the file ourselves so it is never world-readable, not even for an
                # instant; SQLite gives its -wal and -shm files the same mode.
                os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
                os.chmod(path, 0o600)
            self._db = self._connect()
            if create:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.executescript(_SCHEMA)
                self._db.execute("DROP INDEX IF EXISTS audit_events_ts")
        except (OSError, sqlite3.Error) as e:
            raise AuditError(f"cannot open audit database {path}: {e}") from e
        self._lock = threading.Lock()
        self._insert = f"INSERT INTO audit_events ({', '.join(_COLUMNS)})"

    def _connect(self) -> sqlite3.Connection:
        if self._read_only:
            uri = f"file:{urllib.parse.quote(str(self._path.absolute()))}?mode=ro"
            db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA busy_timeout=5000")
        return db

    @property
    def path(self) -> Path:
        return self._path

    def head(self) -> Head | None:
        with self._lock:
            try:
                row = self._db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            except sqlite3.Error as e:
                raise AuditError(f"cannot read audit database {self._path}: {e}") from e
        return None if row is None else Head(int(row[0]), str(row[1]))

    def append(self, rows: Sequence[tuple[Any, ...]]) -> None:
        if not rows:
            return
        last_seq, last_hash = rows[-1][0], rows[-1][-1]
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                insert_many(self._db, self._insert, rows)
                self._db.execute(
                    "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                    (last_seq, last_hash),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise AuditError(f"cannot append to audit database {self._path}: {e}") from e

    def rows(self, where: EventFilter | None = None) -> Iterator[dict[str, Any]]:
        w = where or EventFilter()
        clauses = ["seq > ?"]
        args: list[Any] = []
        for column, value in (
            ("agent_id", w.agent_id),
            ("task_id", w.task_id),
            ("decision", w.decision),
            ("kind", w.kind),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if w.since is not None:
            clauses.append("ts >= ?")
            args.append(w.since)
        if w.until is not None:
            clauses.append("ts < ?")
            args.append(w.until)
        sql = (
            f"SELECT {', '.join(_COLUMNS)} FROM audit_events "  # noqa: S608 - fixed names only
            f"WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT {_PAGE}"
        )
        # Page by seq so a large log streams, and the lock is not held while the caller works.
        after = -(2**63)
        while True:
            with self._lock:
                try:
                    page = self._db.execute(sql, [after, *args]).fetchall()
                except sqlite3.Error as e:
                    raise AuditError(f"cannot read audit database {self._path}: {e}") from e
            for row in page:
                yield dict(zip(_COLUMNS, row, strict=True))
            if len(page) < _PAGE:
                return
            after = page[-1][0]

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[AuditSnapshot]:
        """One read transaction on a read-only connection of its own: in WAL mode it sees one
        committed state from its first read to its end, and writers go on meanwhile. Creates
        nothing, so dropped tables are reported as missing."""
        try:
            uri = f"file:{urllib.parse.quote(str(self._path.absolute()))}?mode=ro"
            db = sqlite3.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as e:
            raise AuditError(f"cannot open audit database {self._path}: {e}") from e
        try:
            db.execute("PRAGMA busy_timeout=5000")
            # BEGIN is deferred: the snapshot is taken by the first SELECT, and every later one
            # in this transaction reads the same state.
            db.execute("BEGIN")
            names = {
                r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            missing = tuple(t for t in AUDIT_TABLES if t not in names)
            head = None
            if "audit_head" in names:
                row = db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
                head = None if row is None else Head(int(row[0]), str(row[1]))

            def rows() -> Iterator[dict[str, Any]]:
                if "audit_events" not in names:
                    return
                cursor = db.execute(
                    f"SELECT {', '.join(_COLUMNS)} FROM audit_events ORDER BY seq"  # noqa: S608
                )
                while page := cursor.fetchmany(_PAGE):
                    for r in page:
                        yield dict(zip(_COLUMNS, r, strict=True))

            yield AuditSnapshot(missing, head, rows)
        except (sqlite3.Error, ValueError) as e:
            raise AuditError(f"cannot read audit database {self._path}: {e}") from e
        finally:
            db.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()
