"""Which server the agent attests to, and then syncs with: one presenting its own trust domain's
server ID (spiffe://<td>/svid/server), not any certificate named `svid-server` under the bundle's
roots.

Under an upstream CA the bundle is the upstream root alone, which other trust domains' servers
may chain to as well, and their certificates carry the same DNS name. grpc's Python API neither
hands a client the server's certificate nor takes a check of its own, so the agent meets the
server first on a TLS connection of its own, reads the ID there, and then pins the gRPC channel
to the trust domain's own CA that signed the certificate it checked (grpc takes any certificate
of its roots as a trust anchor, an intermediate too). Not to that certificate itself: one Attest
address may balance several servers of the trust domain, each with a certificate of its own,
and the channel's connection need not reach the server the probe did. A svidd CA names its
trust domain and signs server IDs of that trust domain only, so any certificate it signed is
one of the agent's servers; another trust domain's server under the same root has a CA of its
own, fails the handshake, and nothing is sent.

The agent SVID's channel (Sync, renewals, minting: node_client.NodeClient) is pinned the same
way, to the CA of the trust domain named by the agent's own SVID, and checked again at each of
its connections: under an upstream root a rotation's new CA is in no bundle the agent receives,
and a channel pinned once would refuse the agent's own server when its certificate changes.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from agent_attestor.errors import ServerNotOursError, ServerNotVerifiedError
from svid._cache import LruCache
from svid._errors import SvidError
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._ssl_peer import peer_chain_der
from svid._x509 import spiffe_id_from_cert

SERVER_NAME = "svid-server"
SERVER_PATH = ("svid", "server")


def _roots(root_pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(root_pem)
    except ValueError:
        return []


def _named(cert: x509.Certificate) -> set[str]:
    """The trust domains `cert`'s SPIFFE URI SANs name."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    named: set[str] = set()
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            named.add(SpiffeId.parse(uri).trust_domain.name)
        except (ValueError, SvidError):
            continue
    return named


def _trust_domains_named(root_pem: bytes) -> set[str]:
    """The trust domains the roots' SPIFFE URI SANs name (svidd's own CAs carry theirs; an
    upstream root carries none)."""
    return {name for root in _roots(root_pem) for name in _named(root)}


