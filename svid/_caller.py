"""Who made a request, as an adapter verified it: the SPIFFE ID, and the JWT-SVID or the mTLS
peer it was proven with. Web adapters (svid.asgi, svid.mcp) put one in each request they admit."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from svid._spiffe_id import SpiffeId
from svid._task_claims import TOOL_SCOPE_PREFIX, TaskClaims, task_claims
from svid._verify_jwt import VerifiedJwt
from svid._verify_x509 import VerifiedX509

_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


class Caller:
    """A verified caller. ``jwt`` is set for a bearer JWT-SVID, ``x509`` for an mTLS peer.

    ``task`` is the typed ``TaskClaims`` of a task token (None otherwise); it is read when the
    caller is made, so a malformed task token is refused rather than half-read later.
    """

    __slots__ = ("audience", "jwt", "spiffe_id", "task", "x509")

    def __init__(
        self,
        spiffe_id: SpiffeId,
        *,
        jwt: VerifiedJwt | None = None,
        x509: VerifiedX509 | None = None,
        audience: str = "",
    ) -> None:
        self.spiffe_id = spiffe_id
        self.jwt = jwt
        self.x509 = x509
        self.audience = audience
        # Raises TaskClaimsError (a VerificationError) for a malformed task token.
        self.task: TaskClaims | None = task_claims(jwt) if jwt is not None else None

    def __repr__(self) -> str:
        how = "jwt" if self.jwt is not None else "x509"
        return f"Caller({self.spiffe_id}, {how}, task={self.task_id})"

    @property
    def claims(self) -> Mapping[str, Any]:
        """The JWT-SVID's claims (read-only); empty for an mTLS peer."""
        return self.jwt.claims if self.jwt is not None else _NO_CLAIMS

    @property
    def jti(self) -> str | None:
        jti = self.claims.get("jti")
        return jti if isinstance(jti, str) else None

    @property
    def task_id(self) -> str | None:
        return self.task.task_id if self.task is not None else None

    def grants(self, scope: str) -> bool:
        """Whether the caller's token grants one scope token: ``tool:<name>`` (that tool, or
        every tool through ``invoke_tool``) or an action. Only task tokens grant scopes."""
        task = self.task
        if task is None:
            return False
        audience = self.audience or None
        if scope.startswith(TOOL_SCOPE_PREFIX):
            return task.grants_tool(scope[len(TOOL_SCOPE_PREFIX) :], audience=audience)
        return task.allows(scope, audience=audience)

    def missing(self, scopes: tuple[str, ...]) -> tuple[str, ...]:
        """The scope tokens of ``scopes`` the caller's token does not grant."""
        return tuple(s for s in scopes if not self.grants(s))
