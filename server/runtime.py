"""The running server's addresses, written to <data_dir>/server.json for tests, agents and demos."""

from __future__ import annotations

from dataclasses import dataclass

from svid._runtime_file import RuntimeFile


@dataclass(frozen=True)
class RuntimeInfo(RuntimeFile):
    trust_domain: str
    node_address: str  # mTLS: RenewAgent, Sync, BatchNewX509SVID, NewJWTSVID
    attest_address: str  # server-auth TLS: Attest
    admin_socket: str
    metrics_address: str
    pid: int


def host_port(bind_address: str, port: int) -> str:
    host, _, _ = bind_address.rpartition(":")
    return f"{host}:{port}"
