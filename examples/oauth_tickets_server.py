"""An MCP tool server that names svidd as its OAuth authorization server (RFC 9728) and takes
svidd's access tokens (RFC 9068 `at+jwt`): any MCP client that speaks OAuth can call it.

SPIFFE_ENDPOINT_SOCKET=unix:///path/to/api.sock \
    python examples/oauth_tickets_server.py 8000 https://svidd.example:8443

The MCP SDK publishes /.well-known/oauth-protected-resource/mcp naming the issuer; a client gets
a token there (the RFC 7523 JWT-bearer grant with its task's JWT-SVID) for this server's URL.
Tokens are checked by svid.mcp.AccessTokenAuth (svid.AccessTokenVerifier) with the trust
domain's JWT keys and the revocations the local agent streams (svid.WorkloadApiSource): a token
of an ended task is refused as soon as the agent hears of it, and (served through auth.protect)
its open SSE streams are closed and its MCP sessions ended then too.
Each tool needs `tool:<name>` (or `invoke_tool`) in the token's scope: auth.protect answers any
other call 403 insufficient_scope, naming the scope to ask svidd for.
"""

import sys

import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import MCPServer

import svid
import svid.asgi
import svid.mcp


def build(source: svid.WorkloadApiSource, port: int, issuer: str) -> svid.asgi.ASGIApp:
    url = f"http://127.0.0.1:{port}/mcp"
    auth = svid.mcp.AccessTokenAuth(source, issuer=issuer, resource=url)
    server = MCPServer("tickets", token_verifier=auth, auth=auth.settings)

    @server.tool()
    def read_ticket(ticket_id: str) -> str:
        """Low risk: one support ticket."""
        who = get_access_token()
        print(f"[tickets] read_ticket({ticket_id}) for {who.subject if who else '?'}", flush=True)
        return f"ticket {ticket_id}: the printer on floor 3 is on fire"

    @server.tool()
    def export_customer_data() -> str:
        """High risk: every customer's records."""
        return "name,email\nAda,ada@example.com\n"

    return auth.protect(server)


if __name__ == "__main__":
    port, issuer = int(sys.argv[1]), sys.argv[2]
    source = svid.WorkloadApiSource().start()  # bundles and revocations from the local agent
    source.require_ready(10)  # no bundles in 10 s: raises, saying why, and serves nothing
    app = build(source, port, issuer)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
