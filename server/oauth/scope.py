"""The `scope` a token request asks for (RFC 6749 §3.3, RFC 8693 §2.1), and what of a task's
grant it leaves: absent, the whole grant; present, exactly the tokens asked for, each of which
the grant must give (a tool by its own `tool:<name>` or by `invoke_tool`, an action by itself).

This is how a client answered `insufficient_scope` by a tool server (the MCP scope challenge)
asks for the tool it was refused, and how one that needs less than its task's grant asks for
less.
"""

from __future__ import annotations

from collections.abc import Mapping

from server.oauth.errors import InvalidRequestError, InvalidScopeError
from svid._task_claims import (
    INVOKE_TOOL,
    MAX_SCOPE_CHARS,
    SCOPE_TOKEN,
    TOOL_SCOPE_PREFIX,
)

# What a refusal quotes of the tokens not granted.
_NAMED_CHARS = 300


def requested_scope(params: Mapping[str, list[str]]) -> tuple[str, ...] | None:
    """The scope tokens asked for, in order, once each; None when no `scope` was sent."""
    values = params.get("scope")
    if values is None:
        return None
    if len(values) != 1:
        raise InvalidRequestError("scope: at most one value is allowed")
    scope = values[0]
    if len(scope) > MAX_SCOPE_CHARS:
        raise InvalidScopeError(f"scope is longer than {MAX_SCOPE_CHARS} characters")
    tokens = scope.split(" ")
    for token in tokens:
        if not SCOPE_TOKEN.fullmatch(token):
            raise InvalidScopeError(
                "scope must be scope-tokens separated by single spaces (RFC 6749 §3.3), each "
                f"printable ASCII other than '\"' and '\\': {token[:100]!r} is not one"
            )
    return tuple(dict.fromkeys(tokens))


def narrowed(granted: str, asked: tuple[str, ...], resource: str) -> str:
    """The scope to issue of the ``granted`` one when ``asked`` for these tokens; raises
    InvalidScopeError naming those the grant does not give."""
    have = set(granted.split())
    every_tool = INVOKE_TOOL in have

    def given(token: str) -> bool:
        if token in have:
            return True
        return every_tool and token.startswith(TOOL_SCOPE_PREFIX) and token != TOOL_SCOPE_PREFIX

    missing = [t for t in asked if not given(t)]
    if missing:
        named = " ".join(missing)
        if len(named) > _NAMED_CHARS:
            named = named[:_NAMED_CHARS] + "..."
        raise InvalidScopeError(f"scope not granted to the task for {resource[:200]}: {named}")
    return " ".join(asked)
