"""Workload JWT batches in signing worker processes: real child processes, real keys, tokens
checked by signature."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from server.ca.errors import CaUnavailableError
from server.ca.signer import IssuedJwt, JwtSigner
from server.ca.workers import MIN_BATCH, MintRequest, SigningWorkers
from svid._clock import FakeClock
from svid._errors import SvidError
from svid._jose import b64url_decode, verify_jws_signature

NOW = 1_800_000_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


def _signer(clock: FakeClock, kid: str = "k1", life: int = 3600) -> JwtSigner:
    return JwtSigner(ec.generate_private_key(ec.SECP256R1()), kid, clock, NOW + life)


def _requests(n: int, ttl: int = 300) -> list[MintRequest]:
    return [(f"spiffe://example.org/w/{i}", [f"aud-{i}"], ttl) for i in range(n)]


def _claims(jwt: IssuedJwt | SvidError, signer: JwtSigner) -> dict[str, object]:
    assert isinstance(jwt, IssuedJwt), jwt
    head, body, sig = jwt.token.split(".")
    header = json.loads(b64url_decode(head))
    assert header == {"alg": "ES256", "kid": signer.kid, "typ": "JWT"}
    public = signer._key.public_key()
    assert verify_jws_signature("ES256", f"{head}.{body}".encode(), b64url_decode(sig), public)
    claims: dict[str, object] = json.loads(b64url_decode(body))
    assert claims["jti"] == jwt.jti
    assert (claims["iat"], claims["exp"]) == (jwt.issued_at, jwt.expires_at)
    return claims


def _mint_in_worker_only(
    monkeypatch: pytest.MonkeyPatch, pool: SigningWorkers, signer: JwtSigner, n: int
) -> list[IssuedJwt | SvidError]:
    """Mint with this process's JwtSigner.mint broken: only a worker can have made the tokens."""

    def broken(*args: object, **kwargs: object) -> IssuedJwt:
        raise AssertionError("minted in the server process")

    with monkeypatch.context() as patch:
        patch.setattr(JwtSigner, "mint", broken)
        return pool.mint(signer, _requests(n))


def test_a_worker_mints_tokens_that_verify_with_the_claims_asked_for(
    workers: SigningWorkers, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer = _signer(clock)
    out = _mint_in_worker_only(monkeypatch, workers, signer, 20)
    assert len(out) == 20
    jtis = set()
    for i, jwt in enumerate(out):
        claims = _claims(jwt, signer)
        assert claims["sub"] == f"spiffe://example.org/w/{i}"
        assert claims["aud"] == f"aud-{i}"
        assert claims["iat"] == NOW
        assert claims["exp"] == NOW + 300
        jtis.add(claims["jti"])
    assert len(jtis) == 20


def test_mint_values_are_a_minted_jwts_fields_as_the_plain_tuple_a_worker_sends(
    clock: FakeClock,
) -> None:
    signer = _signer(clock, life=100)
    values = signer.mint_values("spiffe://example.org/w/1", ["a", "b"], 300, NOW)
    assert type(values) is tuple
    claims = _claims(IssuedJwt(*values), signer)
    assert (claims["sub"], claims["aud"]) == ("spiffe://example.org/w/1", ["a", "b"])
    assert claims["exp"] == NOW + 100  # capped at the key, as mint caps it


def test_exp_is_capped_at_the_key_and_an_expired_key_fails_every_item(
    workers: SigningWorkers, clock: FakeClock
) -> None:
    signer = _signer(clock, life=100)
    out = workers.mint(signer, _requests(MIN_BATCH, ttl=300))
    assert all(_claims(jwt, signer)["exp"] == NOW + 100 for jwt in out)
    clock.advance(100)
    out = workers.mint(signer, _requests(MIN_BATCH))
    assert all(isinstance(e, CaUnavailableError) for e in out)
    assert "expired" in str(out[0])


def test_rotated_keys_sign_with_their_own_kid_even_after_the_worker_forgot_one(
    workers: SigningWorkers, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    signers = [_signer(clock, kid=f"k{i}") for i in range(7)]
    for signer in [*signers, signers[0], signers[3], signers[6]]:
        (jwt, *_) = _mint_in_worker_only(monkeypatch, workers, signer, MIN_BATCH)
        _claims(jwt, signer)  # right kid in the header, and its key's signature


def test_a_killed_worker_costs_speed_not_answers(
    workers: SigningWorkers, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    signer = _signer(clock)
    (first,) = workers.pids()
    os.kill(first, signal.SIGKILL)
    _wait_gone(first)
    out = workers.mint(signer, _requests(MIN_BATCH))  # answered here, from this process
    assert all(_claims(jwt, signer) for jwt in out)
    assert "signing worker failed" in caplog.text
    assert workers.warm_up(30)
    (second,) = workers.pids()
    assert second != first
    assert all(_claims(jwt, signer) for jwt in workers.mint(signer, _requests(MIN_BATCH)))


def test_a_worker_dead_before_it_was_ready_costs_speed_not_answers(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    # The worker's pipe then reads as EOF where "ready" was awaited: that batch failed with
    # EOFError and its worker's place in the pool was never given back, so once every place
    # was lost each big batch waited for a worker for ever.
    pool = SigningWorkers(1, clock)
    try:
        signer = _signer(clock)
        pool.mint(signer, _requests(MIN_BATCH))  # starts the worker; signed here meanwhile
        (first,) = pool.pids()
        os.kill(first, signal.SIGKILL)  # well before its imports are done
        _wait_gone(first)
        with concurrent.futures.ThreadPoolExecutor(1) as executor:
            for _ in range(3):
                out = executor.submit(pool.mint, signer, _requests(MIN_BATCH)).result(timeout=30)
                assert all(_claims(jwt, signer) for jwt in out)
        assert "signing worker failed" in caplog.text
        assert first not in pool.pids()
    finally:
        pool.close()


def test_small_batches_stay_in_the_server_and_start_no_worker(clock: FakeClock) -> None:
    pool = SigningWorkers(2, clock)
    try:
        signer = _signer(clock)
        out = pool.mint(signer, _requests(MIN_BATCH - 1))
        assert [_claims(jwt, signer)["sub"] for jwt in out][-1] == "spiffe://example.org/w/6"
        assert pool.pids() == []
    finally:
        pool.close()


def test_close_ends_the_worker_processes(clock: FakeClock) -> None:
    pool = SigningWorkers(2, clock)
    assert pool.warm_up(30)
    pids = pool.pids()
    assert len(pids) == 2
    pool.close()
    for pid in pids:
        _wait_gone(pid)
    signer = _signer(clock)
    # After close a batch is still answered, in this process.
    assert all(_claims(jwt, signer) for jwt in pool.mint(signer, _requests(MIN_BATCH)))


def _wait_gone(pid: int) -> None:
    for _ in range(500):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} is still running")


def test_a_pool_of_none_mints_every_batch_in_the_server(clock: FakeClock) -> None:
    pool = SigningWorkers(0, clock)
    signer = _signer(clock)
    out = pool.mint(signer, _requests(3 * MIN_BATCH))
    assert len(out) == 3 * MIN_BATCH
    assert all(_claims(jwt, signer)["iat"] == NOW for jwt in out)
    assert pool.pids() == []
    assert pool.warm_up(0)
    pool.close()
