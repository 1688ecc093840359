"""Federation errors (mapped to gRPC status in server/status.py)."""

from __future__ import annotations

from server.errors import ServerError


class FederationError(ServerError):
    """A foreign bundle could not be fetched, or was refused (wrong trust domain, bad chain)."""


class BundleNotStoredError(FederationError):
    """A foreign bundle passed every check but the datastore did not store it (an outage, or a
    value it refused): not the endpoint's fault nor the caller's, so retried with backoff."""
