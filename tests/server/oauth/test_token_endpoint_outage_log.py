"""What the server's log says while the ledger cannot record OAuth tokens or refusals (a disk
full, the datastore gone), however many requests come: the ledger's own line says the outage,
and each request's traceback is not written again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.datastore.errors import StorageError
from svid._spiffe_id import SpiffeId
from tests.log_lines import LogLines, log_lines
from tests.server.oauth.conftest import RESOURCE, OAuthServer

REQUESTS = 10  # within the host's budget of refusals on record (a burst of 20)
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
NOT_RECORDED = "OAuth token not recorded: refused"
NOT_AUDITED = "an OAuth refusal could not be audited"


@pytest.fixture
def grants_log() -> Iterator[LogLines]:
    with log_lines("svid.server.oauth") as lines:
        yield lines


def _post(server: OAuthServer, **form: str) -> httpx.Response:
    return httpx.post(server.issuer + "/token", data=form, verify=server.ssl_context())


def test_requests_refused_for_an_outage_write_no_traceback_each(
    oauth_server: OAuthServer, monkeypatch: pytest.MonkeyPatch, grants_log: LogLines
) -> None:
    """Fails on main: each request wrote its traceback (~3 KB), as fast as clients sent them,
    onto the disk that may be the one that is full. At most one here: the interval is the
    process's, and an earlier test may have had its line within it."""

    def broken(*args: Any, **kwargs: Any) -> None:
        raise StorageError("disk full")

    monkeypatch.setattr(oauth_server.running.server.datastore, "write_ledger", broken)
    signer = oauth_server.running.server.ca.jwt_signer()
    workload = SpiffeId.parse("spiffe://example.org/workload")
    for _ in range(REQUESTS):
        assertion = signer.sign(workload, [oauth_server.issuer], 300).token
        reply = _post(oauth_server, grant_type=JWT_BEARER, assertion=assertion, resource=RESOURCE)
        assert reply.status_code == 503, reply.text
        refused = _post(oauth_server, grant_type=JWT_BEARER, assertion="not.a.jwt")
        assert refused.status_code == 400, refused.text
    for message in (NOT_RECORDED, NOT_AUDITED):
        said = grants_log.said(message)
        assert len(said) <= 1, [r.getMessage() for r in said]
        assert all(r.exc_info and getattr(r, "times", 0) >= 1 for r in said)
