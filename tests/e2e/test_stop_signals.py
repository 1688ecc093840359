"""SIGHUP (an operator expecting a reload, a closed terminal) stops `svid-agent run` and
`svid-server run` cleanly, as SIGTERM does, saying that nothing is reloaded: left to its default
action it killed each at once, without a line in its log, leaving its socket and runtime file
and skipping its stop (the agent's saved state, the server's final audit checkpoint). One started
with SIGHUP ignored (nohup) keeps it ignored, as it did before; so does one started with SIGINT
ignored (a background job of a non-interactive shell)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.agent_process import agent_stack
from tests.e2e.conftest import make_server, short_tmpdir

pytestmark = pytest.mark.e2e
SAID = "SIGHUP: stopping; nothing is reloaded on a signal"


@pytest.fixture
def sighup_handed_on() -> Iterator[None]:
    """The daemons this test starts get SIGHUP at its default action, as from a terminal: a
    suite run under nohup (or by a supervisor that ignores it) hands every process SIGHUP
    ignored, which exec keeps and the daemons, rightly, keep ignored."""
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.mark.usefixtures("sighup_handed_on")
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


def test_a_daemon_started_with_sigint_ignored_is_not_stopped_by_sigint() -> None:
    # `svid-server run &` in a script: the shell ignores SIGINT for the job so that a Ctrl-C
    # meant for the script's foreground leaves it running; a handler put in its place stopped it.
    root = short_tmpdir()
    server = make_server(root)
    server.sigint_ignored = True
    server.start()  # its stop handlers are in place once it has written its runtime file
    assert server.proc is not None
    # The kernel's view: a handler in its place shows as caught, not ignored (a SIGINT it took
    # would stop it with exit 0 and the same log lines as the SIGTERM below).
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    ignored = int(next(x for x in status.splitlines() if x.startswith("SigIgn:")).split()[1], 16)
    assert ignored & (1 << (signal.SIGINT - 1))
    server.proc.send_signal(signal.SIGINT)
    server.cli("bundle", "show")  # still serving
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0, server.logs()[-3000:]
    assert "server stopped" in server.logs()
