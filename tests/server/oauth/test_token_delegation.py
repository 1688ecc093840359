"""RFC 8693 delegation on a running server: the workload serving a resource (configured in
oauth_resource_workloads) presents a task's access token it received and its own JWT-SVID, and
gets a token for another resource, decided afresh for the task, with itself as the current
actor; only that workload may, and the task's end revokes the result."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import jwt as pyjwt
import pytest

import svid.httpx
from server.datastore.records import REVOKED_JWT_ID, Revocation
from svid._spiffe_id import SpiffeId
from tests.server.oauth.conftest import OTHER_RESOURCE, RESOURCE, OAuthServer, serving_oauth
from tests.server.oauth.test_token_exchange import (
    EXCHANGE,
    JWT_TYPE,
    TXN_TYPE,
    TaskWorld,
    begin_task,
)

ACCESS_TYPE = "urn:ietf:params:oauth:token-type:access_token"
MCP_ID = "spiffe://example.org/mcp-tickets"
OTHER_ID = "spiffe://example.org/orders"


@contextmanager
def serving_delegation(prefix: str, **settings: Any) -> Iterator[OAuthServer]:
    """A server for RESOURCE, served by MCP_ID, and OTHER_RESOURCE, with these settings."""
    with serving_oauth(
        prefix,
        [RESOURCE, OTHER_RESOURCE],
        oauth_resource_workloads=[f"{RESOURCE}={MCP_ID}"],
        **settings,
    ) as server:
        yield server


def task_world(oauth: OAuthServer) -> TaskWorld:
    # The task may reach both resources: the MCP server's, and the one it calls on.
    return begin_task(oauth, resources=(oauth.issuer, RESOURCE, OTHER_RESOURCE))


@pytest.fixture
def oauth_server() -> Iterator[OAuthServer]:
    with serving_delegation("odl") as server:
        yield server


@pytest.fixture
def world(oauth_server: OAuthServer) -> TaskWorld:
    return task_world(oauth_server)


def actor_token(oauth: OAuthServer, spiffe_id: str = MCP_ID) -> str:
    signer = oauth.running.server.ca.jwt_signer()
    return str(signer.sign(SpiffeId.parse(spiffe_id), [oauth.issuer], 60).token)


def delegate(
    world: TaskWorld, subject: str, actor: str, resource: str = OTHER_RESOURCE, **extra: str
) -> httpx.Response:
    form = {
        "grant_type": EXCHANGE,
        "subject_token": subject,
        "subject_token_type": ACCESS_TYPE,
        "actor_token": actor,
        "actor_token_type": JWT_TYPE,
        "resource": resource,
        **extra,
    }
    oauth = world.oauth
    return httpx.post(oauth.issuer + "/token", data=form, verify=oauth.ssl_context())


def exchange_events(world: TaskWorld) -> list[dict[str, Any]]:
    return [{**e, **json.loads(e.get("extra") or "{}")} for e in world.events(EXCHANGE_KIND)]


EXCHANGE_KIND = "oauth_token_exchange"


def refused(reply: httpx.Response, error: str, words: str) -> None:
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == error
    assert words in reply.json()["error_description"]


def test_the_resource_workload_acts_for_the_task_towards_another_resource(
    world: TaskWorld,
) -> None:
    first = world.exchange().json()["access_token"]
    assert world.decode(first, RESOURCE)["may_act"] == {"sub": MCP_ID}
    reply = delegate(world, first, actor_token(world.oauth))
    assert reply.status_code == 200, reply.text
    claims = world.decode(reply.json()["access_token"], OTHER_RESOURCE)
    task = world.task
    assert claims["sub"] == "user:alice"  # still the principal the task works for
    assert claims["act"] == {"sub": MCP_ID, "act": {"sub": task.spiffe_id}}
    assert claims["client_id"] == MCP_ID
    assert claims["txn"] == task.task_id
    assert claims["scope"] == "read"  # the task's grant on this resource, decided afresh
    assert "may_act" not in claims  # nobody serves OTHER_RESOURCE in this config
    event = exchange_events(world)[-1]
    assert event["decision"] == "allow"
    assert event["actor"] == MCP_ID
    assert event["task_id"] == task.task_id
    assert event["credential_id"] == claims["jti"]
    assert event["subject_jti"] == world.decode(first, RESOURCE)["jti"]
    store = world.oauth.running.server.datastore
    assert claims["jti"] in {c.value for c in store.task_credentials(task.task_id, 0)}

    # The task ends: the delegated token is revoked with it, and no delegation is granted.
    running = world.oauth.running
    running.call(running.server.tasks.service.end(world.agent, task.task_id, ()))
    revoked = {r.value for r in running.server.state.revocations if r.kind == REVOKED_JWT_ID}
    assert claims["jti"] in revoked
    refused(delegate(world, first, actor_token(world.oauth)), "invalid_grant", "")


def test_the_resource_workload_gets_a_txn_token_for_the_task(world: TaskWorld) -> None:
    # The Txn-Token draft's case: the workload that received the task's access token calls on
    # inside the trust domain, for the same transaction, as the requesting workload.
    first = world.exchange().json()["access_token"]
    reply = delegate(world, first, actor_token(world.oauth), requested_token_type=TXN_TYPE)
    assert reply.status_code == 200, reply.text
    assert reply.json()["issued_token_type"] == TXN_TYPE
    token = reply.json()["access_token"]
    assert pyjwt.get_unverified_header(token)["typ"] == "txntoken+jwt"
    claims = world.decode(token, "example.org")  # a Txn-Token's audience is the trust domain
    task = world.task
    assert claims["sub"] == "user:alice"
    assert claims["txn"] == task.task_id
    assert claims["req_wl"] == MCP_ID
    assert claims["rctx"] == {"authn": "spiffe-jwt-svid", "req_wl": MCP_ID}
    assert claims["act"] == {"sub": MCP_ID, "act": {"sub": task.spiffe_id}}
    assert claims["tctx"]["resource"] == OTHER_RESOURCE
    assert claims["scope"] == "read"  # decided afresh for OTHER_RESOURCE
    assert "may_act" not in claims
    event = exchange_events(world)[-1]
    assert (event["decision"], event["actor"], event["token_type"]) == ("allow", MCP_ID, TXN_TYPE)
    store = world.oauth.running.server.datastore
    assert claims["jti"] in {c.value for c in store.task_credentials(task.task_id, 0)}
    # Another workload cannot ask for one.
    refused(
        delegate(world, first, actor_token(world.oauth, OTHER_ID), requested_token_type=TXN_TYPE),
        "invalid_grant",
        "serves no resource",
    )


def test_only_the_workload_serving_the_resource_may_act(world: TaskWorld) -> None:
    first = world.exchange().json()["access_token"]
    refused(
        delegate(world, first, actor_token(world.oauth, OTHER_ID)),
        "invalid_grant",
        "serves no resource",
    )
    # A token for another resource (no may_act for MCP_ID), or a JWT-SVID, is not acted for.
    other = world.exchange(OTHER_RESOURCE).json()["access_token"]
    refused(
        delegate(world, other, actor_token(world.oauth)),
        "invalid_grant",
        "not an access token for a resource of the actor",
    )
    refused(
        delegate(world, world.subject_token(), actor_token(world.oauth)),
        "invalid_grant",
        "not an access token for a resource of the actor",
    )
    denials = [e for e in exchange_events(world) if e["decision"] == "deny"]
    assert len(denials) == 3
    assert all("invalid_grant" in e["reason"] for e in denials)


def test_the_actor_token_its_agent_caches_serves_again(world: TaskWorld) -> None:
    # An actor token proves who acts (the JWT-SVID a workload's agent hands out until half its
    # life); it is not a grant, so it is not used up. The subject token may be acted for again.
    first = world.exchange().json()["access_token"]
    actor = actor_token(world.oauth)
    one = delegate(world, first, actor)
    two = delegate(world, first, actor)
    assert one.status_code == two.status_code == 200, two.text
    jtis = {world.decode(r.json()["access_token"], OTHER_RESOURCE)["jti"] for r in (one, two)}
    assert len(jtis) == 2
    # Still checked as a JWT-SVID: one for another audience is refused.
    signer = world.oauth.running.server.ca.jwt_signer()
    elsewhere = signer.sign(SpiffeId.parse(MCP_ID), ["https://else.example"], 60).token
    refused(delegate(world, first, str(elsewhere)), "invalid_grant", "actor_token refused")


def test_a_revoked_subject_token_is_not_acted_for(world: TaskWorld) -> None:
    first = world.exchange().json()["access_token"]
    jti = world.decode(first, RESOURCE)["jti"]
    running = world.oauth.running
    now = int(time.time())
    revocation = Revocation(REVOKED_JWT_ID, jti, "", now + 600, "test", now)
    running.call(running.server.state.add_revocations((revocation,)))
    refused(delegate(world, first, actor_token(world.oauth)), "invalid_grant", "revoked")


def test_a_resource_outside_the_task_is_refused_by_the_task_decision(
    oauth_server: OAuthServer,
) -> None:
    world = begin_task(oauth_server)  # its intent names RESOURCE, not OTHER_RESOURCE
    first = world.exchange().json()["access_token"]
    refused(delegate(world, first, actor_token(oauth_server)), "invalid_grant", "task decision")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"subject_token_type": JWT_TYPE}, "subject_token_type must be"),
        ({"actor_token_type": ACCESS_TYPE}, "actor_token_type must be"),
        ({"requested_token_type": "urn:ietf:params:oauth:token-type:id_token"}, "or a Txn-Token"),
        ({"actor_token": ""}, "actor_token: exactly one value"),
    ],
)
def test_a_malformed_delegation_is_refused(
    world: TaskWorld, change: dict[str, str], words: str
) -> None:
    first = world.exchange().json()["access_token"]
    form = {
        "grant_type": EXCHANGE,
        "subject_token": first,
        "subject_token_type": ACCESS_TYPE,
        "actor_token": actor_token(world.oauth),
        "actor_token_type": JWT_TYPE,
        "resource": OTHER_RESOURCE,
        **change,
    }
    oauth = world.oauth
    reply = httpx.post(oauth.issuer + "/token", data=form, verify=oauth.ssl_context())
    refused(reply, "invalid_request", words)
    assert exchange_events(world)[-1]["decision"] == "deny"


def test_a_token_that_names_another_actor_in_may_act_is_not_acted_for(world: TaskWorld) -> None:
    # Issued while another workload served the resource (or before any did): its may_act, not
    # today's config alone, says who may act for it.
    task = world.task
    claims = {"client_id": task.runtime_id, "scope": "read", "act": {"sub": task.spiffe_id}}
    signer = world.oauth.running.server.ca.jwt_signer()
    now = int(world.oauth.running.server.clock.now())
    for may_act in ({"sub": OTHER_ID}, None):
        extra = {**claims, "txn": task.task_id}
        if may_act is not None:
            extra["may_act"] = may_act
        token = signer.mint_access_token("user:alice", RESOURCE, 60, now, extra).token
        refused(delegate(world, token, actor_token(world.oauth)), "invalid_grant", "may_act")


THIRD = "https://ledger.example/api"


@contextmanager
def three_resources(prefix: str, workloads: list[str]) -> Iterator[TaskWorld]:
    """A server for RESOURCE, OTHER_RESOURCE and THIRD with these resource workloads, and a
    task that may reach all three."""
    with serving_oauth(
        prefix, [RESOURCE, OTHER_RESOURCE, THIRD], oauth_resource_workloads=workloads
    ) as oauth:
        yield begin_task(oauth, resources=(oauth.issuer, RESOURCE, OTHER_RESOURCE, THIRD))


def test_a_delegated_token_can_be_acted_for_again_by_the_next_resource_workload() -> None:
    workloads = [f"{RESOURCE}={MCP_ID}", f"{OTHER_RESOURCE}={OTHER_ID}"]
    with three_resources("od2", workloads) as world:
        oauth = world.oauth
        first = world.exchange().json()["access_token"]
        second = delegate(world, first, actor_token(oauth)).json()["access_token"]
        assert world.decode(second, OTHER_RESOURCE)["may_act"] == {"sub": OTHER_ID}
        reply = delegate(world, second, actor_token(oauth, OTHER_ID), THIRD)
        assert reply.status_code == 200, reply.text
        claims = world.decode(reply.json()["access_token"], THIRD)
        task = world.task
        assert claims["act"] == {
            "sub": OTHER_ID,
            "act": {"sub": MCP_ID, "act": {"sub": task.spiffe_id}},
        }
        assert claims["sub"] == "user:alice"
        assert claims["txn"] == task.task_id
        # The first workload cannot skip a hop: the second token is not for a resource it serves.
        refused(
            delegate(world, second, actor_token(oauth), THIRD), "invalid_grant", "not an access"
        )


class _Downstream:
    """The resource the workload calls on the task's behalf: answers 200, keeps each
    request's Authorization header."""

    def __init__(self) -> None:
        seen: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.headers.get("Authorization", ""))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.seen = seen
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/orders/7"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def tokens(self) -> list[str]:
        return [h.removeprefix("Bearer ") for h in self.seen]


