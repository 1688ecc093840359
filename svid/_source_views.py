"""What every Workload API source offers, sync or asyncio: a BundleSource that never blocks, this
workload's own SVIDs, verifiers on its bundles and revocations, and revocation callbacks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from svid._bundle import BundleSet, JwtBundle, X509Bundle
from svid._clock import Clock
from svid._revocation import RevocationSet
from svid._source_state import RevokedCallback, SourceState
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._verify_access import AccessTokenVerifier
from svid._verify_jwt import JwtVerifier
from svid._verify_x509 import X509Verifier
from svid._workload_calls import X509_SVIDS
from svid._workload_errors import WorkloadApiUnavailableError
from svid._x509 import X509Svid

_B = TypeVar("_B", X509Bundle, JwtBundle)


class SourceViews:
    """Reads of a source's state; subclasses own the loops that feed ``_state``."""

    _state: SourceState

    # --- BundleSource ---

    def x509_bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        return self._state.bundles.x509_bundle_for(trust_domain)

    def jwt_bundle_for(self, trust_domain: TrustDomain) -> JwtBundle | None:
        return self._state.bundles.jwt_bundle_for(trust_domain)

    @property
    def x509_bundles(self) -> BundleSet[X509Bundle]:
        return self._state.bundles.x509_bundles

    @property
    def jwt_bundles(self) -> BundleSet[JwtBundle]:
        return self._state.bundles.jwt_bundles

    # --- diagnostics ---

    @property
    def revocations(self) -> RevocationSet:
        return self._state.revocations

    @property
    def errors(self) -> dict[str, str]:
        """The last error of each stream that is not delivering."""
        return self._state.errors

    @property
    def rejected_crls(self) -> tuple[str, ...]:
        return self._state.rejected_crls

    @property
    def revocation_stream_supported(self) -> bool | None:
        """None until the agent answered the revocation stream, then whether it has one."""
        return self._state.revocation_stream_supported

    @property
    def revocations_updated_at(self) -> float | None:
        """When the last revocation update arrived (None: never): the freshness signal."""
        return self._state.revocations.updated_at

    def revocation_staleness(self) -> float:
        """Seconds since the revocation data was last known complete (0 while its stream is up
        and the agent in sync with its server; while the agent says it is not, how long it has
        not been; inf before it ever delivered); what ``max_revocation_staleness`` is compared
        with."""
        clock = self._state.clock
        return self._state.revocations.staleness(clock.monotonic(), clock.now())

    @property
    def ready(self) -> bool:
        return self._state.ready

    # --- this workload's own X.509-SVIDs (sources that watch FetchX509SVID) ---

    @property
    def svids(self) -> tuple[X509Svid, ...]:
        """This workload's current X.509-SVIDs, the default first; () until the first message."""
        return self._state.svids

    @property
    def svid(self) -> X509Svid:
        """The default X.509-SVID; WorkloadApiUnavailableError while there is none."""
        return self.svid_for(None)

    def svid_for(self, spiffe_id: SpiffeId | str | None) -> X509Svid:
        """The current X.509-SVID for ``spiffe_id`` (None: the default one)."""
        if X509_SVIDS.name not in self._state.streams:
            raise TypeError("this source does not watch X.509-SVIDs; use an X509Source")
        svids = self._state.svids
        if spiffe_id is None and svids:
            return svids[0]
        for candidate in svids:
            if str(candidate.spiffe_id) == str(spiffe_id):
                return candidate
        what = "an X.509-SVID" if spiffe_id is None else f"an X.509-SVID for {spiffe_id}"
        why = self._state.errors.get(X509_SVIDS.name)
        raise WorkloadApiUnavailableError(
            f"the Workload API has not given this workload {what}" + (f" ({why})" if why else ""),
            "UNAVAILABLE",
        )

    # --- verifiers and callbacks ---

    def own_trust_domains(self) -> frozenset[str]:
        """The names of this workload's own trust domains: those of its X.509-SVIDs; before it
        has any (or for a source that does not watch them), that of its bundle if it holds only
        one. A foreign bundle reaches a workload only when its entry federates with that trust
        domain, and then it holds several: name them with ``trust_domains=``."""
        names = frozenset(s.spiffe_id.trust_domain.name for s in self._state.svids)
        if names:
            return names
        bundles = self._state.bundles
        held = {td.name for td in bundles.x509_bundles} | {td.name for td in bundles.jwt_bundles}
        return frozenset(held) if len(held) == 1 else frozenset()

    def _trusted(
        self,
        get: Callable[[TrustDomain], _B | None],
        trust_domains: Iterable[TrustDomain | str] | None,
        federated: bool,
    ) -> Callable[[TrustDomain], _B | None]:
        """``get`` limited to our own trust domains and those named: a federated trust domain's
        peers are accepted only where the caller says so, never by default."""
        if federated:
            return get
        named = frozenset(
            (td if isinstance(td, TrustDomain) else TrustDomain.parse(td)).name
            for td in trust_domains or ()
        )

        def only(trust_domain: TrustDomain) -> _B | None:
            name = trust_domain.name
            if name in named or name in self.own_trust_domains():
                return get(trust_domain)
            return None

        return only

    def x509_verifier(
        self,
        *,
        clock: Clock | None = None,
        trust_domains: Iterable[TrustDomain | str] | None = None,
        federated: bool = False,
        **options: Any,
    ) -> X509Verifier:
        """An X509Verifier on this source's bundles and revocations (options: cache_size,
        max_chain_depth, max_revocation_staleness). It accepts SVIDs of this workload's own
        trust domain, plus those of ``trust_domains`` (federated ones whose bundles the agent
        gives this workload), or of every trust domain it holds a bundle of with
        ``federated=True``."""
        verifier = X509Verifier(
            self._trusted(self.x509_bundle_for, trust_domains, federated),
            clock=clock or self._state.clock,
            revocations=self._state.revocations,
            **options,
        )
        verifier._revocation_feed = self
        return verifier

    def jwt_verifier(
        self,
        *,
        clock: Clock | None = None,
        trust_domains: Iterable[TrustDomain | str] | None = None,
        federated: bool = False,
        **options: Any,
    ) -> JwtVerifier:
        """A JwtVerifier on this source's bundles and revocations (options: leeway, cache_size,
        max_revocation_staleness); trust domains as for ``x509_verifier``."""
        verifier = JwtVerifier(
            self._trusted(self.jwt_bundle_for, trust_domains, federated),
            clock=clock or self._state.clock,
            revocations=self._state.revocations,
            **options,
        )
        verifier._revocation_feed = self
        return verifier

    def access_token_verifier(
        self,
        issuer: str,
        audience: str,
        *,
        trust_domain: TrustDomain | str | None = None,
        clock: Clock | None = None,
        **options: Any,
    ) -> AccessTokenVerifier:
        """An AccessTokenVerifier for svidd's access tokens (and Txn-Tokens) on this source's JWT
        bundles and revocations: ``issuer`` is the authorization server's issuer URL,
        ``audience`` this resource, ``trust_domain`` the issuer's (by default this workload's own,
        when it has exactly one). Options as for ``jwt_verifier``."""
        if trust_domain is None:
            own = self.own_trust_domains()
            if len(own) != 1:
                raise ValueError(
                    f"name the issuer's trust_domain: this workload has {len(own)} of its own"
                )
            (trust_domain,) = own
        return AccessTokenVerifier(
            self.jwt_bundle_for,
            issuer=issuer,
            audience=audience,
            trust_domain=trust_domain,
            clock=clock or self._state.clock,
            revocations=self._state.revocations,
            **options,
        )

    def on_revoked(self, callback: RevokedCallback) -> Callable[[], None]:
        """Call ``callback(event)`` for every credential that joins the revocation set (after
        verifiers already refuse it), e.g. to close a revoked peer's open connections. Returns a
        function that unsubscribes. Callbacks run on the stream's thread (or the source's event
        loop) and must be quick; an asyncio source also runs coroutine callbacks as tasks."""
        return self._state.subscribe(callback)
