"""FetchJWTSVID answers served again (jwt_answers): only while the caller, its entitlement, the
token and its freshness are what they were, never to another caller, within their budget.

The Workload API is driven directly with a fake gRPC context, so that callers with different
selectors can share one agent; tests/agent_attestor/test_workload_api.py runs the same
handler over the real socket and relay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import pytest

from agent_attestor.cache import Cache, SyncState
from agent_attestor.jwt_answers import (
    ANSWER_OVERHEAD,
    MAX_ANSWERS,
    JwtAnswers,
    answer_key,
    split_budget,
)
from agent_attestor.jwt_cache import JwtCache
from agent_attestor.model import Entry, Selector
from agent_attestor.peer import Caller, CallerRegistry
from agent_attestor.signer import MintedJwt
from agent_attestor.workload_api import WorkloadApi
from svid._clock import Clock, FakeClock
from svid._proto import workload_pb2
from tests.agent_attestor.pki import FakeSigner, LocalCa
from tests.clocks import SleptClock, SteppedClock

T = TypeVar("T")
HEADER = (("workload.spiffe.io", "true"),)
UID1 = frozenset({Selector("unix", "uid:1")})
UID2 = frozenset({Selector("unix", "uid:2")})
SID = "spiffe://example.org/w"
FLOOD_SID = "spiffe://example.org/flood"


class AbortError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class FakeContext:
    """The part of grpc.aio.ServicerContext the handler reads; abort raises, as grpc's does."""

    def __init__(self, peer: str, metadata: tuple[tuple[str, str], ...] = HEADER) -> None:
        self._peer = peer
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AbortError(code, details)


class Agent:
    """A WorkloadApi over a real cache and JWT cache, a FakeSigner and a FakeClock."""

    def __init__(
        self,
        *,
        max_entries: int = 4096,
        answer_bytes: int = 1 << 20,
        clock: FakeClock | None = None,
        agent_clock: Clock | None = None,
    ) -> None:
        """`clock`: the server's; `agent_clock`: the agent's own, when it is not the same."""
        self.clock = clock or FakeClock(start=time.time())
        self.ca = LocalCa(self.clock)
        self.signer = FakeSigner(self.ca)
        self.cache = Cache()
        self.registry = CallerRegistry()
        mine = agent_clock or self.clock
        self.jwts = JwtCache(self.signer, mine, max_entries=max_entries)
        self.api = WorkloadApi(
            self.cache, self.registry, self.jwts, mine, answer_bytes=answer_bytes
        )
        self.entries: list[Entry] = []
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def sync(self, *entries: Entry) -> None:
        self.entries = list(entries)
        self.cache.apply_sync(SyncState(entries=tuple(entries), bundle=self.ca.bundle()))

    def caller(self, name: str, selectors: frozenset[Selector]) -> FakeContext:
        peer = f"unix-abstract:svid-agent/1/{name}"
        self.registry.add(peer, Caller(name, 1, 1, 1, selectors))
        return FakeContext(peer)

    def fetch(self, ctx: FakeContext, *audience: str, spiffe_id: str = "") -> Any:
        request = workload_pb2.JWTSVIDRequest(audience=audience, spiffe_id=spiffe_id)
        return self.run(self.api.FetchJWTSVID(request, ctx))  # type: ignore[arg-type]

    def refused(self, ctx: FakeContext, *audience: str) -> grpc.StatusCode:
        with pytest.raises(AbortError) as exc:
            self.fetch(ctx, *audience)
        return exc.value.code


@pytest.fixture
def agent() -> Any:
    a = Agent()
    yield a
    a.close()


def entry(eid: str, sid: str, selectors: frozenset[Selector] = UID1, **kw: Any) -> Entry:
    return Entry(eid, sid, selectors, **kw)


