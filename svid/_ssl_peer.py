"""The certificate chain a TLS peer presented, from whichever ``ssl`` object a library hands out.

The stdlib has three: ``ssl.SSLSocket`` (blocking sockets), ``ssl.SSLObject`` (asyncio, anyio) and
the C-level ``_ssl._SSLSocket`` both wrap, which is what httpcore's sync transport exposes as its
``ssl_object``. The C object's methods take positional arguments only and answer with
``_ssl.Certificate`` objects rather than DER bytes, so the public calls do not work on it.
"""

from __future__ import annotations

import _ssl  # the C module: its Certificate objects and their DER encoding constant
from typing import Any

from svid._errors import VerificationError

# The public ssl module does not export it.
_ENCODING_DER: int = _ssl.ENCODING_DER


def _raw(conn: Any) -> Any:
    """The C-level object under ``conn``: SSLSocket and SSLObject keep it in ``_sslobj``."""
    inner = getattr(conn, "_sslobj", None)
    return inner if inner is not None else conn


def _der(cert: Any) -> bytes:
    if isinstance(cert, bytes | bytearray | memoryview):
        return bytes(cert)
    return bytes(cert.public_bytes(_ENCODING_DER))


def peer_chain_der(conn: Any) -> list[bytes]:
    """The peer's certificates as DER, leaf first (the leaf alone where the chain is unknown).

    Raises VerificationError when the peer presented none, or the handshake has not happened.
    """
    raw = _raw(conn)
    ders: list[bytes] = []
    # The C object has had it since 3.10; the public wrappers only from 3.13. On the server side
    # CPython puts the client's leaf first itself (OpenSSL leaves it out there).
    get_chain = getattr(raw, "get_unverified_chain", None)
    if get_chain is not None:
        try:
            ders = [_der(c) for c in get_chain() or ()]
        except ValueError as exc:  # no handshake yet
            raise VerificationError(f"TLS connection has no peer yet: {exc}") from None
    if not ders:
        try:
            leaf = raw.getpeercert(True)  # positional: the C object has no keyword names
        except ValueError as exc:
            raise VerificationError(f"TLS connection has no peer yet: {exc}") from None
        if leaf:
            ders = [bytes(leaf)]
    if not ders:
        raise VerificationError("TLS peer presented no certificate")
    return ders
