"""x509pop material for agent end-to-end tests: a node CA for the server to trust and a node
certificate and key it issued for the agent."""

from __future__ import annotations

import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tests.svid.certs import make_ca, make_leaf


def node_pki(root: Path) -> tuple[Path, Path, Path]:
    """A node CA (given to the server) and a node certificate + key (given to the agent)."""
    now = time.time()
    valid = {"not_before": now - 60, "not_after": now + 86400}
    ca = make_ca("node ca", spiffe_id=None, **valid)
    node = make_leaf(ca, subject="node-1", uris=[], eku=None, **valid)
    paths = (root / "node-ca.pem", root / "node.pem", root / "node.key")
    paths[0].write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(node.cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        node.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].chmod(0o600)  # the agent refuses a node key other local users can read
    return paths
