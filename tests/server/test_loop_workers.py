"""Workload JWT batches in worker processes the event loop drives: real child processes, real
keys, tokens checked by signature; workers killed, stopped and closed for real."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from server.audit.event import SECRET_MARKERS
from server.ca.loop_workers import DEPTH, RESTART_BACKOFF, LoopSigningWorkers
from server.ca.signer import IssuedJwt, JwtSigner
from server.ca.workers import MIN_BATCH, MintRequest
from server.issuance.records import workload_jwt_record
from svid._clock import FakeClock
from svid._errors import SvidError
from tests.server.test_jwt_workers import NOW, _claims, _wait_gone
from tests.server.test_recording_fast_paths import logs_own_body

Run = Callable[[LoopSigningWorkers], Awaitable[None]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


def _signer(clock: FakeClock, kid: str = "k1") -> JwtSigner:
    return JwtSigner(ec.generate_private_key(ec.SECP256R1()), kid, clock, NOW + 3600)


def _requests(n: int, tag: str = "w") -> list[MintRequest]:
    return [(f"spiffe://example.org/{tag}/{i}", [f"aud-{i}"], 300) for i in range(n)]


AGENT = "spiffe://example.org/svid/agent/join_token/a"


async def _mint(
    pool: LoopSigningWorkers, signer: JwtSigner, requests: list[MintRequest]
) -> list[IssuedJwt | SvidError] | None:
    """pool.mint's outcomes, the audit bodies asked for as the issuer asks for them."""
    owners = [(sub, ",".join(audience)) for sub, audience, _ in requests]
    out = await pool.mint(signer, requests, AGENT, owners)
    return None if out is None else out[0]


def _in_pool(
    clock: FakeClock, size: int, body: Run, *, depth: int = DEPTH, reply_timeout: float = 30.0
) -> None:
    """`body(pool)` on a fresh loop, with every worker started first; the pool closed after."""

    async def main() -> None:
        pool = LoopSigningWorkers(size, clock, depth=depth, reply_timeout=reply_timeout)
        try:
            assert await pool.warm_up(30), "the workers did not start"
            await body(pool)
        finally:
            pool.close()

    asyncio.run(main())


def _only_in_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> IssuedJwt:
        raise AssertionError("minted in the server process")

    monkeypatch.setattr(JwtSigner, "mint", broken)


