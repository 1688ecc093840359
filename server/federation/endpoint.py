"""Our bundle endpoint (SPIFFE Federation API): GET answers the trust domain's bundle as SPIFFE
bundle JSON, over the h11 listener (server/oauth/http.py).

Profiles: https_web serves a certificate from files (web PKI); https_spiffe serves an X.509-SVID
of the server (spiffe://<td>/svid/server), renewed at half its life: the context's certificate
is replaced in place, and each new handshake takes the new one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path

from server.ca.manager import CaManager
from server.ca.server_svid import server_svid
from server.oauth.http import Request, Response, json_response
from server.renewal import RenewalSchedule, half_life
from svid._bundle import SpiffeBundle
from svid._clock import Clock
from svid._der import certs_to_pem
from svid._tls_contexts import private_pem
from svid._waits import set_within

_log = logging.getLogger("svid.server.federation")
MAX_TIMER = 3600.0

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
    """An https_spiffe server context presenting a server X.509-SVID, renewed by `maybe_renew`
    on the schedule the node API's SVID keeps (server/renewal.py): at half life, and after a
    failure, at its back-off."""

    def __init__(self, ca: CaManager, clock: Clock, ttl: int) -> None:
        self._ca = ca
        self.clock = clock
        self._ttl = ttl
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._schedule = RenewalSchedule(clock)

    def due_in(self) -> float:
        """Seconds until `maybe_renew` is next due: renew_at, or a failure's back-off."""
        return self._schedule.due_in()

    def maybe_renew(self) -> bool:
        """Renew when due; on failure keep the current certificate and wait a back-off before
        the next try, then raise."""
        if not self._schedule.due():
            return False
        try:
            self._renew()
        except Exception:
            self._schedule.failed()
            raise
        return True

    def _renew(self) -> None:
        svid = server_svid(self._ca.x509_signer(), self._ttl)
        leaf = svid.chain[0]
        renew_at = half_life(
            leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
        )
        # ssl loads keys from a path only: an anonymous memory file (svid's TLS contexts do the
        # same), so no key is ever on disk, not even a temporary file a kill would leave.
        with private_pem(certs_to_pem(svid.chain) + svid.key_pem()) as path:
            self.context.load_cert_chain(path)
        self._schedule.renewed(renew_at)


async def keep_renewed(svid: SvidContext, stop: asyncio.Event) -> None:
    """The loop that only ticks: sleep until the renewal (or its retry) is due, then renew.
    A failure is logged once per try, and the tries are a back-off apart."""
    while not await set_within(stop, max(0.05, min(MAX_TIMER, svid.due_in()))):
        try:
            await asyncio.to_thread(svid.maybe_renew)
        except Exception:
            _log.exception("bundle endpoint SVID not renewed; retrying later")
