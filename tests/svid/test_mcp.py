"""svid.mcp with the official MCP SDK: a real MCPServer behind uvicorn, called by the SDK's
streamable HTTP client carrying task tokens (svid.mcp.http_client)."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
import threading
import time
from types import SimpleNamespace
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from starlette.responses import PlainTextResponse

import svid.mcp
from svid import MemoryBundleSource, SpiffeBundle, X509Bundle, sign_jws
from svid._caller import Caller
from svid._clock import FakeClock
from svid._crl import revoked_from_crls
from svid._open_requests import X509, OpenRequests
from svid._staleness_watch import StalenessWatch
from svid._unspent_assertions import EXPIRED_KEPT, UnspentAssertions
from svid.asgi import DEFAULT_MAX_BODY
from tests.svid.adapter_world import (
    AUDIENCE,
    KEY,
    MCP_HEADERS,
    RUNTIME,
    TD,
    RevokingSource,
    call_asgi,
    open_sse_stream,
    serving,
    task_token,
)
from tests.svid.certs import make_ca, make_leaf
from tests.svid.workload_fake import signed_crl

SEEN: list[Any] = []


def build(source: RevokingSource) -> Any:
    return tickets(source)[1]


def tickets(source: RevokingSource, **auth_options: Any) -> tuple[MCPServer, Any]:
    """The server (its session manager holds the sessions) and the app serving it."""
    # The README's server, as written there (its tools aside).
    auth = svid.mcp.TaskAuth(source, audience="mcp-tickets", **auth_options)
    server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)

    @server.tool()
    def read_ticket(ticket_id: str) -> str:
        SEEN.append(get_access_token())
        return f"ticket {ticket_id}: printer on fire"

    @server.tool()
    def export_customer_data() -> str:
        SEEN.append(get_access_token())
        return "everything"

    return server, auth.protect(server)


@pytest.fixture
def source() -> RevokingSource:
    SEEN.clear()
    return RevokingSource()


async def call(url: str, token: str, tool: str, args: dict[str, Any]) -> Any:
    async with (
        svid.mcp.http_client(lambda _aud: token, AUDIENCE) as http,
        streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        return await session.call_tool(tool, args)


def test_a_granted_tool_runs_with_typed_task_claims(source: RevokingSource) -> None:
    with serving(build(source)) as url:
        result = asyncio.run(call(url, task_token(), "read_ticket", {"ticket_id": "7"}))
    assert not result.is_error
    assert "printer on fire" in result.content[0].text
    (token,) = SEEN
    assert isinstance(token, svid.mcp.TaskAccessToken)
    assert token.task is not None
    assert token.task.task_id == "t1"
    assert token.task.grants_tool("read_ticket")
    assert token.spiffe_id.endswith("/task/t1")
    # The SDK's model shows every field: the bearer token went into any log of it.
    assert token.token.split(".")[2] not in repr(token) + str(token)
    assert "spiffe_id=" in repr(token)


def test_a_tool_the_task_was_not_granted_is_403_insufficient_scope(
    source: RevokingSource,
) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": "export_customer_data", "arguments": {}},
    }
    headers = {
        "Authorization": f"Bearer {task_token()}",
        "Accept": "application/json, text/event-stream",
    }
    with serving(build(source)) as url:
        reply = httpx.post(f"{url}/mcp", json=body, headers=headers)
        with pytest.raises(ExceptionGroup) as raised:  # the SDK's MCPError, in its task groups
            asyncio.run(call(url, task_token(), "export_customer_data", {}))
    assert reply.status_code == 403
    challenge = reply.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="tool:export_customer_data"' in challenge
    assert raised.group_contains(MCPError)
    assert SEEN == []


def _tool_call_body(tool: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": tool, "arguments": {}},
    }


def test_with_every_tool_false_a_renamed_tool_marked_by_its_function_is_named_at_protect(
    source: RevokingSource, caplog: pytest.LogCaptureFixture
) -> None:
    # @auth.require_tool marks the function's name: a tool renamed with @server.tool(name=...)
    # went unchecked, any token for the audience calling it, and nothing said so.
    auth = svid.mcp.TaskAuth(source, audience=AUDIENCE, every_tool=False)
    server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)

    @server.tool(name="export")
    @auth.require_tool
    def export_customer_data() -> str:
        return "everything"

    @server.tool()
    @auth.require_tool
    def delete_ticket() -> str:
        return "gone"

    with caplog.at_level(logging.WARNING, logger="svid.mcp"):
        app = auth.protect(server)
    assert "export_customer_data" in caplog.text
    assert "delete_ticket" not in caplog.text
    headers = {
        "Authorization": f"Bearer {task_token()}",  # grants read_ticket only
        "Accept": "application/json, text/event-stream",
    }
    with serving(app) as url:
        marked = httpx.post(f"{url}/mcp", json=_tool_call_body("delete_ticket"), headers=headers)
    assert marked.status_code == 403
    assert 'scope="tool:delete_ticket"' in marked.headers["www-authenticate"]


def test_a_body_that_could_be_read_two_ways_is_refused(source: RevokingSource) -> None:
    body = (
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
        b'"params":{"name":"read_ticket","name":"export_customer_data","arguments":{}}}'
    )
    headers = {
        "Authorization": f"Bearer {task_token()}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
    }
    with serving(build(source)) as url:
        reply = httpx.post(f"{url}/mcp", content=body, headers=headers)
    assert reply.status_code == 400
    assert SEEN == []


def test_the_sdk_app_without_protect_refuses_every_token(source: RevokingSource) -> None:
    auth = svid.mcp.TaskAuth(source, audience="mcp-tickets")
    server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)
    with serving(server.streamable_http_app()) as url, pytest.raises(ExceptionGroup):
        asyncio.run(call(url, task_token(), "read_ticket", {"ticket_id": "7"}))


def test_a_revoked_task_s_session_and_stream_end(source: RevokingSource) -> None:
    async def scenario(url: str) -> float:
        async with (
            svid.mcp.http_client(lambda _aud: task_token(), AUDIENCE) as http,
            streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            await session.call_tool("read_ticket", {"ticket_id": "1"})
            revoked_at = time.monotonic()
            await asyncio.to_thread(source.revoke, "jwt_id", "j1", "")
            with pytest.raises((MCPError, ExceptionGroup, httpx2.HTTPError)):
                await asyncio.wait_for(session.call_tool("read_ticket", {"ticket_id": "2"}), 5)
            return time.monotonic() - revoked_at

    with serving(build(source)) as url:
        took = asyncio.run(scenario(url))
    assert took < 2
    assert len(SEEN) == 1


STALE = 0.5  # max_revocation_staleness of the verifier below


def test_a_session_ends_once_revocation_data_is_older_than_the_verifier_allows(
    source: RevokingSource,
) -> None:
    """The agent out of reach, a revoked task could not be heard of: once the verifier refuses
    new requests for stale data, the sessions it admitted end too, as on a revocation, not
    only their open streams. A session still open would keep its server-side state, and be
    served again as soon as the feed came back."""
    source.revocations.feed_delivered(time.time())  # the agent's stream is up
    verifier = source.jwt_verifier(max_revocation_staleness=STALE)
    server, app = tickets(source, jwt_verifier=verifier)
    sessions = server.session_manager._server_instances  # the SDK's own table

    async def scenario(url: str) -> tuple[float, bool]:
        async with (
            svid.mcp.http_client(lambda _aud: task_token(), AUDIENCE) as http,
            streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            await session.call_tool("read_ticket", {"ticket_id": "1"})
            await asyncio.sleep(3 * STALE)  # while the feed is live the session goes on
            assert len(sessions) == 1
            lost_at = time.monotonic()
            source.revocations.feed_lost(time.monotonic())  # the agent went away
            while sessions and time.monotonic() - lost_at < 5.0:
                await asyncio.sleep(0.05)
            took = time.monotonic() - lost_at
            ended = not sessions
            source.revocations.feed_delivered(time.time())  # it is back
            with pytest.raises((MCPError, ExceptionGroup, httpx2.HTTPError)):
                await asyncio.wait_for(session.call_tool("read_ticket", {"ticket_id": "2"}), 5)
            return took, ended

    with serving(app) as url:
        took, ended = asyncio.run(scenario(url))
        # A new session, the data current again, is served.
        fresh = asyncio.run(call(url, task_token(), "read_ticket", {"ticket_id": "3"}))
    assert ended, f"the session was still open {took:.1f} s after the data went stale"
    assert took >= STALE - 0.05  # not before the verifier would refuse it
    assert not fresh.is_error
    assert [token.task.task_id for token in SEEN] == ["t1", "t1"]


@pytest.mark.parametrize("scope", ["read tool:read_ticket", None])
def test_the_per_request_access_token_is_what_model_construct_makes(
    source: RevokingSource, scope: str | None
) -> None:
    # TaskAuth builds its AccessToken without pydantic's generic construction, per request:
    # held here to the public model_construct, so a pydantic change cannot slip by unseen.
    auth = svid.mcp.TaskAuth(source, audience=AUDIENCE)
    token = task_token(scope=scope) if scope else task_token(scope="")
    fast = auth.access_token(token)
    verified = source.jwt_verifier().verify(token, AUDIENCE)
    sid = str(verified.spiffe_id)
    slow = svid.mcp.TaskAccessToken.model_construct(
        token=token,
        client_id=sid,
        scopes=scope.split() if scope else [],
        expires_at=verified.expires_at,
        resource=AUDIENCE,
        subject=sid,
        claims=dict(verified.claims),
        spiffe_id=sid,
    )
    slow._caller = fast._caller  # the one private attribute, set as pydantic sets it
    assert fast == slow
    assert fast.__dict__ == slow.__dict__
    assert list(fast.__dict__) == list(slow.__dict__)
    assert fast.model_fields_set == slow.model_fields_set
    assert fast.__pydantic_extra__ == slow.__pydantic_extra__
    assert fast.__pydantic_private__ == slow.__pydantic_private__
    assert fast.model_dump() == slow.model_dump()
    assert fast.task is not None
    assert fast.task.task_id == "t1"
    with pytest.raises(Exception, match="frozen"):
        fast.token = "other"  # type: ignore[misc]


def test_a_tool_changing_its_token_s_nested_claims_changes_no_later_request(
    source: RevokingSource,
) -> None:
    """The verifier caches a token's claims for its next requests: the ``act`` (or any nested
    claim) a tool is handed is read-only, so it cannot change what the next request with the
    same token is shown and typed from; a copy of it is the tool's own to edit."""
    auth = svid.mcp.TaskAuth(source, audience=AUDIENCE)
    server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)

    @server.tool()
    def read_ticket(ticket_id: str) -> str:
        token = get_access_token()
        SEEN.append((dict(token.claims["act"]), list(token.claims["tctx"]["resources"])))
        with pytest.raises(TypeError, match="read-only"):
            token.claims["act"]["sub"] = "spiffe://example.org/someone-else"
        with pytest.raises(TypeError, match="read-only"):
            token.claims["tctx"]["resources"].append("https://elsewhere.example")
        mine = copy.deepcopy(token.claims)
        mine["act"]["sub"] = "spiffe://example.org/someone-else"
        mine["tctx"]["resources"].append("https://elsewhere.example")
        json.dumps(token.claims)
        return "ok"

    token = task_token()
    with serving(auth.protect(server)) as url:
        for ticket in ("1", "2"):
            assert not asyncio.run(call(url, token, "read_ticket", {"ticket_id": ticket})).is_error
    first, second = SEEN
    assert first == second == ({"sub": f"{RUNTIME}/task/t1"}, [AUDIENCE])
    again = auth.access_token(token)  # typed from the verifier's cached claims
    assert again.task is not None
    assert again.task.resources == (AUDIENCE,)

    oauth = svid.mcp.AccessTokenAuth(source, issuer=ISSUER, resource=RESOURCE)
    exchanged = access_token()
    seen = asyncio.run(oauth.verify_token(exchanged))
    assert seen is not None
    with pytest.raises(TypeError, match="read-only"):
        seen.claims["act"]["sub"] = "spiffe://example.org/someone-else"
    later = asyncio.run(oauth.verify_token(exchanged))
    assert later is not None
    assert later.claims["act"] == {"sub": f"{RUNTIME}/task/t1"}


