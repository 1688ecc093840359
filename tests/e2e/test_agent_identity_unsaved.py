"""An agent SVID the disk cannot take (full, read-only) right after the server issued it: the
server has spent the join token and recorded the new SVID, so the agent serves with it from
memory, says so once, and saves it as soon as the disk takes it, never attesting again for it.
It dropped it, and then attested with the spent token at every retry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent_attestor import sync
from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.model import TrustBundle
from agent_attestor.node_client import NodeClient
from agent_attestor.sync import Syncer
from svid._clock import FakeClock
from tests.e2e.agent_process import new_token
from tests.e2e.attestation_retries import EACH_TIME, Attempts, in_process_syncer, running, until
from tests.e2e.conftest import make_server, short_tmpdir

pytestmark = pytest.mark.e2e
LOST = "cannot save the attested agent SVID"
TOKEN_REFUSED = "the join token cannot attest this agent"


def _block_the_key(state_dir: Path) -> Path:
    """A directory where the new key is written first: the save fails there as on a full or
    read-only disk (the tests run as root, whom a chmod does not stop)."""
    blocker = state_dir / "key.der.next"
    blocker.mkdir()
    (blocker / "in-the-way").write_text("")
    return blocker


def test_an_attested_svid_the_disk_refuses_is_served_and_saved_once_the_disk_takes_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = short_tmpdir()
    server = make_server(root).start()
    try:
        token = new_token(server)
        syncer = in_process_syncer(server, tmp_path, FakeClock(start=time.time()), join_token=token)
        store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle.der")
        attempts = Attempts(monkeypatch)
        blocker = _block_the_key(tmp_path)

        async def scenario() -> None:
            async with running(syncer):
                await until(lambda: syncer.syncs >= 1, "a Sync message on the unsaved SVID")
                await asyncio.sleep(1.0)  # the save retried (0.05 s to 0.2 s apart) in vain
                assert store.load_svid() is None
                shutil.rmtree(blocker)  # the disk mended
                await until(lambda: store.load_svid() is not None, "the save retried")

        with caplog.at_level(logging.INFO, logger="agent_attestor"):
            asyncio.run(scenario())
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert attempts.count == 1  # the token spent once, never asked for again
    saved, held = store.load_svid(), syncer.agent_svid
    assert saved is not None
    assert held is not None
    assert saved.chain == held.chain  # the SVID the token bought, not another
    (lost,) = [r for r in caplog.records if LOST in r.getMessage()]
    assert lost.levelno == logging.ERROR
    text = lost.getMessage() + " " + " ".join(str(v) for v in lost.__dict__.values())
    assert str(store.svid_path) in text  # where
    assert "Is a directory" in text  # and what the OS said
    for record in caplog.records:
        said = record.getMessage() + " " + " ".join(str(v) for v in record.__dict__.values())
        assert token.partition(".")[2] not in said
        assert TOKEN_REFUSED not in said
        assert EACH_TIME not in said


async def _run_until(syncer: Syncer, predicate: Callable[[], bool], what: str) -> None:
    """Run `syncer` until `predicate` holds, a second of retries (0.05 s apart) more, and stop
    it as the agent does."""
    task = asyncio.create_task(syncer.run())
    try:
        await until(predicate, what)
        await asyncio.sleep(1.0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await syncer.settle(1)
        await syncer.close()


def test_a_restart_with_the_svid_the_token_bought_unsaved_says_why_and_stops_asking(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It asked the server with the spent token at every retry, each refusal saying only that
    the token was never issued, expired or used."""
    root = short_tmpdir()
    server = make_server(root).start()
    try:
        token = new_token(server)
        _block_the_key(tmp_path)
        attempts = Attempts(monkeypatch)

        def refusals() -> list[logging.LogRecord]:
            return [r for r in caplog.records if TOKEN_REFUSED in r.getMessage()]

        with caplog.at_level(logging.INFO, logger="agent_attestor"):
            first = in_process_syncer(
                server, tmp_path, FakeClock(start=time.time()), join_token=token
            )
            asyncio.run(_run_until(first, lambda: first.syncs >= 1, "a Sync message"))
            again = in_process_syncer(
                server, tmp_path, FakeClock(start=time.time()), join_token=token
            )
            asyncio.run(_run_until(again, lambda: bool(refusals()), "the refusal said"))
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert attempts.count == 2  # the restart asked the server once, and then no more
    (refused,) = refusals()
    said = str(getattr(refused, "error", ""))
    assert "an earlier run of this agent" in said
    assert str(tmp_path / "svid.der") in said
    assert token.partition(".")[2] not in said


def test_a_restart_while_the_disk_refuses_a_renewal_comes_back_with_an_svid_the_server_takes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server drops the SVID an agent renewed with at its first call with the new one: used
    from memory while the disk refused it, the new one superseded the one on disk, and a
    restart before the save loaded that one, was refused, and asked to attest again with the
    spent join token (out for good). The new one held unused, the restart goes on with the one
    on disk, which the server still takes, and renews it."""
    monkeypatch.setattr(sync, "RECHECK", 0.05)  # the renewal loop reads the moved clock soon
    root = short_tmpdir()
    server = make_server(root).start()
    try:
        token = new_token(server)
        attempts = Attempts(monkeypatch)
        renewals: list[AgentSvid] = []
        real_renew = NodeClient.renew

        async def renew(client: NodeClient, timeout: float = 30.0) -> tuple[AgentSvid, TrustBundle]:
            svid, bundle = await real_renew(client, timeout=timeout)
            renewals.append(svid)
            return svid, bundle

        monkeypatch.setattr(NodeClient, "renew", renew)
        clock = FakeClock(start=time.time())
        first = in_process_syncer(server, tmp_path, clock, join_token=token)
        store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "bundle.der")

        async def renewed_unsaved() -> None:
            async with running(first):
                await until(lambda: first.syncs >= 1, "a Sync message")
                _block_the_key(tmp_path)
                clock.advance(3600 * 0.6 + 10)  # past its renewal point, whatever its jitter
                await until(lambda: len(renewals) == 1, "the renewal")
                await asyncio.sleep(1.0)  # the save retried in vain, the stream held meanwhile
            await first.settle(1)

        again = in_process_syncer(server, tmp_path, FakeClock(start=time.time()), join_token=token)

        async def restarted() -> None:
            async with running(again):
                await until(lambda: again.syncs >= 1, "a Sync message after the restart")
                shutil.rmtree(tmp_path / "key.der.next")  # the disk mended
                await again.renew_once()  # with the SVID on disk, which the server takes
                await until(lambda: again.syncs >= 2, "a Sync message on the renewed SVID")

        with caplog.at_level(logging.INFO, logger="agent_attestor"):
            asyncio.run(renewed_unsaved())
            loaded = store.load_svid()
            asyncio.run(restarted())
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert attempts.count == 1  # never attested again
    assert len(renewals) == 2  # not renewed again while the first renewal waited
    assert loaded is not None
    assert loaded.chain != renewals[0].chain  # the renewed one never reached the disk
    saved = store.load_svid()
    assert saved is not None
    assert saved.chain == renewals[1].chain
    assert TOKEN_REFUSED not in caplog.text
