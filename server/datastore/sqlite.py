"""The SQLite datastore (through sqlite-utils): WAL, synchronous=FULL, one writer, migrations.

Registration state lives here; tasks, credentials and the audit chain in the SqliteLedger mixin
(server/datastore/sqlite_ledger.py), on the same connection and file.

Thread safety: one connection guarded by one re-entrant lock. SQLite admits a single writer at a
time anyway, every write fsyncs (synchronous=FULL) so the lock is held about as long as SQLite
would hold its own, and reads are a few microseconds (the server keeps its hot state in memory
and reads the datastore only at start-up and after writes). A connection per thread would buy
concurrent reads we do not need and leak connections from thread pools that come and go.
`BEGIN IMMEDIATE` takes SQLite's write lock up front, so a second process on the same file
(the crash test's reopen, an operator's sqlite3 shell) waits on the busy timeout instead of
failing a transaction half-way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from server.datastore import queries as q
from server.datastore import sqlite_audit
from server.datastore.base import JtiClaim, LeaseFence
from server.datastore.entry_writes import REVISION as _REVISION
from server.datastore.entry_writes import EntryWrites
from server.datastore.errors import (
    AgentReplacedError,
    AlreadyExistsError,
    CommitUnknownError,
    ConflictError,
    DatastoreMovedError,
    LeaseLostError,
    NotFoundError,
    RemovalUnderWayError,
    StorageError,
)
from server.datastore.migrations import (
    CREATE_MIGRATIONS_TABLE,
    MIGRATIONS,
    Migration,
    refuse_newer,
    refuse_other,
)
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
    Selector,
    TokenUse,
    key_slot_params,
    prune_in_batches,
    revocation_needed_from,
)
from server.datastore.sqlite_checkpoints import SqliteCheckpoints
from server.datastore.sqlite_federation import SqliteFederation
from server.datastore.sqlite_ledger import SqliteLedger, _removal_params
from svid._clock import Clock

BUSY_TIMEOUT_MS = 10_000
# Bytes a WAL keeps once reset: twice what SQLite's automatic checkpoint (1000 pages) lets it
# reach between resets, so a WAL of ordinary use is never cut back and grown again.
WAL_SIZE_LIMIT = 8 << 20
T = TypeVar("T")
_BUNDLE_SEQUENCE = "bundle_sequence"
_FEED = "feed"
# Ids bound in one `get_entries` read (SQLite's parameter limit is 999 on old builds).
_IDS_PER_READ = 500
# How often wait_feed looks at the feed's counter: what a write through another process waits,
# at worst, before this one sees it (a read of one row, a few microseconds).
FEED_POLL_SECONDS = 0.02
Row = Mapping[str, Any]


def _selectors_json(selectors: Sequence[Selector]) -> str:
    return json.dumps([[s.type, s.value] for s in selectors])


def _selectors_from(text: str) -> tuple[Selector, ...]:
    return tuple(Selector(t, v) for t, v in json.loads(text))


def identity_hash(entry: Entry) -> str:
    """What makes two entries the same: SPIFFE ID, parent and the *set* of selectors."""
    canonical = json.dumps(
        [entry.spiffe_id, entry.parent_id, sorted({(s.type, s.value) for s in entry.selectors})]
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _entry_params(entry: Entry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "spiffe_id": entry.spiffe_id,
        "parent_id": entry.parent_id,
        "identity_hash": identity_hash(entry),
        "selectors": _selectors_json(entry.selectors),
        "x509_svid_ttl": entry.x509_svid_ttl,
        "jwt_svid_ttl": entry.jwt_svid_ttl,
        "dns_names": json.dumps(list(entry.dns_names)),
        "hint": entry.hint,
        "admin": int(entry.admin),
        "expires_at": entry.expires_at,
        "revision": entry.revision,
        "created_at": entry.created_at,
        "federates_with": json.dumps(list(entry.federates_with)),
    }


def _entry_from(row: Row) -> Entry:
    return Entry(
        id=row["id"],
        spiffe_id=row["spiffe_id"],
        parent_id=row["parent_id"],
        selectors=_selectors_from(row["selectors"]),
        x509_svid_ttl=row["x509_svid_ttl"],
        jwt_svid_ttl=row["jwt_svid_ttl"],
        dns_names=tuple(json.loads(row["dns_names"])),
        hint=row["hint"],
        admin=bool(row["admin"]),
        expires_at=row["expires_at"],
        revision=row["revision"],
        created_at=row["created_at"],
        federates_with=tuple(json.loads(row["federates_with"])),
    )


def _agent_from(row: Row) -> AttestedAgent:
    return AttestedAgent(
        spiffe_id=row["spiffe_id"],
        attestation_type=row["attestation_type"],
        serial=row["serial"],
        expires_at=row["expires_at"],
        banned=bool(row["banned"]),
        attested_at=row["attested_at"],
        selectors=_selectors_from(row["selectors"]),
        previous_serial=row["previous_serial"],
        previous_expires_at=row["previous_expires_at"],
    )


def _removal_from(row: Row) -> Removal:
    return Removal(row["agent_id"], row["reason"], int(row["started_at"]))


def _claim_params(agent_id: str, holder: str, now: int, ttl: int) -> dict[str, Any]:
    if ttl <= 0:
        raise ValueError(f"removal claim ttl must be positive, got {ttl}")
    return {"agent_id": agent_id, "holder": holder, "now": now, "until": now + ttl}


def _removal_of(agent_id: str, removal: Removal | None) -> dict[str, Any] | None:
    """The row to store with the agent's delete or ban; ValueError for another agent's."""
    if removal is None:
        return None
    if removal.agent_id != agent_id:
        raise ValueError(f"removal of {removal.agent_id} stored with agent {agent_id}")
    return _removal_params(removal)


def _slot_from(row: Row) -> KeySlot:
    return KeySlot(
        slot_id=row["slot_id"],
        kind=row["kind"],
        status=row["status"],
        public_der=bytes(row["public_der"]),
        kid=row["kid"],
        not_before=row["not_before"],
        not_after=row["not_after"],
        created_at=row["created_at"],
        sealed_key=bytes(row["sealed_key"] or b""),
    )


def _revocation_from(row: Row) -> Revocation:
    return Revocation(
        kind=row["kind"],
        value=row["value"],
        spiffe_id=row["spiffe_id"],
        expires_at=row["expires_at"],
        reason=row["reason"],
        revoked_at=row["revoked_at"],
        issuer=row["issuer"],
    )


@contextmanager
def _connection_of(
    transaction: contextlib.AbstractContextManager[sqlite_utils.Database],
) -> Iterator[sqlite3.Connection]:
    with transaction as db:
        yield db.conn


def _agent_params(agent: AttestedAgent) -> dict[str, Any]:
    return {
        "spiffe_id": agent.spiffe_id,
        "attestation_type": agent.attestation_type,
        "serial": agent.serial,
        "expires_at": agent.expires_at,
        "banned": int(agent.banned),
        "attested_at": agent.attested_at,
        "selectors": _selectors_json(agent.selectors),
        "previous_serial": agent.previous_serial,
        "previous_expires_at": agent.previous_expires_at,
    }


def _read_params(agent: AttestedAgent, replacing: AttestedAgent) -> dict[str, Any]:
    """What a conditional agent save (q.REPLACE_AGENT) asks of the stored record: the admission
    it read (attested_at), and the certificate the save carries on as previous (a renewal's
    presented one; a re-attestation's the record's serial) still its serial or its previous.
    Not the read serial alone: a renewal whose answer was lost, retried through a server whose
    copy lags the datastore, read a serial already renewed, and is the same agent's."""
    return {
        "read_attested_at": replacing.attested_at,
        "held": agent.previous_serial or replacing.serial,
    }


