"""CA errors. CsrError and SigningRequestError are the caller's bad input; CaUnavailableError is
the server's own state (no usable key) and should read as 'try again', not 'you sent garbage'."""

from __future__ import annotations

from svid._errors import SvidError


class CaError(SvidError):
    """Root of every CA error."""


class CsrError(CaError, ValueError):
    """A certificate signing request is malformed, mis-signed or uses a refused key."""


class SigningRequestError(CaError, ValueError):
    """A request to sign names an ID, TTL or DNS name the CA will not put in a certificate."""


class CaUnavailableError(CaError):
    """No active key can sign right now (not initialised, or the CA certificate expired)."""


class CaConfigError(CaError, ValueError):
    """The CA configuration or an upstream CA file is unusable; the message names which."""


class KeyStoreError(CaError):
    """A private key file is missing or unreadable (the message never holds key material)."""


class SealedKeyError(KeyStoreError):
    """A key sealed in the datastore does not open: altered, moved to another slot, or not a
    key. The message names the slot, never key material."""
