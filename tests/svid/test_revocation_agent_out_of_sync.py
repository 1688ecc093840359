"""An agent cut off from its server says how old its revocation list is (RevocationList's
out_of_sync_ms), and a source counts its revocation data that stale, and older by the time
since the message came: a healthy stream to a partitioned agent kept revocation_staleness() at
0, and max_revocation_staleness admitted tokens revoked at the server meanwhile."""

from __future__ import annotations

import pytest

from svid import (
    FakeClock,
    JwtVerifier,
    MemoryBundleSource,
    RevocationSet,
    SpiffeBundle,
    StaleRevocationsError,
    TrustDomain,
    sign_jws,
)
from svid._proto import revocation_pb2
from svid._source_state import SourceState
from svid._workload_calls import REVOCATIONS, X509_BUNDLES, RevocationsUpdate, revocations_from
from svid.workloadapi import WorkloadApiError
from tests.clocks import SteppedClock
from tests.svid.certs import T0, ec_key

TD = TrustDomain("example.org")


def _list(behind: float) -> RevocationsUpdate:
    return RevocationsUpdate((), (), 1, behind)


def _state(clock: FakeClock | SteppedClock) -> SourceState:
    return SourceState((X509_BUNDLES.name, REVOCATIONS.name), RevocationSet(), clock)


def _staleness(state: SourceState, clock: FakeClock | SteppedClock) -> float:
    return state.revocations.staleness(clock.monotonic(), clock.now())


def test_the_list_is_as_stale_as_the_agent_says_and_ages_from_its_arrival() -> None:
    clock = FakeClock(T0)
    state = _state(clock)
    state.delivered(REVOCATIONS.name, _list(0.0))
    assert _staleness(state, clock) == 0.0
    state.delivered(REVOCATIONS.name, _list(0.002))  # the agent has just lost its server
    assert _staleness(state, clock) == pytest.approx(0.002)
    clock.advance(4)  # the stream to the agent stays healthy and quiet
    assert _staleness(state, clock) == pytest.approx(4.002)
    state.delivered(REVOCATIONS.name, _list(30.0))  # a list changed 30 s into the partition
    assert _staleness(state, clock) == 30.0
    clock.advance(1)
    assert _staleness(state, clock) == 31.0
    assert state.revocations.updated_at == T0 + 4  # a list did arrive then
    state.delivered(REVOCATIONS.name, _list(0.0))  # the agent is back in sync
    assert _staleness(state, clock) == 0.0


def test_the_agents_count_goes_on_through_a_broken_stream_to_it() -> None:
    clock = FakeClock(T0)
    state = _state(clock)
    state.delivered(REVOCATIONS.name, _list(10.0))
    clock.advance(2)
    # Counted from the break, the data would look 10 s fresher than the agent said it was.
    state.failed(REVOCATIONS.name, WorkloadApiError("agent gone", "UNAVAILABLE"))
    clock.advance(3)
    assert _staleness(state, clock) == 15.0


def test_a_step_back_of_the_wall_clock_does_not_make_the_agents_list_fresher() -> None:
    clock = SteppedClock(FakeClock(T0), 1800.0)
    state = _state(clock)
    state.delivered(REVOCATIONS.name, _list(5.0))
    clock.offset = 0.0  # NTP steps the service's clock back half an hour
    clock.base.advance(1)
    assert _staleness(state, clock) == 6.0


def test_a_verifier_refuses_while_the_agent_is_out_of_sync_past_its_bound() -> None:
    clock = FakeClock(T0)
    key = ec_key()
    bundles = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": key.public_key()}))
    token = sign_jws(
        {"kid": "k1"}, {"sub": "spiffe://example.org/w", "aud": "svc", "exp": T0 + 300}, key
    )
    state = _state(clock)
    j = JwtVerifier(
        bundles.jwt_bundle_for, clock=clock, revocations=state.revocations,
        max_revocation_staleness=5,
    )  # fmt: skip
    state.delivered(REVOCATIONS.name, _list(0.0))
    j.verify(token, "svc")
    state.delivered(REVOCATIONS.name, _list(0.001))
    clock.advance(4.9)
    j.verify(token, "svc")  # within the bound (and now cached)
    clock.advance(0.2)
    with pytest.raises(StaleRevocationsError):
        j.verify(token, "svc")  # the cached answer too
    assert j.revocations_fresh_for() == 0.0
    state.delivered(REVOCATIONS.name, _list(0.0))
    j.verify(token, "svc")


def test_the_field_in_milliseconds_and_an_agent_that_does_not_send_it() -> None:
    old = revocations_from(revocation_pb2.RevocationList(version=3))
    assert old.behind == 0.0  # an agent before the field: counted in sync, as before
    said = revocations_from(revocation_pb2.RevocationList(version=3, out_of_sync_ms=2500))
    assert said.behind == 2.5
    assert revocations_from(revocation_pb2.RevocationList(out_of_sync_ms=-7)).behind == 0.0
    clock = FakeClock(T0)
    state = _state(clock)
    state.delivered(REVOCATIONS.name, old)
    clock.advance(100)
    assert _staleness(state, clock) == 0.0
    state.delivered(REVOCATIONS.name, said)
    assert _staleness(state, clock) == 2.5