def _adopt_params(replacing: AttestedAgent) -> dict[str, Any]:
    """What an adoption (q.ADOPT_AGENT_CERTIFICATE) asks of the stored record: the admission
    it read, still naming the read serial as its current one."""
    return {"read_serial": replacing.serial, "read_attested_at": replacing.attested_at}


def _create_private_file(path: Path) -> None:
    """The database holds token hashes and the CA journal: owner-only from the first byte. An
    existing file is changed by path, not opened: closing a descriptor of it would drop the
    POSIX locks another connection of this process holds on it (see _private_companions)."""
    if path.exists():
        os.chmod(path, 0o600)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


# The files SQLite keeps beside the database, holding the same rows until checkpointed.
COMPANION_SUFFIXES = ("-wal", "-shm", "-journal")


def _private_companions(path: Path) -> None:
    """The datastore's companion files made owner-only. SQLite makes new ones with the
    database's mode, but one left by a crash keeps the mode it was made with (an older
    release's, a loose umask's) and holds the same token hashes and journal rows. SQLite keeps
    them beside the file a symlinked path names, so that is where they are looked for.

    Never through a descriptor that takes part in locks: closing any such descriptor of a
    file drops every POSIX lock this process holds on it, SQLite's on its -shm among them, and
    another connection then takes itself for the last one and truncates the -shm under our
    mapping (SIGBUS). OSError for one another user owns: its owner could read it, or change
    it, still (a root server's chmod succeeds, another's fails), and SQLite would take it as
    ours."""
    real = Path(os.path.realpath(path))
    for suffix in COMPANION_SUFFIXES:
        _make_private(real.with_name(real.name + suffix))


