"""The PostgreSQL datastore: several servers on one database (SPIRE's HA model).

Registration state lives here; tasks, credentials and the audit chain in the PostgresLedger
mixin (server/datastore/postgres_ledger.py), on the same pool and database. The statements are
the SQLite backend's (queries.py, ledger_queries.py) and so is the schema (migrations.py, run
through `postgres_migrations`); only what PostgreSQL must do differently to stay correct across
processes is here.

Concurrency: READ COMMITTED, and every decision a race could falsify is one conditional
statement or a lock. A join token is spent by one DELETE that repeats every condition (exactly
one of several servers sees rowcount 1). Entry writes take turns under an advisory lock, so
each one's checks hold until it commits, and the identity_hash UNIQUE key backs them. The
revision is one counter row bumped last in each write's transaction: revisions commit in
order, and no write waits for a lock while holding it. Should PostgreSQL still break a
deadlock or a serialization failure, the whole transaction runs again, a bounded number of
times.

Adding a method (as the SQLite backend gains one): its SQL goes once into queries.py or
ledger_queries.py with `:name` parameters (both backends run it; `pg` converts), a write here
is a `work(cur)` function handed to `_write` (one transaction, bumping its counters last), a
read is `_rows` or `_tuples`. Every driver error comes out as StorageError.

The change feed: a write appends its rows and bumps the `feed` counter last (after
`revision`), so feed revisions are consecutive and commit in order across servers, and sends a
NOTIFY that COMMIT delivers; `wait_feed` listens on one more connection of its own.

Connections: a small pool (the server's datastore calls are short; a few connections serve a
2-core machine). autocommit, so a read is one round trip and a write is an explicit transaction.
The change feed's follower has connections of its own (`feed_reading`): a burst of writes
holding the whole pool must not hold up its reads, or the server's view turns stale.
A call whose connection died raises StorageError; the pool then checks its idle connections and
replaces the dead ones, so the next call gets a fresh one and the server keeps serving; while
the database is away it retries each for RECONNECT_TIMEOUT only, so that once it is back the
next call connects at once. A write
whose connection died with its COMMIT sent raises CommitUnknownError instead: PostgreSQL may
have committed it, so its caller is told the outcome is unknown, and the server's view follows
what was committed through the change feed as for any other write (no fail-stop: PostgreSQL's
own server handles its fsync failures).

Leases and removal claims expire by the database's clock (postgres_time.py), not by each
server's: servers whose clocks disagree never hold one at once.

A database that goes silent without closing its connections (its host frozen, packets dropped,
a proxy in front of it that still acknowledges) fails calls within seconds rather than holding
them for TCP's retransmissions (a quarter of an hour) or for ever: PostgreSQL cancels a
statement running past STATEMENT_TIMEOUT, every request on a connection is given up (and the
connection closed) when no answer came within ANSWER_TIMEOUT, connecting gives up after
CONNECT_TIMEOUT, and TCP keepalives and a user timeout find a dead peer under an idle LISTEN.
A thread of this process stalled inside a transaction would hold its locks for ever: PostgreSQL
ends a session left idle in a transaction past IDLE_IN_TRANSACTION_TIMEOUT.
Bulk work that may rightly run long on a big database (listing everything, prunes,
migrations, an audit snapshot) asks for BULK_TIMEOUT instead (`bulk=True`); only a
transaction its caller keeps open between statements (`held_open=True`) may sit idle that long.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Generic, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq
from psycopg.abc import PQGen
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from server.datastore import postgres_sql as ps
from server.datastore import queries as q
from server.datastore.base import JtiClaim, LeaseFence
from server.datastore.entry_writes import REVISION as _REVISION
from server.datastore.entry_writes import EntryWrites
from server.datastore.errors import (
    AgentReplacedError,
    AlreadyExistsError,
    CommitUnknownError,
    ConflictError,
    LeaseLostError,
    NotFoundError,
    RemovalUnderWayError,
    StorageError,
    UnreachableError,
)
from server.datastore.migrations import (
    CREATE_MIGRATIONS_TABLE,
    MIGRATIONS,
    postgres_migrations,
    refuse_newer,
    refuse_other,
)
from server.datastore.postgres_checkpoints import PostgresCheckpoints
from server.datastore.postgres_dsn import redact_dsn, scrub
from server.datastore.postgres_federation import PostgresFederation
from server.datastore.postgres_ledger import PostgresLedger
from server.datastore.postgres_sql import pg
from server.datastore.postgres_time import DatabaseTime
from server.datastore.records import (
    AGENT_PRUNE_BATCH,
    FEED_AGENT,
    FEED_BUNDLE_SEQUENCE,
    FEED_KEY_SLOT,
    FEED_POLICY,
    FEED_REVOCATION,
    REVOCATION_KINDS,
    AttestedAgent,
    Entry,
    FeedItem,
    JoinToken,
    KeySlot,
    PolicyAnnouncement,
    Removal,
    Revocation,
    TokenUse,
    key_slot_params,
    prune_in_batches,
)
from server.datastore.sqlite import (
    _adopt_params,
    _agent_from,
    _agent_params,
    _claim_params,
    _entry_from,
    _entry_params,
    _read_params,
    _removal_from,
    _removal_of,
    _revocation_from,
    _slot_from,
)
from server.datastore.sqlite_ledger import _removal_params
from svid._clock import Clock

T = TypeVar("T")
Cursor = psycopg.Cursor[Any]

MIN_CONNECTIONS = 1
MAX_CONNECTIONS = 4
# The follower's: one reading the feed and the rows it names, one for wait_feed's look at the head.
FEED_CONNECTIONS = 2
# How long a call waits for a free (or a new) connection before it fails, and how long opening
# one may take (seconds): an issuing call must fail, UNAVAILABLE, while its client still waits.
CONNECT_TIMEOUT = 5.0
# How long the pool retries, with backoff, to replace a connection it lost before it gives
# that one up (the next call asks for a fresh one). psycopg_pool's default, 5 minutes, let the
# backoff grow to a minute and more: a database back after a failover of a minute or two
# found every slot of the pool waiting out its delay, and each call failed UNAVAILABLE, for
# as long again. Its retries stay a second or two apart this way.
RECONNECT_TIMEOUT = CONNECT_TIMEOUT
# A statement of the server's own takes milliseconds: PostgreSQL cancels one past this (a lock
# held by a server that went silent mid-transaction, say), and the connection stays usable.
STATEMENT_TIMEOUT = 5.0
# A transaction of the server's own sits idle between its statements for milliseconds (Python
# work, a reseal of audit rows). One idle this long belongs to a stalled thread or a paused
# process, and holds its locks until it goes on, if ever: PostgreSQL ends its session (the
# call fails when it goes on; the pool replaces the connection). Well past any pause of a live
# process on a loaded host, and short enough that the rows it holds come back while the
# servers waiting on them retry.
IDLE_IN_TRANSACTION_TIMEOUT = 30.0
# A request (a statement, a commit, a page of rows) with no answer this long: the database is
# silent, the connection is closed and the call fails. Past STATEMENT_TIMEOUT, so a slow
# statement is PostgreSQL's to cancel first.
ANSWER_TIMEOUT = STATEMENT_TIMEOUT + 1.0
# The statement and answer timeouts for work that may rightly run long on a big database
# (`bulk=True`); the idle-in-transaction one too for a transaction kept open while its caller
# works through the rows (an audit snapshot, a migration: `held_open=True`).
BULK_TIMEOUT = 600.0
# TCP: a peer that vanished under an idle connection (a LISTEN) is found within about
# idle + interval x count seconds; data unacknowledged for the user timeout (ms) ends it.
_TCP: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": int(ANSWER_TIMEOUT * 1000),
}
# Runs of one transaction that PostgreSQL failed for a deadlock or a serialization failure.
ATTEMPTS = 3
_BUNDLE_SEQUENCE = "bundle_sequence"
_FEED = "feed"
# Ids bound in one `get_entries` read.
_IDS_PER_READ = 500
# wait_feed sleeps on NOTIFY in slices of this: how late it sees close(), and how often, at
# most, it reads the feed's head while notifications of other schemas wake it.
FEED_WAIT_SLICE = 0.25
_RETRY = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)


class NoAnswerError(psycopg.OperationalError):
    """The database did not answer a request in time; its connection is closed."""


def _answered_by(gen: PQGen[T], deadline: float, timeout: float) -> PQGen[T]:
    """`gen` (one request on a connection), failing once `deadline` has passed with nothing
    to read or write: psycopg's wait resumes it every interval (0.1 s) with nothing ready."""
    try:
        waiting = next(gen)
        while True:
            ready = yield waiting
            if not ready and time.monotonic() >= deadline:
                gen.close()
                raise NoAnswerError(f"no answer from the database within {timeout:g} s")
            waiting = gen.send(ready)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


