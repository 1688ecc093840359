"""A datastore restored from a backup (sqlite3's backup, pg_dump and pg_restore) behind the
audit checkpoints the server signed of it: the start is refused, saying what is lost and what
to do, until the operator says `--restored-datastore`; that start records the rollback on the
audit log and signs the restored chain anew."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.app import Server
from server.audit import AuditLog
from server.audit.checkpoint import CHECKPOINT_FILE, CheckpointFile, CheckpointSigner
from server.audit.rollback import DatastoreRolledBackError, RestoredFlagError
from server.ca.keys import EC_P256, generate_key
from server.cli import build_parser, main
from server.config import ServerConfig
from server.datastore.postgres_dsn import open_postgres
from server.datastore.sqlite import SqliteDataStore
from svid import MAX_CLOCK_SKEW
from svid._clock import FakeClock
from svid._proto import admin_pb2
from tests import postgres
from tests.server.fixtures import CLOCK_LAG, RunningServer, short_tmpdir, start_server
from tests.server.test_datastore_lost import _schema_of
from tests.server.test_server_postgres import kek_file

# Take the backup; put it back in the datastore's place.
Steps = tuple[Callable[[], None], Callable[[], None]]
Backup = Callable[[ServerConfig, Path], Steps]


def _clock() -> FakeClock:
    return FakeClock(start=time.time() - CLOCK_LAG)


def _sqlite_backup(config: ServerConfig, root: Path) -> Steps:
    """sqlite3's online backup of the running server's file, put back as an operator would:
    the datastore and its -wal and -shm replaced by the copy."""
    copy = root / "backup.sqlite3"

    def take() -> None:
        with (
            contextlib.closing(sqlite3.connect(config.datastore_path)) as db,
            contextlib.closing(sqlite3.connect(copy)) as out,
        ):
            db.backup(out)

    def put_back() -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{config.datastore_path}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(copy, config.datastore_path)

    return take, put_back


def _postgres_backup(config: ServerConfig, root: Path) -> Steps:
    """pg_dump of the running server's schema; put back with the schema dropped and pg_restore."""
    import psycopg

    assert config.datastore_dsn is not None
    schema = _schema_of(config.datastore_dsn)
    dump = root / "backup.dump"

    def take() -> None:
        subprocess.run(
            ["pg_dump", "-Fc", "-n", schema, "-f", str(dump), postgres.server_dsn()], check=True
        )

    def put_back() -> None:
        with psycopg.connect(postgres.server_dsn(), autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
        subprocess.run(["pg_restore", "-d", postgres.server_dsn(), str(dump)], check=True)

    return take, put_back


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[dict[str, str], Backup]]:
    """The server's datastore options for `root`, and how its datastore is backed up."""
    if request.param == "sqlite":
        yield {}, _sqlite_backup
    else:
        dsn = request.getfixturevalue("postgres_dsn")
        yield {"datastore": dsn}, _postgres_backup


def _refused(config: ServerConfig, clock: FakeClock | None = None) -> str:
    with pytest.raises(DatastoreRolledBackError) as refused:
        asyncio.run(Server(config, clock or _clock()).start())
    return str(refused.value)


def _refused_with(error: type[Exception], config: ServerConfig, **flags: bool) -> str:
    """What a start with `flags` was refused with; one that started is stopped, and fails."""

    async def attempt() -> str | None:
        server = Server(config, _clock(), **flags)
        try:
            await server.start()
        except error as refused:
            return str(refused)
        await server.stop()
        return None

    said = asyncio.run(attempt())
    assert said is not None, f"served with {flags}"
    return said


def _key_slots(config: ServerConfig) -> set[tuple[str, str]]:
    """(slot id, status) of every CA and JWT key the datastore journals."""
    clock = _clock()
    dsn = config.datastore_dsn
    store = (
        SqliteDataStore(config.datastore_path, clock) if dsn is None else open_postgres(dsn, clock)
    )
    try:
        return {
            (s.slot_id, s.status) for kind in ("x509", "jwt") for s in store.list_key_slots(kind)
        }
    finally:
        store.close()


