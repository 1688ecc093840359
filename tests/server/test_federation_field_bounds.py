"""A relationship's free-text fields are bounded: each is logged, and put on the ledger with
every refusal, at each failed fetch (a 3 MB URL was stored as given)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from server.federation.service import MAX_CA_FILE_BYTES, MAX_URL_BYTES
from svid._proto import admin_pb2
from tests.server.fixtures import RunningServer, running_server


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    yield from running_server()


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (
            {"bundle_endpoint_url": "https://a.example/" + "a" * MAX_URL_BYTES},
            f"bundle_endpoint_url: at most {MAX_URL_BYTES} bytes",
        ),
        ({"ca_file": "/" + "c" * MAX_CA_FILE_BYTES}, f"ca_file: at most {MAX_CA_FILE_BYTES} bytes"),
    ],
)
def test_oversized_fields_are_refused(
    srv: RunningServer, fields: dict[str, str], problem: str
) -> None:
    rel = admin_pb2.FederationRelationship(
        trust_domain="bounds.example",
        bundle_endpoint_url="https://a.example/",
        profile="https_web",
    )
    for key, value in fields.items():
        setattr(rel, key, value)
    with pytest.raises(grpc.RpcError) as refused:
        srv.admin().CreateFederationRelationship(
            admin_pb2.CreateFederationRelationshipRequest(relationship=rel), timeout=10
        )
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert refused.value.details() == problem  # type: ignore[attr-defined]