def _sdk_checks_behind(
    protecting: svid.mcp.TaskAuth, token: str, *checkers: tuple[svid.mcp.TaskAuth, str]
) -> tuple[int, list[Any]]:
    """One GET with `token` through `protecting.protect()`'s middleware to an app standing in
    for the SDK's, whose bearer check asks each (auth, token) of `checkers`: the status the
    request got, and what each check returned."""
    seen: list[Any] = []

    async def sdk_app(scope: Any, receive: Any, send: Any) -> None:
        for auth, checked in checkers:
            seen.append(await auth.verify_token(checked))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    server = SimpleNamespace(session_manager=SimpleNamespace(_server_instances={}))
    protected = protecting._protected(sdk_app, server)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/mcp",
        "headers": [(b"authorization", f"Bearer {token}".encode())],
    }
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(protected(scope, receive, send))
    return sent[0]["status"], seen


def test_the_sdk_check_accepts_only_the_token_protect_admitted(source: RevokingSource) -> None:
    # The SDK's bearer check runs inside protect()'s middleware: another token, even a valid
    # one, was not the one whose tool grants were checked, so it is refused.
    auth = svid.mcp.TaskAuth(source, audience=AUDIENCE)
    admitted, other = task_token(), task_token(task_id="t2", jti="j2")
    status, seen = _sdk_checks_behind(auth, admitted, (auth, admitted), (auth, other))
    assert status == 200
    assert isinstance(seen[0], svid.mcp.TaskAccessToken)
    assert seen[0].task is not None
    assert seen[0].task.task_id == "t1"
    assert seen[1] is None