def _restored_behind_a_ban(options: dict[str, str], backup: Backup, root: Path) -> ServerConfig:
    """A stopped server whose datastore was put back to a copy taken before it banned an
    agent (its checkpoints signed past the copy): what a restore from backup leaves."""
    if "datastore" in options:
        options = {**options, "key_encryption_key_file": str(kek_file(root))}
    first = start_server(root, **options)
    take, put_back = backup(first.config, root)
    banned = first.attest()
    take()
    first.admin().BanAgent(admin_pb2.BanAgentRequest(spiffe_id=banned.spiffe_id), timeout=10)
    first.stop()
    put_back()
    return first.config


def _events(config: ServerConfig, kind: str) -> list[dict[str, object]]:
    server = RunningServer(config, _clock())
    try:
        return [r for r in server.server.tasks.audit.store.audit_rows() if r["kind"] == kind]
    finally:
        server.stop()


def test_a_datastore_restored_behind_its_checkpoints_is_refused_until_told(
    backend: tuple[dict[str, str], Backup], capsys: pytest.CaptureFixture[str]
) -> None:
    """Started on at once, it readmitted an agent banned after the backup, and appended new
    events at the seqs the checkpoints had signed with other hashes: the audit chain forked,
    said in one log line, and no checkpoint was signed again while the server ran."""
    options, backup = backend
    root = short_tmpdir()
    try:
        config = _restored_behind_a_ban(options, backup, root)
        signed = CheckpointFile(config.data_dir / CHECKPOINT_FILE).last()
        assert signed is not None

        said = _refused(config)
        assert f"names seq {signed.seq}" in said
        assert "restored from a backup" in said
        assert "agents banned or evicted since are admitted again" in said
        # An agent attested again since under an ID the copy holds is adopted, not unknown.
        assert "agents attested since under an agent ID it does not hold are unknown" in said
        assert "--restored-datastore" in said
        # Refused before anything is written: not even the CA's rotation, due here 21 hours on
        # (a backup older than a rotation point), which made and activated new keys in it.
        slots = _key_slots(config)
        assert _refused(config, FakeClock(start=time.time() + 21 * 3600))
        assert _key_slots(config) == slots

        again = RunningServer(config, _clock(), restored_datastore=True)
        try:
            # Its agents' records name the SVIDs of the backup: none is taken as lapsed (its
            # tasks ended) before the newer SVIDs the restore lost have expired.
            window = again.server._restored_window
            assert window is not None
            held = window.restored_at + config.agent_svid_ttl + MAX_CLOCK_SKEW
            assert again.server.tasks.service._lapses_held_until == held
        finally:
            again.stop()
        aside = list(config.data_dir.glob(f"{CHECKPOINT_FILE}.before-restore-*"))
        assert [CheckpointFile(p).last() for p in aside] == [signed]
        restored = _events(config, "datastore_restored")
        assert len(restored) == 1
        assert f'"checkpoint_seq":{signed.seq}' in str(restored[0]["extra"]).replace(" ", "")
        # The restored chain is signed anew, and verifies against what was signed since.
        new = CheckpointFile(config.data_dir / CHECKPOINT_FILE)
        last = new.last()
        assert last is not None
        assert last.seq > int(str(restored[0]["seq"])) - 1
        where = (
            ["--datastore", options["datastore"]]
            if "datastore" in options
            else ["--data-dir", str(config.data_dir)]
        )
        capsys.readouterr()
        assert main(["audit", "verify", *where, "--anchor", str(new.path)]) == 0
        # The old checkpoints still prove what the restore lost.
        assert main(["audit", "verify", *where, "--anchor", str(aside[0])]) != 0
        # A restart on it needs no flag.
        RunningServer(config, _clock()).stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_restored_datastore_written_past_its_checkpoint_is_refused_too() -> None:
    """Served from at once (as before this check), a restored datastore's new events took the
    seqs the checkpoints had signed, with other hashes, and its head passed the last one: not
    behind it any more, but not the chain signed either."""
    root = short_tmpdir()
    try:
        first = start_server(root)
        config = first.config
        take, put_back = _sqlite_backup(config, root)
        take()
        for _ in range(3):
            first.attest()
        first.stop()
        signed = CheckpointFile(config.data_dir / CHECKPOINT_FILE).last()
        assert signed is not None
        put_back()
        clock = _clock()
        store = SqliteDataStore(config.datastore_path, clock)
        log = AuditLog(store, clock)
        while (head := log.head()) is None or head.seq <= signed.seq:
            log.append("node_attestation", agent_id="spiffe://example.org/svid/agent/other")
        store.close()
        said = _refused(config)
        assert f"its event at seq {signed.seq} is not the one signed there" in said
        assert "--restored-datastore" in said
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_datastore_pruned_past_its_last_checkpoint_is_not_a_rollback() -> None:
    """Retention removes the oldest events, never the head: a restart after a prune through
    the last checkpoint's seq (its record naming that hash) starts as any other."""
    root = short_tmpdir()
    try:
        first = start_server(root)
        config = first.config
        first.attest()
        first.stop()
        signed = CheckpointFile(config.data_dir / CHECKPOINT_FILE).last()
        assert signed is not None
        assert signed.seq > 0
        assert main(["audit", "prune", "--through-seq", str(signed.seq),
                     "--data-dir", str(config.data_dir)]) == 0  # fmt: skip
        RunningServer(config, _clock()).stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_run_takes_restored_datastore_as_a_flag_of_its_own() -> None:
    """For one start: a config key would stay set and leave the guard off for good."""
    assert build_parser().parse_args(["run", "--restored-datastore"]).restored_datastore
    assert build_parser().parse_args(["run"]).restored_datastore is False


