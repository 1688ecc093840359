"""The server's own TLS identities (the node API's, the bundle endpoint's): renewed at half
life, and a failed renewal retried calmly."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.ca.errors import CaUnavailableError
from server.ca.keys import KeyStore
from server.ca.manager import CaConfig, CaManager
from server.datastore.sqlite import SqliteDataStore
from server.federation import endpoint
from server.federation.endpoint import SvidContext, keep_renewed
from server.tls import ServerTls
from svid._clock import FakeClock
from tests.clocks import SteppedClock
from tests.server.conftest import TRUST_DOMAIN


def test_renewal_is_due_at_half_life(ca_manager: CaManager, clock: FakeClock) -> None:
    tls = ServerTls(ca_manager, clock, ttl=600)
    tls.renew()
    assert tls.renew_at == pytest.approx(clock.now() + 300 - 5)  # NotBefore is backdated 10 s
    assert not tls.maybe_renew()
    clock.set(tls.renew_at)
    assert tls.maybe_renew()


def _back_offs_of_failed_renewals(
    renewer: ServerTls | SvidContext, clock: FakeClock
) -> list[float]:
    """The back-offs of six renewals on an expired CA, each looked at again before its
    back-off is over (not tried) and then as it ends."""
    delays = []
    for _ in range(6):
        with pytest.raises(CaUnavailableError):
            renewer.maybe_renew()
        delays.append(renewer.due_in())
        assert not renewer.maybe_renew()  # not tried again before the back-off
        clock.advance(delays[-1])
    return delays


def test_failed_renewal_is_retried_after_a_back_off(
    ca_manager: CaManager, clock: FakeClock
) -> None:
    # The server's loop sleeps until the renewal is due: left in the past after a failure (here
    # the CA expired while rotation could not run), it retried every 0.05 s, a traceback each.
    tls = ServerTls(ca_manager, clock, ttl=600)
    tls.renew()
    chain = tls.chain
    clock.set(ca_manager.x509_signer().not_after)
    assert _back_offs_of_failed_renewals(tls, clock) == [1, 2, 4, 8, 10, 10]
    assert tls.chain == chain  # the last good identity is kept meanwhile


def test_a_server_svid_whose_ca_was_dropped_is_renewed_at_the_next_look(
    datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> None:
    # Started with its clock days ahead, the server made its CA and SVID then; put right, its
    # next rotation retires that CA (not valid yet) for a new one. The SVID it signed was kept
    # until its renew_at, days on: no agent could verify the server meanwhile.
    stepped = SteppedClock(clock, 3 * 86400.0)
    manager = CaManager(CaConfig(TRUST_DOMAIN), datastore, keystore, stepped)
    manager.initialize()
    tls = ServerTls(manager, stepped, ttl=600)
    tls.renew()
    stepped.offset = 0.0  # the clock put right
    assert manager.next_rotation_check() <= clock.now()
    manager.rotate()
    assert tls.maybe_renew()
    leaf = tls.chain[0]
    assert leaf.not_valid_before_utc.timestamp() <= clock.now()
    issuers = [c for c in manager.bundle().x509_authorities if c.subject == leaf.issuer]
    assert len(issuers) == 1
    leaf.verify_directly_issued_by(issuers[0])
    assert not tls.maybe_renew()  # and then renewed at half life again, not at every look


def test_a_failed_renewal_is_retried_after_its_back_off_whatever_the_wall_clock_does(
    datastore: SqliteDataStore, keystore: KeyStore, clock: FakeClock
) -> None:
    # The retry was due at a wall-clock time: NTP stepping the clock back an hour after a
    # failure put the retry an hour off, the server meanwhile on the SVID that failed to renew.
    stepped = SteppedClock(clock)
    manager = CaManager(CaConfig(TRUST_DOMAIN), datastore, keystore, stepped)
    manager.initialize()
    tls = ServerTls(manager, stepped, ttl=600)
    tls.renew()
    chain = tls.chain
    clock.set(manager.x509_signer().not_after)  # the CA expired: renewals fail
    with pytest.raises(CaUnavailableError):
        tls.maybe_renew()
    assert tls.due_in() == 1
    stepped.offset = -3600.0  # the clock stepped back, where the CA is valid again
    assert tls.due_in() == 1
    assert not tls.maybe_renew()  # the back-off still holds
    clock.advance(1)
    assert tls.maybe_renew()
    assert tls.chain != chain


def test_the_bundle_endpoints_failed_renewal_is_retried_after_the_same_back_off(
    ca_manager: CaManager, clock: FakeClock
) -> None:
    # Its renew_at stayed in the past after a failure: it was tried again at every look.
    svid = SvidContext(ca_manager, clock, ttl=600)
    assert svid.maybe_renew()
    assert not svid.maybe_renew()
    clock.set(ca_manager.x509_signer().not_after)
    assert _back_offs_of_failed_renewals(svid, clock) == [1, 2, 4, 8, 10, 10]


def test_the_bundle_endpoints_renewal_loop_waits_out_the_back_off_between_failures(
    ca_manager: CaManager,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The loop's waits, each passed at once on the fake clock: it waited 0.05 s between
    # tries, a traceback each, for as long as the CA could not sign.
    svid = SvidContext(ca_manager, clock, ttl=600)
    svid.maybe_renew()
    clock.set(ca_manager.x509_signer().not_after)
    waits: list[float] = []

    async def waited(stop: asyncio.Event, seconds: float) -> bool:
        waits.append(seconds)
        clock.advance(seconds)
        return len(waits) > 5

    monkeypatch.setattr(endpoint, "set_within", waited)
    with caplog.at_level(logging.ERROR, logger="svid.server.federation"):
        asyncio.run(keep_renewed(svid, asyncio.Event()))
    assert waits == [0.05, 1, 2, 4, 8, 10]
    failures = [r for r in caplog.records if "not renewed" in r.getMessage()]
    assert len(failures) == 5  # one per try
