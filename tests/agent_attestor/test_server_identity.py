"""Which server an agent talks to: the one of its trust domain, not any certificate named
`svid-server` under its trust bundle's roots."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from agent_attestor.errors import AttestationError, JoinTokenRefusedError, ServerNotVerifiedError
from agent_attestor.node_client import NodeClient
from agent_attestor.server_identity import anchors, kept_pin, server_anchors
from svid._clock import SystemClock, to_datetime
from svid._proto import node_pb2, node_pb2_grpc
from svid._spiffe_id import SpiffeId
from tests.agent_attestor.pki import LocalCa
from tests.agent_attestor.test_join_token import _server_tls as server_tls
from tests.agent_attestor.test_join_token import server_pems
from tests.server.fixtures import PEM, bundle_pem
from tests.server.shared_root import two_trust_domains


def test_an_agent_does_not_hand_its_join_token_to_a_server_of_another_trust_domain() -> None:
    """Two trust domains under one corporate root (each server with its own upstream
    intermediate): the bundle an operator gives an agent of example.org is that root. The
    agent pointed at the other trust domain's server (a wrong address, a DNS answer someone
    forged) must refuse it as not its server before it sends its join token; whoever runs that
    server could otherwise spend the token, still valid, as this node."""
    with two_trust_domains() as shared:
        token = shared.ours.join_token()
        agents_bundle = bundle_pem(shared.ours.bundle())
        theirs = shared.theirs.runtime
        # The root names no trust domain: the agent is told its own (trust_domain).
        client = NodeClient(
            theirs.node_address, theirs.attest_address, agents_bundle, trust_domain="example.org"
        )
        # What the agent gets: a refusal of its token by the other server, which received it.
        with pytest.raises((ServerNotVerifiedError, JoinTokenRefusedError)) as caught:
            asyncio.run(client.attest(join_token=token, timeout=10))
        assert isinstance(caught.value, ServerNotVerifiedError), (
            f"the join token went to other.example's server: {caught.value}"
        )
        assert "carries spiffe://other.example/svid/server, where " in str(caught.value)
        assert "spiffe://example.org/svid/server was expected" in str(caught.value)
        # The token was never spent: the agent's own server takes it.
        ours = shared.ours.runtime
        own = NodeClient(
            ours.node_address, ours.attest_address, agents_bundle, trust_domain="example.org"
        )
        svid, _bundle = asyncio.run(own.attest(join_token=token, timeout=10))
        assert svid.spiffe_id.startswith("spiffe://example.org/svid/agent/")


def test_an_agent_not_told_its_trust_domain_under_a_root_naming_none_sends_nothing() -> None:
    """An upstream root names no trust domain, so nothing tells the agent which server under it
    is its own: it refuses to attest, saying what to set, rather than trust any of them."""
    with two_trust_domains() as shared:
        token = shared.ours.join_token()
        ours = shared.ours.runtime
        client = NodeClient(
            ours.node_address, ours.attest_address, bundle_pem(shared.ours.bundle())
        )
        with pytest.raises(ServerNotVerifiedError) as caught:
            asyncio.run(client.attest(join_token=token, timeout=10))
        assert "roots name no trust domain" in str(caught.value)
        assert "set trust_domain" in str(caught.value)
        # Nothing reached the server: the token still attests.
        assert shared.ours.attest(token).spiffe_id.startswith("spiffe://example.org/")


# What a TLS 1.3 client signs to prove its certificate's key (RFC 8446 §4.4.3), over some
# transcript hash: a message whoever asks an x509pop agent for a "challenge" may choose.
_TLS13_CLIENT_VERIFY = b" " * 64 + b"TLS 1.3, client CertificateVerify\x00" + bytes(range(32))


def x509pop_refusals(
    node: node_pb2_grpc.NodeServicer, ca: LocalCa, node_key: ec.EllipticCurvePrivateKey
) -> list[AttestationError]:
    """The errors a NodeClient's x509pop attestation (node certificate `ca.cert`, key
    `node_key`) ends with against `node`, served over TLS by `ca`: one, or none if admitted."""
    refused: list[AttestationError] = []

    async def scenario() -> None:
        server = grpc.aio.server()
        node_pb2_grpc.add_NodeServicer_to_server(node, server)
        port = server.add_secure_port("127.0.0.1:0", server_tls(ca))
        await server.start()
        address = f"127.0.0.1:{port}"
        client = NodeClient(address, address, ca.cert.public_bytes(PEM))
        try:
            await client.attest(x509pop=([ca.cert], node_key), timeout=10)
        except AttestationError as exc:
            refused.append(exc)
        finally:
            await client.close()
            await server.stop(None)

    asyncio.run(scenario())
    return refused


class _AskingNode(node_pb2_grpc.NodeServicer):
    """A server that sends the x509pop agent a challenge of its choosing and keeps the answer."""

    def __init__(self, challenge: bytes) -> None:
        self.challenge = challenge
        self.answers: list[bytes] = []

    async def Attest(  # type: ignore[override]
        self, request_iterator: AsyncIterator[node_pb2.AttestRequest], context: Any
    ) -> None:
        await request_iterator.__anext__()
        await context.write(node_pb2.AttestResponse(challenge=self.challenge))
        answer = await request_iterator.__anext__()
        self.answers.append(bytes(answer.challenge_response))
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")


# A TLS 1.3 CertificateVerify is refused unsigned (not a 32-byte nonce); 32 bytes a server
# chose (another protocol's digest, say) are signed only behind x509pop's own context.
@pytest.mark.parametrize(
    "challenge", [_TLS13_CLIENT_VERIFY, bytes(range(32))], ids=["tls13-verify", "32-bytes"]
)
def test_an_x509pop_agent_signs_only_a_nonce_not_what_a_server_chooses(challenge: bytes) -> None:
    """The node key is the node's certificate key, which the node may use elsewhere (its TLS
    client identity in the same PKI). The agent's proof must not be a signature over any
    bytes a server sends: a 32-byte nonce, signed in a form of its own, or nothing."""
    ca = LocalCa(SystemClock())
    node_key = ec.generate_private_key(ec.SECP256R1())
    asking = _AskingNode(challenge)
    refused = x509pop_refusals(asking, ca, node_key)
    # The exchange took place: the agent got the challenge and came to an end of it.
    assert len(refused) == 1
    if len(challenge) == 32:
        assert len(asking.answers) == 1
    else:
        assert asking.answers == []
        assert "32-byte nonce" in str(refused[0])
    for answer in asking.answers:
        with pytest.raises(InvalidSignature):
            node_key.public_key().verify(answer, challenge, ec.ECDSA(hashes.SHA256()))


class _Refusing(node_pb2_grpc.NodeServicer):
    """A server of the agent's trust domain that hears the join token and refuses it."""

    def __init__(self) -> None:
        self.heard = 0

    async def Attest(  # type: ignore[override]
        self, request_iterator: AsyncIterator[node_pb2.AttestRequest], context: Any
    ) -> None:
        await request_iterator.__anext__()
        self.heard += 1
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "join token already used")


