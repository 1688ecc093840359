"""The server's CA replaced outright while the agent was away (README: a new root; an x509pop
agent re-attests under the same agent ID and resumes from its saved revision): the SVIDs it saved
were signed by a CA the bundle no longer holds. Served beside that bundle they verify nowhere:
they must be minted again, not handed out until their renewal point."""

from __future__ import annotations

import time

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from agent_attestor.cache import Cache, SyncDelta, SyncState
from agent_attestor.model import Entry, Selector
from svid._clock import FakeClock
from tests.agent_attestor.pki import LocalCa
from tests.agent_attestor.test_state_store import svid_for

ME = frozenset({Selector("unix", "uid:1")})


def _issued_by_bundle(chain_der: bytes, authorities: tuple[bytes, ...]) -> bool:
    leaf = x509.load_der_x509_certificate(chain_der)
    for der in authorities:
        try:
            leaf.verify_directly_issued_by(x509.load_der_x509_certificate(der))
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def test_no_svid_of_a_ca_gone_from_the_bundle_is_served_after_the_catch_up() -> None:
    clock = FakeClock(start=time.time())
    old_ca, new_ca = LocalCa(clock), LocalCa(clock)
    entry = Entry("e1", "spiffe://example.org/w/1", ME)
    cache = Cache()
    cache.restore(
        SyncState((entry,), old_ca.bundle(), revision=9, epoch="ep"), [svid_for(old_ca, entry)]
    )
    # The catch-up delta: only the bundle changed (the new root alone).
    cache.apply_delta(SyncDelta(bundle=new_ca.bundle(), revision=10, epoch="ep"))

    snap = cache.snapshot()
    assert snap.synced
    assert snap.bundle == new_ca.bundle()
    unverifiable = [
        i.entry.id
        for i in snap.identities_for(ME, clock.now())
        if not _issued_by_bundle(i.svid.chain_der, snap.bundle.x509_authorities)
    ]
    assert unverifiable == [], "an SVID no CA in the served bundle signed is served"
