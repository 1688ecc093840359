"""``ssl.SSLContext``s that always use the newest SVID and bundles of a source.

OpenSSL contexts cannot drop a trusted CA once loaded, and reloading a certificate into a context
other threads are handshaking with is not safe, so a fresh inner context is built whenever the
source's SVID or bundles change (identity comparison: the source keeps unchanged objects), and
new connections use it:

* a client context delegates ``wrap_socket`` / ``wrap_bio`` to the newest inner context;
* a server context (and every inner one) moves each handshake to the newest inner context in
  its SNI callback, which OpenSSL runs on every ClientHello, SNI or not: the same for servers
  that wrap a listening socket once and for asyncio servers that wrap each connection.

Connections already open keep the SVID they were made with, as TLS does everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, Protocol

from svid._bundle import BundleSet, X509Bundle
from svid._der import certs_to_pem
from svid._errors import SvidError
from svid._spiffe_id import SpiffeId
from svid._tls_gate import PeerPolicy, classes_for
from svid._x509 import X509Svid

log = logging.getLogger("svid.tls")


class SvidSource(Protocol):
    """What the TLS helpers need from a source (X509Source and AsyncX509Source have it)."""

    def svid_for(self, spiffe_id: SpiffeId | str | None) -> X509Svid: ...

    @property
    def x509_bundles(self) -> BundleSet[X509Bundle]: ...


@contextlib.contextmanager
def private_pem(data: bytes) -> Iterator[str]:
    """A path ``load_cert_chain`` can read ``data`` (a private key) from, readable by no one
    else and gone afterwards: an anonymous memory file where Linux has them, else a 0600 file
    in a fresh 0700 directory."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd_create("svid-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="svid-tls-") as tmp:
        path = os.path.join(tmp, "svid.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        yield path


class ContextFactory:
    """Builds (and caches) the inner context for the source's current SVID and bundles."""

    def __init__(
        self,
        source: SvidSource,
        policy: PeerPolicy,
        *,
        server: bool,
        spiffe_id: SpiffeId | str | None,
    ) -> None:
        self._source = source
        self._server = server
        self._spiffe_id = spiffe_id
        self._socket_class, self._object_class = classes_for(policy)
        self._lock = threading.Lock()
        self._key: tuple[Any, ...] = ()
        self._context: ssl.SSLContext | None = None
        self.alpn: list[str] | None = None
        self.builds = 0  # how many inner contexts were made (tests and metrics)

    def current(self) -> ssl.SSLContext:
        """The inner context for the newest SVID and bundles. Raises SvidError (e.g.
        WorkloadApiUnavailableError) while the source has no SVID."""
        svid = self._source.svid_for(self._spiffe_id)
        bundles = self._source.x509_bundles
        key = (svid, bundles, self.alpn)
        context = self._context
        if context is not None and _same(key, self._key):
            return context
        with self._lock:
            if self._context is None or not _same(key, self._key):
                self._context = self._build(svid, bundles)
                self._key = key
                self.builds += 1
            return self._context

    def invalidate(self) -> None:
        with self._lock:
            self._key = ()

    def _build(self, svid: X509Svid, bundles: BundleSet[X509Bundle]) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if self._server else ssl.PROTOCOL_TLS_CLIENT)
        configure(ctx)
        with private_pem(svid.chain_pem() + svid.key_pem()) as path:
            ctx.load_cert_chain(path)
        # OpenSSL's check is the first gate only (svid's verifier pins each peer's chain to its
        # own trust domain): it needs every trusted authority.
        authorities = [cert for bundle in bundles.values() for cert in bundle.authorities]
        if authorities:
            ctx.load_verify_locations(cadata=certs_to_pem(authorities).decode("ascii"))
        if self.alpn is not None:
            ctx.set_alpn_protocols(self.alpn)
        ctx.sslsocket_class = self._socket_class
        ctx.sslobject_class = self._object_class
        if self._server:
            ctx.sni_callback = self._to_newest
        return ctx

    def _to_newest(self, conn: Any, server_name: str | None, ctx: ssl.SSLContext) -> int | None:
        try:
            newest = self.current()
        except SvidError as exc:
            log.warning("TLS handshake refused: no X.509-SVID to present: %s", exc)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        if newest is not ctx:
            conn.context = newest
        return None


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def configure(ctx: ssl.SSLContext) -> None:
    """The settings every context of the helpers has, the caller's and the inner ones."""
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # SPIFFE identities are URI SANs: svid's check authorises them
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Session tickets stay on: a resumed session is judged like a new one (its peer certificate
    # goes through the verifier and the authorizer in do_handshake), and without tickets a TLS
    # 1.3 client's first small write waits out the server's delayed ACK (40 ms, measured).


class RotatingContext(ssl.SSLContext):
    """The context the helpers return: every connection it makes uses the newest inner one."""

    _svid_factory: ContextFactory

    def __new__(cls, factory: ContextFactory, server: bool) -> RotatingContext:
        ctx = super().__new__(cls, ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx._svid_factory = factory
        return ctx

    def __init__(self, factory: ContextFactory, server: bool) -> None:
        configure(self)
        self.sslsocket_class = factory._socket_class
        self.sslobject_class = factory._object_class
        self._svid_server = server
        if server:
            # Every handshake moves to the newest inner context in its ClientHello, so this one
            # needs no certificate: a server can start listening before its first SVID.
            self.sni_callback = factory._to_newest

    def wrap_socket(self, *args: Any, **kwargs: Any) -> Any:
        if self._svid_server:
            return super().wrap_socket(*args, **kwargs)
        return self._svid_factory.current().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> Any:
        if self._svid_server:
            return super().wrap_bio(*args, **kwargs)
        return self._svid_factory.current().wrap_bio(*args, **kwargs)

    def set_alpn_protocols(self, alpn_protocols: Any) -> None:
        # httpx/httpcore set ALPN on the context they are given: carry it to the inner ones.
        super().set_alpn_protocols(alpn_protocols)
        self._svid_factory.alpn = list(alpn_protocols)
