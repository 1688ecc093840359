"""Test helpers for the server: an in-process server on temp sockets, agent-side credentials.

The server runs on its own asyncio loop in a background thread, so tests talk to it with plain
synchronous gRPC clients over real TLS / Unix sockets. Its clock is a FakeClock started at the
real time (less CLOCK_LAG), so TLS peers (which check validity with the wall clock) accept
its certificates while tests can still move time forward by a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.app import Server
from server.config import ServerConfig, build_config
from server.datastore import AttestedAgent, DataStore
from server.datastore.records import TaskRecord
from server.datastore.sqlite import SqliteDataStore
from server.runtime import RuntimeInfo
from svid._clock import FakeClock
from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2, node_pb2, node_pb2_grpc
from tests.tmpdirs import short_tmpdir

TRUST_DOMAIN = "example.org"
PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
TLS_NAME = (("grpc.ssl_target_name_override", "svid-server"),)
CLOCK_LAG = 30.0


def admit_agents(store: DataStore, *agent_ids: str) -> None:
    """Store the agents a test records credentials of: the ledger refuses the credentials of
    an agent not admitted (evicted, banned or never attested: AgentRemovedError)."""
    for agent_id in agent_ids:
        store.upsert_agent(AttestedAgent(agent_id, "join_token", "1", 2**40))


def admit_tasks(store: DataStore, agent_id: str, *task_ids: str) -> None:
    """Store the tasks (of `agent_id`, active) a test records credentials of: the ledger
    refuses the credentials of a task not active (TaskEndedMeanwhileError)."""
    for task_id in task_ids:
        store.put_task(TaskRecord(task_id, agent_id, "", "active", 2**40, 0, "{}"))


def sqlite_with_agents(path: Path, *agent_ids: str, tasks: Sequence[str] = ()) -> Path:
    """A SQLite datastore file at `path` with `agent_ids` admitted (admit_agents), and `tasks`
    active, of the first of them (admit_tasks)."""
    store = SqliteDataStore(path, FakeClock(0))
    try:
        admit_agents(store, *agent_ids)
        admit_tasks(store, agent_ids[0] if agent_ids else "", *tasks)
    finally:
        store.close()
    return path


def make_csr(key: ec.EllipticCurvePrivateKey | None = None) -> tuple[Any, bytes]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(DER)


def key_pem(key: Any) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def der_chain(data: bytes) -> list[x509.Certificate]:
    """Split concatenated DER certificates (test-side, independent of svid._x509)."""
    certs = []
    while data:
        # DER SEQUENCE with a long-form length: 0x30 0x82 <len16>.
        assert data[0] == 0x30, "not a DER SEQUENCE"
        if data[1] & 0x80:
            n = data[1] & 0x7F
            length = int.from_bytes(data[2 : 2 + n], "big") + 2 + n
        else:
            length = data[1] + 2
        certs.append(x509.load_der_x509_certificate(data[:length]))
        data = data[length:]
    return certs


def write_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """(CA PEM, server cert PEM, server key PEM): a throwaway CA and a leaf for 127.0.0.1 (and
    localhost: a URL naming the server then has its name looked up)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        # What RFC 5280 asks of a CA, and Python 3.13's default TLS context of a chain (the
        # tests' HTTPS clients use it): key usage and key identifiers.
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = (
        directory / "ca.pem",
        directory / "tls.pem",
        directory / "tls.key",
    )
    ca_file.write_bytes(ca.public_bytes(PEM))
    cert_file.write_bytes(leaf.public_bytes(PEM))
    key_file.write_bytes(key_pem(key))
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


def bundle_pem(bundle: common_pb2.Bundle) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(d).public_bytes(PEM) for d in bundle.x509_authorities
    )


@dataclass
class Agent:
    spiffe_id: str
    key: Any
    chain: list[x509.Certificate]
    bundle: common_pb2.Bundle

    @property
    def serial(self) -> str:
        return format(self.chain[0].serial_number, "x")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            bundle_pem(self.bundle),
            key_pem(self.key),
            b"".join(c.public_bytes(PEM) for c in self.chain),
        )


