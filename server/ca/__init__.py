"""The CA: keys, a signer that only signs, a manager of key slots, and a rotator that ticks it."""

from server.ca.errors import (
    CaConfigError,
    CaError,
    CaUnavailableError,
    CsrError,
    KeyStoreError,
    SealedKeyError,
    SigningRequestError,
)
from server.ca.keys import KEY_TYPES, KeyStore, generate_key
from server.ca.manager import CaConfig, CaManager
from server.ca.rotator import Rotator
from server.ca.sealing import KeyEncryptionKey
from server.ca.server_svid import ServerSvid, server_svid
from server.ca.signer import IssuedJwt, JwtSigner, X509Signer, verify_csr

__all__ = [
    "KEY_TYPES",
    "CaConfig",
    "CaConfigError",
    "CaError",
    "CaManager",
    "CaUnavailableError",
    "CsrError",
    "IssuedJwt",
    "JwtSigner",
    "KeyEncryptionKey",
    "KeyStore",
    "KeyStoreError",
    "Rotator",
    "SealedKeyError",
    "ServerSvid",
    "SigningRequestError",
    "X509Signer",
    "generate_key",
    "server_svid",
    "verify_csr",
]
