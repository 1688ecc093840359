"""One uid asking for ever-new JWT audiences must not spend its node's minting budget for all,
nor push the other workloads' tokens out of the agent's JWT cache.

The flooding workload is a real process running as `nobody` over the real socket; the other is
this test process (uid 0). The fake server refuses mints past a per-agent budget, as the
server's `jwt_rate_per_agent` does. The cache's own bookkeeping is tested on its own below.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_attestor.errors import MintRefusedError
from agent_attestor.jwt_cache import DEFAULT_MAX_BYTES, JwtCache, entry_size
from agent_attestor.mint_budget import MINTS_PER_UID_BURST, MINTS_PER_UID_RATE, MintBudget
from agent_attestor.model import Selector
from agent_attestor.signer import MintedJwt
from agent_attestor.uid_shares import uid_share
from svid._clock import FakeClock
from svid._proto import workload_pb2
from tests.agent_attestor.harness import HEADER, Harness
from tests.agent_attestor.pki import FakeSigner, LocalCa, SizedSigner
from tests.users import NOBODY
from tests.waits import wait_for

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
ROOT = Path(__file__).resolve().parents[2]
SERVER_BUDGET = 300  # above one uid's burst (200), below what the flood asks for


def _open_to_every_uid(h: Harness) -> Iterator[Harness]:
    """``h``, its socket reachable by another uid, closed after the test."""
    os.chmod(h.root, 0o755)
    os.chmod(h.socket_path.parent, 0o755)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def agent() -> Iterator[Harness]:
    yield from _open_to_every_uid(Harness())


def _fetch_as_nobody(socket_path: Path, audiences: list[str]) -> list[list[str]]:
    """[code, token or details] of one FetchJWTSVID per audience, asked by a `nobody` process."""
    script = textwrap.dedent(
        f"""
        import json, os, grpc
        from svid._proto import workload_pb2, workload_pb2_grpc
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel("unix:{socket_path}"))
        out = []
        for aud in {audiences!r}:
            try:
                reply = stub.FetchJWTSVID(
                    workload_pb2.JWTSVIDRequest(audience=[aud]), metadata={HEADER!r}, timeout=20
                )
                out.append(["OK", reply.svids[0].svid])
            except grpc.RpcError as exc:
                out.append([exc.code().name, exc.details()])
        print(json.dumps(out))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@as_root
