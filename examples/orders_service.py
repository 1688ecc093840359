"""A service that answers only the billing service, over mutual TLS (svid.tls): it presents its
own SVID, always the newest one, and checks the caller's SPIFFE ID in the handshake.

    SPIFFE_ENDPOINT_SOCKET=unix:///path/to/api.sock python examples/orders_service.py 8443
"""

import http.server
import sys

import svid
import svid.tls

ME = "spiffe://example.org/services/orders"  # which of this host's identities to present
BILLING = "spiffe://example.org/services/billing"  # the only caller admitted


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # runs only for an authorised peer
        peer = svid.tls.peer_of(self.connection)
        body = f"3 open orders for {peer.spiffe_id} (its certificate {peer.serial[:8]})".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: tuple[str, int]) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, svid.tls.PeerRefusedError):  # the handshake refused the caller
            print(f"[orders] refused a caller: {error}")


with svid.X509Source() as source:  # $SPIFFE_ENDPOINT_SOCKET; waits for the first SVID
    ctx = svid.tls.server_context(source, authorize=BILLING, spiffe_id=ME)
    server = Server(("127.0.0.1", int(sys.argv[1])), Handler)
    server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    server.serve_forever()
