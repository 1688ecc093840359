"""MCP end to end with svidd as the OAuth authorization server, every part a real process:
`svid-server run` with its OAuth listener, `svid-agent run`, the example MCP server
(examples/oauth_tickets_server.py under uvicorn) naming svidd in its RFC 9728 metadata, and this
test as the agent runtime: the MCP SDK's own RFC 7523 JWT-bearer client provider, fed the task's
JWT-SVID, gets a task-scoped token and calls the one tool the task was granted, not the other.
Then the task ends and the server refuses the token. An MCP server served in this process
through AccessTokenAuth.protect ends an exchanged token's open stream and session with its task.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError

import svid.mcp
from svid import AccessTokenVerifier, RevokedError, WorkloadApiSource
from svid.tasks import AsyncTaskClient, Task, TaskClient
from tests.e2e.agent_process import AgentProcess, agent_stack, create_entry
from tests.e2e.conftest import TRUST_DOMAIN, make_server, short_tmpdir, wait_for
from tests.ports import free_port
from tests.svid.adapter_world import open_sse_stream, serving

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
RUNTIME = f"spiffe://{TRUST_DOMAIN}/agents/support-bot"


@dataclass
class Stack:
    agent: AgentProcess
    issuer: str
    mcp_url: str
    # A second resource of the authorization server: what the server this test serves in its
    # own process names (the tokens' audience; where uvicorn listens is another port).
    protected_url: str

    @property
    def socket(self) -> str:
        return f"unix://{self.agent.socket_path}"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with oauth_mcp_stack() as running:
        yield running


@contextlib.contextmanager
def oauth_mcp_stack() -> Iterator[Stack]:
    """svid-server (OAuth on a loopback HTTP issuer), svid-agent and the example MCP server,
    each a process; the runtime's entry made. Also bench/test_bench_oauth.py's stack."""
    root = short_tmpdir("svo")
    as_port, mcp_port = free_port(), free_port()
    # Plain HTTP: allowed for a loopback issuer (tests/server/oauth covers HTTPS).
    issuer = f"http://127.0.0.1:{as_port}"
    mcp_url = f"http://127.0.0.1:{mcp_port}/mcp"
    protected_url = f"http://127.0.0.1:{free_port()}/mcp"
    server = make_server(
        root,
        oidc_issuer=issuer,
        oauth_bind_address=f"127.0.0.1:{as_port}",
        oauth_resources=[mcp_url, protected_url],
    ).start()
    with agent_stack(root, server) as agent:
        create_entry(server, RUNTIME, agent.agent_id())
        agent.wait_svid(RUNTIME)
        env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix://{agent.socket_path}"}
        log = (root / "mcp.log").open("ab")
        proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "examples" / "oauth_tickets_server.py"),
                str(mcp_port),
                issuer,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        try:
            wait_for(lambda: _listening(mcp_port), 30, "the MCP server")
            yield Stack(agent, issuer, mcp_url, protected_url)
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
            print("---- mcp log ----\n" + (root / "mcp.log").read_text(errors="replace")[-4000:])


def test_the_mcp_server_names_svidd_as_its_authorization_server(stack: Stack) -> None:
    base = stack.mcp_url.rsplit("/mcp", 1)[0]
    reply = httpx.get(base + "/.well-known/oauth-protected-resource/mcp", timeout=10)
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert [a.rstrip("/") for a in doc["authorization_servers"]] == [stack.issuer]
    assert doc["resource"].rstrip("/") == stack.mcp_url
    unauthenticated = httpx.post(stack.mcp_url, json={}, timeout=10)
    assert unauthenticated.status_code == 401
    # Served through AccessTokenAuth.protect: its refusal names the document, as the SDK's does.
    metadata = f'resource_metadata="{base}/.well-known/oauth-protected-resource/mcp"'
    assert metadata in unauthenticated.headers["www-authenticate"]


def _leaves(exc: BaseException) -> str:
    """What an exception group holds, its leaves' words one after another."""
    if isinstance(exc, BaseExceptionGroup):
        return " | ".join(_leaves(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


async def _session_calls(stack: Stack) -> tuple[str, str, str, str, int]:
    async with AsyncTaskClient(stack.socket) as tasks:
        task = await tasks.begin(
            actions=["read"],
            # The authorization server is where the task's JWT-SVID goes.
            resources=[stack.issuer],
            tools={stack.mcp_url: ["read_ticket"]},
            on_behalf_of="user:alice",
            ttl=120,
            spiffe_id=RUNTIME,
        )

        storage = svid.mcp._MemoryTokens()  # oauth_auth's own, held here to read the token
        # The SDK's own RFC 7523 client provider, fed a JWT-SVID of the task minted for each
        # token request.
        provider = svid.mcp.oauth_auth(task, stack.mcp_url, issuer=stack.issuer, storage=storage)
        async with (
            httpx2.AsyncClient(auth=provider, timeout=20) as http,
            streamable_http_client(stack.mcp_url, http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            allowed = await session.call_tool("read_ticket", {"ticket_id": "T-1"})
        assert storage.tokens is not None
        token = storage.tokens.access_token
        text = allowed.content[0].text if not allowed.is_error else "error"  # type: ignore[union-attr]
        # The tool the task was not granted: 403 insufficient_scope, before the tool runs. The
        # SDK then asks svidd for that scope with the task's JWT-SVID it already traded (the
        # task hands out the same one), and is refused invalid_scope, naming it: the call fails
        # saying so (not as a replay).
        other = httpx.post(
            stack.mcp_url,
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": "export_customer_data", "arguments": {}},
            },
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json, text/event-stream",
            },
            timeout=10,
        )
        challenge = other.headers.get("www-authenticate", "") if other.status_code == 403 else ""
        sdk_refusal = ""
        try:
            async with (
                httpx2.AsyncClient(auth=provider, timeout=20) as http,
                streamable_http_client(stack.mcp_url, http_client=http) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                await session.call_tool("export_customer_data", {})
        except Exception as exc:  # the SDK's, in its task groups
            sdk_refusal = _leaves(exc)
        await task.end()
        started = time.monotonic()
        while True:
            reply = httpx.post(
                stack.mcp_url,
                json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                headers={
                    "Authorization": f"Bearer {token}",
                    "Accept": "application/json, text/event-stream",
                },
                timeout=10,
            )
            if reply.status_code == 401 or time.monotonic() - started > 10:
                break
            await asyncio.sleep(0.01)
        return text, challenge, sdk_refusal, str(storage.tokens.scope), reply.status_code


def test_mcp_sdk_client_gets_a_task_scoped_token_and_calls_one_tool_not_the_other(
    stack: Stack,
) -> None:
    text, challenge, sdk_refusal, scope, after_end = asyncio.run(_session_calls(stack))
    assert "printer" in text
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="tool:export_customer_data"' in challenge
    assert "resource_metadata=" in challenge
    assert "invalid_scope" in sdk_refusal, sdk_refusal
    assert "tool:export_customer_data" in sdk_refusal
    assert "tool:read_ticket" in scope.split()
    assert "tool:export_customer_data" not in scope.split()
    assert after_end == 401


def test_svid_access_token_verifier_fed_by_the_agent_refuses_the_token_once_its_task_ends(
    stack: Stack,
) -> None:
    with WorkloadApiSource(stack.socket) as source, TaskClient(stack.socket) as tasks:
        assert source.wait_ready(10)
        verifier = source.access_token_verifier(stack.issuer, stack.mcp_url)
        task = tasks.begin(
            actions=["read"],
            resources=[stack.issuer],
            tools={stack.mcp_url: ["read_ticket"]},
            ttl=120,
            spiffe_id=RUNTIME,
        )
        reply = httpx.post(
            stack.issuer + "/token",
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": task.jwt(stack.issuer),
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "resource": stack.mcp_url,
            },
            timeout=10,
        )
        assert reply.status_code == 200, reply.text
        token = reply.json()["access_token"]
        verified = verifier.verify(token)
        assert verified.act_chain == (str(task.spiffe_id),)
        assert verified.grants_tool("read_ticket")
        task.end()
        wait_for(lambda: _refused(verifier, token), 10, "the ended task's token refused")


def _refused(verifier: AccessTokenVerifier, token: str) -> bool:
    try:
        verifier.verify(token)
    except RevokedError:
        return True
    return False


def _exchanged(stack: Stack, task_jwt: str, resource: str) -> str:
    """The access token svidd's token endpoint exchanges a task's JWT-SVID for (RFC 8693)."""
    reply = httpx.post(
        stack.issuer + "/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": task_jwt,
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "resource": resource,
        },
        timeout=10,
    )
    assert reply.status_code == 200, reply.text
    return str(reply.json()["access_token"])


def test_an_exchanged_token_s_open_stream_and_session_end_when_its_task_ends(
    stack: Stack,
) -> None:
    """The server ends the task; the agent streams the revocation of its credentials (the
    exchanged token among them) to this process's source; AccessTokenAuth.protect closes the
    open SSE stream and ends the MCP sessions the token opened, not only its next request."""
    with WorkloadApiSource(stack.socket) as source, TaskClient(stack.socket) as tasks:
        assert source.wait_ready(10)
        auth = svid.mcp.AccessTokenAuth(source, issuer=stack.issuer, resource=stack.protected_url)
        server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)

        @server.tool()
        def read_ticket(ticket_id: str) -> str:
            return f"ticket {ticket_id}: printer on fire"

        app = auth.protect(server)
        sessions = server.session_manager._server_instances  # the SDK's own table
        task = tasks.begin(
            actions=["read"],
            resources=[stack.issuer],
            tools={stack.protected_url: ["read_ticket"]},
            ttl=120,
            spiffe_id=RUNTIME,
        )
        token = _exchanged(stack, task.jwt(stack.issuer), stack.protected_url)

        async def scenario(url: str) -> tuple[str, float, float]:
            headers = {"Authorization": f"Bearer {token}"}
            async with (
                httpx.AsyncClient(timeout=10) as raw,
                httpx2.AsyncClient(headers=headers, timeout=10) as http,
                streamable_http_client(f"{url}/mcp", http_client=http) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                called = await session.call_tool("read_ticket", {"ticket_id": "T-1"})
                text = called.content[0].text  # type: ignore[union-attr]
                _sid, stream = await open_sse_stream(raw, url, token)
                async with stream as response:
                    assert response.status_code == 200
                    assert len(sessions) == 2  # the SDK client's and the one opened by hand
                    ended_at = time.monotonic()
                    await asyncio.to_thread(task.end)
                    async for _ in response.aiter_bytes():  # until the server closes it
                        pass
                    closed = time.monotonic() - ended_at
                while sessions and time.monotonic() - ended_at < 10:
                    await asyncio.sleep(0.01)
                gone = time.monotonic() - ended_at
                assert not sessions
                with pytest.raises((MCPError, ExceptionGroup, httpx2.HTTPError)):
                    await asyncio.wait_for(session.call_tool("read_ticket", {"ticket_id": "2"}), 5)
            return text, closed, gone

        with serving(app) as url:
            text, closed, gone = asyncio.run(scenario(url))
    assert "printer" in text
    assert closed < 1, f"the SSE stream was still open {closed:.2f} s after the task ended"
    assert gone < 1, f"the sessions were still open {gone:.2f} s after the task ended"


def _bearer_grant(stack: Stack, task_jwt: str, resource: str) -> httpx.Response:
    """The SDK client's own token request (RFC 7523 JWT-bearer grant) for `resource`."""
    return httpx.post(
        stack.issuer + "/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "assertion": task_jwt,
            "resource": resource,
        },
        timeout=10,
    )


