"""The agent's wait before it connects again (reconnect.reconnect_delay): by the kind of failure,
spread over a window wide enough for a server's whole fleet, and never outlasting the agent
SVID, so the agents whose SVIDs are nearest expiry come back first."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agent_attestor.reconnect import LASTED, WAIT_FLOOR, attempt_after, reconnect_delay

AGENTS = 1000
LOW, HIGH = 1.0, 10.0  # the agent's defaults: reconnect_min, reconnect_max


def _herd(**kwargs: float | None) -> list[float]:
    """The first waits of a thousand agents that lost a live stream to one server at once."""
    return [
        reconnect_delay(0, LOW, HIGH, random.Random(n), lost_live=True, **kwargs)
        for n in range(AGENTS)
    ]


def test_a_server_lost_by_a_thousand_agents_at_once_sees_them_back_over_five_seconds() -> None:
    """Spread over reconnect_min (1 s), all came back within a second: a thousand handshakes,
    server checks and Sync catch-ups at once on the server that stalled, or on the one they
    fail over to."""
    delays = _herd()
    assert all(0.0 <= d <= HIGH / 2 for d in delays)
    per_second = Counter(int(d) for d in delays)
    assert sorted(per_second) == [0, 1, 2, 3, 4]
    # 200 expected a second (deviation ~13): none holds more than 260.
    assert max(per_second.values()) <= 260, per_second


def test_an_agent_near_expiry_draws_from_a_window_its_svid_outlives() -> None:
    """In the same herd, agents whose SVIDs have 6 s left come back within 2 s, ahead of most,
    with time left to connect and renew."""
    delays = _herd(life_left=6.0)
    assert max(delays) <= 2.0
    assert max(delays) > 1.8  # still spread over its window, not all at its end
    assert min(delays) < 0.2


@pytest.mark.parametrize("attempt", [0, 1, 3, 10])
@pytest.mark.parametrize("lost_live", [False, True])
def test_no_wait_outlasts_a_third_of_the_life_left(attempt: int, lost_live: bool) -> None:
    for left in (0.5, 3.0, 9.0, 30.0):
        for n in range(50):
            delay = reconnect_delay(
                attempt, LOW, HIGH, random.Random(n), lost_live=lost_live, life_left=left
            )
            assert delay <= max(WAIT_FLOOR, left / 3)


def test_an_svid_with_little_left_still_waits_a_little() -> None:
    """Not a loop that never waits while the SVID is about to lapse."""
    delays = [reconnect_delay(5, LOW, HIGH, random.Random(n), life_left=0.01) for n in range(200)]
    assert max(delays) <= WAIT_FLOOR
    assert max(delays) > WAIT_FLOOR * 0.9


@pytest.mark.parametrize("left", [None, 0.0, -5.0, 3600.0])
def test_no_svid_a_lapsed_one_or_a_long_life_leaves_the_backoff_as_it_is(
    left: float | None,
) -> None:
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (3, 8.0), (6, 10.0)]:
        delays = [
            reconnect_delay(attempt, LOW, HIGH, random.Random(n), life_left=left)
            for n in range(200)
        ]
        assert max(delays) <= ceiling
        assert max(delays) > ceiling * 0.9


def test_only_the_first_wait_after_a_live_stream_spreads_over_the_herds_window() -> None:
    """A connection that failed (refused, attestation failing) backs off from reconnect_min,
    as a fleet's first start does; so do the retries after the first once a stream was lost."""
    first = [reconnect_delay(0, LOW, HIGH, random.Random(n)) for n in range(200)]
    again = [reconnect_delay(1, LOW, HIGH, random.Random(n)) for n in range(200)]
    assert max(first) <= LOW
    assert max(again) <= 2 * LOW


@pytest.mark.parametrize(("attempt", "ceiling"), [(0, 5.0), (2, 5.0), (3, 8.0), (6, 10.0)])
def test_a_stream_lost_again_soon_waits_the_herds_window_or_the_backoff_grown(
    attempt: int, ceiling: float
) -> None:
    """A server that drops every stream soon after its snapshot (crash-looping) is met after
    the longer of the two: never sooner than a herd's, and backing off to reconnect_max."""
    delays = [
        reconnect_delay(attempt, LOW, HIGH, random.Random(n), lost_live=True) for n in range(200)
    ]
    assert max(delays) <= ceiling
    assert max(delays) > ceiling * 0.9


def test_the_herds_window_is_never_under_reconnect_min_nor_over_reconnect_max() -> None:
    narrow = [reconnect_delay(0, 1.0, 1.0, random.Random(n), lost_live=True) for n in range(200)]
    assert max(narrow) <= 1.0
    assert max(narrow) > 0.9
    wide = [reconnect_delay(0, 0.1, 0.3, random.Random(n), lost_live=True) for n in range(200)]
    assert max(wide) <= 0.15


def test_only_a_connection_that_held_past_thirty_seconds_starts_the_backoff_afresh() -> None:
    """README: "Only a connection that held 30 s starts the backoff afresh". A crash-looping
    server that drops each stream seconds after it came up keeps its agents backing off."""
    assert LASTED == 30.0
    assert attempt_after(5, 30.5) == 0
    assert attempt_after(5, 30.0) == 5
    assert attempt_after(5, 2.0) == 5
