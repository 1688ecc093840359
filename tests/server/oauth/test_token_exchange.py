"""RFC 8693 token exchange of a task JWT-SVID on a running server: a Cedar decision with the
task's intent, `sub` = the principal, `act` = the task, scope = what was granted, the token a
credential of the task (revoked when it ends); Txn-Tokens by requested_token_type."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import httpx
import jwt as pyjwt
import pytest

from server.datastore.records import REVOKED_JWT_ID, Entry
from server.errors import PermissionDeniedError
from server.tasks.model import Task, TaskState
from server.tasks.service import BeginRequest
from server.tasks.store import TaskStore
from tests.server.oauth.conftest import OTHER_RESOURCE, RESOURCE, OAuthServer, serving_oauth

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
TXN_TYPE = "urn:ietf:params:oauth:token-type:txn_token"
RUNTIME_PATH = "/agents/research-bot"


@dataclass
class TaskWorld:
    oauth: OAuthServer
    agent: Any
    task: Task
    entry: Entry

    def subject_token(self) -> str:
        server = self.oauth.running.server
        issued = self.oauth.running.call(
            server.issuer.issue_jwt(self.agent, self.entry, [self.oauth.issuer])
        )
        return str(issued.token)

    def exchange(self, resource: str = RESOURCE, **extra: str) -> httpx.Response:
        form = {
            "grant_type": EXCHANGE,
            "subject_token": self.subject_token(),
            "subject_token_type": JWT_TYPE,
            "resource": resource,
            **extra,
        }
        return httpx.post(self.oauth.issuer + "/token", data=form, verify=self.oauth.ssl_context())

    def events(self, kind: str) -> list[dict[str, Any]]:
        rows = self.oauth.running.server.datastore.audit_rows()
        return [r for r in rows if r["kind"] == kind]

    def decode(self, token: str, audience: str) -> dict[str, Any]:
        client = pyjwt.PyJWKClient(
            self.oauth.issuer + "/keys", ssl_context=self.oauth.ssl_context()
        )
        return pyjwt.decode(
            token,
            client.get_signing_key_from_jwt(token).key,
            algorithms=["ES256"],
            audience=audience,
            issuer=self.oauth.issuer,
        )


def begin_task(oauth: OAuthServer, **overrides: Any) -> TaskWorld:
    running = oauth.running
    attested = running.attest()
    runtime = running.create_entry(RUNTIME_PATH, attested.spiffe_id)
    agent = running.server.state.agents[attested.spiffe_id]
    values: dict[str, Any] = {
        "runtime_id": runtime.spiffe_id,
        "actions": ("read",),
        # The authorization server is a resource of the task: its subject token is for it.
        "resources": (oauth.issuer, RESOURCE),
        "tools": (f"{RESOURCE}#read_ticket",),
        "on_behalf_of": "user:alice",
        "ttl": 600,
    }
    values.update(overrides)
    task = running.call(running.server.tasks.service.begin(agent, BeginRequest(**values)))
    entry = running.server.state.entries.by_id[task.entry_id]
    return TaskWorld(oauth, agent, task, entry)


@pytest.fixture
def world(oauth_server: OAuthServer) -> TaskWorld:
    return begin_task(oauth_server)


def test_exchange_gives_the_principal_acted_for_by_the_task(world: TaskWorld) -> None:
    reply = world.exchange()
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    token = body["access_token"]
    assert pyjwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = world.decode(token, RESOURCE)
    task = world.task
    assert claims["sub"] == "user:alice"
    assert claims["act"] == {"sub": task.spiffe_id}
    assert claims["client_id"] == task.runtime_id
    assert claims["txn"] == task.task_id
    assert set(claims["scope"].split()) == {"read", "tool:read_ticket"}
    assert body["scope"] == claims["scope"]
    assert claims["exp"] - claims["iat"] <= 300
    (event,) = world.events("oauth_token_exchange")
    assert event["decision"] == "allow"
    assert event["task_id"] == task.task_id
    assert event["credential_id"] == claims["jti"]
    assert event["policy_set_hash"]
    store = world.oauth.running.server.datastore
    recorded = {c.value for c in store.task_credentials(task.task_id, 0)}
    assert claims["jti"] in recorded


def test_a_resource_outside_the_task_is_refused_by_the_task_decision(world: TaskWorld) -> None:
    reply = world.exchange(OTHER_RESOURCE)
    assert reply.status_code == 400
    assert reply.json()["error"] == "invalid_grant"
    assert "task decision" in reply.json()["error_description"]
    (refusal,) = world.events("oauth_token_exchange")
    assert refusal["decision"] == "deny"
    denials = [e for e in world.events("denial") if e["task_id"] == world.task.task_id]
    assert denials  # the task layer's own event, flagged as out of intent


def test_task_end_revokes_the_exchanged_token_and_refuses_new_ones(world: TaskWorld) -> None:
    token = world.exchange().json()["access_token"]
    jti = world.decode(token, RESOURCE)["jti"]
    subject = world.subject_token()
    running = world.oauth.running
    running.call(running.server.tasks.service.end(world.agent, world.task.task_id, ()))
    revoked = {r.value for r in running.server.state.revocations if r.kind == REVOKED_JWT_ID}
    assert jti in revoked
    form = {
        "grant_type": EXCHANGE,
        "subject_token": subject,
        "subject_token_type": JWT_TYPE,
        "resource": RESOURCE,
    }
    again = httpx.post(world.oauth.issuer + "/token", data=form, verify=world.oauth.ssl_context())
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"


def test_a_token_of_a_task_that_ends_while_it_is_issued_is_not_handed_out(
    world: TaskWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task ends after the exchange's decision, before its token is on record: the end's
    revocations cannot name it."""
    subject = world.subject_token()
    running = world.oauth.running
    service = running.server.tasks.service
    exchange_grant = service.exchange_grant

    def ending_after(spiffe_id: str, resource: str, **how: Any) -> Any:
        decided = exchange_grant(spiffe_id, resource, **how)
        running.call(service.end(world.agent, world.task.task_id, ()))
        return decided

    monkeypatch.setattr(service, "exchange_grant", ending_after)
    form = {
        "grant_type": EXCHANGE,
        "subject_token": subject,
        "subject_token_type": JWT_TYPE,
        "resource": RESOURCE,
    }
    reply = httpx.post(world.oauth.issuer + "/token", data=form, verify=world.oauth.ssl_context())
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == "invalid_grant"
    assert "ended while" in reply.json()["error_description"]


