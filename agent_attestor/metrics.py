"""Prometheus metrics and the /metrics + /healthz HTTP endpoint."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, generate_latest

from svid._metrics_http import READ_TIMEOUT, MetricsEndpoint


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.workload_calls = Counter(
            "svid_agent_workload_calls_total",
            "Workload API calls by method",
            ["method"],
            registry=self.registry,
        )
        self.svids = Gauge(
            "svid_agent_x509_svids", "X.509-SVIDs held for entries", registry=self.registry
        )
        self.entries = Gauge(
            "svid_agent_entries", "entries this node serves", registry=self.registry
        )
        self.connections = Gauge(
            "svid_agent_workload_connections", "open workload connections", registry=self.registry
        )
        # What an alert on "renewal has failed for too long" needs: past this time the agent
        # is no one to its server, and only a new attestation (a new join token) brings it back.
        self.svid_expiry = Gauge(
            "svid_agent_svid_expiry_timestamp_seconds",
            "when the agent SVID in use expires, Unix seconds (0: none held)",
            registry=self.registry,
        )
        self.server_connected = Gauge(
            "svid_agent_server_connected", "1 while the Sync stream is up", registry=self.registry
        )
        # Which server the agent uses (or is about to try, while server_connected is 0).
        self.server = Info(
            "svid_agent_server", "the server this agent syncs with", registry=self.registry
        )
        self.server_moves = Counter(
            "svid_agent_server_moves_total",
            "times the agent moved to another server after its server failed",
            registry=self.registry,
        )
        self.syncs = Counter(
            "svid_agent_sync_updates_total", "Sync updates applied", registry=self.registry
        )
        self.checkpoint_events = Gauge(
            "svid_agent_audit_checkpoint_events",
            "events the server's audit log held at the newest checkpoint kept (0: none yet)",
            registry=self.registry,
        )
        self.checkpoints_refused = Counter(
            "svid_agent_audit_checkpoints_refused_total",
            "audit checkpoints pushed by the server and not kept, by reason (backwards, "
            "forked, key_changed, invalid, young_prune: red flags; unwritable: a local disk "
            "problem)",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)  # type: ignore[no-any-return]


class MetricsHttpServer(MetricsEndpoint):
    def __init__(
        self, metrics: Metrics, healthy: Callable[[], bool], *, read_timeout: float = READ_TIMEOUT
    ) -> None:
        super().__init__(
            metrics.render,
            healthy,
            content_type="text/plain; version=0.0.4",
            unhealthy=b"not ready\n",
            thread_name="agent-metrics",
            read_timeout=read_timeout,
        )
