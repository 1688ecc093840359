"""The gRPC health service on the Workload API socket, against a local user who opens a Watch and
grants the agent no HTTP/2 window to answer it.

grpcio's asyncio HealthServicer writes each Watch answer while holding the one lock its `set`
takes too: a write that cannot go out (a client that opens no window) holds that lock for as
long as the client likes. The health service needs no security header and no identity, so any
local user can do this. The agent's `set` then never returns: health stays what it was
(NOT_SERVING for ever, or SERVING while the server refuses the agent), and `stop` awaits
`enter_graceful_shutdown` first, so SIGTERM never stops the agent (no state flush, the socket
left bound) until it is killed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, cast

import pytest
from grpc_health.v1 import health_pb2  # type: ignore[import-untyped]

from agent_attestor.app import HEALTH_SERVICE, AgentApp
from agent_attestor.cache import SyncState
from agent_attestor.config import build_config
from agent_attestor.model import TrustBundle
from tests.agent_attestor.harness import short_tmpdir
from tests.users import NOBODY

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
REPO = Path(__file__).resolve().parents[2]


def _stalled_watch_as_nobody(socket_path: Path) -> subprocess.Popen[str]:
    """A `nobody` process holding a health Watch on the agent's socket that the agent may not
    answer; prints "held" once the agent began answering it, keeps it until stdin closes."""
    code = textwrap.dedent(
        f"""
        import os, sys
        from tests.agent_attestor.raw_h2 import StalledClient
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        client = StalledClient({str(socket_path)!r})
        client.call("/grpc.health.v1.Health/Watch", b"")
        print("held" if client.headers_seen.wait(20) else "not answered", flush=True)
        sys.stdin.read()
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@as_root
def test_another_users_stalled_health_watch_freezes_neither_health_nor_stop() -> None:
    """Fails on main: with the Watch held, health stays NOT_SERVING after the first Sync and
    enter_graceful_shutdown (the first step of the agent's stop) never returns."""
    root = short_tmpdir()
    os.chmod(root, 0o755)
    status_of = health_pb2.HealthCheckResponse

    async def scenario() -> tuple[int, bool]:
        socket_path = root / "public" / "api.sock"
        app = AgentApp(
            build_config({"data_dir": str(root / "agent"), "socket_path": str(socket_path)}, {})
        )
        for service in ("", HEALTH_SERVICE):  # as AgentApp.start
            await app.health.set(service, status_of.NOT_SERVING)
        await app.endpoint.start()
        os.chmod(socket_path.parent, 0o755)
        health_loop = asyncio.create_task(app._health_loop())
        attacker = _stalled_watch_as_nobody(socket_path)
        try:
            assert attacker.stdout is not None
            line = await asyncio.to_thread(attacker.stdout.readline)
            assert line.strip() == "held"
            app.cache.apply_sync(SyncState((), TrustBundle("example.org", (b"ca",))))
            status = status_of.NOT_SERVING
            for _ in range(300):  # 3 s: the loop sets it at once when nothing blocks it
                request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)
                status = (await app.health.Check(request, cast(Any, None))).status
                if status == status_of.SERVING:
                    break
                await asyncio.sleep(0.01)
            try:
                await asyncio.wait_for(app.health.enter_graceful_shutdown(), 5)
                stopped = True
            except TimeoutError:
                stopped = False
            return status, stopped
        finally:
            assert attacker.stdin is not None
            attacker.stdin.close()
            attacker.wait(10)
            health_loop.cancel()
            await app.endpoint.stop(0)

    try:
        status, stopped = asyncio.run(scenario())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert (status, stopped) == (status_of.SERVING, True), (
        f"health {status_of.ServingStatus.Name(status)} after the first Sync, "
        f"graceful shutdown {'returned' if stopped else 'hung'}"
    )
