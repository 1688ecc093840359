"""One federation block for the server: the foreign-bundle service and our bundle endpoint.

server/app.py builds it once (`Federation.build`), starts it after the state is loaded, runs
its loops and stops it; nothing else here is wired from outside.
"""

from __future__ import annotations

import asyncio
import logging

from server.audit.log import AuditLog
from server.ca.manager import CaManager
from server.config import ServerConfig
from server.datastore.base import DataStore
from server.errors import ConfigError
from server.federation.endpoint import BundleHandler, SvidContext, keep_renewed, web_context
from server.federation.service import FederationService, parse_static
from server.oauth.admission import ConnectionCaps, ConnectionMetrics
from server.oauth.http import HttpListener
from server.state import ServerState
from svid._clock import Clock
from svid._daemon_config import listening

_log = logging.getLogger("svid.server.federation")
BUNDLE_PATH = "/"


class Federation:
    def __init__(
        self,
        config: ServerConfig,
        service: FederationService,
        svid: SvidContext | None,
        clock: Clock,
        connection_metrics: ConnectionMetrics | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._connection_metrics = connection_metrics
        self.service = service
        self._svid = svid
        self._listener: HttpListener | None = None
        self._handler: BundleHandler | None = None
        self.endpoint_port = 0

    @classmethod
    def build(
        cls,
        config: ServerConfig,
        *,
        state: ServerState,
        datastore: DataStore,
        audit: AuditLog,
        ca: CaManager,
        clock: Clock,
        holder: str = "",
        connection_metrics: ConnectionMetrics | None = None,
    ) -> Federation:
        """``connection_metrics``: what the bundle endpoint reports of its connections."""
        static = tuple(
            parse_static(t, config.trust_domain) for t in config.federation_relationships
        )
        service = FederationService(
            own=config.trust_domain,
            datastore=datastore,
            audit=audit,
            clock=clock,
            publish=state.set_foreign_bundles,
            static=static,
            holder=holder,
            min_refresh=config.federation_min_refresh,
        )
        svid = None
        if config.bundle_endpoint_address and config.bundle_endpoint_profile == "https_spiffe":
            svid = SvidContext(ca, clock, config.server_svid_ttl)
        self = cls(config, service, svid, clock, connection_metrics)
        self._handler = BundleHandler(lambda: state.bundle, config.bundle_endpoint_refresh_hint)
        return self

    async def start(self) -> None:
        self.service.load()
        cfg = self._config
        if not cfg.bundle_endpoint_address:
            return
        if self._svid is not None:
            await asyncio.to_thread(self._svid.maybe_renew)
            context = self._svid.context
        else:
            assert cfg.bundle_endpoint_cert is not None
            assert cfg.bundle_endpoint_key is not None
            context = web_context(cfg.bundle_endpoint_cert, cfg.bundle_endpoint_key)
        self._listener = HttpListener(
            context,
            caps=ConnectionCaps(cfg.http_max_connections, cfg.http_max_connections_per_host),
            name="bundle_endpoint",
            clock=self._clock,
            metrics=self._connection_metrics,
        )
        assert self._handler is not None
        self._listener.mount(BUNDLE_PATH, self._handler)
        host, _, port = cfg.bundle_endpoint_address.rpartition(":")
        with listening("bundle_endpoint_address", cfg.bundle_endpoint_address, ConfigError):
            self.endpoint_port = await self._listener.start(host.strip("[]"), int(port))
        _log.info(
            "bundle endpoint serving",
            extra={
                "address": cfg.bundle_endpoint_address,
                "profile": cfg.bundle_endpoint_profile,
                "max_connections": cfg.http_max_connections,
                "max_connections_per_host": cfg.http_max_connections_per_host,
            },
        )

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self.service.run(stop), name="federation-refresh")]
        if self._svid is not None and self._listener is not None:
            tasks.append(
                asyncio.create_task(keep_renewed(self._svid, stop), name="bundle-endpoint-svid")
            )
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def stop(self) -> None:
        # Another server takes the scheduled fetches over at once, not when the leases lapse.
        await asyncio.to_thread(self.service.release_leases)
        self.service.close()
        if self._listener is not None:
            await self._listener.stop()
