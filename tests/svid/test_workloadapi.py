"""svid.workloadapi against a real gRPC SpiffeWorkloadAPI server on a temp Unix socket."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from svid import (
    JwtBundle,
    RevokedError,
    TrustDomain,
    VerificationError,
    X509Bundle,
    der_concat,
    sign_jws,
)
from svid._proto import revocation_pb2, revocation_pb2_grpc, workload_pb2, workload_pb2_grpc
from svid.workloadapi import (
    ENV_SOCKET,
    Backoff,
    JwtSvidValidationError,
    WorkloadApiAddressError,
    WorkloadApiClient,
    WorkloadApiError,
    WorkloadApiPermissionError,
    WorkloadApiSource,
    WorkloadApiUnavailableError,
    grpc_target,
    revoked_from_crls,
)
from tests.svid.certs import Issued, make_ca, make_leaf

TD = TrustDomain("example.org")
WAIT = 10.0


def eventually(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Bounded polling for background threads (real sockets, real threads)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _crl(issuer: Issued, serials: list[int]) -> bytes:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(hours=1))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(issuer.key, hashes.SHA256())  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.DER)


@dataclass
class State:
    """What the fake agent serves; every change wakes the streams (full state each message)."""

    x509: dict[str, bytes] = field(default_factory=dict)
    crls: list[bytes] = field(default_factory=list)
    jwt: dict[str, bytes] = field(default_factory=dict)
    revoked: list[revocation_pb2.Revoked] = field(default_factory=list)
    svid_chain: bytes = b""
    svid_key: bytes = b""
    jwt_key: ec.EllipticCurvePrivateKey | None = None
    deny: bool = False
    headers: list[tuple[str, str]] = field(default_factory=list)
    version: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def change(self, **values: Any) -> None:
        with self.cond:
            for k, v in values.items():
                setattr(self, k, v)
            self.version += 1
            self.cond.notify_all()


class FakeAgent(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    def __init__(self, state: State) -> None:
        self.s = state

    def _check(self, context: grpc.ServicerContext) -> None:
        md = tuple(context.invocation_metadata() or ())
        self.s.headers.extend((k, v) for k, v in md if k == "workload.spiffe.io")
        if ("workload.spiffe.io", "true") not in md:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing")
        if self.s.deny:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")

    def _stream(self, context: grpc.ServicerContext, make: Callable[[], Any]) -> Iterator[Any]:
        self._check(context)
        seen = -1
        while context.is_active():
            with self.s.cond:
                if self.s.version == seen:
                    self.s.cond.wait(0.05)
                    continue
                seen = self.s.version
                msg = make()
            yield msg

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        return self._stream(
            context,
            lambda: workload_pb2.X509SVIDResponse(
                svids=[
                    workload_pb2.X509SVID(
                        spiffe_id="spiffe://example.org/workload",
                        x509_svid=self.s.svid_chain,
                        x509_svid_key=self.s.svid_key,
                        bundle=self.s.x509.get("spiffe://example.org", b""),
                        hint="internal",
                    )
                ]
            ),
        )

    def FetchX509Bundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        return self._stream(
            context,
            lambda: workload_pb2.X509BundlesResponse(bundles=self.s.x509, crl=self.s.crls),
        )

    def FetchJWTBundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        return self._stream(context, lambda: workload_pb2.JWTBundlesResponse(bundles=self.s.jwt))

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check(context)
        if not request.audience:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        assert self.s.jwt_key is not None
        token = sign_jws(
            {"kid": "k1", "typ": "JWT"},
            {
                "sub": request.spiffe_id or "spiffe://example.org/workload",
                "aud": list(request.audience),
                "exp": int(time.time()) + 300,
            },
            self.s.jwt_key,
        )
        return workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id="spiffe://example.org/workload", svid=token)]
        )

    def ValidateJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check(context)
        if request.audience != "svc":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token is invalid: wrong audience")
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id="spiffe://example.org/workload")


class FakeRevocations(revocation_pb2_grpc.RevocationsServicer):  # type: ignore[misc]
    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        s = self.agent.s
        return self.agent._stream(
            context,
            lambda: revocation_pb2.RevocationList(items=s.revoked, version=s.version),
        )


@dataclass
class Server:
    state: State
    path: Path
    revocations: bool = True
    server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"unix://{self.path}"

    def start(self) -> Server:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        agent = FakeAgent(self.state)
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(agent, server)
        if self.revocations:
            revocation_pb2_grpc.add_RevocationsServicer_to_server(FakeRevocations(agent), server)
        server.add_insecure_port(self.address)
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait()
            self.server = None


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="h7w", dir="/tmp"))  # Unix socket paths must be short
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class World:
    ca: Issued
    leaf: Issued
    jwt_key: ec.EllipticCurvePrivateKey
    state: State
    server: Server


@pytest.fixture
def world(sock_dir: Path) -> Iterator[World]:
    now = time.time()
    ca = make_ca(not_before=now - 600, not_after=now + 86400)
    leaf = make_leaf(ca, not_before=now - 60, not_after=now + 3600, serial=0xBEEF)
    jwt_key = ec.generate_private_key(ec.SECP256R1())
    state = State(
        x509={"spiffe://example.org": der_concat([ca.cert])},
        jwt={"spiffe://example.org": JwtBundle(TD, {"k1": jwt_key.public_key()}).to_jwks()},
        svid_chain=der_concat([leaf.cert]),
        svid_key=leaf.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        jwt_key=jwt_key,
    )
    server = Server(state, sock_dir / "agent.sock").start()
    yield World(ca, leaf, jwt_key, state, server)
    server.stop()


@pytest.fixture
def client(world: World) -> Iterator[WorkloadApiClient]:
    with WorkloadApiClient(world.server.address, timeout=5.0) as c:
        yield c


# --- addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("unix:///run/agent.sock", "unix:///run/agent.sock"),
        ("unix:/run/agent.sock", "unix:///run/agent.sock"),
        ("tcp://127.0.0.1:8081", "127.0.0.1:8081"),
        ("tcp://[::1]:8081", "[::1]:8081"),
    ],
)
def test_addresses_the_spec_allows(address: str, target: str) -> None:
    assert grpc_target(address) == target


@pytest.mark.parametrize(
    "address",
    [
        "unix://relative/agent.sock",
        "unix:agent.sock",
        "tcp://localhost:8081",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:8081/path",
        "unix:///run/agent.sock?x=1",
        "http://127.0.0.1:8081",
        "/run/agent.sock",
    ],
)
def test_addresses_the_spec_refuses(address: str) -> None:
    with pytest.raises(WorkloadApiAddressError, match="Workload API address"):
        grpc_target(address)


def test_address_from_the_environment() -> None:
    assert grpc_target(None, {ENV_SOCKET: "unix:///tmp/a.sock"}) == "unix:///tmp/a.sock"
    with pytest.raises(WorkloadApiAddressError, match=ENV_SOCKET):
        grpc_target(None, {})


# --- client -----------------------------------------------------------------------------------


def test_fetch_x509_svids_sends_the_security_header(
    world: World, client: WorkloadApiClient
) -> None:
    svids = client.fetch_x509_svids()
    assert [str(s.spiffe_id) for s in svids] == ["spiffe://example.org/workload"]
    assert svids[0].hint == "internal"
    assert svids[0].leaf.serial_number == 0xBEEF
    assert world.state.headers == [("workload.spiffe.io", "true")]


def test_fetch_bundles(world: World, client: WorkloadApiClient) -> None:
    x509_bundles = client.fetch_x509_bundles()
    assert x509_bundles.for_trust_domain(TD).authorities == (world.ca.cert,)
    world.state.change(crls=[_crl(world.ca, [5])])
    assert client.fetch_x509_bundles_and_crls().crls == (world.state.crls[0],)
    jwt_bundles = client.fetch_jwt_bundles()
    assert jwt_bundles.for_trust_domain(TD).get("k1") is not None


def test_fetch_and_validate_jwt_svid(client: WorkloadApiClient) -> None:
    svid = client.fetch_jwt_svid(["svc", "other"])
    assert svid.audience == ("svc", "other")
    assert str(svid.spiffe_id) == "spiffe://example.org/workload"
    assert "eyJ" not in repr(svid)  # the token never shows
    assert client.validate_jwt_svid(svid.token, "svc").spiffe_id == svid.spiffe_id
    with pytest.raises(JwtSvidValidationError, match="wrong audience") as info:
        client.validate_jwt_svid(svid.token, "nope")
    assert isinstance(info.value, VerificationError)
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert info.value.code == "INVALID_ARGUMENT"


def test_errors_are_svid_errors_chained_from_grpc(world: World, client: WorkloadApiClient) -> None:
    with pytest.raises(WorkloadApiError, match="audience must be specified") as info:
        client.fetch_jwt_svid([])
    assert info.value.code == "INVALID_ARGUMENT"
    world.state.change(deny=True)
    for call in (client.fetch_x509_svids, client.fetch_x509_bundles, client.fetch_jwt_bundles):
        with pytest.raises(WorkloadApiPermissionError, match="no identity issued") as denied:
            call()
        assert isinstance(denied.value.__cause__, grpc.RpcError)


def test_unreachable_agent_is_unavailable(sock_dir: Path) -> None:
    with WorkloadApiClient(f"unix://{sock_dir}/nobody.sock", timeout=2.0) as c:
        with pytest.raises(WorkloadApiUnavailableError, match=r"nobody\.sock"):
            c.fetch_x509_svids()
        with pytest.raises(WorkloadApiUnavailableError):
            c.fetch_jwt_svid("svc")


def test_malformed_answer_is_a_workload_api_error(world: World, client: WorkloadApiClient) -> None:
    world.state.change(x509={"spiffe://example.org": b"\x30\x03junk"})
    with pytest.raises(WorkloadApiError, match="unusable answer") as info:
        client.fetch_x509_bundles()
    assert info.value.code == "BAD_RESPONSE"


def test_watch_delivers_updates_and_cancels(world: World, client: WorkloadApiClient) -> None:
    other = make_ca("other.org")
    watch = client.watch_x509_bundles()
    seen = []
    for update in watch:
        seen.append(set(update.bundles))
        if len(seen) == 1:
            world.state.change(
                x509={**world.state.x509, "spiffe://other.org": der_concat([other.cert])}
            )
        else:
            watch.cancel()
    assert seen == [{TD}, {TD, TrustDomain("other.org")}]


# --- source -----------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    b = Backoff(initial=0.5, cap=3.0)
    delays = [b.next(None)]
    for _ in range(4):
        delays.append(b.next(delays[-1]))
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.fixture
def source(world: World) -> Iterator[WorkloadApiSource]:
    src = WorkloadApiSource(world.server.address, backoff=Backoff(0.02, 0.2))
    with src:
        assert src.wait_ready(WAIT)
        yield src


def test_source_feeds_verifiers(world: World, source: WorkloadApiSource) -> None:
    xv = source.x509_verifier()
    assert str(xv.verify_der(der_concat([world.leaf.cert])).spiffe_id).endswith("/workload")
    token = sign_jws(
        {"kid": "k1"},
        {"sub": "spiffe://example.org/a", "aud": "svc", "exp": int(time.time()) + 60},
        world.jwt_key,
    )
    assert str(source.jwt_verifier().verify(token, "svc").spiffe_id) == "spiffe://example.org/a"


def test_unchanged_bundles_keep_identity_and_changes_apply(
    world: World, source: WorkloadApiSource
) -> None:
    x509_before = source.x509_bundle_for(TD)
    jwt_before = source.jwt_bundle_for(TD)
    xv = source.x509_verifier()
    leaf_der = der_concat([world.leaf.cert])
    xv.verify_der(leaf_der)
    other = make_ca("other.org")
    world.state.change(x509={**world.state.x509, "spiffe://other.org": der_concat([other.cert])})
    eventually(lambda: source.x509_bundle_for(TrustDomain("other.org")), "other.org bundle")
    assert source.x509_bundle_for(TD) is x509_before
    assert source.jwt_bundle_for(TD) is jwt_before
    # CA rotation: the old CA leaves the bundle, so its leaf (even cached) stops verifying.
    new_ca = make_ca()
    world.state.change(x509={"spiffe://example.org": der_concat([new_ca.cert])})
    eventually(lambda: source.x509_bundle_for(TD) is not x509_before, "rotated bundle")
    assert source.x509_bundle_for(TrustDomain("other.org")) is None
    with pytest.raises(VerificationError, match="does not lead to an authority"):
        xv.verify_der(leaf_der)


def test_signed_crl_revokes_and_forged_crl_is_ignored(
    world: World, source: WorkloadApiSource
) -> None:
    xv = source.x509_verifier()
    leaf_der = der_concat([world.leaf.cert])
    xv.verify_der(leaf_der)
    impostor = make_ca()  # same subject name, different key
    world.state.change(crls=[_crl(impostor, [0xBEEF])])
    eventually(lambda: source.rejected_crls, "forged CRL rejected")
    assert "not signed by any authority" in source.rejected_crls[0]
    xv.verify_der(leaf_der)  # still fine
    world.state.change(crls=[_crl(world.ca, [0xBEEF])])
    eventually(lambda: source.revocations.is_serial_revoked("beef"), "CRL applied")
    with pytest.raises(RevokedError, match="beef"):
        xv.verify_der(leaf_der)
    world.state.change(crls=[])  # full state: an emptied CRL list un-revokes
    eventually(lambda: not source.revocations.is_serial_revoked("beef"), "CRL dropped")
    xv.verify_der(leaf_der)


def test_a_serial_listed_in_any_of_several_crls_is_revoked(
    world: World, source: WorkloadApiSource
) -> None:
    # The server splits a big revocation list over several CRLs of one CA (server.tasks.crl).
    xv = source.x509_verifier()
    leaf_der = der_concat([world.leaf.cert])
    crls = [_crl(world.ca, [1, 2]), _crl(world.ca, [3]), _crl(world.ca, [4, 0xBEEF, 5])]
    world.state.change(crls=crls)
    eventually(lambda: source.revocations.is_serial_revoked("beef"), "the last CRL applied")
    with pytest.raises(RevokedError, match="beef"):
        xv.verify_der(leaf_der)
    assert all(source.revocations.is_serial_revoked(s) for s in ("1", "2", "3", "4", "5"))
    result = revoked_from_crls(crls, {TD: X509Bundle(TD, (world.ca.cert,))})
    assert sorted(r.value for r in result.revoked) == ["1", "2", "3", "4", "5", "beef"]
    assert result.rejected == ()


def test_revocation_stream_revokes_jtis(world: World, source: WorkloadApiSource) -> None:
    token = sign_jws(
        {"kid": "k1"},
        {
            "sub": "spiffe://example.org/a",
            "aud": "svc",
            "exp": int(time.time()) + 60,
            "jti": "j-1",
        },
        world.jwt_key,
    )
    jv = source.jwt_verifier()
    jv.verify(token, "svc")
    world.state.change(
        revoked=[
            revocation_pb2.Revoked(kind="weird", value="x"),  # skipped, not fatal
            revocation_pb2.Revoked(kind="x509_serial", value="not-hex"),  # skipped too
            revocation_pb2.Revoked(kind="jwt_id", value="j-1", expires_at=0),
        ]
    )
    eventually(lambda: source.revocations.is_jti_revoked("j-1"), "jti revoked")
    assert source.revocation_stream_supported is True
    with pytest.raises(RevokedError, match="j-1"):
        jv.verify(token, "svc")


def test_source_without_revocation_stream(world: World, sock_dir: Path) -> None:
    plain = Server(world.state, sock_dir / "plain.sock", revocations=False).start()
    try:
        with WorkloadApiSource(plain.address, backoff=Backoff(0.02, 0.2)) as src:
            assert src.wait_ready(WAIT)
            eventually(lambda: src.revocation_stream_supported is False, "UNIMPLEMENTED seen")
    finally:
        plain.stop()


def test_source_reconnects_after_agent_restart(world: World) -> None:
    with WorkloadApiSource(world.server.address, backoff=Backoff(0.02, 0.2)) as src:
        assert src.wait_ready(WAIT)
        world.server.stop()
        eventually(lambda: "FetchX509Bundles" in src.errors, "stream error after shutdown")
        other = make_ca("other.org")
        world.state.change(
            x509={**world.state.x509, "spiffe://other.org": der_concat([other.cert])}
        )
        world.server.start()
        eventually(lambda: src.x509_bundle_for(TrustDomain("other.org")), "bundle after restart")
        assert isinstance(src.x509_bundle_for(TD), X509Bundle)
    assert all(not t.is_alive() for t in src._threads)


def test_source_before_first_message_fails_closed(sock_dir: Path, world: World) -> None:
    src = WorkloadApiSource(f"unix://{sock_dir}/none.sock", backoff=Backoff(0.02, 0.1)).start()
    try:
        assert not src.wait_ready(0.2)
        assert src.x509_bundle_for(TD) is None
        with pytest.raises(VerificationError, match=r"no X\.509 bundle"):
            src.x509_verifier().verify_der(der_concat([world.leaf.cert]))
    finally:
        src.stop()
    assert all(not t.is_alive() for t in src._threads)


def test_crl_reader_refuses_garbage(world: World) -> None:
    result = revoked_from_crls(
        [b"junk", _crl(world.ca, [1, 2])], {TD: X509Bundle(TD, (world.ca.cert,))}
    )
    assert {r.value for r in result.revoked} == {"1", "2"}
    assert len(result.rejected) == 1
    assert "not a readable DER CRL" in result.rejected[0]


def test_crl_with_an_invalid_version_is_refused_not_raised() -> None:
    # Found by tests/fuzz: cryptography's InvalidVersion is not a ValueError.
    ca = make_ca()
    crl = _crl(ca, [1]).replace(b"\x02\x01\x01", b"\x02\x01\x05", 1)  # version v2 -> 5
    result = revoked_from_crls([crl], {TD: X509Bundle(TD, (ca.cert,))})
    assert result.revoked == ()
    assert "not a readable DER CRL" in result.rejected[0]


def test_crl_of_an_authority_with_duplicate_extensions_is_refused_not_raised() -> None:
    # Found by tests/fuzz: DuplicateExtension (no ValueError) escaped revoked_from_crls.
    ca = make_ca()
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    dup = der.replace(b"\x06\x03\x55\x1d\x0e", b"\x06\x03\x55\x1d\x0f", 1)  # SKID -> KU
    bad = x509.load_der_x509_certificate(dup)
    result = revoked_from_crls([_crl(ca, [1])], {TD: X509Bundle(TD, (bad,))})
    assert result.revoked == ()
    assert "not signed by any authority" in result.rejected[0]


def test_crl_of_an_authority_with_an_unreadable_key_is_refused_not_raised() -> None:
    # Found by tests/fuzz: UnsupportedAlgorithm escaped revoked_from_crls.
    ca = make_ca()
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    curve = bytes.fromhex("2a8648ce3d030107")  # prime256v1 -> an unknown curve OID
    bad = x509.load_der_x509_certificate(der.replace(curve, b"\x2b" + curve[1:], 1))
    result = revoked_from_crls([_crl(ca, [1])], {TD: X509Bundle(TD, (bad,))})
    assert result.revoked == ()
    assert "not signed by any authority" in result.rejected[0]
