"""svid.workloadapi against a real gRPC SpiffeWorkloadAPI server on a temp Unix socket."""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
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
from svid._der import tbs_names
from svid._proto import revocation_pb2
from svid._revocation import CertKey
from svid.workloadapi import (
    ENV_SOCKET,
    Backoff,
    JwtSvidValidationError,
    WorkloadApiAddressError,
    WorkloadApiError,
    WorkloadApiPermissionError,
    WorkloadApiUnavailableError,
    grpc_target,
    revoked_from_crls,
)
from tests.e2e.held_socket import HeldSocket
from tests.svid.aio_facade import FLAVORS, new_client, new_source, stopped
from tests.svid.certs import Issued, make_ca, make_leaf
from tests.svid.workload_fake import WAIT, Server, State, eventually, signed_crl
from tests.tmpdirs import short_tmpdir

TD = TrustDomain("example.org")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = short_tmpdir("h7w")
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


@pytest.fixture(params=FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    """Every client and source test runs against the thread-driven and the asyncio classes."""
    return str(request.param)


@pytest.fixture
def client(world: World, flavor: str) -> Iterator[Any]:
    with new_client(flavor, world.server.address, timeout=5.0) as c:
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


def test_fetch_x509_svids_sends_the_security_header(world: World, client: Any) -> None:
    svids = client.fetch_x509_svids()
    assert [str(s.spiffe_id) for s in svids] == ["spiffe://example.org/workload"]
    assert svids[0].hint == "internal"
    assert svids[0].leaf.serial_number == 0xBEEF
    assert world.state.headers == [("workload.spiffe.io", "true")]


def test_fetch_bundles(world: World, client: Any) -> None:
    x509_bundles = client.fetch_x509_bundles()
    assert x509_bundles.for_trust_domain(TD).authorities == (world.ca.cert,)
    world.state.change(crls=[signed_crl(world.ca, [5])])
    assert client.fetch_x509_bundles_and_crls().crls == (world.state.crls[0],)
    jwt_bundles = client.fetch_jwt_bundles()
    assert jwt_bundles.for_trust_domain(TD).get("k1") is not None


def test_fetch_and_validate_jwt_svid(client: Any) -> None:
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


def test_errors_are_svid_errors_chained_from_grpc(world: World, client: Any) -> None:
    with pytest.raises(WorkloadApiError, match="audience must be specified") as info:
        client.fetch_jwt_svid([])
    assert info.value.code == "INVALID_ARGUMENT"
    world.state.change(deny=True)
    for call in (client.fetch_x509_svids, client.fetch_x509_bundles, client.fetch_jwt_bundles):
        with pytest.raises(WorkloadApiPermissionError, match="no identity issued") as denied:
            call()
        assert isinstance(denied.value.__cause__, grpc.RpcError)


def test_unreachable_agent_is_unavailable(sock_dir: Path, flavor: str) -> None:
    with new_client(flavor, f"unix://{sock_dir}/nobody.sock", timeout=2.0) as c:
        with pytest.raises(WorkloadApiUnavailableError, match=r"nobody\.sock"):
            c.fetch_x509_svids()
        with pytest.raises(WorkloadApiUnavailableError):
            c.fetch_jwt_svid("svc")


def test_an_agent_slow_to_answer_a_connection_is_waited_for(
    world: World, sock_dir: Path, flavor: str
) -> None:
    # A connection had 100 ms to its agent's first HTTP/2 frame (gRPC's connect timeout is
    # its min_reconnect_backoff_ms): on a loaded host the first call failed, UNAVAILABLE "it
    # accepts connections but does not answer", its own deadline seconds away.
    with HeldSocket(sock_dir / "slow.sock", world.server.path) as slow:
        slow.hold_answers()  # the agent's SETTINGS, and all after, wait a second
        threading.Timer(1.0, slow.release).start()
        with new_client(flavor, slow.address, timeout=10.0) as c:
            svids = c.fetch_x509_svids()
    assert [str(s.spiffe_id) for s in svids] == ["spiffe://example.org/workload"]


def test_malformed_answer_is_a_workload_api_error(world: World, client: Any) -> None:
    world.state.change(x509={"spiffe://example.org": b"\x30\x03junk"})
    with pytest.raises(WorkloadApiError, match="unusable answer") as info:
        client.fetch_x509_bundles()
    assert info.value.code == "BAD_RESPONSE"


def test_watch_delivers_updates_and_cancels(world: World, client: Any) -> None:
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


def test_backoff_ceiling_doubles_up_to_the_cap_with_full_jitter() -> None:
    b = Backoff(initial=0.5, cap=3.0)
    for attempt, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 3.0), (40, 3.0)]:
        delays = [b.delay(attempt, random.Random(n)) for n in range(200)]
        assert max(delays) <= ceiling
        assert max(delays) > ceiling * 0.9
        assert min(delays) < ceiling * 0.1  # workloads of a restarted agent come back spread