def test_the_sdk_check_refuses_a_token_another_auths_protect_admitted(
    source: RevokingSource,
) -> None:
    # A server whose SDK checks tokens with one TaskAuth but is served behind another's
    # protect() (another audience): the caller it admitted had that server's grants checked,
    # not this one's. Only a caller of this auth's own audience and kind goes through.
    ours = svid.mcp.TaskAuth(source, audience=AUDIENCE)
    theirs = svid.mcp.TaskAuth(source, audience="other-server")
    token = task_token(aud=["other-server"])
    status, seen = _sdk_checks_behind(theirs, token, (ours, token), (theirs, token))
    assert status == 200
    assert seen[0] is None
    assert isinstance(seen[1], svid.mcp.TaskAccessToken)


def test_a_bearer_token_after_several_spaces_is_admitted_by_the_sdk_too(
    source: RevokingSource,
) -> None:
    # RFC 6750 puts one or more spaces after "Bearer". svid admitted such a request, and the
    # SDK, which hands its verifier what follows "Bearer " (a space and the token), was
    # refused it as another token than protect() admitted: a 401 saying nothing of why.
    token = task_token()
    with serving(build(source)) as url:
        result = asyncio.run(call(url, f" {token}", "read_ticket", {"ticket_id": "7"}))
    assert not result.is_error
    (access,) = SEEN
    assert access.token == token


class _Manager:
    """The SDK's session manager as svid reads it: its table (reads counted) and the way it
    ends a session."""

    def __init__(self) -> None:
        self.live: dict[str, Any] = {}
        self.reads = 0
        self.discarded: list[str] = []

    @property
    def _server_instances(self) -> dict[str, Any]:
        self.reads += 1
        return self.live

    async def _discard_session(self, session_id: str, transport: Any) -> None:
        self.discarded.append(session_id)


def test_ended_sessions_are_forgotten_in_sweeps_that_stay_rare(source: RevokingSource) -> None:
    # Each task opens a session, which ends before the next one opens (a busy server's usual
    # day). Looking for ended sessions at every new one made opening sessions quadratic.
    manager = _Manager()
    open_requests = OpenRequests()
    sessions = svid.mcp._Sessions(SimpleNamespace(session_manager=manager), open_requests)
    verifier = source.jwt_verifier()

    async def scenario() -> None:
        for i in range(2000):
            token = task_token(task_id=f"t{i}", jti=f"j{i}")
            caller = svid.asgi.Caller(
                verifier.verify(token, AUDIENCE).spiffe_id,
                jwt=verifier.verify(token, AUDIENCE),
                audience=AUDIENCE,
            )
            manager.live = {f"s{i}": object()}  # the one session open now
            sessions.track(caller, f"s{i}")
        # The last task's session is still open: revoking the task ends it.
        open_requests.on_revoked(svid.RevocationEvent("jwt_id", "j1999", 0.0))
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    # A sweep only once the table has doubled since the last (at least 64 new sessions): the
    # work of all sweeps together grows with the number of sessions, not with its square.
    assert manager.reads <= 2000 // 64 + 1
    assert len(sessions._admissions) <= 64  # ended ones were let go
    assert manager.discarded == ["s1999"]


