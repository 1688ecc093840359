"""The server's own TLS identity on the node API, rotated without restarting the gRPC server.

grpc's dynamic SSL credentials call a fetcher on every new handshake; it returns a new
certificate configuration only when ours changed (server SVID renewed at half life, or the
bundle that client certificates are checked against changed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from server.ca.manager import CaManager
from server.ca.server_svid import server_svid
from server.datastore.records import X509_KIND
from server.renewal import RenewalSchedule, half_life
from svid import MAX_CLOCK_SKEW
from svid._clock import Clock
from svid._der import certs_to_pem


class ServerTls:
    def __init__(self, ca: CaManager, clock: Clock, ttl: int) -> None:
        self._ca = ca
        self._clock = clock
        self._ttl = ttl
        self._lock = threading.Lock()
        self._version = 0
        self._config: object | None = None
        self._chain: tuple[x509.Certificate, ...] = ()
        self._key_pem = b""
        self._roots_pem = b""
        self._issuer: x509.Certificate | None = None  # the CA certificate that signed `_chain`
        self._schedule = RenewalSchedule(clock)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        return self._chain

    @property
    def renew_at(self) -> float:
        return self._schedule.renew_at

    def renew(self) -> None:
        """Issue a fresh server SVID (new key) from the active CA."""
        signer = self._ca.x509_signer()
        svid = server_svid(signer, self._ttl)
        leaf = svid.chain[0]
        renew_at = half_life(
            leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
        )
        key_pem = svid.key_pem()
        with self._lock:
            self._chain = svid.chain
            self._key_pem = key_pem
            self._issuer = signer.ca_certificate
            self._schedule.renewed(renew_at)
            self._rebuild()

    def set_roots(self, authorities: tuple[x509.Certificate, ...]) -> None:
        """Client certificates are verified against these (the trust domain's X.509 bundle)."""
        roots = certs_to_pem(authorities)
        with self._lock:
            if roots == self._roots_pem:
                return
            self._roots_pem = roots
            if self._chain:
                self._rebuild()

    def due_in(self) -> float:
        """Seconds until `maybe_renew` is next due (at most: a dropped CA brings it sooner):
        renew_at, or the back-off after a failed renewal."""
        return self._schedule.due_in()

    def maybe_renew(self) -> bool:
        """Renew when due; on failure keep the current identity and wait a back-off before
        the next try, then raise."""
        schedule = self._schedule
        if schedule.retrying:
            if not schedule.due():
                return False
        elif self._chain and not schedule.due() and self._issuer_kept():
            return False
        try:
            self.renew()
        except Exception:
            schedule.failed()
            raise
        return True

    def _issuer_kept(self) -> bool:
        """Whether the CA that signed the current SVID is one to keep it for: journaled, and
        either the one signed with now or valid by now. The rotation retires a CA made while
        the clock ran ahead (rotation.py): the SVIDs it signed are no more valid than it, and,
        kept until renew_at (as far ahead), no agent could verify the server for that long."""
        issuer = self._issuer
        if issuer is None:
            return False
        der = issuer.public_bytes(serialization.Encoding.DER)
        if not any(s.public_der == der for s in self._ca.key_slots(X509_KIND)):
            return False
        if self._ca.x509_signer().ca_certificate == issuer:
            return True
        return issuer.not_valid_before_utc.timestamp() <= self._clock.now() + MAX_CLOCK_SKEW

    def _rebuild(self) -> None:
        self._config = grpc.ssl_server_certificate_configuration(
            [(self._key_pem, certs_to_pem(self._chain))], self._roots_pem or None
        )
        self._version += 1

    def credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        with self._lock:
            if self._config is None:
                raise RuntimeError("server SVID not issued yet")
            initial, seen = self._config, self._version
        state = {"seen": seen}

        def fetch() -> object | None:
            # Called by grpc on each handshake: hand over a new configuration only on change.
            with self._lock:
                if self._version == state["seen"]:
                    return None
                state["seen"] = self._version
                return self._config

        fetcher: Callable[[], object | None] = fetch
        return grpc.dynamic_ssl_server_credentials(initial, fetcher, require_client_auth)
