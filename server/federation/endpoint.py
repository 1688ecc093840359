"""Our bundle endpoint (SPIFFE Federation API): GET answers the trust domain's bundle as SPIFFE
bundle JSON, over the h11 listener (server/oauth/http.py).

Profiles: https_web serves a certificate from files (web PKI); https_spiffe serves an X.509-SVID
of the server (spiffe://<td>/svid/server), renewed at half its life: the context's certificate
is replaced in place, and each new handshake takes the new one.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from server.ca.manager import CaManager
from server.ca.server_svid import server_svid
from server.oauth.http import Request, Response, json_response
from svid._bundle import SpiffeBundle
from svid._clock import Clock
from svid._der import certs_to_pem
from svid._tls_contexts import private_pem

_METHOD_NOT_ALLOWED = Response(405, b'{"error":"method_not_allowed"}', headers=(("allow", "GET"),))


class BundleHandler:
    """Answers GET with the current bundle, its refresh hint set to what we announce."""

    def __init__(self, bundle: Callable[[], SpiffeBundle], refresh_hint: int) -> None:
        self._bundle = bundle
        self._refresh_hint = refresh_hint

    def body(self) -> bytes:
        current = self._bundle()
        return SpiffeBundle(
            current.trust_domain,
            current.x509_authorities,
            current.jwt_authorities,
            sequence=current.sequence,
            refresh_hint=self._refresh_hint,
        ).to_json()

    async def __call__(self, request: Request) -> Response:
        if request.method != "GET":
            return _METHOD_NOT_ALLOWED
        return json_response(200, self.body(), ("cache-control", "no-store"))


def web_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class SvidContext:
    """An https_spiffe server context presenting a server X.509-SVID, renewed by `maybe_renew`."""

    def __init__(self, ca: CaManager, clock: Clock, ttl: int) -> None:
        self._ca = ca
        self.clock = clock
        self._ttl = ttl
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.renew_at = 0.0

    def maybe_renew(self) -> bool:
        if self.clock.now() < self.renew_at:
            return False
        svid = server_svid(self._ca.x509_signer(), self._ttl)
        leaf = svid.chain[0]
        start = leaf.not_valid_before_utc.timestamp()
        self.renew_at = start + (leaf.not_valid_after_utc.timestamp() - start) / 2
        # ssl loads keys from a path only: an anonymous memory file (svid's TLS contexts do the
        # same), so no key is ever on disk, not even a temporary file a kill would leave.
        with private_pem(certs_to_pem(svid.chain) + svid.key_pem()) as path:
            self.context.load_cert_chain(path)
        return True
