"""A real `svid-server run` on a SQLite datastore put back from `sqlite3 .backup` taken while it
ran, after an agent was banned: refused, exit 1, saying what the restore undid and what to do;
`run --restored-datastore` then serves from it with the rollback on the audit log."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from server.audit.checkpoint import CHECKPOINT_FILE
from tests.e2e.agent_process import AgentProcess, new_token
from tests.e2e.conftest import make_restartable_server, server_command, short_tmpdir


def test_a_server_restored_from_a_backup_is_refused_until_run_with_restored_datastore() -> None:
    root = short_tmpdir()
    server = make_restartable_server(root)
    agent = AgentProcess(root, server, new_token(server.start()))
    try:
        banned = agent.start().agent_id()
        datastore = server.data_dir / "datastore.sqlite3"
        copy = root / "backup.sqlite3"
        subprocess.run(["sqlite3", str(datastore), f".backup '{copy}'"], check=True, timeout=30)
        server.cli("agent", "ban", "--spiffe-id", banned)
        signed = json.loads(server.cli("audit", "checkpoint", "--output", "json").stdout)
        agent.stop()
        assert server.stop() == 0
        for suffix in ("", "-wal", "-shm"):
            Path(f"{datastore}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(copy, datastore)

        refused = subprocess.run(
            [*server_command(), "run", "--config", str(server.config_path)],
            capture_output=True, text=True, timeout=30, check=False, cwd=root,
        )  # fmt: skip
        assert refused.returncode == 1
        said = refused.stderr
        assert f"names seq {signed['seq']}" in said
        assert "agents banned or evicted since are admitted again" in said
        assert "svid-server run --restored-datastore" in said

        server.start("--restored-datastore")
        kinds = [
            json.loads(line)["kind"]
            for line in server.cli(
                "audit", "export", "--config", str(server.config_path)
            ).stdout.splitlines()
        ]
        assert kinds[-1] == "datastore_restored"
        assert server.stop() == 0
        assert list(server.data_dir.glob(f"{CHECKPOINT_FILE}.before-restore-*"))
        # Recorded: the next start needs no flag.
        server.start()
    finally:
        agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
