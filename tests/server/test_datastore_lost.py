"""A SQLite datastore deleted or truncated beside the key files and audit checkpoints a server
on it made: the start is refused, naming both, until the operator restores it or says
`--new-datastore`; a first start on a fresh data_dir needs no such word."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.app import Server
from server.audit.checkpoint import CHECKPOINT_FILE, KEY_DIR
from server.cli import build_parser, main
from server.config import ServerConfig
from server.datastore.lost import DatastoreLostError, NewFlagError
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock
from tests import postgres
from tests.server.fixtures import CLOCK_LAG, RunningServer, short_tmpdir, start_server
from tests.server.test_server_postgres import kek_file


@pytest.fixture
def stopped() -> Iterator[ServerConfig]:
    """The config of a server that ran once (its CA keys, audit key and checkpoints made) and
    stopped; its files removed after."""
    root = short_tmpdir()
    try:
        first = start_server(root)
        first.stop()
        yield first.config
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _clock() -> FakeClock:
    return FakeClock(start=time.time() - CLOCK_LAG)


def _refused(config: ServerConfig) -> str:
    with pytest.raises(DatastoreLostError) as refused:
        asyncio.run(Server(config, _clock()).start())
    return str(refused.value)


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_a_datastore_lost_beside_its_key_files_is_refused_naming_both(
    stopped: ServerConfig, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Begun anew, it made a new CA and an empty audit chain that `audit verify` passed as
    intact with 0 events: the deletion of the tamper-evident log went unnoticed."""
    datastore = stopped.datastore_path
    if how == "deleted":
        datastore.unlink()
    else:
        datastore.write_bytes(b"")
    said = _refused(stopped)
    assert f"the datastore {datastore} is {'missing' if how == 'deleted' else 'empty'}" in said
    assert str(stopped.keys_dir) in said
    # Each named once: the audit key and checkpoints are among both kinds of file it checks.
    assert said.count(str(stopped.data_dir / CHECKPOINT_FILE)) == 1
    assert said.count(str(stopped.data_dir / KEY_DIR)) == 1
    assert "--new-datastore" in said
    # Nothing was made in its place: the refusal holds at the next start, and verify too
    # still has no log to call intact.
    assert not datastore.exists() or datastore.stat().st_size == 0
    assert main(["audit", "verify", "--data-dir", str(stopped.data_dir)]) != 0
    capsys.readouterr()
    assert _refused(stopped)


