"""The token endpoint's `scope` parameter (RFC 6749 §3.3, RFC 8693 §2.1) on a running server:
a task's token carries the tokens asked for when its decision grants each (the step-up an MCP
client makes after insufficient_scope), anything more is invalid_scope, audited, and leaves the
JWT-SVID presented unspent; a workload's own grant carries no scope, and asking one is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from svid._spiffe_id import SpiffeId
from tests.server.oauth.conftest import OTHER_RESOURCE, RESOURCE, OAuthServer, serving_oauth
from tests.server.oauth.test_token_delegation import (
    MCP_ID,
    OTHER_ID,
    THIRD,
    actor_token,
    delegate,
    exchange_events,
    serving_delegation,
    task_world,
)
from tests.server.oauth.test_token_exchange import EXCHANGE, JWT_TYPE, TaskWorld, begin_task

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def post(oauth: OAuthServer, **form: str) -> httpx.Response:
    return httpx.post(oauth.issuer + "/token", data=form, verify=oauth.ssl_context())


def bearer(world: TaskWorld, assertion: str, **extra: str) -> httpx.Response:
    form = {"grant_type": JWT_BEARER, "assertion": assertion, "resource": RESOURCE}
    return post(world.oauth, **{**form, **extra})


def exchange(world: TaskWorld, subject: str, **extra: str) -> httpx.Response:
    form = {
        "grant_type": EXCHANGE,
        "subject_token": subject,
        "subject_token_type": JWT_TYPE,
        "resource": RESOURCE,
    }
    return post(world.oauth, **{**form, **extra})


@contextmanager
def serving_two_workloads(
    prefix: str, resources: list[str], **settings: Any
) -> Iterator[OAuthServer]:
    """A server for `resources` (with these settings) where MCP_ID serves RESOURCE and OTHER_ID
    serves OTHER_RESOURCE: a token may be acted for one hop, and again from there."""
    workloads = [f"{RESOURCE}={MCP_ID}", f"{OTHER_RESOURCE}={OTHER_ID}"]
    with serving_oauth(prefix, resources, oauth_resource_workloads=workloads, **settings) as oauth:
        yield oauth


def refused(reply: httpx.Response, error: str) -> str:
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == error
    return str(reply.json()["error_description"])


def events(world: TaskWorld, kind: str) -> list[dict[str, Any]]:
    return [{**e, **json.loads(e.get("extra") or "{}")} for e in world.events(kind)]


@pytest.fixture
def world(oauth_server: OAuthServer) -> TaskWorld:
    return begin_task(oauth_server)


@pytest.mark.parametrize("grant", [bearer, exchange])
def test_a_task_token_carries_only_the_scope_asked_for(world: TaskWorld, grant: Any) -> None:
    reply = grant(world, world.subject_token(), scope="tool:read_ticket")
    assert reply.status_code == 200, reply.text
    assert reply.json()["scope"] == "tool:read_ticket"
    claims = world.decode(reply.json()["access_token"], RESOURCE)
    assert claims["scope"] == "tool:read_ticket"
    kind = "oauth_jwt_bearer" if grant is bearer else "oauth_token_exchange"
    (event,) = events(world, kind)
    assert (event["decision"], event["action"]) == ("allow", "tool:read_ticket")
    # Asked twice, in any order: each granted token once, in the order asked.
    reply = grant(world, world.subject_token(), scope="tool:read_ticket read read")
    assert reply.status_code == 200, reply.text
    assert reply.json()["scope"] == "tool:read_ticket read"


@pytest.mark.parametrize("grant", [bearer, exchange])
def test_a_narrowed_token_s_event_names_the_decision_s_grant_too(
    world: TaskWorld, grant: Any
) -> None:
    """The event of an exchange named the task decision's grant (its action); asked for less,
    it names what was issued, and the decision is kept beside it, as policy made it."""
    reply = grant(world, world.subject_token(), scope="tool:read_ticket")
    assert reply.status_code == 200, reply.text
    kind = "oauth_jwt_bearer" if grant is bearer else "oauth_token_exchange"
    (event,) = events(world, kind)
    assert event["action"] == "tool:read_ticket"
    assert set(event["granted"].split()) == {"read", "tool:read_ticket"}
    # Not asked for less: the action is the grant, named once.
    whole = grant(world, world.subject_token())
    assert whole.status_code == 200, whole.text
    assert set(events(world, kind)[-1]["action"].split()) == {"read", "tool:read_ticket"}
    assert "granted" not in events(world, kind)[-1]


def test_a_txn_token_carries_only_the_scope_asked_for(world: TaskWorld) -> None:
    txn = "urn:ietf:params:oauth:token-type:txn_token"
    reply = exchange(world, world.subject_token(), scope="read", requested_token_type=txn)
    assert reply.status_code == 200, reply.text
    assert reply.json()["scope"] == "read"


def test_invoke_tool_narrows_to_the_tool_asked_for(oauth_server: OAuthServer) -> None:
    world = begin_task(oauth_server, actions=("read", "invoke_tool"), tools=())
    whole = exchange(world, world.subject_token())
    assert whole.status_code == 200, whole.text
    assert set(whole.json()["scope"].split()) == {"read", "invoke_tool"}
    for grant in (bearer, exchange):
        reply = grant(world, world.subject_token(), scope="tool:close_ticket")
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "tool:close_ticket"
        claims = world.decode(reply.json()["access_token"], RESOURCE)
        assert claims["scope"] == "tool:close_ticket"  # not every tool: only the one asked


@pytest.mark.parametrize("grant", [bearer, exchange])
def test_a_scope_beyond_the_grant_is_refused_audited_and_leaves_the_jwt_svid_unspent(
    world: TaskWorld, grant: Any
) -> None:
    subject = world.subject_token()
    reply = grant(world, subject, scope="read tool:close_ticket write")
    why = refused(reply, "invalid_scope")
    assert "tool:close_ticket write" in why
    assert "read " not in why  # granted: not named among those refused
    kind = "oauth_jwt_bearer" if grant is bearer else "oauth_token_exchange"
    (refusal,) = events(world, kind)
    assert refusal["decision"] == "deny"
    assert "invalid_scope" in refusal["reason"]
    assert "tool:close_ticket" in refusal["reason"]
    # No token was issued for it: the same JWT-SVID gets one without a scope, once.
    again = grant(world, subject)
    assert again.status_code == 200, again.text
    assert set(again.json()["scope"].split()) == {"read", "tool:read_ticket"}
    assert "replay" in refused(grant(world, subject), "invalid_grant")


def test_a_delegation_carries_only_the_scope_asked_for_and_no_more() -> None:
    with serving_delegation("osd") as oauth:
        world = task_world(oauth)
        first = world.exchange().json()["access_token"]
        reply = delegate(world, first, actor_token(oauth), scope="tool:read_ticket")
        assert "tool:read_ticket" in refused(reply, "invalid_scope")
        assert exchange_events(world)[-1]["decision"] == "deny"
        reply = delegate(world, first, actor_token(oauth), scope="read")
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "read"
        event = exchange_events(world)[-1]
        assert (event["actor"], event["action"]) == (MCP_ID, "read")
        assert event["granted"].split() == ["read"]  # the decision for the other resource


def test_a_delegation_hands_on_no_action_its_narrowed_subject_token_was_kept_from() -> None:
    """A token narrowed with `scope` and then acted for towards another resource got the
    task's whole decision there: the workload holding it had more of the task than the client
    gave it. Actions are the task's on each resource of its intent, so one the token could
    have carried and does not is not handed on; tools are of one resource each, and a resource
    reached by tools alone carries no action, so neither limits the other's grant."""
    with serving_delegation("osn") as oauth:
        world = begin_task(
            oauth, actions=("read", "write"), resources=(oauth.issuer, RESOURCE, OTHER_RESOURCE)
        )
        narrow = exchange(world, world.subject_token(), scope="read tool:read_ticket")
        reply = delegate(world, narrow.json()["access_token"], actor_token(oauth))
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "read"  # not write, which the client kept from it
        assert world.decode(reply.json()["access_token"], OTHER_RESOURCE)["scope"] == "read"
        event = exchange_events(world)[-1]
        assert set(event["granted"].split()) == {"read", "write"}  # the decision, on record
        # Asked for back, it is not granted either.
        reply = delegate(world, narrow.json()["access_token"], actor_token(oauth), scope="write")
        assert "write" in refused(reply, "invalid_scope")
        # Narrowed to a tool alone: no action of the task is left to hand on.
        world = task_world(oauth)
        narrow = exchange(world, world.subject_token(), scope="tool:read_ticket")
        reply = delegate(world, narrow.json()["access_token"], actor_token(oauth))
        assert "lacks read" in refused(reply, "invalid_grant")
        assert exchange_events(world)[-1]["decision"] == "deny"
        # Not narrowed: the decision for the other resource, whole.
        whole = world.exchange().json()["access_token"]
        reply = delegate(world, whole, actor_token(oauth))
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "read"
        assert "granted" not in exchange_events(world)[-1]
        # The tickets server reached by its tool alone: its token never carries an action,
        # narrowed or not, so the task's read on the other resource is handed on.
        world = begin_task(oauth, resources=(oauth.issuer, OTHER_RESOURCE))
        narrow = exchange(world, world.subject_token(), scope="tool:read_ticket")
        assert narrow.status_code == 200, narrow.text
        reply = delegate(world, narrow.json()["access_token"], actor_token(oauth))
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "read"


