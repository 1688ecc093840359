"""svid: SPIFFE identities for services and AI agents — IDs, SVIDs, bundles, verification."""

from svid._bundle import BundleSet, JwtBundle, SpiffeBundle, X509Bundle
from svid._clock import Clock, FakeClock, SystemClock
from svid._der import certs_to_pem, der_concat, load_pem_certs, parse_der_certs
from svid._errors import (
    BundleError,
    ExpiredError,
    JwtSvidError,
    RevokedError,
    SpiffeIdError,
    SvidError,
    SvidParseError,
    VerificationError,
    X509SvidError,
)
from svid._jose import (
    ALLOWED_ALGS,
    alg_for_key,
    b64url_decode,
    b64url_encode,
    public_key_thumbprint_kid,
    sign_jws,
    verify_jws_signature,
)
from svid._jwt import JwtSvid
from svid._revocation import RevocationSet, Revoked, normalize_serial
from svid._source import BundleSource, MemoryBundleSource, load_bundle_file
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._verify_jwt import JwtVerifier, VerifiedJwt
from svid._verify_x509 import VerifiedX509, X509Verifier
from svid._x509 import X509Svid, check_leaf_profile, check_signing_profile, spiffe_id_from_cert

__all__ = [
    "ALLOWED_ALGS",
    "BundleError",
    "BundleSet",
    "BundleSource",
    "Clock",
    "ExpiredError",
    "FakeClock",
    "JwtBundle",
    "JwtSvid",
    "JwtSvidError",
    "JwtVerifier",
    "MemoryBundleSource",
    "RevocationSet",
    "Revoked",
    "RevokedError",
    "SpiffeBundle",
    "SpiffeId",
    "SpiffeIdError",
    "SvidError",
    "SvidParseError",
    "SystemClock",
    "TrustDomain",
    "VerificationError",
    "VerifiedJwt",
    "VerifiedX509",
    "X509Bundle",
    "X509Svid",
    "X509SvidError",
    "X509Verifier",
    "alg_for_key",
    "b64url_decode",
    "b64url_encode",
    "certs_to_pem",
    "check_leaf_profile",
    "check_signing_profile",
    "der_concat",
    "load_bundle_file",
    "load_pem_certs",
    "normalize_serial",
    "parse_der_certs",
    "public_key_thumbprint_kid",
    "sign_jws",
    "spiffe_id_from_cert",
    "verify_jws_signature",
]
