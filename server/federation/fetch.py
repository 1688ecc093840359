"""Fetching a foreign trust domain's bundle from its bundle endpoint, and judging it.

Both profiles of the SPIFFE Federation API are an HTTPS GET answered with SPIFFE bundle JSON;
they differ in how the endpoint is authenticated:
  https_web     the endpoint's certificate, by web PKI (system roots) or a configured CA file,
                with the host name checked;
  https_spiffe  the endpoint's X.509-SVID, chained to the last bundle we hold for the trust
                domain of the configured endpoint SPIFFE ID (the foreign trust domain's own
                when the endpoint serves its own bundle, another's when it does not: SPIFFE
                Federation 5.2.2.4), and its URI SAN equal to that ID.
The fetch is blocking (http.client): the refresher runs it in a worker thread.
"""

from __future__ import annotations

import http.client
import ssl
from urllib.parse import urlsplit

from cryptography import x509

from server import https_get
from server.datastore.records import HTTPS_SPIFFE, HTTPS_WEB, FederationRelationship
from server.federation.errors import FederationError
from server.strict_json import member_twice
from svid._bundle import SpiffeBundle
from svid._der import certs_to_pem
from svid._errors import SvidError
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._x509 import extensions_of

TIMEOUT = 10.0
MAX_BUNDLE_BYTES = 1024 * 1024
# The agents are sent a foreign bundle's sequence and refresh hint as int64 (common.Bundle): a
# larger one, installed, failed every Sync that carried the bundle.
MAX_BUNDLE_NUMBER = 2**63 - 1
# At most this many X.509 authorities, and as many JWT keys, in a foreign bundle. A megabyte
# of them (some 2,000 CA certificates under one subject name) made each of our workloads that
# accepts the trust domain try every one against any chain claiming that issuer (a signature
# check each, for whoever connects), and was sent to every agent federating with it at each
# change, once a minute. Yet an honest SPIRE trust domain holds more than a few: each server
# makes a CA and a JWT key every half ca_ttl and keeps each in the bundle 24 h past its
# expiry, so 2 + 48 h / ca_ttl of each per server: 50 at a ca_ttl of 1 h, 78 for three
# servers at 2 h (64 refused those). Room for some five such servers.
MAX_AUTHORITIES = 256


def check_bundle(trust_domain: TrustDomain, body: bytes) -> SpiffeBundle:
    """The bundle `body` holds, if it is one of `trust_domain`: parsed, and every X.509
    authority that names a trust domain (a URI SAN, as SPIFFE CA certificates carry) naming
    this one, at most MAX_AUTHORITIES of each kind, and its numbers within what the agents
    are sent; no object in it naming a member twice (server/strict_json.py).
    FederationError otherwise."""
    twice = member_twice(body)
    if twice is not None:
        raise FederationError(f"bundle of {trust_domain} refused: an object in it {twice}")
    try:
        bundle = SpiffeBundle.parse(trust_domain, body)
    except ValueError as exc:  # SvidError, or cryptography's on a name it reads lazily
        raise FederationError(f"bundle of {trust_domain} refused: {exc}") from None
    for kind, count in (
        ("X.509 authorities", len(bundle.x509_authorities)),
        ("JWT authorities", len(bundle.jwt_authorities)),
    ):
        if count > MAX_AUTHORITIES:
            raise FederationError(
                f"bundle of {trust_domain} refused: {count} {kind}, at most {MAX_AUTHORITIES}"
            )
    for name, value in (
        ("spiffe_sequence", bundle.sequence),
        ("spiffe_refresh_hint", bundle.refresh_hint),
    ):
        if value > MAX_BUNDLE_NUMBER:
            raise FederationError(
                f"bundle of {trust_domain} refused: {name} is past {MAX_BUNDLE_NUMBER}"
            )
    for cert in bundle.x509_authorities:
        # Names are read here, not by the parse (cryptography reads them lazily): one that does
        # not parse (a SAN, a subject of invalid UTF-8) raised ValueError from whatever read it
        # first, the refusal's own message among them, as an unknown error.
        try:
            uris = _uris(cert)
            subject = cert.subject.rfc4514_string()
            cert.issuer.rfc4514_string()
        except ValueError as exc:  # SvidError from extensions_of too
            raise FederationError(
                f"bundle of {trust_domain} refused: an X.509 authority's names do not parse: {exc}"
            ) from None
        for uri in uris:
            if uri != str(trust_domain.id):
                raise FederationError(
                    f"bundle of {trust_domain} refused: its X.509 authority "
                    f"{subject} belongs to {uri}"
                )
    return bundle


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = extensions_of(cert).get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)]


