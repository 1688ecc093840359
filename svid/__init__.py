"""svid: SPIFFE identities for services and AI agents — IDs, SVIDs, bundles, verification."""

from svid._clock import Clock, FakeClock, SystemClock
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
from svid._spiffe_id import SpiffeId, TrustDomain

__all__ = [
    "BundleError",
    "Clock",
    "ExpiredError",
    "FakeClock",
    "JwtSvidError",
    "RevokedError",
    "SpiffeId",
    "SpiffeIdError",
    "SvidError",
    "SvidParseError",
    "SystemClock",
    "TrustDomain",
    "VerificationError",
    "X509SvidError",
]