def test_a_token_acted_for_back_at_its_own_resource_hands_on_no_tool_it_was_kept_from() -> None:
    """Tools are of one resource each, so a token for another resource limits none of them;
    but a token its client narrowed to read, acted for by its own server towards that same
    resource, or through a neighbour back to it, came out with the tool it was kept from."""
    with serving_two_workloads("ort", [RESOURCE, OTHER_RESOURCE]) as oauth:
        world = task_world(oauth)
        narrow = exchange(world, world.subject_token(), scope="read").json()["access_token"]
        reply = delegate(world, narrow, actor_token(oauth), RESOURCE)
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "read"  # not tool:read_ticket, kept from it
        assert world.decode(reply.json()["access_token"], RESOURCE)["scope"] == "read"
        assert set(exchange_events(world)[-1]["granted"].split()) == {"read", "tool:read_ticket"}
        # Through the orders API and back: the token held there is not shown, no tool comes.
        orders = delegate(world, narrow, actor_token(oauth)).json()["access_token"]
        reply = delegate(world, orders, actor_token(oauth, OTHER_ID), RESOURCE)
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "read"
        # A token that holds the tool hands it on to its own resource.
        whole = world.exchange().json()["access_token"]
        reply = delegate(world, whole, actor_token(oauth), RESOURCE)
        assert set(reply.json()["scope"].split()) == {"read", "tool:read_ticket"}
        # As does one granted every tool, for each tool there.
        world = begin_task(
            oauth,
            actions=("read", "invoke_tool"),
            tools=(),
            resources=(oauth.issuer, RESOURCE, OTHER_RESOURCE),
        )
        every = exchange(world, world.subject_token(), scope="invoke_tool").json()
        reply = delegate(world, every["access_token"], actor_token(oauth), RESOURCE)
        assert reply.json()["scope"] == "invoke_tool"  # read was kept from it