def test_an_mtls_caller_s_session_ends_once_its_issuers_crl_is_stale_and_no_other_callers_does(
    source: RevokingSource,
) -> None:
    """A session is held with what admitted it, as a request is: the staleness watch ends the
    one whose caller's issuer's CRL went too far past its nextUpdate (as a new request from
    it would be refused), and leaves another issuer's caller's session open."""
    now = time.time()
    since, until = now - 3600, now + 86400
    root = make_ca(not_before=since, not_after=until)
    a_ca, b_ca = (
        make_ca(name, parent=root, spiffe_id=None, not_before=since, not_after=until)
        for name in ("a.example.org", "b.example.org")
    )
    # a's CRL promises the next one in a minute, b's in a day.
    crls = revoked_from_crls(
        [
            signed_crl(a_ca, [1], next_update=now + 60),
            signed_crl(b_ca, [1], next_update=now + 86400),
        ],
        {TD: X509Bundle(TD, (root.cert,))},
    )
    source.bundles = MemoryBundleSource.of(SpiffeBundle(TD, (root.cert,)))
    source.revocations.replace(crls.revoked, crls.next_update, crls.pending)
    clock = FakeClock(now)
    verifier = source.x509_verifier(clock=clock, max_revocation_staleness=STALE)
    callers = {}
    for name, ca in (("a", a_ca), ("b", b_ca)):
        leaf = make_leaf(
            ca, uris=[f"spiffe://example.org/{name}"], not_before=since, not_after=until
        )
        peer = verifier.verify([leaf.cert, ca.cert])
        callers[name] = svid.asgi.Caller(peer.spiffe_id, x509=peer, audience=AUDIENCE)
    manager = _Manager()
    manager.live = {"sa": object(), "sb": object()}
    open_requests = OpenRequests()
    sessions = svid.mcp._Sessions(SimpleNamespace(session_manager=manager), open_requests)
    fresh_for = {X509: verifier.revocations_fresh_for}
    watch = StalenessWatch(fresh_for, open_requests, fresh_for)

    async def scenario() -> float:
        for name, caller in callers.items():
            sessions.track(caller, f"s{name}")
        watch.admitted()
        await asyncio.sleep(3 * STALE)  # both CRLs current: the watch looked, both go on
        assert manager.discarded == []
        clock.advance(61)  # a's CRL is now a second past its nextUpdate: more than STALE
        stale_at = time.monotonic()
        while not manager.discarded and time.monotonic() - stale_at < 5.0:
            await asyncio.sleep(0.05)
        took = time.monotonic() - stale_at
        await asyncio.sleep(4 * STALE)  # well past the watch's next looks
        watch.stop()
        return took

    took = asyncio.run(scenario())
    assert manager.discarded == ["sa"], f"after {took:.1f} s"
    assert len(open_requests) == 1  # b's session, still held


def _tool_call(tool: str) -> bytes:
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}}
    return json.dumps(message).encode()


async def _post(
    protected: Any, token: str, parts: list[bytes], on_read: Any = None
) -> list[dict[str, Any]]:
    return await call_asgi(
        protected, token, method="POST", path="/mcp", parts=tuple(parts), on_read=on_read
    )


def _protected_app(source: RevokingSource, bodies: list[bytes]) -> Any:
    """TaskAuth.protect's middleware around an app that records the body it is handed."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    auth = svid.mcp.TaskAuth(source, audience=AUDIENCE)
    server = SimpleNamespace(session_manager=SimpleNamespace(_server_instances={}))
    return auth._protected(app, server)


def test_a_body_in_several_messages_is_checked_whole_and_handed_on_whole(
    source: RevokingSource,
) -> None:
    bodies: list[bytes] = []
    protected = _protected_app(source, bodies)
    granted, refused = _tool_call("read_ticket"), _tool_call("export_customer_data")
    ok = asyncio.run(_post(protected, task_token(), [granted[:10], granted[10:30], granted[30:]]))
    no = asyncio.run(_post(protected, task_token(), [refused[:40], refused[40:]]))
    assert ok[0]["status"] == 200
    assert bodies == [granted]  # the app read the body the check read, all of it
    assert no[0]["status"] == 403
    assert b'scope="tool:export_customer_data"' in dict(no[0]["headers"])[b"www-authenticate"]


@pytest.mark.parametrize("split", [False, True])
def test_a_body_over_the_limit_is_413_in_one_message_or_several(
    source: RevokingSource, split: bool
) -> None:
    bodies: list[bytes] = []
    body = _tool_call("read_ticket") + b" " * DEFAULT_MAX_BODY
    parts = [body[: DEFAULT_MAX_BODY // 2], body[DEFAULT_MAX_BODY // 2 :]] if split else [body]
    sent = asyncio.run(_post(_protected_app(source, bodies), task_token(), parts))
    assert sent[0]["status"] == 413
    assert bodies == []


def test_a_revocation_during_the_body_read_refuses_the_request(source: RevokingSource) -> None:
    # The token was verified before the body was read; the revocation's callbacks found no
    # open request to end, so the check at admission has to refuse it.
    bodies: list[bytes] = []
    sent = asyncio.run(
        _post(
            _protected_app(source, bodies),
            task_token(),
            [_tool_call("read_ticket")],
            on_read=lambda: source.revoke("jwt_id", "j1"),
        )
    )
    assert sent[0]["status"] == 401
    assert b"credential revoked" in dict(sent[0]["headers"])[b"www-authenticate"]
    assert bodies == []


def test_a_request_with_two_authorization_headers_is_400_invalid_request(
    source: RevokingSource,
) -> None:
    # The SDK reads the first one too, but an app or proxy that reads the last one would act
    # on a token nobody verified: RFC 6750 section 3.1 makes it invalid_request.
    bodies: list[bytes] = []
    protected = _protected_app(source, bodies)
    token = task_token()
    extra = ((b"authorization", b"Bearer not-a-token"),)
    sent = asyncio.run(
        call_asgi(
            protected,
            token,
            method="POST",
            path="/mcp",
            parts=(_tool_call("read_ticket"),),
            headers=extra,
        )
    )
    assert sent[0]["status"] == 400
    assert b'error="invalid_request"' in dict(sent[0]["headers"])[b"www-authenticate"]
    assert bodies == []


# --- AccessTokenAuth: svidd's OAuth access tokens (RFC 9068), a task's exchanged token ---

# Scopes a token carries, and scope-tokens asked of it (tests/svid/test_caller.py's table).
CALLER_SCOPES = ["read tool:read_ticket", "invoke_tool", "", "read", "tool:a tool:b", "tool:"]
CALLER_ASKED = ["tool:read_ticket", "tool:a", "read", "invoke_tool", "write", "tool:"]
ISSUER = "https://svidd.example"
RESOURCE = "http://127.0.0.1/mcp"  # the resource the tokens name (not where the test serves)
TASK_ID = f"{RUNTIME}/task/t1"


def access_token(jti: str = "a1", txn: str = "t1", scope: str | None = "tool:read_ticket") -> str:
    """An access token exchanged for task ``txn``, as svidd's token endpoint mints it; with
    ``txn`` "" a workload's own (the JWT-bearer grant without a task: no scope, no act)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "user:alice" if txn else RUNTIME,
        "aud": [RESOURCE],
        "exp": now + 300,
        "iat": now,
        "jti": jti,
        "client_id": RUNTIME,
    }
    if scope is not None:
        claims["scope"] = scope
    if txn:
        claims["act"] = {"sub": f"{RUNTIME}/task/{txn}"}
        claims["txn"] = txn
    return sign_jws({"kid": "k1", "typ": "at+jwt"}, claims, KEY)


