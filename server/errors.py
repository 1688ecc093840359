"""The server's domain errors. server/status.py is the one place that turns them into gRPC codes."""

from __future__ import annotations

from svid._errors import SvidError


class ServerError(SvidError):
    """Root of the errors the server's handlers raise on purpose."""


class InvalidRequestError(ServerError, ValueError):
    """The request is malformed; the message names the field and the rule."""


class NotFoundError(ServerError, LookupError):
    """The named entry or agent does not exist."""


class AlreadyExistsError(ServerError):
    """An equal record exists already."""


class PermissionDeniedError(ServerError):
    """The caller is known but may not do this (not entitled, banned, bad token)."""


class UnauthenticatedError(ServerError):
    """The caller presented no usable credential (no agent SVID on this port)."""


class RateLimitedError(ServerError):
    """The caller exceeded its rate limit."""


class UnavailableError(ServerError):
    """The server cannot serve this right now (starting, shutting down)."""


class ConfigError(ServerError, ValueError):
    """The configuration is invalid; the message names the key."""


class CliError(ServerError):
    """A failed svid-server command (usage, connection), printed as one line; never raised by a
    handler."""
