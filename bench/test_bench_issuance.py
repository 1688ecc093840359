"""Issuance throughput against the physical limit measured in the same run (`make bench`).

Rows:
- raw `cryptography` X.509 leaf build+sign per second (SVID-shaped certificate, P-256 CA key)
- X.509-SVIDs per second through the node API's BatchNewX509SVID (batches of 100, several
  concurrent agents, CSR verification included) against a real `svid-server run` process
- raw ES256 signatures per second vs JWT-SVIDs per second through BatchNewJWTSVID (batches of
  100) and, for reference, through the unary NewJWTSVID

Goal: the X.509 and the batch JWT ratios >= 0.35. The numbers are printed and stored in
benchmark extra_info. Every SVID counted here is also recorded and audited by the server.

The unary NewJWTSVID row is not judged against the goal: one JWT per call makes it a measure of
Python gRPC's per-call cost, not of minting. The no-op health Check row printed beside it, on the
same channels, is the ceiling for any unary call (~1.7k/s here), which is below 0.1x of raw
ES256 (~20k/s) before a single signature is made. Agents mint JWTs in batches; that row counts.

The machine is shared (2 cores, other processes come and go), so a raw rate measured a few
seconds away from the API rate can be off by 2x. Raw and API windows therefore alternate in
short slices, each API window paired with the raw window just before it, and the reported ratio
is the median of the per-pair ratios (the rates shown are medians too).
"""

from __future__ import annotations

import shutil
import statistics
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
from server.ca.signer import csr_public_key
from server.datastore.sqlite import SqliteDataStore
from svid._clock import SystemClock
from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2, node_pb2, node_pb2_grpc
from svid._spiffe_id import SpiffeId, TrustDomain
from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess, make_server, short_tmpdir
from tests.e2e.test_server_cli import attest, node_channel
from tests.server.fixtures import Agent, make_csr

AGENTS = 4
BATCH = 100
# Two batch callers per agent: while one reply travels back, the next batch is already queued
# at the server. With one, the signing thread sat idle ~40% of the time waiting for requests
# (py-spy), and the row measured round-trip latency rather than issuance throughput.
X509_CALLERS_PER_AGENT = 2
ROUNDS = 5
RAW_SLICE = 0.5  # seconds per raw window
API_SLICE = 1.5  # seconds per API window
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
    """What the server must do per X.509-SVID besides transport and records: check the CSR,
    then sign (the same calls the node API's batch handler makes)."""
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
    return lambda: signer.issue(csr_public_key(csr_der), spiffe_id, 300)


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


class Load:
    """Callers of the node API: one channel per agent (kept open across windows), shared by
    `threads_per_agent` callers (an agent serving many workloads)."""

    def __init__(self, server: ServerProcess, agents: list[tuple[Agent, str]]) -> None:
        self._agents = agents
        self._channels = [node_channel(server, agent) for agent, _ in agents]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def rate(
        self, call: Callable[[Stubs, str], int], threads_per_agent: int, seconds: float
    ) -> float:
        """Items per second while every caller runs `call(stubs, entry_id) -> items`."""
        counts: list[int] = []
        stop = threading.Event()
        workers = len(self._agents) * threads_per_agent
        barrier = threading.Barrier(workers + 1)

        def worker(index: int) -> None:
            agent_index = index % len(self._agents)
            channel = self._channels[agent_index]
            stubs = Stubs(node_pb2_grpc.NodeStub(channel), health_pb2_grpc.HealthStub(channel))
            entry_id = self._agents[agent_index][1]
            call(stubs, entry_id)  # connect and warm up, outside the window
            done = 0
            barrier.wait()
            while not stop.is_set():
                done += call(stubs, entry_id)
            counts.append(done)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        stop.wait(seconds)
        stop.set()
        for t in threads:
            t.join(60)
        # Calls in flight at the deadline finish and count: the window is as long as they took.
        return sum(counts) / (time.perf_counter() - start)


@dataclass(frozen=True)
class Paired:
    raw: float  # median raw rate
    api: float  # median API rate
    ratio: float  # median of per-round api/raw
    rounds: tuple[tuple[float, float], ...]


def _paired(raw_op: Callable[[], Any], api: Callable[[float], float]) -> Paired:
    """ROUNDS x (raw window, then API window): both see the same background load."""
    rounds = []
    for _ in range(ROUNDS):
        raw = _rate(raw_op, RAW_SLICE)
        rounds.append((raw, api(API_SLICE)))
    return Paired(
        raw=statistics.median(r for r, _ in rounds),
        api=statistics.median(a for _, a in rounds),
        ratio=statistics.median(a / r for r, a in rounds),
        rounds=tuple(rounds),
    )