def oauth_tickets(source: RevokingSource, **options: Any) -> tuple[MCPServer, Any]:
    auth = svid.mcp.AccessTokenAuth(source, issuer=ISSUER, resource=RESOURCE, **options)
    server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)

    @server.tool()
    def read_ticket(ticket_id: str) -> str:
        SEEN.append(get_access_token())
        return f"ticket {ticket_id}: printer on fire"

    @server.tool()
    @auth.require_tool  # what every_tool=False still checks
    def export_customer_data() -> str:
        SEEN.append(get_access_token())
        return "everything"

    return server, auth.protect(server)


@pytest.mark.parametrize(
    "revoked",
    [
        pytest.param(("jwt_id", "a1", TASK_ID), id="its-jti"),
        # The task's X.509-SVID: the task ended (its end revokes it, the agent names the
        # task's ID). A token of the task's ID alone may be one delegated from it, revoked
        # with the acting workload's agent, the task going on (see the test below).
        pytest.param(("x509_serial", "ab", TASK_ID), id="its-task"),
        # The task's end, all the server says of it when the token expired before the end
        # (not revoked then) and the task had no X.509-SVID (its agent never minted one).
        pytest.param(("task", "t1", TASK_ID), id="its-end"),
        pytest.param(("task", "t1", ""), id="its-end-unnamed"),
    ],
)
def test_an_access_token_s_open_stream_and_session_end_when_it_or_its_task_is_revoked(
    source: RevokingSource, revoked: tuple[str, str, str]
) -> None:
    server, app = oauth_tickets(source)
    sessions = server.session_manager._server_instances  # the SDK's own table
    token = access_token()

    async def scenario(url: str) -> tuple[float, bool, int]:
        async with httpx.AsyncClient(timeout=10) as http:
            session, stream = await open_sse_stream(http, url, token)
            async with stream as response:
                assert response.status_code == 200
                assert session in sessions
                revoked_at = time.monotonic()
                await asyncio.to_thread(source.revoke, *revoked)
                async for _ in response.aiter_bytes():  # ends when the server closes it
                    pass
                closed = time.monotonic() - revoked_at
            while sessions and time.monotonic() - revoked_at < 5:
                await asyncio.sleep(0.01)
            gone = not sessions
            ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
            headers = {
                **MCP_HEADERS,
                "Authorization": f"Bearer {token}",
                "mcp-session-id": session,
            }
            after = await http.post(f"{url}/mcp", json=ping, headers=headers)
            return closed, gone, after.status_code

    with serving(app) as url:
        closed, gone, after = asyncio.run(scenario(url))
    assert closed < 1, f"the stream was still open {closed:.1f} s after the revocation"
    assert gone
    # The token's own jti: refused outright. Another of its task's: the token is not in the
    # revocation set (the server revokes each of the task's credentials by its own jti), but
    # the session it opened is gone.
    assert after == (401 if revoked[1] == "a1" else 404)


def test_an_access_token_s_stream_goes_on_when_a_token_delegated_from_its_task_is_revoked(
    source: RevokingSource,
) -> None:
    """The acting workload's agent evicted, the server revokes the token delegated to it, the
    task going on: that ended every open stream and session of the task."""
    server, app = oauth_tickets(source)
    sessions = server.session_manager._server_instances

    async def scenario(url: str) -> tuple[bool, int]:
        async with httpx.AsyncClient(timeout=10) as http:
            session, stream = await open_sse_stream(http, url, access_token())
            async with stream as response:
                assert response.status_code == 200
                await asyncio.to_thread(source.revoke, "jwt_id", "j-delegated", TASK_ID)
                # The revocation callback ran (it is synchronous on the source's thread).
                held = session in sessions
            ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
            headers = {
                **MCP_HEADERS,
                "Authorization": f"Bearer {access_token()}",
                "mcp-session-id": session,
            }
            after = await http.post(f"{url}/mcp", json=ping, headers=headers)
            return held, after.status_code

    with serving(app) as url:
        held, after = asyncio.run(scenario(url))
    assert held
    assert after == 200


def test_an_access_token_s_session_ends_once_revocation_data_is_older_than_the_verifier_allows(
    source: RevokingSource,
) -> None:
    source.revocations.feed_delivered(time.time())  # the agent's stream is up
    server, app = oauth_tickets(source, max_revocation_staleness=STALE)
    sessions = server.session_manager._server_instances

    async def scenario(url: str) -> tuple[float, bool]:
        async with httpx.AsyncClient(timeout=10) as http:
            _session, stream = await open_sse_stream(http, url, access_token())
            async with stream as response:
                assert response.status_code == 200
                lost_at = time.monotonic()
                source.revocations.feed_lost(time.monotonic())  # the agent went away
                async for _ in response.aiter_bytes():
                    pass
            while sessions and time.monotonic() - lost_at < 5:
                await asyncio.sleep(0.01)
            return time.monotonic() - lost_at, not sessions

    with serving(app) as url:
        took, ended = asyncio.run(scenario(url))
    assert ended, f"the session was still open {took:.1f} s after the data went stale"
    assert STALE - 0.05 <= took < STALE + 1.5