async def _balancer(
    backends: list[int], route: Callable[[int], int] | None = None
) -> asyncio.Server:
    """One address in front of several servers (an L4 load balancer, a virtual IP): each new
    connection goes to the next backend, round robin (or to the backend `route` picks for the
    connection's number)."""
    turn = 0

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal turn
        port = backends[route(turn) if route else turn % len(backends)]
        turn += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def _attest_behind_one_address(
    credentials: list[grpc.ServerCredentials],
    root_pem: bytes,
    route: Callable[[int], int] | None = None,
) -> tuple[list[Exception], list[_Refusing]]:
    """An agent attesting with a join token through one address in front of a refusing server
    per credentials: what it raised, and the servers (which count the tokens they heard)."""
    servers = [_Refusing() for _ in credentials]
    outcome: list[Exception] = []
    running, ports = [], []
    for servicer, tls in zip(servers, credentials, strict=True):
        server = grpc.aio.server()
        node_pb2_grpc.add_NodeServicer_to_server(servicer, server)
        ports.append(server.add_secure_port("127.0.0.1:0", tls))
        await server.start()
        running.append(server)
    balancer = await _balancer(ports, route)
    address = f"127.0.0.1:{balancer.sockets[0].getsockname()[1]}"
    client = NodeClient(address, address, root_pem, trust_domain="example.org")
    try:
        await client.attest(join_token="tok1.secret", timeout=10)
    except AttestationError as exc:
        outcome.append(exc)
    finally:
        await client.close()
        balancer.close()
        for server in running:
            await server.stop(None)
    return outcome, servers


