"""The token endpoint on a running server: RFC 7523 JWT-bearer grant, refusals as RFC 6749
§5.2 errors, replays refused through the datastore, every outcome on the audit ledger."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx
import jwt as pyjwt
import pytest

from server.datastore.base import JtiClaim
from server.oauth.assertions import LEEWAY
from svid import MAX_CLOCK_SKEW
from svid._spiffe_id import SpiffeId
from tests.server.oauth.conftest import RESOURCE, OAuthServer
from tests.waits import wait_for

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


def test_the_replay_guard_holds_each_jti_until_it_expires() -> None:
    from server.datastore.base import JtiClaim
    from server.oauth.replay import ReplayGuard

    guard = ReplayGuard(limit=20)
    a = JtiClaim("iss", "a", 2000)
    assert guard.reserve(a, 1000)
    assert not guard.reserve(a, 1999)  # a replay, until a's expiry
    assert guard.reserve(JtiClaim("other-iss", "a", 2000), 1000)
    assert guard.reserve(JtiClaim("iss", "a", 3000), 2000)  # past its expiry a holder is gone
    b = JtiClaim("iss", "b", 2000)
    assert guard.reserve(b, 1000)
    guard.release(b)  # not recorded: it may be presented again
    assert guard.reserve(b, 1000)
    assert guard.prune(2500) == 2
    for n in range(30):  # full of live claims: the oldest are forgotten, never refused wrongly
        assert guard.reserve(JtiClaim("iss", f"n{n}", 9000), 2500)
    assert len(guard) <= 20
    assert not guard.reserve(JtiClaim("iss", "n29", 9000), 2500)


def test_a_replay_through_another_server_fails_only_itself(tmp_path: Any) -> None:
    """Two servers on one database: assertions the other one accepted reach this server's
    ledger commit (its memory has not seen them). The shared commit that meets them keeps
    nothing; the replays are refused and every other request in it is recorded again."""
    import threading
    import time

    from server.audit.event import EventDraft
    from server.audit.log import AuditLog
    from server.datastore.base import JtiClaim
    from server.datastore.errors import JtiHeldError
    from server.datastore.records import REVOKED_JWT_ID, Credential
    from server.datastore.sqlite import SqliteDataStore
    from server.ledger import Ledger
    from server.oauth.grants import Grants
    from server.oauth.replay import ReplayGuard
    from svid._clock import FakeClock

    clock = FakeClock(1000)
    here = SqliteDataStore(tmp_path / "ds.sqlite3", clock)
    there = SqliteDataStore(tmp_path / "ds.sqlite3", clock)
    replays = [f"r{i}" for i in range(5)]
    fresh = [f"f{i}" for i in range(30)]
    assert there.claim_jtis([JtiClaim("iss", j, 2000) for j in replays], 1000) == [True] * 5
    writes: list[int] = []
    write_ledger = here.write_ledger

    def slow_first_write(*args: Any, **kwargs: Any) -> None:
        writes.append(len(args[2]) if len(args) > 2 else 0)
        if len(writes) == 1:
            time.sleep(0.3)  # every other request queues meanwhile: one mixed commit follows
        write_ledger(*args, **kwargs)

    here.write_ledger = slow_first_write  # type: ignore[method-assign]
    nothing: Any = None
    grants = Grants(
        checker=nothing,
        signer=nothing,
        recorder=Ledger(AuditLog(here, clock)),
        replay=ReplayGuard(),
        tasks=nothing,
        resources=frozenset(),
        trust_domain="example.org",
        access_token_ttl=60,
        clock=clock,
    )
    outcome: dict[str, str] = {}

    def request(jti: str) -> None:
        token = f"token-{jti}"
        event = EventDraft(
            kind="oauth_jwt_bearer", action="token", decision="allow", credential_id=token
        )
        credential = Credential(REVOKED_JWT_ID, token, "", "spiffe://example.org/w", "", 2000)
        try:
            grants._commit([credential], [event], JtiClaim("iss", jti, 2000))
            outcome[jti] = "recorded"
        except JtiHeldError:
            outcome[jti] = "replay"

    try:
        threads = [threading.Thread(target=request, args=(j,)) for j in fresh[:1]]
        threads += [threading.Thread(target=request, args=(j,)) for j in fresh[1:] + replays]
        threads[0].start()
        time.sleep(0.1)
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
        assert outcome == {**dict.fromkeys(fresh, "recorded"), **dict.fromkeys(replays, "replay")}
        assert any(n > 1 for n in writes[1:])  # a shared commit failed and was written again
        kept = {c.value for c in here.agent_credentials("", 1000)}
        assert kept == {f"token-{j}" for j in fresh}
        events = [r["credential_id"] for r in here.audit_rows()]
        assert sorted(events) == sorted(f"token-{j}" for j in fresh)
        assert there.claim_jtis([JtiClaim("iss", j, 2000) for j in fresh], 1000) == [False] * 30
    finally:
        here.close()
        there.close()


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
        running.clock.advance(60)  # past exp + leeway: still held for a server running behind
        time.sleep(0.3)
        assert held() == 1
        running.clock.advance(MAX_CLOCK_SKEW)
        wait_for(lambda: held() == 0, 5, "the spent assertion's jti let go")


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


def test_an_idle_connection_is_cut_after_the_read_timeout_and_keep_alive_serves_many(
    oauth_server: OAuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket
    import time

    from server.oauth import http

    monkeypatch.setattr(http, "READ_TIMEOUT", 0.3)
    port = int(oauth_server.issuer.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with oauth_server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        request = b"GET /keys HTTP/1.1\r\nHost: x\r\n\r\n"
        tls.sendall(request * 2)  # two on one connection, each answered whole
        seen = b""
        while seen.count(b'{"keys"') < 2:
            seen += tls.recv(65536)
        assert seen.count(b"HTTP/1.1 200") == 2
        started = time.monotonic()
        assert tls.recv(1024) == b""  # then idle: the server hangs up
        assert time.monotonic() - started < 3


def test_a_jti_claim_survives_a_reseal_when_another_server_moved_the_chain(
    tmp_path: Any,
) -> None:
    """Two servers' audit logs on one database: this one seals on a head the other moved, so
    its commit is sealed again on the stored head; the assertion's claim goes with it."""
    from server.audit.event import EventDraft
    from server.audit.log import AuditLog
    from server.datastore.base import JtiClaim
    from server.datastore.records import REVOKED_JWT_ID, Credential
    from server.datastore.sqlite import SqliteDataStore
    from svid._clock import FakeClock

    clock = FakeClock(1000)
    here = SqliteDataStore(tmp_path / "ds.sqlite3", clock)
    there = SqliteDataStore(tmp_path / "ds.sqlite3", clock)
    try:
        log_here, log_there = AuditLog(here, clock), AuditLog(there, clock)
        log_there.append("oauth_jwt_bearer", decision="deny", action="token")
        credential = Credential(REVOKED_JWT_ID, "token-1", "", "spiffe://example.org/w", "", 2000)
        event = EventDraft(kind="oauth_jwt_bearer", action="token", credential_id="token-1")
        log_here.record([credential], [event], [JtiClaim("iss", "j1", 2000)])
        assert [r["seq"] for r in here.audit_rows()] == [1, 2]
        assert here.claim_jtis([JtiClaim("iss", "j1", 2000)], 1000) == [False]
        assert log_here.verify().ok
    finally:
        here.close()
        there.close()


