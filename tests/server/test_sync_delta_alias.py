"""A node-alias edit costs what it changed for each agent: an agent whose reach it left as it
was gets none of the entries under the alias, one that gained or lost the alias gets them all.
Real entry index and change log; each delta is checked against a fresh snapshot too."""

from __future__ import annotations

from dataclasses import replace

from server.datastore.records import Entry, Selector
from server.entitlement import entitled_entries
from server.sync_delta import EntryDelta, entry_delta
from svid._clock import FakeClock
from tests.server.test_sync_delta_property import FakeState

TD = "spiffe://example.org"
SERVER = f"{TD}/svid/server"
AGENT = f"{TD}/svid/agent/a"
ALIAS = f"{TD}/alias/cluster"
K8S, ZONE, OTHER = Selector("k8s", "cluster:a"), Selector("zone", "z1"), Selector("k8s", "x")
HAVE = (K8S, ZONE)
UNDER = 200


def _world(*aliases: Entry) -> tuple[FakeState, dict[str, Entry]]:
    """The aliases, and UNDER workload entries under their SPIFFE ID; an agent holding what a
    snapshot gives it."""
    state = FakeState(FakeClock(start=1000))
    state.write(list(aliases), [])
    workloads = [Entry(f"w{n:04d}", f"{TD}/w/{n}", ALIAS, (OTHER,)) for n in range(UNDER)]
    state.write(workloads, [])
    return state, _snapshot(state)


def _snapshot(state: FakeState) -> dict[str, Entry]:
    now = int(state.clock.now())
    return {e.id: e for e in entitled_entries(state.entries, AGENT, HAVE, SERVER, now)}


def _catch_up(state: FakeState, held: dict[str, Entry], since: int) -> EntryDelta:
    """The delta for the changes after `since`, applied to `held`, which must then be what a
    fresh snapshot gives."""
    window = state.log.since(since, state.log.epoch)
    assert window is not None
    delta = entry_delta(
        window,
        state.entries,
        agent_id=AGENT,
        selectors=HAVE,
        server_id=SERVER,
        now=int(state.clock.now()),
    )
    for entry in delta.upserts:
        held[entry.id] = entry
    for entry_id in delta.removed_ids:
        held.pop(entry_id, None)
    assert held == _snapshot(state)
    return delta


def _alias(
    selectors: tuple[Selector, ...] = (K8S,), *, x509_svid_ttl: int = 0, expires_at: int = 0
) -> Entry:
    return Entry(
        "alias-1", ALIAS, SERVER, selectors, x509_svid_ttl=x509_svid_ttl, expires_at=expires_at
    )


def test_an_edit_that_keeps_the_agent_matched_sends_nothing_under_the_alias() -> None:
    alias = _alias()
    state, held = _world(alias)
    assert len(held) == UNDER
    for edited in (
        replace(alias, x509_svid_ttl=60),
        replace(alias, dns_names=("a.example.org",)),
        replace(alias, selectors=(K8S, ZONE)),  # narrower, but the agent has both
    ):
        since = state.log.head
        state.write([edited], [])
        assert _catch_up(state, held, since) == EntryDelta()
        alias = edited


def test_an_agent_that_gains_or_loses_the_alias_gets_everything_under_it() -> None:
    alias = _alias()
    state, held = _world(alias)
    since = state.log.head
    state.write([replace(alias, selectors=(OTHER,))], [])
    delta = _catch_up(state, held, since)
    assert (len(delta.upserts), len(delta.removed_ids)) == (0, UNDER)
    since = state.log.head
    state.write([alias], [])
    delta = _catch_up(state, held, since)
    assert (len(delta.upserts), len(delta.removed_ids)) == (UNDER, 0)


def test_a_gain_then_an_edit_in_one_window_is_still_a_gain() -> None:
    # A reconnecting agent catches up over both: what counts is the alias before the window.
    state, held = _world(_alias((OTHER,)))
    assert held == {}
    since = state.log.head
    state.write([_alias()], [])
    state.write([_alias(x509_svid_ttl=60)], [])
    assert len(_catch_up(state, held, since).upserts) == UNDER


def test_a_loss_undone_in_one_window_sends_nothing() -> None:
    state, held = _world(_alias())
    since = state.log.head
    state.write([], ["alias-1"])
    state.write([_alias()], [])
    assert _catch_up(state, held, since) == EntryDelta()


def test_one_of_two_aliases_with_the_same_id_going_keeps_the_reach() -> None:
    second = Entry("alias-2", ALIAS, SERVER, (ZONE,))
    state, held = _world(_alias(), second)
    since = state.log.head
    state.write([], ["alias-2"])
    assert _catch_up(state, held, since) == EntryDelta()


def test_an_expired_alias_made_live_again_is_a_gain() -> None:
    # Expired and told so: the agent dropped what was under it. Then its expiry is lifted:
    # the version before the window matched but was not live, so the entries come again.
    state, held = _world(_alias(expires_at=1010))
    assert len(held) == UNDER
    state.clock.advance(20)
    since = state.log.head
    state.record_expired([state.entries.by_id["alias-1"]])
    assert len(_catch_up(state, held, since).removed_ids) == UNDER
    since = state.log.head
    state.write([_alias(expires_at=0)], [])
    assert len(_catch_up(state, held, since).upserts) == UNDER
