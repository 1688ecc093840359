"""The start-up check that the HTTP listeners' caps fit the descriptor limit."""

from __future__ import annotations

import logging
import resource

import pytest

from server.config import ServerConfig
from server.descriptor_budget import HEADROOM, http_budget, warn_if_short
from svid._spiffe_id import TrustDomain


def _config(cap: int, *, oauth: bool = True, bundle: bool = True) -> ServerConfig:
    return ServerConfig(
        trust_domain=TrustDomain("example.org"),
        oidc_issuer="https://oauth.example.org" if oauth else "",
        bundle_endpoint_address="0.0.0.0:8443" if bundle else "",
        http_max_connections=cap,
    )


def test_each_listener_that_runs_counts_its_total_cap() -> None:
    assert http_budget(_config(500, oauth=False, bundle=False)).needed == HEADROOM
    assert http_budget(_config(500, bundle=False)).needed == 500 + HEADROOM
    both = http_budget(_config(500))
    assert both.listeners == ("oauth_bind_address", "bundle_endpoint_address")
    assert both.needed == 2 * 500 + HEADROOM


def test_caps_past_the_limit_log_a_warning_naming_the_keys_and_numbers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = _config(1024)
    needed = 2 * 1024 + HEADROOM
    with caplog.at_level(logging.WARNING, logger="svid.server"):
        assert warn_if_short(config, needed)  # just fits: nothing said
        assert not caplog.records
        assert not warn_if_short(config, needed - 1)
    [record] = caplog.records
    assert "http_max_connections" in record.getMessage()
    assert "RLIMIT_NOFILE" in record.getMessage()
    assert getattr(record, "descriptor_limit", None) == needed - 1
    assert getattr(record, "http_max_connections", None) == 1024
    assert getattr(record, "needed", None) == needed
    assert getattr(record, "listeners", None) == "oauth_bind_address,bundle_endpoint_address"


def test_an_unlimited_descriptor_limit_fits_any_caps(caplog: pytest.LogCaptureFixture) -> None:
    config = _config(1 << 30)
    with caplog.at_level(logging.WARNING, logger="svid.server"):
        assert warn_if_short(config, resource.RLIM_INFINITY)
    assert not caplog.records