class AnsweredConnection(psycopg.Connection[Any]):
    """A connection whose every request is answered within `answer_timeout` seconds, or which
    is closed (NoAnswerError): unusable midway through a request, the pool replaces it."""

    answer_timeout: float = ANSWER_TIMEOUT

    def wait(self, gen: PQGen[T], *args: Any, **kwargs: Any) -> T:
        timeout = self.answer_timeout
        bounded = _answered_by(gen, time.monotonic() + timeout, timeout)
        try:
            return super().wait(bounded, *args, **kwargs)
        except NoAnswerError:
            self.pgconn.finish()
            raise


class _Commit(Generic[T]):
    """One transaction of `_write` on a connection, and how far it got: `done` once COMMIT
    was answered; `lost` when the connection was lost with the COMMIT sent (the database may
    have committed it, or not: no answer came back). An error PostgreSQL answered the COMMIT
    with (a deadlock, a serialization failure, a deferred constraint) is neither: the
    transaction was rolled back, and the connection is still good. Nor is the FATAL of a
    session ended idle in its transaction, which the COMMIT read: it never ran."""

    def __init__(self) -> None:
        self.done = False
        self.lost = False
        self.result: T

    def of(self, conn: psycopg.Connection[Any], work: Callable[[Cursor], T]) -> T:
        committing = False
        try:
            with conn.transaction(), conn.cursor() as cur:
                result = work(cur)
                committing = True  # the block's end sends the COMMIT
        except psycopg.Error as e:
            # Read now: the pool closes a broken connection as it takes it back. A session
            # PostgreSQL ended for sitting idle in the transaction (its writer paused past the
            # bound) ended before the COMMIT was read: rolled back, a write not made.
            self.lost = (
                committing
                and conn.pgconn.status != pq.ConnStatus.OK
                and not isinstance(e, pg_errors.IdleInTransactionSessionTimeout)
            )
            raise
        self.done, self.result = True, result
        return result


def connection_options(dsn: str, *, read_only: bool = False) -> dict[str, Any]:
    """libpq parameters bounding how long a silent database holds a call (the module's
    docstring), each unless the DSN sets its own; the statement and idle-in-transaction
    timeouts join the DSN's (or PGOPTIONS') own `options`. `read_only`: every transaction is
    READ ONLY, whatever the DSN says (the last -c wins)."""
    given = conninfo_to_dict(dsn)
    found: dict[str, Any] = {k: v for k, v in _TCP.items() if k not in given}
    if "connect_timeout" not in given:
        found["connect_timeout"] = max(2, int(CONNECT_TIMEOUT))
    options = str(given.get("options") or os.environ.get("PGOPTIONS", ""))
    timeouts = {
        "statement_timeout": STATEMENT_TIMEOUT,
        "idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION_TIMEOUT,
    }
    added = [
        f"-c {name}={int(seconds * 1000)}"
        for name, seconds in timeouts.items()
        if name not in options
    ]
    if read_only:
        added.append("-c default_transaction_read_only=on")
    if added:
        found["options"] = " ".join([options, *added]).strip()
    return found


