"""End to end: a real server prunes its audit log on schedule while it issues; `audit verify`
against the pinned key passes throughout, and after kill -9 and a restart."""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import pytest

from server.audit.checkpoint import CHECKPOINT_FILE, PUBLIC_KEY_FILE
from tests.e2e.conftest import make_server, server_command, short_tmpdir, wait_for
from tests.e2e.issuance_load import IssuanceLoad

pytestmark = pytest.mark.e2e
KEEP = 300


def _base(db: Path) -> int:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT seq FROM audit_base").fetchone()
    except sqlite3.OperationalError:  # not migrated yet
        row = None
    finally:
        con.close()
    return 0 if row is None else int(row[0])


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_a_live_server_prunes_while_issuing_and_stays_verifiable() -> None:
    root = short_tmpdir()
    server = make_server(
        root,
        audit_checkpoint_interval=0.2,
        audit_prune_interval=0.2,
        audit_max_events=KEEP,
        x509_rate_per_agent=0,
        jwt_rate_per_agent=0,
        signing_threads=1,
        signing_processes=0,
    )
    server.start()
    db = server.data_dir / "datastore.sqlite3"
    # The key as shipped off the host at first start, before anything was pruned.
    pinned = root / "shipped.pub.pem"
    pinned.write_bytes((server.data_dir / PUBLIC_KEY_FILE).read_bytes())
    verify = [
        *server_command(), "audit", "verify", "--data-dir", str(server.data_dir),
        "--anchor", str(server.data_dir / CHECKPOINT_FILE), "--anchor-key", str(pinned),
    ]  # fmt: skip
    load: IssuanceLoad | None = None
    try:
        load = IssuanceLoad(server).start()
        wait_for(lambda: _base(db) > 2000, 60, "the server to prune past seq 2000")
        for _ in range(3):
            done = _run(verify)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "audit chain OK" in done.stdout
            assert "events pruned through seq" in done.stdout
            assert "(signed by the prune record of" in done.stdout or "cut short" in done.stdout
        at_verify = load.issued
        wait_for(lambda: load.issued > at_verify + 100, 30, "issuance to go on")
        assert not load.errors, load.errors
        # kill -9 under load, wherever the pruner is.
        server.kill9()
        load.stop()
        done = _run(verify)
        assert done.returncode == 0, done.stdout + done.stderr
        server.start()
        assert server.stop() == 0
    finally:
        if load is not None:
            load.stop()
        if server.proc is not None:
            server.stop()
    done = _run(verify)
    assert done.returncode == 0, done.stdout + done.stderr
    con = sqlite3.connect(db)
    sql = "SELECT COUNT(*), (SELECT seq FROM audit_head) FROM audit_events"
    kept, head = con.execute(sql).fetchone()
    con.close()
    assert head > 2000 + KEEP
    # Bounded: the newest KEEP plus whatever arrived within one prune interval of the last run.
    assert kept < head / 2, (kept, head)