def test_a_token_of_a_task_another_server_ended_while_it_is_issued_is_refused(
    world: TaskWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task's end is claimed through another server after the exchange's decision, and
    this server has not heard of it (its memory still holds the task active): the ledger
    refuses the token's record, so it is refused as one of a task known ended, on record,
    with its assertion spent, and nothing of it is recorded for the end to have missed."""
    subject = world.subject_token()
    running = world.oauth.running
    service = running.server.tasks.service
    exchange_grant = service.exchange_grant
    # The change feed has not brought the end here (as on a server whose poll lags).
    monkeypatch.setattr(service, "apply_tasks", lambda loaded: None)

    def ended_elsewhere_after(spiffe_id: str, resource: str, **how: Any) -> Any:
        decided = exchange_grant(spiffe_id, resource, **how)
        # Another server's end claims the task's row (TaskService._finish, there).
        assert service.store.finish(world.task, TaskState.ENDED, 0, "ended") is not None
        return decided

    monkeypatch.setattr(service, "exchange_grant", ended_elsewhere_after)
    form = {
        "grant_type": EXCHANGE,
        "subject_token": subject,
        "subject_token_type": JWT_TYPE,
        "resource": RESOURCE,
    }
    post = functools.partial(
        httpx.post, world.oauth.issuer + "/token", data=form, verify=world.oauth.ssl_context()
    )
    reply = post()
    assert service.active_task(world.task.spiffe_id) is not None  # memory never heard
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == "invalid_grant"
    assert "ended while" in reply.json()["error_description"]
    (refusal,) = world.events("oauth_token_exchange")
    assert refusal["decision"] == "deny"
    assert "ended while" in refusal["reason"]
    recorded = running.server.datastore.task_credentials(world.task.task_id, 0)
    assert {c.spiffe_id for c in recorded} == {world.task.spiffe_id}  # the subject token only
    again = post()  # the assertion was spent with the refusal
    assert again.status_code == 400
    assert "ended while" not in again.json()["error_description"]


def test_txn_token_carries_the_task_context(world: TaskWorld) -> None:
    reply = world.exchange(requested_token_type=TXN_TYPE)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["issued_token_type"] == TXN_TYPE
    assert body["token_type"] == "N_A"
    token = body["access_token"]
    assert pyjwt.get_unverified_header(token)["typ"] == "txntoken+jwt"
    claims = world.decode(token, "example.org")
    assert claims["txn"] == world.task.task_id
    assert claims["sub"] == "user:alice"
    assert claims["req_wl"] == world.task.spiffe_id
    assert claims["tctx"]["resource"] == RESOURCE
    assert "rctx" in claims
    assert set(claims["scope"].split()) == {"read", "tool:read_ticket"}


def sub_task(parent: TaskWorld, **overrides: Any) -> TaskWorld:
    """A sub-task of `parent`, begun by its workload."""
    running = parent.oauth.running
    values: dict[str, Any] = {
        "runtime_id": parent.task.runtime_id,
        "actions": ("read",),
        "resources": (parent.oauth.issuer, RESOURCE),
        "tools": (f"{RESOURCE}#read_ticket",),
        "parent_task_id": parent.task.task_id,
        "runtime_entry_id": parent.task.runtime_entry_id,
        "ttl": 300,
    }
    values.update(overrides)
    service = running.server.tasks.service
    task = running.call(service.begin(parent.agent, BeginRequest(**values)))
    entry = running.server.state.entries.by_id[task.entry_id]
    return TaskWorld(parent.oauth, parent.agent, task, entry)


def test_a_task_cannot_declare_another_workload_as_its_principal(
    oauth_server: OAuthServer,
) -> None:
    """The principal is the `sub` of the task's exchanged tokens: another workload's SPIFFE ID
    there gave a token whose `sub` is what that workload's own JWT-bearer token carries. A
    SPIFFE ID is taken only when the task's chain proves it; refused at begin, on record."""
    world = begin_task(oauth_server)
    running = oauth_server.running
    billing = running.create_entry("/billing-service", world.agent.spiffe_id)
    store = running.server.datastore
    before = len(store.list_tasks())
    for posing in (
        billing.spiffe_id,
        billing.spiffe_id.upper(),
        f" {billing.spiffe_id}",
        "spiffe://other.example/billing-service",
        f"{world.task.spiffe_id}x",
    ):
        with pytest.raises(PermissionDeniedError) as refused:
            begin_task(oauth_server, on_behalf_of=posing)
        assert "intent.on_behalf_of" in str(refused.value)
        assert "the task's chain does not prove" in str(refused.value)
    assert len(store.list_tasks()) == before
    denials = [e for e in world.events("denial") if "on_behalf_of" in (e["reason"] or "")]
    assert denials[0]["on_behalf_of"] == billing.spiffe_id
    # A sub-task cannot name it either, declared or not: its parent's is the runtime's.
    parent = begin_task(oauth_server, on_behalf_of=world.task.runtime_id)
    with pytest.raises(PermissionDeniedError):
        sub_task(parent, on_behalf_of=billing.spiffe_id)


def test_a_sub_task_does_not_inherit_a_principal_its_chain_does_not_prove(
    oauth_server: OAuthServer,
) -> None:
    """A parent stored before the check may hold another workload as its principal: its
    sub-tasks, which inherit it, are refused rather than carry it on."""
    parent = begin_task(oauth_server)
    billing = oauth_server.running.create_entry("/billing-service", parent.agent.spiffe_id)
    parent.task = replace(parent.task, on_behalf_of=billing.spiffe_id)
    TaskStore(oauth_server.running.server.datastore).put_task(parent.task)
    with pytest.raises(PermissionDeniedError, match=r"intent\.on_behalf_of"):
        sub_task(parent, on_behalf_of="")


def test_a_sub_task_acts_for_the_runtime_its_chain_began_with(oauth_server: OAuthServer) -> None:
    """The runtime acting for itself, and its sub-tasks for it: proven by the chain, the
    exchanged tokens' `sub` (access and Txn-Token), `act` the task chain."""
    runtime_id = f"spiffe://example.org{RUNTIME_PATH}"
    parent = begin_task(oauth_server, on_behalf_of=runtime_id)
    child = sub_task(parent, on_behalf_of=runtime_id)
    assert child.task.on_behalf_of == runtime_id
    reply = child.exchange()
    assert reply.status_code == 200, reply.text
    claims = child.decode(reply.json()["access_token"], RESOURCE)
    assert claims["sub"] == runtime_id
    assert claims["act"] == {"sub": child.task.spiffe_id, "act": {"sub": parent.task.spiffe_id}}
    txn = child.exchange(requested_token_type=TXN_TYPE)
    assert txn.status_code == 200, txn.text
    txn_claims = child.decode(txn.json()["access_token"], "example.org")
    assert txn_claims["sub"] == runtime_id
    assert txn_claims["act"] == claims["act"]


def test_an_exchanged_token_always_names_its_acting_task(oauth_server: OAuthServer) -> None:
    """`act` marks a token as delegated whatever its `sub` says: a user as declared, or the
    runtime itself when the task works for nobody else."""
    txn = {"requested_token_type": TXN_TYPE}
    for principal, sub in (("user:alice", "user:alice"), ("", None)):
        world = begin_task(oauth_server, on_behalf_of=principal)
        for extra, audience in (({}, RESOURCE), (txn, "example.org")):
            reply = world.exchange(**extra)
            assert reply.status_code == 200, reply.text
            claims = world.decode(reply.json()["access_token"], audience)
            assert claims["sub"] == (sub or world.task.runtime_id)
            assert claims["act"] == {"sub": world.task.spiffe_id}


def test_a_workload_jwt_svid_cannot_be_exchanged(oauth_server: OAuthServer) -> None:
    from svid._spiffe_id import SpiffeId

    signer = oauth_server.running.server.ca.jwt_signer()
    token = signer.sign(SpiffeId.parse("spiffe://example.org/w"), [oauth_server.issuer], 60).token
    form = {
        "grant_type": EXCHANGE,
        "subject_token": token,
        "subject_token_type": JWT_TYPE,
        "resource": RESOURCE,
    }
    reply = httpx.post(oauth_server.issuer + "/token", data=form, verify=oauth_server.ssl_context())
    assert reply.status_code == 400
    assert reply.json()["error"] == "invalid_grant"


def test_a_task_assertion_in_the_jwt_bearer_grant_gets_the_task_decision(
    world: TaskWorld,
) -> None:
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "assertion": world.subject_token(),
        "resource": RESOURCE,
    }
    reply = httpx.post(world.oauth.issuer + "/token", data=form, verify=world.oauth.ssl_context())
    assert reply.status_code == 200, reply.text
    claims = world.decode(reply.json()["access_token"], RESOURCE)
    assert claims["sub"] == "user:alice"
    assert claims["act"] == {"sub": world.task.spiffe_id}
    assert set(claims["scope"].split()) == {"read", "tool:read_ticket"}
    (event,) = world.events("oauth_jwt_bearer")
    assert event["decision"] == "allow"
    assert event["task_id"] == world.task.task_id
    form["assertion"] = world.subject_token()
    form["resource"] = OTHER_RESOURCE
    refused = httpx.post(world.oauth.issuer + "/token", data=form, verify=world.oauth.ssl_context())
    assert refused.json()["error"] == "invalid_grant"