def _forbidding_writes_to(tmp_path: Path, resource: str) -> Path:
    """A policy directory: the shipped policy, and writes to ``resource`` forbidden."""
    import server.policy

    policy = tmp_path / "policy"
    policy.mkdir()
    shipped = (Path(server.policy.__file__).parent / "default.cedar").read_text()
    forbid = f'forbid (principal, action == Action::"write", resource == Resource::"{resource}");'
    (policy / "default.cedar").write_text(f'{shipped}\n@id("no_writes")\n{forbid}\n')
    return policy


def test_an_action_policy_kept_from_the_subject_tokens_resource_is_handed_on(
    tmp_path: Path,
) -> None:
    """Policy keeps writes off the tickets server and lets the task write to the orders API:
    the tickets server's token lacks write, as its resource's decision says, not because the
    client kept it from it, and the workload acting for it is handed the task's decision at
    the orders API whole. (Read as narrowed, it got read alone: least privilege per resource,
    the usual policy, took from every delegation what the task was granted.) A token the
    client did narrow is still handed on no more (the test above)."""
    policy = _forbidding_writes_to(tmp_path, RESOURCE)
    with serving_delegation("opk", policy_dir=str(policy)) as oauth:
        world = begin_task(
            oauth, actions=("read", "write"), resources=(oauth.issuer, RESOURCE, OTHER_RESOURCE)
        )
        whole = world.exchange().json()
        assert set(whole["scope"].split()) == {"read", "tool:read_ticket"}  # policy's
        reply = delegate(world, whole["access_token"], actor_token(oauth))
        assert reply.status_code == 200, reply.text
        assert set(reply.json()["scope"].split()) == {"read", "write"}
        assert "granted" not in exchange_events(world)[-1]
        # Narrowed by the client to a tool: read is kept from it, write was never its to keep.
        narrow = exchange(world, world.subject_token(), scope="tool:read_ticket")
        reply = delegate(world, narrow.json()["access_token"], actor_token(oauth))
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "write"