async def _handed_out(task: Any, audience: str) -> str:
    """The task JWT-SVID `task` (an AsyncTask or a Task) hands out now."""
    if isinstance(task, Task):
        return await asyncio.to_thread(task.jwt, audience)
    return str(await task.jwt(audience))


async def _step_up(stack: Stack, task: Any) -> tuple[str, str, str, list[httpx.Response]]:
    """A client narrowed to read_ticket calls export_customer_data, which the task was granted
    too: 403 insufficient_scope, a step-up, the call made. Returns both tools' answers, the
    token's scope after, and svidd's answers to the JWT-SVIDs the client traded, presented
    again (read back from the task: the first its cached one, then the one it minted anew)."""
    spent = [await _handed_out(task, stack.issuer)]
    storage = svid.mcp._MemoryTokens()
    provider = svid.mcp.oauth_auth(
        task, stack.mcp_url, issuer=stack.issuer, scope="tool:read_ticket", storage=storage
    )
    async with (
        httpx2.AsyncClient(auth=provider, timeout=20) as http,
        streamable_http_client(stack.mcp_url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        read_one = await session.call_tool("read_ticket", {"ticket_id": "T-1"})
        assert storage.tokens is not None
        assert "tool:export_customer_data" not in str(storage.tokens.scope).split()
        exported = await session.call_tool("export_customer_data", {})
    # The step-up's JWT-SVID, minted for it, is now the one the task hands out.
    spent.append(await _handed_out(task, stack.issuer))
    assert spent[0] != spent[1]
    assert storage.tokens is not None
    # While the task is active: a refusal is then for the replay, not for its end.
    replays = [await asyncio.to_thread(_bearer_grant, stack, jwt, stack.mcp_url) for jwt in spent]

    def text(result: Any) -> str:
        return "error" if result.is_error else str(result.content[0].text)

    return text(read_one), text(exported), str(storage.tokens.scope), replays


@pytest.mark.parametrize("sync", [False, True], ids=["async_task", "task"])
def test_a_client_narrowed_to_one_tool_steps_up_to_another_its_task_was_granted(
    stack: Stack, sync: bool
) -> None:
    """svidd takes a task JWT-SVID for one token per resource, and the task hands out the one
    it traded until it renews it: the step-up presents one the agent mints anew. Replay
    protection holds: each JWT-SVID the client traded is refused when presented again."""
    intent: dict[str, Any] = {
        "actions": ["read"],
        "resources": [stack.issuer],
        "tools": {stack.mcp_url: ["read_ticket", "export_customer_data"]},
        "ttl": 120,
        "spiffe_id": RUNTIME,
    }

    async def scenario() -> tuple[str, str, str, list[httpx.Response]]:
        if sync:
            with TaskClient(stack.socket) as tasks, tasks.begin(**intent) as task:
                return await _step_up(stack, task)
        async with AsyncTaskClient(stack.socket) as atasks, atasks.begin(**intent) as atask:
            return await _step_up(stack, atask)

    read_one, exported, scope, replays = asyncio.run(scenario())
    assert "printer" in read_one
    assert "Ada" in exported, exported
    assert {"tool:read_ticket", "tool:export_customer_data"} <= set(scope.split())
    for replayed in replays:
        assert replayed.status_code == 400, replayed.text
        assert replayed.json()["error"] == "invalid_grant", replayed.text
        assert "(replay)" in replayed.json()["error_description"], replayed.text
