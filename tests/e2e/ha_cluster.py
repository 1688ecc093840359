"""Several real `svid-server` processes on one PostgreSQL schema, for the HA end-to-end test and
its benchmark: one key-encryption key (so one CA), fixed ports (a restarted server comes back
where its agents look for it), and an `application_name` per server, so that a test can cut
exactly one server's database connections.

Beside them: `WorkloadWatch` (a workload that holds an X.509-SVID stream and checks, every
`interval`, that it holds a valid SVID and can fetch a JWT-SVID) and `AdminWriter` (entries
created through the servers in turn, each acknowledged one remembered).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt as pyjwt

from server.ca.sealing import KeyEncryptionKey
from svid import SpiffeId, TrustDomain, VerificationError, X509Bundle, X509Verifier
from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2, workload_pb2
from tests import postgres
from tests.e2e.agent_process import HEADER, AgentProcess, new_token
from tests.e2e.conftest import (
    ADMIN_OPTIONS,
    TRUST_DOMAIN,
    ServerProcess,
    make_restartable_server,
)
from tests.e2e.test_agent_failover import addresses, synced_on

QUIET = {"audit_checkpoint_interval": 3600.0}  # no checkpoint files written mid-test


@dataclass
class Cluster:
    root: Path
    dsn: str  # the schema's own DSN (search_path set), for checks from the test
    app_prefix: str
    servers: dict[str, ServerProcess]  # by name: "a", "b", "c"
    agents: list[AgentProcess] = field(default_factory=list)

    def app_name(self, name: str) -> str:
        return f"{self.app_prefix}-{name}"

    def name_at(self, node_address: str) -> str:
        """The name of the server listening on `node_address`."""
        (name,) = (n for n, s in self.servers.items() if addresses(s)[0] == node_address)
        return name

    @property
    def addresses(self) -> tuple[tuple[str, str], ...]:
        return tuple(addresses(s) for s in self.servers.values())

    def add_agent(self, label: str, via: str = "a") -> AgentProcess:
        """A real agent listing every server (its join token made through `via`), started with
        a metrics listener (where its Sync stream is up: `synced_on`)."""
        root = self.root / label
        root.mkdir()
        server = self.servers[via]
        agent = AgentProcess(root, server, new_token(server), servers=self.addresses)
        self.agents.append(agent)
        return agent.start("--metrics-address", "127.0.0.1:0")

    def home(self, agent: AgentProcess, timeout: float = 30) -> str:
        """The name of the server `agent`'s Sync stream is up on (waits for one)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                address = synced_on(agent)
            except (OSError, ValueError):  # its runtime file or metrics listener not there yet
                address = ""
            if address:
                return self.name_at(address)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Sync stream up for the agent in {agent.root}")
            time.sleep(0.05)

    def cut_connections(self, name: str) -> int:
        """Terminate every PostgreSQL backend of server `name` (as a database restart or a
        failover would); returns how many there were."""
        import psycopg

        with psycopg.connect(postgres.server_dsn(), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (self.app_name(name),),
            ).fetchone()
        return int(row[0]) if row else 0

    def spiffe_ids_in_database(self) -> set[str]:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return {str(r[0]) for r in conn.execute("SELECT spiffe_id FROM entries").fetchall()}


@contextmanager
def cluster(
    dsn: str, root: Path, names: Sequence[str] = ("a", "b", "c"), **overrides: Any
) -> Iterator[Cluster]:
    """Servers `names` on the schema of `dsn` (tests.postgres), started one after the other;
    on exit every agent and server stops (their log tails printed) and `root` goes."""
    kek = root / "kek"
    KeyEncryptionKey.generate().write_new(kek)
    prefix = f"svidd-ha-{secrets.token_hex(3)}"
    servers: dict[str, ServerProcess] = {}
    made = Cluster(root, dsn, prefix, servers)
    try:
        for name in names:
            (root / name).mkdir()
            servers[name] = make_restartable_server(
                root / name,
                datastore=f"{dsn}&application_name={made.app_name(name)}",
                key_encryption_key_file=str(kek),
                **{**QUIET, **overrides},
            )
            servers[name].start()
        yield made
    finally:
        for agent in made.agents:  # every one, even when another does not stop in time
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.stop()
            print(f"---- agent {agent.root.name} log ----\n" + agent.logs()[-3000:])
        for name, server in servers.items():
            if server.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.stop()
            print(f"---- server {name} log ----\n" + server.logs()[-3000:])
        shutil.rmtree(root, ignore_errors=True)


# A channel of its own (grpc shares connections between channels to one address: a new one
# would inherit the reconnect backoff of one that saw the server die), back within 1 s of a
# restart.
def admin_stub(server: ServerProcess) -> admin_pb2_grpc.AdminStub:
    channel = grpc.insecure_channel(f"unix:{server.admin_socket}", options=ADMIN_OPTIONS)
    return admin_pb2_grpc.AdminStub(channel)


