"""Verification of the OAuth tokens svidd's authorization server mints: RFC 9068 access tokens
(``typ: at+jwt``) and Txn-Tokens (``typ: txntoken+jwt``, draft-ietf-oauth-transaction-tokens).

They are signed with the trust domain's JWT keys, the very keys a JWT-SVID verifier uses, but
they are not JWT-SVIDs: ``sub`` is the principal (any string), ``iss`` is the issuer URL, ``typ``
says what they are. So JWT-SVID verification refuses them and this refuses JWT-SVIDs; the
signature, key lookup, revocation by ``jti`` and the result cache are the same machinery. An
access token exchanged for a task is a credential of that task on the server, so its ``jti`` is
revoked when the task ends and reaches this verifier through the agent's revocation stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
from svid._jose import SignatureCheck
from svid._jwt import is_time, split_typed_token, typed_header_verified
from svid._revocation import (
    MAX_VERIFIER_LEEWAY,
    RevocationSet,
    check_max_staleness,
    fresh_for,
    refuse_if_stale,
)
from svid._spiffe_id import TrustDomain
from svid._task_claims import (
    INVOKE_TOOL,
    TOOL_SCOPE_PREFIX,
    TaskClaimsError,
    act_chain,
    tools_from_scope,
)
from svid._verify_jwt import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_LEEWAY,
    future_leeway,
    memo_signature_check,
)

# RFC 9068 §2.1 and the Txn-Token draft's media types, as check_typed_header normalizes them.
ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 - a media type
TXN_TOKEN_TYP = "txntoken+jwt"  # noqa: S105 - a media type

BundleGetter = Callable[[TrustDomain], JwtBundle | None]


@dataclass(frozen=True, slots=True)
class VerifiedAccessToken:
    """A verified access token or Txn-Token. Holds no token.

    ``subject`` is the principal the token is for (a user, or a workload's SPIFFE ID);
    ``act_chain`` the RFC 8693 actors, the current one first (for an exchanged token, the task's
    SPIFFE ID); ``task_id`` the task it was minted for (``txn``), if any.

    ``scopes`` are the token's ``scope`` as issued: actions (``read``, ``invoke_tool``, ...) and
    ``tool:<name>``s. An access token's are a grant at its ``aud``, which the verifier checked.
    A Txn-Token's are the decision made for ``txn_resource`` alone while its ``aud`` is the
    whole trust domain: read them through ``allows`` and ``grants_tool`` with the resource
    asking, not by membership (``"read" in scopes`` holds for a decision about another one).
    """

    token_type: str
    issuer: str
    subject: str
    audience: tuple[str, ...]
    scopes: frozenset[str]
    act_chain: tuple[str, ...]
    task_id: str | None
    client_id: str | None
    jti: str
    issued_at: int
    expires_at: int
    kid: str
    claims: Mapping[str, Any]

    @property
    def delegated(self) -> bool:
        """The token carries ``act``: a party (a task) acts for ``subject``, the principal as
        the task's runtime declared it and policy allowed, not as anyone authenticated it.
        Every token svidd exchanges for a task is one; a workload's own (JWT bearer) is not."""
        return bool(self.act_chain)

    @property
    def tools(self) -> frozenset[str]:
        """The tools the scope grants by name (``tool:<name>``)."""
        return frozenset(tools_from_scope(" ".join(self.scopes)))

    def allows(self, action: str, resource: str | None = None) -> bool:
        """Whether the token grants ``action`` (at ``resource``, for a Txn-Token), as
        ``TaskClaims.allows`` reads a task token's scope: a ``tool:`` scope-token is no action
        (``grants_tool`` answers for tools).

        The same binding as ``grants_tool``: an access token's ``aud`` is its resource, checked
        by the verifier, so ``resource`` is not read; a Txn-Token's decision was made for
        ``tctx.resource`` alone, so it grants an action only when ``resource`` is given and is
        that one."""
        if not action or action.startswith(TOOL_SCOPE_PREFIX) or action not in self.scopes:
            return False
        return self._decided_for(resource)

    def grants_tool(self, tool: str, resource: str | None = None) -> bool:
        """Whether the token may call ``tool`` (at ``resource``, for a Txn-Token): granted by
        name, or every tool of its resource is (``invoke_tool``), as ``TaskClaims.grants_tool``
        reads a task token's scope.

        An access token's ``aud`` is its resource, which the verifier checked: ``resource`` is
        not read. A Txn-Token's ``aud`` is the whole trust domain while the decision it carries
        was made for one resource (``tctx.resource``): it grants a tool by name only when
        ``resource`` is given and is that one, and never through ``invoke_tool``, which named
        every tool of that resource, not of the service asking."""
        # `tool in self.tools`, without parsing the whole scope again on each call (per
        # request on AccessTokenAuth's path): a scope token has no whitespace.
        named = bool(tool) and TOOL_SCOPE_PREFIX + tool in self.scopes
        if self.token_type == ACCESS_TOKEN_TYP:
            return named or INVOKE_TOOL in self.scopes
        return named and self._decided_for(resource)

    def _decided_for(self, resource: str | None) -> bool:
        """Whether the token's scope is a grant at ``resource``: an access token's always (its
        aud was checked), a Txn-Token's only at the resource its decision was made for."""
        if self.token_type == ACCESS_TOKEN_TYP:
            return True
        return resource is not None and resource == self.txn_resource

    @property
    def txn_resource(self) -> str | None:
        """A Txn-Token's ``tctx.resource``, the resource its decision was made for (None for
        an access token, or a Txn-Token naming none)."""
        if self.token_type != TXN_TOKEN_TYP:
            return None
        tctx = self.claims.get("tctx")
        resource = tctx.get("resource") if isinstance(tctx, Mapping) else None
        return resource if isinstance(resource, str) and resource else None


class _Entry(NamedTuple):
    result: VerifiedAccessToken
    bundle: JwtBundle
    not_before: float
    not_after: float


class AccessTokenVerifier:
    """Verifies svidd's access tokens for one resource (``audience``), and Txn-Tokens of the
    issuer's trust domain: signature by a key of ``trust_domain``'s JWT bundle, ``typ``, ``iss``,
    ``aud``, exp/nbf/iat with a leeway, and ``jti`` not revoked. Results are cached by the exact
    token until the earliest of expiry, a bundle change and a revocation of its ``jti``."""

    def __init__(
        self,
        bundles: BundleGetter,
        *,
        issuer: str,
        audience: str,
        trust_domain: TrustDomain | str,
        clock: Clock | None = None,
        revocations: RevocationSet | None = None,
        leeway: float = DEFAULT_LEEWAY,
        cache_size: int = DEFAULT_CACHE_SIZE,
        max_revocation_staleness: float | None = None,
    ) -> None:
        if not issuer:
            raise ValueError("an issuer URL is required")
        if not audience:
            raise ValueError("an audience (this resource) is required")
        # As JwtVerifier: a leeway wider than revocations are kept would accept a revoked token
        # again once its revocation is pruned. Written so that NaN fails too.
        if not 0 <= leeway <= MAX_VERIFIER_LEEWAY:
            raise ValueError(
                f"leeway must be between 0 and {MAX_VERIFIER_LEEWAY:g} seconds, got {leeway}"
            )
        self._bundles = bundles
        self._issuer = issuer
        self._audience = audience
        if not isinstance(trust_domain, TrustDomain):
            trust_domain = TrustDomain.parse(trust_domain)
        self._td = trust_domain
        self._clock: Clock = clock or SystemClock()
        self._revocations = revocations if revocations is not None else RevocationSet()
        self._leeway = leeway
        self._future = future_leeway(leeway)  # for iat and nbf, as JwtVerifier
        self._max_staleness = check_max_staleness(max_revocation_staleness)
        self._cache: LruCache[str, _Entry] = LruCache(cache_size)
        # One signature check per (kid, alg) of the current bundle, as in JwtVerifier.
        self._checks: tuple[JwtBundle | None, dict[tuple[str, str], SignatureCheck | None]] = (
            None,
            {},
        )

    @property
    def cache(self) -> LruCache[str, _Entry]:
        return self._cache

    @property
    def trust_domain(self) -> TrustDomain:
        """The issuer's trust domain, whose JWT keys sign the tokens."""
        return self._td

    def revocations_fresh_for(self) -> float | None:
        """Seconds until this verifier refuses everything for stale revocation data
        (``max_revocation_staleness``; 0: it does now); None without that setting."""
        return fresh_for(
            self._revocations, self._clock.monotonic(), self._max_staleness, self._clock.now()
        )

    def verify(self, token: str) -> VerifiedAccessToken:
        """Verify an RFC 9068 access token (``typ: at+jwt``) for this resource.

        Raises VerificationError (or its ExpiredError / RevokedError) saying why not."""
        return self._checked(token, ACCESS_TOKEN_TYP, self._audience)

    def verify_txn_token(self, token: str) -> VerifiedAccessToken:
        """Verify a Txn-Token (``typ: txntoken+jwt``), whose audience is the trust domain."""
        return self._checked(token, TXN_TOKEN_TYP, self._td.name)

    def _checked(self, token: str, typ: str, audience: str) -> VerifiedAccessToken:
        now = self._clock.now()
        if self._max_staleness is not None:
            refuse_if_stale(self._revocations, self._clock.monotonic(), self._max_staleness, now)
        cache = self._cache
        entry = cache.get(token) if cache.max_entries else None
        if entry is None or not self._still_valid(entry, now):
            if entry is not None:
                cache.discard(token)
            entry = self._verify(token, now)
            cache.put(token, entry)
        result = entry.result
        if result.token_type != typ:
            raise VerificationError(
                f"token typ is {result.token_type!r}, expected {typ!r} (of {result.subject})"
            )
        if audience not in result.audience:
            raise AudienceError(f"token for {result.subject} is not for audience {audience!r}")
        return result

    def _still_valid(self, entry: _Entry, now: float) -> bool:
        if not entry.not_before <= now <= entry.not_after:
            return False
        if self._bundles(self._td) is not entry.bundle:
            return False
        return not self._revocations.is_jti_revoked(entry.result.jti)

    def _signature_check(self, bundle: JwtBundle, kid: str, alg: str) -> SignatureCheck | None:
        held, checks = self._checks
        if held is not bundle:
            checks = {}
            self._checks = (bundle, checks)
        return memo_signature_check(checks, bundle, kid, alg, self._td)

    def _verify(self, token: str, now: float) -> _Entry:
        try:
            typ, parsed = split_typed_token(token)
        except JwtSvidError as exc:
            raise VerificationError(f"malformed access token: {exc}") from exc
        if typ not in (ACCESS_TOKEN_TYP, TXN_TOKEN_TYP):
            # A JWT-SVID (typ JWT) lands here: it is not an access token.
            raise VerificationError(f"token typ {typ!r} is not an access token or Txn-Token")
        bundle = self._bundles(self._td)
        if bundle is None:
            raise VerificationError(f"no JWT bundle for trust domain {self._td}")
        check = self._signature_check(bundle, parsed.kid, parsed.alg)
        if check is None or not check(parsed.signing_input, parsed.signature):
            raise VerificationError(f"token signature is invalid (kid {parsed.kid!r})")
        # Signed: its header may be memoized.
        typed_header_verified(parsed.signing_input, parsed.alg, parsed.kid, typ)
        # Only signed claims are read from here on.
        claims = parsed.claims
        fields = _claims(claims, typ)
        if fields.issuer != self._issuer:
            raise VerificationError(f"token issuer {fields.issuer[:200]!r} is not {self._issuer!r}")
        leeway = self._leeway
        who = fields.subject[:200]
        if now > fields.expires_at + leeway:
            raise ExpiredError(f"token for {who} expired at {fields.expires_at}")
        future = self._future
        latest = now + future
        nbf = claims.get("nbf")
        not_before = fields.issued_at - future
        if fields.issued_at > latest:
            raise ExpiredError(f"token for {who} has iat {fields.issued_at} in the future")
        if nbf is not None:
            if nbf > latest:
                raise ExpiredError(f"token for {who} has nbf {nbf:.0f} in the future")
            not_before = max(not_before, nbf - future)
        if self._revocations.is_jti_revoked(fields.jti):
            raise RevokedError(f"token jti {fields.jti!r} of {who} is revoked")
        result = VerifiedAccessToken(
            token_type=typ,
            issuer=fields.issuer,
            subject=fields.subject,
            audience=fields.audience,
            scopes=fields.scopes,
            act_chain=fields.act_chain,
            task_id=fields.task_id,
            client_id=fields.client_id,
            jti=fields.jti,
            issued_at=fields.issued_at,
            expires_at=fields.expires_at,
            kid=parsed.kid,
            claims=MappingProxyType(freeze_nested(claims)),  # cached: read-only at every depth
        )
        return _Entry(result, bundle, not_before, fields.expires_at + leeway)


class _Fields(NamedTuple):
    issuer: str
    subject: str
    audience: tuple[str, ...]
    expires_at: int
    issued_at: int
    jti: str
    scopes: frozenset[str]
    act_chain: tuple[str, ...]
    task_id: str | None
    client_id: str | None


def _string(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise VerificationError(f"token claim {name!r} is missing or not a non-empty string")
    return value


def _optional(claims: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    return _string(claims, name) if required or name in claims else None


def _claims(claims: Mapping[str, Any], typ: str) -> _Fields:
    """The claims RFC 9068 §2.2 requires (iss, exp, aud, sub, iat, jti; client_id for an access
    token, which a Txn-Token has not) and the optional ones read with their types checked."""
    issuer = _string(claims, "iss")
    subject = _string(claims, "sub")
    jti = _string(claims, "jti")
    client_id = _optional(claims, "client_id", required=typ == ACCESS_TOKEN_TYP)
    task_id = _optional(claims, "txn", required=typ == TXN_TOKEN_TYP)
    aud = claims.get("aud")
    if isinstance(aud, str):
        audience: tuple[str, ...] = (aud,)
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        audience = tuple(aud)
    else:
        raise VerificationError("token 'aud' claim is missing, empty or not string(s)")
    for name in ("exp", "iat"):
        if not is_time(claims.get(name)):
            raise VerificationError(f"token {name!r} claim is missing or not a finite number")
    if "nbf" in claims and not is_time(claims["nbf"]):
        raise VerificationError("token 'nbf' claim is not a finite number")
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise VerificationError("token claim 'scope' is not a string")
    try:
        chain = act_chain(claims.get("act"), "token")
    except TaskClaimsError as exc:  # a task-claims error type for a token that is no task's
        raise VerificationError(str(exc)) from None
    return _Fields(
        issuer,
        subject,
        audience,
        int(claims["exp"]),
        int(claims["iat"]),
        jti,
        frozenset(scope.split()),
        chain,
        task_id,
        client_id,
    )
