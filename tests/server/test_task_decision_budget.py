"""What an agent's task decision budget (mint_pairs_*_per_agent) is charged for, on real parts
(tests/server/test_task_service.py's world): the policy work and the violation writes of its
task JWT mints and of its tasks' token exchanges, charged before either is done; a decision
policy answers from its cache costs none of that work, and nothing of the budget."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from server.ca.manager import CaManager
from server.datastore.sqlite import SqliteDataStore
from server.errors import PermissionDeniedError, RateLimitedError
from server.tasks.service import TaskSettings
from svid._clock import FakeClock
from tests.server.test_task_service import AGENT, RUNTIME, World, make_world

# One pair's worth, refilled at half a pair a second: a second decision is refused until two
# seconds have passed.
ONE_PAIR = TaskSettings(mint_pairs_rate_per_agent=0.5, mint_pairs_burst_per_agent=1)


@pytest.fixture
def world(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> Iterator[World]:
    w = make_world(tmp_path, clock, datastore, ca_manager, settings=ONE_PAIR)
    yield w
    w.close()


def test_an_out_of_intent_mint_past_the_budget_writes_no_violation_nor_denial(
    world: World,
) -> None:
    task = world.begin()  # read on docs
    entry = world.state.entries.by_id[task.entry_id]
    with pytest.raises(PermissionDeniedError, match="lateral movement"):
        world.mint_jwt(entry, ["payroll"])
    assert world.service.violations(AGENT, RUNTIME) == 1
    # Over the budget: refused before the violation row and the denial event it would write.
    for _ in range(3):
        with pytest.raises(RateLimitedError, match="task JWT decision budget exceeded"):
            world.mint_jwt(entry, ["payroll"])
    assert world.service.violations(AGENT, RUNTIME) == 1
    assert len(world.events("denial")) == 1


def test_a_mint_policy_answers_from_its_cache_is_not_charged(world: World) -> None:
    task = world.begin()
    entry = world.state.entries.by_id[task.entry_id]
    # The same mint again within the second (its agent restarted, say): one decision.
    for _ in range(3):
        assert world.mint_jwt(entry, ["docs"]).token
    # A new second's decision is policy work again, and the budget has not refilled for it.
    world.clock.advance(1)
    with pytest.raises(RateLimitedError, match="1 \\(action, audience\\) pairs"):
        world.mint_jwt(entry, ["docs"])
    world.clock.advance(1)
    assert world.mint_jwt(entry, ["docs"]).token


def test_a_token_exchange_is_charged_to_its_tasks_agent(world: World) -> None:
    task = world.begin()
    world.service.exchange_grant(task.spiffe_id, "docs")
    world.clock.advance(1)
    with pytest.raises(RateLimitedError, match=f"budget exceeded for agent {AGENT}"):
        world.service.exchange_grant(task.spiffe_id, "docs")
    # One budget: the agent's mints are refused too while its tasks' exchanges spent it.
    entry = world.state.entries.by_id[task.entry_id]
    with pytest.raises(RateLimitedError):
        world.mint_jwt(entry, ["docs"])
    world.clock.advance(1)
    _, grant = world.service.exchange_grant(task.spiffe_id, "docs")
    assert grant.scope == "read"


def test_an_out_of_intent_exchange_past_the_budget_writes_no_violation(world: World) -> None:
    task = world.begin()
    with pytest.raises(PermissionDeniedError, match="lateral movement"):
        world.service.exchange_grant(task.spiffe_id, "payroll")
    with pytest.raises(RateLimitedError):
        world.service.exchange_grant(task.spiffe_id, "payroll")
    assert world.service.violations(AGENT, RUNTIME) == 1
    assert len(world.events("denial")) == 1
