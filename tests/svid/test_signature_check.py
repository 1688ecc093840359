"""The precomputed per-(kid, alg) signature checks agree with verify_jws_signature everywhere."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from svid import (
    ALLOWED_ALGS,
    FakeClock,
    JwtBundle,
    JwtVerifier,
    MemoryBundleSource,
    SpiffeBundle,
    TrustDomain,
    VerificationError,
    sign_jws,
    verify_jws_signature,
)
from svid._jose import sign_raw, signature_check
from tests.svid.certs import T0, Key, ec_key, rsa_key

TD = TrustDomain("example.org")
KEYS: dict[str, Key] = {
    "p256": ec_key(),
    "p384": ec_key(ec.SECP384R1()),
    "p521": ec_key(ec.SECP521R1()),
    "rsa": rsa_key(),
}
SIGNERS = {"p256": "ES256", "p384": "ES384", "p521": "ES512", "rsa": None}


@pytest.mark.parametrize("signer", sorted(KEYS))
@pytest.mark.parametrize("verifier_key", sorted(KEYS))
def test_agrees_with_verify_jws_signature(signer: str, verifier_key: str) -> None:
    data = b"header.claims"
    algs = [SIGNERS[signer]] if SIGNERS[signer] else ["RS256", "PS384", "RS512"]
    public = KEYS[verifier_key].public_key()
    for alg in algs:
        assert alg is not None
        good = sign_raw(alg, data, KEYS[signer])
        for sig, signed in ((good, data), (good, data + b"x"), (good[:-1], data), (b"", data)):
            for check_alg in sorted(ALLOWED_ALGS):
                check = signature_check(check_alg, public)
                expected = verify_jws_signature(check_alg, signed, sig, public)
                assert (check is not None and check(signed, sig)) == expected


def test_unfit_algs_have_no_check() -> None:
    assert signature_check("ES384", KEYS["p256"].public_key()) is None
    assert signature_check("RS256", KEYS["p256"].public_key()) is None
    assert signature_check("ES256", KEYS["rsa"].public_key()) is None
    assert signature_check("HS256", KEYS["p256"].public_key()) is None
    assert signature_check("none", KEYS["rsa"].public_key()) is None


def test_same_kid_new_key_is_not_served_from_a_stale_check() -> None:
    old, new = ec_key(), ec_key()
    source = MemoryBundleSource.of(SpiffeBundle(TD, (), {"k1": old.public_key()}))
    verifier = JwtVerifier(source.jwt_bundle_for, clock=FakeClock(T0), cache_size=0)
    claims = {"sub": "spiffe://example.org/w", "aud": "svc", "exp": int(T0) + 60}
    old_token = sign_jws({"kid": "k1"}, claims, old)
    verifier.verify(old_token, "svc")
    source.set_jwt_bundles(source.jwt_bundles.with_bundle(JwtBundle(TD, {"k1": new.public_key()})))
    with pytest.raises(VerificationError, match="signature is invalid"):
        verifier.verify(old_token, "svc")
    verifier.verify(sign_jws({"kid": "k1"}, claims, new), "svc")
