"""Checking an incoming JWT-SVID (a JWT-bearer assertion, a token exchange's subject token, a
delegation's actor token).

Accepted: a JWT-SVID signed by a key of this trust domain's bundle or of a configured trusted
bundle, for this server alone (its token endpoint or its issuer URL, no other audience), not
expired, its `jti` not revoked, and when it has `iss`, an issuer this server knows. An assertion
or subject token must also carry a `jti` this server did not accept before (a subject token:
for the same resource and kind of token; server/oauth/replay.py: the datastore, claiming it
with the token's ledger record, has the last word across servers); an actor token only proves
who acts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from server.audit.errors import SecretInAuditError
from server.audit.event import check_no_secret
from server.datastore.base import JtiClaim
from server.oauth.errors import InvalidGrantError
from svid._bundle import JwtBundle
from svid._clock import Clock
from svid._errors import VerificationError
from svid._spiffe_id import TrustDomain
from svid._verify_jwt import JwtVerifier, VerifiedJwt

# A leeway in seconds for clocks of other machines, as the svid library allows.
LEEWAY = 5.0
MAX_ASSERTION_BYTES = 8192

# (claim, now) -> True when this jti was not seen yet (and is now reserved).
ReserveJti = Callable[[JtiClaim, int], bool]


@dataclass(frozen=True, slots=True)
class CheckedAssertion:
    verified: VerifiedJwt
    issuer: str  # the token's iss, or its trust domain's ID when it has none
    claim: JtiClaim  # to be claimed durably with whatever the assertion gets


class AssertionChecker:
    def __init__(
        self,
        *,
        bundles: Callable[[TrustDomain], JwtBundle | None],
        audiences: tuple[str, ...],
        known_issuers: Mapping[str, TrustDomain],
        reserve_jti: ReserveJti,
        revoked: Callable[[str], bool],
        clock: Clock,
        on_refused: Callable[[str], object] | None = None,
    ) -> None:
        """``revoked``: whether a JWT's ``jti`` is revoked on this server; ``on_refused``:
        told of each token whose verification failed (to fetch keys an issuer has published
        since)."""
        self._on_refused = on_refused
        self._revoked = revoked
        self._audiences = audiences
        self._known_issuers = dict(known_issuers)
        self._reserve_jti = reserve_jti
        self._clock = clock
        # No cache: every assertion is checked for replay anyway, and one is used once.
        self._verifier = JwtVerifier(bundles, clock=clock, leeway=LEEWAY, cache_size=0)

    def check(self, token: str, what: str, once_per: str = "") -> CheckedAssertion:
        """An assertion: verified, and its ``jti`` reserved: used once, or once per
        ``once_per`` (what it is exchanged for)."""
        return self.claim(self.authenticate(token, what), what, once_per)

    def claim(self, checked: CheckedAssertion, what: str, once_per: str = "") -> CheckedAssertion:
        """An authenticated assertion with its ``jti`` reserved, as ``check`` does, for a grant
        that reads the request before it knows what the assertion is used for."""
        claim = checked.claim
        if once_per:
            claim = JtiClaim(f"{claim.issuer} {once_per}", claim.jti, claim.expires_at)
            checked = CheckedAssertion(checked.verified, checked.issuer, claim)
        if not self._reserve_jti(claim, int(self._clock.now())):
            raise InvalidGrantError(replayed(what, claim.jti))
        return checked

    def authenticate(self, token: str, what: str) -> CheckedAssertion:
        """A JWT-SVID that proves who presents it (an actor token): verified as an assertion
        is, its ``jti`` not reserved, so the token a workload's agent caches serves again."""
        if not token:
            raise InvalidGrantError(f"{what} is missing")
        if len(token) > MAX_ASSERTION_BYTES:
            raise InvalidGrantError(f"{what} is longer than {MAX_ASSERTION_BYTES} bytes")
        verified = self._verify(token, what)
        others = [a for a in verified.audience if a not in self._audiences]
        if others:
            # Every audience of a JWT-SVID holds it: a service it was also for could trade it
            # here as the workload or task it names (RFC 7523bis: this server as sole audience).
            raise InvalidGrantError(
                f"{what} is also for {others[0][:200]!r}: it must be for this server alone"
            )
        td = verified.spiffe_id.trust_domain
        iss = verified.claims.get("iss")
        if iss is not None:
            if not isinstance(iss, str) or self._known_issuers.get(iss) != td:
                raise InvalidGrantError(f"{what} issuer {str(iss)[:200]!r} is not trusted for {td}")
            issuer = iss
        else:
            issuer = str(td.id)
        jti = verified.claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise InvalidGrantError(f"{what} has no jti: it could be replayed")
        # Both go on the audit log, which refuses a value shaped like a credential: such a token
        # (a trusted partner's; ours never mint one) is refused here, not failed there.
        for claim, value in (("jti", jti), ("sub", str(verified.spiffe_id))):
            try:
                check_no_secret(claim, value)
            except SecretInAuditError:
                raise InvalidGrantError(
                    f"{what} {claim} looks like a token or key: it cannot be recorded"
                ) from None
        # Revoked (its task ended, its agent evicted): every verifier refuses it, so it may not
        # be traded here for a fresh token that outlives the revocation either.
        if self._revoked(jti):
            raise InvalidGrantError(f"{what} jti {jti[:64]!r} is revoked")
        # Held for as long as the token is accepted (its exp plus the leeway), not just to its
        # exp: a replay in the leeway's seconds would otherwise find the jti released.
        held_until = verified.expires_at + math.ceil(LEEWAY)
        return CheckedAssertion(verified, issuer, JtiClaim(issuer, jti, held_until))

    def _verify(self, token: str, what: str) -> VerifiedJwt:
        # One verification for any of our names (a parse first, only to pick the name, was a
        # tenth of an exchange's own work).
        try:
            return self._verifier.verify_any(token, self._audiences)
        except VerificationError as exc:
            if self._on_refused is not None:
                self._on_refused(token)
            raise InvalidGrantError(f"{what} refused: {exc}") from None


def replayed(what: str, jti: str) -> str:
    return f"{what} jti {jti[:64]!r} was used before (replay)"