def test_a_delegated_token_policy_kept_an_action_from_hands_it_on_no_more(
    tmp_path: Path,
) -> None:
    """A token the client narrowed to read, acted for towards the orders API, where policy
    forbids writes: the delegated token lacks write, and the orders API's decision does not
    grant it either, so its lack did not tell whether its chain was kept from write. Acted for
    again, it got write at the third resource. A delegated token hands on the actions it holds,
    no more."""
    policy = _forbidding_writes_to(tmp_path, OTHER_RESOURCE)
    with serving_two_workloads(
        "osp", [RESOURCE, OTHER_RESOURCE, THIRD], policy_dir=str(policy)
    ) as oauth:
        world = begin_task(
            oauth,
            actions=("read", "write"),
            resources=(oauth.issuer, RESOURCE, OTHER_RESOURCE, THIRD),
        )
        narrow = exchange(world, world.subject_token(), scope="read").json()["access_token"]
        reply = delegate(world, narrow, actor_token(oauth))
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "read"
        orders = reply.json()["access_token"]
        reply = delegate(world, orders, actor_token(oauth, OTHER_ID), THIRD)
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "read"  # not write, which the client kept from it


def test_a_delegated_token_hands_on_no_action_its_chain_was_kept_from() -> None:
    """A token narrowed with `scope`, acted for towards a resource the task reaches by its tools
    alone, came out with those tools and no action (none is the task's there); acted for again
    from there, it limited nothing, and the third resource got the task's whole decision: the
    action the client kept from the first token came back two hops on. Then, read as a token
    that hands on only the actions it holds, it handed on none, the task's read it was never
    kept from included: a chain through such a resource, narrowed or not, lost every action.
    Each token a workload may act for names the actions its chain was kept from (`withheld`):
    those, and only those, are handed on no further, however many hops on."""
    with serving_two_workloads("osc", [RESOURCE, OTHER_RESOURCE, THIRD]) as oauth:
        world = begin_task(
            oauth,
            actions=("read", "write"),
            resources=(oauth.issuer, RESOURCE, THIRD),  # the orders API by its tool alone
            tools=(f"{RESOURCE}#read_ticket", f"{OTHER_RESOURCE}#list_orders"),
        )
        narrow = exchange(world, world.subject_token(), scope="read").json()["access_token"]
        reply = delegate(world, narrow, actor_token(oauth))
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "tool:list_orders"
        orders = reply.json()["access_token"]
        reply = delegate(world, orders, actor_token(oauth, OTHER_ID), THIRD)
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "read"  # not write, kept from the chain two hops back
        assert set(exchange_events(world)[-1]["granted"].split()) == {"read", "write"}
        assert world.decode(narrow, RESOURCE)["withheld"] == ["write"]
        assert world.decode(orders, OTHER_RESOURCE)["withheld"] == ["write"]
        # Not narrowed: the third resource's decision, whole.
        whole = world.exchange().json()["access_token"]
        assert world.decode(whole, RESOURCE)["withheld"] == []
        orders = delegate(world, whole, actor_token(oauth)).json()["access_token"]
        reply = delegate(world, orders, actor_token(oauth, OTHER_ID), THIRD)
        assert set(reply.json()["scope"].split()) == {"read", "write"}
        # Narrowed at a hop: what that request kept from its token is not handed on either.
        orders = delegate(world, whole, actor_token(oauth), scope="tool:list_orders").json()
        assert world.decode(orders["access_token"], OTHER_RESOURCE)["withheld"] == []
        reply = delegate(world, orders["access_token"], actor_token(oauth, OTHER_ID), THIRD)
        assert set(reply.json()["scope"].split()) == {"read", "write"}
        world = begin_task(
            oauth, actions=("read", "write"), resources=(oauth.issuer, RESOURCE, OTHER_RESOURCE)
        )
        whole = world.exchange().json()["access_token"]
        orders = delegate(world, whole, actor_token(oauth), scope="read").json()["access_token"]
        assert world.decode(orders, OTHER_RESOURCE)["withheld"] == ["write"]


