"""End to end: `audit verify --anchor` against a real server under issuance load, the
on-demand checkpoint over the admin socket, and the checkpoint written at shutdown."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from server.audit.checkpoint import CHECKPOINT_FILE
from tests.e2e.conftest import make_server, server_command, short_tmpdir, wait_for
from tests.e2e.issuance_load import IssuanceLoad

pytestmark = pytest.mark.e2e
VERIFIERS = 3
ROUNDS = 2


def _last_checkpoint(path: Path) -> dict[str, object] | None:
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else None


def test_verify_on_a_live_server_under_load_reports_no_false_alarm() -> None:
    root = short_tmpdir()
    server = make_server(
        root,
        audit_checkpoint_interval=0.2,
        x509_rate_per_agent=0,
        jwt_rate_per_agent=0,
        signing_threads=1,
        signing_processes=0,
    )
    server.start()
    load: IssuanceLoad | None = None
    checkpoints = server.data_dir / CHECKPOINT_FILE
    try:
        load = IssuanceLoad(server).start()
        # Load is on: a checkpoint past the first hundred events exists.
        wait_for(
            lambda: (cp := _last_checkpoint(checkpoints)) is not None and cp["seq"] > 100,  # type: ignore[operator]
            30,
            "a checkpoint under load",
        )
        verify = [
            *server_command(), "audit", "verify", "--data-dir", str(server.data_dir),
            "--anchor", str(checkpoints),
        ]  # fmt: skip
        for _ in range(ROUNDS):
            verifiers = [
                subprocess.Popen(verify, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(VERIFIERS)
            ]
            for proc in verifiers:
                out, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err
                assert "audit chain OK" in out
                assert "matches the checkpoint of" in out
        assert not load.errors, load.errors
        assert load.running()  # the load ran throughout

        on_demand = server.cli("audit", "checkpoint").stdout
        assert on_demand.startswith("audit checkpoint: seq ")
        line = json.loads(server.cli("audit", "checkpoint", "--output", "json").stdout)
        assert line["seq"] >= int(on_demand.split()[3])
    finally:
        if load is not None:
            load.stop()
        if server.proc is not None:
            assert server.stop() == 0
    # The shutdown checkpoint names the final head: nothing recorded after it.
    db = sqlite3.connect(server.data_dir / "datastore.sqlite3")
    head = db.execute("SELECT seq, hash FROM audit_head").fetchone()
    db.close()
    last = _last_checkpoint(checkpoints)
    assert last is not None
    assert (last["seq"], last["hash"]) == head
    done = server.cli(
        "audit", "verify", "--data-dir", str(server.data_dir), "--anchor", str(checkpoints)
    )
    assert f"audit chain OK: {head[0]} events" in done.stdout