def _report(benchmark: Any, name: str, result: Paired, *, judged: bool = True) -> None:
    benchmark.extra_info.update(
        {
            f"{name}_raw_per_s": result.raw,
            f"{name}_api_per_s": result.api,
            f"{name}_ratio": result.ratio,
            f"{name}_rounds": [list(r) for r in result.rounds],
        }
    )
    if judged:
        benchmark.extra_info[f"{name}_goal"] = GOAL
    rounds = ", ".join(f"{a / r:.2f}" for r, a in result.rounds)
    goal = f"goal >= {GOAL}" if judged else "not judged: one JWT per gRPC call"
    print(
        f"\n[bench] {name}: raw {result.raw:,.0f}/s, through the node API {result.api:,.0f}/s, "
        f"ratio {result.ratio:.2f} ({goal}; per round {rounds})"
    )


def test_x509_svid_issuance_vs_raw_build_and_sign(
    benchmark: Any, bench_server: ServerProcess
) -> None:
    raw_op = _raw_cert_op()
    agents = _agents(bench_server)
    # A fresh key per SVID, as agents make them; all generated before any window opens.
    requests = {
        entry_id: node_pb2.BatchNewX509SVIDRequest(
            params=[
                node_pb2.X509SVIDParams(entry_id=entry_id, csr=make_csr()[1]) for _ in range(BATCH)
            ]
        )
        for _, entry_id in agents
    }

    def batch(stubs: Stubs, entry_id: str) -> int:
        reply = stubs.node.BatchNewX509SVID(requests[entry_id], timeout=60)
        return sum(1 for r in reply.results if r.cert_chain)

    load = Load(bench_server, agents)
    try:
        result = benchmark.pedantic(
            lambda: _paired(
                raw_op, lambda seconds: load.rate(batch, X509_CALLERS_PER_AGENT, seconds)
            ),
            rounds=1,
            iterations=1,
        )
    finally:
        load.close()
    any_csr = requests[agents[0][1]].params[0].csr
    server_side = _paired(raw_op, lambda seconds: _rate(_server_side_op(any_csr), seconds))
    benchmark.extra_info["x509_server_side_per_s"] = server_side.api
    print(
        f"\n[bench] x509 server-side work only (verify CSR + sign, one thread, no gRPC, "
        f"no records): {server_side.api:,.0f}/s, ratio {server_side.ratio:.2f}"
    )
    _report(benchmark, "x509", result)


def test_jwt_svid_minting_vs_raw_es256(benchmark: Any, bench_server: ServerProcess) -> None:
    raw_op = _raw_es256_op()
    agents = _agents(bench_server)
    probe = health_pb2.HealthCheckRequest()

    def noop(stubs: Stubs, entry_id: str) -> int:
        del entry_id
        stubs.health.Check(probe, timeout=30)
        return 1

    def mint(stubs: Stubs, entry_id: str) -> int:
        reply = stubs.node.NewJWTSVID(
            node_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=["bench"]), timeout=30
        )
        return 1 if reply.token else 0

    batches = {
        entry_id: node_pb2.BatchNewJWTSVIDRequest(
            requests=[
                node_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=[f"bench-{i}"])
                for i in range(BATCH)
            ]
        )
        for _, entry_id in agents
    }

    def mint_batch(stubs: Stubs, entry_id: str) -> int:
        reply = stubs.node.BatchNewJWTSVID(batches[entry_id], timeout=60)
        return sum(1 for r in reply.results if r.svid.token)

    threads = 4
    load = Load(bench_server, agents)
    try:
        noop_rate = load.rate(noop, threads, API_SLICE)
        unary = benchmark.pedantic(
            lambda: _paired(raw_op, lambda seconds: load.rate(mint, threads, seconds)),
            rounds=1,
            iterations=1,
        )
        batched = _paired(raw_op, lambda seconds: load.rate(mint_batch, 1, seconds))
    finally:
        load.close()
    benchmark.extra_info["noop_grpc_per_s"] = noop_rate
    print(f"\n[bench] no-op gRPC call (health Check, same channels): {noop_rate:,.0f}/s")
    _report(benchmark, "jwt", unary, judged=False)
    _report(benchmark, "jwt_batch", batched)
