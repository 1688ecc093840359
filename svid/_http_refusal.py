"""RFC 6750 refusals for HTTP adapters: 401 with a Bearer challenge (``invalid_token``, or none
when no credential came), 403 ``insufficient_scope`` naming the scope to ask for.

Descriptions come from VerificationError messages, which never hold a token; they are cut to
the characters RFC 6750 allows in a quoted ``error_description``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from svid._task_claims import MAX_SCOPE_CHARS, SCOPE_TOKEN

_MAX_DESCRIPTION = 300
INVALID_TOKEN = "invalid_token"  # noqa: S105 - an RFC 6750 error code
INSUFFICIENT_SCOPE = "insufficient_scope"
INVALID_REQUEST = "invalid_request"


def _quotable(text: str) -> str:
    # RFC 6750 section 3: %x20-21 / %x23-5B / %x5D-7E, so no quote, no backslash, ASCII only.
    clean = "".join(c for c in text if " " <= c <= "~" and c not in '"\\')
    return clean[:_MAX_DESCRIPTION]


def _challenge_scope(scope: str) -> str:
    """The scope-tokens of ``scope`` a client can ask for, whole, each once, as many as fit in
    MAX_SCOPE_CHARS (what svidd's token endpoint takes). A client asks the authorization server
    for exactly what the challenge names (the MCP scope challenge): a token cut at a character
    count, or stripped of the characters a quoted string cannot hold, named another tool
    (``tool:read`` of ``tool:read_all``), and the token it got for that was refused again. A
    token that is no scope-token cannot be asked for: it is left out (the body has it)."""
    named: list[str] = []
    size = -1
    for token in dict.fromkeys(scope.split(" ")):
        if SCOPE_TOKEN.fullmatch(token) is None:
            continue
        if size + 1 + len(token) > MAX_SCOPE_CHARS:
            break
        named.append(token)
        size += 1 + len(token)
    return " ".join(named)


@dataclass(frozen=True, slots=True)
class Refusal:
    """An HTTP refusal: its status, RFC 6750 error code ("" for a bare challenge) and details."""

    status: int
    error: str = ""
    description: str = ""
    scope: str = ""  # for insufficient_scope: what to ask for (space-separated scope tokens)

    def challenge(self, realm: str) -> str:
        params = [f'realm="{_quotable(realm)}"'] if realm else []
        if self.error:
            params.append(f'error="{self.error}"')
        if self.description:
            params.append(f'error_description="{_quotable(self.description)}"')
        if scope := _challenge_scope(self.scope):
            params.append(f'scope="{scope}"')
        return "Bearer " + ", ".join(params) if params else "Bearer"

    def body(self) -> bytes:
        doc = {"error": self.error or "unauthorized"}
        if self.description:
            doc["error_description"] = self.description
        if self.scope:
            doc["scope"] = self.scope
        return json.dumps(doc).encode()

    def headers(self, realm: str) -> list[tuple[bytes, bytes]]:
        return [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body())).encode()),
            (b"www-authenticate", self.challenge(realm).encode()),
            (b"cache-control", b"no-store"),
        ]


def no_credentials() -> Refusal:
    return Refusal(401, description="")


def invalid_token(why: str) -> Refusal:
    return Refusal(401, INVALID_TOKEN, why)


def several_credentials() -> Refusal:
    # RFC 6750 section 3.1: a request with more than one credential is invalid_request. Only
    # one of them is verified; an app or proxy reading another would trust what nobody checked.
    return Refusal(400, INVALID_REQUEST, "the request has more than one Authorization header")


def not_authorised(why: str) -> Refusal:
    return Refusal(403, INSUFFICIENT_SCOPE, why)


def insufficient_scope(scopes: tuple[str, ...]) -> Refusal:
    scope = " ".join(dict.fromkeys(scopes))  # a batch calling one tool twice needs it once
    return Refusal(403, INSUFFICIENT_SCOPE, f"this request needs scope {scope}", scope)
