"""An agent's Syncer run in-process against a real server, its attestations counted, and the
throttled line it writes about a refused attestation read back: first at once, then a reminder
after the interval with the attempts since (the refusal tests of each attestor use it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.cache import Cache
from agent_attestor.model import TrustBundle
from agent_attestor.node_client import NodeClient
from agent_attestor.servers import Target
from agent_attestor.sync import OPERATOR_LOG_INTERVAL, Syncer, SyncSettings
from svid._clock import FakeClock
from tests.e2e.conftest import ServerProcess

EACH_TIME = "cannot reach or attest"  # the line of a failure that may pass at the next attempt


def in_process_syncer(
    server: ServerProcess,
    tmp_path: Path,
    clock: FakeClock,
    *,
    join_token: str = "",
    x509pop: tuple[Path, Path] | None = None,
) -> Syncer:
    rt = server.runtime
    pop = None
    if x509pop is not None:
        certs = x509.load_pem_x509_certificates(x509pop[0].read_bytes())
        pop = (certs, load_pem_private_key(x509pop[1].read_bytes(), None))
    settings = SyncSettings(
        (Target(rt["node_address"], rt["attest_address"]),),
        join_token=join_token,
        x509pop=pop,
        bootstrap_root_pem=server.bundle_pem().encode(),
        bootstrap_given=True,
        reconnect_min=0.05,
        reconnect_max=0.05,
        save_retry_first=0.05,
        save_retry_cap=0.2,
    )
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle.der")
    return Syncer(settings, store, Cache(), clock)


class Attempts:
    """Counts the agent's attestations, whatever their outcome."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real_attest = NodeClient.attest

        async def attest(client: NodeClient, **kwargs: object) -> tuple[AgentSvid, TrustBundle]:
            try:
                return await real_attest(client, **kwargs)  # type: ignore[arg-type]
            finally:
                self.count += 1

        monkeypatch.setattr(NodeClient, "attest", attest)


@contextlib.asynccontextmanager
async def running(syncer: Syncer) -> AsyncIterator[asyncio.Task[None]]:
    """`syncer` run on this loop for the block, then cancelled and closed as the agent's
    shutdown does."""
    task = asyncio.create_task(syncer.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await syncer.close()


async def until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 20
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def reminded(
    syncer: Syncer,
    clock: FakeClock,
    attempts: Attempts,
    caplog: pytest.LogCaptureFixture,
    phrase: str,
) -> tuple[logging.LogRecord, logging.LogRecord]:
    """Run `syncer` through six failed attempts and the interval after them: the line with
    `phrase` written at the first attempt and the reminder after the interval."""

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if phrase in r.getMessage()]

    async def scenario() -> None:
        async with running(syncer):
            await until(lambda: attempts.count >= 6, "six attempts")
            assert len(lines()) == 1  # the first at once, the others held back
            clock.advance(OPERATOR_LOG_INTERVAL)
            await until(lambda: len(lines()) == 2, "the reminder")
            said = attempts.count
            await until(lambda: attempts.count >= said + 3, "three attempts more")

    with caplog.at_level(logging.INFO, logger="agent_attestor.sync"):
        asyncio.run(scenario())
    first, reminder = lines()
    assert getattr(first, "times", None) == 1
    # Every attempt up to the reminder, counted once: those held back and its own.
    assert getattr(reminder, "times", 0) >= 5
    assert not [r for r in caplog.records if EACH_TIME in r.getMessage()]
    return first, reminder
