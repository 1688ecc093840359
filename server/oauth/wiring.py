"""Builds the OIDC/OAuth listener for server/app.py: `oauth = build(...)`, `await
oauth.start()`, `oauth.bundle_changed()` on rotation, `await oauth.stop()`."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.serialization import load_der_public_key

from server.ca.manager import CaManager
from server.datastore.base import DataStore
from server.datastore.records import JWT_KIND
from server.ledger import Ledger
from server.oauth import discovery
from server.oauth.admission import ConnectionMetrics
from server.oauth.assertions import LEEWAY, AssertionChecker
from server.oauth.discovery import (
    AS_METADATA_PATH,
    AUTHORIZE_PATH,
    JWKS_PATH,
    OIDC_PATH,
    TOKEN_PATH,
)
from server.oauth.endpoint import authorize, document, static_document, token_endpoint
from server.oauth.grants import Grants, ResourceWorkload, TaskExchanges
from server.oauth.http import HttpListener
from server.oauth.issuers import Audit, DiscoveredIssuers
from server.oauth.jwks import PublishedKey, cache_max_age, jwks_document
from server.oauth.replay import ReplayGuard
from server.oauth.settings import OAuthSettings
from server.oauth.trusted import TrustedBundles
from server.oauth.workers import Workers
from server.refusal_budget import RefusalBudget
from svid._bundle import JwtBundle
from svid._clock import Clock
from svid._errors import JwtSvidError, SpiffeIdError
from svid._jose import PublicKey, alg_for_key
from svid._jwt import split_and_check_header
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._verify_access import AccessTokenVerifier
from svid._waits import set_within

_log = logging.getLogger("svid.server.oauth")
PRUNE_INTERVAL = 60.0
ISSUER_TICK = 1.0  # how often the trusted issuers' due times are looked at (a clock read)
GRANT_THREADS = 64


def server_ssl_context(settings: OAuthSettings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
    return ctx


@dataclass
class OAuthService:
    settings: OAuthSettings
    listener: HttpListener
    ca: CaManager
    clock: Clock
    trusted: TrustedBundles
    datastore: DataStore
    replay: ReplayGuard
    workers: Workers
    issuers: DiscoveredIssuers
    _jwks: bytes = b'{"keys":[]}'
    port: int = 0

    def bundle_changed(self) -> None:
        keys = []
        for slot in self.ca.key_slots(JWT_KIND):
            key = load_der_public_key(slot.public_der)
            keys.append(PublishedKey(slot.kid, key, slot.not_after))  # type: ignore[arg-type]
        self._jwks = jwks_document(keys, self.clock.now())

    def jwks(self) -> tuple[bytes, int]:
        return self._jwks, cache_max_age(self.settings.jwt_key_ttl)

    async def start(self) -> int:
        self.bundle_changed()
        self.port = await self.listener.start(self.settings.host, self.settings.port)
        caps = self.settings.connection_caps
        _log.info(
            "OIDC/OAuth listening",
            extra={
                "issuer": self.settings.issuer,
                "port": self.port,
                "max_connections": caps.total,
                "max_connections_per_host": caps.per_host,
            },
        )
        return self.port

    async def stop(self) -> None:
        await self.listener.stop()
        self.workers.close()
        self.issuers.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the trusted issuers' keys fresh, and forget replay records of assertions that
        expired (they cannot be presented again)."""
        if self.issuers:
            await asyncio.gather(self._prune(stop), self._refresh_issuers(stop))
        else:
            await self._prune(stop)

    async def _refresh_issuers(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.issuers.refresh_due)
            except Exception:  # a bug, not a fetch failure (those are logged and retried)
                _log.exception("refreshing the trusted issuers' keys failed; retrying later")
            await set_within(stop, ISSUER_TICK)

    async def _prune(self, stop: asyncio.Event) -> None:
        while True:
            await set_within(stop, PRUNE_INTERVAL)
            if stop.is_set():
                return
            now = int(self.clock.now())
            self.replay.prune(now)
            try:
                await asyncio.to_thread(self.datastore.prune_jtis, now)
            except Exception:
                _log.exception("pruning expired assertion jtis failed; retrying later")


