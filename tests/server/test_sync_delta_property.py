"""Deltas add up to snapshots: for random entry, parent, selector, alias and expiry changes, an
agent that applies only the deltas of the changes dispatched to its stream holds exactly what a
fresh snapshot would give it, and so does an agent catching up from the log at any revision."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from server.changelog import Change, ChangeLog, EntryTouch, touches
from server.datastore.records import AttestedAgent, Entry, Selector
from server.entitlement import (
    Entitlement,
    EntryIndex,
    SpiffeIdCache,
    agent_parents,
    entitled_entries,
)
from server.propagation import Propagator, Subscription
from server.sync_delta import entry_delta
from svid._clock import FakeClock

TD = "spiffe://example.org"
SERVER = f"{TD}/svid/server"
AGENTS = (f"{TD}/svid/agent/a", f"{TD}/svid/agent/b", f"{TD}/svid/agent/c")
ALIASES = (f"{TD}/alias/x", f"{TD}/alias/y")
SELECTORS = (Selector("k", "1"), Selector("k", "2"), Selector("k", "3"))
AGENT_SELECTORS = {
    AGENTS[0]: (SELECTORS[0], SELECTORS[1]),
    AGENTS[1]: (SELECTORS[1], SELECTORS[2]),
    AGENTS[2]: (),
}


@dataclass
class FakeState:
    """The part of ServerState the propagator uses, driven the same way (changelog.touches)."""

    clock: FakeClock
    entries: EntryIndex = field(default_factory=EntryIndex)
    log: ChangeLog = field(default_factory=ChangeLog)
    listeners: list[Callable[[Change], None]] = field(default_factory=list)

    def on_change(self, listener: Callable[[Change], None]) -> None:
        self.listeners.append(listener)

    def record(self, touched: list[EntryTouch]) -> None:
        change = self.log.append(entries=touched)
        for listener in self.listeners:
            listener(change)

    def write(self, put: list[Entry], removed: list[str]) -> None:
        touched = touches(self.entries.by_id, put, removed)
        self.entries = self.entries.with_changes(put, removed)
        self.record(touched)

    def record_expired(self, entries: Iterable[Entry]) -> None:
        touched = [EntryTouch(e.id, e, e) for e in entries]
        if touched:
            self.record(touched)


def _entry(entry_id: str, parent: int, selectors: tuple[Selector, ...], expires: int) -> Entry:
    parents = (*AGENTS, *ALIASES, SERVER)
    parent_id = parents[parent]
    # Entries under the server are node aliases: their SPIFFE ID is one of the alias IDs.
    spiffe_id = ALIASES[int(entry_id[1:]) % 2] if parent_id == SERVER else f"{TD}/w/{entry_id}"
    return Entry(entry_id, spiffe_id, parent_id, selectors, expires_at=expires)


_writes = st.lists(
    st.tuples(
        st.sampled_from([f"e{n}" for n in range(8)]),
        st.integers(0, len(AGENTS) + len(ALIASES)),  # parent: an agent, an alias, the server
        st.sets(st.sampled_from(SELECTORS), max_size=2).map(lambda s: tuple(sorted(s, key=str))),
        st.sampled_from([0, 0, 0, 5, 20]),  # expiry (0: none), relative to the start
        st.booleans(),  # delete instead of write
    ),
    min_size=1,
    max_size=4,
)
_steps = st.lists(st.one_of(_writes, st.integers(1, 10)), min_size=1, max_size=25)


def _held(held: dict[str, Entry], window: list[Change], state: FakeState, agent_id: str) -> None:
    delta = entry_delta(
        window,
        state.entries,
        agent_id=agent_id,
        selectors=AGENT_SELECTORS[agent_id],
        server_id=SERVER,
        now=int(state.clock.now()),
    )
    for entry in delta.upserts:
        held[entry.id] = entry
    for entry_id in delta.removed_ids:
        held.pop(entry_id, None)


def _snapshot(state: FakeState, agent_id: str) -> dict[str, Entry]:
    now = int(state.clock.now())
    entries = entitled_entries(state.entries, agent_id, AGENT_SELECTORS[agent_id], SERVER, now)
    # Issuance answers entry by entry (Entitlement): it must agree with the snapshot.
    parents = agent_parents(state.entries, agent_id, AGENT_SELECTORS[agent_id], SERVER, now)
    view = Entitlement(state.entries, parents, now, SpiffeIdCache())
    assert [i for i in state.entries.by_id if view.get(i)] == [
        i for i in state.entries.by_id if i in {e.id for e in entries}
    ]
    for entry in entries:
        assert view.by_spiffe_id(entry.spiffe_id) is not None
    return {e.id: e for e in entries}


@settings(max_examples=300, deadline=None)
@given(steps=_steps)
def test_deltas_dispatched_to_a_stream_add_up_to_a_fresh_snapshot(
    steps: list[list[tuple[str, int, tuple[Selector, ...], int, bool]] | int],
) -> None:
    clock = FakeClock(start=1000)
    start = int(clock.now())
    state = FakeState(clock)
    propagator = Propagator(state, SERVER, clock)
    propagator.start()
    subs: dict[str, Subscription] = {
        a: propagator.subscribe(AttestedAgent(a, "t", "s", 0, selectors=AGENT_SELECTORS[a]))
        for a in AGENTS
    }
    held = {a: _snapshot(state, a) for a in AGENTS}
    snapshots_at: dict[int, dict[str, dict[str, Entry]]] = {0: dict(held)}
    for step in steps:
        if isinstance(step, int):
            clock.advance(step)
            propagator.sweep()
        else:
            put = [
                _entry(i, p, s, start + x if x else 0) for i, p, s, x, delete in step if not delete
            ]
            removed = [i for i, _, _, _, delete in step if delete]
            state.write(put, removed)
        for agent_id, sub in subs.items():
            window, sub.inbox = sub.inbox, []
            _held(held[agent_id], window, state, agent_id)
            assert held[agent_id] == _snapshot(state, agent_id)
        snapshots_at[state.log.head] = {a: _snapshot(state, a) for a in AGENTS}
    # A reconnecting agent at any past revision catches up from the log to the same state.
    for revision in snapshots_at:
        window = state.log.since(revision, state.log.epoch)
        assert window is not None
        for agent_id in AGENTS:
            caught_up = dict(snapshots_at[revision][agent_id])
            _held(caught_up, window, state, agent_id)
            assert caught_up == _snapshot(state, agent_id)
