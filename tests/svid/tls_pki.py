"""Real certificates for TLS tests: a trust domain's CA, an intermediate, and SVIDs under them,
valid around the real clock (OpenSSL checks times against it), with plain ``ssl`` contexts."""

from __future__ import annotations

import os
import ssl
import tempfile
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from svid import MemoryBundleSource, SpiffeBundle, TrustDomain, X509Svid, certs_to_pem
from tests.svid.certs import Issued, make_ca, make_leaf


@dataclass
class Pki:
    trust_domain: TrustDomain
    root: Issued
    intermediate: Issued

    def svid(self, spiffe_id: str, *, ttl: float = 3600, under_root: bool = False) -> X509Svid:
        """An X.509-SVID for ``spiffe_id``; under the intermediate unless ``under_root``."""
        now = time.time()
        issuer = self.root if under_root else self.intermediate
        leaf = make_leaf(issuer, uris=[spiffe_id], not_before=now - 60, not_after=now + ttl)
        chain = (leaf.cert,) if under_root else (leaf.cert, self.intermediate.cert)
        return X509Svid.load_pem(certs_to_pem(chain), key_pem(leaf))

    def bundle(self) -> SpiffeBundle:
        return SpiffeBundle(self.trust_domain, (self.root.cert,))

    def source(self) -> MemoryBundleSource:
        return MemoryBundleSource.of(self.bundle())


def make_pki(name: str = "example.org") -> Pki:
    now = time.time()
    root = make_ca(name, not_before=now - 3600, not_after=now + 86400)
    intermediate = make_ca(
        name, parent=root, not_before=now - 3600, not_after=now + 86400, spiffe_id=None
    )
    return Pki(TrustDomain(name), root, intermediate)


def key_pem(issued: Issued) -> bytes:
    return issued.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def plain_context(svid: X509Svid, *trusted: Pki, server: bool) -> ssl.SSLContext:
    """A stdlib context presenting ``svid`` and trusting the roots of ``trusted``, no SPIFFE
    checks of its own (what a hand-written mTLS setup looks like)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(svid.chain_pem() + svid.key_pem())
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)
    for pki in trusted:
        ctx.load_verify_locations(cadata=certs_to_pem([pki.root.cert]).decode())
    return ctx
