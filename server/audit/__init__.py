"""The tamper-evident audit log: every identity event, hash-chained and durable."""

from server.audit.errors import AuditError, SecretInAuditError
from server.audit.event import GENESIS_HASH, AuditEvent, EventDraft, EventKind
from server.audit.log import AuditLog, Break, VerifyResult
from server.audit.store import AuditStore, EventFilter, Head, SqliteAuditStore

__all__ = [
    "GENESIS_HASH",
    "AuditError",
    "AuditEvent",
    "AuditLog",
    "AuditStore",
    "Break",
    "EventDraft",
    "EventFilter",
    "EventKind",
    "Head",
    "SecretInAuditError",
    "SqliteAuditStore",
    "VerifyResult",
]
