"""The federation half of the PostgreSQL datastore: relationships with foreign trust domains and
their last good bundles (server/federation), in the statements SQLite runs (queries.py).

A mixin of `PostgresDataStore` (server/datastore/postgres.py), which supplies the pool, the
retried transactions and the clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

import psycopg

from server.datastore import queries as q
from server.datastore.errors import AlreadyExistsError, NotFoundError
from server.datastore.postgres_sql import pg
from server.datastore.records import (
    FEED_FOREIGN_BUNDLE,
    FEED_RELATIONSHIP,
    FederationRelationship,
    ForeignBundle,
)
from server.datastore.sqlite_federation import relationship_from, relationship_params

Cursor = psycopg.Cursor[Any]
T = TypeVar("T")


class PostgresFederation:
    """Federation relationships and foreign bundles on the datastore's pool."""

    def _write(self, what: str, work: Callable[[Cursor], T]) -> T:
        raise NotImplementedError  # PostgresDataStore's

    def _rows(self, what: str, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError  # PostgresDataStore's

    def _now(self) -> int:
        raise NotImplementedError  # PostgresDataStore's

    def _append_feed(self, cur: Cursor, kind: str, keys: Iterable[str]) -> None:
        raise NotImplementedError  # PostgresDataStore's

    def create_relationship(self, rel: FederationRelationship) -> FederationRelationship:
        now = self._now()
        stored = replace(rel, created_at=now, updated_at=now)

        def work(cur: Cursor) -> None:
            if cur.execute(pg(q.INSERT_RELATIONSHIP), relationship_params(stored)).rowcount != 1:
                raise AlreadyExistsError(
                    f"a federation relationship with {rel.trust_domain} already exists"
                )
            self._append_feed(cur, FEED_RELATIONSHIP, (rel.trust_domain,))

        self._write("store the federation relationship", work)
        return stored

    def update_relationship(self, rel: FederationRelationship) -> FederationRelationship:
        def work(cur: Cursor) -> FederationRelationship:
            cur.execute(pg(q.SELECT_RELATIONSHIP), {"trust_domain": rel.trust_domain})
            row = cur.fetchone()
            if row is None:
                raise NotFoundError(f"no federation relationship with {rel.trust_domain}")
            created = row[[c.name for c in cur.description or ()].index("created_at")]
            stored = replace(rel, created_at=created, updated_at=max(self._now(), 1))
            cur.execute(pg(q.UPDATE_RELATIONSHIP), relationship_params(stored))
            self._append_feed(cur, FEED_RELATIONSHIP, (rel.trust_domain,))
            return stored

        return self._write("change the federation relationship", work)

    def get_relationship(self, trust_domain: str) -> FederationRelationship:
        rows = self._rows(
            "read the federation relationship",
            q.SELECT_RELATIONSHIP,
            {"trust_domain": trust_domain},
        )
        if not rows:
            raise NotFoundError(f"no federation relationship with {trust_domain}")
        return relationship_from(rows[0])

    def list_relationships(self) -> list[FederationRelationship]:
        rows = self._rows("list federation relationships", q.LIST_RELATIONSHIPS, {})
        return [relationship_from(r) for r in rows]

    def delete_relationship(self, trust_domain: str) -> None:
        def work(cur: Cursor) -> None:
            params = {"trust_domain": trust_domain}
            if cur.execute(pg(q.DELETE_RELATIONSHIP), params).rowcount != 1:
                raise NotFoundError(f"no federation relationship with {trust_domain}")
            self._append_feed(cur, FEED_RELATIONSHIP, (trust_domain,))

        self._write("delete the federation relationship", work)

    def put_foreign_bundle(self, bundle: ForeignBundle, *, over_newer: bool = False) -> bool:
        sql, params = q.foreign_bundle_write(bundle, over_newer)

        def work(cur: Cursor) -> bool:
            # A concurrent write of the same trust domain waits on its row, then compares with
            # what that one stored.
            stored = int(cur.execute(pg(sql), params).rowcount) == 1
            if stored:
                self._append_feed(cur, FEED_FOREIGN_BUNDLE, (bundle.trust_domain,))
            return stored

        return self._write("store the foreign bundle", work)

    def list_foreign_bundles(self) -> list[ForeignBundle]:
        rows = self._rows("list foreign bundles", q.LIST_FOREIGN_BUNDLES, {})
        return [q.foreign_bundle_of(r) for r in rows]

    def delete_foreign_bundle(self, trust_domain: str) -> None:
        def work(cur: Cursor) -> None:
            params = {"trust_domain": trust_domain}
            if cur.execute(pg(q.DELETE_FOREIGN_BUNDLE), params).rowcount != 1:
                raise NotFoundError(f"no bundle for foreign trust domain {trust_domain}")
            self._append_feed(cur, FEED_FOREIGN_BUNDLE, (trust_domain,))

        self._write("delete the foreign bundle", work)