class PostgresDataStore(
    EntryWrites[Cursor], PostgresLedger, PostgresFederation, PostgresCheckpoints
):
    """`DataStore` on one PostgreSQL database (the DSN's search_path picks the schema). Build
    once per process; `close()` at shutdown.

    `migrate=False` applies no migration and makes every transaction READ ONLY: StorageError
    unless the schema is this release's, or at least `oldest_schema` when the caller reads
    older ones (migrations.refuse_other). For commands that only read."""

    def __init__(
        self,
        dsn: str,
        clock: Clock,
        *,
        min_connections: int = MIN_CONNECTIONS,
        max_connections: int = MAX_CONNECTIONS,
        timeout: float = CONNECT_TIMEOUT,
        migrate: bool = True,
        oldest_schema: int | None = None,
        on_new_schema: Callable[[], None] | None = None,
    ) -> None:
        """`on_new_schema`: called before a migration creates anything in a schema that
        records none (new, dropped or emptied); what it raises refuses the open, nothing made
        (the server's guard of a datastore lost beside its files: server/datastore/lost.py)."""
        self._dsn = dsn
        self._clock = clock
        # Lease and claim expiries on the database's clock: servers' clocks disagree.
        self._lease_time = DatabaseTime(clock, self._database_now)
        self._id_lock = threading.Lock()
        self._last_id_millis = self._last_created = 0
        self._closed = False
        self._closing = threading.Event()
        self._listen_lock = threading.Lock()
        # wait_feed's LISTEN connection, and the schema whose notifications are this store's.
        self._listener: tuple[psycopg.Connection[Any], str] | None = None
        try:
            self._options = connection_options(dsn, read_only=not migrate)
        except psycopg.Error:
            # libpq's complaint quotes the URL as spelled, password and all: not passed on.
            raise StorageError(
                f"cannot open the PostgreSQL datastore at {redact_dsn(dsn)}: "
                "not a valid PostgreSQL URL"
            ) from None
        # A pool check runs at most once at a time, off the failing call's thread.
        self._checking = threading.Lock()
        # This process's entry writes take their turn here first (_entry_transaction).
        self._entry_turn = threading.Lock()
        # One connection first: if the database cannot be reached, this is the error that
        # says why (the pool would only time out), and it migrates before the pool serves.
        # A plain connection: a migration may rightly run long.
        tcp = {k: v for k, v in self._options.items() if k != "options"}
        try:
            if migrate:
                with psycopg.connect(dsn, autocommit=True, **tcp) as conn:
                    self._migrate(conn, on_new_schema)
                    self._lease_time.measure(lambda: _database_clock(conn))
            else:
                with psycopg.connect(dsn, autocommit=True, **self._options) as conn:
                    oldest = MIGRATIONS[-1].version if oldest_schema is None else oldest_schema
                    refuse_other(self._versions(conn), oldest)
                    self._lease_time.measure(lambda: _database_clock(conn))
        except psycopg.Error as e:
            raise StorageError(
                f"cannot open the PostgreSQL datastore at {redact_dsn(dsn)}: {scrub(str(e), dsn)}"
            ) from None
        self._pool = self._open_pool("svidd-datastore", min_connections, max_connections, timeout)
        # Opened on the follower's first read: a store no follower reads holds none.
        self._feed_pool = self._open_pool("svidd-feed", 0, FEED_CONNECTIONS, timeout)
        # Whether this thread is inside feed_reading (then it takes _feed_pool).
        self._feeding = threading.local()

    def _open_pool(
        self, name: str, min_size: int, max_size: int, timeout: float
    ) -> ConnectionPool[AnsweredConnection]:
        return ConnectionPool(
            self._dsn,
            connection_class=AnsweredConnection,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            reconnect_timeout=RECONNECT_TIMEOUT,
            kwargs={"autocommit": True, **self._options},
            name=name,
            open=True,
        )

    # -- plumbing -------------------------------------------------------------------------------

    def _failed(
        self, what: str, error: psycopg.Error, pool: ConnectionPool[AnsweredConnection]
    ) -> StorageError:
        lost = isinstance(error, psycopg.OperationalError) and not isinstance(error, _RETRY)
        if lost and not self._closed:
            # The connection (or the server) may be gone: drop the dead idle connections now,
            # so the next call gets a fresh one instead of failing on the next dead one. Not
            # on this thread when the database is silent: each check would wait as long.
            if isinstance(error, NoAnswerError):
                self._check_pool_aside(pool)
            else:
                pool.check()
        failed = UnreachableError if lost else StorageError
        return failed(f"cannot {what}: {scrub(str(error).strip(), self._dsn)}")

    def _check_pool_aside(self, pool: ConnectionPool[AnsweredConnection]) -> None:
        """Check the idle connections in a thread of its own (one at a time): with a silent
        database each check waits out ANSWER_TIMEOUT, which the failing call must not add to
        its own."""
        if not self._checking.acquire(blocking=False):
            return  # one is under way

        def check() -> None:
            try:
                if not self._closed:
                    pool.check()
            except psycopg.Error:
                pass  # the pool logs what it discards; the next failure checks again
            finally:
                self._checking.release()

        threading.Thread(target=check, name="svidd-datastore-check", daemon=True).start()

    @contextmanager
    def feed_reading(self, on_connected: Callable[[], None] | None = None) -> Iterator[None]:
        self._feeding.on = True
        self._feeding.on_connected = on_connected
        try:
            yield
        finally:
            self._feeding.on = False
            self._feeding.on_connected = None

    def _feed_connected(self) -> None:
        """The first connection of this thread's feed_reading is had: say so, once."""
        on_connected = getattr(self._feeding, "on_connected", None)
        if on_connected is not None:
            self._feeding.on_connected = None
            on_connected()

    @contextmanager
    def _connection(
        self, what: str, *, bulk: bool = False, held_open: bool = False
    ) -> Iterator[AnsweredConnection]:
        """A pooled connection; `bulk`: under the bulk limits (_patient), `held_open` too for
        a transaction left idle while the caller works."""
        if self._closed:
            raise StorageError(f"cannot {what}: the datastore is closed")
        feeding = getattr(self._feeding, "on", False)
        pool = self._feed_pool if feeding else self._pool
        try:
            with pool.connection() as conn:
                if feeding:
                    self._feed_connected()
                if not (bulk or held_open):
                    yield conn
                    return
                with _patient(conn, held_open=held_open):
                    yield conn
        except psycopg.Error as e:
            raise self._failed(what, e, pool) from e

    def _write(self, what: str, work: Callable[[Cursor], T], *, bulk: bool = False) -> T:
        """`work` in one transaction, committed when it returns; run again (up to ATTEMPTS)
        when PostgreSQL failed it for a deadlock or a serialization failure. A DataStoreError
        of `work` rolls back and goes to the caller as it is. The connection lost with the
        COMMIT sent is CommitUnknownError: PostgreSQL may have committed it (_Commit)."""
        for attempt in range(1, ATTEMPTS + 1):
            commit: _Commit[T] = _Commit()
            try:
                with self._connection(what, bulk=bulk) as conn:
                    return commit.of(conn, work)
            except StorageError as e:
                if commit.done:
                    # Committed: what failed after it (a bulk write's reset of its timeouts)
                    # is the connection's, and the pool replaces it.
                    return commit.result
                if commit.lost:
                    raise CommitUnknownError(
                        redact_dsn(self._dsn), str(e), server_stops=False
                    ) from e.__cause__
                if attempt == ATTEMPTS or not isinstance(e.__cause__, _RETRY):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _entry_transaction(self, what: str, work: Callable[[Cursor], T]) -> T:
        """`_write` taking its turn among entry writes (ps.LOCK_ENTRIES). Under the bulk
        limits: its turn may rightly come after seconds of other servers' batches, which is
        no silent database.

        This process's entry writes take their turn among themselves first, before a
        connection: one of them at a time waits for the lock in PostgreSQL, holding one pooled
        connection. The lock lets one write through at a time anyway; a burst of writes each
        waiting there would hold every connection, and the pool's next takers (the burst's
        later writes, the server's issuing calls) would give up after CONNECT_TIMEOUT and be
        refused UNAVAILABLE on a healthy database."""

        def locked(cur: Cursor) -> T:
            cur.execute(ps.LOCK_ENTRIES)
            return work(cur)

        if not self._entry_turn.acquire(timeout=BULK_TIMEOUT):
            raise StorageError(
                f"cannot {what}: this server's other entry writes held their turn for "
                f"{BULK_TIMEOUT:g} s"
            )
        try:
            return self._write(what, locked, bulk=True)
        finally:
            self._entry_turn.release()

    def _rows(
        self, what: str, sql: str, params: Mapping[str, Any], *, bulk: bool = False
    ) -> list[dict[str, Any]]:
        with (
            self._connection(what, bulk=bulk) as conn,
            conn.cursor(row_factory=dict_row) as cur,
        ):
            return cur.execute(pg(sql), dict(params)).fetchall()

    def _tuples(
        self, what: str, sql: str, params: Mapping[str, Any], *, bulk: bool = False
    ) -> list[tuple[Any, ...]]:
        with self._connection(what, bulk=bulk) as conn:
            return conn.execute(pg(sql), dict(params)).fetchall()

    def _now(self) -> int:
        return int(self._clock.now())

    def _database_now(self) -> float:
        with self._connection("read the database's clock") as conn:
            return _database_clock(conn)

    @staticmethod
    def _execute_in(cur: Cursor, sql: str, params: dict[str, object]) -> list[tuple[Any, ...]]:
        cur.execute(pg(sql), params)
        return list(cur.fetchall()) if cur.description is not None else []

    @staticmethod
    def _bump(cur: Cursor, counter: str) -> int:
        row = cur.execute(pg(ps.BUMP_COUNTER), {"name": counter}).fetchone()
        assert row is not None, f"counter {counter} is missing"
        return int(row[0])

    def _append_feed(self, cur: Cursor, kind: str, keys: Iterable[str]) -> None:
        """Name the rows this transaction touched in the change feed: one counter bump for
        all of them (the last lock the transaction takes), the rows by COPY, and a NOTIFY."""
        keys = list(keys)
        if not keys:
            return
        row = cur.execute(pg(ps.BUMP_COUNTER_BY), {"name": _FEED, "n": len(keys)}).fetchone()
        assert row is not None, "the feed counter is missing"
        first, at = int(row[0]) - len(keys) + 1, self._now()
        with cur.copy(ps.COPY_FEED) as copy:
            for n, key in enumerate(keys):
                copy.write_row((first + n, at, kind, key))
        cur.execute(ps.NOTIFY_FEED)

    def _migrate(
        self, conn: psycopg.Connection[Any], on_new_schema: Callable[[], None] | None = None
    ) -> list[int]:
        """Apply pending migrations, each in its own transaction with the row recording it,
        under an advisory lock: servers starting together migrate one after the other. On a
        schema recording no migration yet, `on_new_schema` first, before anything is made
        (servers starting together on a new schema may each be asked, of their own files)."""
        with conn.transaction():
            conn.execute(ps.LOCK_MIGRATIONS)
            if on_new_schema is not None and not self._versions(conn):
                on_new_schema()  # raising rolls this transaction back: nothing is made
            conn.execute(CREATE_MIGRATIONS_TABLE)
            refuse_newer(int(r[0]) for r in conn.execute(q.MIGRATION_VERSIONS).fetchall())
        applied: list[int] = []
        for migration in postgres_migrations(MIGRATIONS):
            with conn.transaction():
                conn.execute(ps.LOCK_MIGRATIONS)
                done = {row[0] for row in conn.execute(q.MIGRATION_VERSIONS).fetchall()}
                if migration.version in done:
                    continue
                migration.apply(conn.execute)
                conn.execute(
                    pg(q.RECORD_MIGRATION),
                    {"version": migration.version, "name": migration.name, "now": self._now()},
                )
                applied.append(migration.version)
        return applied

    @staticmethod
    def _versions(conn: psycopg.Connection[Any]) -> list[int]:
        """The migrations the schema records, none when it has no table of them (creating
        nothing: a store that does not migrate may not)."""
        if conn.execute(ps.MIGRATIONS_TABLE).fetchone() is None:
            return []
        return sorted(int(r[0]) for r in conn.execute(q.MIGRATION_VERSIONS).fetchall())

    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied now (empty when up to date)."""
        # Held open: a migration's own work between its statements may take a while.
        with self._connection("migrate the datastore", held_open=True) as conn:
            return self._migrate(conn)

    def schema_versions(self) -> list[int]:
        rows = self._tuples("read the schema version", q.MIGRATION_VERSIONS, {})
        return sorted(int(r[0]) for r in rows)

    def close(self) -> None:
        self._closing.set()
        with self._listen_lock:  # a wait_feed sees the flag within one slice
            if self._listener is not None:
                self._listener[0].close()
                self._listener = None
        if not self._closed:
            self._closed = True
            self._pool.close()
            self._feed_pool.close()

    # -- entries --------------------------------------------------------------------------------

    @staticmethod
    def _insert_in(cur: Cursor, stored: Entry) -> None:
        params = _entry_params(stored)
        if cur.execute(pg(q.INSERT_ENTRY_UNLESS_EXISTS), params).rowcount == 1:
            return
        if cur.execute(pg(q.SELECT_ENTRY), {"id": stored.id}).fetchone() is not None:
            raise AlreadyExistsError(f"entry id {stored.id} already exists")
        clash = cur.execute(pg(q.ENTRY_BY_IDENTITY), params).fetchone()
        raise AlreadyExistsError(
            f"an entry for {stored.spiffe_id} under {stored.parent_id} with the same "
            f"selectors already exists (id {clash[0] if clash else '?'})"
        )

    @staticmethod
    def _update_in(cur: Cursor, entry: Entry) -> Entry:
        row = cur.execute(pg(q.SELECT_ENTRY), {"id": entry.id}).fetchone()
        if row is None:
            raise NotFoundError(f"entry {entry.id} not found")
        assert cur.description is not None
        current = _entry_from(dict(zip([c.name for c in cur.description], row, strict=True)))
        if entry.revision and entry.revision != current.revision:
            raise ConflictError(
                f"entry {entry.id} changed meanwhile: revision {current.revision}, "
                f"update was based on {entry.revision}"
            )
        stored = replace(entry, revision=current.revision + 1, created_at=current.created_at)
        params = _entry_params(stored)
        clash = cur.execute(pg(q.ENTRY_BY_IDENTITY), params).fetchone()
        if clash is not None and clash[0] != entry.id:
            raise AlreadyExistsError(
                f"an entry for {entry.spiffe_id} under {entry.parent_id} with the same "
                f"selectors already exists (id {clash[0]})"
            )
        cur.execute(pg(q.UPDATE_ENTRY), params)
        return stored

    @staticmethod
    def _delete_in(cur: Cursor, entry_id: str) -> None:
        if cur.execute(pg(q.DELETE_ENTRY), {"id": entry_id}).rowcount != 1:
            raise NotFoundError(f"entry {entry_id} not found")

    def get_entry(self, entry_id: str) -> Entry:
        rows = self._rows("read the entry", q.SELECT_ENTRY, {"id": entry_id})
        if not rows:
            raise NotFoundError(f"entry {entry_id} not found")
        return _entry_from(rows[0])

    def get_entries(self, entry_ids: Sequence[str]) -> list[Entry]:
        found: list[Entry] = []
        for start in range(0, len(entry_ids), _IDS_PER_READ):
            chunk = entry_ids[start : start + _IDS_PER_READ]
            params = {f"i{n}": entry_id for n, entry_id in enumerate(chunk)}
            rows = self._rows("read entries", q.select_entries_in(len(chunk)), params)
            found.extend(_entry_from(r) for r in rows)
        return found

    def list_entries(
        self, spiffe_id: str | None = None, parent_id: str | None = None
    ) -> list[Entry]:
        params = {"spiffe_id": spiffe_id, "parent_id": parent_id}
        sql = q.list_entries(spiffe_id=spiffe_id is not None, parent_id=parent_id is not None)
        rows = self._rows("list entries", sql, params, bulk=True)
        return [_entry_from(r) for r in rows]

    # -- join tokens ----------------------------------------------------------------------------

    # A join token's expiry is counted on the database's clock (as a lease's): written by
    # the server that made it and checked by whichever server an agent reaches, it lived
    # for its ttl plus the skew between the two (a token spent past its expiry on a server
    # whose clock ran behind), and one server's prune deleted it early for the others.

    def create_join_token(self, token: JoinToken) -> None:
        params = {
            "token_id": token.token_id,
            "secret_hash": token.secret_hash,
            "expires_at": self._lease_time.of(token.expires_at),
        }

        def work(cur: Cursor) -> None:
            if cur.execute(pg(ps.INSERT_JOIN_TOKEN_UNLESS_EXISTS), params).rowcount != 1:
                raise AlreadyExistsError(f"join token {token.token_id} already exists")

        self._write("create the join token", work)

    def check_join_token(self, token_id: str, secret_hash: bytes, now: int) -> bool:
        return self._check_join_token(token_id, secret_hash, self._lease_time.of(now))

    def _check_join_token(self, token_id: str, secret_hash: bytes, database_now: int) -> bool:
        # A read: a wrong guess locks nothing and changes nothing.
        rows = self._rows("read the join token", q.SELECT_JOIN_TOKEN, {"token_id": token_id})
        return (
            bool(rows)
            and hmac.compare_digest(bytes(rows[0]["secret_hash"]), secret_hash)
            and int(rows[0]["expires_at"]) > database_now
        )

    def prune_join_tokens(self, now: int) -> int:
        # Turned before the transaction: after a clock step it is measured again, on a
        # connection of its own, which a pool with none to spare gave only at its timeout.
        params = {"now": self._lease_time.of(now)}
        return self._write(
            "prune join tokens",
            lambda cur: int(cur.execute(pg(q.PRUNE_JOIN_TOKENS), params).rowcount),
            bulk=True,
        )

    # -- agents ---------------------------------------------------------------------------------

    def upsert_agent(self, agent: AttestedAgent, replacing: AttestedAgent | None = None) -> None:
        def work(cur: Cursor) -> None:
            self._write_agent(cur, agent, replacing)
            self._refuse_under_removal(cur, agent.spiffe_id)
            self._bump(cur, _REVISION)
            self._append_feed(cur, FEED_AGENT, (agent.spiffe_id,))

        self._write("save the agent", work)

    def adopt_agent_certificate(self, agent: AttestedAgent, replacing: AttestedAgent) -> bool:
        params = _agent_params(agent) | _adopt_params(replacing)

        def work(cur: Cursor) -> bool:
            cur.execute(pg(ps.LOCK_AGENT_KEY), {"spiffe_id": agent.spiffe_id})
            # READ COMMITTED evaluates the WHERE again on the row a concurrent writer left:
            # of two servers adopting, the second finds the serial moved on and writes nothing.
            if int(cur.execute(pg(q.ADOPT_AGENT_CERTIFICATE), params).rowcount) != 1:
                return False
            self._bump(cur, _REVISION)
            self._append_feed(cur, FEED_AGENT, (agent.spiffe_id,))
            return True

        return self._write("adopt the agent's certificate", work)

    def admit_agent(
        self,
        agent: AttestedAgent,
        token: TokenUse,
        now: int,
        replacing: AttestedAgent | None = None,
    ) -> bool:
        database_now = self._lease_time.of(now)
        spend = {"token_id": token.token_id, "secret_hash": token.secret_hash, "now": database_now}
        # The comparison is a read first: a wrong hash takes no lock.
        if not self._check_join_token(token.token_id, token.secret_hash, database_now):
            return False

        def work(cur: Cursor) -> bool:
            # The DELETE repeats every condition and is the one step that decides: of several
            # servers holding the secret, the others wait on the row lock, then find it gone.
            if int(cur.execute(pg(q.CONSUME_JOIN_TOKEN), spend).rowcount) != 1:
                return False
            self._write_agent(cur, agent, replacing)  # a refusal rolls the token's spend back
            self._refuse_under_removal(cur, agent.spiffe_id)  # rolls the token's spend back
            self._bump(cur, _REVISION)
            self._append_feed(cur, FEED_AGENT, (agent.spiffe_id,))
            return True

        return self._write("admit the agent", work)

    @staticmethod
    def _write_agent(cur: Cursor, agent: AttestedAgent, replacing: AttestedAgent | None) -> None:
        # The agent's key first, as a removal's (_lock_agent_key): a renewal waiting for the
        # ledger write holding the row is not passed by the agent's next writes, which would
        # keep the row share-locked past its statement timeout while the agent issues.
        cur.execute(pg(ps.LOCK_AGENT_KEY), {"spiffe_id": agent.spiffe_id})
        if replacing is None:
            if int(cur.execute(pg(q.INSERT_AGENT), _agent_params(agent)).rowcount) != 1:
                raise AgentReplacedError(agent.spiffe_id)
            return
        params = _agent_params(agent) | _read_params(agent, replacing)
        # The UPDATE's WHERE is evaluated again on the row as a concurrent writer left it
        # (READ COMMITTED waits on the row lock), and a row deleted and inserted again is a
        # new row this statement does not match: the comparison and the write are one step.
        if int(cur.execute(pg(q.REPLACE_AGENT), params).rowcount) != 1:
            raise AgentReplacedError(agent.spiffe_id)

    @staticmethod
    def _refuse_under_removal(cur: Cursor, agent_id: str) -> None:
        """After the agent's write, in its transaction: a stored removal of the agent rolls it
        back. Read after the write, not before: a delete or ban of the agent committing
        meanwhile held the agent's row (or its key) until it committed, removal row and all,
        and this statement's snapshot, taken after that wait, sees the row."""
        if cur.execute(pg(q.SELECT_REMOVAL), {"agent_id": agent_id}).fetchone() is not None:
            raise RemovalUnderWayError(agent_id)

    def get_agent(self, spiffe_id: str) -> AttestedAgent:
        rows = self._rows("read the agent", q.SELECT_AGENT, {"spiffe_id": spiffe_id})
        if not rows:
            raise NotFoundError(f"agent {spiffe_id} not found")
        return _agent_from(rows[0])

    def list_agents(self) -> list[AttestedAgent]:
        return [_agent_from(r) for r in self._rows("list agents", q.LIST_AGENTS, {}, bulk=True)]

    def delete_agent(
        self, spiffe_id: str, removal: Removal | None = None, *, unless_banned: bool = False
    ) -> None:
        row = _removal_of(spiffe_id, removal)
        query = q.DELETE_AGENT_NOT_BANNED if unless_banned else q.DELETE_AGENT

        def work(cur: Cursor) -> None:
            self._lock_agent_key(cur, spiffe_id)
            if cur.execute(pg(query), {"spiffe_id": spiffe_id}).rowcount != 1:
                banned = (
                    cur.execute(pg(q.AGENT_BANNED), {"spiffe_id": spiffe_id})
                    if unless_banned
                    else None
                )
                if banned is not None and banned.fetchone():
                    raise ConflictError(f"agent {spiffe_id} is banned")
                raise NotFoundError(f"agent {spiffe_id} not found")
            if row is not None:
                cur.execute(pg(q.UPSERT_REMOVAL), row)
            self._bump(cur, _REVISION)
            self._append_feed(cur, FEED_AGENT, (spiffe_id,))

        # Bulk limits: the row waits for the issuances holding it FOR SHARE to commit, which
        # under load takes longer than a statement of the server's own should.
        self._write("delete the agent", work, bulk=True)

    @staticmethod
    def _lock_agent_key(cur: Cursor, agent_id: str) -> None:
        """A removal's first lock (and an admission's or renewal's, in _write_agent): the
        agent's key, exclusive, so the ledger writes coming while it waits for the one under
        way queue behind it (ps.SHARE_AGENT_KEYS)."""
        cur.execute(pg(ps.LOCK_AGENT_KEY), {"spiffe_id": agent_id})

    def set_agent_banned(
        self, spiffe_id: str, banned: bool, removal: Removal | None = None
    ) -> None:
        params = {"spiffe_id": spiffe_id, "banned": int(banned)}
        row = _removal_of(spiffe_id, removal)

        def work(cur: Cursor) -> None:
            self._lock_agent_key(cur, spiffe_id)
            if cur.execute(pg(q.SET_AGENT_BANNED), params).rowcount != 1:
                raise NotFoundError(f"agent {spiffe_id} not found")
            if row is not None:
                cur.execute(pg(q.UPSERT_REMOVAL), row)
            self._bump(cur, _REVISION)
            self._append_feed(cur, FEED_AGENT, (spiffe_id,))

        self._write("ban the agent", work, bulk=True)  # as "delete the agent"

    def prune_agents(self, before: int, *, batch: int = AGENT_PRUNE_BATCH) -> list[str]:
        return prune_in_batches(self._prune_agent_batch, before, batch)

    def _prune_agent_batch(self, before: int, limit: int, after: str) -> list[str]:
        params = {"before": before, "limit": limit, "after": after}

        def work(cur: Cursor) -> list[str]:
            rows = cur.execute(pg(q.PRUNE_AGENTS), params).fetchall()
            gone = sorted(str(r[0]) for r in rows)
            if gone:
                self._bump(cur, _REVISION)
                self._append_feed(cur, FEED_AGENT, gone)
            return gone

        return self._write("prune agents", work, bulk=True)

    def removal_of(self, agent_id: str) -> Removal | None:
        rows = self._rows("read the removal", q.SELECT_REMOVAL, {"agent_id": agent_id})
        return _removal_from(rows[0]) if rows else None

    def list_removals(self, before: int) -> list[Removal]:
        rows = self._rows("list removals", q.LIST_REMOVALS, {"before": before})
        return [_removal_from(r) for r in rows]

    def end_removal(self, removal: Removal) -> bool:
        params = _removal_params(removal)
        return self._write(
            "end the removal",
            lambda cur: int(cur.execute(pg(q.END_REMOVAL), params).rowcount) == 1,
        )

    def claim_removal(self, agent_id: str, holder: str, now: int, ttl: int) -> bool:
        params = _claim_params(agent_id, holder, self._lease_time.of(now), ttl)
        # One statement decides (a concurrent caller waits on the row, then re-checks it).
        return self._write(
            "claim the removal",
            lambda cur: int(cur.execute(pg(q.CLAIM_REMOVAL), params).rowcount) == 1,
        )

    def renew_removal_claim(self, agent_id: str, holder: str, now: int, ttl: int) -> bool:
        params = _claim_params(agent_id, holder, self._lease_time.of(now), ttl)
        return self._write(
            "renew the removal claim",
            lambda cur: int(cur.execute(pg(q.RENEW_REMOVAL_CLAIM), params).rowcount) == 1,
        )

    def release_removal_claim(self, agent_id: str, holder: str) -> None:
        params = {"agent_id": agent_id, "holder": holder}
        self._write(
            "release the removal claim",
            lambda cur: cur.execute(pg(q.RELEASE_REMOVAL_CLAIM), params),
        )

    # -- key slots ------------------------------------------------------------------------------

    def save_key_slot(self, slot: KeySlot, *, fence: LeaseFence | None = None) -> None:
        params = key_slot_params(slot)
        held = self._fence_params(fence)

        def work(cur: Cursor) -> None:
            _check_fence(cur, held)
            cur.execute(pg(q.UPSERT_KEY_SLOT), params)
            self._append_feed(cur, FEED_KEY_SLOT, (slot.slot_id,))

        self._write("save the key slot", work)

    def list_key_slots(self, kind: str) -> list[KeySlot]:
        rows = self._rows("list key slots", q.LIST_KEY_SLOTS, {"kind": kind})
        return [_slot_from(r) for r in rows]

    def delete_key_slot(self, slot_id: str, *, fence: LeaseFence | None = None) -> None:
        self.delete_key_slots([slot_id], fence=fence)

    def delete_key_slots(self, slot_ids: Sequence[str], *, fence: LeaseFence | None = None) -> None:
        held = self._fence_params(fence)

        def work(cur: Cursor) -> None:
            _check_fence(cur, held)
            gone = [
                slot_id
                for slot_id in slot_ids
                if cur.execute(pg(q.DELETE_KEY_SLOT), {"slot_id": slot_id}).rowcount
            ]
            self._append_feed(cur, FEED_KEY_SLOT, gone)

        self._write("delete key slots", work)

    def _fence_params(self, fence: LeaseFence | None) -> dict[str, Any] | None:
        """`fence`'s lease check, its `now` on the database's clock (as acquire_lease's)."""
        if fence is None:
            return None
        return {**fence._asdict(), "now": self._lease_time.of(fence.now)}

    # -- leases ---------------------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, now: int, ttl: int) -> bool:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        now = self._lease_time.of(now)
        params = {"name": name, "holder": holder, "now": now, "expires_at": now + ttl}
        # One statement decides (a concurrent caller waits on the row, then re-checks it).
        return self._write(
            "take the lease",
            lambda cur: int(cur.execute(pg(q.ACQUIRE_LEASE), params).rowcount) == 1,
        )

    def release_lease(self, name: str, holder: str) -> None:
        params = {"name": name, "holder": holder}
        self._write("release the lease", lambda cur: cur.execute(pg(q.RELEASE_LEASE), params))

    # -- bundle ---------------------------------------------------------------------------------

    def next_bundle_sequence(self, *, fence: LeaseFence | None = None) -> int:
        held = self._fence_params(fence)

        def work(cur: Cursor) -> int:
            _check_fence(cur, held)
            sequence = self._bump(cur, _BUNDLE_SEQUENCE)
            self._bump(cur, _REVISION)  # then the feed, last, as in every write
            self._append_feed(cur, FEED_KEY_SLOT, (FEED_BUNDLE_SEQUENCE,))
            return sequence

        return self._write("advance the bundle sequence", work)

    def bundle_sequence(self) -> int:
        return self._counter(_BUNDLE_SEQUENCE)

    def _counter(self, name: str) -> int:
        rows = self._tuples(f"read the {name}", q.SELECT_COUNTER, {"name": name})
        return int(rows[0][0])

    # -- revocations ----------------------------------------------------------------------------

    def add_revocations(self, items: Sequence[Revocation]) -> None:
        for item in items:
            if item.kind not in REVOCATION_KINDS:
                raise ValueError(
                    f"revocation kind must be one of {REVOCATION_KINDS}, got {item.kind!r}"
                )
        if not items:
            return
        # In key order: concurrent batches lock rows in one order and never deadlock.
        params = [
            {
                "kind": item.kind,
                "value": item.value,
                "spiffe_id": item.spiffe_id,
                "expires_at": item.expires_at,
                "reason": item.reason,
                "revoked_at": item.revoked_at,
                "issuer": item.issuer,
            }
            for item in sorted(items, key=lambda r: (r.kind, r.value))
        ]

        def work(cur: Cursor) -> None:
            cur.executemany(pg(ps.INSERT_REVOCATION_RETURNING), params, returning=True)
            added = [f"{kind}:{value}" for _ in cur.results() for kind, value in cur.fetchall()]
            self._bump(cur, _REVISION)
            self._append_feed(cur, FEED_REVOCATION, added)

        self._write("add revocations", work)

    def list_revocations(self) -> list[Revocation]:
        rows = self._rows("list revocations", q.LIST_REVOCATIONS, {})
        return [_revocation_from(r) for r in rows]

    def prune_revocations(self, now: int) -> int:
        params = {"needed_from": ps.needed_from(now)}

        def work(cur: Cursor) -> int:
            removed = int(cur.execute(pg(q.PRUNE_REVOCATIONS), params).rowcount)
            if removed:
                self._bump(cur, _REVISION)
            return removed

        return self._write("prune revocations", work, bulk=True)

    # -- OAuth assertion replay -----------------------------------------------------------------

    def claim_jtis(self, claims: Sequence[JtiClaim], now: int) -> list[bool]:
        # In key order, so concurrent batches of several servers lock rows in one order and
        # never deadlock; a stable sort keeps repeats in input order (the first one wins).
        order = sorted(range(len(claims)), key=lambda i: (claims[i].issuer, claims[i].jti))

        def work(cur: Cursor) -> list[bool]:
            granted = [False] * len(claims)
            for i in order:
                params = {**claims[i]._asdict(), "now": now}
                granted[i] = int(cur.execute(pg(q.CLAIM_JTI), params).rowcount) == 1
            return granted

        return self._write("record assertion jtis", work)

    def prune_jtis(self, now: int) -> int:
        return self._write(
            "prune assertion jtis",
            lambda cur: int(cur.execute(pg(q.PRUNE_JTIS), {"now": now}).rowcount),
            bulk=True,
        )

    # -- change tracking ------------------------------------------------------------------------

    def revision(self) -> int:
        return self._counter(_REVISION)

    # -- change feed ----------------------------------------------------------------------------

    def feed_head(self) -> int:
        return self._counter(_FEED)

    def feed_since(self, after: int, limit: int) -> list[FeedItem]:
        rows = self._tuples("read the change feed", q.FEED_SINCE, {"after": after, "limit": limit})
        return [FeedItem(int(r[0]), int(r[1]), str(r[2]), str(r[3])) for r in rows]

    def announce_policy(self, policy_set_hash: str) -> None:
        self._write(
            "announce a policy reload",
            lambda cur: self._append_feed(cur, FEED_POLICY, (policy_set_hash,)),
        )

    def prune_feed(self, before: int) -> int:
        return self._write(
            "prune the change feed",
            lambda cur: sum(
                int(cur.execute(pg(query), {"before": before}).rowcount)
                for query in (q.PRUNE_FEED, q.PRUNE_FEED_POLICY)
            ),
            bulk=True,
        )

    def newest_feed_at(self) -> int | None:
        rows = self._tuples("read the change feed", q.NEWEST_FEED_AT, {})
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def announced_policy(self) -> PolicyAnnouncement | None:
        rows = self._tuples("read the change feed", q.NEWEST_POLICY_ANNOUNCEMENT, {})
        if not rows:
            return None
        return PolicyAnnouncement(int(rows[0][0]), str(rows[0][1]), int(rows[0][2]))

    def wait_feed(self, after: int, timeout: float) -> bool:
        # LISTEN first, then look: a commit between the look and the wait is still heard.
        # The wait runs to its deadline in slices (a close is seen within one); a notification
        # of another schema on this database neither ends it nor costs a look at the feed.
        deadline = time.monotonic() + timeout
        try:
            with self._listen_lock:
                if self._closing.is_set():
                    return False
                listener, schema = self._listener or self._listen()
                if self.feed_head() > after:
                    return True
                while (left := deadline - time.monotonic()) > 0:
                    heard = listener.notifies(timeout=min(FEED_WAIT_SLICE, left), stop_after=1)
                    ours = any(n.payload == schema for n in heard)
                    if self._closing.is_set():
                        return False
                    if ours and self.feed_head() > after:
                        return True
                return self.feed_head() > after
        except (psycopg.Error, StorageError):
            # A hint only: the reader polls the feed anyway. Listen again next time, and do
            # not spin while the database is away.
            self._drop_listener()
            self._closing.wait(FEED_WAIT_SLICE)
            return False

    def _listen(self) -> tuple[psycopg.Connection[Any], str]:
        """A connection listening on the feed's channel, and the schema whose notifications
        are this store's (the payload NOTIFY_FEED sends, from the same DSN's search_path)."""
        conn = AnsweredConnection.connect(self._dsn, autocommit=True, **self._options)
        try:
            row = conn.execute(ps.OWN_SCHEMA).fetchone()
            conn.execute(ps.LISTEN_FEED)
        except BaseException:
            conn.close()
            raise
        self._listener = (conn, str(row[0]) if row else "")
        return self._listener

    def _drop_listener(self) -> None:
        with self._listen_lock:
            if self._listener is not None:
                self._listener[0].close()
                self._listener = None


