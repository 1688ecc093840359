"""The one exception tree of svidd. Every error the library raises is an SvidError."""

from __future__ import annotations


class SvidError(Exception):
    """Root of every error raised by svidd."""


class SpiffeIdError(SvidError, ValueError):
    """A SPIFFE ID or trust domain does not follow the grammar; the message names the rule."""


class SvidParseError(SvidError, ValueError):
    """Bytes that should hold a certificate, key, token or bundle could not be read."""


class X509SvidError(SvidError, ValueError):
    """An X.509-SVID or signing certificate breaks a SPIFFE profile rule."""


class JwtSvidError(SvidError, ValueError):
    """A JWT-SVID is malformed or breaks a SPIFFE rule."""


class BundleError(SvidError, ValueError):
    """A trust bundle is malformed, or no bundle exists for a trust domain."""


class VerificationError(SvidError):
    """A credential failed verification; the message says which check."""


class RevokedError(VerificationError):
    """A credential is on the revocation list."""


class ExpiredError(VerificationError):
    """A credential is outside its validity window."""


class AudienceError(VerificationError):
    """A credential is genuine (its signature held) but not for the expected audience: its
    claims are its issuer's, so a refusal can be filed under whom it names."""


class StaleRevocationsError(VerificationError):
    """Revocation data is older than the verifier allows (``max_revocation_staleness``): its feed,
    usually the local agent, has been unreachable for too long to rule a revocation out."""


class TokenExchangeError(SvidError):
    """An OAuth token endpoint refused an exchange (client side, svid.httpx.DelegatedAuth):
    ``error`` is its RFC 6749 code, ``description`` what it said."""

    def __init__(self, error: str, description: str = "") -> None:
        super().__init__(f"token exchange refused: {error}: {description}")
        self.error = error
        self.description = description