@pytest.fixture
def downstream() -> Iterator[_Downstream]:
    served = _Downstream()
    yield served
    served.server.shutdown()
    served.server.server_close()


def test_delegated_auth_sends_the_delegated_token_and_keeps_it(
    world: TaskWorld, downstream: _Downstream
) -> None:
    first = world.exchange().json()["access_token"]
    oauth = world.oauth
    actors: list[str] = []

    def own_jwt(audience: str) -> str:  # what a WorkloadApiClient gives: this workload's own
        actors.append(audience)
        return actor_token(oauth)

    auth = svid.httpx.DelegatedAuth(own_jwt, oauth.issuer, first, OTHER_RESOURCE)
    with httpx.Client(verify=oauth.ssl_context(), auth=auth) as http_client:
        assert http_client.get(downstream.url).status_code == 200
        assert http_client.get(downstream.url).status_code == 200
    one, two = downstream.tokens()
    assert one == two  # kept, not exchanged per request
    claims = world.decode(one, OTHER_RESOURCE)
    assert claims["act"] == {"sub": MCP_ID, "act": {"sub": world.task.spiffe_id}}
    assert actors == [oauth.issuer]
    delegations = [e for e in exchange_events(world) if e.get("actor") == MCP_ID]
    assert len(delegations) == 1


