"""The CRLs agents hand to workloads: only still-valid revoked certificates, split under a size
budget into CRLs that each verify against the CA and together list every serial once. Real CA
certificates and keys (EC and RSA-4096), real DER."""

from __future__ import annotations

import dataclasses

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from server.ca.signer import BACKDATE_SECONDS
from server.datastore.records import Revocation
from server.sync_messages import MAX_BYTES
from server.tasks.crl import (
    CRL_MAX_BYTES,
    CRL_VALIDITY,
    REFRESH_AFTER,
    CrlCache,
    SignCrl,
    build_crls,
    key_id,
)
from tests.svid.certs import T0, Issued, make_ca

NOW = int(T0)


def _signer(ca: Issued) -> SignCrl:
    def sign(builder: x509.CertificateRevocationListBuilder) -> x509.CertificateRevocationList:
        return builder.sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]

    return sign


def _serial(n: int, expires_at: int = NOW + 3600) -> Revocation:
    # 128-bit serials with the top bit set, as random serials mostly are: the longest DER.
    value = format((1 << 127) | (n * 0x9E3779B97F4A7C15), "x")
    return Revocation("x509_serial", value, "spiffe://example.org/w", expires_at, "r", NOW - 5)


def _listed(ders: tuple[bytes, ...]) -> list[int]:
    return [e.serial_number for der in ders for e in x509.load_der_x509_crl(der)]


def _number(der: bytes) -> int:
    crl = x509.load_der_x509_crl(der)
    return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_a_serial_is_listed_through_its_certificates_last_second_and_not_after() -> None:
    """The CRL's thisUpdate is backdated BACKDATE_SECONDS: a relying party that far behind takes
    it, and takes a certificate that expired up to that long ago by the server's clock, so the
    CRL lists that certificate's serial too."""
    ca = make_ca()
    edge = NOW - BACKDATE_SECONDS
    expired, last_second, valid = _serial(1, edge - 1), _serial(2, edge), _serial(3, NOW + 1)
    jti = Revocation("jwt_id", "jti-1", "spiffe://example.org/w", NOW + 600, "r", NOW)
    (der,) = build_crls(ca.cert, _signer(ca), [expired, last_second, valid, jti], NOW, 1)
    assert sorted(_listed((der,))) == sorted(int(r.value, 16) for r in (last_second, valid))
    crl = x509.load_der_x509_crl(der)
    assert crl.last_update_utc.timestamp() == edge
    assert crl.next_update_utc is not None
    assert crl.next_update_utc.timestamp() == NOW + CRL_VALIDITY


def test_nothing_listed_is_no_crl_at_all() -> None:
    ca = make_ca()
    assert build_crls(ca.cert, _signer(ca), [_serial(1, NOW - BACKDATE_SECONDS - 1)], NOW, 1) == ()


def test_a_big_list_is_split_into_crls_under_the_budget_that_each_verify() -> None:
    ca = make_ca()
    revocations = [_serial(n) for n in range(3000)]
    ders = build_crls(ca.cert, _signer(ca), revocations, NOW, 42, max_bytes=16 * 1024)
    assert len(ders) > 5
    assert max(len(d) for d in ders) <= 16 * 1024
    # Not wastefully small either: all but the last are filled to most of the budget.
    assert min(len(d) for d in ders[:-1]) > 14 * 1024
    for der in ders:
        crl = x509.load_der_x509_crl(der)
        assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
        assert crl.issuer == ca.cert.subject
    # One build, one number: a relying party keeping the highest number it saw keeps them all.
    assert {_number(d) for d in ders} == {42}
    listed = _listed(ders)
    assert len(listed) == len(set(listed)) == 3000
    assert set(listed) == {int(r.value, 16) for r in revocations}


def test_the_budget_holds_for_an_rsa_4096_ca_with_a_long_name() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    ca = make_ca("a-rather-long-trust-domain-name.for-the-issuer.example.org", key=key)
    revocations = [_serial(n) for n in range(2000)]
    ders = build_crls(ca.cert, _signer(ca), revocations, NOW, 1, max_bytes=8 * 1024)
    assert len(ders) > 5
    assert max(len(d) for d in ders) <= 8 * 1024
    assert len(_listed(ders)) == 2000


