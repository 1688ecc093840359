"""The metadata documents: OpenID Connect Discovery 1.0 §3 and RFC 8414 (OAuth AS metadata).

Pure functions of the issuer URL: both documents are built once at start.
"""

from __future__ import annotations

import json

OIDC_PATH = "/.well-known/openid-configuration"
AS_METADATA_PATH = "/.well-known/oauth-authorization-server"
JWKS_PATH = "/keys"
TOKEN_PATH = "/token"  # noqa: S105 - a path, not a secret

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
GRANT_TYPES = (JWT_BEARER, TOKEN_EXCHANGE)
# Metadata documents change only with the issuer (a restart): clients may keep them a while.
METADATA_MAX_AGE = 3600


def _endpoints(issuer: str) -> dict[str, object]:
    return {
        "issuer": issuer,
        "jwks_uri": issuer + JWKS_PATH,
        "token_endpoint": issuer + TOKEN_PATH,
        "grant_types_supported": list(GRANT_TYPES),
        # Clients authenticate by the assertion they present (RFC 7523 §3.1 / RFC 8693):
        # there are no client secrets.
        "token_endpoint_auth_methods_supported": ["none"],
        "response_types_supported": ["token"],
    }


def openid_configuration(issuer: str, algorithms: list[str]) -> bytes:
    """What OIDC relying parties read to verify JWT-SVIDs: the issuer, where its keys are,
    the signing algorithms. SPIFFE IDs are public subject identifiers."""
    doc = {
        **_endpoints(issuer),
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algorithms,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def authorization_server_metadata(issuer: str, algorithms: list[str]) -> bytes:
    """RFC 8414 §2 metadata of the token endpoint."""
    doc = {
        **_endpoints(issuer),
        "token_endpoint_auth_signing_alg_values_supported": algorithms,
    }
    return json.dumps(doc, separators=(",", ":")).encode()
