"""OAuth errors (RFC 6749 §5.2, RFC 8693 §2.2.2, RFC 8707 §2): the `error` code and the HTTP
status each one is answered with. endpoint.py is the one place that turns them into responses.

Not SvidErrors: they never cross gRPC, and their messages go to the client as
`error_description`, so they never hold a token (only its jti or issuer).
"""

from __future__ import annotations

from server.audit.errors import SecretInAuditError
from server.audit.event import check_no_secret

# What a description becomes when a value it quotes from the request looks like a credential.
DROPPED = "a value of the request looks like a credential: not repeated here"


class OAuthError(Exception):
    error = "invalid_request"
    status = 400

    def __init__(self, description: str) -> None:
        # Descriptions quote what the client sent (a resource, a token type); one that sent a
        # token there must not get it echoed back, nor make the refusal's audit event, which
        # refuses such a value, fail.
        try:
            check_no_secret("error_description", description)
        except SecretInAuditError:
            description = DROPPED
        super().__init__(description)
        self.description = description


class InvalidRequestError(OAuthError):
    error = "invalid_request"


class InvalidGrantError(OAuthError):
    """The assertion or subject token is expired, replayed, from an unknown issuer, for
    another audience, or its task may not get this token."""

    error = "invalid_grant"


class InvalidTargetError(OAuthError):
    """The `resource` (RFC 8707) is not one this server issues tokens for."""

    error = "invalid_target"


class UnsupportedGrantTypeError(OAuthError):
    error = "unsupported_grant_type"


class UnsupportedResponseTypeError(OAuthError):
    error = "unsupported_response_type"


class InvalidClientError(OAuthError):
    error = "invalid_client"
    status = 401


class UnavailableError(OAuthError):
    """The server cannot issue now (no signing key, the audit log cannot be written)."""

    error = "temporarily_unavailable"
    status = 503


class RateLimitedError(OAuthError):
    """A task's agent spent its budget of task decisions (server.tasks.service TaskSettings,
    mint_pairs_*_per_agent) that its exchanges are charged to. RFC 6749 has no code of its own
    for it: temporarily_unavailable says to retry later, and 429 (RFC 6585) says why."""

    error = "temporarily_unavailable"
    status = 429


class InvalidScopeError(OAuthError):
    """The `scope` asked for (RFC 6749 §3.3) is malformed, or more than the grant gives."""

    error = "invalid_scope"
