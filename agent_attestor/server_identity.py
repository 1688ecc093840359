"""Which server the agent attests to: one presenting its own trust domain's server ID
(spiffe://<td>/svid/server), not any certificate named `svid-server` under the bundle's roots.

Under an upstream CA the bundle is the upstream root alone, which other trust domains' servers
may chain to as well, and their certificates carry the same DNS name. grpc's Python API neither
hands a client the server's certificate nor takes a check of its own, so the agent meets the
server first on a TLS connection of its own, reads the ID there, and then pins the gRPC channel
to the very certificate it checked (grpc takes any certificate of its roots as a trust anchor,
a leaf too): the join token goes to that server, or the handshake fails and nothing is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent_attestor.errors import ServerNotVerifiedError
from svid._errors import SvidError
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._ssl_peer import peer_chain_der
from svid._x509 import spiffe_id_from_cert

SERVER_NAME = "svid-server"
SERVER_PATH = ("svid", "server")


def _trust_domains_named(root_pem: bytes) -> set[str]:
    """The trust domains the roots' SPIFFE URI SANs name (svidd's own CAs carry theirs; an
    upstream root carries none)."""
    try:
        roots = x509.load_pem_x509_certificates(root_pem)
    except ValueError:
        return set()
    named: set[str] = set()
    for root in roots:
        try:
            sans = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            continue
        for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
            try:
                named.add(SpiffeId.parse(uri).trust_domain.name)
            except (ValueError, SvidError):
                continue
    return named


def expected_server_id(trust_domain: str, root_pem: bytes) -> SpiffeId:
    """The server ID the agent's server must present: of the configured trust domain, else of
    the one trust domain the roots name. Neither: refused, as any trust domain's server under
    those roots would do."""
    if not trust_domain:
        named = _trust_domains_named(root_pem)
        if len(named) != 1:
            raise ServerNotVerifiedError(
                "cannot tell this agent's server from another trust domain's: the trust "
                f"bundle's roots name {', '.join(sorted(named)) or 'no trust domain'} (an "
                "upstream CA's root names none); set trust_domain in the agent's configuration"
            )
        trust_domain = named.pop()
    return SpiffeId.from_segments(TrustDomain.parse(trust_domain), *SERVER_PATH)


def _context(root_pem: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=root_pem.decode("ascii", "replace"))
    # As grpc does: any certificate of the roots is a trust anchor (an upstream intermediate,
    # or the server certificate that insecure_bootstrap fetched).
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.set_alpn_protocols(["h2"])
    return context


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def server_certificate(
    address: str, root_pem: bytes, expected: SpiffeId, timeout: float
) -> bytes:
    """The PEM of the certificate the server at `address` presents: verified under `root_pem`
    for the name `svid-server`, and carrying `expected`, or ServerNotVerifiedError naming the ID
    it carries and the one expected. Nothing is sent but the TLS handshake."""
    host, port = _split(address)
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(
                host, port, ssl=_context(root_pem), server_hostname=SERVER_NAME
            )
    except TimeoutError:
        raise ConnectionError(f"no connection to {address} within {timeout:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise ServerNotVerifiedError(
            "the server's certificate does not verify against the trust bundle used: "
            f"CERTIFICATE_VERIFY_FAILED: {exc.verify_message}"
        ) from exc
    try:
        leaf_der = peer_chain_der(writer.get_extra_info("ssl_object"))[0]
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the server may refuse a client sending nothing
            await writer.wait_closed()
    leaf = x509.load_der_x509_certificate(leaf_der)
    try:
        presented = str(spiffe_id_from_cert(leaf))
    except (ValueError, SvidError) as exc:
        presented = f"no SPIFFE ID ({exc})"
    if presented != str(expected):
        raise ServerNotVerifiedError(
            f"the server at {address} is not this agent's: its certificate carries "
            f"{presented}, where {expected} was expected (another trust domain's server under "
            "the same root?); nothing was sent to it"
        )
    return leaf.public_bytes(Encoding.PEM)
