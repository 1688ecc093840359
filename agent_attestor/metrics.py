"""Prometheus metrics and the /metrics + /healthz HTTP endpoint."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, generate_latest


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
            "forked, key_changed, invalid: red flags; unwritable: a local disk problem)",
            ["reason"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)  # type: ignore[no-any-return]


class MetricsHttpServer:
    def __init__(self, metrics: Metrics, healthy: Callable[[], bool]) -> None:
        self._metrics = metrics
        self._healthy = healthy
        self._httpd: ThreadingHTTPServer | None = None

    def start(self, address: str) -> str:
        metrics, healthy = self._metrics, self._healthy

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body, code, ctype = metrics.render(), 200, "text/plain; version=0.0.4"
                elif self.path == "/healthz":
                    ok = healthy()
                    body, code, ctype = (
                        (b"ok\n" if ok else b"not ready\n"),
                        (200 if ok else 503),
                        "text/plain",
                    )
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return

        host, _, port = address.rpartition(":")
        self._httpd = ThreadingHTTPServer((host, int(port)), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(
            target=self._httpd.serve_forever, name="agent-metrics", daemon=True
        ).start()
        bound_host, bound_port = self._httpd.server_address[:2]
        return f"{bound_host!s}:{bound_port}"

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
