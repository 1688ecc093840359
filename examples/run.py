"""`make example`: a server and an agent in a scratch directory (agent_attestor.demo), the
entries and policy the example needs, then the example itself, each program a process of its own:

1. tickets_server.py, an MCP server whose tools need a task token granting them;
2. agent_runtime.py, an agent runtime that begins a task for one tool, calls two, ends the task;
3. orders_service.py and billing_client.py, two services on rotating mutual TLS, and the same
   client under another identity, which the orders service refuses.

Everything stops at the end, and on Ctrl-C.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

from agent_attestor.demo import TRUST_DOMAIN, Demo, fresh_root, supervise
from svid import WorkloadApiClient
from svid.workloadapi import WorkloadApiError

HERE = Path(__file__).resolve().parent
RUNTIME = f"spiffe://{TRUST_DOMAIN}/agents/support-bot"
TICKETS = f"spiffe://{TRUST_DOMAIN}/services/tickets"
ORDERS = f"spiffe://{TRUST_DOMAIN}/services/orders"
BILLING = f"spiffe://{TRUST_DOMAIN}/services/billing"
INTRUDER = f"spiffe://{TRUST_DOMAIN}/services/intruder"
SERVICE_SVID_TTL = 8  # seconds: the agent rotates these SVIDs during the example
START_TIMEOUT = 30.0
_relays: dict[int, threading.Thread] = {}

# The operator's policy: the shipped default, and one tool no agent may be granted.
POLICY = """
@id("no_customer_export_tool")
@reason("export_customer_data is not for agents")
forbid (
  principal,
  action == Action::"invoke_tool",
  resource == Tool::"mcp-tickets#export_customer_data"
);
"""


def main(root: Path | None = None) -> int:
    demo = Demo(fresh_root(root or Path.cwd() / ".example"), policy=policy())
    return supervise(demo, run, "make example")


def policy() -> str:
    """The shipped default policy and the example's own rule."""
    default = resources.files("server.policy").joinpath("default.cedar").read_text("utf-8")
    return default + POLICY


def run(demo: Demo) -> int:
    print("==> starting svid-server and svid-agent", flush=True)
    env = prepare(demo)
    servers: list[subprocess.Popen[bytes]] = []
    try:
        failed = _example(demo, env, servers)
    finally:
        _stop(servers)  # before the agent, so that they do not see it go
    if failed:
        print(f"\nmake example: unexpected outcome from {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"\n==> done (server and agent logs in {demo.root})", flush=True)
    return 0


def prepare(demo: Demo) -> dict[str, str]:
    """Boot the demo's server and agent, create the example's entries, wait until the agent
    serves them all; returns the environment for the example's processes."""
    parent = demo.boot()
    for spiffe_id in (RUNTIME, TICKETS, INTRUDER):
        demo.entry(spiffe_id, parent)
    for spiffe_id in (ORDERS, BILLING):
        demo.entry(spiffe_id, parent, "--x509-svid-ttl", str(SERVICE_SVID_TTL))
    api = f"unix://{demo.socket}"
    _wait_for_svids(api, {RUNTIME, TICKETS, ORDERS, BILLING, INTRUDER})
    return {**os.environ, "SPIFFE_ENDPOINT_SOCKET": api, "PYTHONUNBUFFERED": "1"}


def serve(
    demo: Demo, env: dict[str, str], script: str, stdout: Any = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start one of the example's servers on a free port; returns it once it accepts
    connections. Its output goes to ours, a line at a time, unless ``stdout`` is given."""
    port = _free_port()
    server = _start(demo, env, script, str(port), stdout=stdout)
    _wait_for_port(server, port)
    return server, port


def _example(demo: Demo, env: dict[str, str], servers: list[subprocess.Popen[bytes]]) -> list[str]:
    failed: list[str] = []

    print("\n==> an MCP server, and an agent runtime with a task for one of its tools", flush=True)
    tickets, port = serve(demo, env, "tickets_server.py")
    servers.append(tickets)
    if _run(demo, env, "agent_runtime.py", f"http://127.0.0.1:{port}/mcp") != 0:
        failed.append("the agent runtime")

    print("\n==> two services on mutual TLS, and a caller the server does not admit", flush=True)
    orders, port = serve(demo, env, "orders_service.py")
    servers.append(orders)
    url = f"https://127.0.0.1:{port}/orders"
    if _run(demo, env, "billing_client.py", url, BILLING, "3") != 0:
        failed.append("the billing client")
    if _run(demo, env, "billing_client.py", url, INTRUDER) == 0:
        failed.append("the orders service (it admitted the intruder)")
    return failed


def _start(
    demo: Demo, env: dict[str, str], script: str, *args: str, stdout: Any = None
) -> subprocess.Popen[bytes]:
    argv = [sys.executable, str(HERE / script), *args]
    proc = demo.spawn(argv, stdout=stdout or subprocess.PIPE, env=env)
    if stdout is None:
        relay = threading.Thread(target=_relay, args=(proc,), daemon=True)
        relay.start()
        _relays[proc.pid] = relay
    return proc


def _relay(proc: subprocess.Popen[bytes]) -> None:
    """Copy a child's output to ours a whole line at a time, so that lines do not interleave."""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()


def _run(demo: Demo, env: dict[str, str], script: str, *args: str) -> int:
    proc = _start(demo, env, script, *args)
    code = proc.wait(START_TIMEOUT)
    _relays.pop(proc.pid).join(5)  # its last lines before what follows
    return code


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_for_svids(api: str, wanted: set[str]) -> None:
    """Until the agent serves this user every identity the example uses."""
    deadline = time.monotonic() + START_TIMEOUT
    with WorkloadApiClient(api) as client:
        while time.monotonic() < deadline:
            try:
                if wanted <= {str(s.spiffe_id) for s in client.fetch_x509_svids()}:
                    return
            except WorkloadApiError:
                pass
            time.sleep(0.1)
    raise RuntimeError("timed out waiting for the agent to serve the example's SVIDs")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(server: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"a server exited early (code {server.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for 127.0.0.1:{port}")


if __name__ == "__main__":
    sys.exit(main())
