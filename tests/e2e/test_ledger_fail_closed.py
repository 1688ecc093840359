"""Fail closed, with real processes: a credential leaves the server only after its record and
its audit event are committed (the contract in server/issuance/ledger.py).

- Disk full: the server's data directory is a small tmpfs; once it is full every issuance call
  fails UNAVAILABLE ("cannot record"), no credential reaches a client, a metric and a log line
  say why; freed, the server issues again by itself and the audit chain verifies.
- kill -9 under JWT and X.509 load, three times: every credential any client received is in
  the credential records and in the audit log.
"""

from __future__ import annotations

import base64
import json
import shutil
import sqlite3
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from svid._proto import node_pb2, node_pb2_grpc
from tests.e2e.agent_process import create_entry, new_token
from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess, make_server, short_tmpdir, wait_for
from tests.e2e.small_disk import served_from_a_small_disk
from tests.e2e.test_server_cli import attest, node_channel
from tests.server.fixtures import Agent, der_chain, make_csr

pytestmark = pytest.mark.e2e
TD = f"spiffe://{TRUST_DOMAIN}"
# Calls answered by each load thread before the crash, at the least: all four under way, not
# a fixed time of load (the calls in flight when it lands are as many either way).
CALLS_EACH = 3
CRASHES = 3


def jti_of(token: str) -> str:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["jti"])


class Client:
    """One agent's node API calls; remembers every credential it received."""

    def __init__(self, server: ServerProcess, agent: Agent, entry_id: str) -> None:
        self.server = server
        self.agent = agent
        self.entry_id = entry_id
        self.serials: set[str] = set()
        self.jtis: set[str] = set()
        self._lock = threading.Lock()

    @contextmanager
    def stub(self) -> Iterator[node_pb2_grpc.NodeStub]:
        with node_channel(self.server, self.agent) as channel:
            yield node_pb2_grpc.NodeStub(channel)

    def x509(self, stub: node_pb2_grpc.NodeStub, n: int = 10) -> int:
        params = [node_pb2.X509SVIDParams(entry_id=self.entry_id, csr=make_csr()[1])] * n
        results = stub.BatchNewX509SVID(
            node_pb2.BatchNewX509SVIDRequest(params=params), timeout=10
        ).results
        got = {format(der_chain(r.cert_chain)[0].serial_number, "x") for r in results}
        with self._lock:
            self.serials |= got
        return len(got)

    def jwts(self, stub: node_pb2_grpc.NodeStub, n: int = 50) -> int:
        item = node_pb2.NewJWTSVIDRequest(entry_id=self.entry_id, audience=["svc"])
        results = stub.BatchNewJWTSVID(
            node_pb2.BatchNewJWTSVIDRequest(requests=[item] * n), timeout=10
        ).results
        got = {jti_of(r.svid.token) for r in results if r.svid.token}
        with self._lock:
            self.jtis |= got
        return len(got)

    def jwt(self, stub: node_pb2_grpc.NodeStub) -> int:
        request = node_pb2.NewJWTSVIDRequest(entry_id=self.entry_id, audience=["svc"])
        token = stub.NewJWTSVID(request, timeout=10).token
        with self._lock:
            self.jtis.add(jti_of(token))
        return 1


def set_up(server: ServerProcess) -> Client:
    agent = attest(server, new_token(server), server.bundle_pem().encode())
    return Client(
        server, agent, create_entry(server, f"{TD}/ledger/w", agent.spiffe_id, "unix:uid:1")
    )


def on_record(data_dir: Path) -> tuple[set[str], set[str]]:
    """Credential values among the credential records, and credential ids of issuance audit
    events, both in the datastore."""
    with sqlite3.connect(data_dir / "datastore.sqlite3") as db:
        records = {r[0] for r in db.execute("SELECT value FROM credentials")}
        events = {
            r[0]
            for r in db.execute(
                "SELECT credential_id FROM audit_events WHERE kind IN ('x509_issued', 'jwt_minted')"
            )
        }
    return records, events


