"""When the agent renews its own SVID (sync.renewal_wait), moved by a jitter stable for the SVID
(rotation.jitter_for, as workload SVIDs are): agents attested or renewed at one instant (a fleet
started, a server restored) renewed at one instant again, every half life, forever."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor.agent_store import AgentSvid
from agent_attestor.agent_svid_keeper import SERVER_BACKDATE
from agent_attestor.rotation import JITTER, ROTATE_AT, jitter_for
from agent_attestor.sync import Arrival, renewal_wait
from server.ca.signer import BACKDATE_SECONDS
from server.config import MIN_OWN_SVID_TTL
from svid._clock import FakeClock
from tests.agent_attestor.pki import LocalCa

AGENT = "spiffe://example.org/svid/agent/join_token/t"
TTL = 3600
# As the server issues them: NotBefore back-dated, the TTL counted from the issue.
NOT_BEFORE = 1_700_000_000.0
ISSUED = NOT_BEFORE + BACKDATE_SECONDS
NOT_AFTER = ISSUED + TTL
LIFE = NOT_AFTER - NOT_BEFORE


def _arrived_now() -> Arrival:
    return Arrival(wall=ISSUED, elapsed=100.0)


@pytest.mark.parametrize("jitter", [-JITTER, 0.0, JITTER])
def test_an_svid_just_arrived_is_renewed_at_its_jittered_point(jitter: float) -> None:
    """The bound on the elapsed clock moves with it: at half the life alone it cut every later
    point back to half, and the SVIDs that arrived together renewed between 0.4 and 0.5."""
    wait = renewal_wait(NOT_BEFORE, NOT_AFTER, _arrived_now(), ISSUED, 100.0, jitter=jitter)
    assert wait == pytest.approx(LIFE * (ROTATE_AT + jitter) - BACKDATE_SECONDS)


def test_a_jitter_past_its_bound_is_held_to_it() -> None:
    wait = renewal_wait(NOT_BEFORE, NOT_AFTER, _arrived_now(), ISSUED, 100.0, jitter=1.0)
    assert wait == pytest.approx(LIFE * (ROTATE_AT + JITTER) - BACKDATE_SECONDS)


def test_a_clock_behind_renews_at_the_jittered_point_after_arrival_on_the_elapsed_clock() -> None:
    """Half the TTL behind the server's, the wall clock reads the point late: the elapsed clock
    renews the same fraction of what it had left at its arrival after it, never past it."""
    behind = ISSUED - TTL / 2
    arrival = Arrival(wall=behind, elapsed=100.0)
    wait = renewal_wait(NOT_BEFORE, NOT_AFTER, arrival, behind, 100.0, jitter=JITTER)
    assert wait == pytest.approx(TTL * (ROTATE_AT + JITTER))


def test_an_svid_loaded_from_disk_is_never_renewed_before_its_jittered_point() -> None:
    """Loaded an hour's tenth after it was issued, it came before the load: its jittered point
    by its validity comes first, and the elapsed bound only later."""
    loaded = ISSUED + 360
    arrival = Arrival(wall=None, elapsed=100.0)
    wait = renewal_wait(NOT_BEFORE, NOT_AFTER, arrival, loaded, 100.0, jitter=-JITTER)
    assert wait == pytest.approx(LIFE * (ROTATE_AT - JITTER) - BACKDATE_SECONDS - 360)


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


@pytest.mark.parametrize("ttl", [MIN_OWN_SVID_TTL, 15, 60])
def test_a_short_svid_on_a_clock_behind_is_renewed_with_its_retry_time_left(ttl: int) -> None:
    """Counted over its whole life, back-dating included, the elapsed bound moved late by the
    jitter fell past NotAfter: 12.6 s after the arrival of an 11 s SVID, on a clock behind the
    server's (its wall point later still), and a renewal that failed there had no retry left.
    It keeps what is left at the arrival's fraction, as a clock in time does."""
    not_after = ISSUED + ttl
    behind = ISSUED - 10 * ttl
    arrival = Arrival(wall=behind, elapsed=100.0)
    wait = renewal_wait(NOT_BEFORE, not_after, arrival, behind, 100.0, jitter=JITTER)
    assert ISSUED + wait < not_after
    assert not_after - (ISSUED + wait) == pytest.approx(ttl * (1 - ROTATE_AT - JITTER))


def test_an_svid_living_less_than_the_back_dating_is_not_renewed_on_arrival() -> None:
    """Not back-dated, 8 s: all of its life but the back-dating is less than none, and an
    elapsed bound before its arrival renewed it on arrival, and the next, without end."""
    not_after = ISSUED + 8
    arrival = Arrival(wall=ISSUED - 600, elapsed=100.0)
    wait = renewal_wait(ISSUED, not_after, arrival, ISSUED - 600, 100.0)
    assert 0 < wait < not_after - ISSUED


def test_the_back_dating_counted_is_the_servers() -> None:
    assert SERVER_BACKDATE == BACKDATE_SECONDS