def test_a_crl_leaves_room_in_a_sync_message() -> None:
    assert CRL_MAX_BYTES <= MAX_BYTES // 2


def test_the_cache_rebuilds_only_when_the_list_changes_and_numbers_grow() -> None:
    ca = make_ca()
    cache = CrlCache(max_bytes=8 * 1024)
    first_list = tuple(_serial(n) for n in range(500))
    first = cache.get([(ca.cert, _signer(ca))], first_list, NOW)
    assert len(first) > 1
    # Same list: the same DER (no re-signing: ECDSA signatures differ every time).
    assert cache.get([(ca.cert, _signer(ca))], first_list, NOW + 10) is first
    second = cache.get([(ca.cert, _signer(ca))], (*first_list, _serial(500)), NOW + 20)
    (number,) = {_number(d) for d in second}
    assert number > _number(first[0])
    assert len(_listed(second)) == 501
    # A restart starts from the clock (in microseconds), not from 1: numbers never go back.
    assert _number(first[0]) >= NOW * 1_000_000
    assert (
        CrlCache().get([(ca.cert, _signer(ca))], (_serial(1, NOW - BACKDATE_SECONDS - 1),), NOW)
        == ()
    )


def test_a_change_that_revokes_no_serial_signs_no_new_crl() -> None:
    # A JWT-SVID revoked or a task's end changes the list, not what a CRL lists: signing
    # again would send every agent a new CRL for nothing.
    ca = make_ca()
    cache = CrlCache()
    serials = (_serial(1), _serial(2))
    first = cache.get([(ca.cert, _signer(ca))], serials, NOW)
    jti = Revocation("jwt_id", "jti-1", "spiffe://example.org/w", NOW + 600, "r", NOW)
    task = Revocation("task", "t1", "spiffe://example.org/w/task/t1", NOW + 600, "r", NOW)
    assert cache.get([(ca.cert, _signer(ca))], (*serials, jti), NOW + 10) is first
    assert cache.get([(ca.cert, _signer(ca))], (jti, *serials, task), NOW + 20) is first
    # A serial revoked meanwhile is listed at once.
    third = cache.get([(ca.cert, _signer(ca))], (jti, *serials, _serial(3), task), NOW + 30)
    assert third is not first
    assert len(_listed(third)) == 3


def test_the_cache_signs_again_once_half_the_validity_has_passed() -> None:
    # A quiet revocation list must not leave relying parties a CRL past its nextUpdate.
    ca = make_ca()
    cache = CrlCache()
    listed = (_serial(1, NOW + 10 * CRL_VALIDITY),)
    first = cache.get([(ca.cert, _signer(ca))], listed, NOW)
    assert not cache.due(NOW + REFRESH_AFTER - 1)
    assert cache.get([(ca.cert, _signer(ca))], listed, NOW + REFRESH_AFTER - 1) is first
    assert cache.due(NOW + REFRESH_AFTER)
    second = cache.get([(ca.cert, _signer(ca))], listed, NOW + REFRESH_AFTER)
    cache.given()  # TaskService.refresh_crl: every agent is sent them
    assert not cache.due(NOW + REFRESH_AFTER)
    old, new = (x509.load_der_x509_crl(d[0]) for d in (first, second))
    assert new.next_update_utc > old.next_update_utc
    assert new.next_update_utc.timestamp() == NOW + REFRESH_AFTER + CRL_VALIDITY
    assert _number(second[0]) > _number(first[0])
    assert _listed(second) == _listed(first)
    # Nothing listed, nothing to keep current.
    empty = CrlCache()
    assert empty.get([(ca.cert, _signer(ca))], (), NOW) == ()
    assert not empty.due(NOW + 10 * CRL_VALIDITY)