def test_a_worker_mints_tokens_that_verify_with_the_claims_asked_for(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    signer = _signer(clock)

    async def body(pool: LoopSigningWorkers) -> None:
        _only_in_workers(monkeypatch)
        out = await _mint(pool, signer, _requests(20))
        assert out is not None
        assert len(out) == 20
        for i, jwt in enumerate(out):
            claims = _claims(jwt, signer)
            assert (claims["sub"], claims["aud"]) == (f"spiffe://example.org/w/{i}", f"aud-{i}")
            assert (claims["iat"], claims["exp"]) == (NOW, NOW + 300)
        assert len({_claims(jwt, signer)["jti"] for jwt in out}) == 20

    _in_pool(clock, 1, body)


def test_a_worker_drafts_the_audit_body_of_each_jwt_it_mints(clock: FakeClock) -> None:
    signer = _signer(clock)
    requests = _requests(MIN_BATCH + 2)
    owners = [(sub, ",".join(audience)) for sub, audience, _ in requests]
    owners[1] = (owners[1][0], "eyJ.looks-like-a-token")  # left to the log's own check

    async def body(pool: LoopSigningWorkers) -> None:
        out = await pool.mint(signer, requests, AGENT, owners)
        assert out is not None
        jwts, bodies = out
        assert len(jwts) == len(bodies) == len(requests)
        for jwt, drafted, (spiffe_id, audience) in zip(jwts, bodies, owners, strict=True):
            assert isinstance(jwt, IssuedJwt)
            _, event = workload_jwt_record(
                AGENT,
                spiffe_id,
                jti=jwt.jti,
                issued_at=jwt.issued_at,
                expires_at=jwt.expires_at,
                audience=audience,
            )
            # A random jti can hold a marker ("QeyJz...", about 1 in 13,000): left to the log.
            if spiffe_id.endswith("/1") or any(m in jwt.jti for m in SECRET_MARKERS):
                assert drafted is None
            else:
                assert drafted == logs_own_body(event)

    _in_pool(clock, 1, body)


def test_concurrent_batches_share_the_workers_and_each_gets_its_own_tokens(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    signers = [_signer(clock, kid=f"k{i % 3}") for i in range(9)]

    async def body(pool: LoopSigningWorkers) -> None:
        _only_in_workers(monkeypatch)
        # Nine batches at once on two workers holding two each: some wait for room.
        outs = await asyncio.gather(
            *(_mint(pool, s, _requests(MIN_BATCH + i, tag=f"b{i}")) for i, s in enumerate(signers))
        )
        for i, (signer, out) in enumerate(zip(signers, outs, strict=True)):
            assert out is not None
            assert len(out) == MIN_BATCH + i
            subjects = [_claims(jwt, signer)["sub"] for jwt in out]
            assert subjects == [f"spiffe://example.org/b{i}/{j}" for j in range(MIN_BATCH + i)]

    _in_pool(clock, 2, body, depth=2)


def test_expired_key_errors_come_back_per_item(clock: FakeClock) -> None:
    signer = JwtSigner(ec.generate_private_key(ec.SECP256R1()), "k", clock, NOW)

    async def body(pool: LoopSigningWorkers) -> None:
        out = await _mint(pool, signer, _requests(MIN_BATCH))
        assert out is not None
        assert all(isinstance(e, SvidError) and "expired" in str(e) for e in out)

    _in_pool(clock, 1, body)


def test_small_batches_and_starting_workers_are_left_to_the_caller(clock: FakeClock) -> None:
    signer = _signer(clock)

    async def main() -> None:
        pool = LoopSigningWorkers(1, clock)
        try:
            assert await _mint(pool, signer, _requests(MIN_BATCH - 1)) is None
            assert pool.pids() == []  # too small to start one
            assert await _mint(pool, signer, _requests(MIN_BATCH)) is None  # started, not ready
            assert len(pool.pids()) == 1
            assert await pool.warm_up(30)
            out = await _mint(pool, signer, _requests(MIN_BATCH))
            assert out is not None
            assert all(_claims(jwt, signer) for jwt in out)
        finally:
            pool.close()

    asyncio.run(main())


def test_a_killed_worker_costs_its_batches_not_answers_and_is_replaced(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    signer = _signer(clock)

    async def body(pool: LoopSigningWorkers) -> None:
        (first,) = pool.pids()
        os.kill(first, signal.SIGSTOP)  # holds the batch, then dies with it
        held = asyncio.ensure_future(_mint(pool, signer, _requests(MIN_BATCH)))
        await asyncio.sleep(0.2)
        os.kill(first, signal.SIGKILL)
        assert await asyncio.wait_for(held, 10) is None  # the caller signs it elsewhere
        _wait_gone(first)
        assert "signing worker failed" in caplog.text
        assert pool.pids() == []
        # No new worker before the backoff: a worker that cannot start costs no process a batch.
        assert await _mint(pool, signer, _requests(MIN_BATCH)) is None
        assert pool.pids() == []
        clock.advance(RESTART_BACKOFF)
        assert await pool.warm_up(30)
        (second,) = pool.pids()
        assert second != first
        out = await _mint(pool, signer, _requests(MIN_BATCH))
        assert out is not None
        assert all(_claims(jwt, signer) for jwt in out)

    _in_pool(clock, 1, body)


def test_a_worker_that_cannot_be_started_leaves_batches_to_the_caller(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The interpreter gone (a venv rebuilt under a running server), or no fd or process left:
    # spawn's OSError failed the caller's batch instead of leaving it to be signed elsewhere.
    signer = _signer(clock)
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")

    async def main() -> None:
        pool = LoopSigningWorkers(1, clock)
        try:
            assert await _mint(pool, signer, _requests(MIN_BATCH)) is None
            assert pool.pids() == []
            assert "cannot start a signing worker" in caplog.text
            monkeypatch.undo()
            # Not retried before the backoff: a process per batch is what it must not cost.
            assert await _mint(pool, signer, _requests(MIN_BATCH)) is None
            assert pool.pids() == []
            clock.advance(RESTART_BACKOFF)
            assert await pool.warm_up(30)
            out = await _mint(pool, signer, _requests(MIN_BATCH))
            assert out is not None
            assert all(_claims(jwt, signer) for jwt in out)
        finally:
            pool.close()

    asyncio.run(main())


def test_batches_waiting_for_room_hear_when_the_last_worker_is_given_up(
    clock: FakeClock,
) -> None:
    signer = _signer(clock)

    async def body(pool: LoopSigningWorkers) -> None:
        (only,) = pool.pids()
        os.kill(only, signal.SIGSTOP)  # wedged: the first batch times out, the worker is killed
        holding = asyncio.ensure_future(_mint(pool, signer, _requests(MIN_BATCH)))
        waiting = asyncio.ensure_future(_mint(pool, signer, _requests(MIN_BATCH)))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # depth 1: no room until the first batch is answered
        assert await asyncio.wait_for(holding, 10) is None
        assert await asyncio.wait_for(waiting, 2) is None  # told, not left waiting for room
        _wait_gone(only)

    _in_pool(clock, 1, body, depth=1, reply_timeout=0.5)


def test_a_wedged_worker_times_out_without_holding_up_the_loop(clock: FakeClock) -> None:
    signer = _signer(clock)

    async def body(pool: LoopSigningWorkers) -> None:
        (wedged,) = pool.pids()
        os.kill(wedged, signal.SIGSTOP)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.ensure_future(ticker())
        started = time.monotonic()
        assert await _mint(pool, signer, _requests(MIN_BATCH)) is None
        waited = time.monotonic() - started
        beat.cancel()
        assert 0.4 <= waited < 10
        assert ticks >= 10  # the loop kept running while the batch waited
        assert pool.pids() == []
        _wait_gone(wedged)  # killed, though stopped

    _in_pool(clock, 1, body, reply_timeout=0.5)


def test_close_ends_the_workers_and_later_batches_are_left_to_the_caller(
    clock: FakeClock,
) -> None:
    signer = _signer(clock)

    async def main() -> None:
        pool = LoopSigningWorkers(2, clock)
        assert await pool.warm_up(30)
        pids = pool.pids()
        assert len(pids) == 2
        pool.close()
        for pid in pids:
            _wait_gone(pid)
        assert await _mint(pool, signer, _requests(MIN_BATCH)) is None
        assert pool.pids() == []

    asyncio.run(main())


def test_a_pool_of_none_takes_no_batch(clock: FakeClock) -> None:
    async def main() -> None:
        pool = LoopSigningWorkers(0, clock)
        assert await _mint(pool, _signer(clock), _requests(3 * MIN_BATCH)) is None
        assert await pool.warm_up(0)
        assert pool.pids() == []

    asyncio.run(main())