def test_an_agent_attests_through_one_attest_address_in_front_of_several_servers() -> None:
    """`--server-attest-addresses` may give one Attest address for all servers, which is then
    a load balancer in front of them. Each server of the trust domain has a certificate of its
    own, all carrying the trust domain's server ID under the agent's bundle: whichever the
    join token reaches is the agent's server. Pinning the gRPC channel to the certificate the
    probe connection saw fails the handshake whenever the balancer sends the channel to
    another server: the agent then reports the bundle as not verifying the server."""
    ca = LocalCa(SystemClock())
    outcome, servers = asyncio.run(
        _attest_behind_one_address([server_tls(ca), server_tls(ca)], ca.cert.public_bytes(PEM))
    )
    assert len(outcome) == 1
    # Reached one of the trust domain's servers, which answered for the token.
    assert isinstance(outcome[0], JoinTokenRefusedError), (
        f"{type(outcome[0]).__name__}: {outcome[0]}"
    )
    assert sum(s.heard for s in servers) == 1


def _own_ca(issuer: LocalCa | None = None) -> LocalCa:
    """A CA of example.org as svidd makes one per rotation: naming its trust domain, with a
    subject of its own, self-signed or under an upstream root `issuer`."""
    ca = LocalCa(SystemClock())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"example.org CA {id(ca)}")])
    signer = issuer or ca
    now = ca.clock.now()
    ca.cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(to_datetime(now - 3600))
        .not_valid_after(to_datetime(now + 86400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org")]),
            critical=False,
        )
        .sign(signer.key, hashes.SHA256())
    )
    return ca


def test_an_agent_attests_through_one_address_to_servers_of_the_old_and_the_new_ca() -> None:
    """In a CA rotation one server's certificate may already be signed by the new CA while
    another's is still by the old: both are the trust domain's own, in the agent's bundle. The
    probe meeting one and the channel reaching the other is no reason to refuse."""
    old, new = _own_ca(), _own_ca()
    bundle = old.cert.public_bytes(PEM) + new.cert.public_bytes(PEM)
    outcome, servers = asyncio.run(
        _attest_behind_one_address([server_tls(old), server_tls(new)], bundle)
    )
    assert len(outcome) == 1
    assert isinstance(outcome[0], JoinTokenRefusedError), (
        f"{type(outcome[0]).__name__}: {outcome[0]}"
    )
    assert sum(s.heard for s in servers) == 1


def test_an_agent_attests_under_an_upstream_intermediate_without_an_authority_key_id() -> None:
    """Python 3.13's default TLS context holds certificates to RFC 5280's letter: there the
    agent's server check refused a chain whose upstream intermediate carries no Authority Key
    Identifier, which the gRPC channel takes, and the agent retried for good (3.11 and 3.12
    took it)."""
    root = LocalCa(SystemClock(), trust_domain="corporate.example")
    ca = _own_ca(root)
    with pytest.raises(x509.ExtensionNotFound):
        ca.cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    outcome, servers = asyncio.run(
        _attest_behind_one_address([server_tls(ca, chain=True)], root.cert.public_bytes(PEM))
    )
    assert len(outcome) == 1
    assert isinstance(outcome[0], JoinTokenRefusedError), (
        f"{type(outcome[0]).__name__}: {outcome[0]}"
    )
    assert servers[0].heard == 1