class RunningServer:
    """A real Server on a background loop; `stop()` shuts it down cleanly."""

    def __init__(
        self,
        config: ServerConfig,
        clock: FakeClock,
        *,
        new_datastore: bool = False,
        restored_datastore: bool = False,
    ) -> None:
        self.config = config
        self.clock = clock
        self.server = Server(
            config, clock, new_datastore=new_datastore, restored_datastore=restored_datastore
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.runtime: RuntimeInfo = self.call(self.server.start())
        self._channels: list[grpc.Channel] = []

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        for channel in self._channels:
            channel.close()
        try:
            self.call(self.server.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    # -- clients ------------------------------------------------------------------------------

    def _keep(self, channel: grpc.Channel) -> grpc.Channel:
        self._channels.append(channel)
        return channel

    def admin(self) -> admin_pb2_grpc.AdminStub:
        channel = self._keep(grpc.insecure_channel(f"unix:{self.runtime.admin_socket}"))
        return admin_pb2_grpc.AdminStub(channel)

    def bundle(self) -> common_pb2.Bundle:
        return self.admin().GetBundle(admin_pb2.GetBundleRequest(), timeout=10)

    def attest_stub(self) -> node_pb2_grpc.NodeStub:
        creds = grpc.ssl_channel_credentials(bundle_pem(self.bundle()))
        channel = self._keep(
            grpc.secure_channel(self.runtime.attest_address, creds, options=TLS_NAME)
        )
        return node_pb2_grpc.NodeStub(channel)

    def node_channel(self, agent: Agent, **options: Any) -> grpc.Channel:
        opts = list(TLS_NAME) + list(options.items())
        return self._keep(
            grpc.secure_channel(self.runtime.node_address, agent.credentials(), options=opts)
        )

    def node_stub(self, agent: Agent, **options: Any) -> node_pb2_grpc.NodeStub:
        return node_pb2_grpc.NodeStub(self.node_channel(agent, **options))

    def join_token(self, **kwargs: Any) -> str:
        return (
            self.admin()
            .CreateJoinToken(admin_pb2.CreateJoinTokenRequest(**kwargs), timeout=10)
            .token
        )

    def attest(self, token: str | None = None) -> Agent:
        token = token or self.join_token()
        key, csr = make_csr()
        params = node_pb2.AttestParams(
            data=node_pb2.AttestationData(type="join_token", payload=token.encode()), csr=csr
        )
        replies = list(
            self.attest_stub().Attest(iter([node_pb2.AttestRequest(params=params)]), timeout=10)
        )
        result = replies[-1].result
        return Agent(result.spiffe_id, key, der_chain(result.cert_chain), result.bundle)

    def create_entry(self, spiffe_path: str, parent_id: str, **kwargs: Any) -> common_pb2.Entry:
        selectors = kwargs.pop("selectors", [common_pb2.Selector(type="unix", value="uid:1000")])
        entry = common_pb2.Entry(
            spiffe_id=f"spiffe://{TRUST_DOMAIN}{spiffe_path}",
            parent_id=parent_id,
            selectors=selectors,
            **kwargs,
        )
        return self.admin().CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=10).entry


def start_server(
    root: Path | None = None, *, lag: float = CLOCK_LAG, **overrides: Any
) -> RunningServer:
    """`lag`: how far the server's clock starts behind the wall clock (a test moving it far on,
    through a CA rotation, starts it further back, so the certificates issued then are valid
    by the wall clock too)."""
    root = root or short_tmpdir()
    values: dict[str, Any] = {
        "trust_domain": TRUST_DOMAIN,
        "data_dir": str(root / "data"),
        "bind_address": "127.0.0.1:0",
        "attest_bind_address": "127.0.0.1:0",
        "admin_socket": str(root / "priv" / "admin.sock"),
        "log_level": "warning",
        "shutdown_grace": 0.5,
    }
    values.update(overrides)
    # A little behind the wall clock: tests may advance it by a few seconds and TLS peers,
    # which check validity against the real time, still accept the certificates.
    clock = FakeClock(start=time.time() - lag)
    return RunningServer(build_config(values), clock)


def running_server(**overrides: Any) -> Iterator[RunningServer]:
    """Generator for a pytest fixture: yields a started server, stops it, removes its files."""
    root = short_tmpdir()
    server = start_server(root, **overrides)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# `with managed_server(**overrides) as server:` for a test that needs its own configuration.
managed_server = contextlib.contextmanager(running_server)


# What a test HTTPS server answers a GET of a path with: (status, body, extra headers).
Answer = Callable[[str], tuple[int, bytes, dict[str, str]]]


@contextlib.contextmanager
def serving_https(answer: Answer, prefix: str = "hts") -> Iterator[tuple[str, Path]]:
    """An HTTPS server on 127.0.0.1 (a bundle endpoint, an OIDC issuer), in a thread here,
    with a certificate of a throwaway CA: its base URL (no trailing /) and the CA's PEM."""
    ca_file, cert, key = write_tls_files(short_tmpdir(prefix))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body, headers = answer(self.path)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}", ca_file
    finally:
        httpd.shutdown()
        httpd.server_close()


class SilentEndpoint:
    """An HTTPS server (a bundle endpoint, an OIDC issuer) that takes connections and never
    answers, not even the TLS handshake: a fetch of it is held until its whole-GET deadline
    (10 s, unless the test gives the fetch a shorter one)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}/"
        self.held = threading.Event()
        self._conns: list[socket.socket] = []

        def serve() -> None:
            while True:
                try:
                    raw, _ = self._listener.accept()
                except OSError:  # closed
                    return
                self._conns.append(raw)
                self.held.set()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(10)
        for conn in self._conns:
            conn.close()


class HeldCatchUp:
    """A server view's catch-up (its `_catch_up`) held until released, counting the calls
    waiting on it: what a slow feed read makes of a Sync stream's wait for its snapshot. `call`
    runs a coroutine on the server's loop (ManagedServer.call), where its event lives."""

    def __init__(self, call: Callable[[Any], Any]) -> None:
        self._call = call
        self.gate: asyncio.Event = call(_new_event())
        self.waiting = 0

    async def __call__(self) -> None:
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._call(_set_event(self.gate))


async def _new_event() -> asyncio.Event:
    return asyncio.Event()  # made on the server's loop


async def _set_event(event: asyncio.Event) -> None:
    event.set()
