"""The running server's addresses, written to <data_dir>/server.json for tests, agents and demos."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from svid._durable import replace_durably


@dataclass(frozen=True)
class RuntimeInfo:
    trust_domain: str
    node_address: str  # mTLS: RenewAgent, Sync, BatchNewX509SVID, NewJWTSVID
    attest_address: str  # server-auth TLS: Attest
    admin_socket: str
    metrics_address: str
    pid: int

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        replace_durably(tmp, path)

    @classmethod
    def read(cls, path: Path) -> RuntimeInfo:
        return cls(**json.loads(path.read_text()))


def host_port(bind_address: str, port: int) -> str:
    host, _, _ = bind_address.rpartition(":")
    return f"{host}:{port}"
