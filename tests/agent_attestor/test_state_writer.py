"""The state writer: what changes in the cache reaches the state file in batches, with the Sync
position it belongs to, and a failed or interrupted write loses nothing it should keep."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from agent_attestor.cache import Cache, SyncDelta, SyncPosition, SyncState
from agent_attestor.model import Entry, Selector
from agent_attestor.state_store import SavedState, StateChange, StateStore
from agent_attestor.state_writer import StateWriter
from svid._clock import FakeClock
from tests.agent_attestor.pki import LocalCa
from tests.agent_attestor.test_state_store import svid_for

AGENT = "spiffe://example.org/svid/agent/join_token/t1"
ME = frozenset({Selector("unix", "uid:1")})


class FlakyStore(StateStore):
    """The real store; `fail` makes the next writes raise as a full disk would, `gate` holds
    a write until set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fail = 0
        self.gate: threading.Event | None = None
        self.writes: list[StateChange] = []
        self._lock = threading.Lock()
        self.in_progress = 0
        self.most_at_once = 0

    def write(self, change: StateChange) -> None:
        with self._lock:
            self.in_progress += 1
            self.most_at_once = max(self.most_at_once, self.in_progress)
        try:
            if self.gate is not None:
                assert self.gate.wait(10)
            if self.fail:
                self.fail -= 1
                raise sqlite3.OperationalError("database or disk is full")
            super().write(change)
            self.writes.append(change)
        finally:
            with self._lock:
                self.in_progress -= 1


class Agent:
    """A cache, a Sync position and a writer over a real state file."""

    def __init__(self, tmp_path: Path) -> None:
        self.ca = LocalCa(FakeClock(start=time.time()))
        self.cache = Cache()
        self.position = SyncPosition()
        self.store = FlakyStore(tmp_path / "agent_state.sqlite3")
        self.writer = StateWriter(self.store, self.cache, lambda: self.position, window=0.01)

    def sync(self, entries: list[Entry], revision: int) -> None:
        self.cache.apply_sync(SyncState(tuple(entries), self.ca.bundle(), revision=revision))
        self.position = SyncPosition(AGENT, revision, "ep")

    def mint(self, *entries: Entry) -> None:
        self.cache.put_svids(svid_for(self.ca, e) for e in entries)

    def saved(self) -> SavedState:
        saved = StateStore(self.store.path).load(AGENT, "", self.ca.clock.now())
        assert saved is not None
        return saved


def _entries(n: int) -> list[Entry]:
    return [Entry(f"e{i}", f"spiffe://example.org/w/{i}", ME) for i in range(n)]


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return Agent(tmp_path)


def test_changes_reach_the_file_with_their_position(agent: Agent) -> None:
    entries = _entries(3)
    agent.sync(entries, 5)
    agent.mint(*entries[:2])
    assert asyncio.run(agent.writer.flush())
    saved = agent.saved()
    assert saved.position == SyncPosition(AGENT, 5, "ep")
    assert {e.id for e in saved.state.entries} == {"e0", "e1", "e2"}
    assert {s.serial_hex for s in saved.svids} == {
        s.serial_hex for s in agent.cache.svids().values()
    }
    assert saved.state.bundle == agent.ca.bundle()


def test_each_batch_writes_only_what_changed(agent: Agent) -> None:
    entries = _entries(3)
    agent.sync(entries, 5)
    agent.mint(*entries)
    asyncio.run(agent.writer.flush())
    agent.mint(entries[1])  # a renewal
    asyncio.run(agent.writer.flush())
    last = agent.store.writes[-1]
    assert [s.entry_id for s in last.svids] == ["e1"]
    assert (last.entries, last.removed, last.shared) == ((), (), None)
    assert asyncio.run(agent.writer.flush())
    assert len(agent.store.writes) == 2  # nothing changed: nothing written


