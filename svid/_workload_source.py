"""A BundleSource fed by a running agent: background watches of the X.509 and JWT bundle streams
(and the agent's revocation stream), so verifiers stay current without ever waiting on the network.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from svid._bundle import BundleSet, JwtBundle, X509Bundle
from svid._clock import Clock, SystemClock
from svid._crl import revoked_from_crls
from svid._errors import SvidError
from svid._revocation import RevocationSet, Revoked
from svid._source import MemoryBundleSource
from svid._spiffe_id import TrustDomain
from svid._verify_jwt import JwtVerifier
from svid._verify_x509 import X509Verifier
from svid._workload_client import (
    RevocationsUpdate,
    Watch,
    WorkloadApiClient,
    X509BundlesUpdate,
)
from svid._workload_errors import WorkloadApiError

log = logging.getLogger("svid.workloadapi")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential reconnect delays: initial, doubled after each failure, at most ``cap``."""

    initial: float = 0.2
    cap: float = 30.0

    def next(self, previous: float | None) -> float:
        if previous is None:
            return self.initial
        return min(self.cap, previous * 2)


class WorkloadApiSource:
    """Bundles and revocations from the Workload API, kept current by background threads.

    ``x509_bundle_for`` / ``jwt_bundle_for`` never block; until the first message they return
    None (so verification fails closed). Unchanged bundles keep their identity across messages,
    so verifier caches survive updates. CRLs are trusted only after their signature verifies
    against the X.509 bundle of the issuer's trust domain.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        client: WorkloadApiClient | None = None,
        revocations: RevocationSet | None = None,
        watch_revocations: bool = True,
        backoff: Backoff | None = None,
    ) -> None:
        self._owns_client = client is None
        self._client = client if client is not None else WorkloadApiClient(socket)
        self._bundles = MemoryBundleSource()
        self.revocations = revocations if revocations is not None else RevocationSet()
        self._backoff = backoff or Backoff()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watches: dict[str, Watch[Any]] = {}
        self._threads: list[threading.Thread] = []
        self._x509_ready = threading.Event()
        self._jwt_ready = threading.Event()
        self._bundle_crls: tuple[bytes, ...] = ()
        self._stream_crls: tuple[bytes, ...] = ()
        self._stream_items: tuple[Revoked, ...] = ()
        self._watch_revocations = watch_revocations
        self.revocation_stream_supported: bool | None = None
        self.errors: dict[str, str] = {}  # last error per stream, for diagnostics
        self.rejected_crls: tuple[str, ...] = ()

    # --- BundleSource ---

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        return self._bundles.x509_bundle_for(trust_domain)

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JwtBundle | None:
        return self._bundles.jwt_bundle_for(trust_domain)

    @property
    def x509_bundles(self) -> BundleSet[X509Bundle]:
        return self._bundles.x509_bundles

    @property
    def jwt_bundles(self) -> BundleSet[JwtBundle]:
        return self._bundles.jwt_bundles

    def x509_verifier(self, *, clock: Clock | None = None, **options: Any) -> X509Verifier:
        """An X509Verifier on this source's bundles and revocations."""
        return X509Verifier(
            self.x509_bundle_for,
            clock=clock or SystemClock(),
            revocations=self.revocations,
            **options,
        )

    def jwt_verifier(self, *, clock: Clock | None = None, **options: Any) -> JwtVerifier:
        """A JwtVerifier on this source's bundles and revocations."""
        return JwtVerifier(
            self.jwt_bundle_for,
            clock=clock or SystemClock(),
            revocations=self.revocations,
            **options,
        )

    # --- lifecycle ---

    def start(self) -> WorkloadApiSource:
        if self._threads:
            return self
        loops: list[tuple[str, Callable[[], Watch[Any]], Callable[[Any], None]]] = [
            ("FetchX509Bundles", self._client.watch_x509_bundles, self._on_x509),
            ("FetchJWTBundles", self._client.watch_jwt_bundles, self._on_jwt),
        ]
        if self._watch_revocations:
            loops.append(("Revocations/Watch", self._client.watch_revocations, self._on_revoked))
        for name, open_watch, apply in loops:
            thread = threading.Thread(
                target=self._run, args=(name, open_watch, apply), name=f"svid-{name}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until both bundle streams have delivered once; False on timeout."""
        return self._x509_ready.wait(timeout) and self._jwt_ready.wait(timeout)

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        with self._lock:
            watches = list(self._watches.values())
        for watch in watches:
            watch.cancel()
        for thread in self._threads:
            thread.join(timeout)
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> WorkloadApiSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- stream loops ---

    def _run(
        self, name: str, open_watch: Callable[[], Watch[Any]], apply: Callable[[Any], None]
    ) -> None:
        delay: float | None = None
        while not self._stop.is_set():
            try:
                watch = open_watch()
                with self._lock:
                    self._watches[name] = watch
                if self._stop.is_set():
                    watch.cancel()
                for update in watch:
                    apply(update)
                    delay = None  # a message arrived: the connection is good again
                    self.errors.pop(name, None)
                if self._stop.is_set():
                    return
                self.errors[name] = "stream ended"
            except WorkloadApiError as exc:
                if name == "Revocations/Watch" and exc.code == "UNIMPLEMENTED":
                    self.revocation_stream_supported = False
                    log.info("agent has no revocation stream; using CRLs from the bundles only")
                    return
                self.errors[name] = str(exc)
                log.warning("Workload API %s: %s", name, exc)
            except SvidError as exc:  # an update we could not apply: reconnect for a fresh one
                self.errors[name] = str(exc)
                log.warning("Workload API %s: unusable update: %s", name, exc)
            finally:
                with self._lock:
                    self._watches.pop(name, None)
            delay = self._backoff.next(delay)
            self._stop.wait(delay)

    def _on_x509(self, update: X509BundlesUpdate) -> None:
        self._bundles.set_x509_bundles(update.bundles)
        with self._lock:
            self._bundle_crls = update.crls
        self._publish_revocations()  # new authorities may vouch for (or drop) CRLs
        self._x509_ready.set()

    def _on_jwt(self, update: BundleSet[JwtBundle]) -> None:
        self._bundles.set_jwt_bundles(update)
        self._jwt_ready.set()

    def _on_revoked(self, update: RevocationsUpdate) -> None:
        self.revocation_stream_supported = True
        items = tuple(_usable(update.items))
        with self._lock:
            self._stream_items, self._stream_crls = items, update.crls
        self._publish_revocations()

    def _publish_revocations(self) -> None:
        with self._lock:
            crls = _unique(self._bundle_crls + self._stream_crls)
            result = revoked_from_crls(crls, self._bundles.x509_bundles)
            self.rejected_crls = result.rejected
            for message in result.rejected:
                log.warning("ignoring CRL: %s", message)
            self.revocations.replace(self._stream_items + result.revoked)


def _usable(items: Iterable[Revoked]) -> Iterable[Revoked]:
    """The entries this library understands; one bad entry must not drop the whole list."""
    for item in items:
        try:
            RevocationSet([item])
        except SvidError as exc:
            log.warning("ignoring revocation entry of kind %r: %s", item.kind, exc)
            continue
        yield item


def _unique(items: Iterable[bytes]) -> tuple[bytes, ...]:
    return tuple(dict.fromkeys(items))
