"""ListFederationRelationships pages as the other admin lists do (relationships are unbounded in
number: all in one reply outgrew gRPC's 4 MiB limit), and `federation list` reads every page."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from server.cli import main
from svid._proto import admin_pb2
from tests.server.fixtures import RunningServer, running_server

PARTNERS = [f"p{n}.example" for n in range(3)]


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    for server in running_server():
        for td in PARTNERS:
            rel = admin_pb2.FederationRelationship(
                trust_domain=td, bundle_endpoint_url="https://127.0.0.1:1/", profile="https_web"
            )
            server.admin().CreateFederationRelationship(
                admin_pb2.CreateFederationRelationshipRequest(relationship=rel), timeout=10
            )
        yield server


def test_the_api_pages_by_trust_domain(srv: RunningServer) -> None:
    admin = srv.admin()
    seen: list[str] = []
    token = ""
    while True:
        reply = admin.ListFederationRelationships(
            admin_pb2.ListFederationRelationshipsRequest(page_size=2, page_token=token),
            timeout=10,
        )
        assert 1 <= len(reply.relationships) <= 2
        seen.extend(r.trust_domain for r in reply.relationships)
        token = reply.next_page_token
        if not token:
            break
    assert seen == PARTNERS
    with pytest.raises(grpc.RpcError) as bad:
        admin.ListFederationRelationships(
            admin_pb2.ListFederationRelationshipsRequest(page_token="garbage"), timeout=10
        )
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_the_cli_reads_every_page(capsys: pytest.CaptureFixture[str], srv: RunningServer) -> None:
    socket = ["--admin-socket", srv.runtime.admin_socket]
    code = main(["federation", "list", "--page-size", "1", "--output", "json", *socket])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert [r["trust_domain"] for r in json.loads(out)["relationships"]] == PARTNERS
    code = main(["federation", "list", "--page-size", "1", *socket])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("Found 3 relationship(s)")
    code = main(["bundle", "list", "--page-size", "0", *socket])
    assert code == 1
    assert "--page-size: 0 must be between 1" in capsys.readouterr().err


def test_a_client_from_before_paging_gets_every_relationship(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It sends no field (its request's bytes are these) and reads one reply, never the token:
    cut at the other listings' default page size, it showed the first page as all there is."""
    monkeypatch.setattr("server.listing.DEFAULT_PAGE_SIZE", 2)  # fewer than PARTNERS
    request = admin_pb2.ListFederationRelationshipsRequest()
    assert request.SerializeToString() == b""  # what the old, field-less request sends
    reply = srv.admin().ListFederationRelationships(request, timeout=10)
    assert [r.trust_domain for r in reply.relationships] == PARTNERS
    assert reply.next_page_token == ""
