"""Whose an OAuth refusal was, on the ledger: once the token presented was verified, its event
names the task (task_id), its runtime (agent_id), its agent (node_id) and its principal, in the
fields a granted token's event names them by, and a delegation's acting workload (actor); a
token that could not be verified names no one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from svid._spiffe_id import SpiffeId
from tests.server.oauth.conftest import OTHER_RESOURCE, RESOURCE
from tests.server.oauth.test_token_delegation import (
    MCP_ID,
    actor_token,
    delegate,
    exchange_events,
    serving_delegation,
    task_world,
)
from tests.server.oauth.test_token_exchange import TaskWorld, begin_task
from tests.server.oauth.test_token_scope import (
    JWT_BEARER,
    _forbidding_writes_to,
    exchange,
    post,
    refused,
)

WHO = ("agent_id", "node_id", "task_id", "on_behalf_of", "actor")


def whose(event: dict[str, Any]) -> tuple[Any, ...]:
    assert event["decision"] == "deny", event
    return tuple(event.get(name) for name in WHO)


def the_task(world: TaskWorld, actor: str | None = None) -> tuple[Any, ...]:
    task = world.task
    return (task.runtime_id, task.agent_id, task.task_id, "user:alice", actor)


def test_a_refusal_after_the_token_was_verified_names_whose_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with serving_delegation("orf") as oauth:
        world = task_world(oauth)

        def last() -> tuple[Any, ...]:
            return whose(exchange_events(world)[-1])

        # A token that is not one: nobody is named.
        refused(exchange(world, "not-a-jwt"), "invalid_grant")
        assert last() == (None,) * len(WHO)

        # Asked for more than its task may get, before the token is spent.
        subject = world.subject_token()
        refused(exchange(world, subject, scope="write"), "invalid_scope")
        assert last() == the_task(world)

        # A replayed subject token.
        assert exchange(world, subject).status_code == 200
        refused(exchange(world, subject), "invalid_grant")
        assert last() == the_task(world)

        # A delegation: refused before the subject token named a task, the actor alone; after,
        # the task too (its decision for the other resource grants no tool: invalid_scope).
        first = world.exchange().json()["access_token"]
        refused(delegate(world, "not-a-jwt", actor_token(oauth)), "invalid_grant")
        assert last() == (None, None, None, None, MCP_ID)
        refused(delegate(world, first, actor_token(oauth), scope="tool:x"), "invalid_scope")
        assert last() == the_task(world, MCP_ID)

        # The task ends while a token of it is issued: on record, refused, and named.
        service = oauth.running.server.tasks.service
        exchange_grant = service.exchange_grant

        def ending_after(spiffe_id: str, resource: str, **how: Any) -> Any:
            decided = exchange_grant(spiffe_id, resource, **how)
            oauth.running.call(service.end(world.agent, world.task.task_id, ()))
            return decided

        monkeypatch.setattr(service, "exchange_grant", ending_after)
        refused(exchange(world, world.subject_token(), resource=OTHER_RESOURCE), "invalid_grant")
        assert last() == the_task(world)
        monkeypatch.undo()

        # A workload's own assertion: the workload.
        signer = oauth.running.server.ca.jwt_signer()
        workload = "spiffe://example.org/workload"
        assertion = signer.sign(SpiffeId.parse(workload), [oauth.issuer], 60).token
        form = {"grant_type": JWT_BEARER, "assertion": assertion, "resource": RESOURCE}
        refused(post(oauth, **form, scope="read"), "invalid_scope")
        rows = world.events("oauth_jwt_bearer")
        assert (rows[-1]["agent_id"], rows[-1]["task_id"]) == (workload, None)
        assert "eyJ" not in str(rows)  # IDs, never a token


def test_a_task_this_server_does_not_hold_is_named_by_its_spiffe_id() -> None:
    """Ended (or another server's, not heard of yet): its agent is not known without a read,
    which a refusal does not make; its runtime and ID are, from the token's SPIFFE ID."""
    from server.oauth.grants import Grants, _Whose
    from svid._clock import FakeClock

    class NoTasks:
        def active_task(self, spiffe_id: str) -> None:
            return None

    nothing: Any = None
    grants = Grants(
        checker=nothing,
        signer=nothing,
        recorder=nothing,
        replay=nothing,
        tasks=NoTasks(),  # type: ignore[arg-type]
        resources=frozenset(),
        trust_domain="example.org",
        access_token_ttl=60,
        clock=FakeClock(1000),
    )
    runtime = "spiffe://example.org/agents/bot"
    named = grants._task_named(f"{runtime}/task/t1", "t1", MCP_ID)
    assert named == _Whose(runtime, None, "t1", None, MCP_ID)
    # A SPIFFE ID that does not end in its txn names itself as the workload, and no task.
    assert grants._task_named(f"{runtime}/task/t2", "t1") == _Whose(f"{runtime}/task/t2")


def test_a_refusal_after_the_task_decision_names_that_decision(tmp_path: Path) -> None:
    """A delegation the task decision allowed and the subject token then left nothing of, or a
    scope asked beyond the decision, was refused with an event naming neither the resource nor
    what policy decided: an operator could not tell policy's refusal from the token's. It names
    them as a grant's event does: the resource, the policy set, and what was granted."""
    policy = _forbidding_writes_to(tmp_path, RESOURCE)
    with serving_delegation("ord", policy_dir=str(policy)) as oauth:
        world = begin_task(
            oauth, actions=("read", "write"), resources=(oauth.issuer, RESOURCE, OTHER_RESOURCE)
        )
        # Asked for write at the tickets server: within the task's intent, not policy's grant.
        refused(exchange(world, world.subject_token(), scope="write"), "invalid_scope")
        event = exchange_events(world)[-1]
        assert whose(event) == the_task(world)
        assert (event["resource"], event["granted"]) == (RESOURCE, "read tool:read_ticket")
        assert event["policy_set_hash"]
        # The subject token narrowed to a tool, towards a resource where nothing else is left.
        narrow = exchange(world, world.subject_token(), scope="tool:read_ticket").json()
        allowed = exchange_events(world)[-1]
        assert allowed["policy_set_hash"] == event["policy_set_hash"]
        reply = delegate(world, narrow["access_token"], actor_token(oauth), scope="read")
        refused(reply, "invalid_scope")  # read was kept from the token
        event = exchange_events(world)[-1]
        assert whose(event) == the_task(world, MCP_ID)
        assert (event["resource"], event["granted"]) == (OTHER_RESOURCE, "read write")
        assert event["policy_set_hash"] == allowed["policy_set_hash"]
    with serving_delegation("ore") as oauth:
        world = task_world(oauth)
        narrow = exchange(world, world.subject_token(), scope="tool:read_ticket").json()
        refused(delegate(world, narrow["access_token"], actor_token(oauth)), "invalid_grant")
        event = exchange_events(world)[-1]
        assert whose(event) == the_task(world, MCP_ID)
        assert (event["resource"], event["granted"]) == (OTHER_RESOURCE, "read")
        assert event["policy_set_hash"]
