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
                "oauth_resources": ["https://a.example/x,y"],
            },
            "oauth_resources: 'https://a.example/x,y' holds a comma",
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
                "oauth_trusted_issuers": ["example.org=https://oidc.example.net"],
            },
            "oauth_trusted_issuers: example.org is this server's own trust domain",
        ),
        (
            {
                "oidc_issuer": "http://127.0.0.1:1",
                "oauth_bind_address": "127.0.0.1:1",
                "oauth_trusted_bundles": ["example.org=/etc/ours.json"],
            },
            "oauth_trusted_bundles: example.org is this server's own trust domain",
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


@pytest.mark.parametrize(
    "values",
    [
        {"oidc_issuer": "https://u:pw-7@x.example", "oauth_bind_address": "127.0.0.1:1", **TLS},
        {"oidc_issuer": "http://u:pw-7@x.example", "oauth_bind_address": "127.0.0.1:1"},
        {
            "oidc_issuer": "http://127.0.0.1:1",
            "oauth_bind_address": "127.0.0.1:1",
            "oauth_trusted_issuers": ["partner.org=https://u:pw-7@oidc.partner.example"],
        },
    ],
)
def test_an_issuer_url_with_a_password_is_refused_without_it(values: dict[str, Any]) -> None:
    # The error quoted the URL it refused for holding user info: the password with it.
    with pytest.raises(ConfigError, match="user info") as caught:
        build_config({**BASE, **values})
    assert "pw-7" not in str(caught.value)


def test_plain_http_only_for_loopback_issuer_and_listener() -> None:
    settings = _settings(oidc_issuer="http://127.0.0.1:9000", oauth_bind_address="127.0.0.1:9000")
    assert settings.tls_cert is None


def test_jwks_cache_follows_the_rotation_lead() -> None:
    assert cache_max_age(86400) == 3600  # lead 8 h, half capped at an hour
    assert cache_max_age(3600) == 600  # lead 20 min, half of it
    assert cache_max_age(60) == 10


PLAIN = {"oidc_issuer": "http://127.0.0.1:1", "oauth_bind_address": "127.0.0.1:1"}
MCP = "https://mcp.example/mcp?v=1"


def test_resource_workloads_name_who_serves_each_resource() -> None:
    settings = _settings(
        **PLAIN,
        oauth_resources=[MCP, "https://b.example"],
        oauth_resource_workloads=[f"{MCP} = spiffe://example.org/mcp"],
    )
    # A resource may carry "=" of its own: the SPIFFE ID is after the last one.
    assert settings.resource_workloads == {MCP: "spiffe://example.org/mcp"}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["spiffe://example.org/mcp"], "expected RESOURCE=SPIFFE_ID"),
        ([f"{MCP}="], "expected RESOURCE=SPIFFE_ID"),
        (["https://other.example=spiffe://example.org/mcp"], "not one of oauth_resources"),
        ([f"{MCP}=spiffe://example.org/a", f"{MCP}=spiffe://example.org/b"], "named twice"),
        ([f"{MCP}=https://example.org/mcp"], "oauth_resource_workloads: "),
        ([f"{MCP}=spiffe://elsewhere.example/mcp"], "are not accepted"),
    ],
)
def test_bad_resource_workloads_are_refused_naming_the_key(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match="oauth_resource_workloads") as caught:
        _settings(**PLAIN, oauth_resources=[MCP], oauth_resource_workloads=items)
    assert message in str(caught.value)


def test_a_workload_of_a_trusted_domain_may_serve_a_resource(tmp_path: Any) -> None:
    settings = _settings(
        **PLAIN,
        oauth_resources=[MCP],
        oauth_trusted_bundles=[f"partner.org={tmp_path / 'b.json'}"],
        oauth_resource_workloads=[f"{MCP}=spiffe://partner.org/mcp"],
    )
    assert settings.resource_workloads == {MCP: "spiffe://partner.org/mcp"}
