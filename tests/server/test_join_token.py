"""The join-token attestor on a real store (every backend): single use; guesses never disturb
the owner.

The attestor only checks a token; an attempt here spends it as the admission does
(DataStore.admit_agent), so single use is checked end to end."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.attestation.base import AttestationResult, Challenge
from server.attestation.join_token import JoinTokenAttestor, new_join_token
from server.datastore import DataStore
from server.datastore.records import AttestedAgent
from server.errors import PermissionDeniedError
from server.ids import ServerIds
from svid._clock import FakeClock
from tests.server.conftest import TRUST_DOMAIN
from tests.server.test_datastore_contract import BACKENDS

GUESSES = 200


@pytest.fixture(params=sorted(BACKENDS))
def datastore(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> Iterator[DataStore]:
    """Every backend of the datastore contract (SQLite; PostgreSQL in a fresh schema)."""
    store = BACKENDS[request.param](request, tmp_path, clock)()
    yield store
    store.close()


async def _no_challenge(nonce: bytes) -> bytes:
    raise AssertionError("join_token sends no challenge")


@dataclass
class _Setup:
    attestor: JoinTokenAttestor
    datastore: DataStore
    clock: FakeClock

    async def attest(self, payload: bytes, challenge: Challenge) -> AttestationResult:
        return await self.attestor.attest(payload, challenge)


def _attestor(datastore: DataStore, clock: FakeClock) -> _Setup:
    return _Setup(JoinTokenAttestor(datastore, ServerIds(TRUST_DOMAIN), clock), datastore, clock)


def _issue(datastore: DataStore, clock: FakeClock, token_id: str = "owner") -> str:
    token, record = new_join_token(int(clock.now()), 600, token_id)
    datastore.create_join_token(record)
    return token


async def _attempt(attestor: _Setup, payload: str) -> bool:
    """Attest, then spend the token with the agent's record as the admission does."""
    try:
        result = await attestor.attest(payload.encode(), _no_challenge)
    except PermissionDeniedError:
        return False
    assert result.token is not None
    agent = AttestedAgent(str(result.agent_id), result.attestation_type, "1", 2_000_000_000)
    now = int(attestor.clock.now())
    return await asyncio.to_thread(attestor.datastore.admit_agent, agent, result.token, now)


def test_genuine_attestation_succeeds_while_guesses_run(
    datastore: DataStore, clock: FakeClock
) -> None:
    """Wrong secrets for the owner's token id, interleaved with the owner's own attempt."""
    attestor = _attestor(datastore, clock)
    for round_ in range(5):
        token = _issue(datastore, clock, f"owner{round_}")
        token_id = token.partition(".")[0]

        async def race(payload: str = token, guess: str = f"{token_id}.wrong") -> list[bool]:
            attempts = [_attempt(attestor, guess) for _ in range(GUESSES)]
            attempts.insert(GUESSES // 2, _attempt(attestor, payload))
            return await asyncio.gather(*attempts)

        results = asyncio.run(race())
        assert results[GUESSES // 2] is True, f"round {round_}: the owner was refused"
        assert sum(results) == 1, "a wrong secret was accepted"


def test_guesses_from_threads_never_disturb_the_owner(
    datastore: DataStore, clock: FakeClock
) -> None:
    """The same, with guesses from other threads (other event loops) hammering the store."""
    attestor = _attestor(datastore, clock)
    stop = threading.Event()

    def guess() -> None:
        while not stop.is_set():
            assert not asyncio.run(_attempt(attestor, "owner.wrong"))

    threads = [threading.Thread(target=guess) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        # The owner retries nothing: each single attempt in the storm must succeed, and the
        # token id is free to be issued again once used (its agent evicted: an admission never
        # overwrites the record of one already there).
        owner = str(ServerIds(TRUST_DOMAIN).agent("join_token", "owner"))
        for round_ in range(5):
            token = _issue(datastore, clock, "owner")
            assert asyncio.run(_attempt(attestor, token)), f"round {round_}: owner refused"
            assert not asyncio.run(_attempt(attestor, token)), "a join token works once"
            datastore.delete_agent(owner)
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_two_genuine_attempts_exactly_one_wins(datastore: DataStore, clock: FakeClock) -> None:
    attestor = _attestor(datastore, clock)
    token = _issue(datastore, clock)

    async def race() -> list[bool]:
        return await asyncio.gather(*(_attempt(attestor, token) for _ in range(16)))

    assert sum(asyncio.run(race())) == 1


def test_a_wrong_secret_leaves_the_token_usable(datastore: DataStore, clock: FakeClock) -> None:
    attestor = _attestor(datastore, clock)
    token = _issue(datastore, clock)
    token_id = token.partition(".")[0]
    assert not asyncio.run(_attempt(attestor, f"{token_id}.wrong"))
    assert asyncio.run(_attempt(attestor, token))


def test_an_expired_token_is_refused(datastore: DataStore, clock: FakeClock) -> None:
    attestor = _attestor(datastore, clock)
    token = _issue(datastore, clock)
    clock.advance(600)
    assert not asyncio.run(_attempt(attestor, token))


@pytest.mark.parametrize("payload", [b"", b"owner", b"owner.", b".secret", b"bad id!.x", b"\xff.x"])
def test_malformed_payloads_are_refused(
    datastore: DataStore, clock: FakeClock, payload: bytes
) -> None:
    attestor = _attestor(datastore, clock)
    _issue(datastore, clock)
    with pytest.raises(PermissionDeniedError, match="join token is invalid"):
        asyncio.run(attestor.attest(payload, _no_challenge))
