"""Mutual TLS with SPIFFE identities, stdlib ``ssl`` only: contexts that present this workload's
newest X.509-SVID (rotated without restart) and admit a peer only once svid's verifier and your
authorizer accept its SPIFFE ID, before any application data is read or written.

    source = svid.X509Source().start()                    # $SPIFFE_ENDPOINT_SOCKET
    server_ctx = svid.tls.server_context(source, svid.TrustDomain("example.org"))
    client_ctx = svid.tls.client_context(source, "spiffe://example.org/billing")

Use them wherever an ``ssl.SSLContext`` goes: ``ctx.wrap_socket``, ``http.server`` (wrap the
listening socket), ``asyncio.start_server(ssl=ctx)`` / ``open_connection(ssl=ctx)``,
``httpx.Client(verify=ctx)``, ``urllib.request.urlopen(url, context=ctx)``.

The peer is verified by ``X509Verifier`` (chain to the bundle of the peer's own trust domain,
SPIFFE leaf rules, validity, revocation; OpenSSL's check of the same chain against every trusted
CA comes first). A refused peer gets no application data and none of its data reaches the caller:
the handshake raises ``PeerRefusedError`` (an ``ssl.SSLError``), and so does every later read or
write. A peer revoked while connected is refused at its next read or write; blocking sockets are
shut down at once. ``peer_of(conn)`` gives the verified peer of a connection.
"""

from __future__ import annotations

import ssl
import weakref
from collections.abc import Iterable
from typing import Any

from svid._clock import Clock
from svid._revocation import RevocationSet
from svid._source_state import RevocationEvent
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._tls_authorize import (
    Authorizer,
    as_authorizer,
    authorize_any,
    authorize_id,
    authorize_member_of,
    authorize_one_of,
)
from svid._tls_contexts import ContextFactory, RotatingContext, SvidSource
from svid._tls_gate import PeerPolicy, PeerRefusedError, peer_of
from svid._verify_x509 import X509Verifier

__all__ = [
    "Authorizer",
    "PeerRefusedError",
    "SvidSource",
    "authorize_any",
    "authorize_id",
    "authorize_member_of",
    "authorize_one_of",
    "client_context",
    "peer_of",
    "server_context",
]


def _context(
    source: SvidSource,
    authorize: Authorizer | SpiffeId | TrustDomain | str,
    *,
    server: bool,
    spiffe_id: SpiffeId | str | None,
    verifier: X509Verifier | None,
    max_revocation_staleness: float | None,
    clock: Clock | None,
    trust_domains: Iterable[TrustDomain | str] | None = None,
    federated: bool = False,
) -> ssl.SSLContext:
    authorizer = as_authorizer(authorize)
    revocations = getattr(source, "revocations", None)
    if not isinstance(revocations, RevocationSet):  # (an empty set is falsy: no `or` here)
        revocations = RevocationSet()
    if verifier is None:
        make = getattr(source, "x509_verifier", None)
        if make is None:
            raise TypeError("pass verifier= for a source without x509_verifier()")
        options: dict[str, Any] = {"max_revocation_staleness": max_revocation_staleness}
        if trust_domains is not None or federated:
            options.update(trust_domains=trust_domains, federated=federated)
        if clock is not None:
            options["clock"] = clock
        verifier = make(**options)
    elif max_revocation_staleness is not None or trust_domains is not None or federated:
        raise TypeError(
            "max_revocation_staleness, trust_domains and federated go to the verifier you "
            "pass, not here"
        )
    policy = PeerPolicy(verifier, authorizer, revocations)
    on_revoked = getattr(source, "on_revoked", None)
    if on_revoked is not None:
        _subscribe_weakly(on_revoked, policy)
    factory = ContextFactory(source, policy, server=server, spiffe_id=spiffe_id)
    return RotatingContext(factory, server)


def _subscribe_weakly(on_revoked: Any, policy: PeerPolicy) -> None:
    """Subscribe ``policy`` to the source's revocations for as long as its contexts live: a
    source outlives the contexts made from it, and must not keep every one of them alive."""
    method = weakref.WeakMethod(policy.on_revoked)
    unsubscribe: list[Any] = []

    def forward(event: RevocationEvent) -> None:
        target = method()
        if target is None:
            for undo in unsubscribe:
                undo()
            return
        target(event)

    unsubscribe.append(on_revoked(forward))


def server_context(
    source: SvidSource,
    authorize: Authorizer | SpiffeId | TrustDomain | str,
    *,
    spiffe_id: SpiffeId | str | None = None,
    verifier: X509Verifier | None = None,
    max_revocation_staleness: float | None = None,
    clock: Clock | None = None,
    trust_domains: Iterable[TrustDomain | str] | None = None,
    federated: bool = False,
) -> ssl.SSLContext:
    """A server context: requires a client certificate and admits the clients ``authorize``
    accepts (a SPIFFE ID, a TrustDomain, or an Authorizer such as ``authorize_one_of``).

    It presents the source's default SVID (or the one for ``spiffe_id``), always the newest.
    ``max_revocation_staleness``: refuse every new peer while the source's revocation data is
    older than this many seconds (the agent is down). Peers of a federated trust domain are
    admitted only when named in ``trust_domains`` (or with ``federated=True``: every trust
    domain the agent gives this workload a bundle of), and ``authorize`` accepts them.
    ``verifier`` replaces the one made from the source (then set its options there).
    """
    return _context(
        source,
        authorize,
        server=True,
        spiffe_id=spiffe_id,
        verifier=verifier,
        max_revocation_staleness=max_revocation_staleness,
        clock=clock,
        trust_domains=trust_domains,
        federated=federated,
    )


def client_context(
    source: SvidSource,
    authorize: Authorizer | SpiffeId | TrustDomain | str,
    *,
    spiffe_id: SpiffeId | str | None = None,
    verifier: X509Verifier | None = None,
    max_revocation_staleness: float | None = None,
    clock: Clock | None = None,
    trust_domains: Iterable[TrustDomain | str] | None = None,
    federated: bool = False,
) -> ssl.SSLContext:
    """A client context: presents the source's newest SVID and admits the servers ``authorize``
    accepts. Host names are not checked: the server's SPIFFE ID is what is authorised."""
    return _context(
        source,
        authorize,
        server=False,
        spiffe_id=spiffe_id,
        verifier=verifier,
        max_revocation_staleness=max_revocation_staleness,
        clock=clock,
        trust_domains=trust_domains,
        federated=federated,
    )