def test_an_agent_probes_again_when_the_server_it_reaches_has_a_ca_its_bundle_does_not_name() -> (
    None
):
    """Under an upstream root the bundle is that root alone: it does not tell the agent the new
    CA of a rotation. A server whose certificate the new CA signed fails the channel pinned to
    the old CA the probe saw; nothing was sent, and the agent probes once more (meeting the
    new CA) before giving up."""
    root = LocalCa(SystemClock(), trust_domain="corporate.example")  # not a CA of ours
    old, new = _own_ca(root), _own_ca(root)
    outcome, servers = asyncio.run(
        _attest_behind_one_address(
            [server_tls(old, chain=True), server_tls(new, chain=True)],
            root.cert.public_bytes(PEM),
            route=lambda n: 0 if n == 0 else 1,  # the probe to the old CA's server, then the new
        )
    )
    assert len(outcome) == 1
    assert isinstance(outcome[0], JoinTokenRefusedError), (
        f"{type(outcome[0]).__name__}: {outcome[0]}"
    )
    assert [s.heard for s in servers] == [0, 1]


def test_an_agent_behind_one_address_with_another_trust_domains_server_sends_it_nothing() -> None:
    """One address in front of the agent's server and another trust domain's under the same
    root (a balancer misconfigured, or someone's): the probe checks ours, the channel reaches
    theirs, whose certificate our CA did not sign. The handshake fails, the token stays with
    the agent, and the agent says the server reached is not the one it checked, rather than
    blaming its bundle."""
    with two_trust_domains() as shared:
        token = shared.ours.join_token()
        ports = [
            int(r.attest_address.rpartition(":")[2])
            for r in (shared.ours.runtime, shared.theirs.runtime)
        ]

        async def scenario() -> Exception:
            balancer = await _balancer(ports)
            address = f"127.0.0.1:{balancer.sockets[0].getsockname()[1]}"
            client = NodeClient(
                address, address, bundle_pem(shared.ours.bundle()), trust_domain="example.org"
            )
            try:
                with pytest.raises(ServerNotVerifiedError) as caught:
                    await client.attest(join_token=token, timeout=10)
                return caught.value
            finally:
                await client.close()
                balancer.close()

        error = asyncio.run(scenario())
        assert "is not the one checked there" in str(error)
        assert "trust bundle" not in str(error)
        # The token never left the agent: its own server takes it.
        assert shared.ours.attest(token).spiffe_id.startswith("spiffe://example.org/")


def test_the_attest_channel_trusts_a_ca_only_where_it_is_the_trust_domains_own() -> None:
    """Pinning the CA that signed the checked server certificate lets through every certificate
    that CA signed: only right for a CA of the agent's trust domain (svidd's, naming it). A
    server certificate signed straight by a root other trust domains share keeps the pin on
    that certificate alone, and the one insecure_bootstrap fetched as the bundle stays its own
    anchor."""
    server_id = "spiffe://example.org/svid/server"
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    shared = LocalCa(SystemClock(), trust_domain="corporate.example")
    by_shared = shared.sign_leaf(key, server_id)
    assert anchors(by_shared, [], [shared.cert], "example.org") == [by_shared]
    active, prepared, other = _own_ca(), _own_ca(), _own_ca(shared)
    by_active = active.sign_leaf(key, server_id)
    assert anchors(by_active, [], [active.cert, prepared.cert], "example.org") == [
        active.cert,
        prepared.cert,
    ]
    assert anchors(by_active, [active.cert], [shared.cert], "example.org") == [active.cert]
    assert anchors(by_active, [other.cert], [shared.cert], "example.org") == [by_active]
    assert anchors(by_active, [], [by_active], "example.org") == [by_active]


