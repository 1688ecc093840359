"""ATTACK REPRODUCTIONS (branch attack-tasks), on the task service's real parts (the World of
test_task_service): each FAILS on main at the time of writing; they prove defects, not fixes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.ca.manager import CaManager
from server.datastore.records import Entry, Selector
from server.datastore.sqlite import SqliteDataStore
from server.errors import PermissionDeniedError
from svid._clock import FakeClock
from tests.server.test_task_service import AGENT, RUNTIME, World, make_world


@pytest.fixture
def world(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> Iterator[World]:
    w = make_world(tmp_path, clock, datastore, ca_manager)
    yield w
    w.close()


def test_a_workload_cannot_take_a_sub_task_of_a_task_another_workload_began(world: World) -> None:
    """Two workloads (uid 1001, uid 1002) hold one SPIFFE ID through two entries. Since the
    task entry follows the caller's entry (runtime_entry_id), a task of uid 1002 reaches only
    uid 1002. But a sub-task is bound to its parent by runtime ID alone (TaskService._parent):
    uid 1001 names uid 1002's task (its ID is in every JWT's `txn`) as parent and gets a
    sub-task, delivered to uid 1001, inside uid 1002's task (its on_behalf_of, its `act`
    chain). The agent's EndTask and ListTasks are keyed by runtime ID the same way."""

    def add(uid: int) -> Entry:
        made: Entry = world.run(
            world.state.create_entry(Entry("", RUNTIME, AGENT, (Selector("unix", f"uid:{uid}"),)))
        )
        return made

    mine, theirs = add(1001), add(1002)
    their_task = world.begin(runtime_entry_id=theirs.id, on_behalf_of="user:bob")
    assert world.state.entries.by_id[their_task.entry_id].selectors == theirs.selectors
    try:
        sub = world.begin(
            runtime_entry_id=mine.id, parent_task_id=their_task.task_id, on_behalf_of=""
        )
    except PermissionDeniedError:
        return  # what should happen
    assert world.state.entries.by_id[sub.entry_id].selectors == mine.selectors
    assert sub.on_behalf_of == "user:bob"
    raise AssertionError("uid 1001 began a sub-task of uid 1002's task")


def test_no_elevated_step_inside_an_elevated_step_even_through_a_sub_task(world: World) -> None:
    """check_elevation refuses an elevated step whose parent is one, but looks at the parent
    only: elevated step -> plain sub-task -> elevated step is granted."""
    task = world.begin()
    step = world.begin(parent_task_id=task.task_id, elevate=True, ttl=60)
    assert step.elevated
    sub = world.begin(parent_task_id=step.task_id)
    assert not sub.elevated
    with pytest.raises(PermissionDeniedError, match="elevated step"):
        world.begin(parent_task_id=sub.task_id, elevate=True, ttl=60)