def test_delegated_auth_raises_the_refusal_and_sends_nothing(
    world: TaskWorld, downstream: _Downstream
) -> None:
    first = world.exchange().json()["access_token"]
    oauth = world.oauth
    auth = svid.httpx.DelegatedAuth(
        lambda audience: actor_token(oauth, OTHER_ID), oauth.issuer, first, OTHER_RESOURCE
    )
    with (
        httpx.Client(verify=oauth.ssl_context(), auth=auth) as http_client,
        pytest.raises(svid.httpx.TokenExchangeError) as caught,
    ):
        http_client.get(downstream.url)
    assert caught.value.error == "invalid_grant"
    assert "serves no resource" in caught.value.description
    assert downstream.seen == []


def test_delegated_auth_in_an_asyncio_client(world: TaskWorld, downstream: _Downstream) -> None:
    first = world.exchange().json()["access_token"]
    oauth = world.oauth

    async def own_jwt(audience: str) -> str:
        return actor_token(oauth)

    async def call() -> int:
        auth = svid.httpx.DelegatedAuth(own_jwt, oauth.issuer, first, OTHER_RESOURCE)
        async with httpx.AsyncClient(verify=oauth.ssl_context(), auth=auth) as http_client:
            return (await http_client.get(downstream.url)).status_code

    assert asyncio.run(call()) == 200
    (token,) = downstream.tokens()
    assert world.decode(token, OTHER_RESOURCE)["client_id"] == MCP_ID