def test_a_subject_token_is_exchanged_once_per_resource_and_kind_of_token(
    oauth_server: OAuthServer,
) -> None:
    # A runtime's task JWT-SVID for the issuer is cached until half its life: it has to serve
    # for each resource the task reaches. The same exchange again is a replay.
    world = begin_task(oauth_server, resources=(oauth_server.issuer, RESOURCE, OTHER_RESOURCE))
    subject = world.subject_token()

    def exchange(resource: str, requested: str = "") -> httpx.Response:
        form = {
            "grant_type": EXCHANGE,
            "subject_token": subject,
            "subject_token_type": JWT_TYPE,
            "resource": resource,
        }
        if requested:
            form["requested_token_type"] = requested
        oauth = world.oauth
        return httpx.post(oauth.issuer + "/token", data=form, verify=oauth.ssl_context())

    assert exchange(RESOURCE).status_code == 200
    assert exchange(OTHER_RESOURCE).status_code == 200
    assert exchange(RESOURCE, TXN_TYPE).status_code == 200
    for again in (exchange(RESOURCE), exchange(RESOURCE, JWT_TYPE), exchange(RESOURCE, TXN_TYPE)):
        assert again.status_code == 400
        assert "replay" in again.json()["error_description"]


def test_a_task_jwt_svid_is_used_once_per_resource_whichever_grant_presents_it(
    oauth_server: OAuthServer,
) -> None:
    # RFC 7523's grant and RFC 8693's exchange take the same task JWT-SVID for the same
    # access token: one token per resource in all, not one per grant.
    world = begin_task(oauth_server, resources=(oauth_server.issuer, RESOURCE, OTHER_RESOURCE))
    subject = world.subject_token()
    oauth = world.oauth

    def bearer(resource: str) -> httpx.Response:
        form = {
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "assertion": subject,
            "resource": resource,
        }
        return httpx.post(oauth.issuer + "/token", data=form, verify=oauth.ssl_context())

    def exchange(resource: str) -> httpx.Response:
        form = {
            "grant_type": EXCHANGE,
            "subject_token": subject,
            "subject_token_type": JWT_TYPE,
            "resource": resource,
        }
        return httpx.post(oauth.issuer + "/token", data=form, verify=oauth.ssl_context())

    assert bearer(RESOURCE).status_code == 200
    assert exchange(OTHER_RESOURCE).status_code == 200
    for again in (exchange(RESOURCE), bearer(OTHER_RESOURCE), bearer(RESOURCE)):
        assert again.status_code == 400, again.text
        assert "replay" in again.json()["error_description"]
    assert len(world.events("oauth_jwt_bearer")) + len(world.events("oauth_token_exchange")) == 5


