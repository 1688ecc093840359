"""Repros of JWT-SVID defects on the agent's path, over the real Workload API socket."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator

import grpc
import pytest

from agent_attestor import _crypto
from agent_attestor.cache import Cache, SyncState
from agent_attestor.jwt_cache import JwtCache
from agent_attestor.model import Entry, Selector
from agent_attestor.signer import MintedJwt
from agent_attestor.tasks.forget import forget_removed_identities
from svid._bearer_tokens import BearerTokens
from svid._clock import FakeClock
from svid._jose import b64url_decode
from svid._jwt import JwtSvid
from svid._proto import workload_pb2
from svid._spiffe_id import TrustDomain
from svid._verify_jwt import JwtVerifier
from svid._workload_client import WorkloadApiClient
from tests.agent_attestor.harness import HEADER, Harness
from tests.agent_attestor.pki import FakeSigner, LocalCa
from tests.agent_attestor.test_jwt_fairness import _fetch_as_nobody, _open_to_every_uid, as_root
from tests.users import NOBODY

SEL = frozenset({Selector("unix", "uid:1")})


@pytest.fixture
def agent() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def test_a_cached_jwt_is_never_served_past_its_exp_when_the_agent_clock_is_behind(
    agent: Harness,
) -> None:
    # The server's clock runs 200 s ahead of the agent's (NTP off on one host): its iat and exp
    # are the server's readings, the JWT cache compares them with the agent's clock.
    server_clock = FakeClock(start=agent.clock.now() + 200)
    agent.ca.clock = server_clock
    agent.add_entry("/w")
    stub = agent.stub()
    first = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
    token = first.svids[0].svid
    # 320 s later by both clocks: the token (300 s TTL) expired 20 s ago.
    agent.clock.advance(320)
    server_clock.advance(320)
    again = stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
    served = again.svids[0].svid
    bundle = _crypto.jwt_bundle(agent.ca.bundle())
    verifier = JwtVerifier(
        lambda td: bundle if td == TrustDomain("example.org") else None, clock=server_clock
    )
    reused = served == token  # compared apart: a failing assert would print both tokens
    assert not reused, "the agent handed out the token it cached, 20 s past its exp"
    verifier.verify(served, "a")


def test_a_jwt_is_served_from_the_cache_when_the_agent_clock_is_ahead(agent: Harness) -> None:
    # The other way round: the agent's clock 200 s ahead of the server's. The token it was
    # just given is past its "half life" at once by the agent's clock, so every fetch mints
    # anew: the caller's mint budget (100/s) and the agent's at the server (500/s) run out
    # for workloads that fetch per request and count on the cache, as SPIFFE clients do.
    agent.ca.clock = FakeClock(start=agent.clock.now() - 200)
    agent.add_entry("/w")
    stub = agent.stub()
    for _ in range(3):
        stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
    assert agent.signer.jwt_calls == 1, f"{agent.signer.jwt_calls} mints for one token's worth"


class _EntryTtlSigner(FakeSigner):
    """Mints with each entry's own jwt_svid_ttl, as the server does (_workload_request)."""

    def __init__(self, base: FakeSigner, ttls: dict[str, int]) -> None:
        super().__init__(base.ca, base.spiffe_ids)
        self.ttls = ttls

    async def new_jwt(self, spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt:
        self.jwt_calls += 1
        return self.ca.mint_jwt(spiffe_id, audience, ttl=self.ttls[entry_id])


def _lifetime(token: str) -> int:
    claims = json.loads(b64url_decode(token.split(".")[1]))
    return int(claims["exp"]) - int(claims["iat"])


@as_root
def test_a_workload_is_not_handed_a_jwt_minted_for_another_entry_of_its_id() -> None:
    # One SPIFFE ID through two entries (as the task tests share a runtime's): this test (uid
    # 0) through one with a 3600 s JWT TTL, `nobody` through one the admin gave 60 s. The
    # agent's JWT cache is keyed by (ID, audiences) alone, so whoever asks second gets the
    # token minted for the other's entry: `nobody` holds a bearer token 60 times longer than
    # its entry allows.
    for agent in _open_to_every_uid(Harness()):
        root_entry = agent.add_entry("/shared")
        nobody_entry = agent.add_entry("/shared", frozenset({Selector("unix", f"uid:{NOBODY}")}))
        signer = _EntryTtlSigner(agent.signer, {root_entry.id: 3600, nobody_entry.id: 60})
        agent.jwts._signer = signer
        mine = agent.stub().FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["svc"]), metadata=HEADER, timeout=20
        )
        assert _lifetime(mine.svids[0].svid) == 3600
        [(code, token)] = _fetch_as_nobody(agent.socket_path, ["svc"])
        assert code == "OK"
        assert _lifetime(token) == 60, "nobody was handed the token minted for uid 0's entry"


def test_the_agent_validates_the_jwt_it_just_served_from_a_server_a_few_seconds_ahead(
    agent: Harness,
) -> None:
    # The server's clock 8 s ahead of the agent's: within what the project allows elsewhere
    # (X.509-SVIDs are backdated BACKDATE_SECONDS = 10, revocations are kept MAX_CLOCK_SKEW =
    # 60 s for a server running ahead of a verifier), yet the JWT verifier refuses an `iat`
    # more than its 5 s leeway ahead. Workload A's fresh token, handed to workload B on the
    # same node, is refused by this very agent for its first seconds.
    agent.ca.clock = FakeClock(start=agent.clock.now() + 8)
    agent.add_entry("/w")
    stub = agent.stub()
    token = (
        stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["svc"]), metadata=HEADER)
        .svids[0]
        .svid
    )
    try:
        reply = stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="svc", svid=token), metadata=HEADER
        )
    except grpc.RpcError as exc:
        pytest.fail(f"{exc.code()}: {exc.details()}")
    assert reply.spiffe_id == "spiffe://example.org/w"