def _make_private(companion: Path) -> None:
    """chmod 0600 of `companion` when it is a regular file. Through an O_PATH descriptor where
    there is one: it names the file fstat saw, never a symlink swapped in meanwhile (chmod
    follows it, to any file of ours), and its close drops no lock (Linux: an O_PATH file takes
    no part in POSIX locks). A symlink is left alone: SQLite refuses to open one."""
    o_path = getattr(os, "O_PATH", 0)
    try:
        fd = os.open(companion, o_path | os.O_NOFOLLOW) if o_path else None
    except FileNotFoundError:
        return
    try:
        found = os.fstat(fd) if fd is not None else os.lstat(companion)
        if not stat.S_ISREG(found.st_mode):
            return
        if found.st_uid != os.geteuid():
            raise PermissionError(
                errno.EPERM,
                f"owned by uid {found.st_uid}, not by this server's uid {os.geteuid()}: "
                "its owner can read and change the datastore's rows in it; chown it to the "
                "server's user (never delete it: it may hold committed writes)",
                str(companion),
            )
        held = Path(f"/proc/self/fd/{fd}")
        os.chmod(held if fd is not None and held.exists() else companion, 0o600)
    except FileNotFoundError:
        return  # removed meanwhile (a lstat without O_PATH): nothing left to protect
    finally:
        if fd is not None:
            os.close(fd)


def _identity(found: os.stat_result) -> tuple[int, int]:
    return found.st_dev, found.st_ino


