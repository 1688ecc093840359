"""JWT-SVID verification: SPIFFE alg list, kid lookup in the ``sub``'s trust domain, signature,
audience, times with a small leeway (wider for an iat/nbf ahead), jti revocation, and a result
cache keyed by the exact token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from svid._bundle import JwtBundle
from svid._cache import LruCache
from svid._clock import Clock, SystemClock
from svid._errors import (
    AudienceError,
    ExpiredError,
    JwtSvidError,
    RevokedError,
    VerificationError,
)
from svid._frozen_json import freeze_nested
from svid._jose import SignatureCheck, signature_check
from svid._jwt import check_claims, split_and_check_fast, split_and_check_header, token_verified
from svid._revocation import (
    MAX_CLOCK_SKEW,
    MAX_VERIFIER_LEEWAY,
    RevocationSet,
    check_max_staleness,
    fresh_for,
    refuse_if_stale,
)
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._task_claims import TaskClaims, task_claims

JwtBundleGetter = Callable[[TrustDomain], JwtBundle | None]

DEFAULT_LEEWAY = 5.0
DEFAULT_CACHE_SIZE = 10_000
_MAX_CHECKS = 64
_MISSING: Any = object()  # a (kid, alg) not looked up yet, unlike a None check (unfit alg)


def future_leeway(leeway: float) -> float:
    """How far ahead of this clock a token's iat or nbf may be: MAX_CLOCK_SKEW (or the leeway, if
    wider). A server whose clock runs ahead stamps a token it just minted in this clock's future;
    X.509-SVIDs are backdated and revocations kept for that margin, and go-spiffe (go-jose) allow
    a minute. exp keeps the leeway alone: taking it wider would outlast revocations."""
    return max(leeway, MAX_CLOCK_SKEW)


@dataclass(frozen=True, slots=True)
class VerifiedJwt:
    """The outcome of a successful JWT-SVID verification. Holds no token."""

    spiffe_id: SpiffeId
    claims: Mapping[str, Any]
    audience: tuple[str, ...]
    expires_at: int
    kid: str

    @property
    def task(self) -> TaskClaims | None:
        """The typed task claims of a task token, None for any other JWT-SVID.

        Raises TaskClaimsError (a VerificationError) when the token has ``txn`` but malformed
        task claims."""
        return task_claims(self)

    @property
    def is_task(self) -> bool:
        return "txn" in self.claims


# The slots' own setters: VerifiedJwt(...) without its generated __init__, which costs more than
# this on the uncached path (tests compare the two).
_SET_FIELDS = tuple(
    VerifiedJwt.__dict__[name].__set__
    for name in ("spiffe_id", "claims", "audience", "expires_at", "kid")
)
_new_object = object.__new__


class _Entry(NamedTuple):
    result: VerifiedJwt
    trust_domain: TrustDomain
    bundle: JwtBundle
    not_before: float
    not_after: float
    jti: str | None


class JwtVerifier:
    """Verifies JWT-SVIDs for one or more audiences of this service."""

    # The source whose revocations feed this verifier, when one made it (its x509_verifier()
    # / jwt_verifier()): svid.asgi given only the verifier follows its revocations from there.
    _revocation_feed: Any = None

    def __init__(
        self,
        bundles: JwtBundleGetter,
        *,
        clock: Clock | None = None,
        revocations: RevocationSet | None = None,
        leeway: float = DEFAULT_LEEWAY,
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_revocation_staleness: float | None = None,
    ) -> None:
        # A wider leeway would outlast the revocations the server keeps (MAX_VERIFIER_LEEWAY
        # past exp): a revoked token would be accepted again once its revocation is pruned.
        # The comparison is written so that NaN fails it too.
        if not 0 <= leeway <= MAX_VERIFIER_LEEWAY:
            raise ValueError(
                f"leeway must be between 0 and {MAX_VERIFIER_LEEWAY:g} seconds "
                f"(MAX_VERIFIER_LEEWAY, how long revocations are kept past exp), got {leeway}"
            )
        self._bundles = bundles
        self._clock: Clock = clock or SystemClock()
        self._revocations = revocations if revocations is not None else RevocationSet()
        self._leeway = leeway
        self._future = future_leeway(leeway)
        # Opt-in: refuse everything while the revocation feed has been gone longer than this.
        self._max_staleness = check_max_staleness(max_revocation_staleness)
        self._cache: LruCache[str, _Entry] = LruCache(cache_size)
        # Per trust domain: the bundle object they were made from, and one signature check per
        # (kid, alg) seen, so a token costs one signature and no key or alg bookkeeping.
        # Keyed by trust domain name: TrustDomain hashes in Python.
        self._checks: dict[str, tuple[JwtBundle, dict[tuple[str, str], SignatureCheck | None]]] = {}

    @property
    def cache(self) -> LruCache[str, _Entry]:
        return self._cache

    def revocations_fresh_for(self) -> float | None:
        """Seconds until this verifier refuses everything for stale revocation data
        (``max_revocation_staleness``; 0: it does now); None without that setting."""
        return fresh_for(
            self._revocations, self._clock.monotonic(), self._max_staleness, self._clock.now()
        )

    def verify(self, token: str, audience: str) -> VerifiedJwt:
        """Verify ``token`` for ``audience``, which must be among its ``aud``.

        Raises VerificationError (or its ExpiredError / RevokedError) saying why not, and
        TypeError for an audience that is not a string (several: ``verify_any``).
        """
        if not isinstance(audience, str):
            # A list was refused as "not for audience ['a']", as if the token were at fault.
            raise TypeError(
                f"audience must be a str, not {type(audience).__name__}: for a service known "
                "by several names, use verify_any"
            )
        if not audience:
            raise VerificationError("an expected audience is required")
        result = self._result(token)
        if audience not in result.audience:
            raise AudienceError(f"token for {result.spiffe_id} is not for audience {audience!r}")
        return result

    def verify_any(self, token: str, audiences: Sequence[str]) -> VerifiedJwt:
        """Verify ``token`` for whichever of ``audiences`` (this service's names) it names.

        For a service known by several names (its URL and an endpoint's): one verification,
        where trying ``verify`` name by name would verify again per miss when nothing is cached.
        TypeError for ``audiences`` given as one string.
        """
        if isinstance(audiences, str | bytes):
            # A str is a Sequence[str] of its characters: "orders" admitted a token for "o".
            raise TypeError(
                f"audiences must be a sequence of names, not a {type(audiences).__name__}: "
                "for one name, use verify"
            )
        if not audiences or not all(audiences):
            raise VerificationError("expected audiences are required")
        result = self._result(token)
        if not any(a in result.audience for a in audiences):
            raise AudienceError(
                f"token for {result.spiffe_id} is for {list(result.audience)[:4]!r}, "
                f"none of {list(audiences)!r}"
            )
        return result

    def _result(self, token: str) -> VerifiedJwt:
        now = self._clock.now()
        if self._max_staleness is not None:
            refuse_if_stale(self._revocations, self._clock.monotonic(), self._max_staleness, now)
        cache = self._cache
        if cache.max_entries:  # a zero-size cache never holds anything: skip its lock
            entry = cache.get(token)
            if entry is None or not self._still_valid(entry, now):
                if entry is not None:
                    cache.discard(token)
                entry = tuple.__new__(_Entry, self._verify(token, now))
                cache.put(token, entry)
            result = entry.result
        else:
            result = self._verify(token, now)[0]
        return result

    def _still_valid(self, entry: _Entry, now: float) -> bool:
        if not entry.not_before <= now <= entry.not_after:
            return False
        if self._bundles(entry.trust_domain) is not entry.bundle:
            return False
        return entry.jti is None or not self._revocations.is_jti_revoked(entry.jti)

    def _signature_check(
        self, td: TrustDomain, bundle: JwtBundle, kid: str, alg: str
    ) -> SignatureCheck | None:
        memo = self._checks.get(td.name)
        if memo is None or memo[0] is not bundle:
            memo = (bundle, {})
            self._checks[td.name] = memo
        return memo_signature_check(memo[1], bundle, kid, alg, td)

    def _verify(
        self, token: str, now: float
    ) -> tuple[VerifiedJwt, TrustDomain, JwtBundle, float, float, str | None]:
        """The fields of the cache _Entry, as a plain tuple: built as an _Entry only if cached."""
        fast = split_and_check_fast(token)
        if fast is not None:
            alg, kid, claims, sid, audience, exp, signing_input, signature = fast
        else:  # the general path: accepts the unusual, and says what is wrong with the rest
            try:
                parsed = split_and_check_header(token)
                alg, kid = parsed.alg, parsed.kid
                sid, audience, exp = check_claims(parsed.claims)
            except JwtSvidError as exc:
                raise VerificationError(f"malformed JWT-SVID: {exc}") from exc
            claims, signing_input, signature = parsed.claims, parsed.signing_input, parsed.signature
        td = sid.trust_domain
        bundle = self._bundles(td)
        if bundle is None:
            raise VerificationError(f"no JWT bundle for trust domain {td}")
        memo = self._checks.get(td.name)  # _signature_check's memo, read inline on the hot path
        check = (
            memo[1].get((kid, alg), _MISSING)
            if memo is not None and memo[0] is bundle
            else _MISSING
        )
        if check is _MISSING:
            check = self._signature_check(td, bundle, kid, alg)
        if check is None or not check(signing_input, signature):
            raise VerificationError(f"token signature is invalid (kid {kid!r}, sub {sid})")
        token_verified(signing_input, alg, kid, claims["sub"], sid)  # signed: memoize its parse
        leeway = self._leeway
        if now > exp + leeway:
            raise ExpiredError(f"token for {sid} expired at {exp}")
        not_before = -math.inf
        future = self._future
        latest = now + future
        # Both parsers have made sure nbf/iat, when present, are finite numbers.
        nbf = claims.get("nbf")
        if nbf is not None:
            if nbf > latest:
                raise ExpiredError(f"token for {sid} has nbf {nbf:.0f} in the future")
            not_before = nbf - future
        iat = claims.get("iat")
        if iat is not None:
            if iat > latest:
                raise ExpiredError(f"token for {sid} has iat {iat:.0f} in the future")
            not_before = max(not_before, iat - future)
        jti = claims.get("jti")
        if type(jti) is not str:
            jti = None
        elif self._revocations.is_jti_revoked(jti):
            raise RevokedError(f"token jti {jti!r} of {sid} is revoked")
        result: VerifiedJwt = _new_object(VerifiedJwt)
        set_sid, set_claims, set_audience, set_expires_at, set_kid = _SET_FIELDS
        set_sid(result, sid)
        # Cached and shared by every request with this token: read-only at every depth.
        set_claims(result, MappingProxyType(freeze_nested(claims)))
        set_audience(result, audience)
        set_expires_at(result, exp)
        set_kid(result, kid)
        return result, td, bundle, not_before, exp + leeway, jti


def memo_signature_check(
    checks: dict[tuple[str, str], SignatureCheck | None],
    bundle: JwtBundle,
    kid: str,
    alg: str,
    td: TrustDomain,
) -> SignatureCheck | None:
    """The signature check for (kid, alg) from `checks`, memoised per bundle by the caller;
    built from the bundle's key on first use."""
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
