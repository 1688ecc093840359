"""The server's persistent state behind one interface (`DataStore`, made of role protocols);
SQLite is the default."""

from server.datastore.base import (
    AuditRetentionStore,
    AuditStore,
    CredentialStore,
    DataStore,
    RegistrationStore,
    TaskRecordStore,
)
from server.datastore.errors import (
    AlreadyExistsError,
    ChainMovedError,
    ConflictError,
    DataStoreError,
    NotFoundError,
    StorageError,
)
from server.datastore.records import (
    AttestedAgent,
    Credential,
    Entry,
    JoinToken,
    KeySlot,
    Revocation,
    Selector,
    TaskRecord,
)

__all__ = [
    "AlreadyExistsError",
    "AttestedAgent",
    "AuditRetentionStore",
    "AuditStore",
    "ChainMovedError",
    "ConflictError",
    "Credential",
    "CredentialStore",
    "DataStore",
    "DataStoreError",
    "Entry",
    "JoinToken",
    "KeySlot",
    "NotFoundError",
    "RegistrationStore",
    "Revocation",
    "Selector",
    "StorageError",
    "TaskRecord",
    "TaskRecordStore",
]
