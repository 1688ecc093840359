"""ValidateJWTSVID's checks: the `svid` library's JwtVerifier, fed from the agent's cache.

The cache holds bundles as the server sends them (keys as SPKI DER) and revoked JWT ids as strings.
This module shows them to the verifier as JwtBundles and a RevocationSet. A bundle is converted
once per change and the same JwtBundle object handed out while it stays unchanged, because the
verifier's result cache is keyed on that object's identity.
"""

from __future__ import annotations

from typing import Any

from agent_attestor._crypto import jwt_bundle
from agent_attestor.cache import Cache, Snapshot
from agent_attestor.model import TrustBundle
from svid._bundle import JwtBundle
from svid._clock import Clock
from svid._errors import JwtSvidError
from svid._jwt import split_token
from svid._revocation import KIND_JWT_ID, RevocationSet, Revoked
from svid._spiffe_id import TrustDomain
from svid._verify_jwt import DEFAULT_CACHE_SIZE, DEFAULT_LEEWAY, JwtVerifier, VerifiedJwt

# Trust domains come and go with federation; past this many remembered ones, start afresh.
_MAX_REMEMBERED_DOMAINS = 256


class CacheJwtBundles:
    """Trust domain -> the cache's current JWT bundle for it, as a library JwtBundle."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self._converted: dict[str, tuple[TrustBundle, JwtBundle]] = {}

    def __call__(self, trust_domain: TrustDomain) -> JwtBundle | None:
        snap = self._cache.snapshot()
        own = snap.bundle
        if own is not None and own.trust_domain == trust_domain.name:
            return self.convert(own)
        federated = snap.federated.get(trust_domain.name)
        return self.convert(federated) if federated is not None else None

    def convert(self, bundle: TrustBundle) -> JwtBundle:
        """``bundle`` as a JwtBundle: the same object as last time if its keys did not change."""
        known = self._converted.get(bundle.trust_domain)
        if known is not None and (known[0] is bundle or known[0].jwt_keys == bundle.jwt_keys):
            converted = known[1]
        else:
            converted = jwt_bundle(bundle)
            if len(self._converted) >= _MAX_REMEMBERED_DOMAINS:
                self._converted.clear()
        self._converted[bundle.trust_domain] = (bundle, converted)
        return converted


class CacheJwtValidator:
    """Checks JWT-SVIDs against the cache's bundles and revocation list (SPIFFE.md §3)."""

    def __init__(
        self,
        cache: Cache,
        clock: Clock,
        *,
        leeway: float = DEFAULT_LEEWAY,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self._cache = cache
        self._leeway = leeway
        self.bundles = CacheJwtBundles(cache)
        self._revocations = RevocationSet()
        self._revoked_jtis: frozenset[str] = frozenset()
        self._verifier = JwtVerifier(
            self.bundles,
            clock=clock,
            revocations=self._revocations,
            leeway=leeway,
            cache_size=cache_size,
        )

    def validate(self, token: str, audience: str) -> VerifiedJwt:
        """Raise svid's VerificationError (ExpiredError, RevokedError) naming the failed check."""
        self._follow_revocations(self._cache.snapshot())
        return self._verifier.verify(token, audience)

    def usable_until(self, result: VerifiedJwt) -> float:
        """When the token `result` came from is refused as expired (past its exp's leeway)."""
        return result.expires_at + self._leeway

    def _follow_revocations(self, snap: Snapshot) -> None:
        jtis = snap.revoked_jtis
        if jtis is self._revoked_jtis or jtis == self._revoked_jtis:
            return
        expiry = snap.revocation_expiry
        self._revocations.replace(
            Revoked(KIND_JWT_ID, jti, expiry.get((KIND_JWT_ID, jti), 0)) for jti in jtis
        )
        self._revoked_jtis = jtis


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a token without any check: for audit records only, never for decisions."""
    try:
        return split_token(token).claims
    except JwtSvidError:
        return {}
