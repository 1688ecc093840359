"""A revocation outlives its credential's `exp` by the largest leeway a verifier may apply.

A verifier accepts a JWT until exp + its leeway; if the server pruned the revocation at exp, the
revoked token would be good again for that tail. A real store (every backend), real ES256 tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.datastore import DataStore, Revocation
from server.events import ChangeNotifier
from server.state import ServerState
from svid import (
    MAX_CLOCK_SKEW,
    MAX_VERIFIER_LEEWAY,
    ExpiredError,
    FakeClock,
    JwtVerifier,
    MemoryBundleSource,
    RevocationSet,
    Revoked,
    RevokedError,
    SpiffeBundle,
    TrustDomain,
    sign_jws,
)
from svid._verify_jwt import DEFAULT_LEEWAY
from tests.server.test_datastore_contract import BACKENDS
from tests.svid.certs import ec_key

TD = TrustDomain("example.org")
KEY = ec_key()
SUB = "spiffe://example.org/w"


@pytest.fixture(params=sorted(BACKENDS))
def datastore(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> Iterator[DataStore]:
    """Every backend of the datastore contract (SQLite; PostgreSQL in a fresh schema)."""
    store = BACKENDS[request.param](request, tmp_path, clock)()
    yield store
    store.close()


def _token(exp: int) -> str:
    claims = {"sub": SUB, "aud": ["svc"], "exp": exp, "jti": "leaked-1"}
    return sign_jws({"kid": "k1", "typ": "JWT"}, claims, KEY)


def _verifier(state: ServerState, clock: FakeClock, leeway: float) -> JwtVerifier:
    """A verifier fed from the server's revocation list, as an agent's would be."""
    revoked = RevocationSet(Revoked(r.kind, r.value, r.expires_at) for r in state.revocations)
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": KEY.public_key()}))
    return JwtVerifier(source.jwt_bundle_for, clock=clock, revocations=revoked, leeway=leeway)


@pytest.fixture
def state(datastore: DataStore, clock: FakeClock) -> ServerState:
    state = ServerState(datastore, clock, ChangeNotifier())
    state.load()
    return state


@pytest.mark.parametrize("leeway", [DEFAULT_LEEWAY, MAX_VERIFIER_LEEWAY])
def test_revoked_jwt_stays_refused_through_the_verifiers_leeway(
    state: ServerState, datastore: DataStore, clock: FakeClock, leeway: float
) -> None:
    exp = int(clock.now()) + 300
    token = _token(exp)
    asyncio.run(state.add_revocations((Revocation("jwt_id", "leaked-1", SUB, exp, "leak", 0),)))

    clock.set(exp + leeway)  # past exp, still inside the leeway: the verifier would accept
    asyncio.run(state.prune())
    with pytest.raises(RevokedError, match="leaked-1"):
        _verifier(state, clock, leeway).verify(token, "svc")
    # A restarted server reads the same from disk.
    assert [r.value for r in datastore.list_revocations()] == ["leaked-1"]


def test_revocation_goes_once_no_verifier_can_accept_the_token(
    state: ServerState, datastore: DataStore, clock: FakeClock
) -> None:
    exp = int(clock.now()) + 300
    token = _token(exp)
    asyncio.run(state.add_revocations((Revocation("jwt_id", "leaked-1", SUB, exp, "leak", 0),)))

    # The widest verifier still accepts at this second, by a clock MAX_CLOCK_SKEW behind.
    clock.set(exp + MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW)
    asyncio.run(state.prune())
    assert len(state.revocations) == 1

    clock.set(exp + MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW + 1)
    asyncio.run(state.prune())
    assert state.revocations == ()
    assert datastore.list_revocations() == []
    # Without the revocation the token is still refused: even the widest leeway has run out.
    with pytest.raises(ExpiredError):
        _verifier(state, clock, MAX_VERIFIER_LEEWAY).verify(token, "svc")


def test_a_prune_keeps_the_revocations_another_server_adds_while_it_runs(
    state: ServerState, datastore: DataStore, clock: FakeClock
) -> None:
    """Another server's revocation commits while this one prunes, and this one's change feed
    installs it before the prune is done (after each datastore call of the prune, here). The
    prune drops what expired, and only that: a list read before the revocation committed must
    not withdraw it from memory (the feed's cursor is past its row: nothing brings it back)."""
    now = int(clock.now())
    gone = now - int(MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW) - 1
    expired = Revocation("jwt_id", "old", SUB, gone, "t", 0)
    asyncio.run(state.add_revocations((expired,)))
    arrived: list[Revocation] = []

    async def prune() -> None:
        loop = asyncio.get_running_loop()

        def another_server_revokes() -> None:
            item = Revocation("jwt_id", f"elsewhere-{len(arrived)}", SUB, now + 300, "t", now)
            datastore.add_revocations((item,))
            applied = asyncio.run_coroutine_threadsafe(_feed_brings(state, item), loop)
            applied.result(timeout=5)
            arrived.append(item)

        for name in ("prune_revocations", "list_revocations"):
            original = getattr(datastore, name)

            def hooked(*args: object, _original: Any = original) -> object:
                result = _original(*args)
                another_server_revokes()
                return result

            setattr(datastore, name, hooked)
        await state.prune()

    asyncio.run(prune())
    assert arrived
    assert {r.value for r in state.revocations} == {r.value for r in arrived}


async def _feed_brings(state: ServerState, item: Revocation) -> None:
    """What the change feed's follower does with another server's revocation."""
    state.add_revocations_seen((item,))


def test_a_revocation_outlives_a_server_clock_running_a_little_ahead_of_the_verifiers(
    state: ServerState, datastore: DataStore, clock: FakeClock
) -> None:
    """The leeway is there for clock skew, yet the server prunes at exactly exp + leeway by its
    own clock: a server 5 s ahead of a verifier (NTP keeps hosts far closer than 300 s, not to
    the second) drops the revocation while that verifier still takes the token."""
    exp = int(clock.now()) + 300
    token = _token(exp)
    asyncio.run(state.add_revocations((Revocation("jwt_id", "leaked-1", SUB, exp, "leak", 0),)))

    verifier_clock = FakeClock(exp + MAX_VERIFIER_LEEWAY - 4)  # 5 s behind the server
    clock.set(exp + MAX_VERIFIER_LEEWAY + 1)
    asyncio.run(state.prune())
    with pytest.raises(RevokedError, match="leaked-1"):
        _verifier(state, verifier_clock, MAX_VERIFIER_LEEWAY).verify(token, "svc")