def test_access_token_auth_still_serves_the_sdk_s_own_bearer_check_without_protect(
    source: RevokingSource,
) -> None:
    """As a plain TokenVerifier (the SDK's app served as it is) a token is verified per
    request: a granted call runs, and once its task is revoked the next request is refused."""
    auth = svid.mcp.AccessTokenAuth(source, issuer=ISSUER, resource=RESOURCE)
    server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)

    @server.tool()
    def read_ticket(ticket_id: str) -> str:
        SEEN.append(get_access_token())
        return f"ticket {ticket_id}"

    with serving(server.streamable_http_app()) as url:
        result = asyncio.run(call(url, access_token(), "read_ticket", {"ticket_id": "1"}))
        source.revoke("jwt_id", "a1", TASK_ID)
        with pytest.raises((MCPError, ExceptionGroup, httpx2.HTTPError)):
            asyncio.run(call(url, access_token(), "read_ticket", {"ticket_id": "2"}))
    assert not result.is_error
    (seen,) = SEEN
    assert isinstance(seen, svid.mcp.OAuthAccessToken)
    assert seen.subject == "user:alice"
    assert seen.claims["txn"] == "t1"


def test_protect_hands_the_sdk_the_access_token_it_admitted(source: RevokingSource) -> None:
    _server, app = oauth_tickets(source)
    with serving(app) as url:
        result = asyncio.run(call(url, access_token(), "read_ticket", {"ticket_id": "1"}))
    assert not result.is_error
    (seen,) = SEEN
    assert isinstance(seen, svid.mcp.OAuthAccessToken)
    assert seen.act_chain == (TASK_ID,)
    assert seen.scopes == ["tool:read_ticket"]


def test_an_access_token_without_the_tool_s_grant_is_403_insufficient_scope_naming_svidd(
    source: RevokingSource,
) -> None:
    """The tool ran for any token of the resource, whatever its scope: the task's exchange
    granted read_ticket and the token called export_customer_data. Now the scope challenge of
    the MCP spec: 403, the scope to ask for, and where to ask (the resource metadata)."""
    _server, app = oauth_tickets(source)
    headers = {"Authorization": f"Bearer {access_token()}", **MCP_HEADERS}
    with serving(app) as url:
        reply = httpx.post(
            f"{url}/mcp", json=_tool_call_body("export_customer_data"), headers=headers
        )
        granted = asyncio.run(call(url, access_token(), "read_ticket", {"ticket_id": "1"}))
        with pytest.raises(ExceptionGroup) as raised:  # the SDK's MCPError, in its task groups
            asyncio.run(call(url, access_token(), "export_customer_data", {}))
    assert reply.status_code == 403
    challenge = reply.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="tool:export_customer_data"' in challenge
    named = 'resource_metadata="http://127.0.0.1/.well-known/oauth-protected-resource/mcp"'
    assert challenge.endswith(f", {named}")
    assert raised.group_contains(MCPError)
    assert not granted.is_error
    assert [token.scopes for token in SEEN] == [["tool:read_ticket"]]  # only the granted call


def test_a_challenge_names_each_tool_a_batch_needs_whole_and_once(source: RevokingSource) -> None:
    """A batch calling many tools was challenged with its scope cut at 300 characters, mid-name:
    the client asked for a tool named by the cut (the ninth name, five letters short), got
    no token that called the batch, and was refused again. It names every tool, whole and once
    (a name no scope-token spells is left out: it cannot be asked for), up to what the token
    endpoint takes."""
    _server, app = oauth_tickets(source)
    tools = [f"tool_{i:02d}_" + "x" * 20 for i in range(20)]
    batch = [_tool_call_body(t) for t in (*tools, tools[0], 'quote"d', "caf\u00e9")]
    headers = {"Authorization": f"Bearer {access_token()}", **MCP_HEADERS}
    with serving(app) as url:
        reply = httpx.post(f"{url}/mcp", json=batch, headers=headers)
        # Past what the token endpoint takes: the tools that fit, each whole.
        many = [_tool_call_body(f"tool_{i:03d}_" + "y" * 40) for i in range(60)]
        long = httpx.post(f"{url}/mcp", json=many, headers=headers)
    assert reply.status_code == 403
    asked = reply.headers["www-authenticate"].split('scope="')[1].split('"')[0]
    assert asked.split(" ") == [f"tool:{t}" for t in tools]
    assert reply.json()["scope"].split(" ")[: len(tools)] == asked.split(" ")
    asked = long.headers["www-authenticate"].split('scope="')[1].split('"')[0]
    assert 2048 - 55 < len(asked) <= 2048  # 55: a token and its space
    fit = (len(asked) + 1) // 55
    assert asked.split(" ") == [f"tool:tool_{i:03d}_" + "y" * 40 for i in range(fit)]
    assert SEEN == []


@pytest.mark.parametrize(
    ("txn", "scope", "runs"),
    [
        # invoke_tool: every tool of the resource, as in a task token (TaskClaims).
        pytest.param("t1", "read invoke_tool", True, id="invoke_tool"),
        # A workload's own token (JWT bearer, no task) carries no scope: no tool is granted.
        pytest.param("", None, False, id="no-scope"),
        pytest.param("t1", "read", False, id="an-action-only"),
    ],
)
def test_an_access_token_s_scope_grants_tools_as_a_task_token_s_does(
    source: RevokingSource, txn: str, scope: str | None, runs: bool
) -> None:
    _server, app = oauth_tickets(source)
    token = access_token(txn=txn, scope=scope)
    with serving(app) as url:
        if runs:
            result = asyncio.run(call(url, token, "export_customer_data", {}))
            assert not result.is_error
        else:
            with pytest.raises(ExceptionGroup) as raised:
                asyncio.run(call(url, token, "export_customer_data", {}))
            assert raised.group_contains(MCPError)
    assert (len(SEEN) == 1) is runs


