"""Who made a request, as an adapter verified it: the SPIFFE ID, and the JWT-SVID or the mTLS
peer it was proven with. Web adapters (svid.asgi, svid.mcp) put one in each request they admit."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from svid._errors import VerificationError
from svid._frozen_json import FrozenDict, FrozenList
from svid._spiffe_id import SpiffeId
from svid._task_claims import (
    _MAX_ACT_DEPTH,
    INVOKE_TOOL,
    TASK_PATH,
    TOOL_SCOPE_PREFIX,
    TaskClaims,
    task_claims,
    tool_scope,
)
from svid._verify_jwt import VerifiedJwt
from svid._verify_x509 import VerifiedX509

_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})


_UNREAD: Any = object()
_EMPTY: dict[str, Any] = {}  # defaults, only read
_NO_RESOURCES: list[str] = []
# The plain JSON shapes: as parsed, or as a verifier hands them out (svid._frozen_json).
_OBJECTS: frozenset[type] = frozenset((dict, FrozenDict))
_ARRAYS: frozenset[type] = frozenset((list, FrozenList))


def _quick_grant(claims: Mapping[str, Any], sub: str, scope: str) -> bool | None:
    """``Caller.grants`` from the claims alone, without building TaskClaims, for a token whose
    task claims were not read yet; None when anything is unusual (then the full read decides,
    and refuses a malformed token). Decides what TaskClaims.grants_tool / allows decide for the
    token's own audience, refusals included (a test holds the two together)."""
    tokens = _plain_task_scope(claims, sub)
    return None if tokens is None else _decide(tokens, scope)


def _decide(tokens: tuple[str, ...], scope: str) -> bool | None:
    """Whether a plain task token's scope `tokens` grant `scope` (a tool's, or an action), as
    TaskClaims decides; None for a "tool:" that names no tool (the full read decides)."""
    if not scope.startswith(TOOL_SCOPE_PREFIX):
        return scope in tokens
    if len(scope) == len(TOOL_SCOPE_PREFIX):  # names no tool: TaskClaims has none such
        return None
    return scope in tokens or INVOKE_TOOL in tokens


def _plain_task_scope(claims: Mapping[str, Any], sub: str) -> tuple[str, ...] | None:
    """The scope tokens of a task token whose claims all have the plain shape the full read
    accepts; None when anything is unusual (the full read then decides)."""
    get = claims.get
    txn = get("txn")
    granted = get("scope", "")
    if type(txn) is not str or not txn or type(granted) is not str:
        return None
    suffix = TASK_PATH + txn
    if not sub.endswith(suffix):
        return None
    # The runtime ID before the suffix has a path of its own (sub was parsed as a SPIFFE ID).
    end = len(sub) - len(suffix)
    if sub[end - 1] == "/" or sub.find("/", len("spiffe://"), end) < 0:
        return None
    # The other claims task_claims reads, in the plain shape it accepts: None for anything it
    # could refuse (or accept only by isinstance). One function with the above: per request.
    tctx = get("tctx", _EMPTY)
    if type(tctx) not in _OBJECTS:
        return None
    resources = tctx.get("resources", _NO_RESOURCES)
    if type(resources) not in _ARRAYS:
        return None
    for resource in resources:
        if type(resource) is not str:
            return None
    if (
        type(tctx.get("classification", "")) is not str
        or type(tctx.get("environment", "")) is not str
        or type(tctx.get("elevated", False)) is not bool
    ):
        return None
    obo = get("obo")
    if obo is not None and (type(obo) is not str or not obo):
        return None
    parent = get("parent_txn")
    if parent is not None and (type(parent) is not str or not parent):
        return None
    act = get("act")
    depth = 0
    while act is not None:
        depth += 1
        if type(act) not in _OBJECTS or depth > _MAX_ACT_DEPTH:
            return None
        actor = act.get("sub")
        if type(actor) is not str or not actor:
            return None
        act = act.get("act")
    return tuple(granted.split())


