"""What the operator sees when the server's storage misbehaves, with real `svid-server run`
processes: on a datastore it cannot open (a full file system, a file that is no SQLite
database) the start stops with one line naming the file and the cause, never a traceback; a
disk that fills while it serves is logged once, not once for every call it refuses; a WAL
grown while a reader held it is cut back once the reader is gone; the admin CLI names a full
disk as such; a commit whose fsync failed stops the server (outcome unknown); a datastore
deleted beside its keys is refused at start."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import grpc
import pytest

from server.status import OUTCOME_UNKNOWN_MESSAGE, STORAGE_MESSAGE
from svid._proto import admin_pb2
from tests.e2e.agent_process import create_entry
from tests.e2e.conftest import (
    TRUST_DOMAIN,
    make_server,
    server_command,
    short_tmpdir,
)
from tests.e2e.small_disk import served_from_a_small_disk
from tests.e2e.test_agent_slow_disk import injected_fsyncs
from tests.e2e.test_ledger_fail_closed import set_up

pytestmark = pytest.mark.e2e
TD = f"spiffe://{TRUST_DOMAIN}"
CALLS = 40  # refused in a second or two, well within one log interval
WAL_KEPT = 8 << 20  # what a WAL grown past it may keep once it is reset


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*server_command(), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _refused(done: subprocess.CompletedProcess[str], datastore: Path) -> str:
    """The one line the refused start ends with, checked for what every such line says."""
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"svid-server: error: cannot open the datastore at {datastore}: ")
    return last


def test_a_restart_on_a_full_file_system_names_the_datastore_and_the_full_disk() -> None:
    with served_from_a_small_disk() as (server, disk):
        assert server.stop() == 0
        disk.fill()
        last = _refused(_run(server.config_path), server.data_dir / "datastore.sqlite3")
        # SQLite says "disk I/O error" when it cannot map its shared-memory file: the
        # line says what the operator is to free.
        assert "no space left" in last
        disk.free()
        server.start()  # space back: the same datastore opens
        assert server.stop() == 0


def test_a_datastore_that_is_no_database_is_named_at_start() -> None:
    root = short_tmpdir()
    server = make_server(root)
    try:
        server.data_dir.mkdir(mode=0o700)
        datastore = server.data_dir / "datastore.sqlite3"
        datastore.write_bytes(b"not a database " * 1000)
        last = _refused(_run(server.config_path), datastore)
        assert "not a database" in last
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_full_disk_logs_the_refused_calls_traceback_once_not_once_a_call() -> None:
    """Every call refused while the disk is full failed the same way: the log says so once
    (the ledger's line, and one traceback), not with a ~3.6 KB traceback a call, which the
    agents' retries wrote as fast as they came, onto the very disk that was full."""
    with served_from_a_small_disk() as (server, disk):
        client = set_up(server)
        refused = 0
        with client.stub() as stub:
            disk.fill()
            start = len(server.logs())
            for _ in range(CALLS):
                with pytest.raises(grpc.RpcError) as err:
                    client.jwt(stub)
                assert err.value.code() is grpc.StatusCode.UNAVAILABLE
                refused += 1
            logged = server.logs()[start:]
            disk.free()
            assert client.jwt(stub) == 1  # space back: issued again, no restart
        assert server.stop() == 0
    assert refused == CALLS
    assert logged.count("the ledger cannot commit; every identity decision is refused") == 1
    assert logged.count("server-side error in handler") == 1, len(logged)


def test_the_wal_a_long_reader_let_grow_is_cut_back_once_the_reader_is_gone() -> None:
    """While another process holds a read of the datastore (`audit verify` over a long log, a
    backup), SQLite cannot reset the WAL, and every commit meanwhile grows it: ~2.9 KB a JWT
    minted. Once the reader is gone the WAL is reused, but was never cut back, so that disk
    stayed taken until the server restarted (GBs after a long verify under load)."""
    root = short_tmpdir()
    # Minted as fast as one client asks, past the default per-agent rate.
    server = make_server(
        root, log_level="warning", jwt_rate_per_agent=1e6, jwt_burst_per_agent=10**6
    )
    try:
        server.start()
        client = set_up(server)
        wal = server.data_dir / "datastore.sqlite3-wal"
        datastore = server.data_dir / "datastore.sqlite3"
        reader = sqlite3.connect(f"file:{datastore}?mode=ro", uri=True)
        with client.stub() as stub:
            try:
                reader.execute("BEGIN")
                reader.execute("SELECT count(*) FROM audit_events").fetchone()
                while wal.stat().st_size <= WAL_KEPT * 3 // 2:
                    client.jwts(stub)
            finally:
                reader.close()
            grown = wal.stat().st_size
            # The next commits checkpoint it whole and start it again from its first frame.
            for _ in range(40):
                client.jwts(stub)
                if wal.stat().st_size <= WAL_KEPT:
                    break
            kept = wal.stat().st_size
        assert server.stop() == 0
        assert kept <= WAL_KEPT, f"the WAL grew to {grown} bytes and is still {kept}"
    finally:
        if server.proc is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_the_admin_cli_says_the_disk_is_full_when_it_is() -> None:
    """A bare 'storage unavailable' sends the operator looking everywhere: the admin CLI's line
    says the datastore's disk is full, and names no path."""
    with served_from_a_small_disk() as (server, disk):
        disk.fill()
        done = server.cli(
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/full",
            "--parent-id",
            "spiffe://example.org/svid/agent/a",
            "--selector",
            "unix:uid:1",
            check=False,
        )
        disk.free()
        assert done.returncode == 1, done.stderr
        assert "storage unavailable (the datastore's disk is full)" in done.stderr
        assert str(server.data_dir) not in done.stderr
        assert server.stop() == 0


def test_a_commit_whose_fsync_failed_stops_the_server_and_the_client_hears_outcome_unknown() -> (
    None
):
    """An fsync the disk refused at COMMIT may still leave the WAL frames to be replayed at the
    next open: the server does not answer "nothing was written" and serve on from memory the
    disk may contradict. It logs one critical line naming the datastore and the error, takes
    no write more and exits non-zero; the restart serves what the disk holds."""
    root = short_tmpdir()
    server = make_server(root)
    try:
        server.start()
        assert server.proc is not None
        datastore = server.data_dir / "datastore.sqlite3"
        with injected_fsyncs(server.proc.pid, "error=EIO"):
            with pytest.raises(grpc.RpcError) as failed:
                create_entry(server, f"{TD}/unknown", f"{TD}/svid/agent/a", "unix:uid:1")
            assert server.proc.wait(30) == 1
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        # The first failing commit may be a background job's; every call after it is refused.
        assert failed.value.details() in (OUTCOME_UNKNOWN_MESSAGE, STORAGE_MESSAGE)
        logged = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
        critical = [r["msg"] for r in logged if r.get("level") == "critical"]
        assert len(critical) == 1, critical
        assert str(datastore) in critical[0]
        assert "disk I/O error" in critical[0]
        server.proc = None
        server.start()  # recovery decided: the server serves the disk's state
        listed = server.admin("ListEntries", admin_pb2.ListEntriesRequest()).entries
        with sqlite3.connect(datastore) as db:
            on_disk = {r[0] for r in db.execute("SELECT spiffe_id FROM entries")}
        assert {e.spiffe_id for e in listed} == on_disk
        assert server.stop() == 0
    finally:
        if server.proc is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_svid_server_run_refuses_a_deleted_datastore_beside_its_keys_in_one_line() -> None:
    root = short_tmpdir()
    server = make_server(root)
    try:
        server.start()
        assert server.stop() == 0
        datastore = server.data_dir / "datastore.sqlite3"
        datastore.unlink()
        done = _run(server.config_path)
        assert done.returncode == 1, done.stderr[-2000:]
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"svid-server: error: the datastore {datastore} is missing, ")
        assert "svid-server run --new-datastore" in last
        assert not datastore.exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)
