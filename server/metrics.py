"""Prometheus metrics on a registry the server owns (no process-global registry)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from server.gc_pauses import GcPauses
from server.oauth.admission import ConnectionMetrics
from svid._metrics_http import MetricsEndpoint

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.svids_issued = Counter(
            "svid_server_svids_issued",
            "SVIDs issued (handed out), by kind (x509, jwt, agent, server)",
            ["kind"],
            registry=self.registry,
        )
        # On the ledger but never sent (the task ended while they were issued): with
        # svids_issued, this adds up to the credentials the ledger committed.
        self.svids_withheld = Counter(
            "svid_server_svids_withheld",
            "SVIDs committed to the ledger but not handed out (their task ended meanwhile)",
            ["kind"],
            registry=self.registry,
        )
        self.signing_seconds = Histogram(
            "svid_server_signing_seconds",
            "Time to verify a CSR and sign one SVID",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.attestations = Counter(
            "svid_server_attestations",
            "Node attestation attempts, by type and result",
            ["type", "result"],
            registry=self.registry,
        )
        self.errors = Counter(
            "svid_server_rpc_errors",
            "RPCs that ended with an error status, by code",
            ["code"],
            registry=self.registry,
        )
        self.rotations = Counter(
            "svid_server_rotation_events",
            "Key and certificate rotation events (bundle changes, server SVID renewals)",
            ["kind"],
            registry=self.registry,
        )
        self.ledger_failures = Counter(
            "svid_server_ledger_failures",
            "Issuance calls refused because the ledger could not commit, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.ledger_available = Gauge(
            "svid_server_ledger_available",
            "1 while the ledger commits, 0 after its last commit failed (every identity "
            "decision refused, /healthz 503)",
            registry=self.registry,
        )
        self.ledger_available.set(1)
        self.audit_checkpoint_refusals = Counter(
            "svid_server_audit_checkpoint_refusals",
            "Audit checkpoints not signed because the stored chain did not run from the last "
            "signed head, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.refusals_unrecorded = Counter(
            "svid_server_refusals_unrecorded",
            "Refusals counted but not written to the audit log: their caller had spent its "
            "budget of refusals on record (server/refusal_budget.py), by source "
            "(validation_accepted: agents' reports of accepted tokens, budgeted alike)",
            ["source"],
            registry=self.registry,
        )
        self.http_connections_refused = Counter(
            "svid_server_http_connections_refused",
            "New connections to an HTTP listener (oauth, bundle_endpoint) closed unserved: a "
            "cap on open connections was reached, by listener and reason (per_host, total)",
            ["listener", "reason"],
            registry=self.registry,
        )
        self.http_connections_open = Gauge(
            "svid_server_http_connections_open",
            "Connections open on an HTTP listener (oauth, bundle_endpoint), each holding a file "
            "descriptor: from accept to close, its TLS handshake included",
            ["listener"],
            registry=self.registry,
        )
        self.http_accept_failures = Counter(
            "svid_server_http_accept_failures",
            "Connections an HTTP listener could not accept (out of file descriptors or "
            "memory); it stops accepting for a second after each, by listener",
            ["listener"],
            registry=self.registry,
        )
        # What an alert on rotation or renewal stalling needs (both renew long before these):
        # past the first, nothing this server signs verifies; past the second, no agent
        # reaches it.
        # 1 while this server's policy set is not the one last `policy reload`ed in the fleet
        # (its policy_dir differs, or failed to load): server/policy/fleet.py.
        self.policy_diverged = Gauge(
            "svid_server_policy_diverged",
            "1 when this server's policy set differs from the one another server announced",
            registry=self.registry,
        )
        self.x509_ca_expiry = Gauge(
            "svid_server_x509_ca_expiry_timestamp_seconds",
            "When the X.509 CA this server signs with expires, Unix seconds (0: none yet)",
            registry=self.registry,
        )
        self.svid_expiry = Gauge(
            "svid_server_svid_expiry_timestamp_seconds",
            "When the server's own SVID (its node API certificate) expires, Unix seconds "
            "(0: none yet)",
            registry=self.registry,
        )
        self.sync_streams = Gauge(
            "svid_server_sync_streams", "Open agent Sync streams", registry=self.registry
        )
        # Registered here, timed only once the daemon installs it (gc.callbacks is global).
        self.gc_pauses = GcPauses()
        self.registry.register(self.gc_pauses)

    def record_error(self, code: grpc.StatusCode) -> None:
        self.errors.labels(code=code.name).inc()

    def http_listener(self, listener: str) -> ConnectionMetrics:
        """What the HTTP listener `listener` reports of its connections, to these metrics."""
        return ConnectionMetrics(
            refused=lambda reason: self.http_connections_refused.labels(listener, reason).inc(),
            open=self.http_connections_open.labels(listener).set,
            accept_failed=self.http_accept_failures.labels(listener).inc,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def observe_times(histogram: Histogram, amount: float, times: int) -> None:
    """`times` calls of `histogram.observe(amount)` (a labelled child), as one update.

    Why: a batch of N SVIDs is timed once and observed as N signatures of its mean, and N
    observe calls (a lock and a bucket search each) cost the issuing thread ~0.7 us per SVID.
    prometheus_client has no call for it: this updates the sum and the bucket observe would,
    through the child's own value objects, and falls back to observe() if they are not there.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if times <= 0:
        return
    if (
        bounds is None
        or buckets is None
        or total is None
        or len(bounds) != len(buckets)
        or math.isnan(amount)  # observe puts NaN in no bucket
    ):
        for _ in range(times):
            histogram.observe(amount)
        return
    total.inc(amount * times)
    # observe's bucket: the first upper bound >= amount (the last bound is +Inf).
    buckets[bisect.bisect_left(bounds, amount)].inc(times)


class MetricsHttpServer(MetricsEndpoint):
    """Serves /metrics (Prometheus text) and /healthz on a small threaded HTTP server."""

    def __init__(
        self,
        metrics: Metrics,
        healthy: Callable[[], bool],
        reasons: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        super().__init__(
            metrics.render,
            healthy,
            content_type=CONTENT_TYPE_LATEST,
            unhealthy=b"unhealthy\n",
            thread_name="svid-metrics",
            reasons=reasons,
        )
