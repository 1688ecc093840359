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


def _watches_as_nobody(socket_path: Path, count: int) -> int:
    """How many health Watch streams a `nobody` process gets answered on one connection."""
    code = textwrap.dedent(
        f"""
        import os, grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        channel = grpc.insecure_channel("unix:{socket_path}")
        stub = health_pb2_grpc.HealthStub(channel)
        streams, answered = [], 0
        for _ in range({count}):
            stream = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
            streams.append(stream)
            try:
                next(stream)
                answered += 1
            except grpc.RpcError:
                pass
        print(answered, flush=True)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip().splitlines()[-1])


@as_root
def test_health_watches_count_against_the_uids_stream_maximum() -> None:
    """Fails on main: a uid at its max_streams_per_uid still opens health Watch streams, up to
    100 a connection on 256 connections, without a security header or an identity (the
    budget exists because 25,000 streams held 650 MB of the agent's memory)."""
    root = short_tmpdir()
    os.chmod(root, 0o755)

    async def scenario() -> int:
        socket_path = root / "public" / "api.sock"
        app = AgentApp(
            build_config(
                {
                    "data_dir": str(root / "agent"),
                    "socket_path": str(socket_path),
                    "max_streams_per_uid": 4,
                },
                {},
            )
        )
        await app.endpoint.start()
        os.chmod(socket_path.parent, 0o755)
        try:
            return await asyncio.to_thread(_watches_as_nobody, socket_path, 20)
        finally:
            await app.endpoint.stop(0)

    try:
        answered = asyncio.run(scenario())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert answered <= 4, f"{answered} health Watch streams held by a uid allowed 4 streams"


@as_root
def test_a_stalled_health_watch_gives_its_stream_back_when_its_connection_goes() -> None:
    """A Watch whose answer cannot go out (no HTTP/2 window) is suspended at its write, not in
    its own code: once its client goes, its stream must still count no more against the uid's
    max_streams_per_uid, or each such Watch leaks a stream of the budget for good."""
    root = short_tmpdir()
    os.chmod(root, 0o755)
    status_of = health_pb2.HealthCheckResponse

    async def scenario() -> tuple[int, int]:
        socket_path = root / "public" / "api.sock"
        app = AgentApp(
            build_config({"data_dir": str(root / "agent"), "socket_path": str(socket_path)}, {})
        )
        await app.health.set("", status_of.NOT_SERVING)
        await app.endpoint.start()
        os.chmod(socket_path.parent, 0o755)
        attacker = _stalled_watch_as_nobody(socket_path)
        try:
            assert attacker.stdout is not None
            line = await asyncio.to_thread(attacker.stdout.readline)
            assert line.strip() == "held"
            await app.health.set("", status_of.SERVING)  # a second answer, held at its write
            await asyncio.sleep(0.5)
            held = app.health._streams.held_by(NOBODY)
        finally:
            assert attacker.stdin is not None
            attacker.stdin.close()
            await asyncio.to_thread(attacker.wait, 10)
        for _ in range(500):  # 5 s
            if app.health._streams.held_by(NOBODY) == 0:
                break
            await asyncio.sleep(0.01)
        left = app.health._streams.held_by(NOBODY)
        await app.endpoint.stop(0)
        return held, left

    try:
        held, left = asyncio.run(scenario())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert (held, left) == (1, 0), f"held {held} while the Watch lived, {left} after it went"
