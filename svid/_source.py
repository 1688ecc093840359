"""Where verifiers get trust bundles: a small protocol, an in-memory holder, and file loading.

A Workload API client (watching FetchX509Bundles / FetchJWTBundles) implements the same protocol,
typically by feeding a ``MemoryBundleSource`` from its stream loop.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, TypeVar

from svid._bundle import BundleSet, JwtBundle, SpiffeBundle, X509Bundle
from svid._errors import BundleError
from svid._spiffe_id import TrustDomain


class BundleSource(Protocol):
    """Current bundles by trust domain. Must be cheap and must not block: it runs per verification.

    Return the *same* bundle object while a trust domain's bundle is unchanged: verifiers use object
    identity to know their cached results still stand.
    """

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None: ...

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JwtBundle | None: ...


class MemoryBundleSource:
    """A BundleSource held in memory; updates swap whole immutable sets, so reads need no lock."""

    def __init__(
        self,
        x509: BundleSet[X509Bundle] | None = None,
        jwt: BundleSet[JwtBundle] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._x509: BundleSet[X509Bundle] = x509 if x509 is not None else BundleSet()
        self._jwt: BundleSet[JwtBundle] = jwt if jwt is not None else BundleSet()
        self._publish()

    def _publish(self) -> None:
        # Plain dicts for the per-verification lookups: Mapping.get on a BundleSet goes through
        # two Python-level calls. Each update builds new dicts and swaps the references.
        self._x509_get = dict(self._x509).get
        self._jwt_get = dict(self._jwt).get

    @classmethod
    def of(cls, *bundles: SpiffeBundle) -> MemoryBundleSource:
        return cls(
            BundleSet.of(*(b.x509_bundle() for b in bundles)),
            BundleSet.of(*(b.jwt_bundle() for b in bundles)),
        )

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        return self._x509_get(trust_domain)

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JwtBundle | None:
        return self._jwt_get(trust_domain)

    @property
    def x509_bundles(self) -> BundleSet[X509Bundle]:
        return self._x509

    @property
    def jwt_bundles(self) -> BundleSet[JwtBundle]:
        return self._jwt

    def set_x509_bundles(self, bundles: BundleSet[X509Bundle]) -> None:
        """Replace all X.509 bundles (a full-state Workload API message).

        Unchanged bundles stay the same objects, so cached verifications survive the update.
        """
        with self._lock:
            self._x509 = BundleSet(_keep_unchanged(self._x509, bundles))
            self._publish()

    def set_jwt_bundles(self, bundles: BundleSet[JwtBundle]) -> None:
        with self._lock:
            self._jwt = BundleSet(_keep_unchanged(self._jwt, bundles))
            self._publish()

    def update(self, bundle: SpiffeBundle) -> None:
        """Set one trust domain's X.509 and JWT bundles from a SPIFFE bundle."""
        with self._lock:
            td = bundle.trust_domain
            self._x509 = BundleSet(
                _keep_unchanged(self._x509, {**self._x509, td: bundle.x509_bundle()})
            )
            self._jwt = BundleSet(
                _keep_unchanged(self._jwt, {**self._jwt, td: bundle.jwt_bundle()})
            )
            self._publish()

    def remove(self, trust_domain: TrustDomain) -> None:
        with self._lock:
            self._x509 = BundleSet({td: b for td, b in self._x509.items() if td != trust_domain})
            self._jwt = BundleSet({td: b for td, b in self._jwt.items() if td != trust_domain})
            self._publish()


B = TypeVar("B", X509Bundle, JwtBundle)


def _keep_unchanged(
    old: Mapping[TrustDomain, B], new: Mapping[TrustDomain, B]
) -> dict[TrustDomain, B]:
    return {td: (old[td] if td in old and old[td] == b else b) for td, b in new.items()}


def load_bundle_file(trust_domain: TrustDomain, path: str | Path) -> SpiffeBundle:
    """A bundle file: SPIFFE bundle JSON, or PEM CA certificates (X.509 authorities only)."""
    data = Path(path).read_bytes()
    if data.lstrip().startswith(b"{"):
        return SpiffeBundle.parse(trust_domain, data)
    if b"-----BEGIN" in data:
        return SpiffeBundle(trust_domain, X509Bundle.parse_pem(trust_domain, data).authorities)
    raise BundleError(f"bundle file {path} is neither SPIFFE bundle JSON nor PEM")
