"""The oauth config keys, checked together when oidc_issuer is set (each error names its key)."""

from __future__ import annotations

from typing import Any

import pytest

from server.config import build_config
from server.errors import ConfigError
from server.oauth.jwks import cache_max_age
from server.oauth.settings import check_server_config

BASE = {"trust_domain": "example.org"}
TLS = {"oauth_tls_cert": "/c.pem", "oauth_tls_key": "/k.pem"}


def _settings(**values: Any) -> Any:
    return check_server_config(build_config({**BASE, **values}))


def test_https_issuer_with_certificate() -> None:
    settings = _settings(
        oidc_issuer="https://svidd.example.org:8443/",
        oauth_bind_address="0.0.0.0:8443",
        oauth_resources="https://a.example/mcp, https://b.example",
        **TLS,
    )
    assert settings.issuer == "https://svidd.example.org:8443"
    assert settings.resources == {"https://a.example/mcp", "https://b.example"}


@pytest.mark.parametrize(
    ("values", "key"),
    [
        (
            {"oidc_issuer": "http://svidd.example.org", "oauth_bind_address": "127.0.0.1:1"},
            "oidc_issuer",
        ),
        ({"oidc_issuer": "ftp://x", "oauth_bind_address": "127.0.0.1:1"}, "oidc_issuer"),
        (
            {"oidc_issuer": "https://x.example/?q=1", "oauth_bind_address": "127.0.0.1:1", **TLS},
            "oidc_issuer",
        ),
        ({"oidc_issuer": "https://x.example"}, "oauth_bind_address"),
        (
            {"oidc_issuer": "https://x.example", "oauth_bind_address": "127.0.0.1:1"},
            "oauth_tls_cert",
        ),
        (
            {"oidc_issuer": "http://127.0.0.1:1", "oauth_bind_address": "0.0.0.0:1"},
            "oauth_bind_address",
        ),
        (
            {
                "oidc_issuer": "http://127.0.0.1:1",
                "oauth_bind_address": "127.0.0.1:1",
                "oauth_resources": ["mcp-tickets"],
            },
            "oauth_resources",
        ),
        (
            {
                "oidc_issuer": "http://127.0.0.1:1",
                "oauth_bind_address": "127.0.0.1:1",
                "oauth_access_token_ttl": 7200,
            },
            "oauth_access_token_ttl",
        ),
        (
            {
                "oidc_issuer": "http://127.0.0.1:1",
                "oauth_bind_address": "127.0.0.1:1",
                "oauth_trusted_bundles": ["nopath"],
            },
            "oauth_trusted_bundles",
        ),
        (
            {
                "oidc_issuer": "http://127.0.0.1:1",
                "oauth_bind_address": "127.0.0.1:1",
                "oauth_trusted_bundles": ["partner.org=/etc/partner.json"],
                "oauth_trusted_issuers": ["partner.org=https://oidc.partner.example"],
            },
            "oauth_trusted_issuers: partner.org has a bundle file already",
        ),
        (
            {
                "oidc_issuer": "http://127.0.0.1:1",
                "oauth_bind_address": "127.0.0.1:1",
                "oauth_trusted_issuers": ["partner.org=http://127.0.0.1:1"],
            },
            "oauth_trusted_issuers: http://127.0.0.1:1 is this server's own issuer",
        ),
        (
            {
                "oidc_issuer": "http://127.0.0.1:1",
                "oauth_bind_address": "127.0.0.1:1",
                "oauth_trusted_issuers": ["partner.org=https://oidc.partner.example"],
                "oauth_trusted_issuers_ca": "/no/such/ca.pem",
            },
            "oauth_trusted_issuers_ca: no such file",
        ),
    ],
)
def test_bad_oauth_settings_name_their_key(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        build_config({**BASE, **values})


def test_plain_http_only_for_loopback_issuer_and_listener() -> None:
    settings = _settings(oidc_issuer="http://127.0.0.1:9000", oauth_bind_address="127.0.0.1:9000")
    assert settings.tls_cert is None


def test_jwks_cache_follows_the_rotation_lead() -> None:
    assert cache_max_age(86400) == 3600  # lead 8 h, half capped at an hour
    assert cache_max_age(3600) == 600  # lead 20 min, half of it
    assert cache_max_age(60) == 10
