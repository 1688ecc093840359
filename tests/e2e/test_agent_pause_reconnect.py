"""After the agent is paused (SIGSTOP) long enough for its workloads' keepalive pings to fail,
they all reconnect at once when it resumes, while the relay still counts their old connections,
closed by the workloads but not yet by the internal server: none may be refused for those."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from svid.workloadapi import AsyncWorkloadApiSource, Backoff
from tests.e2e.agent_process import AgentProcess, agent_stack, create_entry
from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir

pytestmark = pytest.mark.e2e
WORKLOAD = "spiffe://example.org/paused"
SOURCES = 40  # each one connection of this uid, with 2 quiet streams
# Under the agent's per-uid maximum, not twice over: reconnected while the old connections
# still counted, most were refused (as 200 were at the default of 256), at a fifth the cost.
PER_UID = 50
PAUSE = 8.0  # seconds: longer than a ping's interval and timeout (svid/_workload_calls.py)


@pytest.fixture
def stack() -> Iterator[tuple[ServerProcess, AgentProcess]]:
    root = short_tmpdir()
    server = make_server(root).start()
    config = root / "agent.toml"
    config.write_text(f"max_connections_per_uid = {PER_UID}\n")
    with agent_stack(root, server, flags=("--config", str(config))) as agent:
        yield server, agent


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _live(source: AsyncWorkloadApiSource) -> int:
    """How many of the source's streams are up (delivered since they last broke)."""
    return len(source._state._live)


async def _poll(condition: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, what
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _pause_and_resume(agent: AgentProcess, warnings: _Warnings) -> tuple[float, list[str]]:
    address = f"unix://{agent.socket_path}"
    sources = [
        AsyncWorkloadApiSource(address, backoff=Backoff(0.05, 1.0), watch_revocations=False)
        for _ in range(SOURCES)
    ]
    for source in sources:
        await source.start()
    try:
        assert all(await asyncio.gather(*(s.wait_ready(60) for s in sources)))
        await _poll(lambda: all(_live(s) == 2 for s in sources), 30, "streams up")
        assert agent.proc is not None
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            # Until every stream saw its connection break, its ping unanswered.
            await _poll(lambda: not any(_live(s) for s in sources), PAUSE + 30, "pings failed")
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)
        before = len(warnings.lines)
        took = await _poll(
            lambda: all(_live(s) == 2 for s in sources), 60, "reconnected after the pause"
        )
        return took, warnings.lines[before:]
    finally:
        await asyncio.gather(*(s.stop() for s in sources))


def test_a_uids_workloads_reconnect_after_a_pause_without_refusals(
    stack: tuple[ServerProcess, AgentProcess],
) -> None:
    server, agent = stack
    create_entry(server, WORKLOAD, agent.agent_id(), f"unix:uid:{os.getuid()}")
    agent.wait_svid(WORKLOAD)
    warnings = _Warnings()
    logging.getLogger("svid").addHandler(warnings)
    try:
        took, after = asyncio.run(_pause_and_resume(agent, warnings))
    finally:
        logging.getLogger("svid").removeHandler(warnings)
    # Each one was refused (reset) before: 557 warnings, "is the SPIFFE agent running".
    assert after == [], f"{len(after)} warnings, the first: {after[0]}"
    assert "refused a workload connection" not in agent.logs()
    assert took < 5.0