@pytest.fixture
def source(world: World, flavor: str) -> Iterator[Any]:
    src = new_source(flavor, world.server.address, backoff=Backoff(0.02, 0.2))
    with src:
        assert src.wait_ready(WAIT)
        yield src


def test_source_feeds_verifiers(world: World, source: Any) -> None:
    xv = source.x509_verifier()
    assert str(xv.verify_der(der_concat([world.leaf.cert])).spiffe_id).endswith("/workload")
    token = sign_jws(
        {"kid": "k1"},
        {"sub": "spiffe://example.org/a", "aud": "svc", "exp": int(time.time()) + 60},
        world.jwt_key,
    )
    assert str(source.jwt_verifier().verify(token, "svc").spiffe_id) == "spiffe://example.org/a"


def test_unchanged_bundles_keep_identity_and_changes_apply(world: World, source: Any) -> None:
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


def _by_ca(world: World, serial: str) -> CertKey:
    """A certificate of ``world.ca`` by its revocation key (what a CRL of that CA revokes)."""
    return TD.name, tbs_names(world.ca.cert.tbs_certificate_bytes)[1], serial


def test_signed_crl_revokes_and_forged_crl_is_ignored(world: World, source: Any) -> None:
    xv = source.x509_verifier()
    leaf_der = der_concat([world.leaf.cert])
    xv.verify_der(leaf_der)
    impostor = make_ca()  # same subject name, different key
    world.state.change(crls=[signed_crl(impostor, [0xBEEF])])
    eventually(lambda: source.rejected_crls, "forged CRL rejected")
    assert "not signed by any authority" in source.rejected_crls[0]
    xv.verify_der(leaf_der)  # still fine
    world.state.change(crls=[signed_crl(world.ca, [0xBEEF])])
    # A CRL's entries revoke its issuer's certificates (by issuer and serial), not the serial
    # whoever issued it.
    eventually(lambda: source.revocations.is_revoked(_by_ca(world, "beef")), "CRL applied")
    assert not source.revocations.is_serial_revoked("beef")
    with pytest.raises(RevokedError, match="beef"):
        xv.verify_der(leaf_der)
    world.state.change(crls=[])  # full state: an emptied CRL list un-revokes
    eventually(lambda: not source.revocations.is_revoked(_by_ca(world, "beef")), "CRL dropped")
    xv.verify_der(leaf_der)


def test_a_serial_listed_in_any_of_several_crls_is_revoked(world: World, source: Any) -> None:
    # The server splits a big revocation list over several CRLs of one CA (server.tasks.crl).
    xv = source.x509_verifier()
    leaf_der = der_concat([world.leaf.cert])
    crls = [
        signed_crl(world.ca, [1, 2]),
        signed_crl(world.ca, [3]),
        signed_crl(world.ca, [4, 0xBEEF, 5]),
    ]
    world.state.change(crls=crls)
    eventually(lambda: source.revocations.is_revoked(_by_ca(world, "beef")), "the last CRL applied")
    with pytest.raises(RevokedError, match="beef"):
        xv.verify_der(leaf_der)
    assert all(source.revocations.is_revoked(_by_ca(world, s)) for s in ("1", "2", "3", "4", "5"))
    result = revoked_from_crls(crls, {TD: X509Bundle(TD, (world.ca.cert,))})
    assert sorted(r.value for r in result.revoked) == ["1", "2", "3", "4", "5", "beef"]
    assert result.rejected == ()


