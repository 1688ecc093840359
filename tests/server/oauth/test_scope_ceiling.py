"""TaskService.scope_ceiling held to the decision it stands for: what _mint_decision puts
before policy for an exchange. The token endpoint refuses a requested scope outside the
ceiling before the presented token is spent (server/oauth/grants.py _within_task), so a
ceiling narrower than the decision refuses a scope the task would be granted, and a wider one
lets a scope through to be refused only after the token is spent. Real parts: SQLite, the CA,
Cedar (the shipped policy narrowed by a forbid, and a permit-all one)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from server.ca.manager import CaManager
from server.datastore.sqlite import SqliteDataStore
from server.errors import PermissionDeniedError
from server.tasks.model import Task
from svid._clock import FakeClock
from tests.server.test_task_service import World, make_world

DOCS = "docs"
TICKETS = "mcp-tickets"
WIKI = "mcp-wiki"
OUTSIDE = "mcp-billing"  # in no intent below
RESOURCES = (DOCS, TICKETS, WIKI, OUTSIDE)
EXPORT = f"{TICKETS}#export_customer_data"

# Intents over actions (one high-risk: no broad permit grants it), resources, and tools on two
# servers: a server named among the resources or reached by its tools alone.
ACTIONS = [("read",), ("read", "write"), ("invoke_tool",), ("read", "fetch_secret"), ()]
DECLARED = [(), (DOCS,), (TICKETS,), (DOCS, WIKI), (DOCS, TICKETS, WIKI)]
TOOLS = [
    (),
    (f"{TICKETS}#read_ticket",),
    (f"{TICKETS}#read_ticket", EXPORT),
    (f"{TICKETS}#read_ticket", f"{WIKI}#search"),
]
# Actions apply to resources: an intent has both, or tools alone (policy.intent.Intent).
INTENTS = [
    (actions, declared, tools)
    for actions, declared, tools in itertools.product(ACTIONS, DECLARED, TOOLS)
    if (actions and declared) or (tools and not actions and not declared)
]

PERMIT_ALL = "permit (principal, action, resource);\n"
# The shipped policy with one tool out of reach (begin leaves it out of the task) and write
# taken from a runtime once it asked outside its intent: decided after begin, so the decision
# is narrower than the ceiling, which reads no policy.
NARROWER = f"""
@id("no_customer_export_tool")
@reason("export_customer_data is not for agents")
forbid (principal, action == Action::"invoke_tool", resource == Tool::"{EXPORT}");

@id("no_write_after_a_violation")
@reason("the runtime asked outside its intent")
forbid (principal, action == Action::"write", resource) when {{ context.violations >= 1 }};
"""


def _world(
    tmp_path: Path,
    clock: FakeClock,
    datastore: SqliteDataStore,
    ca_manager: CaManager,
    policy: str,
) -> Iterator[World]:
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    (policy_dir / "svid.cedar").write_text(policy)
    world = make_world(tmp_path, clock, datastore, ca_manager, policy_dir=policy_dir)
    yield world
    world.close()


@pytest.fixture
def permit_all(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> Iterator[World]:
    yield from _world(tmp_path, clock, datastore, ca_manager, PERMIT_ALL)


@pytest.fixture
def shipped(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> Iterator[World]:
    default = resources.files("server.policy").joinpath("default.cedar").read_text("utf-8")
    yield from _world(tmp_path, clock, datastore, ca_manager, default + NARROWER)


def tasks(world: World) -> Iterator[Task]:
    """A task of each intent its begin grants (some are refused whole)."""
    for actions, declared, tools in INTENTS:
        try:
            task = world.begin(actions=actions, resources=declared, tools=tools)
        except PermissionDeniedError:
            continue
        yield task
        world.run(world.service.end(world.agent, task.task_id, ()))
        # An out-of-intent exchange is a violation, and three stop the runtime: each intent
        # is asked with a clean record (the window is an hour of the fake clock).
        world.clock.advance(world.service.settings.violation_window + 1)


def granted(world: World, task: Task, resource: str) -> frozenset[str] | None:
    """The scope an exchange of the task is granted for `resource` (None: refused)."""
    try:
        _, grant = world.service.exchange_grant(task.spiffe_id, resource)
    except PermissionDeniedError:
        return None
    return frozenset(grant.scope.split())


def test_an_exchange_is_granted_nothing_beyond_the_scope_ceiling(shipped: World) -> None:
    checked = narrower = 0
    for task in tasks(shipped):
        # Outside first: the violation it makes takes write from what follows.
        for resource in sorted(RESOURCES, key=lambda r: r != OUTSIDE):
            ceiling = shipped.service.scope_ceiling(task.spiffe_id, resource)
            assert ceiling is not None
            scope = granted(shipped, task, resource)
            if scope is None:
                continue
            assert scope <= ceiling, (task.actions, task.resources, task.tools, resource)
            checked += 1
            narrower += scope < ceiling
    # Enough grants to mean something, some of them narrowed by policy below the ceiling.
    assert checked >= 40
    assert narrower


def test_with_a_permit_all_policy_the_grant_is_the_ceiling(permit_all: World) -> None:
    """Policy permits every pair asked: what is left is what _mint_decision asks, which the
    ceiling claims to be. An empty ceiling (the resource outside the intent) is a refusal."""
    outside = inside = 0
    for task in tasks(permit_all):
        for resource in RESOURCES:
            ceiling = permit_all.service.scope_ceiling(task.spiffe_id, resource)
            assert ceiling is not None
            scope = granted(permit_all, task, resource)
            where = (task.actions, task.resources, task.tools, resource)
            assert (scope or frozenset()) == ceiling, where
            if scope is None:
                outside += 1
            else:
                inside += 1
    assert outside
    assert inside >= 40


def test_an_ended_task_has_no_ceiling(permit_all: World) -> None:
    task = permit_all.begin(actions=("read",), resources=(DOCS,))
    assert permit_all.service.scope_ceiling(task.spiffe_id, DOCS) == {"read"}
    permit_all.run(permit_all.service.end(permit_all.agent, task.task_id, ()))
    assert permit_all.service.scope_ceiling(task.spiffe_id, DOCS) is None