def _check_fence(cur: Cursor, held: dict[str, Any] | None) -> None:
    """LeaseLostError unless the fence's lease (`held`, _fence_params) is its holder's,
    unexpired. FOR SHARE until the commit: a takeover (an UPDATE of the row) waits for this
    write, so none lands between the check and the write."""
    if held is not None and cur.execute(pg(q.LEASE_HELD + " FOR SHARE"), held).fetchone() is None:
        raise LeaseLostError(str(held["name"]))


def _database_clock(conn: psycopg.Connection[Any]) -> float:
    """The database's clock now (Unix seconds), as `conn` reads it."""
    row = conn.execute(ps.DATABASE_NOW).fetchone()
    assert row is not None
    return float(row[0])


@contextmanager
def _patient(conn: AnsweredConnection, *, held_open: bool = False) -> Iterator[None]:
    """BULK_TIMEOUT for the statements run on `conn` meanwhile, then the session's own again.
    `held_open`: for a transaction left idle while its caller works (an audit snapshot's rows)
    too. Not for the others: a bulk write runs its statements back to back, and one whose
    server stalled midway would hold its locks (the entries' turn, a banned agent's row) for
    the bulk bound, every other server's writes waiting on them failing all along."""
    bulk = int(BULK_TIMEOUT * 1000)
    timeouts = ["statement_timeout"]
    if held_open:
        timeouts.append("idle_in_transaction_session_timeout")
    conn.execute("; ".join(f"SET {name} = {bulk}" for name in timeouts))
    before, conn.answer_timeout = conn.answer_timeout, BULK_TIMEOUT
    try:
        yield
    finally:
        conn.answer_timeout = before
        if conn.closed:
            pass
        elif conn.pgconn.transaction_status == pq.TransactionStatus.IDLE:
            conn.execute("; ".join(f"RESET {name}" for name in timeouts))
        else:
            conn.close()  # the pool would keep it with the bulk timeout: it replaces it