def metric(server: ServerProcess, name: str) -> float:
    address = server.runtime["metrics_address"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def assert_all_on_record(client: Client, data_dir: Path) -> None:
    records, events = on_record(data_dir)
    received = client.serials | client.jtis
    missing_records = received - records
    missing_events = received - events
    assert not missing_records, f"{len(missing_records)} of {len(received)} have no record"
    assert not missing_events, f"{len(missing_events)} of {len(received)} have no audit event"


def test_a_full_disk_refuses_issuance_and_the_server_resumes_when_space_returns() -> None:
    with served_from_a_small_disk(metrics_address="127.0.0.1:0") as (server, disk):
        client = set_up(server)
        with client.stub() as stub:
            assert client.x509(stub) == 10
            assert client.jwts(stub) == 50
            before = set(client.serials), set(client.jtis)
            disk.fill()
            calls: list[Callable[[node_pb2_grpc.NodeStub], int]] = [
                client.x509,
                client.jwts,
                client.jwt,
            ]
            for _ in range(5):
                for call in calls:
                    with pytest.raises(grpc.RpcError) as err:
                        call(stub)
                    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
                    details = err.value.details() or ""
                    assert "cannot record" in details
                    assert str(server.root) not in details
            # Not one credential reached this client while nothing could be recorded.
            assert (client.serials, client.jtis) == before
            assert metric(server, 'svid_server_ledger_failures_total{reason="disk full"}') >= 15
            assert metric(server, "svid_server_ledger_available") == 0
            assert "the ledger cannot commit" in server.logs()
            assert server.proc is not None
            assert server.proc.poll() is None

            disk.free()
            # No restart, no operator action: the next calls are issued and recorded.
            assert client.x509(stub) == 10
            assert client.jwts(stub) == 50
            assert client.jwt(stub) == 1
            assert metric(server, "svid_server_ledger_available") == 1
        assert server.stop() == 0
        assert len(client.serials) == 20
        assert len(client.jtis) == 101
        assert_all_on_record(client, server.data_dir)
        verify = server.cli("audit", "verify", "--data-dir", str(server.data_dir))
        assert "audit chain OK" in verify.stdout


def test_kill9_under_jwt_and_x509_load_leaves_every_received_credential_on_record() -> None:
    root = short_tmpdir()
    server = make_server(root, log_level="warning")
    server.start()
    try:
        client = set_up(server)
        counts = []
        for _ in range(CRASHES):
            stop = threading.Event()
            received_before = len(client.serials) + len(client.jtis)

            answered = [0, 0, 0, 0]

            def load(
                n: int,
                call: Callable[[node_pb2_grpc.NodeStub], int],
                stop: threading.Event = stop,
                answered: list[int] = answered,
            ) -> None:
                with client.stub() as stub:
                    while not stop.is_set():
                        try:
                            call(stub)
                        except grpc.RpcError:
                            return
                        answered[n] += 1

            workers = [
                threading.Thread(target=load, args=(n, call))
                for n, call in enumerate((client.jwts, client.jwts, client.jwt, client.x509))
            ]
            for w in workers:
                w.start()
            # The crash lands mid-stream: every thread is calling again and again by then.
            wait_for(
                lambda answered=answered: min(answered) >= CALLS_EACH,
                30,
                "every load thread answered",
                interval=0.01,
            )
            server.kill9()
            stop.set()
            for w in workers:
                w.join(15)
            counts.append(len(client.serials) + len(client.jtis) - received_before)
            server.start()
        assert server.stop() == 0
        assert all(n > 0 for n in counts), counts
        assert client.serials
        assert client.jtis
        assert_all_on_record(client, server.data_dir)
        verify = server.cli("audit", "verify", "--data-dir", str(server.data_dir))
        assert "audit chain OK" in verify.stdout
        # The counts are the evidence; `pytest -s` shows them.
        print(
            f"\nkill -9 x{CRASHES}: received per run {counts}; "
            f"{len(client.serials)} X.509-SVIDs and {len(client.jtis)} JWT-SVIDs received, "
            "0 missing records, 0 missing audit events"
        )
    finally:
        if server.proc is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