def _delegated_without_withheld(oauth: OAuthServer, world: TaskWorld, scope: str) -> str:
    """An access token for OTHER_RESOURCE delegated from `world`'s task to MCP_ID, holding
    `scope`, as a server minted it before tokens named what their chain was kept from: no
    withheld claim."""
    claims = {
        "client_id": MCP_ID,
        "scope": scope,
        "act": {"sub": MCP_ID, "act": {"sub": world.task.spiffe_id}},
        "txn": world.task.task_id,
        "may_act": {"sub": OTHER_ID},
    }
    signer = oauth.running.server.ca.jwt_signer()
    now = int(oauth.running.server.clock.now())
    return signer.mint_access_token("user:alice", OTHER_RESOURCE, 60, now, claims).token


def test_a_delegated_token_without_its_chain_s_withheld_actions_hands_on_only_those_it_holds() -> (
    None
):
    """A token minted before tokens named what their chain was kept from (or by a server that
    does not yet) is read as it was: a delegated one hands on only the actions it holds."""
    with serving_two_workloads("osu", [RESOURCE, OTHER_RESOURCE, THIRD]) as oauth:
        world = begin_task(
            oauth,
            actions=("read", "write"),
            resources=(oauth.issuer, RESOURCE, THIRD),
            tools=(f"{RESOURCE}#read_ticket", f"{OTHER_RESOURCE}#list_orders"),
        )
        orders = _delegated_without_withheld(oauth, world, "tool:list_orders")
        reply = delegate(world, orders, actor_token(oauth, OTHER_ID), THIRD)
        assert "lacks read write" in refused(reply, "invalid_grant")


def test_a_delegated_token_without_withheld_passes_its_narrowing_on_through_a_hop_it_holds_all_of(
    tmp_path: Path,
) -> None:
    """A delegated token minted before tokens named what their chain was kept from, holding
    read alone (write kept from its chain), acted for towards a resource whose policy forbids
    writes: it lacked nothing granted there, so the token issued named nothing withheld, and
    acted for again it got write at the third resource. What a delegated token without the
    claim does not hold is withheld from every token of it, whatever the next hop grants."""
    policy = _forbidding_writes_to(tmp_path, RESOURCE)
    with serving_two_workloads(
        "osw", [RESOURCE, OTHER_RESOURCE, THIRD], policy_dir=str(policy)
    ) as oauth:
        world = begin_task(
            oauth,
            actions=("read", "write"),
            resources=(oauth.issuer, RESOURCE, OTHER_RESOURCE, THIRD),
            tools=(),
        )
        orders = _delegated_without_withheld(oauth, world, "read")
        reply = delegate(world, orders, actor_token(oauth, OTHER_ID), RESOURCE)
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "read"
        tickets = reply.json()["access_token"]
        assert world.decode(tickets, RESOURCE)["withheld"] == ["write"]
        reply = delegate(world, tickets, actor_token(oauth), THIRD)
        assert reply.status_code == 200, reply.text
        assert reply.json()["scope"] == "read"  # not write, which its chain did not hold


