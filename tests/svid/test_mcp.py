"""svid.mcp with the official MCP SDK: a real MCPServer behind uvicorn, called by the SDK's
streamable HTTP client carrying task tokens (svid.mcp.http_client)."""

from __future__ import annotations

import asyncio
import json
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

import svid.mcp
from svid.asgi import DEFAULT_MAX_BODY
from tests.svid.adapter_world import AUDIENCE, RevokingSource, call_asgi, serving, task_token

SEEN: list[Any] = []


def build(source: RevokingSource) -> Any:
    # The README's server, as written there (its tools aside).
    auth = svid.mcp.TaskAuth(source, audience="mcp-tickets")
    server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)

    @server.tool()
    def read_ticket(ticket_id: str) -> str:
        SEEN.append(get_access_token())
        return f"ticket {ticket_id}: printer on fire"

    @server.tool()
    def export_customer_data() -> str:
        SEEN.append(get_access_token())
        return "everything"

    return auth.protect(server)


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


def test_the_sdk_check_accepts_only_the_token_protect_admitted(source: RevokingSource) -> None:
    # The SDK's bearer check runs inside protect()'s middleware: another token, even a valid
    # one, was not the one whose tool grants were checked, so it is refused.
    auth = svid.mcp.TaskAuth(source, audience=AUDIENCE)
    admitted, other = task_token(), task_token(task_id="t2", jti="j2")
    seen: list[Any] = []

    async def sdk_app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await auth.verify_token(admitted))
        seen.append(await auth.verify_token(other))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    server = SimpleNamespace(session_manager=SimpleNamespace(_server_instances={}))
    protected = auth._protected(sdk_app, server)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/mcp",
        "headers": [(b"authorization", f"Bearer {admitted}".encode())],
    }
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(protected(scope, receive, send))
    assert sent[0]["status"] == 200
    assert isinstance(seen[0], svid.mcp.TaskAccessToken)
    assert seen[0].task is not None
    assert seen[0].task.task_id == "t1"
    assert seen[1] is None


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
    sessions = svid.mcp._Sessions(SimpleNamespace(session_manager=manager))
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
        sessions.on_revoked(svid.RevocationEvent("jwt_id", "j1999", 0.0))
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    # A sweep only once the table has doubled since the last (at least 64 new sessions): the
    # work of all sweeps together grows with the number of sessions, not with its square.
    assert manager.reads <= 2000 // 64 + 1
    assert len(sessions._admissions) <= 64  # ended ones were let go
    assert manager.discarded == ["s1999"]


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
