"""Numbered schema migrations. Each runs in the same transaction as the row that records it.

The DDL sticks to types both SQLite and PostgreSQL understand (TEXT, BIGINT, SMALLINT); only
BLOB is SQLite's name (PostgreSQL: BYTEA), so a PostgreSQL backend keeps its own copy of this
list with that one word changed. Never edit a released migration: append a new one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Execute = Callable[[str], object]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Execute], None]


CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)"""


def _initial_schema(execute: Execute) -> None:
    execute("""
        CREATE TABLE entries (
            id TEXT PRIMARY KEY,
            spiffe_id TEXT NOT NULL,
            parent_id TEXT NOT NULL,
            identity_hash TEXT NOT NULL UNIQUE,
            selectors TEXT NOT NULL,
            x509_svid_ttl BIGINT NOT NULL,
            jwt_svid_ttl BIGINT NOT NULL,
            dns_names TEXT NOT NULL,
            hint TEXT NOT NULL,
            admin SMALLINT NOT NULL,
            expires_at BIGINT NOT NULL,
            revision BIGINT NOT NULL,
            created_at BIGINT NOT NULL
        )""")
    execute("CREATE INDEX entries_spiffe_id ON entries (spiffe_id)")
    execute("CREATE INDEX entries_parent_id ON entries (parent_id)")
    execute("""
        CREATE TABLE agents (
            spiffe_id TEXT PRIMARY KEY,
            attestation_type TEXT NOT NULL,
            serial TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            banned SMALLINT NOT NULL,
            attested_at BIGINT NOT NULL,
            selectors TEXT NOT NULL
        )""")
    execute("""
        CREATE TABLE join_tokens (
            token_id TEXT PRIMARY KEY,
            secret_hash BLOB NOT NULL,
            expires_at BIGINT NOT NULL
        )""")
    execute("""
        CREATE TABLE key_slots (
            slot_id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            status TEXT NOT NULL,
            public_der BLOB NOT NULL,
            kid TEXT NOT NULL,
            not_before BIGINT NOT NULL,
            not_after BIGINT NOT NULL,
            created_at BIGINT NOT NULL
        )""")
    execute("""
        CREATE TABLE revocations (
            kind TEXT NOT NULL,
            value TEXT NOT NULL,
            spiffe_id TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            reason TEXT NOT NULL,
            revoked_at BIGINT NOT NULL,
            PRIMARY KEY (kind, value)
        )""")
    execute("CREATE INDEX revocations_expires_at ON revocations (expires_at)")
    execute("""
        CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value BIGINT NOT NULL
        )""")
    execute("INSERT INTO counters (name, value) VALUES ('revision', 0)")
    execute("INSERT INTO counters (name, value) VALUES ('bundle_sequence', 0)")


MIGRATIONS: tuple[Migration, ...] = (Migration(1, "initial schema", _initial_schema),)
