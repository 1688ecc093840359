"""Tool-level grants and elevated steps in the task service, on the same real parts as
test_task_service (SQLite, CA, Cedar, the issuance spine) with an operator's policy directory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from server.ca.manager import CaManager
from server.datastore.records import Entry, Selector, TaskCursor
from server.datastore.sqlite import SqliteDataStore
from server.errors import InvalidRequestError, PermissionDeniedError
from server.policy import RequestError
from server.tasks.model import Task, TaskState
from svid._clock import FakeClock
from tests.server.test_task_service import AGENT, RUNTIME, World, decode, make_world

TICKETS = "mcp-tickets"
READ = f"{TICKETS}#read_ticket"
EXPORT = f"{TICKETS}#export_customer_data"
WIKI = "mcp-wiki"  # no forbid names a tool of it
SECRET = "vault:reports/api-key"

# Added to the shipped default policy: one tool is out of reach, and a secret may be fetched
# only in a short elevated step.
EXTRA_POLICY = f"""
@id("no_customer_export_tool")
@reason("export_customer_data is not for agents")
forbid (principal, action == Action::"invoke_tool", resource == Tool::"{EXPORT}");

@id("secret_in_elevated_step")
@ttl_cap("30")
permit (
  principal == Agent::"{RUNTIME}",
  action == Action::"fetch_secret",
  resource == Resource::"{SECRET}"
)
when {{ context.intent.elevated && context.intent.on_behalf_of != "" }};
"""


@pytest.fixture
def world(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> Iterator[World]:
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    default = resources.files("server.policy").joinpath("default.cedar").read_text("utf-8")
    (policy_dir / "svid.cedar").write_text(default + EXTRA_POLICY)
    w = make_world(tmp_path, clock, datastore, ca_manager, policy_dir=policy_dir)
    yield w
    w.close()


def mint(world: World, task_spiffe_entry: str, audience: str) -> dict[str, object]:
    entry = world.state.entries.by_id[task_spiffe_entry]
    return decode(world, world.mint_jwt(entry, [audience]).token, audience)


# -- tools ---------------------------------------------------------------------------------------


def test_a_task_is_granted_one_tool_of_a_server_but_not_another(world: World) -> None:
    task = world.begin(actions=(), resources=(), tools=(READ, EXPORT))
    assert task.decision == "allow_constrained"
    assert "no_customer_export_tool" in task.reason
    assert task.tools == (READ,)
    assert task.actions == ()
    assert task.resources == ()
    claims = mint(world, task.entry_id, TICKETS)
    assert claims["scope"] == "tool:read_ticket"
    # Only that server may be its audience.
    entry = world.state.entries.by_id[task.entry_id]
    with pytest.raises(PermissionDeniedError, match="lateral movement: audience docs"):
        world.mint_jwt(entry, ["docs"])


def test_a_task_asking_only_for_a_forbidden_tool_is_denied(world: World) -> None:
    with pytest.raises(PermissionDeniedError, match="export_customer_data is not for agents"):
        world.begin(actions=(), resources=(), tools=(EXPORT,))


def test_declaring_tools_grants_no_other_tool_of_the_server(world: World) -> None:
    task = world.begin(actions=("read",), resources=("docs",), tools=(READ,))
    assert mint(world, task.entry_id, TICKETS)["scope"] == "tool:read_ticket"
    assert mint(world, task.entry_id, "docs")["scope"] == "read"


def test_invoke_tool_on_a_server_grants_every_tool_of_it(world: World) -> None:
    task = world.begin(actions=("invoke_tool",), resources=(WIKI,))
    assert mint(world, task.entry_id, WIKI)["scope"] == "invoke_tool"


def test_every_tool_of_a_server_is_refused_while_a_forbid_keeps_one_out(world: World) -> None:
    # Every tool of mcp-tickets would include export_customer_data, which a forbid keeps out.
    with pytest.raises(PermissionDeniedError, match="every tool of mcp-tickets") as exc:
        world.begin(actions=("invoke_tool",), resources=(TICKETS,))
    assert "export_customer_data is not for agents" in str(exc.value)
    assert "name the tools the task needs" in str(exc.value)
    # A task asking for more keeps the rest; naming the tool it needs, it gets that.
    task = world.begin(actions=("invoke_tool", "read"), resources=(TICKETS,))
    assert mint(world, task.entry_id, TICKETS)["scope"] == "read"
    task = world.begin(actions=(), resources=(), tools=(READ,))
    assert mint(world, task.entry_id, TICKETS)["scope"] == "tool:read_ticket"


@pytest.mark.parametrize(
    ("tools", "needle"),
    [
        (("mcp-tickets",), "is not <server>#<tool>"),
        (("#read",), "is not <server>#<tool>"),
        (("mcp tickets#read",), "is not <server>#<tool>"),
        (("mcp-tickets#read ticket",), "tool name"),
        (("mcp-tickets#",), "tool name"),
    ],
)
def test_a_malformed_tool_is_a_bad_request(world: World, tools: tuple[str], needle: str) -> None:
    with pytest.raises(RequestError, match=needle):  # INVALID_ARGUMENT
        world.begin(actions=(), resources=(), tools=tools)


def test_a_sub_task_may_narrow_to_tools_but_never_add_one(world: World) -> None:
    parent = world.begin(actions=(), resources=(), tools=(READ,))
    with pytest.raises(PermissionDeniedError, match="sub-task adds tools mcp-tickets#other"):
        world.begin(
            actions=(), resources=(), tools=(f"{TICKETS}#other",), parent_task_id=parent.task_id
        )
    child = world.begin(actions=(), resources=(), tools=(READ,), parent_task_id=parent.task_id)
    assert child.tools == (READ,)
    # A server's every tool (invoke_tool on it) covers a sub-task naming one of them.
    whole = world.begin(actions=("invoke_tool",), resources=(WIKI,))
    page = f"{WIKI}#read_page"
    one = world.begin(actions=(), resources=(), tools=(page,), parent_task_id=whole.task_id)
    assert mint(world, one.entry_id, WIKI)["scope"] == "tool:read_page"


# -- elevated steps ------------------------------------------------------------------------------


def test_a_long_task_gets_a_short_elevated_step_with_its_own_decision(world: World) -> None:
    with pytest.raises(PermissionDeniedError, match="no policy permits fetch_secret"):
        world.begin(actions=("fetch_secret",), resources=(SECRET,), ttl=900)
    parent = world.begin(actions=("read",), resources=("docs",), ttl=900)
    assert parent.ttl == 900
    step = world.begin(
        actions=("fetch_secret",),
        resources=(SECRET,),
        ttl=600,
        parent_task_id=parent.task_id,
        elevate=True,
    )
    assert step.elevated
    assert step.depth == 1
    assert step.ttl == 30  # the policy's cap, for the step alone
    assert step.policy_ids == ("svid.cedar:secret_in_elevated_step",)
    claims = mint(world, step.entry_id, SECRET)
    assert claims["scope"] == "fetch_secret"
    assert claims["parent_txn"] == parent.task_id
    assert claims["tctx"]["elevated"] is True  # type: ignore[index]
    assert claims["act"] == {"sub": step.spiffe_id, "act": {"sub": parent.spiffe_id}}
    (begun,) = [e for e in world.events("task_begin") if e["task_id"] == step.task_id]
    assert '"elevated":true' in begun["extra"]

    # Ending the step leaves the parent working, for its whole TTL.
    world.run(world.service.end(world.agent, step.task_id, [RUNTIME]))
    assert world.service.get(step.task_id).state is TaskState.ENDED
    assert world.service.get(parent.task_id).active
    world.clock.advance(600)
    assert mint(world, parent.entry_id, "docs")["scope"] == "read"


def test_an_elevated_step_ends_with_its_parent(world: World) -> None:
    parent = world.begin()
    step = world.begin(parent_task_id=parent.task_id, elevate=True)
    world.run(world.service.end(world.agent, parent.task_id, [RUNTIME]))
    assert world.service.get(step.task_id).state is TaskState.ENDED


def test_an_elevated_step_is_short_and_within_its_parent(world: World) -> None:
    parent = world.begin(ttl=900)
    step = world.begin(resources=("wiki",), ttl=900, parent_task_id=parent.task_id, elevate=True)
    assert step.ttl == world.service.settings.max_elevated_ttl == 300
    assert step.resources == ("wiki",)  # beyond the parent's scope: policy granted it
    world.clock.advance(800)
    late = world.begin(ttl=300, parent_task_id=parent.task_id, elevate=True)
    assert late.expires_at <= parent.expires_at


def test_an_elevated_step_keeps_its_parents_principal_and_never_nests(world: World) -> None:
    with pytest.raises(InvalidRequestError, match="set parent_task_id"):
        world.begin(elevate=True)
    parent = world.begin()
    with pytest.raises(PermissionDeniedError, match="acts on behalf of 'user:bob'"):
        world.begin(on_behalf_of="user:bob", parent_task_id=parent.task_id, elevate=True)
    step = world.begin(parent_task_id=parent.task_id, elevate=True)
    with pytest.raises(PermissionDeniedError, match="cannot begin another elevated step"):
        world.begin(parent_task_id=step.task_id, elevate=True)
    # Narrowing sub-tasks inside a step are fine.
    inner = world.begin(parent_task_id=step.task_id)
    assert inner.depth == 2
    assert not inner.elevated


def test_no_elevated_step_anywhere_inside_an_elevated_step(world: World) -> None:
    """The parent alone was looked at: elevated step -> plain sub-task -> elevated step was
    granted, an elevation inside an elevation one level removed."""
    task = world.begin()
    step = world.begin(parent_task_id=task.task_id, elevate=True, ttl=60)
    sub = world.begin(parent_task_id=step.task_id)
    assert not sub.elevated
    with pytest.raises(
        PermissionDeniedError,
        match=f"cannot begin inside another elevated step \\({step.task_id}, above its parent",
    ):
        world.begin(parent_task_id=sub.task_id, elevate=True, ttl=60)
    (denial,) = [e for e in world.events("denial") if e["reason"].find(step.task_id) >= 0]
    assert '"privilege_chaining"' in denial["extra"]
    # Beside the step, under the task itself, another step is fine (after the first ends).
    world.run(world.service.end(world.agent, step.task_id, (RUNTIME,)))
    assert world.begin(parent_task_id=task.task_id, elevate=True, ttl=60).elevated


def test_high_risk_actions_still_need_a_permit_in_an_elevated_step(world: World) -> None:
    parent = world.begin(on_behalf_of="")
    with pytest.raises(PermissionDeniedError, match="fetch_secret"):
        world.begin(
            actions=("fetch_secret",),
            resources=(SECRET,),
            on_behalf_of="",
            parent_task_id=parent.task_id,
            elevate=True,
        )


# -- whose task ----------------------------------------------------------------------------------


def _workload(world: World, uid: int) -> Entry:
    """An entry giving RUNTIME to the workload of `uid`: two of them are two workloads of one
    SPIFFE ID."""
    made: Entry = world.run(
        world.state.create_entry(Entry("", RUNTIME, AGENT, (Selector("unix", f"uid:{uid}"),)))
    )
    return made


def test_only_the_workload_that_began_a_task_begins_its_sub_tasks_and_elevated_steps(
    world: World,
) -> None:
    """The task ID is public (every token's `txn` and `sub`): one workload naming another's
    task as parent would get a sub-task delivered to itself inside the other's task (its
    on_behalf_of, its `act` chain). Refused as a task of another runtime is."""
    mine, theirs = _workload(world, 1001), _workload(world, 1002)
    their_task = world.begin(runtime_entry_id=theirs.id, on_behalf_of="user:bob")
    assert their_task.runtime_entry_id == theirs.id
    for elevate in (False, True):
        with pytest.raises(PermissionDeniedError, match="belongs to another workload"):
            world.begin(
                runtime_entry_id=mine.id,
                parent_task_id=their_task.task_id,
                on_behalf_of="",
                elevate=elevate,
                ttl=60,
            )
    assert [t.task_id for t in world.service.list(agent_id=AGENT).tasks] == [their_task.task_id]
    # Its own workload still may.
    sub = world.begin(
        runtime_entry_id=theirs.id, parent_task_id=their_task.task_id, on_behalf_of="", ttl=60
    )
    assert sub.on_behalf_of == "user:bob"
    assert world.state.entries.by_id[sub.entry_id].selectors == theirs.selectors


def test_a_task_begun_before_its_workload_was_recorded_gets_no_sub_task_but_still_ends(
    world: World,
) -> None:
    """A task stored before tasks recorded their entry cannot say whose it is: nothing more is
    begun inside it, and any workload of its runtime ID lists and ends it, as before."""
    mine, theirs = _workload(world, 1001), _workload(world, 1002)
    old = replace(world.begin(runtime_entry_id=theirs.id), runtime_entry_id="")
    world.store.put_task(old)
    assert world.store.get_task(old.task_id) == old
    for entry in (mine, theirs):
        with pytest.raises(PermissionDeniedError, match="before tasks recorded their workload"):
            world.begin(runtime_entry_id=entry.id, parent_task_id=old.task_id, on_behalf_of="")
    listed = world.service.list(
        agent_id=AGENT, runtime_ids=[RUNTIME], runtime_entry_ids=[mine.id]
    ).tasks
    assert [t.task_id for t in listed] == [old.task_id]
    ended = world.run(world.service.end(world.agent, old.task_id, [RUNTIME], "", [mine.id]))
    assert ended.state is TaskState.ENDED


def test_a_workload_ends_and_lists_only_the_tasks_it_began(world: World) -> None:
    mine, theirs = _workload(world, 1001), _workload(world, 1002)
    their_task = world.begin(runtime_entry_id=theirs.id)
    my_task = world.begin(runtime_entry_id=mine.id)

    def listed(entry: Entry) -> list[str]:
        tasks = world.service.list(
            runtime_ids=[RUNTIME], runtime_entry_ids=[entry.id], limit=1
        ).tasks
        return [t.task_id for t in tasks]

    assert (listed(mine), listed(theirs)) == ([my_task.task_id], [their_task.task_id])
    with pytest.raises(PermissionDeniedError, match="belongs to another workload"):
        world.run(world.service.end(world.agent, their_task.task_id, [RUNTIME], "", [mine.id]))
    assert world.service.get(their_task.task_id).active
    ended = world.run(
        world.service.end(world.agent, their_task.task_id, [RUNTIME], "", [theirs.id])
    )
    assert ended.state is TaskState.ENDED


def test_a_list_of_a_workloads_tasks_reads_at_most_its_bound_of_rows(
    world: World, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another workload of the same SPIFFE ID with many tasks: one read of the caller's own
    stops at max_scanned_rows rows (the limit, if more) and says where it got to; reading on
    from there, or from the last task found, yields exactly the caller's tasks in order."""
    mine, theirs = _workload(world, 1001), _workload(world, 1002)
    own: list[str] = []
    for n in range(60):
        clock.advance(1)  # listed in the order begun
        task = world.begin(runtime_entry_id=mine.id if n % 25 == 7 else theirs.id)
        if task.runtime_entry_id == mine.id:
            own.append(task.task_id)
    world.service.settings = replace(world.service.settings, max_scanned_rows=10)
    reads: list[int] = []
    real = world.store.list_tasks

    def counted(**kwargs: Any) -> list[Task]:
        rows: list[Task] = real(**kwargs)
        reads.append(len(rows))
        return rows

    monkeypatch.setattr(world.store, "list_tasks", counted)
    for limit, bound in ((2, 10), (3, 10), (12, 12)):
        found: list[str] = []
        after = None
        while True:
            reads.clear()
            got = world.service.list(
                runtime_ids=[RUNTIME], runtime_entry_ids=[mine.id], after=after, limit=limit
            )
            assert sum(reads) <= bound, (limit, reads)
            assert len(got.tasks) <= limit
            found.extend(t.task_id for t in got.tasks)
            if got.read_to is not None:
                assert not got.tasks or (got.tasks[-1].created_at, got.tasks[-1].task_id) <= (
                    got.read_to
                )
                after = got.read_to
            elif len(got.tasks) == limit:
                after = TaskCursor(got.tasks[-1].created_at, got.tasks[-1].task_id)
            else:
                break
        assert found == own, limit
