"""An agent runtime: begins a task that may call one tool of an MCP server, calls two tools with
the task's token (svid.mcp.http_client), asks for the scope the server names when it refuses,
ends the task, and sees the task's token refused from then on.

    SPIFFE_ENDPOINT_SOCKET=unix:///path/to/api.sock python examples/agent_runtime.py \\
        http://127.0.0.1:8000/mcp
"""

import asyncio
import re
import sys

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

import svid.mcp
from svid.tasks import AsyncTaskClient, TaskDeniedError, tools_from_scope

RUNTIME = "spiffe://example.org/agents/support-bot"  # this process's workload identity
TICKETS = "mcp-tickets"  # the MCP server's audience


async def main(url: str) -> None:
    challenges: list[str] = []  # WWW-Authenticate of each refusal: what to ask for

    async def note_refusal(response: httpx2.Response) -> None:
        if response.status_code in (401, 403):
            challenges.append(response.headers.get("www-authenticate", ""))

    async with (
        AsyncTaskClient() as client,  # $SPIFFE_ENDPOINT_SOCKET
        client.begin(
            tools={TICKETS: ["read_ticket"]},
            on_behalf_of="user:alice",
            goal="answer ticket T-1001",
            ttl=300,
            spiffe_id=RUNTIME,
        ) as task,  # ended on leaving the block
    ):
        print(f"task {task.task_id}: {task.decision}, tools {list(task.tools)}")
        old_token = await task.jwt(TICKETS)  # kept only to show that it is refused below
        hooks = {"response": [note_refusal]}
        async with (
            svid.mcp.http_client(task, TICKETS, event_hooks=hooks) as http,
            streamable_http_client(url, http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            result = await session.call_tool("read_ticket", {"ticket_id": "T-1001"})
            print(f"read_ticket -> {result.content[0].text}")
            try:
                await session.call_tool("export_customer_data", {})
            except MCPError:
                print(f"export_customer_data -> 403 {challenges[-1]}")
        # Ask for what the server named: a short elevated step, decided by policy.
        wanted = re.search(r'scope="([^"]*)"', challenges[-1])
        tools = tools_from_scope(wanted.group(1) if wanted else "")
        try:
            async with task.elevate(tools={TICKETS: tools}, ttl=30):
                print(f"elevated step granted for {tools}")
        except TaskDeniedError as denied:
            print(f"asked for {list(tools)} -> {denied.reason}")
    print(f"task {task.task_id} ended")
    print(f"its token now -> {await refusal(url, old_token)}")


async def refusal(url: str, token: str) -> str:
    """What the server answers a tool call with ``token``; revocation takes milliseconds to
    reach it, so a few tries."""
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "read_ticket"}}
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"}
    async with httpx2.AsyncClient() as http:
        for _ in range(50):
            reply = await http.post(url, json=call, headers=headers)
            if reply.status_code == 401:
                break
            await asyncio.sleep(0.1)
    return f"{reply.status_code} {reply.headers.get('www-authenticate', '')}"


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