def test_delegated_auth_exchanges_again_at_half_the_tokens_life(
    world: TaskWorld, downstream: _Downstream
) -> None:
    first = world.exchange().json()["access_token"]
    oauth = world.oauth
    clock = svid.FakeClock()
    auth = svid.httpx.DelegatedAuth(
        lambda audience: actor_token(oauth), oauth.issuer, first, OTHER_RESOURCE, clock=clock
    )
    with httpx.Client(verify=oauth.ssl_context(), auth=auth) as http_client:
        http_client.get(downstream.url)
        life = world.decode(downstream.tokens()[0], OTHER_RESOURCE)
        clock.advance((life["exp"] - life["iat"]) / 2 - 1)
        http_client.get(downstream.url)
        clock.advance(2)
        http_client.get(downstream.url)
    one, two, three = downstream.tokens()
    assert one == two != three


def test_a_workload_serving_several_resources_acts_for_tokens_of_each() -> None:
    with three_resources("od3", [f"{RESOURCE}={MCP_ID}", f"{THIRD}={MCP_ID}"]) as world:
        for resource in (RESOURCE, THIRD):
            received = world.exchange(resource).json()["access_token"]
            reply = delegate(world, received, actor_token(world.oauth))
            assert reply.status_code == 200, reply.text


def test_audiences_named_reads_only_an_access_tokens_aud() -> None:
    from server.oauth.grants import _audiences_named
    from svid import sign_jws
    from tests.svid.certs import ec_key

    key = ec_key()
    header = {"kid": "k", "typ": "at+jwt"}
    one = sign_jws(header, {"aud": "https://a.example"}, key)
    two = sign_jws(header, {"aud": ["https://a.example", 7, "https://b.example"]}, key)
    assert _audiences_named(one) == ("https://a.example",)
    assert _audiences_named(two) == ("https://a.example", "https://b.example")
    assert _audiences_named(sign_jws(header, {"aud": 7}, key)) == ()
    assert _audiences_named("not.a.token") == ()


