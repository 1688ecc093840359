"""A relationship's https_web ca_file is read by the server at each fetch: a relative one is
taken from the server's working directory in the config (as every config path, and as SPIRE
does), made absolute once at start; the CLI sends its --ca-file made absolute from the
caller's working directory; the admin API refuses a relative one (whose directory?)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from server.cli import main
from server.config import build_config
from server.errors import ConfigError
from server.federation.service import parse_static
from svid._proto import admin_pb2
from svid._spiffe_id import TrustDomain
from tests.server.fixtures import RunningServer, running_server

OWN = TrustDomain("example.org")


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    yield from running_server()


def test_a_relative_ca_file_in_the_config_is_the_working_directorys_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rel = parse_static("partner.org https_web https://partner:8443/ certs/ca.pem", OWN)
    assert rel.ca_file == str(tmp_path / "certs" / "ca.pem")
    static = ["partner.org https_web https://partner:8443/ certs/ca.pem"]
    values = {"trust_domain": "example.org", "federation_relationships": static}
    # Missing, it is named where it was looked for, at start, not at every fetch.
    with pytest.raises(ConfigError) as missing:
        build_config(values)
    assert f"ca_file {tmp_path / 'certs' / 'ca.pem'}: no such file" in str(missing.value)
    assert "working directory" in str(missing.value)
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text("")
    build_config(values)


def test_the_cli_sends_its_relative_ca_file_absolute_and_the_api_refuses_a_relative_one(
    capsys: pytest.CaptureFixture[str],
    srv: RunningServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(
        [
            "federation",
            "create",
            "--trust-domain",
            "webpartner.org",
            "--bundle-endpoint-url",
            "https://127.0.0.1:1/",
            "--bundle-endpoint-profile",
            "https_web",
            "--ca-file",
            "ca.pem",
            "--output",
            "json",
            "--admin-socket",
            srv.runtime.admin_socket,
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["ca_file"] == str(tmp_path / "ca.pem")

    rel = admin_pb2.FederationRelationship(
        trust_domain="webpartner.org",
        bundle_endpoint_url="https://127.0.0.1:1/",
        profile="https_web",
        ca_file="ca.pem",
    )
    with pytest.raises(grpc.RpcError) as refused:
        srv.admin().UpdateFederationRelationship(
            admin_pb2.UpdateFederationRelationshipRequest(relationship=rel), timeout=10
        )
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "ca_file: 'ca.pem' must be an absolute path" in refused.value.details()  # type: ignore[attr-defined]
