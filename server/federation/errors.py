"""Federation errors (mapped to gRPC status in server/status.py)."""

from __future__ import annotations

from server.errors import ServerError
from server.input_text import shown


class FederationError(ServerError):
    """A foreign bundle could not be fetched, or was refused (wrong trust domain, bad chain).
    Its message often quotes the foreign endpoint (its status line, a certificate's names):
    made printable here, the one place every such message passes."""

    def __init__(self, message: str) -> None:
        super().__init__(shown(message))


class BundleNotStoredError(FederationError):
    """A foreign bundle passed every check but the datastore did not store it (an outage, or a
    value it refused): not the endpoint's fault nor the caller's, so retried with backoff."""