def test_a_workloads_own_grant_with_a_scope_is_refused(oauth_server: OAuthServer) -> None:
    signer = oauth_server.running.server.ca.jwt_signer()
    workload = SpiffeId.parse("spiffe://example.org/workload")
    assertion = signer.sign(workload, [oauth_server.issuer], 60).token
    form = {"grant_type": JWT_BEARER, "assertion": assertion, "resource": RESOURCE}
    why = refused(post(oauth_server, **form, scope="read"), "invalid_scope")
    assert "granted no scope" in why
    rows = oauth_server.running.server.datastore.audit_rows()
    assert [r["decision"] for r in rows if r["kind"] == "oauth_jwt_bearer"] == ["deny"]
    # The same assertion, asked without a scope, gets the workload's token.
    reply = post(oauth_server, **form)
    assert reply.status_code == 200, reply.text
    assert "scope" not in reply.json()


@pytest.mark.parametrize(
    ("scope", "needle"),
    [
        ("read  tool:read_ticket", "single spaces"),
        (" read", "single spaces"),
        ("read\ttool:read_ticket", "single spaces"),
        ('tool:"x"', "printable ASCII"),
        ("tool:café", "printable ASCII"),
        ("tool:" + "x" * 3000, "longer than 2048"),
    ],
)
def test_a_malformed_scope_is_refused(world: TaskWorld, scope: str, needle: str) -> None:
    subject = world.subject_token()
    for grant in (bearer, exchange):
        assert needle in refused(grant(world, subject, scope=scope), "invalid_scope")
    # A request refused for its form spent nothing: the same JWT-SVID gets a token.
    assert exchange(world, subject, scope="read").status_code == 200


def test_scope_sent_twice_is_refused(world: TaskWorld) -> None:
    form = {
        "grant_type": EXCHANGE,
        "subject_token": world.subject_token(),
        "subject_token_type": JWT_TYPE,
        "resource": RESOURCE,
        "scope": ["read", "tool:read_ticket"],
    }
    reply = httpx.post(world.oauth.issuer + "/token", data=form, verify=world.oauth.ssl_context())
    assert "scope" in refused(reply, "invalid_request")


@pytest.mark.parametrize("grant", [bearer, exchange])
def test_a_spent_jwt_svid_asking_for_a_tool_its_task_was_never_granted_is_told_so(
    world: TaskWorld, grant: Any
) -> None:
    """The MCP SDK's step-up: answered 403 insufficient_scope by a tool server, its client
    asks again for that tool with the task JWT-SVID it already traded (the agent hands out the
    same one). It was told its token was replayed; a tool outside the task's grant is now
    refused as such, before the replay check, and leaves nothing spent."""
    subject = world.subject_token()
    first = grant(world, subject)
    assert first.status_code == 200, first.text
    why = refused(grant(world, subject, scope="tool:export_customer_data"), "invalid_scope")
    assert "tool:export_customer_data" in why
    assert "replay" not in why
    # One the task holds, asked with the spent token: a replay, as any second use is, told
    # how to get it.
    why = refused(grant(world, subject, scope="tool:read_ticket"), "invalid_grant")
    assert "replay" in why
    assert "ask with a JWT-SVID the task has not traded" in why


@pytest.mark.parametrize("grant", [bearer, exchange])
def test_a_resource_outside_the_task_asked_with_a_scope_is_still_flagged(
    world: TaskWorld, grant: Any
) -> None:
    """A resource outside the task's intent is lateral movement, flagged by the task decision
    (its denial event, the runtime's violation count) whatever the request's scope: refused
    before that decision for its scope, a runtime probing other resources was never flagged."""
    running = world.oauth.running
    service = running.server.tasks.service
    before = service.violations(world.task.agent_id, world.task.runtime_id)
    reply = grant(world, world.subject_token(), resource=OTHER_RESOURCE, scope="read")
    assert "task decision" in refused(reply, "invalid_grant")
    denials = [e for e in world.events("denial") if e["task_id"] == world.task.task_id]
    assert denials
    assert service.violations(world.task.agent_id, world.task.runtime_id) == before + 1
