"""Issuance throughput against the physical limit measured in the same run (`make bench`).

Rows:
- raw `cryptography` X.509 leaf build+sign per second (SVID-shaped certificate, P-256 CA key)
- X.509-SVIDs per second through the node API's BatchNewX509SVID (batches of 100, several
  concurrent agents, CSR verification included) against a real `svid-server run` process
- raw ES256 signatures per second vs JWT-SVIDs per second through NewJWTSVID

Goal: both ratios >= 0.35. The numbers are printed and stored in benchmark extra_info.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.ca.keys import KeyStore
from server.ca.manager import CaConfig, CaManager
from server.ca.signer import verify_csr
from server.datastore.sqlite import SqliteDataStore
from svid._clock import SystemClock
from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2, node_pb2, node_pb2_grpc
from svid._spiffe_id import SpiffeId, TrustDomain
from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess, make_server, short_tmpdir
from tests.e2e.test_server_cli import attest, node_channel
from tests.server.fixtures import Agent, make_csr

AGENTS = 4
BATCH = 100
RAW_SECONDS = 2.0
API_SECONDS = 4.0
GOAL = 0.35


@dataclass(frozen=True)
class Stubs:
    node: Any
    health: Any


def _rate(op: Callable[[], Any], seconds: float) -> float:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        op()
        count += 1
    return count / (time.perf_counter() - start)


def _raw_cert_op() -> Callable[[], x509.Certificate]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    ca_name = x509.Name([])
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    now = datetime.now(UTC)

    def build() -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca_name)
            .public_key(leaf_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(seconds=10))
            .not_valid_after(now + timedelta(minutes=5))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}/bench")]
                ),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, True, False, False, False, False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key), critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256())
        )

    return build


def _server_side_op(csr_der: bytes) -> Callable[[], Any]:
    """What the server must do per X.509-SVID besides transport: check the CSR, then sign."""
    root = short_tmpdir("svc")
    clock = SystemClock()
    manager = CaManager(
        CaConfig(TrustDomain(TRUST_DOMAIN)),
        SqliteDataStore(root / "ds.sqlite3", clock),
        KeyStore(root / "keys"),
        clock,
    )
    manager.initialize()
    signer = manager.x509_signer()
    spiffe_id = SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/bench")
    return lambda: signer.sign_svid(verify_csr(csr_der).public_key(), spiffe_id, 300)


def _raw_es256_op() -> Callable[[], bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    message = b"eyJhbGciOiJFUzI1NiJ9." + b"x" * 200
    return lambda: key.sign(message, ec.ECDSA(hashes.SHA256()))


@pytest.fixture(scope="module")
def bench_server() -> Iterator[ServerProcess]:
    root = short_tmpdir("svb")
    server = make_server(
        root,
        x509_rate_per_agent=0,
        jwt_rate_per_agent=0,
        attest_rate_per_host=0,
        log_level="warning",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _agents(server: ServerProcess) -> list[tuple[Agent, str]]:
    pem = server.cli("bundle", "show").stdout.encode()
    out = []
    with grpc.insecure_channel(f"unix:{server.admin_socket}") as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for i in range(AGENTS):
            token = admin.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(), timeout=10).token
            agent = attest(server, token, pem)
            entry = admin.CreateEntry(
                admin_pb2.CreateEntryRequest(
                    entry=common_pb2.Entry(
                        spiffe_id=f"spiffe://{TRUST_DOMAIN}/bench/w{i}",
                        parent_id=agent.spiffe_id,
                        selectors=[common_pb2.Selector(type="unix", value=f"uid:{i}")],
                    )
                ),
                timeout=10,
            ).entry
            out.append((agent, entry.id))
    return out


def _concurrent_rate(
    server: ServerProcess,
    agents: list[tuple[Agent, str]],
    call: Callable[[Stubs, str], int],
    threads_per_agent: int,
) -> float:
    """Run `call(stub, entry_id) -> items` for API_SECONDS: one channel per agent, shared by
    `threads_per_agent` callers (an agent serving many workloads)."""
    counts: list[int] = []
    stop = threading.Event()
    workers = len(agents) * threads_per_agent
    barrier = threading.Barrier(workers + 1)
    channels = [node_channel(server, agent) for agent, _ in agents]

    def worker(index: int) -> None:
        agent_index = index % len(agents)
        stub = Stubs(
            node_pb2_grpc.NodeStub(channels[agent_index]),
            health_pb2_grpc.HealthStub(channels[agent_index]),
        )
        entry_id = agents[agent_index][1]
        call(stub, entry_id)  # connect and warm up
        done = 0
        barrier.wait()
        while not stop.is_set():
            done += call(stub, entry_id)
        counts.append(done)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    stop.wait(API_SECONDS)
    stop.set()
    for t in threads:
        t.join(60)
    elapsed = time.perf_counter() - start
    for channel in channels:
        channel.close()
    return sum(counts) / elapsed


def _report(benchmark: Any, name: str, raw: float, api: float) -> None:
    ratio = api / raw
    benchmark.extra_info.update(
        {
            f"{name}_raw_per_s": raw,
            f"{name}_api_per_s": api,
            f"{name}_ratio": ratio,
            f"{name}_goal": GOAL,
        }
    )
    print(
        f"\n[bench] {name}: raw {raw:,.0f}/s, through the node API {api:,.0f}/s, "
        f"ratio {ratio:.2f} (goal >= {GOAL})"
    )


def test_x509_svid_issuance_vs_raw_build_and_sign(
    benchmark: Any, bench_server: ServerProcess
) -> None:
    raw = _rate(_raw_cert_op(), RAW_SECONDS)
    agents = _agents(bench_server)
    csrs = [make_csr()[1] for _ in range(BATCH)]

    requests = {
        entry_id: node_pb2.BatchNewX509SVIDRequest(
            params=[node_pb2.X509SVIDParams(entry_id=entry_id, csr=c) for c in csrs]
        )
        for _, entry_id in agents
    }

    def batch(stub: Stubs, entry_id: str) -> int:
        reply = stub.node.BatchNewX509SVID(requests[entry_id], timeout=60)
        return sum(1 for r in reply.results if r.cert_chain)

    api = benchmark.pedantic(
        lambda: _concurrent_rate(bench_server, agents, batch, threads_per_agent=1),
        rounds=1,
        iterations=1,
    )
    ceiling = _rate(_server_side_op(csrs[0]), RAW_SECONDS)
    benchmark.extra_info["x509_server_side_per_s"] = ceiling
    print(
        f"\n[bench] x509 server-side work only (verify CSR + sign, one thread, no gRPC): "
        f"{ceiling:,.0f}/s, ratio {ceiling / raw:.2f}"
    )
    _report(benchmark, "x509", raw, api)


def test_jwt_svid_minting_vs_raw_es256(benchmark: Any, bench_server: ServerProcess) -> None:
    raw = _rate(_raw_es256_op(), RAW_SECONDS)
    agents = _agents(bench_server)
    probe = health_pb2.HealthCheckRequest()

    def noop(stub: Stubs, entry_id: str) -> int:
        del entry_id
        stub.health.Check(probe, timeout=30)
        return 1

    def mint(stub: Stubs, entry_id: str) -> int:
        reply = stub.node.NewJWTSVID(
            node_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=["bench"]), timeout=30
        )
        return 1 if reply.token else 0

    def mint_batch(stub: Stubs, entry_id: str) -> int:
        request = node_pb2.BatchNewJWTSVIDRequest(
            requests=[
                node_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=[f"bench-{i}"])
                for i in range(BATCH)
            ]
        )
        reply = stub.node.BatchNewJWTSVID(request, timeout=60)
        return sum(1 for r in reply.results if r.svid.token)

    threads = 4
    noop_rate = _concurrent_rate(bench_server, agents, noop, threads_per_agent=threads)
    unary = benchmark.pedantic(
        lambda: _concurrent_rate(bench_server, agents, mint, threads_per_agent=threads),
        rounds=1,
        iterations=1,
    )
    batched = _concurrent_rate(bench_server, agents, mint_batch, threads_per_agent=1)
    benchmark.extra_info["noop_grpc_per_s"] = noop_rate
    print(f"\n[bench] no-op gRPC call (health Check, same channels): {noop_rate:,.0f}/s")
    _report(benchmark, "jwt", raw, unary)
    _report(benchmark, "jwt_batch", raw, batched)
