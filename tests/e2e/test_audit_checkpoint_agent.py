"""Real `svid-server` and `svid-agent` processes: a signed audit checkpoint made on the server
reaches the agent over Sync, survives an agent restart (even with the server down), the prune
record of a later prune reaches it too, and the agent's copy is an anchor `svid-server audit
verify --anchor` accepts, and that catches the server's log cut back even when the server's own
checkpoint file went with it."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.audit.checkpoint import CHECKPOINT_FILE
from tests.e2e.agent_process import (
    AgentProcess,
    agent_command,
    agent_stack,
    create_entry,
)
from tests.e2e.conftest import (
    ServerProcess,
    make_restartable_server,
    server_command,
    short_tmpdir,
    wait_for,
)

pytestmark = pytest.mark.e2e
AGENT_FILE = "audit-checkpoint.jsonl"


@pytest.fixture
def stack() -> Iterator[tuple[ServerProcess, AgentProcess]]:
    root = short_tmpdir()
    # Fixed ports: the restarted server is found where the agent expects it.
    server = make_restartable_server(root).start()
    with agent_stack(root, server, start=False) as agent:
        yield server, agent


def agent_checkpoint(agent: AgentProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*agent_command(), "audit", "checkpoint", "--data-dir", str(agent.data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def held_lines(agent: AgentProcess) -> list[str]:
    """Every line the agent keeps, oldest first (it keeps each checkpoint it accepted)."""
    done = agent_checkpoint(agent)
    return done.stdout.splitlines() if done.returncode == 0 else []


def held_line(agent: AgentProcess) -> str | None:
    """The newest line the agent keeps."""
    return next(reversed(held_lines(agent)), None)


def last_of(path: Path, kind: str) -> str:
    lines = path.read_text().splitlines()
    return [line for line in lines if json.loads(line).get("kind", "checkpoint") == kind][-1]


def verify(server: ServerProcess, anchor: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*server_command(), "audit", "verify", "--data-dir", str(server.data_dir),
         "--anchor", str(anchor)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def metric(agent: AgentProcess, name: str) -> float | None:
    runtime = agent.runtime()
    with urllib.request.urlopen(f"http://{runtime['metrics_address']}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def test_the_agents_copy_of_the_checkpoint_anchors_the_servers_log(
    stack: tuple[ServerProcess, AgentProcess], tmp_path: Path
) -> None:
    server, agent = stack
    agent.start("--metrics-address", "127.0.0.1:0")
    agent_id = agent.agent_id()
    for n in range(4):  # events on record: an X.509-SVID issued for each
        create_entry(server, f"spiffe://example.org/ckpt/{n}", agent_id)
        agent.wait_svid(f"spiffe://example.org/ckpt/{n}")
    made: dict[str, Any] = json.loads(server.cli("audit", "checkpoint", "--output", "json").stdout)
    line = json.dumps(made, sort_keys=True, separators=(",", ":"))

    # Pushed over Sync; kept as the server wrote it, 0600.
    wait_for(lambda: held_line(agent) == line, 30, "the checkpoint to reach the agent")
    stored = agent.data_dir / AGENT_FILE
    assert stored.read_text().endswith(line + "\n")
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert "events), signed" in agent_checkpoint(agent).stderr

    # Survives a restart: loaded from disk with the server down.
    agent.stop()
    assert server.stop() == 0
    agent.start("--metrics-address", "127.0.0.1:0")
    assert wait_for(
        lambda: metric(agent, "svid_agent_audit_checkpoint_events"), 30, "the checkpoint metric"
    ) == float(made["count"])
    assert held_line(agent) == line
    assert metric(agent, "svid_agent_server_connected") == 0.0

    # Retention pruned the oldest events while the server was down (as an operator's
    # `audit prune` does): a pruned log's start is vouched for only by its prune record.
    pruned = subprocess.run(
        [*server_command(), "audit", "prune", "--through-seq", "1",
         "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert pruned.returncode == 0, pruned.stderr
    # The server back: its newest checkpoint (signed at shutdown) and the prune record reach
    # the agent, kept after the one it held.
    server.start()
    checkpoints = server.data_dir / CHECKPOINT_FILE
    newest = last_of(checkpoints, "checkpoint")
    expected = {line, newest, last_of(checkpoints, "prune")}
    wait_for(
        lambda: expected <= set(held_lines(agent)), 30, "the newest checkpoint and prune record"
    )
    agent.stop()
    assert server.stop() == 0

    anchor = tmp_path / "anchor.jsonl"
    anchor.write_text(agent_checkpoint(agent).stdout)
    ok = verify(server, anchor)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "audit chain OK" in ok.stdout
    assert "matches the checkpoint of" in ok.stdout
    assert "1 events pruned through seq 1 (signed by the prune record of" in ok.stdout

    # Cut the log's tail and fix up its head row (the chain alone cannot tell), and remove
    # the server's own checkpoint file: the agent's copy still names what is missing.
    held = json.loads(newest)
    keep = held["seq"] - 1
    db = sqlite3.connect(server.data_dir / "datastore.sqlite3")
    with db:
        (digest,) = db.execute("SELECT hash FROM audit_events WHERE seq = ?", (keep,)).fetchone()
        db.execute("DELETE FROM audit_events WHERE seq > ?", (keep,))
        db.execute("UPDATE audit_head SET seq = ?, hash = ?", (keep, digest))
    db.close()
    (server.data_dir / CHECKPOINT_FILE).unlink()
    assert verify_without_anchor(server).returncode == 0
    cut = verify(server, anchor)
    assert cut.returncode == 1
    assert f"BROKEN at seq {keep + 1}: truncated" in cut.stdout + cut.stderr
    assert f"but the log ends at seq {keep}" in cut.stdout + cut.stderr


def verify_without_anchor(server: ServerProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*server_command(), "audit", "verify", "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