class Caller:
    """A verified caller. ``jwt`` is set for a bearer JWT-SVID, ``x509`` for an mTLS peer.

    ``task`` is the typed ``TaskClaims`` of a task token (None otherwise), read on first use
    (a request that never looks does not pay for it); reading a malformed task token raises
    TaskClaimsError, a VerificationError, and scope checks refuse it.
    """

    __slots__ = ("_scope", "_task", "audience", "jwt", "spiffe_id", "x509")

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
        self._task: TaskClaims | None = _UNREAD if jwt is not None else None
        self._scope: tuple[str, ...] | None = _UNREAD if jwt is not None else None

    @property
    def task(self) -> TaskClaims | None:
        """Raises TaskClaimsError (a VerificationError) for a malformed task token."""
        task = self._task
        if task is _UNREAD:
            assert self.jwt is not None
            task = self._task = task_claims(self.jwt)
        return task

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
        """The task of a task token (its ``txn``), without reading the rest of its claims."""
        txn = self.claims.get("txn")
        return txn if isinstance(txn, str) and txn else None

    def _quick_scope(self) -> tuple[str, ...] | None:
        """The scope tokens of a plain task token whose claims were not read yet (per request on
        the adapters' path: no full claims read); None when the full read has to decide. Read
        once per Caller (an adapter keeps one per cached token)."""
        tokens = self._scope
        if tokens is _UNREAD:
            tokens = self._scope = self._read_quick_scope()
        return tokens

    def _read_quick_scope(self) -> tuple[str, ...] | None:
        if self._task is not _UNREAD:
            return None
        jwt = self.jwt
        assert jwt is not None
        # The full read's audience check; the adapters' own audience always passes it.
        if self.audience and self.audience not in jwt.audience:
            return None
        claims = jwt.claims
        sub = claims.get("sub")  # str(jwt.spiffe_id), which was parsed from it exactly
        if type(sub) is not str:
            sub = str(jwt.spiffe_id)
        return _plain_task_scope(claims, sub)

    def grants(self, scope: str) -> bool:
        """Whether the caller's token grants one scope token: ``tool:<name>`` (that tool, or
        every tool through ``invoke_tool``) or an action. Only task tokens grant scopes."""
        tokens = self._quick_scope()
        decided = None if tokens is None else _decide(tokens, scope)
        if decided is not None:
            return decided
        try:
            task = self.task
        except VerificationError:  # a malformed task token grants nothing
            return False
        if task is None:
            return False
        audience = self.audience or None
        if scope.startswith(TOOL_SCOPE_PREFIX):
            return task.grants_tool(scope[len(TOOL_SCOPE_PREFIX) :], audience=audience)
        return task.allows(scope, audience=audience)

    def missing(self, scopes: tuple[str, ...]) -> tuple[str, ...]:
        """The scope tokens of ``scopes`` the caller's token does not grant."""
        if not scopes:
            return ()
        if len(scopes) == 1:  # one tool call per request, mostly: no generator
            return () if self.grants(scopes[0]) else scopes
        return tuple(s for s in scopes if not self.grants(s))

    def missing_tools(self, tools: tuple[str, ...]) -> tuple[str, ...]:
        """The scopes (``tool_scope(name)``) of the ``tools`` the caller's token does not grant:
        ``missing(tuple(map(tool_scope, tools)))``, ValueError included, without building and
        splitting each grant anew."""
        if not tools:
            return ()
        tokens = self._quick_scope()
        missing: tuple[str, ...] = ()
        for tool in tools:
            scope = TOOL_SCOPE_PREFIX + tool
            # Granted by name: a scope token has no whitespace, so tool_scope takes the name.
            if tokens is not None and tool and scope in tokens:
                continue
            tool_scope(tool)  # its ValueError for a name it refuses
            granted = None if tokens is None else _decide(tokens, scope)
            if not (self.grants(scope) if granted is None else granted):
                missing += (scope,)
        return missing
