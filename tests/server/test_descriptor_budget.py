"""The start-up check that the listeners' caps fit the descriptor limit, and the agents'
ports' cap the limit leaves."""

from __future__ import annotations

import logging
import resource

import pytest

from server.config import ServerConfig
from server.descriptor_budget import (
    GRPC_MAX_DERIVED,
    GRPC_MIN_CONNECTIONS,
    HEADROOM,
    budget,
    per_port,
    warn_if_short,
)
from svid._spiffe_id import TrustDomain


def _config(cap: int, *, oauth: bool = True, bundle: bool = True, grpc: int = 0) -> ServerConfig:
    return ServerConfig(
        trust_domain=TrustDomain("example.org"),
        oidc_issuer="https://oauth.example.org" if oauth else "",
        bundle_endpoint_address="0.0.0.0:8443" if bundle else "",
        http_max_connections=cap,
        grpc_max_connections=grpc,
    )


def test_each_listener_that_runs_counts_its_total_cap() -> None:
    least = GRPC_MIN_CONNECTIONS + HEADROOM  # a derived gRPC cap, at its least
    assert budget(_config(500, oauth=False, bundle=False)).needed == least
    assert budget(_config(500, bundle=False)).needed == 500 + least
    both = budget(_config(500))
    assert both.listeners == ("oauth_bind_address", "bundle_endpoint_address")
    assert both.needed == 2 * 500 + least
    assert budget(_config(500, grpc=5000)).needed == 2 * 500 + 5000 + HEADROOM


def test_the_agents_ports_take_what_the_limit_leaves_unless_configured() -> None:
    caps = budget(_config(500))
    assert caps.grpc_cap(20_000) == 20_000 - 2 * 500 - HEADROOM
    # A limit too small for the least cap still gets it (and a warning at start).
    assert caps.grpc_cap(1500) == GRPC_MIN_CONNECTIONS
    assert caps.grpc_cap(10_000_000) == GRPC_MAX_DERIVED
    assert caps.grpc_cap(resource.RLIM_INFINITY) == GRPC_MAX_DERIVED
    # The operator's cap is the cap, whatever the limit.
    assert budget(_config(500, grpc=64)).grpc_cap(20_000) == 64
    assert budget(_config(500, grpc=64)).grpc_cap(resource.RLIM_INFINITY) == 64


def test_caps_past_the_limit_log_a_warning_naming_the_keys_and_numbers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = _config(1024)
    needed = 2 * 1024 + GRPC_MIN_CONNECTIONS + HEADROOM
    with caplog.at_level(logging.WARNING, logger="svid.server"):
        assert warn_if_short(config, needed)  # just fits: nothing said
        assert not caplog.records
        assert not warn_if_short(config, needed - 1)
    [record] = caplog.records
    assert "http_max_connections or grpc_max_connections" in record.getMessage()
    assert "RLIMIT_NOFILE" in record.getMessage()
    assert getattr(record, "descriptor_limit", None) == needed - 1
    assert getattr(record, "http_max_connections", None) == 1024
    assert getattr(record, "needed", None) == needed
    assert getattr(record, "grpc_max_connections", None) == GRPC_MIN_CONNECTIONS
    assert getattr(record, "listeners", None) == "oauth_bind_address,bundle_endpoint_address"


def test_an_unlimited_descriptor_limit_fits_any_caps(caplog: pytest.LogCaptureFixture) -> None:
    config = _config(1 << 30)
    with caplog.at_level(logging.WARNING, logger="svid.server"):
        assert warn_if_short(config, resource.RLIM_INFINITY)
    assert not caplog.records


def test_each_of_the_agents_two_ports_gets_half_the_cap() -> None:
    # gRPC counts the cap per listening port: the whole cap on each would double it.
    assert per_port(3072) == 1536
    assert per_port(5) == 2
    assert per_port(1) == 1  # a port that takes nothing would be a server nothing reaches