def uid_entry(spiffe_id: str, parent_id: str, uid: int) -> common_pb2.Entry:
    selector = common_pb2.Selector(type="unix", value=f"uid:{uid}")
    return common_pb2.Entry(spiffe_id=spiffe_id, parent_id=parent_id, selectors=[selector])


@dataclass
class WorkloadWatch:
    """A workload of `agent` entitled to `spiffe_id`: it holds an X.509-SVID stream and, every
    `interval`, asks for an X.509-SVID (it must be unexpired and chain to the bundle the agent
    hands out) and for a JWT-SVID (unexpired). Whatever is wrong goes to `gaps`, with when."""

    agent: AgentProcess
    spiffe_id: str
    audience: str = "ha"
    interval: float = 0.1
    stop: threading.Event = field(default_factory=threading.Event)
    stream_ids: list[set[str]] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    checks: int = 0
    jwt_checks: int = 0

    def start(self) -> WorkloadWatch:
        for target in (self._stream, self._check_x509, self._check_jwt):
            threading.Thread(target=target, daemon=True).start()
        return self

    def _gap(self, what: str) -> None:
        self.gaps.append(f"{time.strftime('%H:%M:%S')} {self.spiffe_id}: {what}")

    def _stream(self) -> None:
        try:
            for msg in self.agent.stub().FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=HEADER
            ):
                self.stream_ids.append({s.spiffe_id for s in msg.svids})
                if self.stop.is_set():
                    return
        except grpc.RpcError as exc:
            if not self.stop.is_set():
                self._gap(f"the stream broke: {exc.code()}")  # type: ignore[attr-defined]

    def _check_x509(self) -> None:
        stub = self.agent.stub()
        td = TrustDomain(TRUST_DOMAIN)
        while not self.stop.wait(self.interval):
            try:
                msg = next(
                    stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=5)
                )
            except grpc.RpcError as exc:
                self._gap(f"no X.509-SVID: {exc.code()}")  # type: ignore[attr-defined]
                continue
            mine = [s for s in msg.svids if s.spiffe_id == self.spiffe_id]
            if not mine:
                self._gap(f"no X.509-SVID among {[s.spiffe_id for s in msg.svids]}")
                continue
            bundle = X509Bundle.parse_der(td, bytes(mine[0].bundle))
            verifier = X509Verifier(lambda _td, b=bundle: b, cache_size=0)
            try:  # the chain to the bundle, the validity window, the SPIFFE ID profile
                verified = verifier.verify_der(bytes(mine[0].x509_svid))
            except VerificationError as exc:
                self._gap(f"invalid X.509-SVID: {exc}")
                continue
            if verified.spiffe_id != SpiffeId.parse(self.spiffe_id):
                self._gap(f"X.509-SVID for {verified.spiffe_id}")
                continue
            self.checks += 1

    def _check_jwt(self) -> None:
        stub = self.agent.stub()
        request = workload_pb2.JWTSVIDRequest(audience=[self.audience], spiffe_id=self.spiffe_id)
        while not self.stop.wait(self.interval * 2):
            try:
                reply = stub.FetchJWTSVID(request, metadata=HEADER, timeout=5)
            except grpc.RpcError as exc:
                self._gap(f"no JWT-SVID: {exc.code()}")  # type: ignore[attr-defined]
                continue
            claims = pyjwt.decode(reply.svids[0].svid, options={"verify_signature": False})
            if claims["exp"] <= time.time() or claims["sub"] != self.spiffe_id:
                self._gap(f"JWT-SVID expired or not ours: {claims}")
                continue
            self.jwt_checks += 1


@dataclass
class AdminWriter:
    """Creates entries through `servers` in turn (one every `pause` s); `acknowledged` holds the
    SPIFFE ID of every create a server answered OK, `failures` (server index, code) the rest."""

    servers: Sequence[ServerProcess]
    prefix: str = f"spiffe://{TRUST_DOMAIN}/ha/write"
    parent_id: str = f"spiffe://{TRUST_DOMAIN}/svid/server"  # valid, and no agent serves it
    pause: float = 0.05
    acknowledged: list[str] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> AdminWriter:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        stubs = [admin_stub(s) for s in self.servers]
        n = 0
        while not self._stop.wait(self.pause):
            index = n % len(stubs)
            spiffe_id = f"{self.prefix}-{n}"
            n += 1
            entry = uid_entry(spiffe_id, self.parent_id, 4242)
            try:
                stubs[index].CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=5)
            except grpc.RpcError as exc:
                self.failures.append((index, str(exc.code())))  # type: ignore[attr-defined]
                continue
            self.acknowledged.append(spiffe_id)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