def test_a_delegated_token_expires_with_the_token_acted_for_at_the_latest() -> None:
    """Its revocation with an agent holding the token acted for follows the ledger's link to
    that one, kept only while a verifier may accept it: so it never outlives it. One presented
    past its expiry (within the verifier's leeway) buys nothing."""
    with serving_delegation("odt", oauth_access_token_ttl=60) as oauth:
        world = task_world(oauth)
        first = world.exchange().json()["access_token"]
        first_exp = world.decode(first, RESOURCE)["exp"]
        clock = oauth.running.clock
        clock.advance(20)
        reply = delegate(world, first, actor_token(oauth))
        assert reply.status_code == 200, reply.text
        claims = world.decode(reply.json()["access_token"], OTHER_RESOURCE)
        assert claims["exp"] == first_exp  # not 20 seconds later, as its own ttl would have it
        assert reply.json()["expires_in"] == first_exp - claims["iat"]

        clock.advance(first_exp - int(clock.now()) + 1)
        # Past its exp, still within the verifier's leeway: refused all the same.
        refused(delegate(world, first, actor_token(oauth)), "invalid_grant", "subject_token has")


@contextmanager
def delegating_on_a_budget(prefix: str, burst: int) -> Iterator[tuple[TaskWorld, str, str]]:
    """(the task's world, its access token for RESOURCE, MCP_ID's actor token) on a server
    giving the task's agent `burst` pairs, refilled at half a pair a second. The token's
    exchange spends three of them: a mint and an exchange."""
    with serving_delegation(
        prefix, task_mint_pairs_rate_per_agent=0.5, task_mint_pairs_burst_per_agent=burst
    ) as oauth:
        world = task_world(oauth)
        yield world, world.exchange().json()["access_token"], actor_token(oauth)


def test_delegations_past_the_tasks_agents_decision_budget_are_throttled_writing_nothing() -> None:
    # Four pairs for the actor's delegations for the task's agent, refilled at half a pair a
    # second: four delegations to OTHER_RESOURCE (read: one pair each) spend them.
    with delegating_on_a_budget("odb", burst=4) as (world, first, actor):
        oauth = world.oauth
        for _ in range(4):
            assert delegate(world, first, actor).status_code == 200
        oauth.running.clock.advance(1)  # a new second: decided again, half a pair is not enough
        datastore = oauth.running.server.datastore
        written = len(list(datastore.audit_rows()))
        for _ in range(3):
            reply = delegate(world, first, actor)
            assert reply.status_code == 429, reply.text
            assert reply.json()["error"] == "temporarily_unavailable"
        assert len(list(datastore.audit_rows())) == written
        oauth.running.clock.advance(2)
        assert delegate(world, first, actor).status_code == 200


def test_delegations_answered_from_policys_cache_are_charged_all_the_same() -> None:
    # A delegation asked again within the second is decided from policy's cache, which the
    # decision budget charged nothing for; yet nothing else bounds delegations (the actor
    # token is not used up, the subject token may be presented again), so an actor repeating
    # one got a signature, a credential row and an audit event per request without bound.
    with delegating_on_a_budget("odc", burst=4) as (world, first, actor):
        oauth = world.oauth
        for _ in range(4):  # the actor's four pairs: all but the first from policy's cache
            assert delegate(world, first, actor).status_code == 200
        store = oauth.running.server.datastore
        written = len(list(store.audit_rows()))
        credentials = len(store.task_credentials(world.task.task_id, 0))
        for _ in range(3):  # the same second: policy's cache would answer it
            reply = delegate(world, first, actor)
            assert reply.status_code == 429, reply.text
        assert len(list(store.audit_rows())) == written
        assert len(store.task_credentials(world.task.task_id, 0)) == credentials


def test_an_actors_delegations_are_throttled_on_a_budget_of_their_own_not_the_nodes() -> None:
    # Charged to the task's agent, every delegation charged: the workload serving a resource
    # a task called, repeating a delegation, spent that node's budget and its workloads' own
    # task JWT mints and exchanges were refused. Half a pair a second, a burst of eight.
    # The token's exchange spends three of the node's eight pairs.
    with delegating_on_a_budget("oda", burst=8) as (world, first, actor):
        oauth = world.oauth
        statuses = [delegate(world, first, actor).status_code for _ in range(10)]
        assert statuses == [200] * 8 + [429] * 2  # the actor's eight, then throttled
        oauth.running.clock.advance(1)  # a new second: nothing comes from policy's cache
        reply = world.exchange()  # a mint and an exchange, three pairs: the node has five
        assert reply.status_code == 200, reply.text
