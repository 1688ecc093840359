"""The server's own TLS identity: renewed at half life, and a failed renewal retried calmly."""

from __future__ import annotations

import pytest

from server.ca.errors import CaUnavailableError
from server.ca.manager import CaManager
from server.tls import ServerTls
from svid._clock import FakeClock


def test_renewal_is_due_at_half_life(ca_manager: CaManager, clock: FakeClock) -> None:
    tls = ServerTls(ca_manager, clock, ttl=600)
    tls.renew()
    assert tls.renew_at == pytest.approx(clock.now() + 300 - 5)  # NotBefore is backdated 10 s
    assert not tls.maybe_renew()
    clock.set(tls.renew_at)
    assert tls.maybe_renew()


def test_failed_renewal_is_retried_after_a_back_off(
    ca_manager: CaManager, clock: FakeClock
) -> None:
    # The server's loop sleeps until renew_at: left in the past after a failure (here the CA
    # expired while rotation could not run), it retried every 0.05 s, a traceback each time.
    tls = ServerTls(ca_manager, clock, ttl=600)
    tls.renew()
    chain = tls.chain
    clock.set(ca_manager.x509_signer().not_after)
    delays = []
    for _ in range(6):
        with pytest.raises(CaUnavailableError):
            tls.maybe_renew()
        delays.append(tls.renew_at - clock.now())
        clock.set(max(clock.now(), tls.renew_at))
    assert delays == [1, 2, 4, 8, 10, 10]
    assert tls.chain == chain  # the last good identity is kept meanwhile
