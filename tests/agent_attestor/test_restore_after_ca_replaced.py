"""The server's CA replaced outright while the agent was away (README: a new root; an x509pop
agent re-attests under the same agent ID and resumes from its saved revision): the SVIDs it saved
were signed by a CA the bundle no longer holds. Served beside that bundle they verify nowhere:
they must be minted again, not handed out until their renewal point."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from agent_attestor import _crypto
from agent_attestor.cache import Cache, SyncDelta, SyncState
from agent_attestor.model import Entry, IssuedSvid, Selector, TrustBundle
from agent_attestor.rotation import Rotator
from svid._clock import FakeClock, to_datetime
from tests.agent_attestor.pki import FakeSigner, LocalCa
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


def _both(old: LocalCa, new: LocalCa) -> TrustBundle:
    """The bundle of a rotation under way: the next CA's root published beside the old one."""
    authorities = (*old.bundle().x509_authorities, *new.bundle().x509_authorities)
    return replace(old.bundle(), x509_authorities=authorities)


def test_svids_of_the_old_ca_stay_served_through_a_rotation() -> None:
    # A rotation publishes the new root beside the old one, and drops the old one only once
    # its SVIDs are gone: none of them may be dropped and minted again on the way.
    clock = FakeClock(start=time.time())
    old_ca, new_ca = LocalCa(clock), LocalCa(clock)
    entry = Entry("e1", "spiffe://example.org/w/1", ME)
    held = svid_for(old_ca, entry)
    cache = Cache(clock)
    cache.apply_sync(SyncState((entry,), old_ca.bundle(), revision=9, epoch="ep"))
    cache.put_svids([held])
    cache.apply_delta(SyncDelta(bundle=_both(old_ca, new_ca), revision=10, epoch="ep"))
    cache.apply_sync(SyncState((entry,), _both(old_ca, new_ca), revision=11, epoch="ep"))
    assert cache.svid("e1") is held


@pytest.mark.parametrize("how", ["delta", "snapshot", "attestation"])
def test_the_rotator_mints_at_once_what_a_ca_gone_from_the_bundle_signed(how: str) -> None:
    clock = FakeClock(start=time.time())
    old_ca, new_ca = LocalCa(clock), LocalCa(clock)
    entry = Entry("e1", "spiffe://example.org/w/1", ME)
    cache = Cache(clock)
    cache.restore(
        SyncState((entry,), old_ca.bundle(), revision=9, epoch="ep"), [svid_for(old_ca, entry)]
    )
    signer = FakeSigner(new_ca, {"e1": entry.spiffe_id})
    rotator = Rotator(cache, signer, clock)
    asyncio.run(rotator.tick())
    assert signer.batches == []  # held, and not yet due for renewal

    if how == "delta":
        cache.apply_delta(SyncDelta(bundle=new_ca.bundle(), revision=10, epoch="ep"))
    elif how == "snapshot":
        cache.apply_sync(SyncState((entry,), new_ca.bundle(), revision=10, epoch="ep"))
    else:  # re-attested under the new CA: its bundle comes with the agent's new SVID
        cache.set_bundle(new_ca.bundle())
    assert cache.svid("e1") is None, "an SVID the new bundle cannot verify is still held"

    asyncio.run(rotator.tick())  # now, not at the old SVID's renewal point
    assert signer.batches == [1]
    svid = cache.svid("e1")
    assert svid is not None
    assert _issued_by_bundle(svid.chain_der, new_ca.bundle().x509_authorities)


def _under_intermediate(root: LocalCa, entry: Entry) -> IssuedSvid:
    """An SVID as an upstream CA's server issues it: signed by the server's intermediate, which
    travels in the chain, under the upstream root the bundle holds."""
    clock = root.clock
    inter = LocalCa(clock)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test intermediate")])
    inter.cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.cert.subject)
        .public_key(inter.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(to_datetime(clock.now() - 3600))
        .not_valid_after(to_datetime(clock.now() + 86400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(root.key, hashes.SHA256())
    )
    key = _crypto.new_key()
    leaf = inter.sign_leaf(key.public_key(), entry.spiffe_id)
    chain = b"".join(c.public_bytes(serialization.Encoding.DER) for c in (leaf, inter.cert))
    return _crypto.issued_svid(entry.id, chain, key, entry.issuance_key)


@pytest.mark.parametrize("replaced", [True, False])
def test_an_svid_under_an_intermediate_goes_with_its_upstream_root_only(replaced: bool) -> None:
    clock = FakeClock(start=time.time())
    root, other = LocalCa(clock), LocalCa(clock)
    entry = Entry("e1", "spiffe://example.org/w/1", ME)
    held = _under_intermediate(root, entry)
    cache = Cache(clock)
    cache.restore(SyncState((entry,), _both(root, other), revision=9, epoch="ep"), [held])
    # The other root leaves the bundle either way; the SVID's own root too, if replaced.
    after = other.bundle() if replaced else root.bundle()
    cache.apply_delta(SyncDelta(bundle=after, revision=10, epoch="ep"))
    assert (cache.svid("e1") is held) is not replaced
