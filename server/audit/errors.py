"""Errors of the audit log, rooted in the svidd exception tree."""

from __future__ import annotations

from server.datastore.errors import StorageError
from svid._errors import SvidError


class AuditError(SvidError):
    """The audit log could not record or read an event; the message names the field or file."""


class SecretInAuditError(AuditError, ValueError):
    """A field value looks like a token or a key; audit events carry serials and jtis only."""


class UnstorableTextError(AuditError, ValueError):
    """A field holds text the log cannot store on every backend: a NUL (PostgreSQL text takes
    none) or a lone surrogate (no UTF-8 encodes it, and the hash is over UTF-8). Refused for
    that caller alone, before its event joins a shared commit."""


class LedgerError(AuditError, StorageError):
    """Credential records and their audit events could not be committed: none of them were,
    and no credential they cover may leave the server. Every caller whose rows were waiting
    for that commit gets this error."""
