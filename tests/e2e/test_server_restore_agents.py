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
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from agent_attestor.rotation import jitter_for, rotation_point
from server.ca.signer import BACKDATE_SECONDS
from svid._der import parse_der_certs
from tests.e2e.agent_process import AgentProcess, create_entry, list_agents, new_token
from tests.e2e.conftest import ServerProcess, make_restartable_server, short_tmpdir, wait_for

# Renewed every 2 to 8 s (0.4 to 0.6 of its life, its 10 s of back-dating included): only a
# certificate signed more than the back-dating after the backup's last write is one the restore
# lost (its NotBefore after that write), and the first such renewal comes within a few seconds
# of that, where a long-lived SVID's one renewal came 14 to 26 s after the attestation.
AGENT_TTL = 20


@dataclass(frozen=True)
class _Serial:
    serial_hex: str


def _serial(server: ServerProcess, agent_id: str) -> str | None:
    found = [a.serial for a in list_agents(server) if a.spiffe_id == agent_id]
    return found[0] if found else None


def _held(agent: AgentProcess) -> x509.Certificate:
    """The agent SVID the agent holds: the one it saved last."""
    return parse_der_certs((agent.data_dir / "agent_svid.der").read_bytes())[0]


def _not_before(cert: x509.Certificate) -> int:
    return int(cert.not_valid_before_utc.timestamp())


def _lost_and_kept(cert: x509.Certificate, written_until: int) -> bool:
    """Signed after the backup's last write, and not about to be renewed (the server stops
    next: the agent holds it through the restore)."""
    serial = format(cert.serial_number, "x")
    renewal = rotation_point(
        cert.not_valid_before_utc.timestamp(),
        cert.not_valid_after_utc.timestamp(),
        jitter_for(_Serial(serial)),
    )
    return _not_before(cert) > written_until and renewal > time.time() + 1.5


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
        written_until = int(
            subprocess.run(
                ["sqlite3", str(copy), "SELECT MAX(at) FROM feed"],
                check=True,
                timeout=30,
                capture_output=True,
                text=True,
            ).stdout
        )
        # An SVID issued after the backup: audited, so the restored log lacks what was signed.
        workload = "spiffe://example.org/after-backup"
        create_entry(server, workload, agent_id)
        agent.wait_svid(workload)
        wait_for(
            lambda: _lost_and_kept(_held(agent), written_until),
            AGENT_TTL * 2,
            "a renewal signed after the backup's last write",
            interval=0.2,
        )
        assert server.stop() == 0
        held = _held(agent)  # what it presents to the restored server
        renewed = format(held.serial_number, "x")
        assert _not_before(held) > written_until
        # A certificate signed in the second the restored server starts (NotBefore in whole
        # seconds) is not told from one it signed itself, and is not adopted; a real restore
        # comes long after the last renewal.
        signed_by = _not_before(held) + BACKDATE_SECONDS + 1
        wait_for(lambda: time.time() >= signed_by, 2, "the renewal's second past")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{datastore}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(copy, datastore)

        server.start("--restored-datastore")
        # No new join token: the agent's own reconnection moves its record to what it holds
        # (and its renewals on from there).
        wait_for(
            lambda: _serial(server, agent_id) not in (attested, None),
            30,
            "its SVID adopted",
            interval=0.2,
        )
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
