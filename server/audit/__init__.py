"""The tamper-evident audit log: every identity event, hash-chained and durable."""

from server.audit.errors import AuditError, LedgerError, SecretInAuditError
from server.audit.event import GENESIS_HASH, AuditEvent, EventDraft, EventKind
from server.audit.log import AuditLog
from server.audit.store import AuditSnapshot, AuditStore, EventFilter, Head, SqliteAuditStore
from server.audit.verify import Anchor, Break, VerifyResult, verify_store

__all__ = [
    "GENESIS_HASH",
    "Anchor",
    "AuditError",
    "AuditEvent",
    "AuditLog",
    "AuditSnapshot",
    "AuditStore",
    "Break",
    "EventDraft",
    "EventFilter",
    "EventKind",
    "Head",
    "LedgerError",
    "SecretInAuditError",
    "SqliteAuditStore",
    "VerifyResult",
    "verify_store",
]