def test_one_uid_minting_fresh_audiences_leaves_the_others_their_first_token(
    agent: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    agent.add_entry("/flooder", frozenset({Selector("unix", f"uid:{NOBODY}")}))
    agent.add_entry("/quiet")  # uid 0: this test process
    agent.signer.jwt_budget = SERVER_BUDGET
    flood = [f"aud-{i}" for i in range(SERVER_BUDGET + 20)]

    with caplog.at_level(logging.WARNING, logger="agent_attestor.mint_budget"):
        answers = _fetch_as_nobody(agent.socket_path, flood)

    codes = [code for code, _ in answers]
    assert codes == ["OK"] * MINTS_PER_UID_BURST + ["RESOURCE_EXHAUSTED"] * (
        len(flood) - MINTS_PER_UID_BURST
    )
    details = answers[-1][1]
    assert f"uid {NOBODY}" in details
    assert "jwt_mints_per_uid_rate" in details
    assert agent.signer.jwt_calls == MINTS_PER_UID_BURST  # refused before the server was asked
    # One line, however many refusals (the clock stands still within the minute). The budget's
    # own logger only: caplog also holds whatever grpc.aio's poller says on asyncio's, about a
    # loop an earlier test of this worker closed.
    budget = [r.getMessage() for r in caplog.records if r.name == "agent_attestor.mint_budget"]
    assert budget == ["refused JWT-SVID mints of a uid past its rate"]

    # The other workload's first token is still minted.
    reply = agent.stub().FetchJWTSVID(
        workload_pb2.JWTSVIDRequest(audience=["quiet-aud"]), metadata=HEADER, timeout=20
    )
    assert [s.spiffe_id for s in reply.svids] == ["spiffe://example.org/quiet"]

    # The flooder's cached tokens cost nothing and are still served, while a new one is refused.
    mints = agent.signer.jwt_calls
    again = _fetch_as_nobody(agent.socket_path, ["aud-0", "aud-199", "aud-new"])
    assert again[:2] == answers[0:1] + answers[199:200]
    assert again[2][0] == "RESOURCE_EXHAUSTED"
    assert agent.signer.jwt_calls == mints

    # The bucket refills at its rate (the server's budget would refill too: not counted here).
    agent.signer.jwt_budget = None
    agent.clock.advance(1)
    later = _fetch_as_nobody(
        agent.socket_path, [f"late-{i}" for i in range(int(MINTS_PER_UID_RATE) + 1)]
    )
    assert [code for code, _ in later] == ["OK"] * int(MINTS_PER_UID_RATE) + ["RESOURCE_EXHAUSTED"]


SMALL_CACHE = 128  # a uid's share is then its floor, 64 (uid_shares.uid_share)
QUIET_AUDIENCES = [f"quiet-{i}" for i in range(5)]


@pytest.fixture
def small_agent() -> Iterator[Harness]:
    yield from _open_to_every_uid(Harness(jwt_cache_size=SMALL_CACHE))


@as_root
def test_one_uid_minting_fresh_audiences_leaves_the_others_their_cached_tokens(
    small_agent: Harness,
) -> None:
    agent = small_agent
    agent.add_entry("/flooder", frozenset({Selector("unix", f"uid:{NOBODY}")}))
    agent.add_entry("/quiet")  # uid 0: this test process
    stub = agent.stub()

    def quiet_tokens() -> list[str]:
        return [
            stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=[aud]), metadata=HEADER)
            .svids[0]
            .svid
            for aud in QUIET_AUDIENCES
        ]

    first = quiet_tokens()
    mints = agent.signer.jwt_calls
    # Its whole burst of new audiences: more than the cache holds, all minted and kept in turn.
    flood = [f"aud-{i}" for i in range(MINTS_PER_UID_BURST)]
    assert [code for code, _ in _fetch_as_nobody(agent.socket_path, flood)] == ["OK"] * len(flood)
    assert agent.signer.jwt_calls == mints + len(flood)
    assert len(agent.jwts) == SMALL_CACHE

    # The flooder recycled its own slots: the quiet workload's tokens are served from the cache
    # (the answers built for its requests went with the flood's evictions: the JWT cache's
    # generation moved on, so this asks the JWT cache itself).
    assert quiet_tokens() == first
    assert agent.signer.jwt_calls == mints + len(flood)


def test_callers_waiting_for_a_mint_already_out_cost_no_budget(agent: Harness) -> None:
    # A burst of one uid's callers asking for one new audience at once is one mint: each was
    # charged anyway, and those past the burst were refused as "past its minting rate" for a
    # token the server was asked for once.
    agent.api.mints = MintBudget(agent.clock, rate=1, burst=1)  # the clock stands still
    agent.add_entry("/w")
    gate, called = asyncio.Event(), []
    agent.api._on_call = called.append
    mint = agent.signer.new_jwt

    async def held_mint(spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt:
        await gate.wait()
        return await mint(spiffe_id, audience, entry_id)

    agent.signer.new_jwt = held_mint  # type: ignore[method-assign]
    stub = agent.stub()
    request = workload_pb2.JWTSVIDRequest(audience=["new"])
    calls = [stub.FetchJWTSVID.future(request, metadata=HEADER, timeout=20) for _ in range(5)]
    # A handler runs from its start to the mint (or the wait for it) without yielding: once
    # all five have started, the first mints and the others wait for it or were refused.
    wait_for(lambda: agent.lt.call(lambda: len(called)) == 5, 20, "all five calls started")
    agent.lt.call(gate.set)
    tokens = {call.result().svids[0].svid for call in calls}
    assert len(tokens) == 1
    assert agent.signer.jwt_calls == 1
    # A mint of its own is still charged: the budget is spent.
    with pytest.raises(grpc.RpcError) as exc:
        stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["other"]), metadata=HEADER)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "jwt_mints_per_uid_rate" in exc.value.details()  # type: ignore[attr-defined]