def _replaced(datastore: Path, how: str) -> None:
    """The datastore and its companions removed, and a valid SQLite file put in its place."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{datastore}{suffix}").unlink(missing_ok=True)
    if how == "schema only":  # a fresh store's: every table, no row
        SqliteDataStore(datastore, _clock()).close()
    else:  # a database's first page alone (its -wal lost before the first checkpoint)
        with contextlib.closing(sqlite3.connect(datastore)) as db:
            db.execute("PRAGMA journal_mode = WAL")


@pytest.mark.parametrize("how", ["schema only", "no table"])
def test_a_datastore_replaced_by_one_that_records_nothing_is_refused(
    stopped: ServerConfig, how: str
) -> None:
    """A valid SQLite file in its place (a fresh store's, a first page whose -wal was lost) is
    not the datastore these key files and signed checkpoints were made with any more than an
    empty one: begun on, it made a new CA and an audit chain begun anew."""
    datastore = stopped.datastore_path
    _replaced(datastore, how)
    assert datastore.stat().st_size > 0
    said = _refused(stopped)
    assert (
        f"the datastore {datastore} is a SQLite file that records no CA key and no audit event"
        in said
    )
    assert str(stopped.data_dir / CHECKPOINT_FILE) in said
    assert "--new-datastore" in said
    # --new-datastore begins anew on it, as on a missing one.
    again = RunningServer(stopped, _clock(), new_datastore=True)
    try:
        assert again.bundle().x509_authorities
    finally:
        again.stop()


def test_the_operator_may_begin_anew_with_new_datastore(stopped: ServerConfig) -> None:
    stopped.datastore_path.unlink()
    again = RunningServer(stopped, _clock(), new_datastore=True)
    try:
        assert again.bundle().x509_authorities
    finally:
        again.stop()
    assert stopped.datastore_path.stat().st_size > 0


def test_run_takes_new_datastore_as_a_flag_of_its_own() -> None:
    """For one start: a config key would stay set and leave the guard off for good."""
    args = build_parser().parse_args(["run", "--new-datastore"])
    assert args.new_datastore is True
    assert build_parser().parse_args(["run"]).new_datastore is False


def test_a_restart_beside_the_datastore_and_a_first_start_need_no_flag() -> None:
    root = short_tmpdir()
    try:
        start_server(root).stop()  # a fresh data_dir
        start_server(root).stop()  # the datastore there
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- PostgreSQL ----------------------------------------------------------------------------------


def _schema_of(dsn: str) -> str:
    options = urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query)["options"][0]
    return options.rpartition("search_path=")[2]


def _tables(dsn: str) -> list[str]:
    import psycopg

    with psycopg.connect(postgres.server_dsn(), autocommit=True) as admin:
        rows = admin.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (_schema_of(dsn),),
        ).fetchall()
    return [str(r[0]) for r in rows]


@pytest.fixture
def stopped_on_postgres(postgres_dsn: str) -> Iterator[ServerConfig]:
    """As `stopped`, its datastore the test's PostgreSQL schema."""
    root = short_tmpdir()
    try:
        first = start_server(
            root, datastore=postgres_dsn, key_encryption_key_file=str(kek_file(root))
        )
        first.stop()
        yield first.config
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("how", ["emptied", "dropped"])
def test_a_postgresql_schema_lost_beside_its_key_files_is_refused_naming_both(
    stopped_on_postgres: ServerConfig, postgres_dsn: str, how: str
) -> None:
    """As SQLite's: begun anew, it made a new CA and an empty audit chain in the schema."""
    import psycopg

    schema = _schema_of(postgres_dsn)
    with psycopg.connect(postgres.server_dsn(), autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        if how == "emptied":
            admin.execute(f"CREATE SCHEMA {schema}")
    try:
        said = _refused(stopped_on_postgres)
        assert "the datastore postgresql://" in said
        assert schema in said  # the DSN, its search_path naming the schema
        # Its CA keys are sealed in the datastore (a KEK): the audit key and checkpoints stay.
        assert str(stopped_on_postgres.data_dir / KEY_DIR) in said
        assert str(stopped_on_postgres.data_dir / CHECKPOINT_FILE) in said
        assert "--new-datastore" in said
        if how == "emptied":
            assert _tables(postgres_dsn) == []  # nothing made in its place
            assert _refused(stopped_on_postgres)
    finally:
        with psycopg.connect(postgres.server_dsn(), autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")  # the fixture drops it


def test_the_operator_may_begin_a_postgresql_schema_anew_with_new_datastore(
    stopped_on_postgres: ServerConfig, postgres_dsn: str
) -> None:
    import psycopg

    schema = _schema_of(postgres_dsn)
    with psycopg.connect(postgres.server_dsn(), autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.execute(f"CREATE SCHEMA {schema}")
    again = RunningServer(stopped_on_postgres, _clock(), new_datastore=True)
    try:
        assert again.bundle().x509_authorities
    finally:
        again.stop()
    assert "schema_migrations" in _tables(postgres_dsn)


def test_a_restart_on_its_postgresql_schema_and_a_first_start_need_no_flag(
    postgres_dsn: str,
) -> None:
    root = short_tmpdir()
    shared = {"datastore": postgres_dsn, "key_encryption_key_file": str(kek_file(root))}
    try:
        start_server(root, **shared).stop()  # a fresh schema and data_dir
        start_server(root, **shared).stop()  # the schema there
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_new_datastore_on_a_datastore_a_server_wrote_is_refused(
    request: pytest.FixtureRequest, backend: str
) -> None:
    """It started as if not given: left in a unit file after its one start, it began the next
    lost datastore anew unasked (a new CA, an empty audit log), the very start its refusal
    guards. As --restored-datastore is refused where nothing was restored."""
    config: ServerConfig = request.getfixturevalue(
        "stopped" if backend == "sqlite" else "stopped_on_postgres"
    )

    async def attempt() -> str | None:
        server = Server(config, _clock(), new_datastore=True)
        try:
            await server.start()
        except NewFlagError as refused:
            return str(refused)
        await server.stop()
        return None

    said = asyncio.run(attempt())
    assert said is not None, "started with --new-datastore on a datastore a server wrote"
    assert f"the datastore {config.datastore_shown} is neither missing nor empty" in said
    assert "start without --new-datastore" in said
    # Refused before anything was written: a start without the flag serves it.
    again = RunningServer(config, _clock())
    try:
        assert again.bundle().x509_authorities
    finally:
        again.stop()
