"""The billing service calling the orders service over mutual TLS (svid.httpx.mtls_client): it
presents its own SVID, rotated by the agent without a restart, and talks only to the orders
service's SPIFFE ID.

    SPIFFE_ENDPOINT_SOCKET=unix:///path/to/api.sock python examples/billing_client.py \\
        https://127.0.0.1:8443/ [MY_SPIFFE_ID] [CALLS]
"""

import sys
import time

import httpx

import svid
import svid.httpx

ORDERS = "spiffe://example.org/services/orders"  # the only server this client talks to
url = sys.argv[1]
me = sys.argv[2] if len(sys.argv) > 2 else "spiffe://example.org/services/billing"
calls = int(sys.argv[3]) if len(sys.argv) > 3 else 1

with (
    svid.X509Source() as source,  # $SPIFFE_ENDPOINT_SOCKET; waits for the first SVID
    svid.httpx.mtls_client(source, authorize=ORDERS, spiffe_id=me) as client,
):
    for call in range(calls):
        if call:
            time.sleep(3)  # long enough for the agent to rotate our SVID in between
        try:
            print(f"[{me.rsplit('/', 1)[-1]}] {client.get(url).text}", flush=True)
        except httpx.HTTPError as exc:
            print(f"[{me.rsplit('/', 1)[-1]}] refused by the server ({type(exc).__name__})")
            sys.exit(1)
