"""The federation half of the SQLite datastore: relationships with foreign trust domains and
the last good bundle of each (server/federation).

A mixin of `SqliteDataStore` (server/datastore/sqlite.py), which supplies the connection, the
lock and the transactions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

import sqlite_utils

from server.datastore import queries as q
from server.datastore.errors import AlreadyExistsError, NotFoundError
from server.datastore.records import (
    FEED_FOREIGN_BUNDLE,
    FEED_RELATIONSHIP,
    FederationRelationship,
    ForeignBundle,
)


def relationship_from(row: Mapping[str, Any]) -> FederationRelationship:
    return FederationRelationship(
        trust_domain=row["trust_domain"],
        endpoint_url=row["endpoint_url"],
        profile=row["profile"],
        endpoint_spiffe_id=row["endpoint_spiffe_id"],
        ca_file=row["ca_file"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def relationship_params(rel: FederationRelationship) -> dict[str, Any]:
    return {
        "trust_domain": rel.trust_domain,
        "endpoint_url": rel.endpoint_url,
        "profile": rel.profile,
        "endpoint_spiffe_id": rel.endpoint_spiffe_id,
        "ca_file": rel.ca_file,
        "created_at": rel.created_at,
        "updated_at": rel.updated_at,
    }


class SqliteFederation:
    """Federation relationships and foreign bundles on the datastore's connection."""

    def _transaction(self) -> AbstractContextManager[sqlite_utils.Database]:
        raise NotImplementedError  # SqliteDataStore's

    def _rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        raise NotImplementedError  # SqliteDataStore's

    def _now(self) -> int:
        raise NotImplementedError  # SqliteDataStore's

    def _append_feed(self, db: sqlite_utils.Database, kind: str, keys: Iterable[str]) -> None:
        raise NotImplementedError  # SqliteDataStore's

    def create_relationship(self, rel: FederationRelationship) -> FederationRelationship:
        now = self._now()
        stored = replace(rel, created_at=now, updated_at=now)
        with self._transaction() as db:
            if db.execute(q.INSERT_RELATIONSHIP, relationship_params(stored)).rowcount != 1:
                raise AlreadyExistsError(
                    f"a federation relationship with {rel.trust_domain} already exists"
                )
            self._append_feed(db, FEED_RELATIONSHIP, (rel.trust_domain,))
        return stored

    def update_relationship(self, rel: FederationRelationship) -> FederationRelationship:
        with self._transaction() as db:
            rows = list(db.query(q.SELECT_RELATIONSHIP, {"trust_domain": rel.trust_domain}))
            if not rows:
                raise NotFoundError(f"no federation relationship with {rel.trust_domain}")
            stored = replace(rel, created_at=rows[0]["created_at"], updated_at=max(self._now(), 1))
            db.execute(q.UPDATE_RELATIONSHIP, relationship_params(stored))
            self._append_feed(db, FEED_RELATIONSHIP, (rel.trust_domain,))
        return stored

    def get_relationship(self, trust_domain: str) -> FederationRelationship:
        rows = self._rows(q.SELECT_RELATIONSHIP, {"trust_domain": trust_domain})
        if not rows:
            raise NotFoundError(f"no federation relationship with {trust_domain}")
        return relationship_from(rows[0])

    def list_relationships(self) -> list[FederationRelationship]:
        return [relationship_from(r) for r in self._rows(q.LIST_RELATIONSHIPS)]

    def delete_relationship(self, trust_domain: str) -> None:
        with self._transaction() as db:
            if db.execute(q.DELETE_RELATIONSHIP, {"trust_domain": trust_domain}).rowcount != 1:
                raise NotFoundError(f"no federation relationship with {trust_domain}")
            self._append_feed(db, FEED_RELATIONSHIP, (trust_domain,))

    def put_foreign_bundle(self, bundle: ForeignBundle, *, over_newer: bool = False) -> bool:
        with self._transaction() as db:
            sql, params = q.foreign_bundle_write(bundle, over_newer)
            stored = db.execute(sql, params).rowcount == 1
            if stored:
                self._append_feed(db, FEED_FOREIGN_BUNDLE, (bundle.trust_domain,))
            return stored

    def list_foreign_bundles(self) -> list[ForeignBundle]:
        return [q.foreign_bundle_of(r) for r in self._rows(q.LIST_FOREIGN_BUNDLES)]

    def delete_foreign_bundle(self, trust_domain: str) -> None:
        with self._transaction() as db:
            if db.execute(q.DELETE_FOREIGN_BUNDLE, {"trust_domain": trust_domain}).rowcount != 1:
                raise NotFoundError(f"no bundle for foreign trust domain {trust_domain}")
            self._append_feed(db, FEED_FOREIGN_BUNDLE, (trust_domain,))
