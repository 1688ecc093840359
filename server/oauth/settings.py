"""The OAuth/OIDC settings, checked once: what server/config.py's oauth keys mean together."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from server.errors import ConfigError
from server.https_get import holds_userinfo
from server.oauth.admission import ConnectionCaps
from svid._errors import SpiffeIdError
from svid._spiffe_id import SpiffeId, TrustDomain

if TYPE_CHECKING:
    from server.config import ServerConfig

MAX_ACCESS_TOKEN_TTL = 3600


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_issuer(issuer: str, key: str = "oidc_issuer") -> str:
    """An OIDC issuer URL (OpenID Discovery §3 / RFC 8414 §2): https, a host, no query or
    fragment; http only for a loopback host (a local demo or test). No trailing slash. Errors
    name the config ``key``."""
    if holds_userinfo(issuer):
        # Never the URL itself: its user info may hold a password.
        raise ConfigError(f"{key}: no user info (user@ or user:pw@) allowed in an issuer URL")
    try:
        parts = urlsplit(issuer)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{key}: not a URL ({exc})") from None
    del port
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(f"{key}: must be an https:// URL with a host, got {issuer!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ConfigError(f"{key}: plain http is allowed only on loopback, got {issuer!r}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{key}: no query, fragment or user info allowed: {issuer!r}")
    return issuer.rstrip("/")


@dataclass(frozen=True, slots=True)
class TrustedBundle:
    """Another trust domain whose JWT-SVIDs the token endpoint accepts, its keys in a file
    (a SPIFFE bundle or a JWKS)."""

    trust_domain: TrustDomain
    path: Path


def parse_trusted_bundles(items: tuple[str, ...]) -> tuple[TrustedBundle, ...]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"oauth_trusted_bundles: expected TRUST_DOMAIN=PATH, got {item!r}")
        try:
            td = TrustDomain.parse(name.strip())
        except SpiffeIdError as exc:
            raise ConfigError(f"oauth_trusted_bundles: {exc}") from None
        out.append(TrustedBundle(td, Path(path.strip())))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """Another trust domain whose JWT-SVIDs the token endpoint accepts, its keys found by OIDC
    discovery from its issuer URL (what its tokens carry as ``iss``)."""

    trust_domain: TrustDomain
    url: str


def parse_trusted_issuers(items: tuple[str, ...]) -> tuple[TrustedIssuer, ...]:
    out: dict[TrustDomain, TrustedIssuer] = {}
    for item in items:
        name, sep, url = item.partition("=")
        if not sep or not url.strip():
            raise ConfigError(
                f"oauth_trusted_issuers: expected TRUST_DOMAIN=ISSUER_URL, got {item!r}"
            )
        try:
            td = TrustDomain.parse(name.strip())
        except SpiffeIdError as exc:
            raise ConfigError(f"oauth_trusted_issuers: {exc}") from None
        if td in out:
            raise ConfigError(f"oauth_trusted_issuers: {td} is named twice")
        out[td] = TrustedIssuer(td, check_issuer(url.strip(), "oauth_trusted_issuers"))
    return tuple(out.values())


def parse_resource_workloads(
    items: tuple[str, ...], resources: frozenset[str], domains: frozenset[TrustDomain]
) -> dict[str, str]:
    """Resource -> the SPIFFE ID of the workload serving it (the only one that may act for
    the tokens issued for it). A SPIFFE ID has no "=", so the last one splits the item."""
    out: dict[str, str] = {}
    key = "oauth_resource_workloads"
    for item in items:
        resource, sep, workload = item.rpartition("=")
        resource, workload = resource.strip(), workload.strip()
        if not sep or not resource or not workload:
            raise ConfigError(f"{key}: expected RESOURCE=SPIFFE_ID, got {item!r}")
        if resource not in resources:
            raise ConfigError(f"{key}: {resource!r} is not one of oauth_resources")
        if resource in out:
            raise ConfigError(f"{key}: {resource!r} is named twice")
        try:
            sid = SpiffeId.parse(workload)
        except SpiffeIdError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        if sid.trust_domain not in domains:
            raise ConfigError(
                f"{key}: {sid} is of a trust domain whose JWT-SVIDs are not accepted (this "
                "one's, or one of oauth_trusted_bundles / oauth_trusted_issuers)"
            )
        out[resource] = str(sid)
    return out


@dataclass(frozen=True, slots=True)
class OAuthSettings:
    issuer: str
    host: str
    port: int
    tls_cert: Path | None
    tls_key: Path | None
    resources: frozenset[str]
    trusted: tuple[TrustedBundle, ...]
    access_token_ttl: int
    jwt_key_ttl: int
    connection_caps: ConnectionCaps
    issuers: tuple[TrustedIssuer, ...] = ()
    issuers_ca: Path | None = None
    resource_workloads: Mapping[str, str] = field(default_factory=dict)


def check_server_config(config: ServerConfig) -> OAuthSettings:
    """The oauth keys of a ServerConfig whose oidc_issuer is set, checked together."""
    issuer = check_issuer(config.oidc_issuer)
    if not config.oauth_bind_address:
        raise ConfigError("oauth_bind_address: required when oidc_issuer is set (HOST:PORT)")
    host, _, port = config.oauth_bind_address.rpartition(":")
    if (config.oauth_tls_cert is None) != (config.oauth_tls_key is None):
        raise ConfigError("oauth_tls_cert and oauth_tls_key: give both or neither")
    if config.oauth_tls_cert is None:
        # Without a certificate the listener speaks plain HTTP: only for an http issuer, and
        # only where nothing but this machine can reach it.
        if issuer.startswith("https:"):
            raise ConfigError("oauth_tls_cert: required for an https:// oidc_issuer")
        if not is_loopback(host):
            raise ConfigError(
                f"oauth_bind_address: plain HTTP may only listen on loopback, got {host!r}"
            )
    if config.oauth_access_token_ttl > MAX_ACCESS_TOKEN_TTL:
        raise ConfigError(
            f"oauth_access_token_ttl: at most {MAX_ACCESS_TOKEN_TTL} s (access tokens live "
            f"minutes), got {config.oauth_access_token_ttl}"
        )
    for resource in config.oauth_resources:
        if not urlsplit(resource).scheme:
            raise ConfigError(f"oauth_resources: {resource!r} is not an absolute URI (RFC 8707)")
        if "," in resource:
            # Audit events list a request's resources joined by commas: one holding a comma
            # would read as two there (task names and minted audiences refuse it too).
            raise ConfigError(f"oauth_resources: {resource!r} holds a comma; give it %2C")
    trusted = parse_trusted_bundles(config.oauth_trusted_bundles)
    issuers = parse_trusted_issuers(config.oauth_trusted_issuers)
    # Our own JWT-SVIDs are checked against our own keys only: a second source of them would
    # be ignored, and an operator would believe it was in use.
    for key, named in (
        ("oauth_trusted_bundles", [b.trust_domain for b in trusted]),
        ("oauth_trusted_issuers", [i.trust_domain for i in issuers]),
    ):
        if config.trust_domain in named:
            raise ConfigError(f"{key}: {config.trust_domain} is this server's own trust domain")
    for item in issuers:
        if item.url == issuer:
            raise ConfigError(f"oauth_trusted_issuers: {item.url} is this server's own issuer")
        if item.trust_domain in {b.trust_domain for b in trusted}:
            raise ConfigError(
                f"oauth_trusted_issuers: {item.trust_domain} has a bundle file already "
                "(oauth_trusted_bundles): give one source of its keys"
            )
    ca_file = config.oauth_trusted_issuers_ca
    if ca_file is not None and not ca_file.is_file():
        raise ConfigError(f"oauth_trusted_issuers_ca: no such file {ca_file}")
    resources = frozenset(config.oauth_resources)
    domains = frozenset(
        (
            config.trust_domain,
            *(b.trust_domain for b in trusted),
            *(i.trust_domain for i in issuers),
        )
    )
    workloads = parse_resource_workloads(config.oauth_resource_workloads, resources, domains)
    return OAuthSettings(
        issuer=issuer,
        host=host.strip("[]"),
        port=int(port),
        tls_cert=config.oauth_tls_cert,
        tls_key=config.oauth_tls_key,
        resources=resources,
        trusted=trusted,
        access_token_ttl=config.oauth_access_token_ttl,
        jwt_key_ttl=config.jwt_key_ttl,
        issuers=issuers,
        issuers_ca=config.oauth_trusted_issuers_ca,
        resource_workloads=workloads,
        connection_caps=ConnectionCaps(
            config.http_max_connections, config.http_max_connections_per_host
        ),
    )
