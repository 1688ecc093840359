"""The PostgreSQL test fixture (tests/postgres.py): a missing server skips with the reason and
the DSN without its password, or fails when CI demands PostgreSQL."""

from __future__ import annotations

import pytest

from tests import postgres

UNREACHABLE = "postgresql://svidd:fixture-pw@127.0.0.1:1/svidd"


def test_an_unreachable_server_skips_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(postgres.DSN_ENV, UNREACHABLE)
    monkeypatch.delenv(postgres.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception) as caught:
        postgres.require_server()
    message = str(caught.value)
    assert message.startswith(
        "PostgreSQL not reachable at postgresql://svidd:***@127.0.0.1:1/svidd: "
    )
    assert message.endswith(f"; set {postgres.DSN_ENV}")
    assert "fixture-pw" not in message


def test_an_unreachable_server_fails_when_postgresql_is_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(postgres.DSN_ENV, UNREACHABLE)
    monkeypatch.setenv(postgres.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="SVIDD_REQUIRE_POSTGRES=1"):
        postgres.require_server()


def test_each_test_gets_an_empty_schema_of_its_own(postgres_dsn: str) -> None:
    psycopg = pytest.importorskip("psycopg")
    with psycopg.connect(postgres_dsn) as conn:
        row = conn.execute("SELECT current_schema()").fetchone()
        assert row is not None
        assert row[0].startswith("svidd_test_")
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s", (row[0],)
        ).fetchone()
    assert tables == (0,)


def test_the_server_dsn_must_be_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(postgres.DSN_ENV, "host=127.0.0.1 dbname=test")
    with pytest.raises(pytest.fail.Exception, match="must be a postgresql:// URL"):
        postgres.require_server()
