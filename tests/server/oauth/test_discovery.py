"""Stock OIDC/JOSE clients find the issuer's keys from its URL alone and verify a real
JWT-SVID of the running server (PyJWT's PyJWKClient, Authlib, joserfc)."""

from __future__ import annotations

import json
import urllib.request
import warnings

import httpx
import jwt as pyjwt
from joserfc import jwt as joserfc_jwt
from joserfc.jwk import KeySet

from svid._spiffe_id import SpiffeId
from tests.server.oauth.conftest import OAuthServer

with warnings.catch_warnings():  # authlib.jose says "use joserfc", which is tested here too
    warnings.simplefilter("ignore")
    from authlib.jose import JsonWebKey
    from authlib.jose import jwt as authlib_jwt

WORKLOAD = SpiffeId.parse("spiffe://example.org/workload")


def _svid(server: OAuthServer, audience: str = "orders") -> str:
    signer = server.running.server.ca.jwt_signer()
    return signer.sign(WORKLOAD, [audience], 300).token


def _discover(server: OAuthServer) -> dict[str, object]:
    url = server.issuer + "/.well-known/openid-configuration"
    with urllib.request.urlopen(url, context=server.ssl_context()) as reply:
        return json.loads(reply.read())


def test_jwt_svids_carry_the_configured_issuer(oauth_server: OAuthServer) -> None:
    claims = pyjwt.decode(_svid(oauth_server), options={"verify_signature": False})
    assert claims["iss"] == oauth_server.issuer


def test_pyjwt_verifies_a_jwt_svid_from_discovery_alone(oauth_server: OAuthServer) -> None:
    config = _discover(oauth_server)
    assert config["issuer"] == oauth_server.issuer
    client = pyjwt.PyJWKClient(str(config["jwks_uri"]), ssl_context=oauth_server.ssl_context())
    token = _svid(oauth_server)
    key = client.get_signing_key_from_jwt(token)
    claims = pyjwt.decode(
        token, key.key, algorithms=["ES256"], audience="orders", issuer=oauth_server.issuer
    )
    assert claims["sub"] == str(WORKLOAD)


def test_authlib_and_joserfc_verify_a_jwt_svid_from_discovery_alone(
    oauth_server: OAuthServer,
) -> None:
    config = _discover(oauth_server)
    jwks = httpx.get(str(config["jwks_uri"]), verify=oauth_server.ssl_context()).json()
    token = _svid(oauth_server)
    claims = authlib_jwt.decode(
        token,
        JsonWebKey.import_key_set(jwks),
        claims_options={"iss": {"essential": True, "value": oauth_server.issuer}},
    )
    claims.validate()
    assert claims["sub"] == str(WORKLOAD)
    decoded = joserfc_jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES256"])
    assert decoded.claims["iss"] == oauth_server.issuer


def test_jwks_says_sig_alg_kid_and_caches_by_the_rotation_schedule(
    oauth_server: OAuthServer,
) -> None:
    reply = httpx.get(oauth_server.issuer + "/keys", verify=oauth_server.ssl_context())
    assert reply.status_code == 200
    keys = reply.json()["keys"]
    published = {s.kid for s in oauth_server.running.server.ca.key_slots("jwt")}
    assert keys
    assert {k["kid"] for k in keys} <= published
    assert all(k["use"] == "sig" and k["alg"] == "ES256" for k in keys)
    # Default jwt_key_ttl 24 h: the publication lead is 8 h, half of it capped at one hour.
    assert reply.headers["cache-control"] == "public, max-age=3600"


def test_as_metadata_names_the_token_endpoint_and_grants(oauth_server: OAuthServer) -> None:
    reply = httpx.get(
        oauth_server.issuer + "/.well-known/oauth-authorization-server",
        verify=oauth_server.ssl_context(),
    )
    doc = reply.json()
    assert doc["issuer"] == oauth_server.issuer
    assert doc["token_endpoint"] == oauth_server.issuer + "/token"
    assert "urn:ietf:params:oauth:grant-type:jwt-bearer" in doc["grant_types_supported"]
    assert "urn:ietf:params:oauth:grant-type:token-exchange" in doc["grant_types_supported"]
    missing = httpx.get(oauth_server.issuer + "/nothing", verify=oauth_server.ssl_context())
    assert missing.status_code == 404


def test_the_authorization_endpoint_refuses_everything(oauth_server: OAuthServer) -> None:
    reply = httpx.get(
        oauth_server.issuer + "/authorize?response_type=code", verify=oauth_server.ssl_context()
    )
    assert reply.status_code == 400
    assert reply.json()["error"] == "unsupported_response_type"


def test_head_is_answered_with_the_get_headers_and_no_body(oauth_server: OAuthServer) -> None:
    """The document handlers take HEAD: it gets GET's status and headers, and the connection
    serves on (a body is not sent on a HEAD answer, RFC 9110 §9.3.2)."""
    with httpx.Client(verify=oauth_server.ssl_context()) as client:
        head = client.head(oauth_server.issuer + "/keys")
        assert head.status_code == 200
        assert head.content == b""
        get = client.get(oauth_server.issuer + "/keys")
        assert head.headers["content-length"] == get.headers["content-length"]
        assert client.head(oauth_server.issuer + "/nothing").status_code == 404


def test_the_documents_name_the_configured_issuer_whatever_host_the_client_says(
    oauth_server: OAuthServer,
) -> None:
    # A Host header of the attacker's choosing (a cache in front keyed without it, a client
    # that trusts what it is told) must not name another issuer or keys elsewhere.
    ctx = oauth_server.ssl_context()
    headers = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        doc = httpx.get(oauth_server.issuer + path, headers=headers, verify=ctx).json()
        assert doc["issuer"] == oauth_server.issuer
        assert doc["jwks_uri"] == oauth_server.issuer + "/keys"
        assert "evil" not in json.dumps(doc)


def test_the_jwks_publishes_public_jwt_keys_only(oauth_server: OAuthServer) -> None:
    # No private member, no X.509 authority (nor its certificate): the JWT keys alone.
    jwks = httpx.get(oauth_server.issuer + "/keys", verify=oauth_server.ssl_context()).json()
    bundle = oauth_server.running.server.state.bundle
    assert sorted(k["kid"] for k in jwks["keys"]) == sorted(bundle.jwt_authorities)
    for key in jwks["keys"]:
        assert key["use"] == "sig"
        assert set(key) <= {"kty", "crv", "x", "y", "n", "e", "use", "alg", "kid"}
