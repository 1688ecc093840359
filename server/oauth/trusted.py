"""Other trust domains whose JWT-SVIDs the token endpoint accepts: their keys from files (a
SPIFFE bundle or a JWKS), read at start."""

from __future__ import annotations

from server.errors import ConfigError
from server.oauth.settings import TrustedBundle
from svid._bundle import JwtBundle, SpiffeBundle
from svid._errors import BundleError
from svid._spiffe_id import TrustDomain


class TrustedBundles:
    def __init__(self, configured: tuple[TrustedBundle, ...]) -> None:
        self._bundles: dict[TrustDomain, JwtBundle] = {}
        for item in configured:
            try:
                data = item.path.read_bytes()
            except OSError as exc:
                raise ConfigError(
                    f"oauth_trusted_bundles: cannot read {item.path}: {exc.strerror}"
                ) from None
            try:
                bundle = SpiffeBundle.parse(item.trust_domain, data).jwt_bundle()
            except BundleError:
                try:
                    bundle = JwtBundle.parse_jwks(item.trust_domain, data)
                except BundleError as exc:
                    raise ConfigError(f"oauth_trusted_bundles: {exc}") from None
            self._bundles[item.trust_domain] = bundle

    def get(self, td: TrustDomain) -> JwtBundle | None:
        return self._bundles.get(td)

    def issuers(self) -> dict[str, TrustDomain]:
        """Issuer names their tokens may carry: the trust domain's SPIFFE ID."""
        return {str(td.id): td for td in self._bundles}
