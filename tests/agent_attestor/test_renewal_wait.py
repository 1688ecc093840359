"""When the agent renews its own SVID (sync.renewal_wait), moved by a jitter stable for the SVID
(rotation.jitter_for, as workload SVIDs are): agents attested or renewed at one instant (a fleet
started, a server restored) renewed at one instant again, every half life, forever."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor.agent_store import AgentSvid
from agent_attestor.rotation import JITTER, ROTATE_AT, jitter_for
from agent_attestor.sync import Arrival, renewal_wait
from svid._clock import FakeClock
from tests.agent_attestor.pki import LocalCa

AGENT = "spiffe://example.org/svid/agent/join_token/t"
TTL = 3600
NOT_BEFORE = 1_700_000_000.0
NOT_AFTER = NOT_BEFORE + TTL


def _arrived_now() -> Arrival:
    return Arrival(wall=NOT_BEFORE, elapsed=100.0)


@pytest.mark.parametrize("jitter", [-JITTER, 0.0, JITTER])
def test_an_svid_just_arrived_is_renewed_at_its_jittered_point(jitter: float) -> None:
    """The bound on the elapsed clock moves with it: at half the life alone it cut every later
    point back to half, and the SVIDs that arrived together renewed between 0.4 and 0.5."""
    wait = renewal_wait(NOT_BEFORE, NOT_AFTER, _arrived_now(), NOT_BEFORE, 100.0, jitter=jitter)
    assert wait == pytest.approx(TTL * (ROTATE_AT + jitter))


def test_a_jitter_past_its_bound_is_held_to_it() -> None:
    wait = renewal_wait(NOT_BEFORE, NOT_AFTER, _arrived_now(), NOT_BEFORE, 100.0, jitter=1.0)
    assert wait == pytest.approx(TTL * (ROTATE_AT + JITTER))


def test_a_clock_behind_renews_at_the_jittered_point_after_arrival_on_the_elapsed_clock() -> None:
    """Half the TTL behind the server's, the wall clock reads the point late: the elapsed clock
    renews the same fraction of the life after its arrival, never past it."""
    behind = NOT_BEFORE - TTL / 2
    arrival = Arrival(wall=behind, elapsed=100.0)
    wait = renewal_wait(NOT_BEFORE, NOT_AFTER, arrival, behind, 100.0, jitter=JITTER)
    assert wait == pytest.approx(TTL * (ROTATE_AT + JITTER))


def test_an_svid_loaded_from_disk_is_never_renewed_before_its_jittered_point() -> None:
    """Loaded an hour's tenth after it was issued, it came before the load: its jittered point
    by its validity comes first, and the elapsed bound only later."""
    loaded = NOT_BEFORE + 360
    arrival = Arrival(wall=None, elapsed=100.0)
    wait = renewal_wait(NOT_BEFORE, NOT_AFTER, arrival, loaded, 100.0, jitter=-JITTER)
    assert wait == pytest.approx(TTL * (ROTATE_AT - JITTER) - 360)


def test_agent_svids_issued_at_one_instant_renew_spread_over_the_jitter() -> None:
    ca = LocalCa(FakeClock(start=NOT_BEFORE), ttl=TTL)
    svids = []
    for _ in range(64):
        key = ec.generate_private_key(ec.SECP256R1())
        svids.append(AgentSvid(AGENT, (ca.sign_leaf(key.public_key(), AGENT),), key))
    arrival = Arrival(wall=NOT_BEFORE, elapsed=0.0)
    # Where in its life (from its back-dated NotBefore) each is renewed.
    points = [
        (
            NOT_BEFORE
            + renewal_wait(
                s.not_before, s.not_after, arrival, NOT_BEFORE, 0.0, jitter=jitter_for(s)
            )
            - s.not_before
        )
        / (s.not_after - s.not_before)
        for s in svids
    ]
    assert all(abs(p - ROTATE_AT) <= JITTER + 1e-9 for p in points)
    # On both sides of half the life, not at one instant: 64 draws none in the window's outer
    # quarter on one side, by chance, about once in 10^8.
    assert min(points) < ROTATE_AT - JITTER / 2
    assert max(points) > ROTATE_AT + JITTER / 2
    assert jitter_for(svids[0]) == jitter_for(svids[0])  # stable: the decision never flaps
