from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import postgres

# Loaded in every process of a run, the one that prints the summary included (pytest-xdist).
pytest_plugins = ["tests.fuzz.summary"]


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """A DSN on a real PostgreSQL whose search_path is a fresh schema of this test's own
    (tests/postgres.py); skips, or fails under SVIDD_REQUIRE_POSTGRES=1, when there is none."""
    with postgres.fresh_schema(postgres.require_server()) as dsn:
        yield dsn
