"""ListFederatedBundles pages as ListEntries does: foreign bundles may each be near 1 MiB, and
a few of them in one reply passed gRPC's 4 MiB message limit, so `bundle list` failed whole."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from server.cli import main
from server.federation.fetch import MAX_AUTHORITIES, MAX_BUNDLE_BYTES
from server.listing import MAX_PAGE_BYTES
from svid._bundle import SpiffeBundle
from svid._proto import admin_pb2
from svid._spiffe_id import TrustDomain
from tests.server.fixtures import RunningServer, running_server

# Five foreign bundles of ~900 KB: 4.5 MB together, past gRPC's 4 MiB default.
FOREIGN = [f"big{n}.example" for n in range(5)]


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    yield from running_server()


def _large_bundle(trust_domain: str) -> bytes:
    # One key under as many long key ids as a bundle may hold: near the maximum size, cheap
    # to make.
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pad = "x" * (900_000 // MAX_AUTHORITIES - 200)  # ~900 KB in all, whatever the cap
    keys = {f"k{n:06d}{pad}": key for n in range(MAX_AUTHORITIES)}
    body = SpiffeBundle(TrustDomain(trust_domain), (), keys, sequence=1).to_json()
    assert MAX_PAGE_BYTES // 3 < len(body) <= MAX_BUNDLE_BYTES
    return body


@pytest.fixture(scope="module")
def large_bundles(srv: RunningServer) -> list[str]:
    admin = srv.admin()
    for td in FOREIGN:
        admin.SetFederatedBundle(
            admin_pb2.SetFederatedBundleRequest(
                bundle=admin_pb2.FederatedBundle(trust_domain=td, bundle=_large_bundle(td))
            ),
            timeout=30,
        )
    return FOREIGN


def test_large_bundles_page_under_the_message_limit(
    srv: RunningServer, large_bundles: list[str]
) -> None:
    admin = srv.admin()
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = admin.ListFederatedBundles(
            admin_pb2.ListFederatedBundlesRequest(page_token=token), timeout=30
        )
        pages += 1
        assert reply.bundles, "a page holds at least one bundle"
        assert reply.ByteSize() < 4 * 1024 * 1024
        seen.extend(b.trust_domain for b in reply.bundles)
        token = reply.next_page_token
        if not token:
            break
    assert seen == sorted(large_bundles)
    assert pages > 1


def test_page_size_and_a_token_for_other_filters(
    srv: RunningServer, large_bundles: list[str]
) -> None:
    admin = srv.admin()
    first = admin.ListFederatedBundles(
        admin_pb2.ListFederatedBundlesRequest(page_size=1), timeout=30
    )
    assert [b.trust_domain for b in first.bundles] == [sorted(large_bundles)[0]]
    second = admin.ListFederatedBundles(
        admin_pb2.ListFederatedBundlesRequest(page_size=1, page_token=first.next_page_token),
        timeout=30,
    )
    assert [b.trust_domain for b in second.bundles] == [sorted(large_bundles)[1]]
    with pytest.raises(grpc.RpcError) as exc:
        admin.ListFederatedBundles(
            admin_pb2.ListFederatedBundlesRequest(page_token="garbage"), timeout=30
        )
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "page_token" in exc.value.details()  # type: ignore[attr-defined]


def test_the_cli_follows_every_page(
    capsys: pytest.CaptureFixture[str], srv: RunningServer, large_bundles: list[str]
) -> None:
    code = main(["bundle", "list", "--output", "json", "--admin-socket", srv.runtime.admin_socket])
    out, err = capsys.readouterr()
    assert code == 0, err
    listed = [b["trust_domain"] for b in json.loads(out)["bundles"]]
    assert sorted(listed) == sorted(f"spiffe://{td}" for td in large_bundles)
