"""Refusals past their caller's budget leave the audit log one event a minute per source
that counts them: an operator reading the log sees how many, and from whom, in a bounded
number of rows."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import make_server, short_tmpdir
from tests.ports import free_port

pytestmark = pytest.mark.e2e

BURST = 3
FLOOD = 12


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmpdir("sur")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_refusals_left_off_the_record_are_counted_on_it_when_the_server_stops(
    root: Path,
) -> None:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    server = make_server(
        root,
        oidc_issuer=issuer,
        oauth_bind_address=f"127.0.0.1:{port}",
        oauth_resources=["https://mcp.example.org/mcp"],
        oauth_refusal_rate_per_host=0.001,
        oauth_refusal_burst_per_host=BURST,
    )
    server.start()
    try:
        with httpx.Client(timeout=10) as client:
            for i in range(FLOOD):
                reply = client.post(
                    issuer + "/token",
                    data={
                        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                        "assertion": f"not-a-jwt-{i}",
                        "resource": "https://mcp.example.org/mcp",
                    },
                )
                assert reply.status_code == 400, reply.text
    finally:
        assert server.stop() == 0

    def export(kind: str) -> list[dict[str, object]]:
        out = server.cli(
            "audit", "export", "--data-dir", str(server.data_dir), "--kind", kind
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    assert len(export("oauth_jwt_bearer")) == BURST  # each on record, up to the budget
    (tally,) = export("refusals_unrecorded")
    assert tally["decision"] == "not_recorded"
    extra = tally["extra"]
    assert isinstance(extra, dict)
    assert extra["source"] == "oauth"
    assert extra["count"] == FLOOD - BURST
    assert extra["callers"] == 1
    assert extra["top"] == [{"caller": "127.0.0.1", "count": FLOOD - BURST}]
    assert "not-a-jwt" not in json.dumps(tally)  # what the client sent is not on record
    server.cli("audit", "verify", "--data-dir", str(server.data_dir))  # the chain holds
