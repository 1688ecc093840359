"""A real agent that renewed its own SVID after the backup a real `svid-server` is restored
from comes back by itself: the restored record names the certificate it held before, and the
server started with `run --restored-datastore` adopts the newer one it presents (with an
`agent_certificate_adopted` event), where it was refused as superseded and needed a new join
token."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from tests.e2e.agent_process import AgentProcess, create_entry, list_agents, new_token
from tests.e2e.conftest import ServerProcess, make_restartable_server, short_tmpdir, wait_for

# Renewed at 0.4 to 0.6 of its life (TTL and 10 s of back-dating) from its NotBefore: 14 to 26 s
# after its attestation, NotBefore 4 to 16 s after it, past the backup's last write.
AGENT_TTL = 50


def _serial(server: ServerProcess, agent_id: str) -> str | None:
    found = [a.serial for a in list_agents(server) if a.spiffe_id == agent_id]
    return found[0] if found else None


def test_an_agent_renewed_since_the_backup_is_served_by_the_restored_server() -> None:
    root = short_tmpdir()
    server = make_restartable_server(root, agent_svid_ttl=AGENT_TTL)
    agent = AgentProcess(root, server, new_token(server.start()))
    try:
        agent_id = agent.start().agent_id()
        attested = _serial(server, agent_id)
        datastore = server.data_dir / "datastore.sqlite3"
        copy = root / "backup.sqlite3"
        subprocess.run(["sqlite3", str(datastore), f".backup '{copy}'"], check=True, timeout=30)
        renewed = wait_for(
            lambda: (s := _serial(server, agent_id)) != attested and s,
            AGENT_TTL,
            "the agent's renewal",
            interval=0.5,
        )
        renewed_by = time.time()
        # An SVID issued after the backup: audited, so the restored log lacks what was signed.
        workload = "spiffe://example.org/after-backup"
        create_entry(server, workload, agent_id)
        agent.wait_svid(workload)
        assert server.stop() == 0
        # A certificate signed in the second the restored server starts (NotBefore in whole
        # seconds) is not told from one it signed itself, and is not adopted; a real restore
        # comes long after the last renewal.
        wait_for(lambda: time.time() >= int(renewed_by) + 1, 2, "the renewal's second past")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{datastore}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(copy, datastore)

        server.start("--restored-datastore")
        # No new join token: the agent's own reconnection moves its record to what it holds.
        wait_for(lambda: _serial(server, agent_id) == renewed, 30, "its SVID adopted", interval=0.2)
        served = "spiffe://example.org/after-restore"
        create_entry(server, served, agent_id)
        agent.wait_svid(served)
        events = [
            json.loads(line)
            for line in server.cli(
                "audit", "export", "--config", str(server.config_path)
            ).stdout.splitlines()
        ]
        (adopted,) = [e for e in events if e["kind"] == "agent_certificate_adopted"]
        assert (adopted["agent_id"], adopted["credential_id"]) == (agent_id, renewed)
        assert adopted["extra"]["replaced_serial"] == attested  # what the restore brought back
        assert "the server refused this agent" not in agent.logs()  # its SVIDs kept throughout
    finally:
        agent.stop()
        server.stop()
        print("---- agent log ----\n" + agent.logs()[-6000:])
        print("---- server log ----\n" + server.logs()[-6000:])
        shutil.rmtree(root, ignore_errors=True)
