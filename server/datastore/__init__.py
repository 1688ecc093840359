"""The server's persistent state behind one interface (`DataStore`); SQLite is the default."""

from server.datastore.base import DataStore
from server.datastore.errors import (
    AlreadyExistsError,
    ConflictError,
    DataStoreError,
    NotFoundError,
)
from server.datastore.records import (
    AttestedAgent,
    Entry,
    JoinToken,
    KeySlot,
    Revocation,
    Selector,
)

__all__ = [
    "AlreadyExistsError",
    "AttestedAgent",
    "ConflictError",
    "DataStore",
    "DataStoreError",
    "Entry",
    "JoinToken",
    "KeySlot",
    "NotFoundError",
    "Revocation",
    "Selector",
]
