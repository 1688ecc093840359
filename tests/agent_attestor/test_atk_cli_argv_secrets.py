"""A JWT-SVID is a bearer credential: `svid-agent api validate jwt` must be able to take it
other than as an argument, since every local user reads a process's argv in
/proc/<pid>/cmdline (and `ps` shows it) while the command runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.agent_attestor.harness import Harness

ROOT = Path(__file__).resolve().parents[2]


def agent_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_attestor.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_validate_jwt_takes_the_token_from_stdin_not_argv(agent: Harness) -> None:
    agent.add_entry("/w")
    sock = ["--socket-path", str(agent.socket_path)]
    fetched = agent_cli("api", "fetch", "jwt", "--audience", "a", "--output", "json", *sock)
    assert fetched.returncode == 0, fetched.stderr
    token = json.loads(fetched.stdout)["svids"][0]["svid"]
    # `-` for stdin, as `entry create --file -` reads its entries: the token never in argv.
    done = agent_cli("api", "validate", "jwt", "--audience", "a", "--svid", "-", *sock, stdin=token)
    assert done.returncode == 0, done.stderr
    assert "spiffe://example.org/w" in done.stdout