def test_a_task_jwt_svid_also_for_a_resource_is_not_traded_by_that_resource(
    oauth_server: OAuthServer,
) -> None:
    # Every audience of a JWT-SVID holds it: one for the issuer and a resource, presented to
    # that resource, would let its server trade it here as the task (for any resource the task
    # reaches) instead of acting for it by delegation, where it is named in `act`.
    world = begin_task(oauth_server, resources=(oauth_server.issuer, RESOURCE, OTHER_RESOURCE))
    running, oauth = oauth_server.running, world.oauth
    both = running.call(
        running.server.issuer.issue_jwt(world.agent, world.entry, [oauth.issuer, RESOURCE])
    )
    exchange = {"grant_type": EXCHANGE, "subject_token_type": JWT_TYPE}
    bearer = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}
    for form in ({**exchange, "subject_token": both.token}, {**bearer, "assertion": both.token}):
        form["resource"] = OTHER_RESOURCE
        reply = httpx.post(oauth.issuer + "/token", data=form, verify=oauth.ssl_context())
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"] == "invalid_grant"
        assert RESOURCE in reply.json()["error_description"]


def test_an_exchange_past_its_agents_decision_budget_is_throttled_writing_nothing() -> None:
    # Three pairs, refilled at half a pair a second: the subject tokens' mint (read on the
    # issuer, one pair, the second answered from policy's cache), then one exchange (read and
    # read_ticket on the resource, two pairs) spend it.
    budget = {"task_mint_pairs_rate_per_agent": 0.5, "task_mint_pairs_burst_per_agent": 3}
    with serving_oauth("oab", [RESOURCE, OTHER_RESOURCE], **budget) as oauth:
        world = begin_task(oauth)
        first, second = world.subject_token(), world.subject_token()
        form = {"grant_type": EXCHANGE, "subject_token_type": JWT_TYPE, "resource": RESOURCE}
        post = functools.partial(httpx.post, oauth.issuer + "/token", verify=oauth.ssl_context())
        assert post(data={**form, "subject_token": first}).status_code == 200
        clock = oauth.running.clock
        clock.advance(1)  # a new second: policy decides again, and half a pair is not enough
        written = len(list(oauth.running.server.datastore.audit_rows()))
        for _ in range(3):
            reply = post(data={**form, "subject_token": second})
            assert reply.status_code == 429, reply.text
            assert reply.json()["error"] == "temporarily_unavailable"
            assert "budget of task decisions" in reply.json()["error_description"]
        assert len(list(oauth.running.server.datastore.audit_rows())) == written
        # Refilled, the same subject token is exchanged: a throttled one is not used up.
        clock.advance(4)
        assert post(data={**form, "subject_token": second}).status_code == 200


def test_an_unsupported_requested_token_type_is_quoted_short(world: TaskWorld) -> None:
    """The refusal quoted the whole value sent, tens of kilobytes back in the answer (and in its
    event's reason, up to its cut): a refusal quotes what the request sent, cut, as for a
    resource or a grant type."""
    reply = world.exchange(requested_token_type="urn:x:" + "y" * 30_000)
    assert reply.status_code == 400, reply.text
    why = reply.json()["error_description"]
    assert "'urn:x:yyy" in why
    assert "not supported" in why
    assert len(why) < 300
