"""AgentAuthority: a refusal from memory is checked against the datastore, which is read at
most once a while per certificate (on a real SQLite store another server writes to)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.agent_authority import (
    ACCEPTANCE_KEPT,
    REFUSAL_KEPT,
    VIEW_TRUSTED_FOR,
    AgentAuthority,
    datastore_reader,
)
from server.datastore.errors import StorageError
from server.datastore.records import AttestedAgent
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from server.errors import PermissionDeniedError, UnavailableError
from server.events import ChangeNotifier
from server.peer import AgentPeer
from server.state import ServerState
from server.view_freshness import ViewFreshness
from svid._clock import FakeClock

AGENT = "spiffe://example.org/svid/agent/join_token/late1"


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock(1000)
        self.store = FaultInjectingDataStore(SqliteDataStore(tmp_path / "ds.sqlite3", self.clock))
        self.state = ServerState(self.store, self.clock, ChangeNotifier())  # type: ignore[arg-type]
        self.state.load()  # before the other server writes: this memory is behind
        self.authority = AgentAuthority(self.state, datastore_reader(self.store), self.clock)  # type: ignore[arg-type]

    def written_elsewhere(self, serial: str = "a1", *, banned: bool = False) -> None:
        record = AttestedAgent(AGENT, "join_token", serial, 5000, banned=banned)
        self.store.inner.upsert_agent(record)

    def authorize(self, serial: str = "a1") -> AttestedAgent:
        return asyncio.run(self.authority.authorize(AgentPeer(AGENT, serial)))

    def reads(self) -> int:
        return self.store.calls.count("get_agent")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_an_agent_only_the_datastore_knows_is_told_to_retry(world: World) -> None:
    world.written_elsewhere()
    with pytest.raises(UnavailableError, match="has not read it from the datastore yet"):
        world.authorize()
    with pytest.raises(UnavailableError):
        world.authorize()
    assert world.reads() == 1
    world.clock.advance(ACCEPTANCE_KEPT + 0.1)  # the feed should have it by now: ask again
    with pytest.raises(UnavailableError):
        world.authorize()
    assert world.reads() == 2


def test_a_refusal_the_datastore_agrees_with_is_said_and_kept(world: World) -> None:
    with pytest.raises(PermissionDeniedError, match="evicted or unknown"):
        world.authorize()  # no record anywhere
    world.written_elsewhere("a2", banned=True)
    with pytest.raises(PermissionDeniedError, match="banned"):
        world.authorize("a2")
    assert world.reads() == 2
    with pytest.raises(PermissionDeniedError):
        world.authorize("a2")
    assert world.reads() == 2  # a refusal of one certificate is final: not asked again
    world.clock.advance(REFUSAL_KEPT + 1)
    with pytest.raises(PermissionDeniedError):
        world.authorize("a2")
    assert world.reads() == 3


def test_a_datastore_that_cannot_be_read_is_no_refusal(world: World) -> None:
    world.store.inject(StorageError("connection lost"), "get_agent")
    with pytest.raises(UnavailableError, match="datastore cannot be read"):
        world.authorize()
    with pytest.raises(PermissionDeniedError):  # not remembered: read again, and refused
        world.authorize()
    assert world.reads() == 2


def test_a_ban_memory_holds_is_said_without_a_read(world: World) -> None:
    world.written_elsewhere(banned=True)
    world.state.apply_agents([AttestedAgent(AGENT, "join_token", "a1", 5000, banned=True)], [])
    with pytest.raises(PermissionDeniedError, match="banned"):
        world.authorize("a2")
    assert world.reads() == 0


class Viewed:
    """An authority whose memory knows the agent, over a view the feed last caught up at
    `world.clock`'s start."""

    def __init__(self, world: World) -> None:
        self.world = world
        record = AttestedAgent(AGENT, "join_token", "a1", 5000)
        world.store.inner.upsert_agent(record)
        world.state.apply_agents([record], [])
        self.view = ViewFreshness(world.clock, 30.0)
        self.authority = AgentAuthority(
            world.state,
            datastore_reader(world.store),
            world.clock,
            view=self.view,
        )

    def authorize(self) -> AttestedAgent:
        return asyncio.run(self.authority.authorize(AgentPeer(AGENT, "a1")))


def test_an_agent_memory_accepts_costs_no_read_while_the_view_is_fresh(world: World) -> None:
    viewed = Viewed(world)
    world.store.inner.delete_agent(AGENT)  # evicted elsewhere: the feed has not said so yet
    world.clock.advance(VIEW_TRUSTED_FOR)
    assert viewed.authorize().spiffe_id == AGENT
    assert world.reads() == 0


def test_an_agent_evicted_elsewhere_is_refused_once_the_view_is_older_than_trusted(
    world: World,
) -> None:
    viewed = Viewed(world)
    world.clock.advance(VIEW_TRUSTED_FOR + 0.1)
    assert viewed.authorize().spiffe_id == AGENT  # the datastore agrees
    assert world.reads() == 1
    world.store.inner.delete_agent(AGENT)
    world.clock.advance(ACCEPTANCE_KEPT + 0.1)
    with pytest.raises(PermissionDeniedError, match="evicted or unknown"):
        viewed.authorize()
    viewed.view.caught_up(viewed.view.now())  # the feed read again: memory is trusted
    assert viewed.authorize().spiffe_id == AGENT


def test_an_old_view_and_a_datastore_that_cannot_be_read_accept_no_one(world: World) -> None:
    viewed = Viewed(world)
    world.clock.advance(VIEW_TRUSTED_FOR + 0.1)
    world.store.inject(StorageError("connection lost"), "get_agent")
    with pytest.raises(UnavailableError, match="datastore cannot be read"):
        viewed.authorize()
