"""The propagator hands a change only to the streams it concerns, and bounds each backlog."""

from __future__ import annotations

import asyncio

import pytest

from server import propagation
from server.datastore.records import AttestedAgent, Entry, Selector
from server.propagation import Propagator
from svid._clock import FakeClock
from tests.server.test_sync_delta_property import AGENTS, ALIASES, SERVER, FakeState

A, B = AGENTS[0], AGENTS[1]


def _world() -> tuple[FakeState, Propagator]:
    clock = FakeClock(start=1000)
    state = FakeState(clock)
    propagator = Propagator(state, SERVER, clock)
    propagator.start()
    return state, propagator


def _agent(agent_id: str, *selectors: Selector) -> AttestedAgent:
    return AttestedAgent(agent_id, "t", "s", 0, selectors=selectors)


def test_an_entry_change_reaches_only_the_streams_serving_its_parents() -> None:
    state, propagator = _world()
    a = propagator.subscribe(_agent(A))
    b = propagator.subscribe(_agent(B))
    state.write([Entry("e1", "spiffe://example.org/w/1", A, ())], [])
    assert (len(a.inbox), len(b.inbox), propagator.deliveries) == (1, 0, 1)
    # Moved from A to B: both are concerned (one loses it, one gains it).
    state.write([Entry("e1", "spiffe://example.org/w/1", B, ())], [])
    assert (len(a.inbox), len(b.inbox)) == (2, 1)
    state.write([Entry("e2", "spiffe://example.org/w/2", "spiffe://example.org/nobody", ())], [])
    assert propagator.deliveries == 3  # the last write concerned no stream


def test_a_node_alias_reaches_the_streams_whose_agent_it_matches() -> None:
    state, propagator = _world()
    k1 = Selector("k", "1")
    a = propagator.subscribe(_agent(A, k1))
    b = propagator.subscribe(_agent(B, Selector("k", "2")))
    state.write([Entry("alias", ALIASES[0], SERVER, (k1,))], [])
    assert (len(a.inbox), len(b.inbox)) == (1, 0)
    assert ALIASES[0] in a.parents
    # Entries under the alias now reach A's stream through the parent index.
    state.write([Entry("w", "spiffe://example.org/w", ALIASES[0], ())], [])
    assert (len(a.inbox), len(b.inbox)) == (2, 0)


def test_a_backlog_past_the_bound_is_dropped_for_a_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(propagation, "MAX_INBOX", 3)
    state, propagator = _world()
    a = propagator.subscribe(_agent(A))
    for n in range(5):
        state.write([Entry(f"e{n}", f"spiffe://example.org/w/{n}", A, ())], [])
    assert a.overflowed
    assert len(a.inbox) <= 3


def test_heartbeats_are_spread_over_their_interval_a_slice_of_the_streams_a_tick() -> None:
    """One tick beat every stream at once: 10,000 streams woke together, each sending its
    heartbeat, and the server's loop answered nothing else for about a second every interval.
    A tick beats a slice; in HEARTBEAT_SLICES ticks (one interval) every stream once."""
    _, propagator = _world()
    subs = [propagator.subscribe(_agent(f"{A}/{n}"), heartbeats=True) for n in range(95)]
    quiet = propagator.subscribe(_agent(B))  # an older agent: asked for none
    beaten = [0] * len(subs)
    for _ in range(propagation.HEARTBEAT_SLICES):
        propagator.beat()
        due = [n for n, sub in enumerate(subs) if sub.beat]
        assert len(due) <= -(-len(subs) // propagation.HEARTBEAT_SLICES)
        for n in due:
            beaten[n] += 1
            subs[n].beat = False
            subs[n].wake.clear()
    assert beaten == [1] * len(subs)
    assert not quiet.beat
    assert not quiet.wake.is_set()


def test_a_stream_gone_leaves_its_heartbeat_slice() -> None:
    _, propagator = _world()
    subs = [propagator.subscribe(_agent(f"{A}/{n}"), heartbeats=True) for n in range(20)]
    for sub in subs:
        propagator.unsubscribe(sub)
    for _ in range(propagation.HEARTBEAT_SLICES):
        propagator.beat()
    assert not any(sub.beat for sub in subs)


def test_heartbeat_ticks_keep_to_their_schedule_however_late_each_wait_returns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wait after each beat: a loop 50 ms late at each of the ten ticks of a 1 s interval
    beat each stream every 1.5 s, and at 300 ms late every 4 s, past the two intervals of
    silence agents allow: every agent counted its server lost, and back, again and again."""
    _, propagator = _world()
    late = 0.05
    clock = [0.0]
    beaten: list[float] = []
    beat = propagator.beat

    def counted() -> None:
        beaten.append(clock[0])
        beat()

    async def wait(_stop: asyncio.Event, seconds: float) -> bool:
        clock[0] += seconds + late
        return len(beaten) == 10 * propagation.HEARTBEAT_SLICES

    monkeypatch.setattr(propagator, "beat", counted)
    asyncio.run(propagator.run_heartbeats(1.0, asyncio.Event(), wait=wait, now=lambda: clock[0]))
    # Ten rounds of slices: ten intervals, each tick as late as one wait, not all of them.
    assert beaten[-1] == pytest.approx(10.0 + late)