def test_new_datastore_does_not_take_a_restored_one(
    backend: tuple[dict[str, str], Backup],
) -> None:
    """--new-datastore begins anew on a missing or empty datastore; on a restored one, which
    holds an audit log, it began nothing and served the rollback as --restored-datastore
    does: left in a unit file after the loss of a datastore, it took every restore after
    unasked."""
    options, backup = backend
    root = short_tmpdir()
    try:
        config = _restored_behind_a_ban(options, backup, root)
        said = _refused_with(DatastoreRolledBackError, config, new_datastore=True)
        assert "--restored-datastore" in said
        assert not list(config.data_dir.glob(f"{CHECKPOINT_FILE}.before-restore-*"))
        RunningServer(config, _clock(), restored_datastore=True).stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_restored_datastore_is_refused_where_nothing_was_restored() -> None:
    """A start with --restored-datastore on a datastore that holds the last checkpoint served
    as any start: the flag left in a unit file (or a supervisor's command) after the one
    start it was meant for then took the next restore, or rollback, unasked. A second start
    with it after the one that took the restore is refused too, and a start without it
    serves."""
    root = short_tmpdir()
    try:
        first = start_server(root)
        config = first.config
        take, put_back = _sqlite_backup(config, root)
        take()
        first.attest()
        first.stop()

        said = _refused_with(RestoredFlagError, config, restored_datastore=True)
        assert "holds the last audit checkpoint" in said
        assert "start without --restored-datastore" in said
        assert not list(config.data_dir.glob(f"{CHECKPOINT_FILE}.before-restore-*"))

        put_back()
        RunningServer(config, _clock(), restored_datastore=True).stop()
        assert _refused_with(RestoredFlagError, config, restored_datastore=True)
        RunningServer(config, _clock()).stop()
        assert len(_events(config, "datastore_restored")) == 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_line_of_another_key_after_the_last_checkpoint_does_not_hide_a_restore() -> None:
    """The check read the file's newest line and, signed by another key than the one
    published beside it (or not verifying), checked nothing: one line anyone could append,
    or a corrupt one, let a restored datastore serve unasked. It reads the newest checkpoint
    the published key signed, as the writer does."""
    root = short_tmpdir()
    try:
        first = start_server(root)
        config = first.config
        take, put_back = _sqlite_backup(config, root)
        take()
        first.attest()
        first.stop()
        file = CheckpointFile(config.data_dir / CHECKPOINT_FILE)
        signed = file.last()
        assert signed is not None
        other = CheckpointSigner(generate_key(EC_P256))
        file.append(other.sign(signed.seq + 5, "00" * 32, signed.seq + 5, signed.time + 1))
        put_back()

        said = _refused_with(DatastoreRolledBackError, config)
        assert f"names seq {signed.seq}" in said
    finally:
        shutil.rmtree(root, ignore_errors=True)
