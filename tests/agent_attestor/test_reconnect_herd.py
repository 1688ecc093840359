"""A real server stopped as a deploy stops it, under an agent holding a live Sync stream: the
agent's first wait is drawn over the herd's window (reconnect.py), not over reconnect_min,
as every agent of that server draws its own at the same moment."""

from __future__ import annotations

import asyncio
import random
import shutil
from pathlib import Path

import pytest

from agent_attestor.agent_store import AgentStore
from agent_attestor.cache import Cache
from agent_attestor.cancel import cancel_all
from agent_attestor.servers import Target
from agent_attestor.sync import Syncer, SyncSettings
from svid._clock import FakeClock
from tests.agent_attestor.harness import LoopThread
from tests.e2e.conftest import wait_for
from tests.server.fixtures import TRUST_DOMAIN, bundle_pem, short_tmpdir, start_server


class _Windows(random.Random):
    """The agent's random source: notes the window of every wait it draws, and waits little
    (the stopped server refuses every retry at once)."""

    def __init__(self) -> None:
        super().__init__(3)
        self.windows: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.windows.append(b)
        return min(b, 0.05)


def test_an_agent_whose_server_stops_under_its_live_stream_waits_over_the_herds_window() -> None:
    """Fails on main: the first wait was drawn over reconnect_min (0.1 s here, 1 s by default),
    so a server's thousands of agents all came back within it."""
    root = short_tmpdir()
    srv = start_server(root)
    stopped = False
    rand = _Windows()
    loop = LoopThread()
    data = short_tmpdir()
    try:
        settings = SyncSettings(
            (Target(srv.runtime.node_address, srv.runtime.attest_address),),
            trust_domain=TRUST_DOMAIN,
            join_token=srv.join_token(),
            bootstrap_root_pem=bundle_pem(srv.bundle()),
            bootstrap_given=True,
            reconnect_min=0.1,
            reconnect_max=4.0,
            rand=rand,
        )
        store = AgentStore(data / "svid.der", data / "key.der", data / "bundle.der")
        syncer = Syncer(settings, store, Cache(), FakeClock(start=srv.clock.now()))
        running = loop.call(lambda: asyncio.ensure_future(syncer.run()))
        try:
            wait_for(lambda: syncer.connected, 20, "the agent's Sync stream")
            assert rand.windows == []
            stopped = True
            srv.stop()  # its streams end (UNAVAILABLE: shutting down), its ports close
            wait_for(lambda: len(rand.windows) >= 2, 20, "the agent's retries")
        finally:
            loop.run(cancel_all([running]))
            loop.run(syncer.close())
            loop.stop()
    finally:
        if not stopped:
            srv.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    first, second = rand.windows[:2]
    assert first == 2.0  # half of reconnect_max: the herd's window
    assert second == 0.2  # the server still gone: the backoff from reconnect_min, doubled


def test_a_server_that_drops_every_stream_after_its_snapshot_is_backed_off_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server crash-looping: each connection's Sync stream comes up (a snapshot applied),
    then ends at once. Every such loss started the backoff afresh, so each agent was back
    within the herd's window (half of reconnect_max) every time, a snapshot each, and never
    backed off to reconnect_max. Now the windows grow to it (none under the herd's)."""
    rand = _Windows()
    settings = SyncSettings(
        (Target("127.0.0.1:1", "127.0.0.1:1"),), reconnect_min=1.0, reconnect_max=10.0, rand=rand
    )
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle.der")
    syncer = Syncer(settings, store, Cache(), FakeClock())

    async def up_then_dropped(self: Syncer) -> None:
        self.syncs += 1  # a snapshot applied: the stream was up
        raise ConnectionError("the server's process exited")

    monkeypatch.setattr(Syncer, "_sync_once", up_then_dropped)

    async def scenario() -> None:
        holding = asyncio.create_task(syncer._hold_stream())
        try:
            while len(rand.windows) < 6:
                await asyncio.sleep(0.01)
        finally:
            await cancel_all([holding])
            await syncer.close()

    asyncio.run(scenario())
    assert rand.windows[:6] == [5.0, 5.0, 5.0, 8.0, 10.0, 10.0]