def test_a_channel_checked_again_keeps_the_trust_domains_cas_it_pinned_until_they_expire() -> None:
    """Mid-rotation under an upstream root the servers behind one address present the old CA's
    certificate or the new one's: the CA pinned before stays beside the one a new check finds,
    but no leaf pinned alone, no CA of another trust domain, and none once it expired."""
    shared = LocalCa(SystemClock(), trust_domain="corporate.example")
    old, new = _own_ca(shared), _own_ca(shared)
    leaf = old.sign_leaf(ec.generate_private_key(ec.SECP256R1()).public_key(), "spiffe://x/y")
    pem = {c: c.public_bytes(PEM) for c in (old.cert, new.cert, leaf)}
    now = SystemClock().now()
    assert kept_pin(pem[new.cert], pem[old.cert], "example.org", now) == (
        pem[new.cert] + pem[old.cert]
    )
    assert kept_pin(pem[new.cert], pem[new.cert] + pem[old.cert], "example.org", now) == (
        pem[new.cert] + pem[old.cert]
    )
    assert kept_pin(pem[new.cert], pem[leaf], "example.org", now) == pem[new.cert]
    assert kept_pin(pem[new.cert], pem[old.cert], "other.example", now) == pem[new.cert]
    expired = old.cert.not_valid_after_utc.timestamp()
    assert kept_pin(pem[new.cert], pem[old.cert], "example.org", expired) == pem[new.cert]
    assert kept_pin(pem[new.cert], b"", "example.org", now) == pem[new.cert]


def test_checks_alternating_between_the_old_and_new_cas_servers_keep_one_pin() -> None:
    """Mid-rotation behind a balancer, each check of the server may meet either CA. The pin
    then holds both whichever came first; a pin of the same CAs in another order is a new pin
    to NodeClient._check, which retires the channel in use and opens another at every check,
    the retired ones kept until the client closes."""
    shared = LocalCa(SystemClock(), trust_domain="corporate.example")
    old, new = _own_ca(shared), _own_ca(shared)
    now = SystemClock().now()
    pin = kept_pin(old.cert.public_bytes(PEM), b"", "example.org", now)
    pins = []
    for ca in (new, old, new, old):
        pin = kept_pin(ca.cert.public_bytes(PEM), pin, "example.org", now)
        pins.append(pin)
    assert len(set(pins)) == 1, f"{len(set(pins))} pins of the same two CAs"


def test_a_server_that_stalls_after_its_handshake_does_not_hold_the_check_past_its_timeout(
    tmp_path: Path,
) -> None:
    """The handshake was bounded and the close after it was not: a server that never answers
    the close held the check (and the pinning lock with it) for asyncio's 30 s TLS shutdown."""
    ca = LocalCa(SystemClock())
    key_pem, chain_pem = server_pems(ca)
    (tmp_path / "key.pem").write_bytes(key_pem)
    (tmp_path / "chain.pem").write_bytes(chain_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[ssl.SSLSocket] = []
    release = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        tls = context.wrap_socket(conn, server_side=True)  # the handshake, then nothing read
        held.append(tls)
        release.wait(60)
        tls.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        expected = SpiffeId.parse("spiffe://example.org/svid/server")
        started = time.monotonic()
        root = ca.cert.public_bytes(Encoding.PEM)
        pem = asyncio.run(server_anchors(f"127.0.0.1:{port}", root, expected, 2.0))
        took = time.monotonic() - started
    finally:
        release.set()
        server.join(5)
        listener.close()
    assert ca.cert.public_bytes(Encoding.PEM) in pem
    assert took < 5, f"the check took {took:.1f} s against its 2 s timeout"