def test_a_caller_taking_over_a_cancelled_mint_is_charged() -> None:
    # Its minting caller went away and a waiter mints instead: that is a mint of the waiter's
    # own, so a uid cannot have many minted on one charge by cancelling each minting caller.
    signer = SizedSigner()
    mint = signer.new_jwt
    jwts = JwtCache(signer, FakeClock(start=0))
    asks: list[str] = []

    def admit(who: str) -> Callable[[], str | None]:
        def ask() -> str | None:
            asks.append(who)
            return None if who == "first" else "spent"

        return ask

    async def run() -> None:
        gate = asyncio.Event()

        async def held(spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt:
            await gate.wait()
            return await mint(spiffe_id, audience, entry_id)

        signer.new_jwt = held  # type: ignore[method-assign]
        first = asyncio.ensure_future(jwts.get(SID, ["a"], "e", QUIET, admit("first")))
        await asyncio.sleep(0)
        waiter = asyncio.ensure_future(jwts.get(SID, ["a"], "e", QUIET, admit("waiter")))
        await asyncio.sleep(0)
        assert asks == ["first"]  # waiting for a mint out costs nothing
        first.cancel()
        with pytest.raises(MintRefusedError, match="spent"):
            await waiter
        assert asks == ["first", "waiter"]

    asyncio.run(run())


# ---- the cache's shares, with a fake signer and clock ----------------------------------------

SID = "spiffe://example.org/w"
FLOODER, QUIET, NEWCOMER = 1001, 1002, 1003
NOW = 1_800_000_000.0


def _get(jwts: JwtCache, uid: int, aud: str, sid: str = SID) -> MintedJwt:
    return asyncio.run(jwts.get(sid, [aud], "e", uid))


def test_a_uid_share_is_an_eighth_of_each_bound_and_never_under_64_tokens() -> None:
    assert uid_share(4096, DEFAULT_MAX_BYTES) == (512, DEFAULT_MAX_BYTES // 8)
    assert uid_share(128, 1_000) == (64, 500)  # the floor, and the same fraction of bytes
    assert uid_share(10, 1_000) == (10, 1_000)  # a cache under the floor: one share is all


def test_a_uid_flooding_new_audiences_recycles_its_own_slots() -> None:
    signer = SizedSigner()
    jwts = JwtCache(signer, FakeClock(start=0), max_entries=256)  # a share of 64 entries
    quiet = {aud: _get(jwts, QUIET, aud) for aud in ("a", "b", "c")}
    for i in range(1_000):
        _get(jwts, FLOODER, f"flood-{i}")
    assert len(jwts) == 256  # the flooder used the room nobody else needed...
    assert all(jwts.cached(SID, [aud], "e") is quiet[aud] for aud in quiet)  # ...and only that
    assert jwts.cached(SID, ["flood-999"], "e") is not None
    assert jwts.cached(SID, ["flood-0"], "e") is None  # its own oldest went first

    # A uid within its share that needs room takes it from the uid past its share, not the
    # least recently used of all (the quiet uid's, untouched since the flood began).
    mints = signer.calls
    for aud in ("d", "e"):
        _get(jwts, NEWCOMER, aud)
    assert all(_get(jwts, QUIET, aud) is quiet[aud] for aud in quiet)
    assert signer.calls == mints + 2
    assert len(jwts) == 256


def test_a_uid_flooding_big_audiences_recycles_its_own_bytes() -> None:
    # 4 KB audiences: the byte bound is reached long before the count.
    signer = SizedSigner(size=1_000)
    big = "x" * 4_000
    one = entry_size(JwtCache.key(SID, [big + "0000"], "e"), MintedJwt("x" * 1_000, 0, 1))
    jwts = JwtCache(signer, FakeClock(start=0), max_bytes=200 * one)
    quiet = {aud: _get(jwts, QUIET, aud) for aud in ("a", "b", "c")}
    for i in range(1_000):
        _get(jwts, FLOODER, f"{big}{i:04}")
    assert jwts.bytes <= 200 * one
    assert all(jwts.cached(SID, [aud], "e") is quiet[aud] for aud in quiet)


def test_a_lone_uid_still_uses_the_whole_cache_least_recently_used_out_first() -> None:
    jwts = JwtCache(SizedSigner(), FakeClock(start=0), max_entries=256)
    for i in range(256):
        _get(jwts, FLOODER, f"a-{i}")
    assert jwts.cached(SID, ["a-0"], "e") is not None  # a hit: no longer the least recently used
    _get(jwts, FLOODER, "new")
    assert len(jwts) == 256
    assert jwts.cached(SID, ["a-0"], "e") is not None
    assert jwts.cached(SID, ["a-1"], "e") is None


def test_a_token_minted_anew_belongs_to_the_uid_that_minted_it() -> None:
    # Two uids of one identity share its tokens; one past its refresh point is minted again by
    # whoever asks next, and is then that uid's.
    clock = FakeClock(start=NOW)
    jwts = JwtCache(FakeSigner(LocalCa(clock)), clock, max_entries=8, share=(2, 10**9))
    first = _get(jwts, QUIET, "shared")
    assert _get(jwts, FLOODER, "shared") is first  # a hit: still the quiet uid's
    clock.advance(10**6)  # past every refresh point
    _get(jwts, FLOODER, "shared")
    _check_books(jwts)
    assert _owners(jwts) == {JwtCache.key(SID, ["shared"], "e"): FLOODER}


# ---- bookkeeping under every way a token leaves --------------------------------------------

SIDS = ["spiffe://example.org/rt/task/1", "spiffe://example.org/rt/task/2", SID]
_get_op = st.tuples(st.just("get"), st.integers(0, 3), st.integers(0, 2), st.integers(0, 7))
_other_op = st.one_of(
    st.tuples(st.just("forget"), st.sets(st.integers(0, 2), max_size=2)),
    st.tuples(st.just("forget_under")),
    st.tuples(st.just("forget_all")),
    st.tuples(st.just("revoke"), st.integers(0, 20)),
    st.tuples(st.just("touch"), st.integers(0, 20)),
    st.tuples(st.just("advance"), st.integers(1, 400)),
)
# Mostly inserts, so that the bounds and the shares are reached between the drops.
_ops = st.tuples(st.integers(0, 9), _get_op, _other_op).map(lambda t: t[1] if t[0] < 7 else t[2])


def _owners(jwts: JwtCache) -> dict[object, int]:
    return {key: held[4] for key, held in jwts._tokens.items()}


def _check_books(jwts: JwtCache) -> None:
    """Every held token is on its owner's books and nowhere else, bytes and `over` agree."""
    tokens, books, over = jwts._tokens, jwts._shares._books, jwts._shares._over
    share_entries, share_bytes = jwts._shares._share_entries, jwts._shares._share_bytes
    assert sum(len(b.keys) for b in books.values()) == len(tokens)
    for uid, b in books.items():
        assert b.keys, "a uid with no tokens has no books"
        assert all(tokens[key][4] == uid for key in b.keys)
        assert b.bytes == sum(tokens[key][2] for key in b.keys)
    assert jwts.bytes == sum(held[2] for held in tokens.values())
    assert set(over) == {
        u for u, b in books.items() if len(b.keys) > share_entries or b.bytes > share_bytes
    }
    assert len(tokens) <= jwts._max
    assert jwts.bytes <= jwts._max_bytes


@settings(max_examples=150, deadline=None)
@given(st.lists(_ops, min_size=10, max_size=80))
def test_the_books_follow_every_insert_drop_eviction_and_forget(ops: list[tuple[Any, ...]]) -> None:
    clock = FakeClock(start=NOW)
    signer = FakeSigner(LocalCa(clock))
    # Audiences of different sizes, so that both bounds and both shares are reached.
    auds = [f"aud-{i}-" + "y" * (i * 200) for i in range(8)]
    one = entry_size(JwtCache.key(SID, [auds[3]], "e"), signer.ca.mint_jwt(SID, [auds[3]]))
    jwts = JwtCache(signer, clock, max_entries=6, max_bytes=5 * one, share=(2, 2 * one))

    async def run() -> None:
        for op in ops:
            before = {key: held[0] for key, held in jwts._tokens.items()}
            generation = jwts.generation
            held = list(before)
            if op[0] == "get":
                _, uid, sid, aud = op
                await jwts.get(SIDS[sid], [auds[aud]], "e", uid)
            elif op[0] == "forget":
                jwts.forget({SIDS[i] for i in op[1]})
            elif op[0] == "forget_under":
                jwts.forget_under("spiffe://example.org/rt/task/")
            elif op[0] == "forget_all":
                jwts.forget()
            elif op[0] == "revoke" and held:
                sid, aud, entry_id = held[op[1] % len(held)]
                jwts.cached(sid, aud, entry_id, frozenset({jwts._tokens[(sid, aud, entry_id)][3]}))
            elif op[0] == "touch" and held:
                key = held[op[1] % len(held)]
                assert jwts.still_held([(key, before[key])])  # marks it used, as a hit does
            elif op[0] == "advance":
                clock.advance(op[1])
            _check_books(jwts)
            after = {key: held[0] for key, held in jwts._tokens.items()}
            if any(after.get(key) is not jwt for key, jwt in before.items()):
                assert jwts.generation > generation, f"{op}: a token left, generation stayed"

    asyncio.run(run())
