"""Issuance load on a real server for end-to-end tests: an attested agent, one entry, and
threads that keep asking for X.509 and JWT batches until stopped."""

from __future__ import annotations

import threading

import grpc

from svid._proto import node_pb2, node_pb2_grpc
from tests.e2e.agent_process import create_entry, new_token
from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess
from tests.e2e.test_server_cli import attest, node_channel
from tests.server.fixtures import make_csr

BATCH = 8


class IssuanceLoad:
    """Start with `start()`; `issued` counts SVIDs handed out, `errors` holds any RPC failure.

    A thread stops at its first failure, unless `keep_going`: then it notes the failure, waits
    `RETRY_PAUSE` and asks again (load on a server that dies and comes back)."""

    RETRY_PAUSE = 0.2

    def __init__(
        self, server: ServerProcess, threads: int = 2, *, keep_going: bool = False
    ) -> None:
        self._server = server
        self._agent = attest(server, new_token(server, ttl=300), server.bundle_pem().encode())
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/load/web"
        entry_id = create_entry(server, spiffe_id, self._agent.spiffe_id, "unix:uid:1000")
        self._x509 = node_pb2.BatchNewX509SVIDRequest(
            params=[node_pb2.X509SVIDParams(entry_id=entry_id, csr=make_csr()[1])] * BATCH
        )
        self._jwt = node_pb2.BatchNewJWTSVIDRequest(
            requests=[
                node_pb2.NewJWTSVIDRequest(spiffe_id=spiffe_id, audience=["db"], entry_id=entry_id)
            ]
            * BATCH
        )
        self._keep_going = keep_going
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._load) for _ in range(threads)]
        self._lock = threading.Lock()
        self.issued = 0
        self.errors: list[BaseException] = []

    def _load(self) -> None:
        with node_channel(self._server, self._agent) as channel:
            stub = node_pb2_grpc.NodeStub(channel)
            while not self._stop.is_set():
                try:
                    stub.BatchNewX509SVID(self._x509, timeout=10)
                    stub.BatchNewJWTSVID(self._jwt, timeout=10)
                except grpc.RpcError as exc:  # reported by the test
                    self.errors.append(exc)
                    if not self._keep_going:
                        return
                    self._stop.wait(self.RETRY_PAUSE)
                    continue
                with self._lock:
                    self.issued += 2 * BATCH

    def start(self) -> IssuanceLoad:
        for t in self._threads:
            t.start()
        return self

    def running(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.is_alive() or t.ident is not None:
                t.join(15)