def test_revocation_stream_revokes_jtis(world: World, source: Any) -> None:
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


def test_source_without_revocation_stream(world: World, sock_dir: Path, flavor: str) -> None:
    plain = Server(world.state, sock_dir / "plain.sock", revocations=False).start()
    try:
        with new_source(flavor, plain.address, backoff=Backoff(0.02, 0.2)) as src:
            assert src.wait_ready(WAIT)
            eventually(lambda: src.revocation_stream_supported is False, "UNIMPLEMENTED seen")
    finally:
        plain.stop()


def test_source_reconnects_after_agent_restart(world: World, flavor: str) -> None:
    with new_source(flavor, world.server.address, backoff=Backoff(0.02, 0.2)) as src:
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
    assert stopped(src)


def test_source_before_first_message_fails_closed(
    sock_dir: Path, world: World, flavor: str
) -> None:
    src = new_source(flavor, f"unix://{sock_dir}/none.sock", backoff=Backoff(0.02, 0.1)).start()
    try:
        assert not src.wait_ready(0.2)
        assert src.x509_bundle_for(TD) is None
        with pytest.raises(VerificationError, match=r"no X\.509 bundle"):
            src.x509_verifier().verify_der(der_concat([world.leaf.cert]))
    finally:
        src.stop()
    assert stopped(src)


def test_crl_reader_refuses_garbage(world: World) -> None:
    result = revoked_from_crls(
        [b"junk", signed_crl(world.ca, [1, 2])], {TD: X509Bundle(TD, (world.ca.cert,))}
    )
    assert {r.value for r in result.revoked} == {"1", "2"}
    assert len(result.rejected) == 1
    assert "not a readable DER CRL" in result.rejected[0]


def test_crl_with_an_invalid_version_is_refused_not_raised() -> None:
    # Found by tests/fuzz: cryptography's InvalidVersion is not a ValueError.
    ca = make_ca()
    crl = signed_crl(ca, [1]).replace(b"\x02\x01\x01", b"\x02\x01\x05", 1)  # version v2 -> 5
    result = revoked_from_crls([crl], {TD: X509Bundle(TD, (ca.cert,))})
    assert result.revoked == ()
    assert "not a readable DER CRL" in result.rejected[0]


def test_crl_of_an_authority_with_duplicate_extensions_is_refused_not_raised() -> None:
    # Found by tests/fuzz: DuplicateExtension (no ValueError) escaped revoked_from_crls.
    ca = make_ca()
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    dup = der.replace(b"\x06\x03\x55\x1d\x0e", b"\x06\x03\x55\x1d\x0f", 1)  # SKID -> KU
    bad = x509.load_der_x509_certificate(dup)
    result = revoked_from_crls([signed_crl(ca, [1])], {TD: X509Bundle(TD, (bad,))})
    assert result.revoked == ()
    assert "not signed by any authority" in result.rejected[0]


def test_crl_of_an_authority_with_an_unreadable_key_is_refused_not_raised() -> None:
    # Found by tests/fuzz: UnsupportedAlgorithm escaped revoked_from_crls.
    ca = make_ca()
    der = ca.cert.public_bytes(serialization.Encoding.DER)
    curve = bytes.fromhex("2a8648ce3d030107")  # prime256v1 -> an unknown curve OID
    bad = x509.load_der_x509_certificate(der.replace(curve, b"\x2b" + curve[1:], 1))
    result = revoked_from_crls([signed_crl(ca, [1])], {TD: X509Bundle(TD, (bad,))})
    assert result.revoked == ()
    assert "not signed by any authority" in result.rejected[0]
