"""Revocation freshness: the set's staleness as its feed comes and goes, verifiers that fail closed
past ``max_revocation_staleness``, and the source state's revocation events (no I/O here; the
streams are driven by hand, the clock is a FakeClock)."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest

from svid import (
    BundleSet,
    FakeClock,
    JwtVerifier,
    MemoryBundleSource,
    RevocationEvent,
    RevocationSet,
    Revoked,
    SpiffeBundle,
    StaleRevocationsError,
    TrustDomain,
    VerificationError,
    X509Bundle,
    X509Svid,
    X509Verifier,
    certs_to_pem,
    der_concat,
    sign_jws,
)
from svid._revocation import cert_key
from svid._source_state import SourceState
from svid._workload_calls import (
    REVOCATIONS,
    X509_BUNDLES,
    X509_SVIDS,
    RevocationsUpdate,
    X509BundlesUpdate,
)
from svid.workloadapi import WorkloadApiError
from tests.clocks import SleptClock, SteppedClock
from tests.svid.certs import T0, ec_key, make_ca, make_leaf
from tests.svid.tls_pki import key_pem
from tests.svid.workload_fake import signed_crl

TD = TrustDomain("example.org")


def test_staleness_follows_the_feed() -> None:
    rs = RevocationSet()
    assert rs.staleness(T0) == 0.0  # nobody feeds it: as current as its owner says
    rs.feed_lost(None)
    assert rs.staleness(T0) == math.inf  # fed, but never delivered
    rs.feed_delivered(T0)
    assert rs.updated_at == T0
    assert rs.staleness(T0 + 1000) == 0.0  # full-state streams are quiet while nothing changes
    rs.feed_lost(T0 + 1000)
    assert rs.staleness(T0 + 1004) == 4.0
    rs.feed_lost(T0 + 1003)  # a second failure does not make it fresher
    assert rs.staleness(T0 + 1004) == 4.0
    rs.feed_delivered(T0 + 1010)
    assert rs.staleness(T0 + 1020) == 0.0


def test_staleness_counts_a_sleep_of_the_host_after_a_step_back_of_the_clock() -> None:
    # Staleness was the larger of the two clocks' counts since the loss: after a step back of
    # an hour, the wall clock's count stayed an hour short, and a half-hour sleep of the host
    # (which the monotonic clock does not count) went uncounted by both. Counted as
    # ElapsedClock counts, reading by reading, each clock's move counts when it is the larger.
    rs = RevocationSet()
    rs.feed_delivered(T0)
    rs.feed_lost(100.0, T0)
    assert rs.staleness(105.0, T0 - 3595.0) == 5.0  # stepped back an hour, five seconds on
    assert rs.staleness(105.0, T0 - 1795.0) == 1805.0  # then the host slept half an hour


def test_staleness_keeps_time_with_readings_whose_two_clocks_were_read_a_moment_apart() -> None:
    # Verifiers read the wall clock, then the monotonic one (now, then the check), from many
    # threads: one preempted between the two hands over a pair a few ms apart. Counted reading
    # by reading, each such pair added its gap once the next came, and staleness ran ahead of
    # time: eight verifying threads made 3 s count 3.1 to 3.2, refusing before the setting.
    rs = RevocationSet()
    rs.feed_delivered(T0)
    rs.feed_lost(100.0, T0)
    staleness = 0.0
    for i in range(1, 1001):
        gap = 0.005 if i % 2 else 0.0  # every other pair's wall clock read 5 ms before
        staleness = rs.staleness(100.0 + i * 0.01, T0 + i * 0.01 - gap)
    assert staleness == pytest.approx(10.0)
    assert rs.staleness(110.0, T0 + 1810.0) == pytest.approx(1810.0)  # a sleep still counts


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, True])
def test_max_staleness_must_be_a_positive_number(bad: float) -> None:
    with pytest.raises(ValueError, match="max_revocation_staleness"):
        X509Verifier(lambda td: None, max_revocation_staleness=bad)
    with pytest.raises(ValueError, match="max_revocation_staleness"):
        JwtVerifier(lambda td: None, max_revocation_staleness=bad)


def test_verifiers_fail_closed_on_stale_revocations() -> None:
    clock = FakeClock(T0)
    ca = make_ca()
    leaf = der_concat([make_leaf(ca).cert])
    key = ec_key()
    source = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,), {"k1": key.public_key()}))
    token = sign_jws(
        {"kid": "k1"}, {"sub": "spiffe://example.org/w", "aud": "svc", "exp": T0 + 300}, key
    )
    rs = RevocationSet()
    rs.feed_lost(None)
    x = X509Verifier(
        source.x509_bundle_for, clock=clock, revocations=rs, max_revocation_staleness=5
    )
    j = JwtVerifier(source.jwt_bundle_for, clock=clock, revocations=rs, max_revocation_staleness=5)
    lenient = X509Verifier(source.x509_bundle_for, clock=clock, revocations=rs)
    with pytest.raises(StaleRevocationsError, match="never received"):
        x.verify_der(leaf)
    with pytest.raises(StaleRevocationsError, match="never received"):
        j.verify(token, "svc")
    lenient.verify_der(leaf)  # opt-in only
    rs.feed_delivered(clock.now())
    x.verify_der(leaf)  # now cached
    j.verify(token, "svc")
    rs.feed_lost(clock.monotonic())  # the agent went away
    clock.advance(5)
    x.verify_der(leaf)
    clock.advance(0.5)
    with pytest.raises(StaleRevocationsError, match=r"5\.5s old") as info:
        x.verify_der(leaf)  # the cached answer too
    assert isinstance(info.value, VerificationError)
    with pytest.raises(StaleRevocationsError):
        j.verify(token, "svc")
    with pytest.raises(StaleRevocationsError):
        x.verify([make_leaf(ca).cert])
    rs.feed_delivered(clock.now())
    x.verify_der(leaf)
    j.verify(token, "svc")


# --- the source state, driven by hand -------------------------------------------------------


def _state(*streams: str, clock: FakeClock | None = None, **kwargs: Any) -> SourceState:
    return SourceState(streams, RevocationSet(), clock or FakeClock(T0), **kwargs)


def _x509(ca: Any, crls: tuple[bytes, ...] = ()) -> X509BundlesUpdate:
    return X509BundlesUpdate(BundleSet.of(X509Bundle(TD, (ca.cert,))), crls)


def _revoked(*items: Revoked, crls: tuple[bytes, ...] = ()) -> RevocationsUpdate:
    return RevocationsUpdate(items, crls, 1)


def _verifiers_whose_agent_went_away(
    clock: SteppedClock | SleptClock,
) -> tuple[X509Verifier, JwtVerifier, bytes, str]:
    """An X.509 and a JWT verifier on `clock` (max_revocation_staleness 5 s) that each accepted
    an SVID, then lost their revocation feed: the SVIDs, to try again later."""
    ca = make_ca()
    leaf = der_concat([make_leaf(ca).cert])
    key = ec_key()
    source = MemoryBundleSource.of(SpiffeBundle(TD, (ca.cert,), {"k1": key.public_key()}))
    token = sign_jws(
        {"kid": "k1"}, {"sub": "spiffe://example.org/w", "aud": "svc", "exp": T0 + 7200}, key
    )
    state = SourceState((X509_BUNDLES.name, REVOCATIONS.name), RevocationSet(), clock)
    state.delivered(X509_BUNDLES.name, _x509(ca))
    state.delivered(REVOCATIONS.name, _revoked())
    x = X509Verifier(
        source.x509_bundle_for, clock=clock, revocations=state.revocations,
        max_revocation_staleness=5,
    )  # fmt: skip
    j = JwtVerifier(
        source.jwt_bundle_for, clock=clock, revocations=state.revocations,
        max_revocation_staleness=5,
    )  # fmt: skip
    x.verify_der(leaf)
    j.verify(token, "svc")
    state.failed(REVOCATIONS.name, WorkloadApiError("agent gone", "UNAVAILABLE"))
    return x, j, leaf, token


def _refused_as_stale(x: X509Verifier, j: JwtVerifier, leaf: bytes, token: str, age: str) -> None:
    assert x.revocations_fresh_for() == 0.0
    assert j.revocations_fresh_for() == 0.0
    with pytest.raises(StaleRevocationsError, match=age):
        x.verify_der(leaf)
    with pytest.raises(StaleRevocationsError):
        j.verify(token, "svc")


def test_a_step_back_of_the_clock_does_not_keep_stale_revocations_acceptable() -> None:
    # The agent went away, then NTP stepped the service's clock back half an hour. Staleness is
    # an interval: counted on the wall clock, the verifiers accepted for that half hour what the
    # revocations they no longer receive may have revoked since.
    clock = SteppedClock(FakeClock(T0), 1800.0)
    x, j, leaf, token = _verifiers_whose_agent_went_away(clock)
    clock.offset = 0.0  # the step back
    clock.base.advance(5.5)
    _refused_as_stale(x, j, leaf, token, r"5\.5s old")


def test_revocation_feed_freshness_through_the_state() -> None:
    clock = FakeClock(T0)
    state = _state(X509_BUNDLES.name, REVOCATIONS.name, clock=clock)
    ca = make_ca()
    assert state.revocations.staleness(clock.monotonic()) == math.inf
    state.delivered(X509_BUNDLES.name, _x509(ca))
    assert state.revocations.staleness(clock.monotonic()) == math.inf  # the revocation stream says
    state.delivered(REVOCATIONS.name, _revoked())
    assert state.revocations.updated_at == T0
    clock.advance(60)
    assert state.revocations.staleness(clock.monotonic()) == 0.0
    state.failed(REVOCATIONS.name, WorkloadApiError("agent gone", "UNAVAILABLE"))
    clock.advance(3)
    assert state.revocations.staleness(clock.monotonic()) == 3.0
    # An agent without the revocation stream: the bundles stream (CRLs) is the feed.
    state.failed(REVOCATIONS.name, WorkloadApiError("no such service", "UNIMPLEMENTED"))
    assert state.revocation_stream_supported is False
    assert state.revocations.staleness(clock.monotonic()) == 0.0
    state.failed(X509_BUNDLES.name, None)
    clock.advance(2)
    assert state.revocations.staleness(clock.monotonic()) == 2.0


def test_crls_before_the_bundles_are_kept_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The revocation stream often delivers before the bundles stream at start-up; its CRLs were
    # judged against no bundles and logged as "not signed by any authority".
    ca = make_ca()
    state = _state(X509_BUNDLES.name, REVOCATIONS.name)
    with caplog.at_level(logging.WARNING, logger="svid.workloadapi"):
        state.delivered(REVOCATIONS.name, _revoked(crls=(signed_crl(ca, [0xBEEF]),)))
        assert state.rejected_crls == ()
        state.delivered(X509_BUNDLES.name, _x509(ca))
    assert state.revocations.is_revoked(cert_key(TD.name, make_leaf(ca, serial=0xBEEF).cert))
    assert state.rejected_crls == ()
    assert "ignoring CRL" not in caplog.text


def test_on_revoked_announces_each_revocation_once_with_what_is_known() -> None:
    ca = make_ca()
    now = T0
    task_leaf = make_leaf(
        ca, uris=["spiffe://example.org/agents/bot/task/t-42"], not_before=now - 10, serial=0xAB
    )
    own = X509Svid.load_pem(certs_to_pem([task_leaf.cert]), key_pem(task_leaf))
    state = _state(X509_SVIDS.name, X509_BUNDLES.name, REVOCATIONS.name)
    events: list[RevocationEvent] = []
    state.subscribe(events.append)
    state.delivered(X509_SVIDS.name, [own])
    state.delivered(X509_BUNDLES.name, _x509(ca))

    def broken(event: RevocationEvent) -> None:
        raise RuntimeError("subscriber bug")

    state.subscribe(broken)  # must not stop the others, nor the stream
    state.delivered(REVOCATIONS.name, _revoked(Revoked("jwt_id", "j-1", now + 60)))
    assert [(e.kind, e.value, e.spiffe_id, e.task_id) for e in events] == [
        ("jwt_id", "j-1", None, None)
    ]
    # Full state again, plus the task's own SVID (by CRL): only the newcomer is announced.
    state.delivered(X509_BUNDLES.name, _x509(ca, crls=(signed_crl(ca, [0xAB]),)))
    assert [e.value for e in events] == ["j-1", "ab"]
    assert str(events[1].spiffe_id) == "spiffe://example.org/agents/bot/task/t-42"
    assert events[1].task_id == events[1].txn == "t-42"
    # Refused before it is announced (a CRL's entry: by its issuer and serial).
    assert state.revocations.is_revoked(cert_key(TD.name, task_leaf.cert))
    state.delivered(REVOCATIONS.name, _revoked(Revoked("jwt_id", "j-1", now + 60)))
    assert len(events) == 2


def test_coroutine_callbacks_need_an_asyncio_source(caplog: pytest.LogCaptureFixture) -> None:
    state = _state(X509_BUNDLES.name, REVOCATIONS.name)
    ran: list[str] = []

    async def callback(event: RevocationEvent) -> None:
        ran.append(event.value)  # never reached: there is no loop to run it

    state.subscribe(callback)
    with caplog.at_level(logging.ERROR, logger="svid.workloadapi"):
        state.delivered(REVOCATIONS.name, _revoked(Revoked("jwt_id", "j-1", T0)))
    assert ran == []
    assert "only asyncio sources" in caplog.text
    scheduled: list[Any] = []
    state = _state(X509_BUNDLES.name, REVOCATIONS.name, schedule=scheduled.append)
    state.subscribe(callback)
    state.delivered(REVOCATIONS.name, _revoked(Revoked("jwt_id", "j-2", T0)))
    assert len(scheduled) == 1
    scheduled[0].close()


def test_a_broken_stream_is_logged_naming_the_call_once(caplog: pytest.LogCaptureFixture) -> None:
    # The error already says "Workload API <call>: ...": the log line said it twice.
    state = _state("FetchX509Bundles")
    error = WorkloadApiError(
        "Workload API FetchX509Bundles: cannot connect to the agent (refused): is it running?",
        "UNAVAILABLE",
    )
    with caplog.at_level(logging.WARNING, logger="svid"):
        state.failed("FetchX509Bundles", error)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == str(error)
    assert line.count("FetchX509Bundles") == 1


def test_a_sleep_of_the_host_does_not_keep_stale_revocations_acceptable() -> None:
    # The agent went away, then the host slept an hour. On the monotonic clock alone (which a
    # suspend does not move) the revocations were still fresh on waking, an hour old: the
    # verifiers accepted for max_revocation_staleness more what may have been revoked since.
    clock = SleptClock(FakeClock(T0))
    x, j, leaf, token = _verifiers_whose_agent_went_away(clock)
    clock.sleep(3600.0)
    _refused_as_stale(x, j, leaf, token, r"3600\.0s old")
