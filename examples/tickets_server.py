"""An MCP tool server whose tools each need a task token that grants them (svid.mcp).

SPIFFE_ENDPOINT_SOCKET=unix:///path/to/api.sock python examples/tickets_server.py 8000
"""

import sys

import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import MCPServer

import svid
import svid.mcp

source = svid.WorkloadApiSource().start()  # bundles and revocations from the local agent
source.require_ready(10)  # no bundles in 10 s: raises, saying why, and serves nothing
auth = svid.mcp.TaskAuth(source, audience="mcp-tickets")
server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)


@server.tool()
def read_ticket(ticket_id: str) -> str:
    """Low risk: one support ticket."""
    task = get_access_token().task  # the caller's svid.TaskClaims
    print(f"[tickets] read_ticket({ticket_id}) by task {task.task_id} for {task.on_behalf_of}")
    return f"ticket {ticket_id}: the printer on floor 3 is on fire"


@server.tool()
def export_customer_data() -> str:
    """High risk: every customer's records."""
    return "name,email\nAda,ada@example.com\n"


uvicorn.run(auth.protect(server), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
