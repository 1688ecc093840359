# ruff: noqa: S608 - column lists are constants; every value is a bound parameter
"""The statements of the shared audit checkpoints (migration 9), in SQL SQLite (>= 3.24) and
PostgreSQL both run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.datastore.records import AUDIT_COLUMNS, AuditRecord, SealedAuditKey

# The newest record of a kind stands: a later seq, or the same seq signed later. One statement,
# so two servers storing at once cannot put the older one last (rowcount 0: not newer).
SAVE_AUDIT_RECORD = (
    "INSERT INTO audit_records (kind, seq, signed_at, line) "
    "VALUES (:kind, :seq, :signed_at, :line) "
    "ON CONFLICT (kind) DO UPDATE SET seq = excluded.seq, signed_at = excluded.signed_at, "
    "line = excluded.line "
    "WHERE excluded.seq > audit_records.seq "
    "OR (excluded.seq = audit_records.seq AND excluded.signed_at > audit_records.signed_at)"
)
AUDIT_RECORDS = "SELECT kind, seq, signed_at, line FROM audit_records ORDER BY signed_at, kind"

# The first key offered stands; later offers change nothing.
OFFER_AUDIT_KEY = (
    "INSERT INTO audit_signing_key (id, key_id, public_der, sealed_key, created_at) "
    "VALUES (1, :key_id, :public_der, :sealed_key, :created_at) ON CONFLICT DO NOTHING"
)
AUDIT_KEY = "SELECT key_id, public_der, sealed_key, created_at FROM audit_signing_key WHERE id = 1"

# Whole rows after a seq, for a checkpoint that verifies the chain forward from its last one.
AUDIT_ROWS_AFTER = (
    f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_events WHERE seq > :after "
    "ORDER BY seq LIMIT :limit"
)


def record_params(record: AuditRecord) -> dict[str, Any]:
    """SAVE_AUDIT_RECORD's parameters."""
    return {
        "kind": record.kind,
        "seq": record.seq,
        "signed_at": record.signed_at,
        "line": record.line,
    }


def key_params(key: SealedAuditKey) -> dict[str, Any]:
    """OFFER_AUDIT_KEY's parameters."""
    return {
        "key_id": key.key_id,
        "public_der": key.public_der,
        "sealed_key": key.sealed_key,
        "created_at": key.created_at,
    }


def key_from(row: Sequence[Any]) -> SealedAuditKey:
    """The key an AUDIT_KEY row holds."""
    return SealedAuditKey(str(row[0]), bytes(row[1]), bytes(row[2]), int(row[3]))
