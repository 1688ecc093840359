"""SIGHUP (an operator expecting a reload, a closed terminal) stops `svid-agent run` and
`svid-server run` cleanly, as SIGTERM does, saying that nothing is reloaded: left to its default
action it killed each at once, without a line in its log, leaving its socket and runtime file
and skipping its stop (the agent's saved state, the server's final audit checkpoint). One started
with SIGHUP ignored (nohup) keeps it ignored, as it did before."""

from __future__ import annotations

import signal

import pytest

from tests.e2e.agent_process import agent_stack
from tests.e2e.conftest import make_server, short_tmpdir

pytestmark = pytest.mark.e2e
SAID = "SIGHUP: stopping; nothing is reloaded on a signal"


def test_sighup_stops_the_agent_and_the_server_cleanly_saying_nothing_is_reloaded() -> None:
    root = short_tmpdir()
    server = make_server(root).start()
    with agent_stack(root, server) as agent:
        agent.agent_id()
        runtime_file = agent.data_dir / "agent.json"
        assert agent.runtime()
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        assert agent.proc.wait(20) == 0, agent.logs()[-3000:]
        assert SAID in agent.logs()
        assert "agent stopped" in agent.logs()
        assert not agent.socket_path.exists()
        assert not runtime_file.exists()

        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        assert server.proc.wait(20) == 0, server.logs()[-3000:]
        assert SAID in server.logs()
        assert "server stopped" in server.logs()
        assert not server.admin_socket.exists()
        assert not (server.data_dir / "server.json").exists()


def test_a_daemon_started_under_nohup_is_not_stopped_by_sighup() -> None:
    # nohup hands the daemon SIGHUP ignored so that the terminal it was started from may close;
    # a handler put in its place stopped the daemon when it did.
    root = short_tmpdir()
    server = make_server(root)
    server.nohup = True
    server.start()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    # Pending together, the lower-numbered SIGHUP is taken first: a handler would see it first.
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0, server.logs()[-3000:]
    assert "server stopped" in server.logs()
    assert SAID not in server.logs()
