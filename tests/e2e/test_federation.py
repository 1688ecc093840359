"""Two trust domains, each with its own real server and agent, federated through their bundle
endpoints (https_spiffe): isolation, mutual TLS and JWT-SVIDs across the domains through
py-spiffe and svid, a CA rotation crossing over without restarts, and an endpoint going down."""

from __future__ import annotations

import socket
import ssl
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import JwtSource, JwtSvid
from spiffe import TrustDomain as PyTrustDomain
from spiffe import X509Source as PyX509Source

import svid
import svid.tls
from svid._der import parse_der_certs
from svid._proto import workload_pb2, workload_pb2_grpc
from tests.e2e.agent_process import HEADER
from tests.e2e.conftest import wait_for
from tests.e2e.federation_world import A, B, Domain, World, authorities, federated_world, views

pytestmark = pytest.mark.timeout(300)
REFRESH_HINT = 2
# Short CA and JWT key lives: the next CA is prepared (published) at 1/2 and activated at 5/6.
CA_TTL = 60
SHORT = {
    "bundle_endpoint_refresh_hint": REFRESH_HINT,
    # The floor on a peer's hint (a minute, as SPIRE's) would outlast the CA lives below.
    "federation_min_refresh": REFRESH_HINT,
    "ca_ttl": CA_TTL,
    "jwt_key_ttl": CA_TTL,
    "default_x509_svid_ttl": 20,
    "default_jwt_svid_ttl": 20,
    "agent_svid_ttl": CA_TTL,
    "server_svid_ttl": CA_TTL,
}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with federated_world(**SHORT) as made:
        yield made


@pytest.fixture(scope="module")
def alices_first_ca(world: World) -> bytes:
    """The issuer of alice's first SVID: taken by the first test that asks, before the CA that
    signed it is replaced (at 5/6 of its life, well after every test before the rotation's)."""
    return _issuer_of(world.a)


def test_0_a_ca_rotation_crosses_over_without_a_restart(
    world: World, alices_first_ca: bytes
) -> None:
    """First in the module: example.org's next CA is prepared half a CA life after its server
    started, while this test watches. Its activation, later, is test_z's: the tests between
    run while it waits."""
    a, b = world.a, world.b
    watching = authorities(a, A) == 1  # (run in another order, the rotation may be past)
    # example.org prepares its next CA at half the CA's life: alice's agent shows it first.
    t0 = wait_for(lambda: authorities(a, A) == 2 and time.monotonic(), CA_TTL, "A's next CA")
    t1 = wait_for(lambda: authorities(b, A) == 2 and time.monotonic(), 30, "the CA at bob")
    if watching:
        delay = t1 - t0
        print(f"foreign CA rotation -> other domain's workload: {delay:.2f} s")
        assert delay <= REFRESH_HINT + 1.5


def test_each_workload_sees_only_the_foreign_bundles_it_opted_into(world: World) -> None:
    alice, bob = views(world.a.socket), views(world.b.socket)
    carol, dave = world.run_other(world.a), world.run_other(world.b)
    a, b = f"spiffe://{A}", f"spiffe://{B}"
    assert alice == {
        "svids": [f"{a}/alice"],
        "federated_bundles": [b],
        "x509_bundles": [a, b],
        "jwt_bundles": [a, b],
    }
    assert bob == {
        "svids": [f"{b}/bob"],
        "federated_bundles": [a],
        "x509_bundles": [a, b],
        "jwt_bundles": [a, b],
    }
    assert carol == {
        "svids": [f"{a}/carol"],
        "federated_bundles": [],
        "x509_bundles": [a],
        "jwt_bundles": [a],
    }
    assert dave == {
        "svids": [f"{b}/dave"],
        "federated_bundles": [],
        "x509_bundles": [b],
        "jwt_bundles": [b],
    }


def _peer_id(sock: ssl.SSLSocket) -> str:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    (uri,) = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return str(uri)


