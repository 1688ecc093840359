"""A second `svid-agent run` on a running agent's data directory or Workload API socket (the unit
started twice, a config copied for another node) is refused at once, naming what is taken, and
the running agent serves on: the second took the socket over, and removed it (with the first's
runtime file) when it stopped, leaving the first running with no socket."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.e2e.agent_process import agent_stack, create_entry
from tests.e2e.conftest import START_TIMEOUT, make_server, short_tmpdir

pytestmark = pytest.mark.e2e


def _replaced(args: list[str], flag: str, value: str) -> list[str]:
    at = args.index(flag)
    return [*args[: at + 1], value, *args[at + 2 :]]


def test_a_second_agent_on_the_same_data_dir_or_socket_is_refused_and_the_first_serves_on() -> None:
    root = short_tmpdir()
    server = make_server(root).start()
    with agent_stack(root, server) as agent:
        sid = "spiffe://example.org/first"
        create_entry(server, sid, agent.agent_id(), f"unix:uid:{os.getuid()}")
        agent.wait_svid(sid)
        assert agent.proc is not None
        args = [str(arg) for arg in agent.proc.args]  # type: ignore[union-attr]
        other_dir = str(root / "agent-2")
        for second, refusal in (
            (args, f"data_dir: another agent is running on {agent.data_dir} (pid "),
            (
                _replaced(args, "--data-dir", other_dir),
                f"socket_path: another agent is listening on {agent.socket_path}",
            ),
        ):
            done = subprocess.run(
                second,
                cwd=str(root),
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT,
                check=False,
            )
            assert done.returncode == 2, done.stderr
            assert refusal in done.stderr
            assert "Traceback" not in done.stderr
            # The first agent's socket and runtime file are where they were, and it serves.
            assert agent.socket_path.exists()
            assert agent.runtime()["pid"] == agent.proc.pid
            agent.wait_svid(sid)