def _is_ca_of(cert: x509.Certificate, trust_domain: str) -> bool:
    """Whether `cert` is a CA of `trust_domain` alone (a svidd CA carries its trust domain's ID
    as its one URI SAN; an upstream or corporate CA names none)."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return constraints.ca and _named(cert) == {trust_domain}


def _issuers(
    leaf: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """The candidates whose key signed `leaf`."""
    found: list[x509.Certificate] = []
    for candidate in candidates:
        if candidate == leaf or candidate in found:
            continue
        try:
            leaf.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        found.append(candidate)
    return found


def anchors(
    leaf: x509.Certificate,
    presented: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    trust_domain: str,
) -> list[x509.Certificate]:
    """What the Attest channel trusts once `leaf` (presented with `presented` above it, verified
    under `roots`) was checked as the server of `trust_domain`: the trust domain's CA that
    signed it, and beside it the bundle's other CAs of the trust domain (the CA prepared in a
    rotation, which may have signed the certificate of the server the channel reaches). The
    leaf itself where it is a root (insecure_bootstrap fetched it: nothing above it was
    verified), or where its issuer is not the trust domain's own (a CA shared with other trust
    domains would let their servers through)."""
    if leaf in roots:
        return [leaf]
    ours = [ca for ca in _issuers(leaf, [*presented, *roots]) if _is_ca_of(ca, trust_domain)]
    if not ours:
        return [leaf]
    return ours + [r for r in roots if r not in ours and _is_ca_of(r, trust_domain)]


def kept_pin(fresh_pem: bytes, previous_pem: bytes, trust_domain: str, now: float) -> bytes:
    """What a channel checked again trusts: `fresh_pem` (server_anchors now), and beside it the
    CAs of `trust_domain` the previous check pinned (`previous_pem`, under the same roots) that
    have not expired. A rotation under an upstream root is met by each server of the trust
    domain at its own server-SVID renewal: until the last one renews, some present the old CA's
    certificate and some the new one's, and a balancer hands the agent's connections to either.
    A leaf pinned alone (see anchors) is not carried on: it is no CA of the trust domain.
    The same certificates as `previous_pem` are `previous_pem` itself, whatever order the check
    found them in: the node client opens a new channel for a pin whose bytes differ."""
    fresh = _roots(fresh_pem)
    previous = _roots(previous_pem)
    kept = [
        ca
        for ca in previous
        if ca not in fresh
        and _is_ca_of(ca, trust_domain)
        and ca.not_valid_after_utc.timestamp() > now
    ]
    if fresh and set(fresh + kept) == set(previous):
        return previous_pem
    return fresh_pem + b"".join(ca.public_bytes(Encoding.PEM) for ca in kept)


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


def _present(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Have `context` present `chain_pem` with its `key_pem`. ssl reads them from a file only:
    an anonymous one in memory, gone with its descriptor, so the key is never on a disk."""
    fd = os.memfd_create("agent-svid", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as memory:
            memory.write(chain_pem + key_pem)
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _context(root_pem: bytes, client: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=root_pem.decode("ascii", "replace"))
    # As grpc does: any certificate of the roots is a trust anchor (an upstream intermediate,
    # or the server certificate that insecure_bootstrap fetched).
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    # Nor does grpc hold certificates to RFC 5280's letter, which Python 3.13's default context
    # does: there an upstream CA's intermediate without an Authority Key Identifier failed this
    # check (the agent retrying for good) where the channel itself takes the chain.
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    context.set_alpn_protocols(["h2"])
    if client is not None:
        _present(context, *client)
    return context


class CheckContexts:
    """The TLS contexts of the server check, each built once per (roots, client identity) and
    reused: a build parses the roots and loads the key again (~4 ms of CPU), and the agent
    checks its server at every connect (every renewal, every reconnect). The newest `size`
    are kept: the attestation's (no client) and the agent SVID's."""

    def __init__(self, size: int = 2) -> None:
        # The oldest dropped past `size`: roots or an SVID replaced, not used again.
        self._held: LruCache[tuple[bytes, tuple[bytes, bytes] | None], ssl.SSLContext] = LruCache(
            size
        )

    def get(self, root_pem: bytes, client: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
        key = (root_pem, client)
        context = self._held.get(key)
        if context is None:
            context = _context(root_pem, client)
            self._held.put(key, context)
        return context


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


async def server_anchors(
    address: str,
    root_pem: bytes,
    expected: SpiffeId,
    timeout: float,
    *,
    client: tuple[bytes, bytes] | None = None,
    contexts: CheckContexts | None = None,
) -> bytes:
    """The PEM of what a channel to `address` trusts (see anchors), once the server there
    presented a certificate verified under `root_pem` for the name `svid-server` and carrying
    `expected`; else ServerNotVerifiedError (ServerNotOursError: it verified, but carries
    another ID, which it names beside the one expected). `client`: the (chain, key) PEMs this
    handshake presents, where the server asks for a client certificate (the node API: one
    refused there leaves a failed handshake in the server's log); `contexts`: where its TLS
    context is kept between checks (None: built for this one). Nothing is sent but the TLS
    handshake."""
    host, port = _split(address)
    context = (contexts or CheckContexts()).get(root_pem, client)
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=SERVER_NAME
            )
    except TimeoutError:
        raise ConnectionError(f"no connection to {address} within {timeout:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise ServerNotVerifiedError(
            "the server's certificate does not verify against the trust bundle used: "
            f"CERTIFICATE_VERIFY_FAILED: {exc.verify_message}"
        ) from exc
    try:
        chain = [
            x509.load_der_x509_certificate(d)
            for d in peer_chain_der(writer.get_extra_info("ssl_object"))
        ]
    finally:
        writer.close()
        # The server may refuse a client sending nothing (OSError), or never answer the close:
        # bounded as the handshake is, not by asyncio's 30 s TLS shutdown, and then cut.
        try:
            async with asyncio.timeout(timeout):
                await writer.wait_closed()
        except OSError:
            pass
        except TimeoutError:
            writer.transport.abort()
    leaf = chain[0]
    try:
        presented = str(spiffe_id_from_cert(leaf))
    except (ValueError, SvidError) as exc:
        presented = f"no SPIFFE ID ({exc})"
    if presented != str(expected):
        raise ServerNotOursError(
            f"the server at {address} is not this agent's: its certificate carries "
            f"{presented}, where {expected} was expected (another trust domain's server under "
            "the same root?); nothing was sent to it"
        )
    pinned = anchors(leaf, chain[1:], _roots(root_pem), expected.trust_domain.name)
    return b"".join(cert.public_bytes(Encoding.PEM) for cert in pinned)
