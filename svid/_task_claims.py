"""The claims of a task JWT-SVID, typed (docs/claims.md is the schema).

A task token is a JWT-SVID whose ``sub`` is ``<runtime ID>/task/<txn>`` and which carries
``txn``. Everything here reads claims of a token that was already verified (or came from the
agent); it checks their shape and fails closed on one that claims to be a task token but is
malformed, so a handler never acts on half-read task context.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from svid._errors import SpiffeIdError, VerificationError
from svid._spiffe_id import SpiffeId

TASK_PATH = "/task/"
# A granted tool in `scope`; any other scope token is an action (read, invoke_tool, ...).
TOOL_SCOPE_PREFIX = "tool:"
# The action that grants every tool of the audience.
INVOKE_TOOL = "invoke_tool"
# RFC 8693 `act` nests one level per delegation; the server caps delegation depth far below.
_MAX_ACT_DEPTH = 32
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), printable ASCII but a
# double quote and a backslash (RFC 6750 section 3 quotes the same in a challenge).
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
# The longest scope svidd's token endpoint takes: far above any grant a task decision makes,
# low enough that a request cannot make each refusal's description and audit event carry
# kilobytes. A challenge names no more than a client can ask for.
MAX_SCOPE_CHARS = 2048


class TaskClaimsError(VerificationError):
    """A token claims to be a task token (it has ``txn``) but its task claims are malformed."""


class _HasClaims(Protocol):
    @property
    def spiffe_id(self) -> SpiffeId: ...

    @property
    def claims(self) -> Mapping[str, Any]: ...

    @property
    def audience(self) -> tuple[str, ...]: ...


def tool_scope(tool: str) -> str:
    """The scope token that grants ``tool``: what a tool server names in an
    ``insufficient_scope`` answer, and what a task then asks for."""
    if tool.split() != [tool]:  # empty, or has whitespace (str.split splits on isspace())
        raise ValueError(f"tool name {tool[:200]!r} is empty or has whitespace")
    return f"{TOOL_SCOPE_PREFIX}{tool}"


def tools_from_scope(scope: str) -> tuple[str, ...]:
    """The tool names a scope string grants or asks for ("tool:a tool:b read" -> ("a", "b"))."""
    return tuple(
        t.removeprefix(TOOL_SCOPE_PREFIX)
        for t in scope.split()
        if t.startswith(TOOL_SCOPE_PREFIX) and len(t) > len(TOOL_SCOPE_PREFIX)
    )


@dataclass(frozen=True, slots=True)
class TaskClaims:
    """What a task token says about the task it was minted for.

    ``scope`` is the token's own grant for its audiences: ``actions`` (e.g. ``read``;
    ``invoke_tool`` means every tool) and ``tools`` (one tool each). ``delegation_chain`` is
    the RFC 8693 ``act`` chain flattened, the current actor (this task) first, then each task
    that delegated to it; ``on_behalf_of`` is the principal they all work for (``obo``).
    """

    spiffe_id: SpiffeId
    runtime_id: SpiffeId
    task_id: str
    audience: tuple[str, ...]
    scope: tuple[str, ...]
    actions: frozenset[str]
    tools: frozenset[str]
    on_behalf_of: str | None
    delegation_chain: tuple[str, ...]
    parent_task_id: str | None
    elevated: bool
    classification: str
    environment: str
    resources: tuple[str, ...]

    is_task = True  # a class constant: a non-task token has no TaskClaims at all

    @property
    def scope_string(self) -> str:
        return " ".join(self.scope)

    def allows(self, action: str, audience: str | None = None) -> bool:
        """Whether the token grants ``action`` (on ``audience``, if given: one of its own)."""
        if audience is not None and audience not in self.audience:
            return False
        return action in self.actions

    def grants_tool(self, tool: str, audience: str | None = None) -> bool:
        """Whether the token may call ``tool`` (on ``audience``, if given: one of its own).

        True when the tool is granted by name or every tool of the audience is
        (``invoke_tool``). When False, answer ``insufficient_scope`` with ``tool_scope(tool)``.
        """
        if audience is not None and audience not in self.audience:
            return False
        return tool in self.tools or INVOKE_TOOL in self.actions

    def required_scope(self, tool: str) -> str:
        """The scope to ask for to call ``tool`` ("" when this token already grants it)."""
        return "" if self.grants_tool(tool) else tool_scope(tool)


def _str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise TaskClaimsError(f"task token claim {name!r} is not a non-empty string")
    return value


def act_chain(act: object, what: str = "task token") -> tuple[str, ...]:
    """An RFC 8693 ``act`` claim flattened, the current actor first (() for none)."""
    chain: list[str] = []
    while act is not None:
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
            raise TaskClaimsError(f"{what} claim 'act' is not an RFC 8693 actor chain")
        if len(chain) >= _MAX_ACT_DEPTH:
            raise TaskClaimsError(f"{what} claim 'act' nests deeper than {_MAX_ACT_DEPTH}")
        chain.append(act["sub"])
        act = act.get("act")
    return tuple(chain)


def task_claims(token: _HasClaims) -> TaskClaims | None:
    """The task claims of a verified JWT-SVID (``VerifiedJwt`` or ``JwtSvid``), or None for a
    token that is not a task token. Raises TaskClaimsError when it claims to be one but its
    claims are malformed."""
    claims = token.claims
    if "txn" not in claims:
        return None
    txn = claims["txn"]
    if not isinstance(txn, str) or not txn:
        raise TaskClaimsError("task token claim 'txn' is not a non-empty string")
    sid = token.spiffe_id
    suffix = f"{TASK_PATH}{txn}"
    path = sid.path
    if not path.endswith(suffix) or len(path) == len(suffix):
        raise TaskClaimsError(f"task token 'sub' {sid} is not a task ID for txn {txn!r}")
    try:
        runtime_id = SpiffeId.parse(str(sid)[: -len(suffix)])
    except SpiffeIdError as exc:
        raise TaskClaimsError(f"task token 'sub' {sid} names no runtime ID: {exc}") from None
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise TaskClaimsError("task token claim 'scope' is not a string")
    tokens = tuple(scope.split())
    tctx = claims.get("tctx", {})
    if not isinstance(tctx, dict):
        raise TaskClaimsError("task token claim 'tctx' is not an object")
    resources = tctx.get("resources", [])
    if not isinstance(resources, list) or not all(isinstance(r, str) for r in resources):
        raise TaskClaimsError("task token claim 'tctx.resources' is not a list of strings")
    classification = tctx.get("classification", "")
    environment = tctx.get("environment", "")
    elevated = tctx.get("elevated", False)
    if not isinstance(classification, str) or not isinstance(environment, str):
        raise TaskClaimsError("task token claims 'tctx.classification/environment' not strings")
    if not isinstance(elevated, bool):
        raise TaskClaimsError("task token claim 'tctx.elevated' is not a boolean")
    return TaskClaims(
        spiffe_id=sid,
        runtime_id=runtime_id,
        task_id=txn,
        audience=tuple(token.audience),
        scope=tokens,
        actions=frozenset(t for t in tokens if not t.startswith(TOOL_SCOPE_PREFIX)),
        tools=frozenset(tools_from_scope(scope)),
        on_behalf_of=_str(claims, "obo"),
        delegation_chain=act_chain(claims.get("act")),
        parent_task_id=_str(claims, "parent_txn"),
        elevated=elevated,
        classification=classification,
        environment=environment,
        resources=tuple(resources),
    )
