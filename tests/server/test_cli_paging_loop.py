"""The CLI's listings end against a server whose pages do not advance: one that hands back a
token it gave before, or an empty page with a token, had `federation list` (and every listing
following pages) ask forever, holding each page it got in memory."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
import pytest

from server.cli import main
from svid._proto import admin_pb2, admin_pb2_grpc

# Past this many calls the fake server refuses: without the CLI's check it would loop forever.
CALLS = 20


class LoopingAdmin(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    """Answers ListFederationRelationships with `tokens` in turn, then the last one forever."""

    def __init__(self, tokens: list[str], empty: bool) -> None:
        self.tokens = tokens
        self.empty = empty
        self.calls = 0

    def ListFederationRelationships(
        self, request: admin_pb2.ListFederationRelationshipsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListFederationRelationshipsResponse:
        self.calls += 1
        if self.calls > CALLS:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "asked forever")
        rel = admin_pb2.FederationRelationship(
            trust_domain="p.example", bundle_endpoint_url="https://p.example/", profile="https_web"
        )
        token = self.tokens[min(self.calls, len(self.tokens)) - 1]
        return admin_pb2.ListFederationRelationshipsResponse(
            relationships=[] if self.empty else [rel], next_page_token=token
        )


def _list(socket: Path, admin: LoopingAdmin, capsys: pytest.CaptureFixture[str]) -> str:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    try:
        code = main(["federation", "list", "--admin-socket", str(socket), "--timeout", "5"])
    finally:
        server.stop(None)
    assert code == 1
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("tokens", "empty", "said"),
    [
        (["again"], False, "a page token it gave before"),  # the same token each time
        (["a", "b", "a"], False, "a page token it gave before"),  # a cycle
        (["more"], True, "an empty page"),
    ],
)
def test_a_listing_that_does_not_advance_ends(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tokens: list[str],
    empty: bool,
    said: str,
) -> None:
    admin = LoopingAdmin(tokens, empty)
    err = _list(tmp_path / "admin.sock", admin, capsys)
    assert "does not advance" in err
    assert said in err
    assert admin.calls <= len(tokens) + 1
