"""What `svid-agent run` writes where a log shipper reads it (stdout and stderr merged, as in a
container's log): with JSON logs, the default, every line is a JSON record, and the one saying
the agent started names the SPIFFE_ENDPOINT_SOCKET to export, as the server's "server started"
names its addresses. It printed that as a plain line on stdout, the one line not JSON. With text
logs the line is still printed, for whoever started the agent by hand (its test is in
test_agent_single_instance.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.e2e.agent_process import AgentProcess, agent_stack
from tests.e2e.conftest import START_TIMEOUT, make_server, short_tmpdir, wait_for

pytestmark = pytest.mark.e2e


def _lines(agent: AgentProcess) -> list[str]:
    """The whole lines written so far (the last may be a line being written)."""
    return agent.logs().split("\n")[:-1]


def _started(agent: AgentProcess) -> dict[str, Any] | None:
    for line in _lines(agent):
        if '"agent started"' in line:
            record: dict[str, Any] = json.loads(line)
            return record
    return None


def _not_json(line: str) -> bool:
    try:
        return not isinstance(json.loads(line), dict)
    except ValueError:
        return True


def test_with_json_logs_every_line_the_agent_writes_is_a_json_record() -> None:
    root = short_tmpdir()
    server = make_server(root).start()
    with agent_stack(root, server) as agent:
        started = wait_for(lambda: _started(agent), START_TIMEOUT, "the agent started record")
        assert started["spiffe_endpoint_socket"] == f"unix://{agent.socket_path.resolve()}"
        assert [line for line in _lines(agent) if _not_json(line)] == []
