"""Federation errors (mapped to gRPC status in server/status.py)."""

from __future__ import annotations

from server.errors import ServerError


class FederationError(ServerError):
    """A foreign bundle could not be fetched, or was refused (wrong trust domain, bad chain)."""