def test_removed_entries_and_dropped_svids_leave_the_file(agent: Agent) -> None:
    entries = _entries(3)
    agent.sync(entries, 5)
    agent.mint(*entries)
    asyncio.run(agent.writer.flush())
    renamed = Entry("e2", "spiffe://example.org/renamed", ME)  # its SVID no longer fits
    agent.cache.apply_delta(
        SyncDelta(upserts=(renamed,), removed_ids=("e0",), revision=6, epoch="ep")
    )
    agent.position = SyncPosition(AGENT, 6, "ep")
    agent.cache.drop_svids(["e1"])  # evicted from a capped cache
    asyncio.run(agent.writer.flush())
    saved = agent.saved()
    assert saved.position.revision == 6
    assert {e.id: e.spiffe_id for e in saved.state.entries} == {
        "e1": "spiffe://example.org/w/1",
        "e2": "spiffe://example.org/renamed",
    }
    assert saved.svids == ()


def test_a_revocation_alone_is_saved(agent: Agent) -> None:
    agent.sync(_entries(1), 5)
    asyncio.run(agent.writer.flush())
    agent.cache.apply_delta(
        SyncDelta(revocations_added={("x509_serial", "ab"): 99}, revision=6, epoch="ep")
    )
    agent.position = SyncPosition(AGENT, 6, "ep")
    asyncio.run(agent.writer.flush())
    assert agent.saved().state.revoked_serials == frozenset({"ab"})


def test_nothing_is_saved_before_the_agent_has_reached_a_revision(agent: Agent) -> None:
    agent.cache.apply_sync(SyncState(tuple(_entries(2)), agent.ca.bundle()))
    asyncio.run(agent.writer.flush())
    assert agent.store.writes == []
    agent.position = SyncPosition(AGENT, 1, "ep")
    asyncio.run(agent.writer.flush())
    assert len(agent.saved().state.entries) == 2  # kept for when there is one


def test_a_failed_write_is_written_by_the_next_batch(agent: Agent) -> None:
    entries = _entries(2)
    agent.sync(entries, 5)
    agent.mint(*entries)
    agent.store.fail = 1
    assert not asyncio.run(agent.writer.flush())
    assert asyncio.run(agent.writer.flush())
    saved = agent.saved()
    assert saved.position.revision == 5
    assert {s.entry_id for s in saved.svids} == {"e0", "e1"}


def test_a_refused_agent_saves_that_nothing_is_left(agent: Agent) -> None:
    entries = _entries(2)
    agent.sync(entries, 5)
    agent.mint(*entries)
    asyncio.run(agent.writer.flush())
    agent.cache.refuse("evicted")
    agent.position = SyncPosition(AGENT, 0, "")
    asyncio.run(agent.writer.flush())
    assert StateStore(agent.store.path).load(AGENT, "", agent.ca.clock.now()) is None


def test_a_stop_during_a_write_lets_it_finish_then_writes_the_rest(agent: Agent) -> None:
    entries = _entries(3)
    agent.sync(entries, 5)
    agent.mint(entries[0])

    async def scenario() -> None:
        agent.store.gate = threading.Event()
        running = asyncio.create_task(agent.writer.run())
        agent.writer.position_moved()
        while not agent.writer._current:  # the batch is at the (held) disk
            await asyncio.sleep(0.01)
        running.cancel()  # the agent stops
        agent.mint(entries[1])
        final = asyncio.create_task(agent.writer.flush())
        await asyncio.sleep(0.05)
        assert not final.done()  # waits for the batch in flight, never writes beside it
        agent.store.gate.set()
        assert await final

    asyncio.run(scenario())
    assert agent.store.most_at_once == 1
    assert len(agent.store.writes) == 2
    assert {s.entry_id for s in agent.saved().svids} == {"e0", "e1"}


def test_the_loop_writes_a_batch_after_a_change(agent: Agent) -> None:
    async def scenario() -> None:
        running = asyncio.create_task(agent.writer.run())
        agent.sync(_entries(2), 5)
        agent.writer.position_moved()
        deadline = time.monotonic() + 5
        while not agent.store.writes and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        running.cancel()

    asyncio.run(scenario())
    assert len(agent.saved().state.entries) == 2
