"""A datastore gone from beside the state it made: refused, never silently begun anew.

The datastore journals the CA's key slots and holds the audit chain; the key files, the audit
checkpoint key and its signed checkpoints beside it are made by a server running on it. A
missing or empty datastore next to them was deleted, truncated or moved (or `datastore`
points elsewhere by mistake): a start on it made a new CA and an empty audit chain, which
`audit verify` then passed as intact with 0 events, so the deletion of the tamper-evident log
went unnoticed. The operator restores it, points `datastore` at it, or says once, with
`svid-server run --new-datastore`, that beginning anew is meant.

SQLite's is missing or an empty file; PostgreSQL's is a schema recording no migration (dropped,
or emptied: its tables gone), which the store asks about before it creates anything in it.

A valid SQLite file in its place that records neither a CA key nor an audit event (a fresh
store's tables and no row, a first page whose -wal was lost) is no more the datastore than an
empty one, where the audit key or checkpoints are there: a start journals its CA key before it
makes those.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from server.datastore.errors import DataStoreError
from server.datastore.sqlite_audit import connect_read_only

NEW_DATASTORE_FLAG = "--new-datastore"


class DatastoreLostError(DataStoreError):
    """The datastore is missing or empty while files only a server running on one makes are
    there: the message names both and what to do."""


class NewFlagError(DataStoreError):
    """`--new-datastore` given for a datastore that holds what a server wrote: there is
    nothing to begin anew, and the flag, left where starts come from, would begin the next
    lost datastore anew unasked."""


def refuse_new_flag(datastore: str) -> NewFlagError:
    return NewFlagError(
        f"{NEW_DATASTORE_FLAG} was given, but the datastore {datastore} is neither missing "
        "nor empty: there is nothing to begin anew; start without "
        f"{NEW_DATASTORE_FLAG}. It is a flag of one start: left where every start takes it "
        "(a unit file, a supervisor's command), it would begin the next lost datastore anew "
        "unasked, a new CA and an empty audit log"
    )


def is_missing(datastore: Path) -> bool:
    """No datastore at `datastore`, or an empty file (SQLite takes one for a new database)."""
    try:
        return datastore.stat().st_size == 0
    except FileNotFoundError:
        return True


def records_nothing(datastore: Path) -> bool:
    """Whether the SQLite file at `datastore` journals no CA key slot and holds no audit event
    (nor the tables for them): a start journals its CA key before it makes anything else
    beside the datastore, and a datastore whose keys `ca forget-lost-keys` dropped keeps the
    audit event saying so. False where it cannot be read: opening it says why."""
    try:
        with contextlib.closing(connect_read_only(datastore)) as db:
            tables = {row[0] for row in db.execute(_TABLES)}
            return not any(
                db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None  # noqa: S608
                for table in _RECORDS
                if table in tables
            )
    except sqlite3.Error:
        return False


_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table'"
# What a datastore a server ran on holds, in rows of these (fixed names, not input).
_RECORDS = ("key_slots", "audit_events", "audit_head")


def refuse_lost(
    datastore: Path, made_with_one: Sequence[Path], made_after_its_keys: Sequence[Path] = ()
) -> None:
    """DatastoreLostError when `datastore` is missing or empty while any of `made_with_one`
    (files a server makes only with a datastore) exists, or records no CA key while any of
    `made_after_its_keys` (files a start makes once its CA key is journaled) does. Not the key
    files alone for the latter: a crash between a first start's key file and its journal
    leaves one beside a datastore that records nothing, and nothing is lost there."""
    # The caller's first list may hold the second (app.py's does): each path named once.
    found = [
        path for path in dict.fromkeys([*made_with_one, *made_after_its_keys]) if path.exists()
    ]
    if not found:
        return
    if is_missing(datastore):
        state = "missing" if not datastore.exists() else "empty"
    elif any(path.exists() for path in made_after_its_keys) and records_nothing(datastore):
        state = "a SQLite file that records no CA key and no audit event"
    else:
        return
    refuse_new(str(datastore), state, found)


def refuse_new(datastore: str, state: str, made_with_one: Sequence[Path]) -> None:
    """DatastoreLostError when any of `made_with_one` exists beside `datastore` (named as the
    operator may read it: a path, or a DSN without its password), which holds nothing."""
    found = [path for path in made_with_one if path.exists()]
    if not found:
        return
    raise DatastoreLostError(
        f"the datastore {datastore} is {state}, but {', '.join(str(p) for p in found)} "
        "exist: they were made by a server on a datastore that journals this CA and holds "
        "the audit log. Restore the datastore from a backup (or set `datastore` to where "
        f"it is); to begin anew with a new CA and an empty audit log, start once with "
        f"`svid-server run {NEW_DATASTORE_FLAG}`"
    )