def test_a_workloads_bearer_token_keeps_half_its_life_when_the_agent_served_it_cached(
    agent: Harness,
) -> None:
    # svid's BearerTokens (httpx JwtAuth, MCP auth) caches the workload's own JWT-SVID "until
    # half its lifetime has passed, so a token in use always has the other half left" (fresh),
    # counting the half from when it fetched it. The agent hands out a token it cached until
    # its own half-life: the two halves add up, and requests go out with seconds left.
    agent.add_entry("/w")
    client = WorkloadApiClient(f"unix://{agent.socket_path}")
    try:
        client.fetch_jwt_svid("svc")  # another user of the identity: the agent mints, keeps
        agent.clock.advance(149)
        tokens = BearerTokens(client, "svc", clock=agent.clock)
        tokens.token()  # fetched now: the agent's cached one, 149 s old
        agent.clock.advance(140)
        sent = JwtSvid.parse_insecure(tokens.token())
    finally:
        client.close()
    left = sent.expires_at - agent.clock.now()
    assert left >= 150, f"a request sent its 300 s token with {left:.0f} s left"


def test_a_workloads_bearer_token_always_has_a_quarter_of_its_life_left(agent: Harness) -> None:
    # The invariant behind the test above, at every use: BearerTokens keeps the token a
    # quarter of its lifetime from its fetch, the agent serves it with at least half left.
    agent.add_entry("/w")
    client = WorkloadApiClient(f"unix://{agent.socket_path}")
    try:
        client.fetch_jwt_svid("svc")
        agent.clock.advance(149)
        tokens = BearerTokens(client, "svc", clock=agent.clock)
        lefts = []
        for _ in range(120):
            sent = JwtSvid.parse_insecure(tokens.token())
            lefts.append(sent.expires_at - agent.clock.now())
            agent.clock.advance(5)
    finally:
        client.close()
    assert min(lefts) >= agent.ca.jwt_ttl / 4, f"a request went out with {min(lefts):.0f} s left"


def test_a_jwt_minted_under_an_entry_whose_jwt_ttl_then_shrank_is_not_served_past_its_new_half_life(
    agent: Harness,
) -> None:
    # The admin cuts an entry's jwt_svid_ttl from 3600 s to 60 s in place (same entry ID): the
    # token minted under 3600 s stays in the cache under (ID, audiences, entry) and was served
    # for its old half life, 1800 s, 30 times past what the entry now allows.
    entry = agent.add_entry("/w")
    ttls = {entry.id: 3600}
    agent.jwts._signer = _EntryTtlSigner(agent.signer, ttls)
    forgetting = agent.lt.submit(forget_removed_identities(agent.cache, agent.jwts))
    try:
        stub = agent.stub()
        request = workload_pb2.JWTSVIDRequest(audience=["svc"])
        first = stub.FetchJWTSVID(request, metadata=HEADER).svids[0].svid
        assert _lifetime(first) == 3600
        ttls[entry.id] = 60
        agent.entries[entry.id] = dataclasses.replace(entry, jwt_svid_ttl=60, revision=2)
        agent.sync()
        agent.lt.run(asyncio.sleep(0.05))  # the forgetting task wakes on the entry change
        agent.clock.advance(40)  # past the new half life (30 s), far from the old (1800 s)
        served = stub.FetchJWTSVID(request, metadata=HEADER).svids[0].svid
        stale = served == first  # compared apart: a failing assert would print both tokens
        assert not stale, "the 3600 s token was served after its entry's TTL became 60 s"
        assert _lifetime(served) == 60
    finally:
        forgetting.cancel()


def test_the_cached_jwts_of_a_removed_entry_are_forgotten_though_its_id_stays() -> None:
    # Two entries give one SPIFFE ID (a runtime's, shared by its tasks' entries, or one per
    # node group). When one goes, its tokens were forgotten only if no other entry held the
    # ID: they stayed in the cache, never served again (the key names the gone entry) but
    # holding slots and bytes of its uid's share until the LRU got to them.
    clock = FakeClock(start=time.time())
    ca = LocalCa(clock)
    jwts = JwtCache(FakeSigner(ca), clock)
    cache = Cache()
    sid = "spiffe://example.org/shared"
    kept, gone = Entry("e-1", sid, SEL), Entry("e-2", sid, SEL)

    async def scenario() -> None:
        cache.apply_sync(SyncState(entries=(kept, gone), bundle=ca.bundle()))
        forgetting = asyncio.create_task(forget_removed_identities(cache, jwts))
        await asyncio.sleep(0)
        for entry in (kept, gone):
            for audience in ("a", "b"):
                await jwts.get(sid, [audience], entry.id, 0)
        cache.apply_sync(SyncState(entries=(kept,), bundle=ca.bundle()))
        await asyncio.sleep(0.05)
        forgetting.cancel()

    asyncio.run(scenario())
    assert jwts.cached(sid, ["a"], "e-2") is None
    assert jwts.cached(sid, ["b"], "e-2") is None
    assert len(jwts) == 2, "the removed entry's tokens are still held"
    assert jwts.cached(sid, ["a"], "e-1") is not None
