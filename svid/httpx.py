"""httpx adapters (``pip install 'svidd[httpx]'``): a JWT-SVID bearer ``Auth``, and clients
for mutual TLS with ``svid.tls``.

    auth = svid.httpx.JwtAuth(task, "docs-api")        # a task's token (task.jwt), refreshed
    auth = svid.httpx.JwtAuth(svid.WorkloadApiClient(), "docs-api")   # this workload's own
    httpx.get("https://docs/api", auth=auth)

    with svid.X509Source() as source:
        client = svid.httpx.mtls_client(source, authorize="spiffe://example.org/docs")
        client.get("https://docs:8443/")               # rotating SVID, server ID checked in TLS

The same ``JwtAuth`` works with ``httpx.Client`` and ``httpx.AsyncClient`` (an asyncio task's
or client's token is awaited; a sync one is fetched off the event loop).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import Any

import httpx

from svid import tls
from svid._bearer_tokens import BearerTokens
from svid._clock import Clock
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._tls_authorize import Authorizer

__all__ = ["JwtAuth", "async_mtls_client", "mtls_client"]


class JwtAuth(httpx.Auth):
    """Sends ``Authorization: Bearer <JWT-SVID for audience>`` on every request.

    ``provider``: a task (``svid.tasks.Task`` / ``AsyncTask``: its ``jwt(audience)``), a
    ``WorkloadApiClient`` / ``AsyncWorkloadApiClient`` (this workload's own token, for
    ``spiffe_id`` if it has several; cached until half its lifetime), or a callable taking the
    audience and returning a token.
    """

    def __init__(
        self,
        provider: Any,
        audience: str,
        *,
        spiffe_id: SpiffeId | str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.tokens = BearerTokens(provider, audience, spiffe_id=spiffe_id, clock=clock)

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = f"Bearer {self.tokens.token()}"
        yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = f"Bearer {await self.tokens.atoken()}"
        yield request


def mtls_client(
    source: tls.SvidSource,
    authorize: Authorizer | SpiffeId | TrustDomain | str,
    **client_options: Any,
) -> httpx.Client:
    """An ``httpx.Client`` that presents the source's newest X.509-SVID and admits only servers
    ``authorize`` accepts (``svid.tls.client_context``; options such as ``spiffe_id=`` and
    ``max_revocation_staleness=`` go there, the rest to ``httpx.Client``)."""
    context_options = _context_options(client_options)
    ctx = tls.client_context(source, authorize, **context_options)
    return httpx.Client(verify=ctx, **client_options)


def async_mtls_client(
    source: tls.SvidSource,
    authorize: Authorizer | SpiffeId | TrustDomain | str,
    **client_options: Any,
) -> httpx.AsyncClient:
    """``mtls_client`` for asyncio: an ``httpx.AsyncClient``."""
    context_options = _context_options(client_options)
    ctx = tls.client_context(source, authorize, **context_options)
    return httpx.AsyncClient(verify=ctx, **client_options)


def _context_options(options: dict[str, Any]) -> dict[str, Any]:
    names = ("spiffe_id", "verifier", "max_revocation_staleness", "clock")
    return {name: options.pop(name) for name in names if name in options}
