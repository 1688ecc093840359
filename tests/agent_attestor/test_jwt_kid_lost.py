"""A JWT-SVID signed by a key the trust bundle no longer holds is not handed out again from the
agent's JWT cache: the server forgot the key (`forget-lost-keys`) or removed it, so nothing
that reads the bundle verifies the token any more."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from agent_attestor.app import AgentApp
from agent_attestor.cache import SyncDelta, SyncState
from svid._clock import FakeClock
from svid._jwt import split_token
from tests.agent_attestor.data_dir import config_under
from tests.agent_attestor.pki import FakeSigner, LocalCa

WORKLOAD = "spiffe://example.org/w"


def _kid(token: str) -> object:
    return split_token(token).header.get("kid")


def test_a_cached_jwt_svid_whose_key_left_the_bundle_is_minted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was served from the cache until half its life, verifying nowhere."""
    config = config_under(tmp_path)
    clock = FakeClock(start=time.time())
    app = AgentApp(config, clock)
    ca = LocalCa(clock)
    signer = FakeSigner(ca)
    monkeypatch.setattr(app.syncer, "new_jwt", signer.new_jwt)
    old_kid = ca.jwt_kid
    app.cache.apply_sync(SyncState((), ca.bundle()))

    async def scenario() -> None:
        first = await app.jwts.get(WORKLOAD, ["db"], "e", 0)
        assert _kid(first.token) == old_kid
        # Another bundle change that keeps the key (a new X.509 root, say) keeps the token.
        kept = dataclasses.replace(ca.bundle(), sequence=2, x509_authorities=(b"other-root",))
        app.cache.apply_delta(SyncDelta(bundle=kept, revision=2))
        assert await app.jwts.get(WORKLOAD, ["db"], "e", 0) is first
        # The server signs with a new key and the old one leaves the bundle.
        other = LocalCa(clock)
        ca.jwt_kid, ca.jwt_key = other.jwt_kid, other.jwt_key
        app.cache.apply_delta(SyncDelta(bundle=dataclasses.replace(ca.bundle(), sequence=3)))
        assert app.jwts.cached(WORKLOAD, ["db"], "e") is None
        again = await app.jwts.get(WORKLOAD, ["db"], "e", 0)
        assert _kid(again.token) == ca.jwt_kid != old_kid

    asyncio.run(scenario())
    assert signer.jwt_calls == 2