def test_an_assertion_is_held_for_as_long_as_it_is_accepted(oauth_server: OAuthServer) -> None:
    """An assertion is accepted up to the leeway past its exp: its jti is held that long too,
    or a replay in those seconds would get a second token."""
    assertion = _assertion(oauth_server, ttl=30)
    first = _post(oauth_server, grant_type=JWT_BEARER, assertion=assertion, resource=RESOURCE)
    assert first.status_code == 200, first.text
    oauth_server.running.clock.advance(32)  # past exp, within the verifier's leeway
    again = _post(oauth_server, grant_type=JWT_BEARER, assertion=assertion, resource=RESOURCE)
    assert again.status_code == 400, again.text
    assert "replay" in again.json()["error_description"]


def test_a_request_trickled_in_is_cut_at_the_read_timeout(
    oauth_server: OAuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read timeout bounds a whole request, not each read: a client sending a byte now and
    then (slowloris) would otherwise hold its connection, and its memory, for ever."""
    import socket
    import time

    from server.oauth import http

    monkeypatch.setattr(http, "READ_TIMEOUT", 0.5)
    port = int(oauth_server.issuer.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with oauth_server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        started = time.monotonic()
        cut = False
        while not cut and time.monotonic() - started < 4:
            time.sleep(0.1)
            try:
                tls.sendall(b"a")
            except OSError:
                cut = True
        if not cut:
            tls.settimeout(0.5)
            try:
                cut = tls.recv(1024) == b""
            except OSError:
                cut = False
        assert cut, "a trickled request held its connection past the read timeout"
        assert time.monotonic() - started < 3


def test_a_request_with_both_content_length_and_transfer_encoding_is_refused_and_closed(
    oauth_server: OAuthServer,
) -> None:
    """RFC 9112 §6.1: such a request is a smuggling attempt through any intermediary that reads
    the other header; the connection must close after it, nothing that follows is served."""
    import socket

    port = int(oauth_server.issuer.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with oauth_server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        smuggled = b"GET /keys HTTP/1.1\r\nHost: x\r\n\r\n"
        tls.sendall(
            b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
            b"\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n%s"
            % (5 + len(smuggled), smuggled)
        )
        seen = b""
        while chunk := tls.recv(65536):
            seen += chunk
    assert seen.startswith(b"HTTP/1.1 400"), seen[:200]
    assert seen.count(b"HTTP/1.1") == 1
    assert b'"keys"' not in seen


def test_a_client_expecting_100_continue_is_told_to_send_its_body(
    oauth_server: OAuthServer,
) -> None:
    """RFC 9110 §10.1.1: a server that reads the body sends 100 (Continue) at once; curl, which
    asks for it on larger POSTs, otherwise waits a second before sending the body anyway."""
    import socket

    port = int(oauth_server.issuer.rsplit(":", 1)[1])
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with oauth_server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        body = b"grant_type=password"
        tls.sendall(
            b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded"
            b"\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        tls.settimeout(2)
        assert tls.recv(65536).startswith(b"HTTP/1.1 100 ")
        tls.sendall(body)
        seen = b""
        while b"unsupported_grant_type" not in seen:
            seen += tls.recv(65536)
        assert seen.startswith(b"HTTP/1.1 400")


def test_a_refusal_whose_reason_looks_like_a_token_is_answered_and_audited(
    oauth_server: OAuthServer,
) -> None:
    """A request's values are echoed in the refusal's description; one that looks like a JWT (a
    client sending its token as the resource) must neither turn the answer into a server error
    nor keep the refusal off the audit log, nor be echoed back: it is left out of both."""
    looks_like_a_jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.sig"
    reply = _post(
        oauth_server,
        grant_type=JWT_BEARER,
        assertion=_assertion(oauth_server),
        resource=looks_like_a_jwt,
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == "invalid_target"
    assert "eyJ" not in reply.text
    (event,) = _events(oauth_server, "oauth_jwt_bearer")
    assert event["decision"] == "deny"
    assert event["reason"].startswith("invalid_target")
    assert "eyJ" not in event["reason"]


def test_a_client_that_never_reads_its_answers_is_cut_at_the_timeout(
    oauth_server: OAuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests sent on one connection whose answers are never read fill the buffers, and
    writing the next answer waits: bounded by the same timeout, or the connection (one more
    each time) is held for ever."""
    import socket

    from server.oauth import http

    monkeypatch.setattr(http, "READ_TIMEOUT", 0.5)
    assert oauth_server.running.server.oauth is not None
    connections = oauth_server.running.server.oauth.listener._connections
    port = int(oauth_server.issuer.rsplit(":", 1)[1])
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(5)
    raw.connect(("127.0.0.1", port))
    with oauth_server.ssl_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        # Served, so the cut below is the server's.
        wait_for(lambda: connections, 4, "the connection served", interval=0.01)
        tls.settimeout(1)
        with contextlib.suppress(OSError):  # the server stops reading, then hangs up
            tls.sendall(b"GET /keys HTTP/1.1\r\nHost: x\r\n\r\n" * 20000)
        # The cut comes once the kernel's buffers are full of answers: seconds on a loaded
        # machine (thousands of answers first), and at once when they are.
        wait_for(lambda: not connections, 30, "the connection whose answers are never read cut")
        # and its socket let go of, though the answers in it were never sent
        client_port = tls.getsockname()[1]
        wait_for(
            lambda: not _socket_owned(port, client_port),
            http.CLOSE_TIMEOUT + 2,
            "the cut connection's socket let go of",
        )


def _socket_owned(local_port: int, remote_port: int) -> bool:
    """Whether a process still holds the TCP socket local_port -> remote_port (Linux: an
    orphaned one, closed by its process with data unsent, has inode 0 in /proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if (int(local.split(":")[1], 16), int(remote.split(":")[1], 16)) == (
                local_port,
                remote_port,
            ):
                return inode != "0"
    return False


def test_an_assertion_also_for_another_audience_is_refused(oauth_server: OAuthServer) -> None:
    """The service a JWT-SVID was also for holds it too: it could trade it here for the
    workload's access token. This server's two names are one audience."""
    signer = oauth_server.running.server.ca.jwt_signer()
    issuer = oauth_server.issuer
    shared = signer.sign(WORKLOAD, [issuer, "https://svc.example"], 60).token
    reply = _post(oauth_server, grant_type=JWT_BEARER, assertion=shared, resource=RESOURCE)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == "invalid_grant"
    assert "https://svc.example" in reply.json()["error_description"]
    ours = signer.sign(WORKLOAD, [issuer, issuer + "/token"], 60).token
    reply = _post(oauth_server, grant_type=JWT_BEARER, assertion=ours, resource=RESOURCE)
    assert reply.status_code == 200, reply.text


def test_a_revoked_jwt_svid_gets_no_token(oauth_server: OAuthServer) -> None:
    """A JWT-SVID whose jti the server revoked (its agent evicted or banned) is refused by
    every verifier: the token endpoint must not turn it into a fresh access token."""
    from server.datastore.records import REVOKED_JWT_ID, Revocation

    assertion = _assertion(oauth_server)
    jti = pyjwt.decode(assertion, options={"verify_signature": False})["jti"]
    running = oauth_server.running
    now = int(running.clock.now())
    revocation = Revocation(REVOKED_JWT_ID, jti, str(WORKLOAD), now + 600, "agent banned", now)
    running.call(running.server.state.add_revocations((revocation,)))
    reply = _post(oauth_server, grant_type=JWT_BEARER, assertion=assertion, resource=RESOURCE)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"] == "invalid_grant"
    assert "revoked" in reply.json()["error_description"]


def test_a_request_and_an_answer_show_no_credential_in_their_repr() -> None:
    # The form carries the assertion or subject token, a header may carry a bearer token, and
    # the answer's body the access token: none may reach a log line that shows either object.
    from server.oauth.http import Request, Response

    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    request = Request(
        "POST", "/token", "", {"authorization": f"Bearer {token}"}, f"assertion={token}".encode()
    )
    answer = Response(200, f'{{"access_token":"{token}"}}'.encode())
    for shown in (repr(request), repr(answer)):
        assert "eyJ" not in shown
    assert "'/token'" in repr(request)
    assert "status=200" in repr(answer)


def test_a_flood_of_refusals_is_on_record_up_to_the_clients_budget_then_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    from server.datastore.base import JtiClaim
    from tests.server.oauth.conftest import serving_oauth

    limits = {"oauth_refusal_rate_per_host": 1, "oauth_refusal_burst_per_host": 3}
    with (
        caplog.at_level(logging.WARNING, "svid.server.audit"),
        serving_oauth("oaf", [RESOURCE], **limits) as server,
    ):
        bad = [_assertion(server, audience="https://someone.else") for _ in range(10)]
        for assertion in bad:
            reply = _post(server, grant_type=JWT_BEARER, assertion=assertion, resource=RESOURCE)
            assert reply.status_code == 400  # every one refused, on record or not
            assert reply.json()["error"] == "invalid_grant"
        events = _events(server, "oauth_jwt_bearer")
        assert [e["decision"] for e in events] == ["deny"] * 3
        metrics = server.running.server.metrics.render().decode()
        assert 'svid_server_refusals_unrecorded_total{source="oauth"} 7.0' in metrics
        (line,) = [r for r in caplog.records if r.name == "svid.server.audit"]
        assert line.source == "oauth"  # type: ignore[attr-defined]
        assert line.caller == "127.0.0.1"  # type: ignore[attr-defined]
        assert not any(a in caplog.text for a in bad)  # no token in the log
        # Past the budget, an assertion refused once checked is still used up by its refusal.
        checked = _assertion(server)
        wrong = _post(server, grant_type=JWT_BEARER, assertion=checked, resource="https://x/")
        assert wrong.json()["error"] == "invalid_target"
        again = _post(server, grant_type=JWT_BEARER, assertion=checked, resource=RESOURCE)
        assert "replay" in again.json()["error_description"]
        claims = pyjwt.decode(checked, options={"verify_signature": False})
        claim = JtiClaim(claims["iss"], claims["jti"], claims["exp"])
        now = int(server.running.clock.now())
        assert server.running.server.datastore.claim_jtis([claim], now) == [False]  # held
        # A grant is never left off the record, budget or not.
        good = _post(server, grant_type=JWT_BEARER, assertion=_assertion(server), resource=RESOURCE)
        assert good.status_code == 200, good.text
        decisions = [e["decision"] for e in _events(server, "oauth_jwt_bearer")]
        assert decisions == ["deny"] * 3 + ["allow"]
        # The budget refills at its rate: the client's next refusal is on record again.
        server.running.clock.advance(1)
        _post(server, grant_type=JWT_BEARER, assertion=bad[0], resource=RESOURCE)
        assert len(_events(server, "oauth_jwt_bearer")) == 5
        assert 'refusals_unrecorded_total{source="oauth"} 9.0' in (
            server.running.server.metrics.render().decode()
        )


def test_an_assertion_another_server_accepted_stays_held_while_this_one_accepts_it(
    oauth_server: OAuthServer,
) -> None:
    """Server a, sharing the datastore, runs 10 s ahead (the verifier's leeway is 5 s). It
    accepted an assertion (its ledger write claimed the jti until exp + 5 by the token) and its
    housekeeping deletes the claim once its own clock passes that. This server, 10 s behind,
    still takes the assertion and finds nothing held: a replay through it gets a second token."""
    clock = oauth_server.running.clock
    datastore = oauth_server.running.server.datastore
    assertion = _assertion(oauth_server, ttl=30)
    claims = pyjwt.decode(assertion, options={"verify_signature": False})
    held_until = claims["exp"] + int(LEEWAY)
    ahead = 10
    claim = JtiClaim(claims.get("iss", str(WORKLOAD.trust_domain.id)), claims["jti"], held_until)
    assert datastore.claim_jtis([claim], int(clock.now()) + ahead) == [True]  # a took it

    clock.advance(held_until - ahead - int(clock.now()))  # a's clock reads exp + leeway
    datastore.prune_jtis(int(clock.now()) + ahead)  # a's housekeeping
    again = _post(oauth_server, grant_type=JWT_BEARER, assertion=assertion, resource=RESOURCE)
    assert again.status_code == 400, again.text
    assert "replay" in again.json()["error_description"]
