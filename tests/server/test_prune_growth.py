"""What housekeeping never prunes: rows that no request can use again stay in the datastore
(and in every server's memory) for ever. Real SQLite, fake clock, the housekeeping jobs app.py
runs (ServerState.prune, TaskService.housekeeping)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from server.ca.manager import CaManager
from server.datastore.records import EXPIRED_RECORD_RETENTION, AttestedAgent
from server.datastore.sqlite import SqliteDataStore
from server.events import ChangeNotifier
from server.state import ServerState
from server.tasks.model import TaskState
from svid import MAX_CLOCK_SKEW, MAX_VERIFIER_LEEWAY
from svid._clock import FakeClock
from tests.server.test_task_service import RUNTIME, make_world

YEAR = 365 * 86400


def test_an_agent_record_expired_a_year_ago_is_pruned(
    datastore: SqliteDataStore, clock: FakeClock
) -> None:
    """A join-token agent's ID is new per token: once its SVID expired it cannot renew (the
    server says attest again, as another agent), so its row serves nothing. An autoscaled fleet
    leaves one such row per node it ever ran, loaded into every server's memory at start."""
    state = ServerState(datastore, clock, ChangeNotifier())
    state.load()
    gone = AttestedAgent(
        "spiffe://example.org/svid/agent/join_token/t-1", "join_token", "1", int(clock.now()) + 3600
    )
    asyncio.run(state.save_agent(gone, None))

    clock.advance(YEAR)
    asyncio.run(state.prune())
    assert [a.spiffe_id for a in datastore.list_agents()] == []
    restarted = ServerState(datastore, clock, ChangeNotifier())
    restarted.load()
    assert restarted.agents == {}


def test_a_task_ended_a_year_ago_is_pruned(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> None:
    """An ended task's row (its intent, on behalf of whom) outlives its credentials, their
    records, and the audit events of its begin and end (30 days by default): nothing prunes
    the tasks table."""
    world = make_world(tmp_path, clock, datastore, ca_manager)
    try:
        task = world.begin(runtime_id=RUNTIME, ttl=60)
        world.run(world.service.end(world.agent, task.task_id, [RUNTIME]))
        assert world.store.get_task(task.task_id).state is TaskState.ENDED  # type: ignore[union-attr]

        clock.advance(YEAR + MAX_VERIFIER_LEEWAY)
        world.run(world.service.housekeeping())
        world.run(world.state.prune())
        assert world.store.list_tasks() == []
    finally:
        world.close()


def test_an_agent_and_a_task_stay_while_their_retention_runs_and_a_ban_holds(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> None:
    """Up to EXPIRED_RECORD_RETENTION past the last second a credential of theirs may be
    accepted (exp + MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW), an agent's and a task's rows stay;
    a banned agent's row stays for good (a new attestation under its ID must be refused)."""
    world = make_world(tmp_path, clock, datastore, ca_manager)
    try:
        task = world.begin(runtime_id=RUNTIME, ttl=60)
        world.run(world.service.end(world.agent, task.task_id, [RUNTIME]))
        agent = AttestedAgent(
            "spiffe://example.org/svid/agent/join_token/t-2", "join_token", "1", task.expires_at
        )
        world.run(world.state.save_agent(agent, None))
        removal = world.run(world.state.ban_agent(agent.spiffe_id))
        datastore.end_removal(removal)  # the ban's work is done; the ban holds
        kept = task.expires_at + MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW + EXPIRED_RECORD_RETENTION

        clock.set(kept)
        world.run(world.service.housekeeping())
        world.run(world.state.prune())
        assert [t.task_id for t in world.store.list_tasks()] == [task.task_id]

        clock.set(kept + YEAR)
        world.run(world.service.housekeeping())
        world.run(world.state.prune())
        assert world.store.list_tasks() == []
        assert datastore.get_agent(agent.spiffe_id).banned
        assert agent.spiffe_id in world.state.agents
    finally:
        world.close()


def test_an_x509pop_agent_pruned_while_its_node_is_away_can_still_be_banned(
    datastore: SqliteDataStore, clock: FakeClock
) -> None:
    """An x509pop agent's ID is its node certificate's (one certificate, one agent): unlike a
    join-token agent's it attests again under the same ID for as long as that certificate
    lasts (a year, typically). A node away for a month (powered off, its key stolen) must stay
    bannable by that ID, so that it is refused when it comes back; pruning its row makes the
    operator's ban fail as 'not found', and the node then attests afresh unhindered."""
    state = ServerState(datastore, clock, ChangeNotifier())
    state.load()
    node = AttestedAgent(
        "spiffe://example.org/svid/agent/x509pop/" + "ab" * 32,
        "x509pop",
        "1",
        int(clock.now()) + 3600,
    )
    asyncio.run(state.save_agent(node, None))

    clock.advance(EXPIRED_RECORD_RETENTION + 7 * 86400)
    asyncio.run(state.prune())

    asyncio.run(state.ban_agent(node.spiffe_id))
    assert datastore.get_agent(node.spiffe_id).banned