def _exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, peer: Callable[[ssl.SSLSocket], str]
) -> dict[str, str]:
    """One mutual-TLS exchange over a socket pair: what each side saw of the other."""
    a, b = socket.socketpair()
    seen: dict[str, str] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(b, server_side=True) as tls:
                seen["server saw"] = peer(tls)
                tls.sendall(b"hello " + tls.recv(100))
        except (ssl.SSLError, OSError) as exc:
            seen["server error"] = str(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(a) as tls:
            seen["client saw"] = peer(tls)
            tls.sendall(b"ping")
            seen["reply"] = tls.recv(100).decode()
    finally:
        t.join(10)
        a.close()
    return seen


def _py_context(source: PyX509Source, server: bool, peer_td: str, tmp: Path) -> ssl.SSLContext:
    """A stdlib context from py-spiffe's material: our SVID, the peer domain's bundle."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        own = source.svid
    name = "server" if server else "client"
    cert_file, key_file = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert_file.write_bytes(
        b"".join(c.public_bytes(serialization.Encoding.PEM) for c in own.cert_chain)
    )
    key_file.write_bytes(
        own.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    bundle = source.get_bundle_for_trust_domain(PyTrustDomain(peer_td))
    assert bundle is not None, f"py-spiffe has no bundle for {peer_td}"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(cert_file, key_file)
    ctx.load_verify_locations(
        cadata=b"".join(c.public_bytes(serialization.Encoding.DER) for c in bundle.x509_authorities)
    )
    return ctx


def _mtls_py_spiffe(world: World) -> dict[str, str]:
    alice = PyX509Source(socket_path=world.a.socket, timeout_in_seconds=10)
    bob = PyX509Source(socket_path=world.b.socket, timeout_in_seconds=10)
    try:
        with tempfile.TemporaryDirectory() as raw:
            server_ctx = _py_context(bob, True, A, Path(raw))
            client_ctx = _py_context(alice, False, B, Path(raw))
            return _exchange(server_ctx, client_ctx, _peer_id)
    finally:
        alice.close()
        bob.close()


def _mtls_svid(world: World, *, federate: bool = True) -> dict[str, str]:
    with (
        svid.X509Source(world.a.socket) as alice,
        svid.X509Source(world.b.socket) as bob,
    ):
        server_ctx = svid.tls.server_context(
            bob, svid.TrustDomain(A), trust_domains=[A] if federate else None
        )
        client_ctx = svid.tls.client_context(
            alice, f"spiffe://{B}/bob", trust_domains=[B] if federate else None
        )
        return _exchange(server_ctx, client_ctx, lambda conn: str(svid.tls.peer_of(conn).spiffe_id))


EXPECTED = {
    "server saw": f"spiffe://{A}/alice",
    "client saw": f"spiffe://{B}/bob",
    "reply": "hello ping",
}


def test_workloads_of_two_domains_do_mutual_tls_through_py_spiffe(world: World) -> None:
    assert _mtls_py_spiffe(world) == EXPECTED


def test_workloads_of_two_domains_do_mutual_tls_through_svid_only_when_told_to(
    world: World,
) -> None:
    assert _mtls_svid(world) == EXPECTED
    refused = _mtls_svid_refusing(world)
    assert "server error" in refused or "client error" in refused, refused


def _mtls_svid_refusing(world: World) -> dict[str, str]:
    try:
        return _mtls_svid(world, federate=False)
    except (ssl.SSLError, OSError) as exc:
        return {"client error": str(exc)}


def test_a_jwt_svid_of_one_domain_is_validated_in_the_other(world: World) -> None:
    audience = f"spiffe://{B}/bob"
    with svid.WorkloadApiClient(world.a.socket) as client:
        token = client.fetch_jwt_svid(audience=[audience]).token
    # Through bob's agent, through py-spiffe on bob's bundles, through svid: accepted.
    assert views(world.b.socket, token, audience)["validate"] == "OK"
    source = JwtSource(socket_path=world.b.socket, timeout_in_seconds=10)
    try:
        bundle = source.get_bundle_for_trust_domain(PyTrustDomain(A))
        assert bundle is not None
        checked = JwtSvid.parse_and_validate(token, bundle, {audience})
        assert str(checked.spiffe_id) == f"spiffe://{A}/alice"
    finally:
        source.close()
    with svid.WorkloadApiSource(world.b.socket) as bundles:
        assert bundles.wait_ready(10)
        verified = bundles.jwt_verifier(trust_domains=[A]).verify(token, audience)
        assert str(verified.spiffe_id) == f"spiffe://{A}/alice"
        with pytest.raises(svid.VerificationError):
            bundles.jwt_verifier().verify(token, audience)
    # dave (other.org, not federating) is refused by his own agent.
    assert world.run_other(world.b, token, audience)["validate"] == "INVALID_ARGUMENT"


def _issuer_of(domain: Domain) -> bytes:
    with grpc.insecure_channel(f"unix:{domain.agent.socket_path}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        msg = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=10))
    return parse_der_certs(msg.svids[0].x509_svid)[0].issuer.public_bytes()


def test_the_federation_cli_lists_and_shows_relationships(world: World) -> None:
    listed = world.b.server.cli_json("federation", "list")
    assert [(r["trust_domain"], r["profile"]) for r in listed["relationships"]] == [
        (A, "https_spiffe")
    ]
    shown = world.b.server.cli_json("federation", "show", "--trust-domain", f"spiffe://{A}")
    assert shown["endpoint_spiffe_id"] == f"spiffe://{A}/svid/server"
    bundles = world.b.server.cli_json("bundle", "list")
    assert [x["trust_domain"] for x in bundles["bundles"]] == [f"spiffe://{A}"]
    missing = world.b.server.cli("federation", "show", "--trust-domain", "third.org", check=False)
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr or "no federation relationship" in missing.stderr


def test_z_the_next_ca_activated_is_accepted_across_without_a_restart(
    world: World, alices_first_ca: bytes
) -> None:
    """After test_0's prepare: once activated, alice's SVID chains to the new CA and bob
    accepts it without a restart."""
    # Each poll is a connection the agent identifies: a few a second, for the ~40 s it takes.
    wait_for(
        lambda: _issuer_of(world.a) != alices_first_ca, CA_TTL, "alice's SVID from the new CA", 0.25
    )
    assert _mtls_py_spiffe(world) == EXPECTED
    assert _mtls_svid(world) == EXPECTED


def test_zz_an_endpoint_outage_breaks_nothing(world: World) -> None:
    """Last in the module: example.org's server (and so its bundle endpoint) goes away;
    other.org keeps the last bundle it fetched, and alice (served from her agent's cache) is
    still accepted."""
    a, b = world.a, world.b
    a.server.stop()
    refused = b.server.cli("federation", "refresh", "--trust-domain", A, check=False)
    assert refused.returncode == 1
    assert "unreachable" in refused.stderr
    kept = b.server.cli_json("bundle", "show", "--id", A)
    assert kept["trust_domain"] == f"spiffe://{A}"
    assert [k["use"] for k in kept["bundle"]["keys"]].count("x509-svid") >= 1
    assert _mtls_svid(world) == EXPECTED
    assert _mtls_py_spiffe(world) == EXPECTED
    # Back up (same ports): other.org's next refresh finds the endpoint again.
    a.server.start()
    b.server.cli("federation", "refresh", "--trust-domain", A)