@pytest.mark.parametrize(("granted", "asked"), list(itertools.product(CALLER_SCOPES, CALLER_ASKED)))
def test_an_access_token_s_caller_grants_what_a_task_token_s_grants(
    source: RevokingSource, granted: str, asked: str
) -> None:
    """The caller protect puts in the request (``scope["svid.caller"]``) for an access token
    answers ``grants`` as TaskClaims does for a task token of the same scope (the oracle)."""
    access = source.access_token_verifier(ISSUER, RESOURCE).verify(
        access_token(scope=granted or None)
    )
    caller = svid.mcp._AccessTokenCaller(access, RESOURCE, TD)
    task = source.jwt_verifier().verify(task_token(scope=granted), AUDIENCE)
    oracle = Caller(task.spiffe_id, jwt=task, audience=AUDIENCE)
    assert oracle.task is not None  # the full read
    assert caller.grants(asked) == oracle.grants(asked)


def test_a_txn_token_s_caller_grants_only_what_was_decided_for_its_own_resource(
    source: RevokingSource,
) -> None:
    """AccessTokenAuth admits access tokens alone, but its caller names its resource: a
    Txn-Token (aud: the trust domain) decided for another resource grants no action or tool
    here, and one decided for this resource grants them as an access token does."""
    verifier = source.access_token_verifier(ISSUER, RESOURCE)

    def caller(resource: str) -> svid.mcp._AccessTokenCaller:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": "user:alice",
            "aud": TD.name,
            "exp": now + 300,
            "iat": now,
            "jti": f"x-{resource}",
            "txn": "t1",
            "scope": "read tool:read_ticket",
            "act": {"sub": TASK_ID},
            "tctx": {"resource": resource},
        }
        txn = sign_jws({"kid": "k1", "typ": "txntoken+jwt"}, claims, KEY)
        return svid.mcp._AccessTokenCaller(verifier.verify_txn_token(txn), RESOURCE, TD)

    elsewhere = caller("http://127.0.0.1/billing")
    assert not elsewhere.grants("read")
    assert not elsewhere.grants("tool:read_ticket")
    here = caller(RESOURCE)
    assert here.grants("read")
    assert here.grants("tool:read_ticket")


def test_with_every_tool_false_a_workload_s_own_access_token_calls_only_unmarked_tools(
    source: RevokingSource,
) -> None:
    _server, app = oauth_tickets(source, every_tool=False)
    workload = access_token(txn="", scope=None)
    with serving(app) as url:
        unmarked = asyncio.run(call(url, workload, "read_ticket", {"ticket_id": "1"}))
        headers = {"Authorization": f"Bearer {workload}", **MCP_HEADERS}
        marked = httpx.post(
            f"{url}/mcp", json=_tool_call_body("export_customer_data"), headers=headers
        )
    assert not unmarked.is_error
    assert marked.status_code == 403
    assert 'scope="tool:export_customer_data"' in marked.headers["www-authenticate"]
    (seen,) = SEEN
    assert seen.subject == RUNTIME


def test_protect_serves_the_resource_metadata_to_anyone_and_a_401_names_it(
    source: RevokingSource,
) -> None:
    """How a client finds svidd: the SDK's RFC 9728 document, asked for without a token, and
    the 401 challenge's resource_metadata (the SDK's own check names it too)."""
    _server, app = oauth_tickets(source)
    with serving(app) as url:
        metadata = httpx.get(f"{url}/.well-known/oauth-protected-resource/mcp", timeout=10)
        bare = httpx.post(f"{url}/mcp", json={}, timeout=10)
        bad = httpx.post(f"{url}/mcp", json={}, headers={"Authorization": "Bearer x"}, timeout=10)
    assert metadata.status_code == 200, metadata.text
    assert [a.rstrip("/") for a in metadata.json()["authorization_servers"]] == [ISSUER]
    named = 'resource_metadata="http://127.0.0.1/.well-known/oauth-protected-resource/mcp"'
    assert bare.status_code == 401
    assert bare.headers["www-authenticate"] == f'Bearer realm="{RESOURCE}", {named}'
    assert bad.status_code == 401
    challenge = bad.headers["www-authenticate"]
    assert challenge.startswith(f'Bearer realm="{RESOURCE}", error="invalid_token", ')
    assert challenge.endswith(f", {named}")


def test_an_access_token_revoked_between_its_verification_and_its_admission_is_refused(
    source: RevokingSource,
) -> None:
    """A revocation that lands after the token was verified, before its request is held
    where revocations find it, reaches neither: it is looked for once more there."""
    auth = svid.mcp.AccessTokenAuth(source, issuer=ISSUER, resource=RESOURCE)
    server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)
    app = auth.protect(server)
    verify = auth.verifier.verify

    def verified_then_revoked(token: str) -> Any:
        result = verify(token)
        source.revoke("jwt_id", "a1", TASK_ID)  # on its own thread, as the agent's stream
        return result

    auth.verifier.verify = verified_then_revoked  # type: ignore[method-assign]
    sent = asyncio.run(call_asgi(app, access_token(), method="GET", path="/mcp"))
    assert sent[0]["status"] == 401
    assert (
        b'error="invalid_token", error_description="credential revoked"'
        in dict(sent[0]["headers"])[b"www-authenticate"]
    )


@pytest.mark.parametrize(
    "path",
    [
        "/.well-known/oauth-protected-resource/mcp/admin",
        "/.well-known/oauth-protected-resource/admin",
        "/.well-known/oauth-protected-resource",
    ],
)
def test_only_the_resource_metadata_document_is_served_without_a_token(
    source: RevokingSource, path: str
) -> None:
    """Every path under the metadata's prefix was let through unchecked: a route of the
    server's own there (a custom route, or another resource's document) was served to anyone,
    and the SDK checks tokens on its MCP endpoint only."""
    auth = svid.mcp.AccessTokenAuth(source, issuer=ISSUER, resource=RESOURCE)
    server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)

    @server.custom_route(path, methods=["GET"])
    async def private(request: Any) -> PlainTextResponse:
        return PlainTextResponse("for token holders")

    app = auth.protect(server)
    with serving(app) as url:
        other = httpx.get(f"{url}{path}", timeout=10)
        metadata = httpx.get(f"{url}/.well-known/oauth-protected-resource/mcp", timeout=10)
        admitted = httpx.get(
            f"{url}{path}", headers={"Authorization": f"Bearer {access_token()}"}, timeout=10
        )
    assert other.status_code == 401, other.text
    assert metadata.status_code == 200, metadata.text
    assert admitted.status_code == 200
    assert admitted.text == "for token holders"


