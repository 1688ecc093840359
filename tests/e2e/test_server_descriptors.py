"""The server's file descriptors: the limit it runs with, and who may hold them."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from server.descriptor_budget import GRPC_MIN_CONNECTIONS, HEADROOM
from tests.e2e.agent_process import AgentProcess, new_token
from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir
from tests.ports import free_port
from tests.waits import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmpdir("sfd")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit for pid {pid}")


def _started_line(log: str) -> dict[str, object]:
    for line in log.splitlines():
        if '"server started"' in line:
            record: dict[str, object] = json.loads(line)
            return record
    raise AssertionError(f"no start-up line in the log:\n{log[-4000:]}")


def test_the_server_raises_its_soft_descriptor_limit_to_the_hard_one_and_logs_it(
    root: Path,
) -> None:
    server = make_server(root)
    server.descriptor_limit = (256, 4096)
    server.start()
    try:
        assert server.proc is not None
        assert _open_files_limit(server.proc.pid) == (4096, 4096)
        started = _started_line(server.logs())
        assert started["descriptor_limit"] == 4096
        # No HTTP listener: the agents' ports take what the headroom leaves.
        assert started["grpc_max_connections"] == 4096 - HEADROOM
        assert _short_line(server.logs()) is None
    finally:
        server.stop()


def _short_line(log: str) -> dict[str, object] | None:
    for line in log.splitlines():
        if "lower http_max_connections or grpc_max_connections" in line:
            record: dict[str, object] = json.loads(line)
            return record
    return None


def test_caps_past_the_descriptor_limit_are_warned_of_at_start(root: Path) -> None:
    server = make_server(
        root,
        oidc_issuer=f"http://127.0.0.1:{free_port()}",
        oauth_bind_address="127.0.0.1:0",
        bundle_endpoint_address="127.0.0.1:0",
        http_max_connections=1000,
    )
    server.descriptor_limit = (2048, 2048)  # not 2 x 1000 and the headroom
    server.start()
    try:
        warning = _short_line(server.logs())
        assert warning is not None, server.logs()[-4000:]
        assert warning["descriptor_limit"] == 2048
        assert warning["http_max_connections"] == 1000
        assert warning["listeners"] == "oauth_bind_address,bundle_endpoint_address"
        assert warning["needed"] == 2000 + GRPC_MIN_CONNECTIONS + HEADROOM
        assert warning["grpc_max_connections"] == GRPC_MIN_CONNECTIONS  # nothing is left
        server.cli("bundle", "show")  # a warning, not a refusal: it serves
    finally:
        server.stop()


SERVER_FDS = 400
FLOOD = 600  # idle connections from one address: more than the server has descriptors
PER_HOST = 16
WAIT = 10.0  # the old lockout lasted until the held connections timed out (30 s)
FLOOD_CONNECT = 5.0


def _flood(held: ExitStack, host: str, port: int) -> int:
    """Open up to FLOOD silent connections to ``host:port``, held until ``held`` closes; how
    many the server took (accepted, or left in its backlog)."""
    opened = 0
    for _ in range(FLOOD):
        conn = held.enter_context(socket.socket())
        conn.settimeout(FLOOD_CONNECT)
        try:
            conn.connect((host, port))
        except OSError:
            break  # the server stopped accepting and its backlog is full
        opened += 1
    return opened


def _get(url: str, source: str) -> bytes:
    """GET `url` from the local address `source`; TLS unverified (what is checked is that the
    server answers at all, not who it is)."""
    transport = httpx.HTTPTransport(local_address=source, verify=False)
    with httpx.Client(transport=transport, timeout=WAIT) as client:
        reply = client.get(url)
    assert reply.status_code == 200, reply.text
    return reply.content


def _metric(server: ServerProcess, name: bytes) -> float:
    metrics = _get(f"http://{server.runtime['metrics_address']}/metrics", "127.0.0.1")
    found = re.search(rb"^" + name + rb" (\S+)$", metrics, re.MULTILINE)
    assert found is not None, metrics.decode()
    return float(found.group(1))


def test_idle_connections_from_one_address_leave_the_server_serving_others(root: Path) -> None:
    oauth_port, bundle_port = free_port(), free_port()
    issuer = f"http://127.0.0.1:{oauth_port}"
    server = make_server(
        root,
        oidc_issuer=issuer,
        oauth_bind_address=f"127.0.0.1:{oauth_port}",
        bundle_endpoint_address=f"127.0.0.1:{bundle_port}",
        metrics_address="127.0.0.1:0",
        http_max_connections=64,
        http_max_connections_per_host=PER_HOST,
    )
    server.descriptor_limit = (SERVER_FDS, SERVER_FDS)
    server.start()
    try:
        with ExitStack() as flood:
            opened = _flood(flood, "127.0.0.1", oauth_port)
            assert opened > SERVER_FDS  # the flood did get in
            # Those the cap let in are open, and shown (the metrics listener is another one).
            shown = _metric(server, rb'svid_server_http_connections_open\{listener="oauth"\}')
            assert shown == PER_HOST
            # Another client, another address: the discovery document, the bundle endpoint
            # and the admin API (the same process's descriptors) all still answer.
            document = json.loads(_get(issuer + "/.well-known/openid-configuration", "127.0.0.2"))
            assert document["issuer"] == issuer
            bundle = json.loads(_get(f"https://127.0.0.1:{bundle_port}/", "127.0.0.2"))
            assert bundle["keys"]
            server.cli("bundle", "show")
        refused = _metric(
            server,
            rb'svid_server_http_connections_refused_total\{listener="oauth",reason="per_host"\}',
        )
        assert refused == opened - PER_HOST
    finally:
        server.stop()


GRPC_CAP = 64
AGENT_WAIT = 30.0  # the server cuts silent connections after 10 s; before, after 120 s


def test_silent_connections_to_the_agents_ports_are_capped_and_cut(root: Path) -> None:
    """A flood of silent TCP connections to the attestation port: the server keeps descriptors
    for its other clients (the admin API answers), and an agent starting during the flood
    attests once the server has cut the silent ones at its TLS handshake timeout."""
    server = make_server(root, grpc_max_connections=GRPC_CAP)
    server.descriptor_limit = (SERVER_FDS, SERVER_FDS)
    server.start()
    host, _, port = server.runtime["attest_address"].rpartition(":")
    agent = AgentProcess(root, server, join_token=new_token(server))
    agent.bundle_file()  # read before the flood: the test's own CLI calls are not the point
    try:
        with ExitStack() as flood:
            opened = _flood(flood, host, int(port))
            assert opened > SERVER_FDS  # the flood did get in
            server.cli("bundle", "show")  # the same process's admin API still answers
            started = time.monotonic()
            agent.start()
            agent.agent_id(timeout=AGENT_WAIT)  # the flood still held, its sockets dead
            # Reported, not asserted: how long the agent waited for the cut (about 10 s).
            print(f"agent attested {time.monotonic() - started:.1f} s into the flood")
    finally:
        agent.stop()
        server.stop()


def _still_open(held: list[socket.socket]) -> int:
    """How many of `held` the server has not closed (a closed one reads EOF at once)."""
    still = 0
    for sock in held:
        sock.setblocking(False)
        try:
            still += sock.recv(1) != b""
        except BlockingIOError:
            still += 1  # nothing to read: open, waiting for our TLS handshake
        except OSError:
            pass  # reset by the server
    return still


def test_the_agents_two_ports_hold_no_more_connections_together_than_the_cap(
    root: Path,
) -> None:
    """gRPC counts its connection cap per listening port: the server splits
    grpc_max_connections between the node API port and the attestation port, so the two
    together never hold more descriptors than the descriptor budget set aside for them."""
    cap = 4
    server = make_server(root, grpc_max_connections=cap)
    server.start()
    try:
        with ExitStack() as stack:
            held = []
            for name in ("node_address", "attest_address"):
                host, _, port = server.runtime[name].rpartition(":")
                for _ in range(cap):
                    sock = stack.enter_context(socket.create_connection((host, int(port)), 5))
                    held.append(sock)
            # The ones past the cap are closed at once, the rest wait 10 s for a handshake:
            # polled, not slept on, as a loaded machine's server takes a while to close them
            # (a second's sleep found them open still), and well within the 10 s.
            wait_for(lambda: _still_open(held) <= cap, 6, "the connections past the cap closed")
            assert _still_open(held) == cap
    finally:
        server.stop()