def test_a_crl_signed_again_for_a_snapshot_leaves_the_other_agents_refresh_due() -> None:
    # A reconnecting agent's snapshot past half the validity signs the CRLs again, for that
    # agent alone: the others hold the first ones, whose nextUpdate is NOW + CRL_VALIDITY.
    # Were the refresh to count from the snapshot's build, it would send theirs only half a
    # validity after it, past that nextUpdate (relying parties then refuse every certificate).
    ca = make_ca()
    cache = CrlCache()
    listed = (_serial(1, NOW + 10 * CRL_VALIDITY),)
    cache.get([(ca.cert, _signer(ca))], listed, NOW)
    snapshot = cache.get([(ca.cert, _signer(ca))], listed, NOW + REFRESH_AFTER)
    assert cache.due(NOW + REFRESH_AFTER)
    # The refresh sends every agent the snapshot's CRLs (still fresh: not signed again).
    assert cache.get([(ca.cert, _signer(ca))], listed, NOW + REFRESH_AFTER + 1) is snapshot
    cache.given()
    assert not cache.due(NOW + 2 * REFRESH_AFTER - 1)
    assert cache.due(NOW + 2 * REFRESH_AFTER)
    # New serials are sent to every agent with their revocation (server.node_api): those CRLs
    # are every agent's, and the refresh counts from them.
    cache.get([(ca.cert, _signer(ca))], (*listed, _serial(2)), NOW + 2 * REFRESH_AFTER + 5)
    assert not cache.due(NOW + 3 * REFRESH_AFTER + 4)
    assert cache.due(NOW + 3 * REFRESH_AFTER + 5)


def _issued(n: int, ca: Issued) -> Revocation:
    return dataclasses.replace(_serial(n), issuer=key_id(ca.cert))


def _by_issuer(ders: tuple[bytes, ...], *cas: Issued) -> dict[str, list[int]]:
    """What each CRL lists, by the key id of the CA among `cas` whose key signed it."""
    listed: dict[str, list[int]] = {}
    for der in ders:
        crl = x509.load_der_x509_crl(der)
        (ca,) = [c for c in cas if crl.is_signature_valid(c.cert.public_key())]  # type: ignore[arg-type]
        assert crl.issuer == ca.cert.subject
        listed.setdefault(key_id(ca.cert), []).extend(e.serial_number for e in crl)
    return listed


def test_each_ca_lists_only_what_it_issued_and_every_ca_what_has_no_issuer() -> None:
    # Two CAs of one trust domain (a rotation): a CRL revokes only its issuer's certificates.
    old, new = make_ca(), make_ca()
    assert "" != key_id(old.cert) != key_id(new.cert) != ""
    mine, theirs = _issued(1, old), _issued(2, new)
    legacy = _serial(3)  # recorded before issuers were: which CA issued it is not known
    both = [(old.cert, _signer(old)), (new.cert, _signer(new))]
    ders = CrlCache().get(both, (mine, theirs, legacy), NOW)
    assert _by_issuer(ders, old, new) == {
        key_id(old.cert): sorted(int(r.value, 16) for r in (mine, legacy)),
        key_id(new.cert): sorted(int(r.value, 16) for r in (theirs, legacy)),
    }
    # A CA with nothing of its own to list, and no issuer-less serial, signs no CRL.
    ders = CrlCache().get(both, (theirs,), NOW)
    assert _by_issuer(ders, old, new) == {key_id(new.cert): [int(theirs.value, 16)]}


def test_a_crl_signed_after_a_restart_or_failover_numbers_higher_than_every_crl_before_it() -> None:
    """Each rebuild takes max(number + 1, now): a burst of revocations (a ban's, one rebuild per
    Sync message that carries them) runs the number ahead of the clock. Another server sharing
    the CA, or this one restarted, starts again from its clock: its CRL, listing one revocation
    more, carries a lower number than the one relying parties already hold, and one keeping the
    highest number it saw (what the number is for, RFC 5280 5.2.3) keeps the older CRL."""
    ca = make_ca()
    issuers = [(ca.cert, _signer(ca))]
    before = CrlCache()
    listed: tuple[Revocation, ...] = ()
    for n in range(5):  # five revocations in one second, each pushed to agents at once
        listed = (*listed, _serial(n))
        held = before.get(issuers, listed, NOW)
    after = CrlCache()  # restarted, or the server agents fail over to
    newer = after.get(issuers, (*listed, _serial(5)), NOW + 1)
    assert len(_listed(newer)) == len(_listed(held)) + 1
    assert _number(newer[0]) > _number(held[0])
