"""The one place the agent's components are built and wired together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from agent_attestor.agent_store import AgentStore
from agent_attestor.cache import Cache
from agent_attestor.cancel import cancel_all
from agent_attestor.checkpoint_store import CheckpointStore
from agent_attestor.config import AgentConfig
from agent_attestor.endpoint import WorkloadEndpoint
from agent_attestor.errors import ConfigError
from agent_attestor.health import HealthServicer
from agent_attestor.jwt_answers import split_budget
from agent_attestor.jwt_cache import JwtCache
from agent_attestor.metrics import Metrics, MetricsHttpServer
from agent_attestor.mint_budget import MintBudget
from agent_attestor.model import TrustBundle
from agent_attestor.node_client import insecure_fetch_server_root, load_x509pop
from agent_attestor.peer import CallerRegistry
from agent_attestor.private_dir import release, resolve_private_dir
from agent_attestor.relay import RelaySettings
from agent_attestor.rotation import Rotator
from agent_attestor.state_store import StateStore, trust_domain_of
from agent_attestor.state_writer import StateWriter
from agent_attestor.stream_budget import StreamBudget
from agent_attestor.sync import Syncer, SyncSettings
from agent_attestor.tasks.wiring import build_task_layer
from agent_attestor.workload_api import WorkloadApi
from agent_attestor.workload_attestor import ExeHashCache, UnixAttestor
from agent_attestor.workload_client import socket_uri
from svid._clock import Clock, SystemClock
from svid._daemon_config import listening
from svid._der import load_pem_certs
from svid._errors import SvidParseError
from svid._runtime_file import RuntimeFile
from svid._stop_signals import stop_on_signals

log = logging.getLogger(__name__)
HEALTH_SERVICE = "svid.agent"
# Seconds a stop waits for an attestation in flight: its join token is already spent.
ATTEST_SETTLE = 10.0
# Seconds a stop gives the last ValidateJWTSVID reports to reach the server's audit log.
REPORT_SETTLE = 5.0
# Seconds a stop gives the health service to say NOT_SERVING: it waits on no caller, but no
# step of the stop may hang on one (grpcio's own servicer did, behind a stalled Watch).
HEALTH_SETTLE = 1.0


def bootstrap_roots(config: AgentConfig) -> bytes:
    if config.trust_bundle is not None:
        try:
            pem = config.trust_bundle.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"trust_bundle: cannot read {config.trust_bundle}: {exc.strerror or exc}"
            ) from None
        # Checked here: a file with no certificate (empty, the wrong file) ran on, retrying
        # with "no trust bundle to verify the server" or "no trust bundle this agent has
        # verifies the server's certificate", as if the server's CA had been replaced.
        try:
            load_pem_certs(pem)
        except SvidParseError as exc:
            raise ConfigError(f"trust_bundle: {config.trust_bundle}: {exc}") from None
        return pem
    if config.insecure_bootstrap:
        log.warning(
            "INSECURE BOOTSTRAP: trusting whatever server answers at first contact; "
            "use --trust-bundle outside a local demo"
        )
        # Demo only, so one server is enough: every server presents the same trust domain's CA.
        return insecure_fetch_server_root(config.server_attest_addresses[0])
    return b""


@dataclass(frozen=True)
class RuntimeInfo(RuntimeFile):
    """The agent's runtime file (svid/_runtime_file.py: written as the server's is)."""

    socket_path: str
    metrics_address: str
    pid: int


class AgentApp:
    def __init__(self, config: AgentConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.metrics = Metrics()
        self.cache = Cache(self.clock)
        self.registry = CallerRegistry()
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = AgentStore(config.agent_svid_path, config.agent_key_path, config.bundle_path)
        # The server's audit checkpoints: a copy kept here, outside the server's reach.
        self.checkpoints = CheckpointStore(
            config.audit_checkpoint_path,
            on_refused=lambda reason: self.metrics.checkpoints_refused.labels(reason=reason).inc(),
            clock=self.clock,
            min_prune_age=config.audit_prune_min_age_days * 86400.0,
        )
        x509pop = (
            load_x509pop(config.x509pop_cert, config.x509pop_key)
            if config.x509pop_cert is not None and config.x509pop_key is not None
            else None
        )
        self.syncer = Syncer(
            SyncSettings(
                servers=config.servers,
                trust_domain=config.trust_domain,
                join_token=config.join_token,
                x509pop=x509pop,
                bootstrap_root_pem=b"",
                reconnect_min=config.reconnect_min,
                reconnect_max=config.reconnect_max,
                connect_timeout=config.connect_timeout,
            ),
            self.store,
            self.cache,
            self.clock,
            on_change=self._on_sync_event,
            on_checkpoint=self.checkpoints.offer,
        )
        self.state = StateStore(config.state_path)
        # Read once here: one the agent cannot read (a directory at its name) stops the start
        # with its path, where the Sync loop retried it for ever (DataFileUnreadableError).
        self.store.load_bundle()
        self._restore()
        self.state_writer = StateWriter(self.state, self.cache, lambda: self.syncer.position)
        # Built after the restore: it takes on the restored SVIDs (and their renewals).
        self.rotator = Rotator(
            self.cache, self.syncer, self.clock, max_prefetched=config.max_prefetched_svids
        )
        # One byte budget for the tokens and the FetchJWTSVID answers built from them.
        token_bytes, answer_bytes = split_budget(config.jwt_cache_max_bytes)
        self.jwts = JwtCache(self.syncer, self.clock, config.jwt_cache_size, token_bytes)
        # A token whose key left the bundle verifies nowhere: minted again at the next fetch.
        self.cache.on_jwt_keys_lost(self.jwts.forget_kids)
        # Every stream on the Workload API socket counts against its uid's one budget.
        streams = StreamBudget(self.clock, config.max_streams_per_uid)
        mints = MintBudget(
            self.clock, config.jwt_mints_per_uid_rate, config.jwt_mints_per_uid_burst
        )
        # The task layer (issue 6): Tasks and Revocations services on the same socket.
        self.task_layer = build_task_layer(
            cache=self.cache,
            registry=self.registry,
            jwts=self.jwts,
            clock=self.clock,
            channel=self.syncer.channel,
            streams=streams,
            link=self.syncer.link,
            mints=mints,
        )
        self.api = WorkloadApi(
            self.cache,
            self.registry,
            self.jwts,
            self.clock,
            on_call=self._on_call,
            on_validate=self.task_layer.reporter.report,
            demand=self.rotator,
            answer_bytes=answer_bytes,
            streams=streams,
            mints=mints,
        )
        self.health = HealthServicer(self.registry, streams)
        self.private_dir = resolve_private_dir(config)
        self.unix_attestor = UnixAttestor(
            hashes=ExeHashCache(max_size=config.max_hash_size),
            clock=self.clock,
            exe_selectors=config.exe_selectors,
        )
        self.endpoint = WorkloadEndpoint(
            socket_path=config.socket_path,
            private_dir=self.private_dir.path,
            servicer=self.api,
            registry=self.registry,
            attestors=[self.unix_attestor],
            relay_settings=RelaySettings(
                max_connections_per_uid=config.max_connections_per_uid,
                max_connections=config.max_connections,
                identify_timeout=config.identify_timeout,
                identify_threads=config.identify_threads,
                identify_per_uid=config.identify_per_uid,
                socket_dir_shared=config.socket_dir_shared,
            ),
            clock=self.clock,
            extra_servicers=[
                lambda server: health_pb2_grpc.add_HealthServicer_to_server(self.health, server),
                *self.task_layer.extra_servicers,
            ],
        )
        self.http = MetricsHttpServer(self.metrics, self.ready)
        self.metrics.svids.set_function(lambda: self.cache.counts()[1])
        self.metrics.entries.set_function(lambda: self.cache.counts()[0])
        self.metrics.connections.set_function(lambda: len(self.registry))
        self.metrics.server_connected.set_function(lambda: int(self.syncer.connected))
        self.metrics.svid_expiry.set_function(
            lambda: 0 if (svid := self.syncer.agent_svid) is None else svid.not_after
        )
        self.metrics.checkpoint_events.set_function(
            lambda: 0 if self.checkpoints.held is None else self.checkpoints.held.count
        )
        self._tasks: list[asyncio.Task[None]] = []
        # As if disconnected before the first Sync: SVIDs missing from a restored state were
        # asked for before there was a connection, and their retry waits out a backoff.
        self._was_disconnected = True
        self._call_counters: dict[str, Any] = {}
        self._server_shown = ""
        self.metrics_address = ""

    def _restore(self) -> None:
        """Start from the state saved by the last run, if it was this agent's: its entries and
        SVIDs are held at once, served once the server's first Sync message has caught them up.
        Blocking (a few seconds at 100k entries), before anything is served."""
        own = self.store.load_svid()
        if own is None:
            # This start attests anew: a new agent ID, for which nothing saved is valid.
            self.state.discard()
            return
        if own.not_after <= self.clock.now() + 1:
            # Likewise, but the roots its last run saved are as good as bundle.der's, and may
            # be newer: an x509pop agent away past its SVID's life attests with them.
            bundle = self.state.saved_bundle(own.spiffe_id, self.config.trust_domain)
            self.state.discard()
            self._restore_roots(bundle, own.spiffe_id)
            return
        saved = self.state.load(own.spiffe_id, self.config.trust_domain, self.clock.now())
        if saved is not None:
            self.cache.restore(saved.state, saved.svids)
            self.syncer.resume(saved.position)
            self._restore_roots(saved.state.bundle, own.spiffe_id)

    def _restore_roots(self, bundle: TrustBundle | None, agent_id: str) -> None:
        """The newer of the state's roots and bundle.der's verify the server: a bundle the disk
        refused may be in the state file alone. Only our trust domain's bundle."""
        if bundle is not None and bundle.trust_domain == trust_domain_of(agent_id):
            self.syncer.restore_roots(bundle)

    @property
    def runtime_file(self) -> Path:
        return self.config.data_dir / "agent.json"

    def ready(self) -> bool:
        return self.cache.snapshot().synced

    def _on_call(self, method: str) -> None:
        counter = self._call_counters.get(method)
        if counter is None:  # a label lookup costs as much as the rest of a cached JWT call
            counter = self._call_counters[method] = self.metrics.workload_calls.labels(
                method=method
            )
        counter.inc()

    def _on_sync_event(self, event: str) -> None:
        if event == "moved":
            self.metrics.server_moves.inc()
        if event in ("moved", "sync") and self.syncer.server != self._server_shown:
            self._server_shown = self.syncer.server
            self.metrics.server.info({"address": self._server_shown})
        if event in ("sync", "refused"):
            self.state_writer.position_moved()
        if event == "sync":
            self.metrics.syncs.inc()
            if self._was_disconnected:
                self.rotator.nudge()  # renewals that failed while away are due now
            self._was_disconnected = False
        elif event == "disconnected":
            self._was_disconnected = True
        elif event == "refused":
            self.jwts.forget()  # tokens minted under an identity the server no longer backs

    async def _health_loop(self) -> None:
        """Health follows readiness, as /healthz does: SERVING once the first full state has
        arrived, NOT_SERVING again while the server refuses the agent (it serves nothing)."""
        seen, serving = -1, False  # start() set NOT_SERVING
        while True:
            seen = await self.cache.wait_change(seen)
            ready = self.ready()
            if ready == serving:
                continue
            serving = ready
            status = health_pb2.HealthCheckResponse
            for service in ("", HEALTH_SERVICE):
                await self.health.set(service, status.SERVING if ready else status.NOT_SERVING)

    async def start(self) -> None:
        self.syncer.set_bootstrap_roots(
            await asyncio.to_thread(bootstrap_roots, self.config),
            given=self.config.trust_bundle is not None,
        )
        for service in ("", HEALTH_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.config.metrics_address:
            # First: an address it cannot listen on is the operator's to fix, before anything
            # else starts (its /healthz says 503 until the first Sync).
            with listening("metrics_address", self.config.metrics_address, ConfigError):
                self.metrics_address = self.http.start(self.config.metrics_address)
        # The socket exists before anything announces readiness (py-spiffe needs the file).
        await self.endpoint.start()
        self.unix_attestor.announce()
        RuntimeInfo(str(self.config.socket_path), self.metrics_address, os.getpid()).write(
            self.runtime_file
        )
        self._tasks = [
            asyncio.create_task(self.syncer.run(), name="sync"),
            asyncio.create_task(self.rotator.run(), name="rotation"),
            asyncio.create_task(self.state_writer.run(), name="state"),
            asyncio.create_task(self._health_loop(), name="health"),
            *(asyncio.create_task(job) for job in self.task_layer.background()),
        ]
        log.info(
            "agent started",
            extra={
                "socket": str(self.config.socket_path),
                "spiffe_endpoint_socket": socket_uri(self.config.socket_path),
                "metrics": self.metrics_address,
            },
        )

    async def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.health.enter_graceful_shutdown(), HEALTH_SETTLE)
        await cancel_all(self._tasks)
        await self.syncer.settle(ATTEST_SETTLE)
        # What changed since the last batch, so a clean restart mints nothing it held.
        await self.state_writer.flush()
        await asyncio.to_thread(self.state.close)
        await self.endpoint.stop(1.0)
        release(self.private_dir)
        # The socket is closed: no more validations. Those answered since the last batch are
        # still queued (the reporter's loop is cancelled above), so they go to the server's
        # audit log now, over the channel closed next.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.task_layer.reporter.flush(), REPORT_SETTLE)
        await self.syncer.close()
        self.http.stop()
        self.runtime_file.unlink(missing_ok=True)
        log.info("agent stopped")

    async def run_until_signalled(self, started: Callable[[], None] | None = None) -> None:
        stop = asyncio.Event()
        stop_on_signals(stop, log)
        await self.start()
        if started is not None:
            started()
        try:
            await stop.wait()
        finally:
            await self.stop()