def test_a_repeated_request_is_answered_from_what_was_built_for_it(agent: Agent) -> None:
    agent.sync(entry("e1", SID))
    me = agent.caller("a", UID1)
    first = agent.fetch(me, "svc")
    assert agent.fetch(me, "svc") is first  # not a token lookup and a new message: the same one
    assert agent.signer.jwt_calls == 1
    other = agent.fetch(me, "svc", "more")
    assert other is not first
    assert other.svids[0].svid != first.svids[0].svid


def test_an_answer_is_never_served_to_another_caller(agent: Agent) -> None:
    agent.sync(entry("e1", SID), entry("e2", "spiffe://example.org/other", UID2))
    first = agent.caller("a", UID1)
    stranger = agent.caller("b", frozenset({Selector("unix", "uid:3")}))
    neighbour = agent.caller("c", UID2)
    mine = agent.fetch(first, "svc")
    assert agent.refused(stranger, "svc") == grpc.StatusCode.PERMISSION_DENIED
    theirs = agent.fetch(neighbour, "svc")
    assert [s.spiffe_id for s in theirs.svids] == ["spiffe://example.org/other"]
    assert agent.fetch(first, "svc") is mine


def test_the_security_header_is_checked_before_any_answer(agent: Agent) -> None:
    agent.sync(entry("e1", SID))
    me = agent.caller("a", UID1)
    agent.fetch(me, "svc")
    for metadata in ((), (("workload.spiffe.io", "false"),)):
        bare = FakeContext(me.peer(), metadata)
        assert agent.refused(bare, "svc") == grpc.StatusCode.INVALID_ARGUMENT


def test_a_removed_entry_or_a_refused_agent_ends_its_answers(agent: Agent) -> None:
    agent.sync(entry("e1", SID), entry("e2", "spiffe://example.org/task/t1"))
    me = agent.caller("a", UID1)
    agent.fetch(me, "svc", spiffe_id="spiffe://example.org/task/t1")
    agent.fetch(me, "svc")
    agent.sync(entry("e1", SID))  # the task ended: its entry is gone
    with pytest.raises(AbortError) as exc:
        agent.fetch(me, "svc", spiffe_id="spiffe://example.org/task/t1")
    assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED
    agent.fetch(me, "svc")
    agent.cache.refuse("evicted or banned: re-attest")
    with pytest.raises(AbortError) as exc:
        agent.fetch(me, "svc")
    assert (exc.value.code, str(exc.value)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "evicted or banned: re-attest",
    )


def test_a_forgotten_token_is_not_served_from_an_answer(agent: Agent) -> None:
    agent.sync(entry("e1", SID))
    me = agent.caller("a", UID1)
    first = agent.fetch(me, "svc").svids[0].svid
    agent.jwts.forget({SID})  # what a task's end or a refusal does
    assert agent.fetch(me, "svc").svids[0].svid != first
    assert agent.signer.jwt_calls == 2


def test_an_answer_ends_at_its_token_refresh_point(agent: Agent) -> None:
    agent.sync(entry("e1", SID))
    me = agent.caller("a", UID1)
    first = agent.fetch(me, "svc").svids[0].svid
    agent.clock.advance(agent.ca.jwt_ttl / 2 - 1)
    assert agent.fetch(me, "svc").svids[0].svid == first
    agent.clock.advance(2)
    assert agent.fetch(me, "svc").svids[0].svid != first


def test_a_token_is_not_served_past_its_exp_after_the_agent_clock_steps_back() -> None:
    # The agent's clock ran an hour ahead when it cached a token; NTP then stepped it back.
    # Half the token's life is an interval: counted on the wall clock, the step stretched it
    # by the hour, and the agent served the token long after its exp.
    stepped = SteppedClock(FakeClock(start=time.time()), 3600.0)
    agent = Agent(clock=stepped.base, agent_clock=stepped)
    try:
        agent.sync(entry("e1", SID))
        me = agent.caller("a", UID1)
        first = agent.fetch(me, "svc").svids[0].svid
        stepped.offset = 0.0  # the step back
        agent.clock.advance(agent.ca.jwt_ttl / 2 - 1)
        assert agent.fetch(me, "svc").svids[0].svid == first
        agent.clock.advance(agent.ca.jwt_ttl / 2 + 2)  # past the token's exp
        assert agent.fetch(me, "svc").svids[0].svid != first
        held = agent.jwts.cached(SID, ["svc"], "e1")
        assert held is not None
        assert held.token != first  # the new token is the one kept
    finally:
        agent.close()


