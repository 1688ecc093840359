"""A real PostgreSQL for tests: one fresh schema per test, dropped after it.

The server comes from SVIDD_TEST_POSTGRES_DSN (default: the local one, trust auth). When it
cannot be reached the tests that need it skip and say why, unless SVIDD_REQUIRE_POSTGRES=1
(CI), where that is a failure. The fixture `postgres_dsn` (tests/conftest.py) yields a DSN whose
search_path is the test's own schema: hand it to PostgresDataStore, or to a real server's
`--datastore`.
"""

from __future__ import annotations

import functools
import os
import secrets
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from server.datastore.postgres_dsn import is_postgres_dsn, redact_dsn

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DSN_ENV = "SVIDD_TEST_POSTGRES_DSN"
REQUIRE_ENV = "SVIDD_REQUIRE_POSTGRES"
CONNECT_TIMEOUT = 3


def server_dsn() -> str:
    return os.environ.get(DSN_ENV) or DEFAULT_DSN


def with_search_path(dsn: str, schema: str) -> str:
    """`dsn` (a URL) with `options=-c search_path=<schema>` added."""
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    query = [(k, v) for k, v in query if k != "options"]
    query.append(("options", f"-c search_path={schema}"))
    return urllib.parse.urlunsplit(
        parts._replace(query=urllib.parse.urlencode(query, quote_via=urllib.parse.quote))
    )


@functools.cache
def _unreachable(dsn: str) -> str | None:
    """Why `dsn` cannot be used (None: it can). Asked once per run, not once per test."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install 'svidd[postgres]')"
    try:
        with psycopg.connect(dsn, connect_timeout=CONNECT_TIMEOUT) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        return str(e).strip().splitlines()[0]
    return None


def require_server() -> str:
    """The server's DSN, or skip (fail under SVIDD_REQUIRE_POSTGRES=1) with the reason."""
    dsn = server_dsn()
    if not is_postgres_dsn(dsn):
        # A URL, as the server's `datastore` setting takes: tests hand it to real servers.
        pytest.fail(f"{DSN_ENV} must be a postgresql:// URL, got {redact_dsn(dsn)}")
    reason = _unreachable(dsn)
    if reason is not None:
        message = f"PostgreSQL not reachable at {redact_dsn(dsn)}: {reason}; set {DSN_ENV}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{message} ({REQUIRE_ENV}=1)")
        pytest.skip(message)
    return dsn


@contextmanager
def fresh_schema(dsn: str) -> Iterator[str]:
    """A new empty schema on `dsn`'s server: yields a DSN that works in it; dropped after."""
    import psycopg

    schema = f"svidd_test_{secrets.token_hex(6)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield with_search_path(dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            # A store a test left open holds no lock outside a call; do not hang on one.
            conn.execute("SET lock_timeout = '10s'")
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
