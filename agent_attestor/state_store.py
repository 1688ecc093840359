"""What the agent holds, on disk for its next start: where its Sync stream got to and the state
it reached there (entries, bundles, revocations), and its workload X.509-SVIDs (chain and key).

A restart then mints nothing it still holds and needs no snapshot: the first Sync message is a
delta from the saved revision (a snapshot when the server cannot give one), and the SVIDs are
served once it is applied. Without this, an agent holding 20k SVIDs took 69 s after a restart
to have them minted again at the server's per-agent signing rate (issue 13; goal 30 s).

One SQLite file, 0600 beside the agent's own key. A batch of changes is one transaction (WAL,
synchronous=FULL: fsynced at commit), so a crash or kill -9 leaves the last committed batch
whole and never a torn row; and a batch rewrites only its own rows. Measured on the 2-core dev
machine: a batch of 500 renewed SVIDs commits in 7-11 ms; the first save of 100k entries and
20k SVIDs takes 2-4 s (once, on a worker thread). One file rewritten by temp + rename would cost
every renewal batch that: 2.5-3.3 s to pickle, write and fsync those 34 MB.

Rows are taken as written: checking 20k keys against their chains again costs ~10 s (0.5 ms
each), the time this file is there to save. A file SQLite finds damaged (quick_check), with a
row the decoders refuse, or of another schema, agent ID or trust domain is deleted with a log line
and the agent starts afresh; a file of schema 1 (its revocations saved without their owner) is
restored, but catches up by a snapshot, not a delta.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_attestor.cache import SyncPosition, SyncState
from agent_attestor.data_file import regular_file
from agent_attestor.errors import DataFileUnreadableError
from agent_attestor.model import Entry, IssuedSvid, Selector, TrustBundle
from agent_attestor.node_client import sync_state
from svid._proto import common_pb2, node_pb2

log = logging.getLogger(__name__)

# 2: each saved revocation names whose credential it is (Revocation.spiffe_id).
SCHEMA = 2
# Schema 1 (releases before 2) saved revocations without their owner. A delta from its revision
# repeats no revocation the agent holds, so those would stay ownerless until they expire: it is
# restored (entries, SVIDs) at revision 0, so the first Sync is a snapshot that brings them.
_OWNERLESS_SCHEMA = 1
# An SVID with less than this share of its life left is not restored: past every rotation point
# (at most 0.6 of life), it is overdue and would be served only to be replaced at once.
MIN_LIFE_LEFT = 0.1
# SQLite's files beside the state file: the log and a hot journal hold the same keys.
_SIDE_FILES = ("-wal", "-shm", "-journal")
_REVOCATION_KINDS = {
    "x509_serial": common_pb2.Revocation.X509_SERIAL,
    "jwt_id": common_pb2.Revocation.JWT_ID,
    "task": common_pb2.Revocation.TASK,
}
_TABLES = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
    "CREATE TABLE IF NOT EXISTS entries (id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, "
    "selectors TEXT NOT NULL, hint TEXT NOT NULL, x509_svid_ttl INTEGER NOT NULL, "
    "jwt_svid_ttl INTEGER NOT NULL, dns_names TEXT NOT NULL, created_at INTEGER NOT NULL, "
    "revision INTEGER NOT NULL, expires_at INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS svids (entry_id TEXT PRIMARY KEY, spiffe_id TEXT NOT NULL, "
    "chain_der BLOB NOT NULL, key_der BLOB NOT NULL, not_before REAL NOT NULL, "
    "not_after REAL NOT NULL, serial_hex TEXT NOT NULL, issuance_key TEXT NOT NULL, "
    "received_at REAL NOT NULL)",
)


@dataclass(frozen=True, slots=True)
class SavedState:
    """What a restart starts from: a Sync position, the state reached there, usable SVIDs."""

    position: SyncPosition
    state: SyncState
    svids: tuple[IssuedSvid, ...]


@dataclass(frozen=True, slots=True)
class StateChange:
    """One batch to save: the position, and what changed since the last batch."""

    position: SyncPosition
    entries: tuple[Entry, ...] = ()
    removed: tuple[str, ...] = ()  # entry ids gone, their SVIDs with them
    svids: tuple[IssuedSvid, ...] = ()
    svids_removed: tuple[str, ...] = ()  # entry ids whose SVID is gone
    # Bundles, revocations and CRL as a state without entries; None: unchanged.
    shared: SyncState | None = None
    shared_cleared: bool = False  # the server refused the agent: nothing to keep


class UnusableStateError(Exception):
    """The file cannot be used for this agent (why, for the log)."""


def trust_domain_of(spiffe_id: str) -> str:
    """The trust domain of an agent ID (checked by the server that issued it)."""
    return spiffe_id.removeprefix("spiffe://").split("/", 1)[0]


# ---- rows ------------------------------------------------------------------------------------


def _entry_row(entry: Entry) -> tuple[Any, ...]:
    return (
        entry.id,
        entry.spiffe_id,
        json.dumps(sorted([s.type, s.value] for s in entry.selectors)),
        entry.hint,
        entry.x509_svid_ttl,
        entry.jwt_svid_ttl,
        json.dumps(entry.dns_names),
        entry.created_at,
        entry.revision,
        entry.expires_at,
    )


def _entry(row: Sequence[Any]) -> Entry:
    eid, spiffe_id, selectors, hint, x509_ttl, jwt_ttl, dns, created, revision, expires = row
    return Entry(
        id=eid,
        spiffe_id=spiffe_id,
        selectors=frozenset(Selector(str(t), str(v)) for t, v in json.loads(selectors)),
        hint=hint,
        x509_svid_ttl=int(x509_ttl),
        jwt_svid_ttl=int(jwt_ttl),
        dns_names=tuple(str(d) for d in json.loads(dns)),
        created_at=int(created),
        revision=int(revision),
        expires_at=int(expires),
    )


def _svid_row(svid: IssuedSvid) -> tuple[Any, ...]:
    spiffe_id, dns_names, ttl = svid.issuance_key
    return (
        svid.entry_id,
        svid.spiffe_id,
        svid.chain_der,
        svid.key_der,
        svid.not_before,
        svid.not_after,
        svid.serial_hex,
        json.dumps([spiffe_id, list(dns_names), ttl]),
        svid.received_at,
    )


def _svid(row: Sequence[Any]) -> IssuedSvid:
    entry_id, spiffe_id, chain, key, not_before, not_after, serial, issuance, received = row
    key_spiffe_id, dns_names, ttl = json.loads(issuance)
    if not isinstance(chain, bytes) or not isinstance(key, bytes) or not chain or not key:
        raise ValueError(f"SVID row for entry {entry_id!r} has no chain or key")
    return IssuedSvid(
        entry_id=entry_id,
        spiffe_id=spiffe_id,
        chain_der=chain,
        key_der=key,
        not_before=float(not_before),
        not_after=float(not_after),
        serial_hex=serial,
        issuance_key=(str(key_spiffe_id), tuple(str(d) for d in dns_names), int(ttl)),
        received_at=float(received),
    )


def _shared_blob(shared: SyncState) -> bytes:
    """Bundles, revocations and CRL in the Sync wire form, read back by the Sync decoder."""
    return node_pb2.SyncUpdate(
        bundle=shared.bundle.to_proto(),
        federated_bundles={td: b.to_proto() for td, b in shared.federated.items()},
        revocations=[
            common_pb2.Revocation(
                kind=_REVOCATION_KINDS[kind],
                value=value,
                expires_at=expiry,
                # Whose credential it is: the server says it once, and a verifier's callback
                # after a restart needs it as much as before.
                spiffe_id=shared.revocation_spiffe_ids.get((kind, value), ""),
            )
            for (kind, value), expiry in shared.revocation_expiry.items()
            if kind in _REVOCATION_KINDS
        ],
        crl=list(shared.crl),
    ).SerializeToString()


def _life_left(svid: IssuedSvid, now: float) -> bool:
    life = svid.not_after - svid.not_before
    return svid.not_after - now >= max(life, 0.0) * MIN_LIFE_LEFT and svid.not_after > now


# ---- the file --------------------------------------------------------------------------------


def _owner_only_side_file(side: Path) -> None:
    """A side file (-wal, -shm, -journal) an earlier run left, made owner-only (SQLite gives
    one the database's mode only when it creates it: a 0644 log of a previous release stayed
    0644 with keys in it); one that is a planted link or a FIFO is refused, as the state file
    is: SQLite opens these by name and would follow a link to write the keys where it points."""
    if not regular_file(side, "agent state file"):
        return  # none yet: SQLite creates it with the state file's mode (0600)
    try:
        fd = os.open(side, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # SQLite removed it since (a checkpoint on close by another connection)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class StateStore:
    """The state file. `load` once at start; then `write` batches, one thread at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Private keys live here: owner-only from the first byte. SQLite gives its WAL and
            # shared-memory files the database file's mode.
            # O_NOFOLLOW: the agent never makes this file a link; one planted at its name had
            # the file it named chmodded and written by SQLite. O_NONBLOCK: a FIFO is not
            # waited on. Either is refused with its path (regular_file says what is there).
            flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            try:
                fd = os.open(self.path, flags, 0o600)
            except OSError:
                regular_file(self.path, "agent state file")
                raise
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    regular_file(self.path, "agent state file")
                    raise DataFileUnreadableError(f"agent state file: {self.path} is not a file")
                os.fchmod(fd, 0o600)
            finally:
                os.close(fd)
            for suffix in _SIDE_FILES:
                _owner_only_side_file(self.path.with_name(self.path.name + suffix))
            # isolation_level=None: BEGIN and COMMIT are ours, so a batch is one transaction.
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = FULL")  # a committed batch survives power loss
                db.execute("PRAGMA secure_delete = ON")  # a replaced key is overwritten
                for sql in _TABLES:
                    db.execute(sql)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def discard(self) -> None:
        """Delete the file (and SQLite's side files): the next write starts a fresh one."""
        self.close()
        regular_file(self.path, "agent state file")  # a directory there: said with its path
        for suffix in ("", *_SIDE_FILES):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    # ---- load ------------------------------------------------------------------------------

    def load(self, agent_id: str, trust_domain: str, now: float) -> SavedState | None:
        """The saved state of agent `agent_id`, with the SVIDs worth serving at `now`; None
        (logged, the file deleted) when there is none this agent can use."""
        # Something else at its name (a directory) is refused with its path: discard could
        # not remove it, and the start crashed with a traceback.
        if not regular_file(self.path, "agent state file"):
            return None
        try:
            saved = self._read(agent_id, trust_domain, now)
        except Exception as exc:  # whatever a damaged row raises: start afresh
            # A row SQLite finds sound may still hold what the decoders cannot take, and what
            # they raise for it is an open list (a TTL of 1e400: OverflowError; JSON nested past
            # the recursion limit: RecursionError). Any of it failed every start, for good.
            log.warning(
                "saved agent state not used; starting afresh (a snapshot from the server, "
                "SVIDs minted again)",
                extra={
                    "state_file": str(self.path),
                    "problem": f"{type(exc).__name__}: {str(exc)[:200]}",
                },
            )
            self.discard()
            return None
        log.info(
            "restored saved agent state",
            extra={
                "revision": saved.position.revision,
                "entries": len(saved.state.entries),
                "svids": len(saved.svids),
            },
        )
        return saved

    def saved_bundle(self, agent_id: str, trust_domain: str) -> TrustBundle | None:
        """The trust bundle saved by agent `agent_id`, read alone (its entries and SVIDs are of
        no use: the agent SVID expired); None when there is none it can use. Nothing logged:
        the caller discards the file next."""
        if not regular_file(self.path, "agent state file"):
            return None
        try:
            _meta, shared = self._checked(agent_id, trust_domain)
        except Exception:  # as load: whatever a damaged file raises
            return None
        return shared.bundle

    def _checked(self, agent_id: str, trust_domain: str) -> tuple[Mapping[str, Any], SyncState]:
        """The meta rows and the shared state of a sound file saved by `agent_id`."""
        db = self._connect()
        check = db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise UnusableStateError(f"damaged file: {check[0] if check else 'no answer'}")
        meta: Mapping[str, Any] = dict(db.execute("SELECT key, value FROM meta").fetchall())
        schema = meta.get("schema")
        if schema not in (SCHEMA, _OWNERLESS_SCHEMA):
            raise UnusableStateError(f"schema {meta.get('schema')!r}, expected {SCHEMA}")
        saved_id = meta.get("agent_id")
        if not agent_id or saved_id != agent_id:
            raise UnusableStateError(f"saved by agent {saved_id!r}, this agent is {agent_id!r}")
        if trust_domain and trust_domain_of(agent_id) != trust_domain:
            raise UnusableStateError(f"trust domain {trust_domain_of(agent_id)!r}, not ours")
        blob = meta.get("shared")
        if not isinstance(blob, bytes):
            raise UnusableStateError("no trust bundle saved")
        return meta, sync_state(node_pb2.SyncUpdate.FromString(blob))

    def _read(self, agent_id: str, trust_domain: str, now: float) -> SavedState:
        meta, shared = self._checked(agent_id, trust_domain)
        schema = meta.get("schema")
        db = self._connect()
        entries = tuple(_entry(row) for row in db.execute("SELECT * FROM entries"))
        by_id = {e.id: e for e in entries}
        svids = []
        for row in db.execute("SELECT * FROM svids"):
            svid = _svid(row)
            entry = by_id.get(svid.entry_id)
            if (
                entry is not None
                and entry.issuance_key == svid.issuance_key
                and _life_left(svid, now)
            ):
                svids.append(svid)
        position = SyncPosition(agent_id, int(meta.get("revision", 0)), str(meta.get("epoch", "")))
        if schema == _OWNERLESS_SCHEMA:
            position = SyncPosition(agent_id, 0, "")
        state = SyncState(
            entries=entries,
            bundle=shared.bundle,
            federated=shared.federated,
            revoked_serials=shared.revoked_serials,
            revoked_jtis=shared.revoked_jtis,
            crl=shared.crl,
            revision=position.revision,
            revocation_expiry=shared.revocation_expiry,
            revocation_spiffe_ids=shared.revocation_spiffe_ids,
            epoch=position.epoch,
        )
        return SavedState(position, state, tuple(svids))

    # ---- write -----------------------------------------------------------------------------

    def write(self, change: StateChange) -> None:
        """Save one batch in one transaction (blocking: call it off the event loop)."""
        position = change.position
        meta: list[tuple[str, Any]] = [
            ("schema", SCHEMA),
            ("agent_id", position.agent_id),
            ("revision", position.revision),
            ("epoch", position.epoch),
        ]
        if change.shared is not None:
            meta.append(("shared", _shared_blob(change.shared)))
        gone_svids = [(eid,) for eid in (*change.removed, *change.svids_removed)]
        with self._transaction() as db:
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta)
            if change.shared_cleared:
                db.execute("DELETE FROM meta WHERE key = 'shared'")
            db.executemany("DELETE FROM entries WHERE id = ?", [(e,) for e in change.removed])
            db.executemany("DELETE FROM svids WHERE entry_id = ?", gone_svids)
            db.executemany(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                map(_entry_row, change.entries),
            )
            db.executemany(
                "INSERT OR REPLACE INTO svids VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                map(_svid_row, change.svids),
            )