def outcome_unknown(error: sqlite3.Error) -> bool:
    """Whether a failed COMMIT may still have landed: an I/O error (SQLITE_IOERR and its
    extended codes, the fsync's among them) came after the WAL frames were written. A full
    disk (SQLITE_FULL) is not: the commit frame was never whole, and recovery ignores it."""
    return (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF == sqlite3.SQLITE_IOERR


def _open_failure(path: Path, error: sqlite3.Error | OSError) -> str:
    """Why the datastore at `path` did not open. A full file system is named as such: SQLite
    says only "disk I/O error" when it cannot map its shared-memory file there."""
    said = f"cannot open the datastore at {path}: {error}"
    with contextlib.suppress(OSError):
        room = os.statvfs(path.parent)
        if room.f_bavail == 0:
            said += f" (its file system has no space left: free some in {path.parent})"
    return said


class SqliteDataStore(
    EntryWrites[sqlite_utils.Database], SqliteLedger, SqliteFederation, SqliteCheckpoints
):
    """`DataStore` on one SQLite file. Build once per process; `close()` at shutdown.

    `migrate=False` opens an existing file read-only and applies no migration: StorageError
    unless its schema is this release's, or at least `oldest_schema` when the caller reads
    older ones (migrations.refuse_other). For commands that only read."""

    def __init__(
        self,
        path: Path,
        clock: Clock,
        *,
        migrate: bool = True,
        oldest_schema: int | None = None,
        on_commit_unknown: Callable[[CommitUnknownError], None] | None = None,
    ) -> None:
        self._path = Path(path)
        self._clock = clock
        # Called once, on the thread that committed, when a commit's outcome is unknown: the
        # server stops on it. Every later write is refused.
        self._on_commit_unknown = on_commit_unknown
        self._commit_unknown: CommitUnknownError | None = None
        self._lock = threading.RLock()
        self._id_lock = threading.Lock()
        self._last_id_millis = self._last_created = 0
        self._closed = False
        self._closing = threading.Event()
        # The file the connection has open (device, inode): None for a read-only store,
        # which writes nothing to lose.
        self._opened: tuple[int, int] | None = None
        if not migrate:
            self._db, versions = self._open_read_only()
            try:
                oldest = MIGRATIONS[-1].version if oldest_schema is None else oldest_schema
                refuse_other(versions, oldest)
            except StorageError:
                self.close()
                raise
            return
        _create_private_file(self._path)
        try:
            _private_companions(self._path)
        except OSError as e:
            raise StorageError(_open_failure(self._path, e)) from None
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly
        # what the code says (the sqlite3 module's implicit transactions skip DDL).
        conn = sqlite3.connect(
            str(self._path),
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        self._db = sqlite_utils.Database(conn, execute_plugins=False)
        try:
            self._opened = _identity(os.stat(self._path))
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.enable_wal()
            # FULL: in WAL mode every commit fsyncs the log, so an acknowledged write survives
            # kill -9 and power loss (NORMAL would only survive a process crash).
            self._db.execute("PRAGMA synchronous = FULL")
            # A WAL another process's read held from being reset (audit verify over a long
            # log, a backup) grows with every commit meanwhile; reset again, it is cut back to
            # this rather than keep that disk until the server restarts.
            self._db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            self.migrate()
            _private_companions(self._path)  # those the open made or found meanwhile
        except (sqlite3.Error, OSError) as e:
            # Read by the operator at start, not by a client: the file and the cause, once,
            # rather than the driver's traceback naming neither.
            self.close()
            raise StorageError(_open_failure(self._path, e)) from None

    def _open_read_only(self) -> tuple[sqlite_utils.Database, list[int]]:
        """The file opened read-only, and the migrations it records. Not even the WAL switch:
        the file stays byte for byte as it was, and a write through this store fails."""
        if not self._path.is_file():
            raise StorageError(f"no datastore at {self._path}")
        conn = sqlite_audit.connect_read_only(self._path)
        try:
            db = sqlite_utils.Database(conn, execute_plugins=False)
            # No table: no server has started on it (refuse_other says so).
            versions = sqlite_audit.schema_versions(conn)
        except sqlite3.Error as e:
            conn.close()
            raise StorageError(f"cannot read the datastore at {self._path}: {e}") from None
        return db, versions

    # -- plumbing -------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite_utils.Database]:
        with self._lock:
            if self._closed:
                raise sqlite3.ProgrammingError("the datastore is closed")
            if self._commit_unknown is not None:
                # Nothing is attempted: this write's outcome is known, it was not made.
                raise StorageError(
                    "the datastore takes no more writes: a commit's outcome is unknown and "
                    "the server is stopping"
                )
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                # Last before the COMMIT: one made to a file gone from the path is lost.
                self._refuse_moved()
                # Inside the try: a COMMIT that fails (I/O error, busy) leaves the transaction
                # open, and the next BEGIN on this connection would fail for good.
                self._commit()
            except BaseException:
                if self._db.conn.in_transaction:
                    # After an unknown outcome the disk may refuse this too: the error
                    # already raised is the one to report.
                    with contextlib.suppress(*self._rollback_errors()):
                        self._db.execute("ROLLBACK")
                raise

    def _moved(self) -> str | None:
        """What is wrong when the datastore's path no longer names the file this store has
        open (None: it does, or this store writes nothing). Deleted or moved away, that file
        still takes SQLite's writes, and they go with it: none is acknowledged then."""
        if self._opened is None:
            return None
        try:
            found = os.stat(self._path)
        except (FileNotFoundError, NotADirectoryError):
            # Not a directory: a directory of the path moved away and a file put in its place.
            return (
                f"the datastore file at {self._path} is gone (deleted or moved away while "
                f"the server ran on it): put it back at {self._path}"
            )
        except OSError:
            return None  # unknown: SQLite's own error, if any, says what it met
        if _identity(found) != self._opened:
            return (
                f"the datastore file at {self._path} is not the one the server opened (that "
                "one was moved away or deleted, and another put in its place): put the "
                "server's back, or restart the server to run on this one"
            )
        return None

    def _refuse_moved(self, what: str = "write to the datastore") -> None:
        """DatastoreMovedError naming the path when it names another file or none."""
        moved = self._moved()
        if moved is not None:
            raise DatastoreMovedError(f"cannot {what}: {moved}")

    def _commit(self) -> None:
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if not outcome_unknown(e):
                raise
            failed = CommitUnknownError(str(self._path), str(e))
            first = self._commit_unknown is None
            self._commit_unknown = failed
            if first and self._on_commit_unknown is not None:
                self._on_commit_unknown(failed)
            raise failed from e

    def _rollback_errors(self) -> tuple[type[Exception], ...]:
        return (sqlite3.Error,) if self._commit_unknown is not None else ()

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """A write transaction on the store's connection, for bulk jobs of this package (the
        one-shot import of older files): committed when the block ends, rolled back on error."""
        return _connection_of(self._transaction())

    def _rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            if self._closed:
                raise sqlite3.ProgrammingError("the datastore is closed")
            return list(self._db.query(sql, dict(params or {})))

    def _now(self) -> int:
        return int(self._clock.now())

    @staticmethod
    def _execute_in(
        db: sqlite_utils.Database, sql: str, params: dict[str, object]
    ) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in db.execute(sql, params).fetchall()]

    @staticmethod
    def _bump(db: sqlite_utils.Database, counter: str) -> int:
        db.execute(q.BUMP_COUNTER, {"name": counter})
        row = db.execute(q.SELECT_COUNTER, {"name": counter}).fetchone()
        return int(row[0])

    def _append_feed(self, db: sqlite_utils.Database, kind: str, keys: Iterable[str]) -> None:
        """Name the rows this transaction touched in the change feed: one counter bump for
        all of them, so a batch pays one small insert per row."""
        keys = list(keys)
        if not keys:
            return
        db.execute(q.BUMP_COUNTER_BY, {"name": _FEED, "n": len(keys)})
        head = int(db.execute(q.SELECT_COUNTER, {"name": _FEED}).fetchone()[0])
        at = self._now()
        first = head - len(keys) + 1
        sqlite_audit.insert_many(
            db.conn, q.FEED_INTO, [(first + i, at, kind, k) for i, k in enumerate(keys)]
        )

    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied now (empty when up to date)."""
        applied: list[int] = []
        with self._lock:
            self._db.execute(CREATE_MIGRATIONS_TABLE)
            refuse_newer(int(r[0]) for r in self._db.execute(q.MIGRATION_VERSIONS).fetchall())
            for migration in MIGRATIONS:
                if self._apply(migration):
                    applied.append(migration.version)
        return applied

    def _apply(self, migration: Migration) -> bool:
        with self._transaction() as db:
            done = {row[0] for row in db.execute(q.MIGRATION_VERSIONS).fetchall()}
            if migration.version in done:
                return False
            migration.apply(db.execute)
            db.execute(
                q.RECORD_MIGRATION,
                {"version": migration.version, "name": migration.name, "now": self._now()},
            )
            return True

    def schema_versions(self) -> list[int]:
        return sorted(int(r["version"]) for r in self._rows(q.MIGRATION_VERSIONS))

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.conn.close()

    # -- entries --------------------------------------------------------------------------------

    @staticmethod
    def _insert_in(db: sqlite_utils.Database, stored: Entry) -> None:
        """Insert within the caller's transaction; AlreadyExistsError (nothing written) for a
        clash of id or identity. One statement when nothing clashes: a batch pays for the
        lookups that name the clash only on the items that have one."""
        params = _entry_params(stored)
        if db.execute(q.INSERT_ENTRY_UNLESS_EXISTS, params).rowcount == 1:
            return
        if db.execute(q.SELECT_ENTRY, {"id": stored.id}).fetchone() is not None:
            raise AlreadyExistsError(f"entry id {stored.id} already exists")
        clash = db.execute(q.ENTRY_BY_IDENTITY, params).fetchone()
        raise AlreadyExistsError(
            f"an entry for {stored.spiffe_id} under {stored.parent_id} with the same "
            f"selectors already exists (id {clash[0] if clash else '?'})"
        )

    @staticmethod
    def _update_in(db: sqlite_utils.Database, entry: Entry) -> Entry:
        rows = list(db.query(q.SELECT_ENTRY, {"id": entry.id}))
        if not rows:
            raise NotFoundError(f"entry {entry.id} not found")
        current = _entry_from(rows[0])
        if entry.revision and entry.revision != current.revision:
            raise ConflictError(
                f"entry {entry.id} changed meanwhile: revision {current.revision}, "
                f"update was based on {entry.revision}"
            )
        stored = replace(entry, revision=current.revision + 1, created_at=current.created_at)
        params = _entry_params(stored)
        clash = db.execute(q.ENTRY_BY_IDENTITY, params).fetchone()
        if clash is not None and clash[0] != entry.id:
            raise AlreadyExistsError(
                f"an entry for {entry.spiffe_id} under {entry.parent_id} with the same "
                f"selectors already exists (id {clash[0]})"
            )
        db.execute(q.UPDATE_ENTRY, params)
        return stored

    @staticmethod
    def _delete_in(db: sqlite_utils.Database, entry_id: str) -> None:
        if db.execute(q.DELETE_ENTRY, {"id": entry_id}).rowcount != 1:
            raise NotFoundError(f"entry {entry_id} not found")

    def _entry_transaction(self, what: str, work: Callable[[sqlite_utils.Database], T]) -> T:
        with self._transaction() as db:
            return work(db)

    def get_entry(self, entry_id: str) -> Entry:
        rows = self._rows(q.SELECT_ENTRY, {"id": entry_id})
        if not rows:
            raise NotFoundError(f"entry {entry_id} not found")
        return _entry_from(rows[0])

    def get_entries(self, entry_ids: Sequence[str]) -> list[Entry]:
        found: list[Entry] = []
        for start in range(0, len(entry_ids), _IDS_PER_READ):
            chunk = entry_ids[start : start + _IDS_PER_READ]
            params = {f"i{n}": entry_id for n, entry_id in enumerate(chunk)}
            found.extend(
                _entry_from(r) for r in self._rows(q.select_entries_in(len(chunk)), params)
            )
        return found

    def list_entries(
        self, spiffe_id: str | None = None, parent_id: str | None = None
    ) -> list[Entry]:
        sql = q.list_entries(spiffe_id=spiffe_id is not None, parent_id=parent_id is not None)
        rows = self._rows(sql, {"spiffe_id": spiffe_id, "parent_id": parent_id})
        return [_entry_from(r) for r in rows]

    # -- join tokens ----------------------------------------------------------------------------

    def create_join_token(self, token: JoinToken) -> None:
        params = {
            "token_id": token.token_id,
            "secret_hash": token.secret_hash,
            "expires_at": token.expires_at,
        }
        with self._transaction() as db:
            if db.execute(q.SELECT_JOIN_TOKEN, params).fetchone() is not None:
                raise AlreadyExistsError(f"join token {token.token_id} already exists")
            db.execute(q.INSERT_JOIN_TOKEN, params)

    def check_join_token(self, token_id: str, secret_hash: bytes, now: int) -> bool:
        # A read: a wrong guess takes no write lock and changes nothing.
        rows = self._rows(q.SELECT_JOIN_TOKEN, {"token_id": token_id})
        return (
            bool(rows)
            and hmac.compare_digest(bytes(rows[0]["secret_hash"]), secret_hash)
            and int(rows[0]["expires_at"]) > now
        )

    def prune_join_tokens(self, now: int) -> int:
        with self._transaction() as db:
            return int(db.execute(q.PRUNE_JOIN_TOKENS, {"now": now}).rowcount)

    # -- agents ---------------------------------------------------------------------------------

    def upsert_agent(self, agent: AttestedAgent, replacing: AttestedAgent | None = None) -> None:
        with self._transaction() as db:
            self._write_agent(db, agent, replacing)
            self._refuse_under_removal(db, agent.spiffe_id)
            self._bump(db, _REVISION)
            self._append_feed(db, FEED_AGENT, (agent.spiffe_id,))

    def adopt_agent_certificate(self, agent: AttestedAgent, replacing: AttestedAgent) -> bool:
        params = _agent_params(agent) | _adopt_params(replacing)
        with self._transaction() as db:
            # Under the write lock: no other writer comes between the comparison and the write.
            if int(db.execute(q.ADOPT_AGENT_CERTIFICATE, params).rowcount) != 1:
                return False
            self._bump(db, _REVISION)
            self._append_feed(db, FEED_AGENT, (agent.spiffe_id,))
        return True

    def admit_agent(
        self,
        agent: AttestedAgent,
        token: TokenUse,
        now: int,
        replacing: AttestedAgent | None = None,
    ) -> bool:
        spend = {"token_id": token.token_id, "secret_hash": token.secret_hash, "now": now}
        # The comparison is a read first: a wrong hash takes no write lock.
        if not self.check_join_token(token.token_id, token.secret_hash, now):
            return False
        with self._transaction() as db:
            # The DELETE repeats every condition, so it is the single atomic step that decides:
            # of two callers holding the secret (or two processes on the file) exactly one
            # sees rowcount 1, and a row that expired since the read stays refused.
            if int(db.execute(q.CONSUME_JOIN_TOKEN, spend).rowcount) != 1:
                return False
            self._write_agent(db, agent, replacing)  # a refusal rolls the token's spend back
            self._refuse_under_removal(db, agent.spiffe_id)  # rolls the token's spend back
            self._bump(db, _REVISION)
            self._append_feed(db, FEED_AGENT, (agent.spiffe_id,))
        return True

    @staticmethod
    def _write_agent(
        db: sqlite_utils.Database, agent: AttestedAgent, replacing: AttestedAgent | None
    ) -> None:
        if replacing is None:
            if int(db.execute(q.INSERT_AGENT, _agent_params(agent)).rowcount) != 1:
                raise AgentReplacedError(agent.spiffe_id)
            return
        params = _agent_params(agent) | _read_params(agent, replacing)
        # Under the write lock: no other writer comes between the comparison and the write.
        if int(db.execute(q.REPLACE_AGENT, params).rowcount) != 1:
            raise AgentReplacedError(agent.spiffe_id)

    @staticmethod
    def _refuse_under_removal(db: sqlite_utils.Database, agent_id: str) -> None:
        """After the agent's write, in its transaction: a stored removal of the agent rolls it
        back (the write lock makes the two one step against the removal's write)."""
        if db.execute(q.SELECT_REMOVAL, {"agent_id": agent_id}).fetchone() is not None:
            raise RemovalUnderWayError(agent_id)

    def get_agent(self, spiffe_id: str) -> AttestedAgent:
        rows = self._rows(q.SELECT_AGENT, {"spiffe_id": spiffe_id})
        if not rows:
            raise NotFoundError(f"agent {spiffe_id} not found")
        return _agent_from(rows[0])

    def list_agents(self) -> list[AttestedAgent]:
        return [_agent_from(r) for r in self._rows(q.LIST_AGENTS)]

    def delete_agent(
        self, spiffe_id: str, removal: Removal | None = None, *, unless_banned: bool = False
    ) -> None:
        row = _removal_of(spiffe_id, removal)
        query = q.DELETE_AGENT_NOT_BANNED if unless_banned else q.DELETE_AGENT
        with self._transaction() as db:
            if db.execute(query, {"spiffe_id": spiffe_id}).rowcount != 1:
                banned = (
                    db.execute(q.AGENT_BANNED, {"spiffe_id": spiffe_id}) if unless_banned else None
                )
                if banned is not None and banned.fetchone():
                    raise ConflictError(f"agent {spiffe_id} is banned")
                raise NotFoundError(f"agent {spiffe_id} not found")
            if row is not None:
                db.execute(q.UPSERT_REMOVAL, row)
            self._bump(db, _REVISION)
            self._append_feed(db, FEED_AGENT, (spiffe_id,))

    def set_agent_banned(
        self, spiffe_id: str, banned: bool, removal: Removal | None = None
    ) -> None:
        params = {"spiffe_id": spiffe_id, "banned": int(banned)}
        row = _removal_of(spiffe_id, removal)
        with self._transaction() as db:
            if db.execute(q.SET_AGENT_BANNED, params).rowcount != 1:
                raise NotFoundError(f"agent {spiffe_id} not found")
            if row is not None:
                db.execute(q.UPSERT_REMOVAL, row)
            self._bump(db, _REVISION)
            self._append_feed(db, FEED_AGENT, (spiffe_id,))

    def prune_agents(self, before: int, *, batch: int = AGENT_PRUNE_BATCH) -> list[str]:
        return prune_in_batches(self._prune_agent_batch, before, batch)

    def _prune_agent_batch(self, before: int, limit: int, after: str) -> list[str]:
        with self._transaction() as db:
            rows = db.execute(
                q.PRUNE_AGENTS, {"before": before, "limit": limit, "after": after}
            ).fetchall()
            gone = sorted(str(r[0]) for r in rows)
            if gone:
                self._bump(db, _REVISION)
                self._append_feed(db, FEED_AGENT, gone)
            return gone

    def removal_of(self, agent_id: str) -> Removal | None:
        rows = self._rows(q.SELECT_REMOVAL, {"agent_id": agent_id})
        return _removal_from(rows[0]) if rows else None

    def list_removals(self, before: int) -> list[Removal]:
        return [_removal_from(r) for r in self._rows(q.LIST_REMOVALS, {"before": before})]

    def end_removal(self, removal: Removal) -> bool:
        with self._transaction() as db:
            return int(db.execute(q.END_REMOVAL, _removal_params(removal)).rowcount) == 1

    def claim_removal(self, agent_id: str, holder: str, now: int, ttl: int) -> bool:
        params = _claim_params(agent_id, holder, now, ttl)
        with self._transaction() as db:
            return int(db.execute(q.CLAIM_REMOVAL, params).rowcount) == 1

    def renew_removal_claim(self, agent_id: str, holder: str, now: int, ttl: int) -> bool:
        params = _claim_params(agent_id, holder, now, ttl)
        with self._transaction() as db:
            return int(db.execute(q.RENEW_REMOVAL_CLAIM, params).rowcount) == 1

    def release_removal_claim(self, agent_id: str, holder: str) -> None:
        with self._transaction() as db:
            db.execute(q.RELEASE_REMOVAL_CLAIM, {"agent_id": agent_id, "holder": holder})

    # -- key slots ------------------------------------------------------------------------------

    def save_key_slot(self, slot: KeySlot, *, fence: LeaseFence | None = None) -> None:
        params = key_slot_params(slot)
        with self._transaction() as db:
            _check_fence(db, fence)
            db.execute(q.UPSERT_KEY_SLOT, params)
            self._append_feed(db, FEED_KEY_SLOT, (slot.slot_id,))

    def list_key_slots(self, kind: str) -> list[KeySlot]:
        return [_slot_from(r) for r in self._rows(q.LIST_KEY_SLOTS, {"kind": kind})]

    def delete_key_slot(self, slot_id: str, *, fence: LeaseFence | None = None) -> None:
        self.delete_key_slots([slot_id], fence=fence)

    def delete_key_slots(self, slot_ids: Sequence[str], *, fence: LeaseFence | None = None) -> None:
        with self._transaction() as db:
            _check_fence(db, fence)
            gone = [
                slot_id
                for slot_id in slot_ids
                if db.execute(q.DELETE_KEY_SLOT, {"slot_id": slot_id}).rowcount
            ]
            self._append_feed(db, FEED_KEY_SLOT, gone)

    # -- leases ---------------------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, now: int, ttl: int) -> bool:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        params = {"name": name, "holder": holder, "now": now, "expires_at": now + ttl}
        with self._transaction() as db:
            return int(db.execute(q.ACQUIRE_LEASE, params).rowcount) == 1

    def release_lease(self, name: str, holder: str) -> None:
        with self._transaction() as db:
            db.execute(q.RELEASE_LEASE, {"name": name, "holder": holder})

    # -- bundle ---------------------------------------------------------------------------------

    def next_bundle_sequence(self, *, fence: LeaseFence | None = None) -> int:
        with self._transaction() as db:
            _check_fence(db, fence)
            self._bump(db, _REVISION)
            sequence = self._bump(db, _BUNDLE_SEQUENCE)
            self._append_feed(db, FEED_KEY_SLOT, (FEED_BUNDLE_SEQUENCE,))
            return sequence

    def bundle_sequence(self) -> int:
        return int(self._rows(q.SELECT_COUNTER, {"name": _BUNDLE_SEQUENCE})[0]["value"])

    # -- revocations ----------------------------------------------------------------------------

    def add_revocations(self, items: Sequence[Revocation]) -> None:
        for item in items:
            if item.kind not in REVOCATION_KINDS:
                raise ValueError(
                    f"revocation kind must be one of {REVOCATION_KINDS}, got {item.kind!r}"
                )
        if not items:
            return
        with self._transaction() as db:
            added = []
            for item in items:
                cursor = db.execute(
                    q.INSERT_REVOCATION,
                    {
                        "kind": item.kind,
                        "value": item.value,
                        "spiffe_id": item.spiffe_id,
                        "expires_at": item.expires_at,
                        "reason": item.reason,
                        "revoked_at": item.revoked_at,
                        "issuer": item.issuer,
                    },
                )
                if cursor.rowcount == 1:
                    added.append(f"{item.kind}:{item.value}")
            self._bump(db, _REVISION)
            self._append_feed(db, FEED_REVOCATION, added)

    def list_revocations(self) -> list[Revocation]:
        return [_revocation_from(r) for r in self._rows(q.LIST_REVOCATIONS)]

    def prune_revocations(self, now: int) -> int:
        with self._transaction() as db:
            params = {"needed_from": revocation_needed_from(now)}
            removed = int(db.execute(q.PRUNE_REVOCATIONS, params).rowcount)
            if removed:
                self._bump(db, _REVISION)
            return removed

    # -- OAuth assertion replay -----------------------------------------------------------------

    def claim_jtis(self, claims: Sequence[JtiClaim], now: int) -> list[bool]:
        with self._transaction() as db:
            return [
                int(db.execute(q.CLAIM_JTI, {**c._asdict(), "now": now}).rowcount) == 1
                for c in claims
            ]

    def prune_jtis(self, now: int) -> int:
        with self._transaction() as db:
            return int(db.execute(q.PRUNE_JTIS, {"now": now}).rowcount)

    # -- change tracking ------------------------------------------------------------------------

    def revision(self) -> int:
        return int(self._rows(q.SELECT_COUNTER, {"name": _REVISION})[0]["value"])

    # -- change feed ----------------------------------------------------------------------------

    def feed_head(self) -> int:
        return int(self._rows(q.SELECT_COUNTER, {"name": _FEED})[0]["value"])

    def feed_since(self, after: int, limit: int) -> list[FeedItem]:
        rows = self._rows(q.FEED_SINCE, {"after": after, "limit": limit})
        return [FeedItem(r["revision"], r["at"], r["kind"], r["key"]) for r in rows]

    def announce_policy(self, policy_set_hash: str) -> None:
        with self._transaction() as db:
            self._append_feed(db, FEED_POLICY, (policy_set_hash,))

    def prune_feed(self, before: int) -> int:
        with self._transaction() as db:
            pruned = int(db.execute(q.PRUNE_FEED, {"before": before}).rowcount)
            return pruned + int(db.execute(q.PRUNE_FEED_POLICY, {"before": before}).rowcount)

    def newest_feed_at(self) -> int | None:
        at = self._rows(q.NEWEST_FEED_AT, {})[0]["at"]
        return None if at is None else int(at)

    def announced_policy(self) -> PolicyAnnouncement | None:
        rows = self._rows(q.NEWEST_POLICY_ANNOUNCEMENT, {})
        if not rows:
            return None
        row = rows[0]
        return PolicyAnnouncement(int(row["revision"]), str(row["key"]), int(row["at"]))

    def feed_reading(
        self, on_connected: Callable[[], None] | None = None
    ) -> contextlib.nullcontext[None]:
        # One connection under one lock, and SQLite admits one writer at a time anyway:
        # there is no pool for the follower's reads to have a share of their own (nor a
        # wait for one to leave out of the read's time: `on_connected` is not called).
        return contextlib.nullcontext()

    def wait_feed(self, after: int, timeout: float) -> bool:
        # SQLite tells no other process of a commit: look at the counter every few
        # milliseconds (steps of the poll, not a clock: a test's fake clock never moves here).
        steps = max(1, round(timeout / FEED_POLL_SECONDS))
        for step in range(steps + 1):
            try:
                if self._closing.is_set() or self.feed_head() > after:
                    return not self._closing.is_set()
            except sqlite3.ProgrammingError:
                if self._closing.is_set():
                    return False  # closed while we looked
                raise
            if step == steps or self._closing.wait(FEED_POLL_SECONDS):
                return False
        return False


def _check_fence(db: sqlite_utils.Database, fence: LeaseFence | None) -> None:
    """LeaseLostError unless `fence`'s lease is its holder's, unexpired (LeaseFence). Inside
    the write's BEGIN IMMEDIATE: no takeover commits between the check and the write."""
    if fence is not None and db.execute(q.LEASE_HELD, fence._asdict()).fetchone() is None:
        raise LeaseLostError(fence.name)
