"""Commands that only read must not migrate a datastore of the previous release (b395c82,
schema 18) when an SRE runs them with this release's binary before the servers are upgraded.

`svid-server audit verify` is documented to never change the datastore, and `ca
forget-lost-keys` without --yes "lists, changes nothing". Both open the datastore through its
backend, which applies every pending migration on opening. Run against a datastore the
previous release's servers still use, they move it to schema 19: the running servers go on
unaware (a mixed-version cluster no one started), and any of them restarted (a crash, a
rollback of the upgrade) now refuses to start, "schema is at version 19, newer than this
server's (18)", with nothing to bring it back.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import psycopg
import pytest

import server.datastore.postgres as postgres_backend
import server.datastore.sqlite as sqlite_backend
from server.ca.sealing import KeyEncryptionKey
from server.datastore.migrations import MIGRATIONS
from server.datastore.postgres import PostgresDataStore
from server.datastore.sqlite import SqliteDataStore
from svid._clock import SystemClock
from tests.e2e.conftest import make_server, server_command, short_tmpdir

pytestmark = pytest.mark.e2e

PREVIOUS_SCHEMA = 18  # the highest migration b395c82 knows
PREVIOUS = tuple(m for m in MIGRATIONS if m.version <= PREVIOUS_SCHEMA)


def _versions_pg(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return sorted(int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations"))


def _versions_sqlite(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return sorted(int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations"))
    finally:
        conn.close()


def test_audit_verify_of_this_release_leaves_a_previous_release_postgres_schema_as_it_is(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The previous release's servers made this schema: its migrations, never edited since.
    monkeypatch.setattr(postgres_backend, "MIGRATIONS", PREVIOUS)
    PostgresDataStore(postgres_dsn, SystemClock()).close()
    monkeypatch.undo()
    assert _versions_pg(postgres_dsn)[-1] == PREVIOUS_SCHEMA

    done = subprocess.run(
        [*server_command(), "audit", "verify", "--datastore", postgres_dsn],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert _versions_pg(postgres_dsn)[-1] == PREVIOUS_SCHEMA, (
        "`audit verify` migrated the shared datastore under the previous release's servers: "
        "none of them can start again"
    )


def test_a_forget_lost_keys_dry_run_leaves_a_previous_release_sqlite_datastore_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = short_tmpdir()
    try:
        server = make_server(root)
        server.data_dir.mkdir(mode=0o700)
        db = server.data_dir / "datastore.sqlite3"
        monkeypatch.setattr(sqlite_backend, "MIGRATIONS", PREVIOUS)
        SqliteDataStore(db, SystemClock()).close()
        monkeypatch.undo()
        assert _versions_sqlite(db)[-1] == PREVIOUS_SCHEMA

        done = subprocess.run(
            [*server_command(), "ca", "forget-lost-keys", "--config", str(server.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=str(root),
        )
        # Nothing lost (no slot at all): it says so; either way it changes nothing.
        assert "Traceback" not in done.stderr, done.stderr
        assert _versions_sqlite(db)[-1] == PREVIOUS_SCHEMA, (
            "the dry run of `ca forget-lost-keys` ('lists, changes nothing') migrated the "
            "datastore: the previous release's server no longer starts on it"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_forget_lost_keys_dry_run_leaves_a_previous_release_postgres_schema_and_says_why(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_backend, "MIGRATIONS", PREVIOUS)
    PostgresDataStore(postgres_dsn, SystemClock()).close()
    monkeypatch.undo()
    root = short_tmpdir()
    try:
        kek = root / "kek"
        KeyEncryptionKey.generate().write_new(kek)
        server = make_server(root, datastore=postgres_dsn, key_encryption_key_file=str(kek))
        done = subprocess.run(
            [*server_command(), "ca", "forget-lost-keys", "--config", str(server.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=str(root),
        )
        assert _versions_pg(postgres_dsn)[-1] == PREVIOUS_SCHEMA
        # It cannot read a schema it does not know, so it refuses, and says what to do.
        assert done.returncode == 1, done.stdout
        latest = MIGRATIONS[-1].version
        assert f"version {PREVIOUS_SCHEMA}, older than this release's ({latest})" in done.stderr
        assert "upgrade every server sharing the datastore first" in done.stderr
        assert "Traceback" not in done.stderr, done.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("action", ["verify", "export"])
def test_audit_verify_and_export_of_this_release_leave_a_previous_release_sqlite_datastore(
    action: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = short_tmpdir()
    try:
        server = make_server(root)
        server.data_dir.mkdir(mode=0o700)
        db = server.data_dir / "datastore.sqlite3"
        monkeypatch.setattr(sqlite_backend, "MIGRATIONS", PREVIOUS)
        SqliteDataStore(db, SystemClock()).close()
        monkeypatch.undo()

        done = subprocess.run(
            [*server_command(), "audit", action, "--config", str(server.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=str(root),
        )
        assert done.returncode == 0, done.stderr
        assert _versions_sqlite(db)[-1] == PREVIOUS_SCHEMA
    finally:
        shutil.rmtree(root, ignore_errors=True)