def test_oauth_auth_asks_a_sync_task_for_its_jwt_off_the_event_loop() -> None:
    """A blocking Task's jwt() would stall every stream of the loop the SDK's client runs on
    while the agent mints: it is asked on a thread; an AsyncTask's is awaited."""
    loop_thread: list[int] = []

    class SyncTask:  # what oauth_auth reads of a svid.tasks.Task
        spiffe_id = TASK_ID

        def jwt(self, audience: str) -> str:
            loop_thread.append(threading.get_ident())
            return f"jwt-for-{audience}"

    class AsyncTask:
        spiffe_id = TASK_ID

        async def jwt(self, audience: str) -> str:
            return f"async-jwt-for-{audience}"

    async def assertions() -> tuple[str, str, int]:
        sync = svid.mcp.oauth_auth(SyncTask(), RESOURCE, issuer=ISSUER)
        asynchronous = svid.mcp.oauth_auth(AsyncTask(), RESOURCE, issuer=ISSUER)
        return (
            await sync._assertion_provider(ISSUER, RESOURCE),  # type: ignore[attr-defined]
            await asynchronous._assertion_provider(ISSUER, RESOURCE),  # type: ignore[attr-defined]
            threading.get_ident(),
        )

    sync_jwt, async_jwt, here = asyncio.run(assertions())
    assert sync_jwt == f"jwt-for-{ISSUER}"
    assert async_jwt == f"async-jwt-for-{ISSUER}"
    (asked_on,) = loop_thread
    assert asked_on != here


def test_oauth_auth_never_presents_a_task_jwt_it_presented_before() -> None:
    """svidd takes a task JWT-SVID once per resource and the task hands out the same one for a
    while: the SDK's next token request (a step-up after insufficient_scope, or once its token
    expired) presents one minted anew; a new one the task hands out is presented as it is."""
    asked: list[tuple[str, bool]] = []

    class Task:
        spiffe_id = TASK_ID
        handed_out = "jwt-1"
        minted = 1

        async def jwt(self, audience: str, *, fresh: bool = False) -> str:
            asked.append((audience, fresh))
            if fresh:
                self.minted += 1
                self.handed_out = f"jwt-{self.minted}"
            return self.handed_out

    task = Task()

    async def assertions() -> list[str]:
        provider = svid.mcp.oauth_auth(task, RESOURCE, issuer=ISSUER)
        presented = []
        for renewed in (False, False, True, False):
            if renewed:
                task.handed_out = "renewed"
            presented.append(await provider._assertion_provider(ISSUER, RESOURCE))  # type: ignore[attr-defined]
        return presented

    assert asyncio.run(assertions()) == ["jwt-1", "jwt-2", "renewed", "jwt-3"]
    assert asked == [
        (ISSUER, False),
        (ISSUER, False),
        (ISSUER, True),
        (ISSUER, False),
        (ISSUER, False),
        (ISSUER, True),
    ]


def test_oauth_auth_never_presents_again_the_agent_s_token_after_many_step_ups() -> None:
    """The task keeps a fresh JWT-SVID a quarter of its life, then asks the agent, whose cache
    still holds the first one (until half its life) however many fresh ones were presented
    since. Only the last 8 presented were remembered: after more step-ups than that, the
    agent's first one was presented a second time, and svidd refused it as a replay."""
    agents = task_token(jti="agent-1")

    class Task:  # the task's cache (`held`) in front of the agent's (`agents`)
        spiffe_id = TASK_ID
        held = agents
        minted = 0

        async def jwt(self, audience: str, *, fresh: bool = False) -> str:
            if fresh:
                self.minted += 1
                self.held = task_token(jti=f"fresh-{self.minted}")
            return self.held

    task = Task()

    async def assertions() -> list[str]:
        provider = svid.mcp.oauth_auth(task, RESOURCE, issuer=ISSUER)
        presented = [await provider._assertion_provider(ISSUER, RESOURCE)]  # type: ignore[attr-defined]
        for _ in range(12):  # step-ups, one tool after another
            presented.append(await provider._assertion_provider(ISSUER, RESOURCE))  # type: ignore[attr-defined]
        task.held = agents  # the fresh one past a quarter of its life: the agent's again
        presented.append(await provider._assertion_provider(ISSUER, RESOURCE))  # type: ignore[attr-defined]
        return presented

    presented = asyncio.run(assertions())
    assert presented[0] == agents
    assert len(set(presented)) == len(presented), "a JWT-SVID presented twice is a replay"


def test_unspent_assertions_forget_tokens_once_expired() -> None:
    """What is remembered is bounded by the tokens' lives: an expired one never comes back."""
    clock = FakeClock(time.time())
    tokens = iter([task_token(jti=f"j{n}", exp=int(clock.now()) + 60) for n in range(4)])

    class Task:
        async def jwt(self, audience: str, *, fresh: bool = False) -> str:
            return next(tokens)

    provider = UnspentAssertions(Task(), clock)
    asyncio.run(provider(ISSUER, RESOURCE))
    asyncio.run(provider(ISSUER, RESOURCE))
    assert len(provider._presented) == 2
    clock.advance(60 + EXPIRED_KEPT - 1)  # a while past exp: this clock may run ahead
    asyncio.run(provider(ISSUER, RESOURCE))
    assert len(provider._presented) == 3
    clock.advance(2)
    asyncio.run(provider(ISSUER, RESOURCE))
    assert len(provider._presented) == 1
