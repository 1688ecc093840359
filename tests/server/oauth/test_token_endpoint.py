"""The token endpoint on a running server: RFC 7523 JWT-bearer grant, refusals as RFC 6749
§5.2 errors, replays refused through the datastore, every outcome on the audit ledger."""

from __future__ import annotations

from typing import Any

import httpx
import jwt as pyjwt
import pytest

from svid._spiffe_id import SpiffeId
from tests.server.oauth.conftest import RESOURCE, OAuthServer

WORKLOAD = SpiffeId.parse("spiffe://example.org/workload")
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def _assertion(server: OAuthServer, audience: str | None = None, ttl: int = 300) -> str:
    signer = server.running.server.ca.jwt_signer()
    return signer.sign(WORKLOAD, [audience or server.issuer], ttl).token


def _post(server: OAuthServer, **form: str) -> httpx.Response:
    return httpx.post(server.issuer + "/token", data=form, verify=server.ssl_context())


def _events(server: OAuthServer, kind: str) -> list[dict[str, Any]]:
    rows = server.running.server.datastore.audit_rows()
    return [r for r in rows if r["kind"] == kind]


def test_jwt_bearer_grant_returns_an_at_jwt_for_the_resource(oauth_server: OAuthServer) -> None:
    reply = _post(
        oauth_server, grant_type=JWT_BEARER, assertion=_assertion(oauth_server), resource=RESOURCE
    )
    assert reply.status_code == 200, reply.text
    assert reply.headers["cache-control"] == "no-store"
    body = reply.json()
    assert body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 300
    token = body["access_token"]
    assert pyjwt.get_unverified_header(token)["typ"] == "at+jwt"
    client = pyjwt.PyJWKClient(
        oauth_server.issuer + "/keys", ssl_context=oauth_server.ssl_context()
    )
    claims = pyjwt.decode(
        token,
        client.get_signing_key_from_jwt(token).key,
        algorithms=["ES256"],
        audience=RESOURCE,
        issuer=oauth_server.issuer,
    )
    assert claims["sub"] == claims["client_id"] == str(WORKLOAD)
    (event,) = _events(oauth_server, "oauth_jwt_bearer")
    assert event["decision"] == "allow"
    assert event["credential_id"] == claims["jti"]
    assert event["resource"] == RESOURCE


def test_a_replayed_assertion_is_refused(oauth_server: OAuthServer) -> None:
    assertion = _assertion(oauth_server)
    first = _post(oauth_server, grant_type=JWT_BEARER, assertion=assertion, resource=RESOURCE)
    assert first.status_code == 200
    again = _post(oauth_server, grant_type=JWT_BEARER, assertion=assertion, resource=RESOURCE)
    assert again.status_code == 400
    assert again.json()["error"] == "invalid_grant"
    assert "replay" in again.json()["error_description"]
    decisions = [e["decision"] for e in _events(oauth_server, "oauth_jwt_bearer")]
    assert decisions == ["allow", "deny"]


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("audience", "invalid_grant"),
        ("expired", "invalid_grant"),
        ("foreign", "invalid_grant"),
        ("resource", "invalid_target"),
        ("grant_type", "unsupported_grant_type"),
        ("missing", "invalid_request"),
    ],
)
def test_refusals_are_rfc6749_errors_and_audited(
    oauth_server: OAuthServer, case: str, error: str
) -> None:
    form = {"grant_type": JWT_BEARER, "assertion": _assertion(oauth_server), "resource": RESOURCE}
    if case == "audience":
        form["assertion"] = _assertion(oauth_server, audience="https://someone.else")
    elif case == "expired":
        form["assertion"] = _assertion(oauth_server, ttl=10)
        oauth_server.running.clock.advance(60)
    elif case == "foreign":
        from cryptography.hazmat.primitives.asymmetric import ec

        from server.ca.signer import JwtSigner

        stranger = JwtSigner(
            ec.generate_private_key(ec.SECP256R1()),
            "stranger",
            oauth_server.running.clock,
            int(oauth_server.running.clock.now()) + 3600,
        )
        sid = SpiffeId.parse("spiffe://other.org/w")
        form["assertion"] = stranger.sign(sid, [oauth_server.issuer], 60).token
    elif case == "resource":
        form["resource"] = "https://not.configured/"
    elif case == "grant_type":
        form["grant_type"] = "password"
    elif case == "missing":
        del form["assertion"]
    reply = _post(oauth_server, **form)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == error
    assert "eyJ" not in reply.text  # no token echoed back
    if case != "grant_type":
        (event,) = _events(oauth_server, "oauth_jwt_bearer")
        assert event["decision"] == "deny"
        assert event["reason"].startswith(error)


