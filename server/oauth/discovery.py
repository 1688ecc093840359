"""The metadata documents: OpenID Connect Discovery 1.0 §3 and RFC 8414 (OAuth AS metadata).

Pure functions of the issuer URL: both documents are built once at start.
"""

from __future__ import annotations

import json

OIDC_PATH = "/.well-known/openid-configuration"
AS_METADATA_PATH = "/.well-known/oauth-authorization-server"
JWKS_PATH = "/keys"
TOKEN_PATH = "/token"  # noqa: S105 - a path, not a secret
# No grant here uses an authorization endpoint, so RFC 8414 lets it be left out; clients that
# require one anyway (the MCP SDK's metadata model) get one that refuses every request.
AUTHORIZE_PATH = "/authorize"

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
GRANT_TYPES = (JWT_BEARER, TOKEN_EXCHANGE)
# Metadata documents change only with the issuer (a restart): clients may keep them a while.
METADATA_MAX_AGE = 3600


def _endpoints(issuer: str) -> dict[str, object]:
    return {
        "issuer": issuer,
        "jwks_uri": issuer + JWKS_PATH,
        "authorization_endpoint": issuer + AUTHORIZE_PATH,
        "token_endpoint": issuer + TOKEN_PATH,
        "grant_types_supported": list(GRANT_TYPES),
        # Clients authenticate by the assertion they present (RFC 7523 §3.1 / RFC 8693):
        # there are no client secrets.
        "token_endpoint_auth_methods_supported": ["none"],
    }


def openid_configuration(issuer: str, algorithms: list[str]) -> bytes:
    """What OIDC relying parties read to verify JWT-SVIDs: the issuer, where its keys are,
    the signing algorithms. SPIFFE IDs are public subject identifiers."""
    doc = {
        **_endpoints(issuer),
        # What SPIRE's OIDC discovery provider says: relying parties read JWT-SVIDs as ID
        # tokens, none is issued through an authorization endpoint.
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algorithms,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def authorization_server_metadata(issuer: str, algorithms: list[str]) -> bytes:
    """RFC 8414 §2 metadata of the token endpoint."""
    doc = {
        **_endpoints(issuer),
        "response_types_supported": [],
        "token_endpoint_auth_signing_alg_values_supported": algorithms,
    }
    return json.dumps(doc, separators=(",", ":")).encode()
