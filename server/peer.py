"""Who is calling on the mTLS port: the agent SPIFFE ID and certificate serial from the TLS peer."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from server.errors import PermissionDeniedError, UnauthenticatedError
from server.ids import ServerIds
from svid._errors import SvidError
from svid._x509 import spiffe_id_from_cert


@dataclass(frozen=True)
class AgentPeer:
    spiffe_id: str
    serial: str  # lowercase hex
    # The certificate's validity (Unix seconds; 0: not known, never adopted): what tells a
    # certificate a restored datastore lost from one it superseded (server/restore_adoption.py).
    not_before: int = 0
    not_after: int = 0


# The CAs whose certificates are our agents' (CaManager.issuing_cas), asked on each new one.
IssuingCas = Callable[[], Sequence[x509.Certificate]]


def _issued_by_any(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> bool:
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def _parse_peer(pem: bytes, ids: ServerIds, cas: IssuingCas) -> AgentPeer:
    try:
        cert = x509.load_pem_x509_certificate(pem)
        spiffe_id = spiffe_id_from_cert(cert)
    except (ValueError, SvidError) as exc:
        raise UnauthenticatedError(f"client certificate is not an X.509-SVID: {exc}") from None
    if not ids.is_agent(spiffe_id):
        raise PermissionDeniedError(
            f"{spiffe_id} is not an agent ID of trust domain {ids.trust_domain}"
        )
    serial = format(cert.serial_number, "x")
    # The handshake checked the chain up to the bundle's roots, which under an upstream CA is
    # a root other CAs (other trust domains') chain to as well: an agent's ID and serial are
    # no secret, so only a certificate our own CA signed is one of our agents'.
    if not _issued_by_any(cert, cas()):
        raise UnauthenticatedError(
            f"client certificate for {spiffe_id} (serial {serial}) was not issued by this "
            f"server's CA but by {cert.issuer.rfc4514_string() or 'an unnamed issuer'}: "
            "an agent presents the SVID it got by attesting"
        )
    return AgentPeer(
        str(spiffe_id),
        serial,
        int(cert.not_valid_before_utc.timestamp()),
        int(cert.not_valid_after_utc.timestamp()),
    )


class PeerCache:
    """Remembers parsed client certificates: every call on a connection presents the same one,
    and parsing it again would cost more than the JWT signature the call asks for."""

    def __init__(self, ids: ServerIds, cas: IssuingCas, max_size: int = 4096) -> None:
        self._ids = ids
        self._cas = cas
        self._max = max_size
        self._known: dict[bytes, AgentPeer] = {}

    def agent_peer(self, context: grpc.aio.ServicerContext) -> AgentPeer:
        auth = context.auth_context() or {}
        pems = auth.get("x509_pem_cert")
        if not pems:
            raise UnauthenticatedError(
                "this call needs an agent SVID: use the node API's mTLS address with the "
                "agent's certificate (the attestation address only serves Attest)"
            )
        pem = pems[0]
        peer = self._known.get(pem)
        if peer is None:
            peer = _parse_peer(pem, self._ids, self._cas)
            if len(self._known) >= self._max:
                self._known.clear()
            self._known[pem] = peer
        return peer


# An IPv6 host usually holds a whole /64: one caller, however many addresses it picks from it.
_V6_PREFIX = 64


def address_key(host: str) -> str:
    """The budget key of a client address: an IPv4 address as it is (an IPv4-mapped IPv6
    one too), an IPv6 address as its /64; anything else (a Unix socket peer) as given."""
    try:
        address = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, _V6_PREFIX), strict=False))
    return str(address)


def peer_key(context: grpc.aio.ServicerContext) -> str:
    """The key of the caller's budgets: its address without the port, grouped as address_key
    groups it ('ipv4:1.2.3.4:5' -> '1.2.3.4'; an IPv6 address as its /64, which one host
    holds whole and can pick a fresh address from for each try)."""
    peer = context.peer() or ""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _ = rest.rpartition(":")
        return address_key(host or rest)
    return peer
