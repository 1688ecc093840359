"""An MCP tool server that names svidd as its OAuth authorization server (RFC 9728) and takes
svidd's access tokens (RFC 9068 `at+jwt`): any MCP client that speaks OAuth can call it.

SPIFFE_ENDPOINT_SOCKET=unix:///path/to/api.sock \
    python examples/oauth_tickets_server.py 8000 https://svidd.example:8443

The MCP SDK publishes /.well-known/oauth-protected-resource/mcp naming the issuer; a client gets
a token there (the RFC 7523 JWT-bearer grant with its task's JWT-SVID) for this server's URL.
Tokens are checked with the trust domain's JWT keys and the revocations the local agent streams
(svid.WorkloadApiSource): a token of an ended task is refused as soon as the agent hears of it.
Each tool needs `tool:<name>` in the token's scope.
"""

import sys

import jwt
import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

import svid

ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 - a media type
TOOL_SCOPE = "tool:"


class SviddAccessTokens:
    """The SDK's TokenVerifier for svidd access tokens: signature by a key of the issuer's trust
    domain (from the agent), `typ`, `iss`, `aud` = this server, `exp`, and `jti` not revoked."""

    def __init__(self, source: svid.WorkloadApiSource, issuer: str, resource: str) -> None:
        self._source = source
        self._issuer = issuer
        self._resource = resource

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            header = jwt.get_unverified_header(token)
            if header.get("typ") != ACCESS_TOKEN_TYP:
                return None
            key = self._key(str(header.get("kid", "")))
            if key is None:
                return None
            claims = jwt.decode(
                token,
                key,
                algorithms=sorted(svid.ALLOWED_ALGS),
                audience=self._resource,
                issuer=self._issuer,
                options={"require": ["exp", "iat", "jti", "sub"]},
            )
        except jwt.PyJWTError:
            return None
        if self._source.revocations.is_jti_revoked(str(claims["jti"])):
            return None
        return AccessToken(
            token=token,
            client_id=str(claims.get("client_id", claims["sub"])),
            scopes=str(claims.get("scope", "")).split(),
            expires_at=int(claims["exp"]),
            resource=self._resource,
            subject=str(claims["sub"]),
            claims={"act": claims.get("act"), "txn": claims.get("txn")},
        )

    def _key(self, kid: str) -> object:
        for trust_domain in self._source.jwt_bundles:
            bundle = self._source.jwt_bundle_for(trust_domain)
            key = bundle.get(kid) if bundle is not None else None
            if key is not None:
                return key
        return None


def granted(tool: str) -> None:
    """Refuse the call unless the caller's token grants `tool`."""
    token = get_access_token()
    if token is None or TOOL_SCOPE + tool not in token.scopes:
        raise ToolError(f"the token does not grant {tool}")


def build(source: svid.WorkloadApiSource, port: int, issuer: str) -> MCPServer:
    url = f"http://127.0.0.1:{port}/mcp"
    server = MCPServer(
        "tickets",
        token_verifier=SviddAccessTokens(source, issuer, url),
        auth=AuthSettings(
            issuer_url=issuer,  # type: ignore[arg-type]  # pydantic parses it
            resource_server_url=url,  # type: ignore[arg-type]
            validate_token_resource=True,
        ),
    )

    @server.tool()
    def read_ticket(ticket_id: str) -> str:
        """Low risk: one support ticket."""
        granted("read_ticket")
        who = get_access_token()
        print(f"[tickets] read_ticket({ticket_id}) for {who.subject if who else '?'}", flush=True)
        return f"ticket {ticket_id}: the printer on floor 3 is on fire"

    @server.tool()
    def export_customer_data() -> str:
        """High risk: every customer's records."""
        granted("export_customer_data")
        return "name,email\nAda,ada@example.com\n"

    return server


if __name__ == "__main__":
    port, issuer = int(sys.argv[1]), sys.argv[2]
    source = svid.WorkloadApiSource().start()  # bundles and revocations from the local agent
    source.wait_ready(10)
    app = build(source, port, issuer).streamable_http_app()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
