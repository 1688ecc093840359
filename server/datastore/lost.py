"""A SQLite datastore gone from beside the state it made: refused, never silently begun anew.

The datastore journals the CA's key slots and holds the audit chain; the key files, the audit
checkpoint key and its signed checkpoints beside it are made by a server running on it. A
missing or empty datastore next to them was deleted, truncated or moved (or `datastore`
points elsewhere by mistake): a start on it made a new CA and an empty audit chain, which
`audit verify` then passed as intact with 0 events, so the deletion of the tamper-evident log
went unnoticed. The operator restores it, points `datastore` at it, or says once, with
`svid-server run --new-datastore`, that beginning anew is meant.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from server.datastore.errors import DataStoreError

NEW_DATASTORE_FLAG = "--new-datastore"


class DatastoreLostError(DataStoreError):
    """The datastore is missing or empty while files only a server running on one makes are
    there: the message names both and what to do."""


def is_missing(datastore: Path) -> bool:
    """No datastore at `datastore`, or an empty file (SQLite takes one for a new database)."""
    try:
        return datastore.stat().st_size == 0
    except FileNotFoundError:
        return True


def refuse_lost(datastore: Path, made_with_one: Sequence[Path]) -> None:
    """DatastoreLostError when `datastore` is missing or empty while any of `made_with_one`
    (files a server makes only with a datastore) exists."""
    found = [path for path in made_with_one if path.exists()]
    if not found or not is_missing(datastore):
        return
    state = "missing" if not datastore.exists() else "empty"
    raise DatastoreLostError(
        f"the datastore {datastore} is {state}, but {', '.join(str(p) for p in found)} "
        "exist: they were made by a server on a datastore that journals this CA and holds "
        "the audit log. Restore the datastore from a backup (or set `datastore` to where "
        f"it is); to begin anew with a new CA and an empty audit log, start once with "
        f"`svid-server run {NEW_DATASTORE_FLAG}`"
    )