def test_jti_claim_is_one_atomic_insert_shared_by_stores(tmp_path: Any) -> None:
    from server.datastore.base import JtiClaim
    from server.datastore.sqlite import SqliteDataStore
    from server.oauth.replay import JtiClaims
    from svid._clock import FakeClock

    clock = FakeClock(1000)
    one = SqliteDataStore(tmp_path / "ds.sqlite3", clock)
    two = SqliteDataStore(tmp_path / "ds.sqlite3", clock)
    try:
        claims_one, claims_two = JtiClaims(one.claim_jtis), JtiClaims(two.claim_jtis)
        assert claims_one.claim("iss", "j1", 2000, 1000)
        assert not claims_two.claim("iss", "j1", 2000, 1000)  # another server sees the claim
        assert claims_two.claim("other-iss", "j1", 2000, 1000)
        assert not claims_one.claim("iss", "j1", 2000, 1999)
        assert claims_one.claim("iss", "j1", 3000, 2000)  # past its expiry a holder is gone
        # In one batch, a repeat is a replay too.
        batch = [JtiClaim("iss", "j2", 3000), JtiClaim("iss", "j2", 3000)]
        assert one.claim_jtis(batch, 2000) == [True, False]
        assert one.prune_jtis(2500) == 1
        assert 7 in one.schema_versions()
    finally:
        one.close()
        two.close()


def test_concurrent_claims_share_commits_and_one_wins_each_jti(tmp_path: Any) -> None:
    import threading

    from server.datastore.sqlite import SqliteDataStore
    from server.oauth.replay import JtiClaims
    from svid._clock import FakeClock

    store = SqliteDataStore(tmp_path / "ds.sqlite3", FakeClock(1000))
    calls: list[int] = []

    def counted(claims: Any, now: int) -> list[bool]:
        calls.append(len(claims))
        return store.claim_jtis(claims, now)

    replay = JtiClaims(counted)
    results: list[bool] = []
    lock = threading.Lock()

    def claim(jti: str) -> None:
        fresh = replay.claim("iss", jti, 2000, 1000)
        with lock:
            results.append(fresh)

    try:
        threads = [threading.Thread(target=claim, args=(f"j{i % 10}",)) for i in range(80)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(True) == 10
        assert sum(calls) == 80
    finally:
        store.close()


def test_no_token_leaves_when_the_ledger_cannot_record_it(
    oauth_server: OAuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from server.datastore.errors import StorageError

    def broken(*args: Any, **kwargs: Any) -> None:
        raise StorageError("disk full")

    monkeypatch.setattr(oauth_server.running.server.datastore, "write_ledger", broken)
    reply = _post(
        oauth_server, grant_type=JWT_BEARER, assertion=_assertion(oauth_server), resource=RESOURCE
    )
    assert reply.status_code == 503
    assert reply.json()["error"] == "temporarily_unavailable"
    assert "access_token" not in reply.json()


def test_expired_replay_records_are_pruned(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from server.oauth import wiring
    from tests.ports import free_port
    from tests.server.fixtures import managed_server

    monkeypatch.setattr(wiring, "PRUNE_INTERVAL", 0.05)
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    with managed_server(
        oidc_issuer=issuer, oauth_bind_address=f"127.0.0.1:{port}", oauth_resources=[RESOURCE]
    ) as running:
        signer = running.server.ca.jwt_signer()
        reply = httpx.post(
            issuer + "/token",
            data={
                "grant_type": JWT_BEARER,
                "assertion": signer.sign(WORKLOAD, [issuer], 30).token,
                "resource": RESOURCE,
            },
        )
        assert reply.status_code == 200

        def held() -> int:
            return len(running.server.datastore._rows("SELECT jti FROM oauth_jtis"))

        assert held() == 1
        running.clock.advance(60)
        deadline = time.monotonic() + 5
        while held() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held() == 0


def test_a_client_id_must_name_the_assertions_workload(oauth_server: OAuthServer) -> None:
    same = _post(
        oauth_server,
        grant_type=JWT_BEARER,
        assertion=_assertion(oauth_server),
        resource=RESOURCE,
        client_id=str(WORKLOAD),
    )
    assert same.status_code == 200, same.text
    other = _post(
        oauth_server,
        grant_type=JWT_BEARER,
        assertion=_assertion(oauth_server),
        resource=RESOURCE,
        client_id="spiffe://example.org/someone-else",
    )
    assert other.status_code == 401
    assert other.json()["error"] == "invalid_client"