def endpoint_trust_domain(rel: FederationRelationship) -> TrustDomain:
    """The trust domain whose bundle authenticates an https_spiffe endpoint: its SPIFFE ID's."""
    return SpiffeId.parse(rel.endpoint_spiffe_id).trust_domain


def tls_context(rel: FederationRelationship, known: SpiffeBundle | None) -> ssl.SSLContext:
    """How to authenticate the relationship's endpoint (see the module); `known` is the bundle
    of the endpoint's trust domain (https_spiffe)."""
    if rel.profile == HTTPS_WEB:
        try:
            return ssl.create_default_context(cafile=rel.ca_file or None)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            # Named as the CA file's fault: raised within the GET's own handling, a missing
            # file read "bundle endpoint ... unreachable" and one with no certificate "not
            # authenticated", the endpoint never asked.
            why = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            raise FederationError(
                f"{rel.trust_domain}: ca_file {rel.ca_file!r} cannot be loaded: {why}"
            ) from None
    if rel.profile != HTTPS_SPIFFE:
        raise FederationError(f"{rel.trust_domain}: unknown profile {rel.profile!r}")
    authority = endpoint_trust_domain(rel)
    # Another trust domain's CAs would vouch for an endpoint ID that is not theirs to name.
    if known is None or known.trust_domain != authority or not known.x509_authorities:
        raise FederationError(
            f"{rel.trust_domain}: https_spiffe needs a bundle of {authority} to "
            "authenticate its endpoint: set one first (svid-server bundle set)"
        )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The SVID names a SPIFFE ID, not a host: the chain is checked here, the ID after the
    # handshake (endpoint_id_of).
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=certs_to_pem(known.x509_authorities).decode("ascii"))
    return ctx


def endpoint_id_of(der: bytes | None) -> str:
    """The SPIFFE ID (the one URI SAN) of the endpoint's certificate; "" without one."""
    if not der:
        return ""
    uris = _uris(x509.load_der_x509_certificate(der))
    return uris[0] if len(uris) == 1 else ""


def fetch_bundle(
    rel: FederationRelationship, known: SpiffeBundle | None, *, timeout: float = TIMEOUT
) -> SpiffeBundle:
    """GET the relationship's bundle endpoint, within ``timeout`` in all, and return the
    checked bundle (blocking)."""
    td = TrustDomain.parse(rel.trust_domain)
    url = urlsplit(rel.endpoint_url)
    if url.scheme != "https" or not url.hostname:
        raise FederationError(f"{td}: bundle endpoint URL {rel.endpoint_url!r} is not https://")
    try:  # one stored before relationships were checked for it: named, not a ValueError
        port = url.port
    except ValueError:
        port = 0
    if port == 0:
        raise FederationError(f"{td}: bundle endpoint URL {rel.endpoint_url!r} has no valid port")

    def check_peer(der: bytes | None) -> None:
        try:
            presented = endpoint_id_of(der)
        except (SvidError, ValueError) as exc:
            # A certificate OpenSSL chained whose SAN cryptography cannot read (a URI that is
            # no IA5String): raised as is, it was no refusal but an unknown error, retried
            # every few seconds with a traceback, never backed off nor put on the ledger.
            raise FederationError(
                f"{td}: bundle endpoint presented a certificate whose names do not parse: {exc}"
            ) from None
        if presented != rel.endpoint_spiffe_id:
            raise FederationError(
                f"{td}: bundle endpoint presented {presented or 'no SPIFFE ID'}, "
                f"expected {rel.endpoint_spiffe_id}"
            )

    try:
        response = https_get.get(
            rel.endpoint_url,
            context=tls_context(rel, known),
            limit=MAX_BUNDLE_BYTES,
            timeout=timeout,
            check_peer=check_peer if rel.profile == HTTPS_SPIFFE else None,
            # Its names' lookups count against the relationship: a partner whose names hang
            # holds a few, not the room every other relationship's fetch needs.
            party=td.name,
        )
    except ssl.SSLError as exc:
        why = getattr(exc, "verify_message", None) or exc.reason
        raise FederationError(f"{td}: bundle endpoint not authenticated: {why}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise FederationError(
            f"{td}: bundle endpoint {rel.endpoint_url} unreachable: {exc}"
        ) from None
    body = response.body
    if response.status != 200:
        raise FederationError(f"{td}: bundle endpoint answered HTTP {response.status}")
    if len(body) > MAX_BUNDLE_BYTES:
        raise FederationError(f"{td}: bundle larger than {MAX_BUNDLE_BYTES} bytes")
    return check_bundle(td, body)
