"""The few statements only the PostgreSQL backend runs, and `pg`, which turns any statement
(these, queries.py's, ledger_queries.py's: all written with `:name` parameters) into psycopg's
placeholder style at execution."""

from __future__ import annotations

import functools
import math
import re

from server.datastore import ledger_queries as lq
from server.datastore import queries as q
from server.datastore.records import revocation_needed_from

# `:name` not preceded by another ':' (a `::type` cast stays as it is).
_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def pg(sql: str) -> str:
    """`sql` with `:name` parameters as psycopg's `%(name)s` (and any literal % doubled)."""
    return _NAMED.sub(r"%(\1)s", sql.replace("%", "%%"))


# One round trip: the bump and its new value. Every write bumps its counters last, just before
# COMMIT, so the counter row (which serializes writers across servers) is held only that long,
# and no transaction waits for another lock while holding it: no deadlock through the counters.
BUMP_COUNTER = "UPDATE counters SET value = value + 1 WHERE name = :name RETURNING value"

# A NULL filter matches everything; PostgreSQL must be told the type of a parameter it meets
# first in `IS NULL` (the filters are text columns).

# A concurrent insert of the same id waits for the first and then does nothing: rowcount 0.
INSERT_JOIN_TOKEN_UNLESS_EXISTS = q.INSERT_JOIN_TOKEN + " ON CONFLICT DO NOTHING"

# Transaction-scoped advisory locks, one key per job and schema: two servers on one database
# migrate, write entries or prune the audit log one after the other; two schemas (tests) never
# wait on each other.
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended(%s || coalesce(current_schema(), ''), 0))"
LOCK_MIGRATIONS = _LOCK % "'svidd.migrations:'"
LOCK_AUDIT_PRUNE = _LOCK % "'svidd.audit_prune:'"
# Appends to the one audit chain take turns: the head is read, checked and moved under it (a
# row lock would not cover the empty chain, which has no head row to lock).
LOCK_AUDIT_APPEND = _LOCK % "'svidd.audit_append:'"
# Entry writes are admin calls, few and short: taking turns makes each one's checks (stale
# revision, identity clash) exact until its COMMIT, and two batches touching the same
# identities in different orders cannot deadlock on the UNIQUE key.
LOCK_ENTRIES = _LOCK % "'svidd.entries:'"

# One key per agent and schema. A row lock is not fair: a new FOR SHARE gets in ahead of a
# delete or update waiting for the row, so ledger writes overlapping without pause (an agent
# issuing through several servers) would starve its eviction or ban for ever. An advisory lock
# is fair: a request that conflicts with a waiting one queues behind it. So a ledger write
# takes its agents' keys shared (in agent order, before their rows) and a removal takes its
# agent's key exclusive (before the row): the writes that come after a waiting removal wait
# behind it, and find the agent removed. An agent's admission or renewal (its row's write)
# takes the key exclusive too, so the agent's own issuing cannot starve it either.
# The key: hashtextextended('svidd.agent:' || schema || ':' || agent ID, 0).
# :agent_ids sorted; WITH ORDINALITY keeps the locks taken in that order.
SHARE_AGENT_KEYS = (
    "SELECT pg_advisory_xact_lock_shared(hashtextextended("
    "'svidd.agent:' || coalesce(current_schema(), '') || ':' || a.id, 0)) "
    "FROM unnest(CAST(:agent_ids AS text[])) WITH ORDINALITY AS a(id, n) ORDER BY a.n"
)
LOCK_AGENT_KEY = (
    "SELECT pg_advisory_xact_lock(hashtextextended("
    "'svidd.agent:' || coalesce(current_schema(), '') || ':' || :spiffe_id, 0))"
)

# The change feed's rows of one write, numbered from the counter it bumped (BUMP_COUNTER_BY).
COPY_FEED = "COPY feed (revision, at, kind, key) FROM STDIN"
BUMP_COUNTER_BY = "UPDATE counters SET value = value + :n WHERE name = :name RETURNING value"
# Sent at COMMIT (never for a rolled-back write): servers on this schema waiting in wait_feed
# wake up. One channel per database; the payload names the schema, so tests (a schema each)
# and deployments sharing a database tell their notifications apart.
FEED_CHANNEL = "svidd_feed"
_SCHEMA = "coalesce(current_schema(), '')"  # a notification's payload, and what a listener reads
OWN_SCHEMA = f"SELECT {_SCHEMA}"
# The database's clock (postgres_time.py): the time now, not the transaction's start.
DATABASE_NOW = "SELECT extract(epoch FROM clock_timestamp())::float8"
NOTIFY_FEED = f"SELECT pg_notify('{FEED_CHANNEL}', {_SCHEMA})"
LISTEN_FEED = f"LISTEN {FEED_CHANNEL}"
# Revocations actually added (a revocation already there is kept as is, and not fed).
INSERT_REVOCATION_RETURNING = q.INSERT_REVOCATION + " RETURNING kind, value"

TABLES_IN_SCHEMA = (
    "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
)
MIGRATIONS_TABLE = (
    "SELECT 1 FROM information_schema.tables "
    "WHERE table_schema = current_schema() AND table_name = 'schema_migrations'"
)


def copy_into(insert_head: str) -> str:
    """`INSERT INTO t (cols)` (the ledger's *_INTO heads) as the COPY that loads those rows."""
    return "COPY " + insert_head.removeprefix("INSERT INTO ") + " FROM STDIN"


COPY_CREDENTIALS = copy_into(lq.CREDENTIALS_INTO)
COPY_AUDIT_EVENTS = copy_into(lq.AUDIT_EVENTS_INTO)


def needed_from(now: float) -> int:
    """`revocation_needed_from(now)` as the integer that bounds integer expiries alike
    (expires_at >= x exactly when expires_at >= ceil(x)): bound as a float, PostgreSQL would
    compare the BIGINT column as float8 and could not use its index."""
    return math.ceil(revocation_needed_from(now))