def test_a_token_is_not_served_past_its_exp_after_the_agent_host_slept() -> None:
    # The host slept an hour with a token cached: CLOCK_MONOTONIC does not count a suspend.
    # On the monotonic clock alone, the token's half life had not passed on waking, and the
    # agent served it for up to that half again, long past its exp; the wall clock says so.
    slept = SleptClock(FakeClock(start=time.time()))
    agent = Agent(clock=slept.base, agent_clock=slept)
    try:
        agent.sync(entry("e1", SID))
        me = agent.caller("a", UID1)
        first = agent.fetch(me, "svc").svids[0].svid
        slept.sleep(3600.0)
        assert agent.fetch(me, "svc").svids[0].svid != first
        held = agent.jwts.cached(SID, ["svc"], "e1")
        assert held is not None
        assert held.token != first
    finally:
        agent.close()


def test_an_answer_served_keeps_its_token_recently_used() -> None:
    agent = Agent(max_entries=2)
    try:
        agent.sync(entry("e1", SID))
        me = agent.caller("a", UID1)
        agent.fetch(me, "a")
        agent.fetch(me, "b")
        agent.fetch(me, "a")  # from its answer: "a" is now the JWT cache's most recent
        agent.fetch(me, "c")  # one too many: the least recently used token goes
        assert agent.jwts.cached(SID, ["a"], "e1") is not None
        assert agent.jwts.cached(SID, ["b"], "e1") is None
        minted = agent.signer.jwt_calls
        agent.fetch(me, "b")  # its answer went with its token: nothing outside the cache's bounds
        assert agent.signer.jwt_calls == minted + 1
    finally:
        agent.close()


