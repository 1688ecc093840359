"""The agent's exception tree, rooted in svid's SvidError."""

from __future__ import annotations

from svid._errors import SvidError


class AgentError(SvidError):
    """Root of every error the node agent raises."""


class ConfigError(AgentError, ValueError):
    """A configuration key is missing or has a bad value; the message names the key."""


class AttestationError(AgentError):
    """Node attestation with the server failed."""


class ServerNotVerifiedError(AttestationError):
    """The server's certificate did not verify against the roots the agent attested with: the
    TLS handshake failed, so nothing (no join token) reached the server."""


class JoinTokenRefusedError(AttestationError):
    """The join token cannot attest the agent: the server refused it (never issued, expired or
    already used), or this agent spent it already. Only a new token helps; the message never
    holds the token."""


class ProcessGoneError(AgentError):
    """The calling process exited, or its pid now names another process."""


class NoIdentityError(AgentError):
    """The caller is entitled to no identity (or not to the one it asked for)."""


class NotReadyError(AgentError):
    """The agent has no SVIDs or bundle from the server yet."""


class BadRequestError(AgentError, ValueError):
    """The server refused a request as malformed (INVALID_ARGUMENT)."""