def build(
    settings: OAuthSettings,
    *,
    ca: CaManager,
    datastore: DataStore,
    ledger: Ledger,
    tasks: TaskExchanges,
    clock: Clock,
    audit: Audit | None = None,
    revoked: Callable[[str], bool] = lambda jti: False,
    refusals: RefusalBudget | None = None,
    connection_metrics: ConnectionMetrics | None = None,
) -> OAuthService:
    """``audit``: AuditLog.append, for events of the service's own (trusted issuers' keys);
    ``revoked``: whether a JWT ``jti`` is revoked (a delegation's subject token);
    ``refusals``: which of a client's refusals are written to the audit log (None: all);
    ``connection_metrics``: what the listener reports of its connections."""
    own = ca.trust_domain
    replay = ReplayGuard()
    trusted = TrustedBundles(settings.trusted)
    issuers = DiscoveredIssuers(settings.issuers, clock, settings.issuers_ca, audit=audit)
    known_issuers: dict[str, TrustDomain] = {
        settings.issuer: own,
        **trusted.issuers(),
        **issuers.issuers(),
    }

    # One JwtBundle per published bundle: the verifier keeps its key checks while it is the same
    # object.
    memo: list[object] = [None, None]

    def bundles(td: TrustDomain) -> JwtBundle | None:
        if td != own:
            return trusted.get(td) or issuers.get(td)
        current = ca.bundle()
        if memo[0] is not current:
            memo[0], memo[1] = current, current.jwt_bundle()
        return memo[1]  # type: ignore[return-value]

    def refused(token: str) -> None:
        # A discovered issuer may have rotated to a key not fetched yet: read the token only
        # for its trust domain and key id (it is refused either way).
        try:
            split = split_and_check_header(token)
            sub = split.claims.get("sub")
            td = SpiffeId.parse(sub).trust_domain if isinstance(sub, str) else None
        except (JwtSvidError, SpiffeIdError):
            return
        if td is not None:
            issuers.key_wanted(td, split.kid)

    checker = AssertionChecker(
        bundles=bundles,
        audiences=(settings.issuer, settings.issuer + TOKEN_PATH),
        known_issuers=known_issuers,
        reserve_jti=replay.reserve,
        revoked=revoked,
        clock=clock,
        on_refused=refused if issuers else None,
    )
    # Delegation: each resource's workload acts only for this issuer's tokens for it (checked
    # uncached: each is presented once, with an actor token used once).
    workloads = {
        resource: ResourceWorkload(
            workload,
            AccessTokenVerifier(
                bundles,
                issuer=settings.issuer,
                audience=resource,
                trust_domain=own,
                clock=clock,
                leeway=LEEWAY,
                cache_size=0,
            ),
        )
        for resource, workload in settings.resource_workloads.items()
    }

    def minted_through(jti: str, expires_at: int, spiffe_id: str) -> str:
        credential = datastore.workload_jwt(jti, expires_at, spiffe_id)
        return "" if credential is None else credential.agent_id

    grants = Grants(
        checker=checker,
        signer=ca.jwt_signer,
        recorder=ledger,
        replay=replay,
        tasks=tasks,
        resources=settings.resources,
        trust_domain=own.name,
        access_token_ttl=settings.access_token_ttl,
        clock=clock,
        workloads=workloads,
        revoked=revoked,
        minted_through=minted_through,
        budget=refusals,
    )
    listener = HttpListener(
        server_ssl_context(settings),
        caps=settings.connection_caps,
        name="oauth",
        clock=clock,
        metrics=connection_metrics,
    )
    # Grants block on the ledger's commit, holding no GIL while they wait: enough threads that
    # every request in flight joins the commit under way (the default executor has cpus+4).
    workers = Workers(GRANT_THREADS, "oauth-grant")
    service = OAuthService(
        settings, listener, ca, clock, trusted, datastore, replay, workers, issuers
    )
    algs = sorted({alg_for_key(_public(ca)), "ES256"})
    listener.mount(
        OIDC_PATH, static_document(discovery.openid_configuration(settings.issuer, algs))
    )
    listener.mount(
        AS_METADATA_PATH,
        static_document(discovery.authorization_server_metadata(settings.issuer, algs)),
    )
    listener.mount(JWKS_PATH, document(service.jwks))
    listener.mount(TOKEN_PATH, token_endpoint(grants, workers))
    listener.mount(AUTHORIZE_PATH, authorize)
    return service


def _public(ca: CaManager) -> PublicKey:
    slot = ca.key_slots(JWT_KIND)[0]
    return load_der_public_key(slot.public_der)  # type: ignore[return-value]