class GatedSigner(FakeSigner):
    """Mints only once `gate` is set, so the test can change the agent meanwhile."""

    def __init__(self, ca: LocalCa) -> None:
        super().__init__(ca)
        self.gate = asyncio.Event()

    async def new_jwt(self, spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt:
        await self.gate.wait()
        return await super().new_jwt(spiffe_id, audience, entry_id)


def test_an_answer_built_while_the_agent_changed_is_not_kept(agent: Agent) -> None:
    signer = GatedSigner(agent.ca)
    agent.jwts = JwtCache(signer, agent.clock)
    agent.api = WorkloadApi(agent.cache, agent.registry, agent.jwts, agent.clock)
    agent.sync(entry("e1", SID))
    me = agent.caller("a", UID1)

    other = agent.caller("b", UID2)

    async def scenario() -> None:
        request = workload_pb2.JWTSVIDRequest(audience=["svc"])
        call = asyncio.ensure_future(agent.api.FetchJWTSVID(request, me))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the call waits for its mint
        agent.sync()  # meanwhile the entry is removed
        with pytest.raises(AbortError):  # and another call starts with the agent as it is now
            await agent.api.FetchJWTSVID(request, other)  # type: ignore[arg-type]
        signer.gate.set()
        assert (await call).svids  # the caller asked before the removal: it gets its token

    agent.run(scenario())
    assert agent.refused(me, "svc") == grpc.StatusCode.PERMISSION_DENIED


def test_answers_stay_within_their_byte_budget_and_count() -> None:
    clock = FakeClock(start=0)
    cache = Cache()
    cache.apply_sync(SyncState(entries=(), bundle=LocalCa(clock).bundle()))
    jwts = JwtCache(FakeSigner(LocalCa(clock)), clock)
    snap = cache.snapshot()

    def reply(size: int) -> workload_pb2.JWTSVIDResponse:
        out = workload_pb2.JWTSVIDResponse()
        out.svids.add(spiffe_id=SID, svid="x" * size)
        return out

    def put(answers: JwtAnswers, i: int, size: int) -> None:
        key = answer_key(UID1, workload_pb2.JWTSVIDRequest(audience=[f"a{i}"]))
        answers.get(key, snap)
        token = ((SID, (f"a{i}",), "e1"), MintedJwt("t", 0, 1e12), 1e12)
        answers.put(key, snap, jwts.generation, reply(size), [token], uid=1)

    request_bytes = len(workload_pb2.JWTSVIDRequest(audience=["a0"]).SerializeToString())
    one = ANSWER_OVERHEAD + reply(1000).ByteSize() + request_bytes
    answers = JwtAnswers(jwts, max_bytes=3 * one + one // 2)
    for i in range(10):
        put(answers, i, 1000)
        assert answers.bytes <= 3 * one + one // 2
    assert (len(answers), answers.bytes) == (3, 3 * one)
    put(answers, 99, 4 * one)  # bigger than the whole budget: not kept, nothing evicted for it
    assert (len(answers), answers.bytes) == (3, 3 * one)
    few = JwtAnswers(jwts, max_bytes=1 << 30, max_answers=2)
    for i in range(5):
        put(few, i, 10)
    assert len(few) == 2
    assert split_budget(16 * 1024 * 1024) == (15 * 1024 * 1024, 1024 * 1024)
    assert sum(split_budget(1001)) == 1001


def _me_and_a_flooder(agent: Agent) -> tuple[FakeContext, FakeContext]:
    """Two workloads, each with its entry: uid 1's (me) and uid 2's, which floods the agent."""
    agent.sync(entry("e1", SID), entry("e2", FLOOD_SID, UID2))
    me = agent.caller("a", UID1)
    flooder = FakeContext("unix-abstract:svid-agent/1/b")
    agent.registry.add(flooder.peer(), Caller("b", 2, 2, 2, UID2))
    return me, flooder


def test_one_uid_churning_requests_leaves_another_uids_answers_in_place(agent: Agent) -> None:
    # Reordered audiences or unknown fields make new request bytes, so new answers, each served
    # from a token already held (no mint to pay for): with no share per uid, one workload
    # pushed every other's answers out of the shared LRU, and their repeat calls took the slow
    # path again.
    me, flooder = _me_and_a_flooder(agent)
    mine = agent.fetch(me, "svc")
    base = workload_pb2.JWTSVIDRequest(audience=["x", "y"]).SerializeToString()
    for n in range(MAX_ANSWERS + 100):
        # Field 15, a varint this proto does not have: kept and serialized again as sent.
        request = workload_pb2.JWTSVIDRequest.FromString(base + b"\x78" + _varint(n))
        reply = agent.run(agent.api.FetchJWTSVID(request, flooder))  # type: ignore[arg-type]
        assert [s.spiffe_id for s in reply.svids] == [FLOOD_SID]
    assert agent.signer.jwt_calls == 2  # each new answer came from the token held
    assert agent.fetch(me, "svc") is mine  # still the answer built for it
    assert len(agent.api._answers) <= MAX_ANSWERS


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_one_uid_minting_into_a_full_jwt_cache_leaves_another_uids_answers_in_place() -> None:
    # Each new audience is a mint; once the JWT cache is full, each mint drops a token (the
    # flooder's own, past its share). Any drop used to end every answer, so a flooder asking
    # for new audiences at its minting rate sent every other uid's repeat calls to the slow path.
    agent = Agent(max_entries=70)  # a share of 64 tokens: the flooder recycles its own
    try:
        me, flooder = _me_and_a_flooder(agent)
        mine = agent.fetch(me, "svc")
        for n in range(100):
            agent.fetch(flooder, f"new{n}")
        assert len(agent.jwts) == 70  # full: the last 30 mints each dropped one of the flooder's
        assert agent.fetch(me, "svc") is mine  # still the answer built for it
    finally:
        agent.close()
