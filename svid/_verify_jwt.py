"""JWT-SVID verification: SPIFFE alg list, kid lookup in the ``sub``'s trust domain, signature,
audience, times with a small leeway, jti revocation, and a result cache keyed by the exact token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from svid._bundle import JwtBundle
from svid._cache import LruCache
from svid._clock import Clock, SystemClock
from svid._errors import ExpiredError, JwtSvidError, RevokedError, VerificationError
from svid._jose import SignatureCheck, signature_check
from svid._jwt import check_claims, split_and_check_header
from svid._revocation import RevocationSet
from svid._spiffe_id import SpiffeId, TrustDomain

JwtBundleGetter = Callable[[TrustDomain], JwtBundle | None]

DEFAULT_LEEWAY = 5.0
DEFAULT_CACHE_SIZE = 10_000
_MAX_CHECKS = 64


@dataclass(frozen=True, slots=True)
class VerifiedJwt:
    """The outcome of a successful JWT-SVID verification. Holds no token."""

    spiffe_id: SpiffeId
    claims: Mapping[str, Any]
    audience: tuple[str, ...]
    expires_at: int
    kid: str


class _Entry(NamedTuple):
    result: VerifiedJwt
    trust_domain: TrustDomain
    bundle: JwtBundle
    not_before: float
    not_after: float
    jti: str | None


class JwtVerifier:
    """Verifies JWT-SVIDs for one or more audiences of this service."""

    def __init__(
        self,
        bundles: JwtBundleGetter,
        *,
        clock: Clock | None = None,
        revocations: RevocationSet | None = None,
        leeway: float = DEFAULT_LEEWAY,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if leeway < 0:
            raise ValueError(f"leeway must be >= 0, got {leeway}")
        self._bundles = bundles
        self._clock: Clock = clock or SystemClock()
        self._revocations = revocations if revocations is not None else RevocationSet()
        self._leeway = leeway
        self._cache: LruCache[str, _Entry] = LruCache(cache_size)
        # Per trust domain: the bundle object they were made from, and one signature check per
        # (kid, alg) seen, so a token costs one signature and no key or alg bookkeeping.
        self._checks: dict[
            TrustDomain, tuple[JwtBundle, dict[tuple[str, str], SignatureCheck | None]]
        ] = {}

    @property
    def cache(self) -> LruCache[str, _Entry]:
        return self._cache

    def verify(self, token: str, audience: str) -> VerifiedJwt:
        """Verify ``token`` for ``audience``, which must be among its ``aud``.

        Raises VerificationError (or its ExpiredError / RevokedError) saying why not.
        """
        if not audience:
            raise VerificationError("an expected audience is required")
        now = self._clock.now()
        entry = self._cache.get(token)
        if entry is None or not self._still_valid(entry, now):
            if entry is not None:
                self._cache.discard(token)
            entry = self._verify(token, now)
            self._cache.put(token, entry)
        if audience not in entry.result.audience:
            raise VerificationError(
                f"token for {entry.result.spiffe_id} is not for audience {audience!r}"
            )
        return entry.result

    def _still_valid(self, entry: _Entry, now: float) -> bool:
        if not entry.not_before <= now <= entry.not_after:
            return False
        if self._bundles(entry.trust_domain) is not entry.bundle:
            return False
        return entry.jti is None or not self._revocations.is_jti_revoked(entry.jti)

    def _signature_check(
        self, td: TrustDomain, bundle: JwtBundle, kid: str, alg: str
    ) -> SignatureCheck | None:
        memo = self._checks.get(td)
        if memo is None or memo[0] is not bundle:
            memo = (bundle, {})
            self._checks[td] = memo
        checks = memo[1]
        try:
            return checks[(kid, alg)]
        except KeyError:
            pass
        key = bundle.get(kid)
        if key is None:
            raise VerificationError(f"no JWT authority with kid {kid!r} in trust domain {td}")
        if len(checks) >= _MAX_CHECKS:  # kids come from tokens: bound what they can make us keep
            checks.clear()
        check = checks[(kid, alg)] = signature_check(alg, key)
        return check

    def _verify(self, token: str, now: float) -> _Entry:
        try:
            parsed = split_and_check_header(token)
            alg, kid = parsed.alg, parsed.kid
            sid, audience, exp = check_claims(parsed.claims)
        except JwtSvidError as exc:
            raise VerificationError(f"malformed JWT-SVID: {exc}") from exc
        td = sid.trust_domain
        bundle = self._bundles(td)
        if bundle is None:
            raise VerificationError(f"no JWT bundle for trust domain {td}")
        check = self._signature_check(td, bundle, kid, alg)
        if check is None or not check(parsed.signing_input, parsed.signature):
            raise VerificationError(f"token signature is invalid (kid {kid!r}, sub {sid})")
        claims = parsed.claims
        leeway = self._leeway
        if now > exp + leeway:
            raise ExpiredError(f"token for {sid} expired at {exp}")
        not_before = -math.inf
        latest = now + leeway
        # check_claims has made sure nbf/iat, when present, are finite numbers.
        nbf = claims.get("nbf")
        if nbf is not None:
            if nbf > latest:
                raise ExpiredError(f"token for {sid} has nbf {nbf:.0f} in the future")
            not_before = nbf - leeway
        iat = claims.get("iat")
        if iat is not None:
            if iat > latest:
                raise ExpiredError(f"token for {sid} has iat {iat:.0f} in the future")
            not_before = max(not_before, iat - leeway)
        jti = claims.get("jti")
        if type(jti) is not str:
            jti = None
        if jti is not None and self._revocations.is_jti_revoked(jti):
            raise RevokedError(f"token jti {jti!r} of {sid} is revoked")
        result = VerifiedJwt(sid, MappingProxyType(claims), audience, exp, kid)
        return _Entry(result, td, bundle, not_before, exp + leeway, jti)
