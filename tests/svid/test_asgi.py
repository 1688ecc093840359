"""svid.asgi.SvidAuthMiddleware behind a real uvicorn server, called with a real httpx client:
who gets in, what the refusals say (RFC 6750), and open streams ended by a revocation or by
stale revocation data."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import svid.asgi
from svid import (
    JwtBundle,
    MemoryBundleSource,
    SpiffeBundle,
    X509Bundle,
    der_concat,
    sign_jws,
    tool_scope,
)
from svid._clock import FakeClock
from svid._crl import revoked_from_crls
from svid._proto import revocation_pb2
from svid.workloadapi import WorkloadApiSource
from tests.svid.adapter_world import (
    AUDIENCE,
    KEY,
    RUNTIME,
    TD,
    RevokingSource,
    call_asgi,
    serving,
    task_token,
    workload_token,
)
from tests.svid.certs import make_ca
from tests.svid.tls_pki import Pki, plain_context
from tests.svid.workload_fake import WAIT, Server, State, signed_crl

SEEN: list[svid.asgi.Caller] = []


async def app(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the caller's ID; /stream sends a chunk every 50 ms until it is stopped."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    caller = svid.asgi.caller_of(scope)
    SEEN.append(caller)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if scope["path"] == "/stream":
        while True:
            await send({"type": "http.response.body", "body": b"tick\n", "more_body": True})
            await asyncio.sleep(0.05)
    await send({"type": "http.response.body", "body": str(caller.spiffe_id).encode()})


@pytest.fixture
def source() -> RevokingSource:
    SEEN.clear()
    return RevokingSource()


def serve(source: RevokingSource, **options: Any) -> Any:
    return serving(svid.asgi.SvidAuthMiddleware(app, audience=AUDIENCE, source=source, **options))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_no_credential_is_a_bare_401_challenge(source: RevokingSource) -> None:
    with serve(source) as url:
        reply = httpx.get(url)
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == f'Bearer realm="{AUDIENCE}"'
    assert SEEN == []


def test_a_bad_token_is_invalid_token_and_says_why_without_the_token(
    source: RevokingSource,
) -> None:
    token = task_token(aud=["other"])
    with serve(source) as url:
        reply = httpx.get(url, headers=bearer(token))
        basic = httpx.get(url, headers={"Authorization": "Basic Zm9vOmJhcg=="})
    assert reply.status_code == 401
    challenge = reply.headers["www-authenticate"]
    assert 'error="invalid_token"' in challenge
    assert "not for audience" in challenge
    assert token not in challenge
    assert token not in reply.text
    assert basic.status_code == 401
    assert 'error="invalid_token"' in basic.headers["www-authenticate"]
    assert SEEN == []


def test_a_verified_task_token_puts_the_caller_and_its_task_in_the_scope(
    source: RevokingSource,
) -> None:
    with serve(source) as url:
        reply = httpx.get(url, headers=bearer(task_token()))
    assert reply.status_code == 200
    (caller,) = SEEN
    assert str(caller.spiffe_id) == f"{RUNTIME}/task/t1"
    assert caller.task is not None
    assert caller.task.task_id == "t1"
    assert caller.task.on_behalf_of == "user:alice"
    assert caller.claims["jti"] == "j1"


def test_authorize_refuses_other_callers_with_403(source: RevokingSource) -> None:
    with serve(source, authorize="spiffe://example.org/frontend") as url:
        refused = httpx.get(url, headers=bearer(workload_token()))
        admitted = httpx.get(
            url, headers=bearer(workload_token(sub="spiffe://example.org/frontend"))
        )
    assert refused.status_code == 403
    assert "is not authorised" in refused.headers["www-authenticate"]
    assert admitted.status_code == 200
    assert [str(c.spiffe_id) for c in SEEN] == ["spiffe://example.org/frontend"]


async def _admits_when_awaited(caller: svid.asgi.Caller) -> bool:
    return True


@pytest.mark.parametrize(
    ("authorize", "says"),
    [
        (_admits_when_awaited, "returned a coroutine, not True"),
        (lambda caller: "no", "returned a str, not True"),
    ],
    ids=["async def", "truthy str"],
)
def test_an_authorizer_admits_only_by_returning_true(
    source: RevokingSource, authorize: Any, says: str
) -> None:
    # An async authorizer's coroutine, never awaited, is truthy: it admitted every caller.
    with serve(source, authorize=authorize) as url:
        reply = httpx.get(url, headers=bearer(workload_token()))
    assert reply.status_code == 403
    assert says in reply.headers["www-authenticate"]
    assert SEEN == []


def _raises(caller: svid.asgi.Caller) -> bool:
    raise KeyError(f"no grant of {caller.spiffe_id}")


def test_an_authorizer_that_raises_refuses_the_caller_403_and_logs_why(
    source: RevokingSource, caplog: pytest.LogCaptureFixture
) -> None:
    # Its exception went out of the middleware: the server answered 500 and logged "Exception
    # in ASGI application", where svid.tls refuses the peer and the README says it refuses.
    caplog.set_level(logging.ERROR, logger="svid.asgi")
    with serve(source, authorize=_raises) as url:
        reply = httpx.get(url, headers=bearer(workload_token()))
    assert reply.status_code == 403
    assert "its authorizer raised KeyError" in reply.headers["www-authenticate"]
    assert "no grant of" not in reply.text  # the exception's own words stay in the log
    assert SEEN == []
    [record] = [r for r in caplog.records if r.name == "svid.asgi"]
    assert record.exc_info is not None
    assert record.exc_info[0] is KeyError


def test_a_missing_scope_is_403_insufficient_scope_naming_the_scope_to_ask_for(
    source: RevokingSource,
) -> None:
    rule = svid.asgi.require_scopes(tool_scope("export_customer_data"))
    with serve(source, required_scopes=rule) as url:
        refused = httpx.get(url, headers=bearer(task_token()))
        workload = httpx.get(url, headers=bearer(workload_token()))
        granted = httpx.get(
            url, headers=bearer(task_token(scope="tool:export_customer_data", jti="j2"))
        )
    assert refused.status_code == 403
    challenge = refused.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="tool:export_customer_data"' in challenge
    assert refused.json()["scope"] == "tool:export_customer_data"
    assert workload.status_code == 403  # only task tokens grant scopes
    assert granted.status_code == 200
    assert len(SEEN) == 1


@pytest.fixture
def streaming(source: RevokingSource) -> Iterator[str]:
    with serve(source) as url:
        yield url


@pytest.mark.parametrize(
    ("kind", "value", "spiffe_id"),
    [
        ("jwt_id", "j1", ""),  # the token itself
        ("x509_serial", "abcd", f"{RUNTIME}/task/t1"),  # another credential of its task
    ],
)
def test_an_open_stream_is_ended_when_its_credential_or_task_is_revoked(
    source: RevokingSource, streaming: str, kind: str, value: str, spiffe_id: str
) -> None:
    with (
        httpx.Client(timeout=5) as client,
        client.stream("GET", f"{streaming}/stream", headers=bearer(task_token())) as reply,
    ):
        assert reply.status_code == 200
        lines = reply.iter_lines()
        assert next(lines) == "tick"
        revoked_at = time.monotonic()
        source.revoke(kind, value, spiffe_id)
        rest = list(lines)  # ends only when the server ends the response
        took = time.monotonic() - revoked_at
    assert took < 1.0
    assert len(rest) <= 5
    if kind == "jwt_id":
        assert httpx.get(streaming, headers=bearer(task_token())).status_code == 401


def test_a_verifier_of_a_source_given_alone_ends_revoked_streams_too() -> None:
    # Given jwt_verifier=source.jwt_verifier(...) without source=, as one does to set the
    # verifier's max_revocation_staleness, the middleware followed no revocations: a revoked
    # task's open stream went on, only its next request refused.
    sock_dir = Path(tempfile.mkdtemp(prefix="asg", dir="/tmp"))  # socket paths must be short
    state = State(
        x509={"spiffe://example.org": der_concat([make_ca().cert])},
        jwt={"spiffe://example.org": JwtBundle(TD, {"k1": KEY.public_key()}).to_jwks()},
    )
    agent = Server(state, sock_dir / "agent.sock").start()
    try:
        with WorkloadApiSource(agent.address) as workload:
            assert workload.wait_ready(WAIT)
            middleware = svid.asgi.SvidAuthMiddleware(
                app, audience=AUDIENCE, jwt_verifier=workload.jwt_verifier()
            )
            with (
                serving(middleware) as url,
                httpx.Client(timeout=5) as client,
                client.stream("GET", f"{url}/stream", headers=bearer(task_token())) as reply,
            ):
                lines = reply.iter_lines()
                assert next(lines) == "tick"
                state.change(revoked=[revocation_pb2.Revoked(kind="jwt_id", value="j1")])
                give_up = time.monotonic() + WAIT
                ended = True
                for _ in lines:  # ends only when the server ends the response
                    if time.monotonic() > give_up:
                        ended = False
                        break
            assert ended
    finally:
        agent.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_a_revocation_of_someone_else_leaves_the_stream_open(
    source: RevokingSource, streaming: str
) -> None:
    with (
        httpx.Client(timeout=5) as client,
        client.stream("GET", f"{streaming}/stream", headers=bearer(task_token())) as reply,
    ):
        lines = reply.iter_lines()
        assert next(lines) == "tick"
        source.revoke("jwt_id", "another", f"{RUNTIME}/task/t2")
        assert [next(lines) for _ in range(5)] == ["tick"] * 5


STALE = 0.5  # max_revocation_staleness of the verifier below
GIVE_UP = 15.0  # a stream still open this long after the data went stale was never ended


def test_open_streams_end_once_revocation_data_is_older_than_the_verifier_allows(
    source: RevokingSource,
) -> None:
    source.revocations.feed_delivered(time.time())  # the agent's stream is up
    verifier = source.jwt_verifier(max_revocation_staleness=STALE)
    middleware = svid.asgi.SvidAuthMiddleware(
        app, audience=AUDIENCE, source=source, jwt_verifier=verifier
    )
    with (
        serving(middleware) as url,
        httpx.Client(timeout=5) as client,
        client.stream("GET", f"{url}/stream", headers=bearer(task_token())) as reply,
    ):
        lines = reply.iter_lines()
        # While the feed is live the stream goes on, well past the staleness allowed.
        assert [next(lines) for _ in range(3 * int(STALE / 0.05))] == ["tick"] * 30
        lost_at = time.monotonic()
        source.revocations.feed_lost(time.monotonic())  # the agent went away
        ended = False
        for _ in lines:
            if time.monotonic() - lost_at > GIVE_UP:
                break
        else:
            ended = True
        took = time.monotonic() - lost_at
        refused = httpx.get(url, headers=bearer(task_token(jti="j9")))
    assert ended, f"the stream was still open {took:.1f} s after the data went stale"
    assert took >= STALE - 0.05  # not before the verifier would refuse it
    assert refused.status_code == 401  # and new requests are refused, as before
    assert "max_revocation_staleness" in refused.headers["www-authenticate"]
    assert middleware.open_requests.empty()


def test_a_stream_with_nothing_to_revoke_it_by_still_ends_once_the_data_is_stale(
    source: RevokingSource,
) -> None:
    """A token with no jti and no task: no revocation can name it, so a revocation of anything
    else used to drop it from the open requests, and the staleness watch no longer saw it."""
    source.revocations.feed_delivered(time.time())
    verifier = source.jwt_verifier(max_revocation_staleness=STALE)
    middleware = svid.asgi.SvidAuthMiddleware(
        app, audience=AUDIENCE, source=source, jwt_verifier=verifier
    )
    now = int(time.time())
    claims = {"sub": "spiffe://example.org/svc", "aud": [AUDIENCE], "exp": now + 300, "iat": now}
    token = sign_jws({"kid": "k1", "typ": "JWT"}, claims, KEY)
    with (
        serving(middleware) as url,
        httpx.Client(timeout=5) as client,
        client.stream("GET", f"{url}/stream", headers=bearer(token)) as reply,
    ):
        lines = reply.iter_lines()
        assert next(lines) == "tick"
        source.revoke("jwt_id", "another")  # someone else's
        assert [next(lines) for _ in range(5)] == ["tick"] * 5
        lost_at = time.monotonic()
        source.revocations.feed_lost(time.monotonic())
        ended = False
        for _ in lines:
            if time.monotonic() - lost_at > 5.0:
                break
        else:
            ended = True
    assert ended, "the stream outlived the revocation data it was admitted on"
    assert middleware.open_requests.empty()


def test_stale_data_ends_only_what_a_verifier_that_refuses_admitted(
    source: RevokingSource,
) -> None:
    # Only the X.509 verifier fails closed: a bearer token's stream, which its JWT verifier
    # would still admit, goes on.
    source.revocations.feed_delivered(time.time())
    middleware = svid.asgi.SvidAuthMiddleware(
        app,
        audience=AUDIENCE,
        source=source,
        jwt_verifier=source.jwt_verifier(),
        x509_verifier=source.x509_verifier(max_revocation_staleness=STALE),
    )
    with (
        serving(middleware) as url,
        httpx.Client(timeout=5) as client,
        client.stream("GET", f"{url}/stream", headers=bearer(task_token())) as reply,
    ):
        lines = reply.iter_lines()
        assert next(lines) == "tick"
        lost_at = time.monotonic()
        source.revocations.feed_lost(time.monotonic())
        ticks = 0
        while time.monotonic() - lost_at < 4 * STALE:  # well past the X.509 limit
            assert next(lines) == "tick"
            ticks += 1
        assert httpx.get(url, headers=bearer(task_token(jti="j9"))).status_code == 200
    assert ticks > 10


def test_an_mtls_stream_ends_once_its_issuers_crl_is_stale_and_no_other_callers_does(
    source: RevokingSource,
) -> None:
    """What refuses a new request from an mTLS caller, its issuer's CRL being past its
    nextUpdate by more than max_revocation_staleness, ends the stream it has open too; a
    caller of another issuer, whose CRL is current, keeps its own. The feed itself stays
    current throughout."""
    now = time.time()
    since, until = now - 3600, now + 86400
    root = make_ca(not_before=since, not_after=until)
    pkis = [
        Pki(TD, root, make_ca(name, parent=root, spiffe_id=None, not_before=since, not_after=until))
        for name in ("a.example.org", "b.example.org")
    ]
    a_pki, b_pki = pkis
    source.bundles = MemoryBundleSource.of(SpiffeBundle(TD, (root.cert,), {"k1": KEY.public_key()}))
    # Each intermediate CA signs its own CRL: a's promises the next one in a minute, b's in a
    # day. Neither CA is in the bundle: the chains through them vouch for their CRLs.
    crls = revoked_from_crls(
        [
            signed_crl(a_pki.intermediate, [1], next_update=now + 60),
            signed_crl(b_pki.intermediate, [1], next_update=now + 86400),
        ],
        {TD: X509Bundle(TD, (root.cert,))},
    )
    source.revocations.replace(crls.revoked, crls.next_update, crls.pending)
    clock = FakeClock(now)
    middleware = svid.asgi.SvidAuthMiddleware(
        app,
        audience=AUDIENCE,
        source=source,
        jwt_verifier=source.jwt_verifier(),
        x509_verifier=source.x509_verifier(clock=clock, max_revocation_staleness=STALE),
    )
    server_tls = plain_context(a_pki.svid("spiffe://example.org/server"), a_pki, server=True)
    a_tls, b_tls = (
        plain_context(pki.svid(f"spiffe://example.org/{name}"), pki, server=False)
        for name, pki in (("a", a_pki), ("b", b_pki))
    )
    with (
        serving(middleware, server_tls) as url,
        httpx.Client(verify=a_tls, timeout=5) as a,
        httpx.Client(verify=b_tls, timeout=5) as b,
        a.stream("GET", f"{url}/stream") as a_reply,
        b.stream("GET", f"{url}/stream") as b_reply,
    ):
        assert a_reply.status_code == b_reply.status_code == 200
        a_lines, b_lines = a_reply.iter_lines(), b_reply.iter_lines()
        # While both CRLs are current both streams go on, well past the staleness allowed.
        for _ in range(3 * int(STALE / 0.05)):
            assert next(a_lines) == next(b_lines) == "tick"
        clock.advance(61)  # a's CRL is now a second past its nextUpdate: more than STALE
        stale_at = time.monotonic()
        ended = False
        for _ in a_lines:
            if time.monotonic() - stale_at > 5.0:
                break
        else:
            ended = True
        took = time.monotonic() - stale_at
        assert ended, f"a's stream was still open {took:.1f} s after its issuer's CRL went stale"
        ended_at = time.monotonic()
        while time.monotonic() - ended_at < 4 * STALE:  # well past the next looks of the watch
            assert next(b_lines) == "tick"
        refused, admitted = a.get(url), b.get(url)
    assert refused.status_code == 401  # as a new request from a is refused
    assert "nextUpdate" in refused.headers["www-authenticate"]
    assert admitted.status_code == 200
    assert middleware.open_requests.empty()


class _RevokingRule:
    """A scope rule that lets a revocation in while the request is between its verification
    and its admission (as one arriving during a body read would)."""

    def __init__(self, source: RevokingSource, value: str) -> None:
        self.source = source
        self.value = value

    def reads_body(self, scope: Any) -> bool:
        return False

    def scopes(self, scope: Any, body: bytes) -> tuple[str, ...]:
        self.source.revoke("jwt_id", self.value)
        return ()


@pytest.mark.parametrize(("revoked", "status"), [("j1", 401), ("another", 200)])
def test_a_revocation_between_verification_and_admission_is_not_missed(
    source: RevokingSource, revoked: str, status: int
) -> None:
    # The revocation's callbacks run before the request is among the open ones, so only the
    # check at admission can refuse it; one that names another credential lets it through.
    middleware = svid.asgi.SvidAuthMiddleware(
        app, audience=AUDIENCE, source=source, required_scopes=_RevokingRule(source, revoked)
    )
    sent = asyncio.run(call_asgi(middleware, task_token()))
    assert sent[0]["status"] == status
    if status == 401:
        assert dict(sent[0]["headers"])[b"www-authenticate"].endswith(
            b'error="invalid_token", error_description="credential revoked"'
        )
        assert SEEN == []
    else:
        assert len(SEEN) == 1


@pytest.mark.parametrize("cache_size", [0, 2])
def test_a_token_the_verifier_remembers_keeps_one_caller_and_is_still_checked_each_time(
    source: RevokingSource, cache_size: int
) -> None:
    # What a Caller reads of its token (task claims, scope) is read once per remembered token;
    # verification (expiry, revocation) still runs on every request.
    middleware = svid.asgi.SvidAuthMiddleware(
        app,
        audience=AUDIENCE,
        jwt_verifier=source.jwt_verifier(cache_size=cache_size),
        source=source,
    )
    first, other, third = task_token(), task_token("t2", jti="j2"), task_token("t3", jti="j3")
    for token in (first, first, other, first):
        assert asyncio.run(call_asgi(middleware, token))[0]["status"] == 200
    assert SEEN[0].task is not None  # read through the first request's Caller
    if cache_size:
        assert SEEN[1] is SEEN[0] is SEEN[3]
        assert SEEN[2] is not SEEN[0]
    else:
        assert len({id(c) for c in SEEN}) == 4
    asyncio.run(call_asgi(middleware, third))  # past the bound: the remembered ones go
    assert len(middleware._callers) <= max(cache_size, 1)
    source.revoke("jwt_id", "j1")
    refused = asyncio.run(call_asgi(middleware, first))
    assert refused[0]["status"] == 401
    assert len(SEEN) == 5


@pytest.mark.parametrize("second", ["same", "other", "garbage"])
def test_a_request_with_two_authorization_headers_is_400_invalid_request(
    source: RevokingSource, second: str
) -> None:
    # RFC 6750 section 3.1: more than one credential is invalid_request. Taking the first
    # would let an app or proxy that reads the last one act on a token nobody verified.
    token = task_token()
    other = {"same": token, "other": workload_token(), "garbage": "not-a-token"}[second]
    middleware = svid.asgi.SvidAuthMiddleware(app, audience=AUDIENCE, source=source)
    extra = ((b"authorization", f"Bearer {other}".encode()),)
    sent = asyncio.run(call_asgi(middleware, token, headers=extra))
    assert sent[0]["status"] == 400
    challenge = dict(sent[0]["headers"])[b"www-authenticate"].decode()
    assert 'error="invalid_request"' in challenge
    assert token not in challenge
    assert SEEN == []
