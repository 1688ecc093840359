"""The server's /metrics and /healthz endpoint: what it says of clients that reset their
connections (a probe that gave up, a scanner), and what an SRE alerts on."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import urllib.request
from collections.abc import Iterator

import pytest
from cryptography import x509

from svid._metrics_http import MAX_CONNECTIONS
from svid._proto import admin_pb2, common_pb2
from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess, make_server
from tests.tmpdirs import short_tmpdir
from tests.waits import wait_for

RESETS = 20


@pytest.fixture
def server_with_metrics() -> Iterator[ServerProcess]:
    root = short_tmpdir()
    server = make_server(root, metrics_address="127.0.0.1:0").start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("Threads:"))
    return int(line.split()[1])


def test_connections_reset_by_their_clients_write_nothing_past_the_log(
    server_with_metrics: ServerProcess,
) -> None:
    """Fails on main: socketserver printed each reset connection's traceback (~18 lines) to
    stderr, in no log format, as fast as anyone reaching the port reset connections."""
    server = server_with_metrics
    assert server.proc is not None
    host, port = server.runtime["metrics_address"].rsplit(":", 1)
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as answer:
        assert answer.read() == b"ok\n"
    idle = _threads(server.proc.pid)
    for _ in range(RESETS):
        conn = socket.create_connection((host, int(port)), timeout=5)
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # a reset: the endpoint's read or write of it fails
    pid = server.proc.pid
    wait_for(lambda: _threads(pid) <= idle, 10, "the endpoint's connection threads to end")
    lines = server.logs().splitlines()
    assert not [line for line in lines if "Traceback" in line], lines
    for line in lines:
        json.loads(line)  # every line is the daemon's log (log_format json)
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5) as answer:
        assert answer.read() == b"ok\n"


def _metric(body: str, name: str) -> float:
    values = [float(line.split()[1]) for line in body.splitlines() if line.startswith(f"{name} ")]
    assert len(values) == 1, body
    return values[0]


def test_the_ca_and_server_svid_expiries_are_metrics(server_with_metrics: ServerProcess) -> None:
    """Fails on main: no metric said when the signing CA or the server's own SVID runs out, so
    a rotation or renewal stalled (failing and retrying) was seen only once they had."""
    server = server_with_metrics
    with urllib.request.urlopen(
        f"http://{server.runtime['metrics_address']}/metrics", timeout=5
    ) as answer:
        body = answer.read().decode()
    ca = x509.load_pem_x509_certificate(server.bundle_pem().encode())  # self-signed: the one
    assert _metric(body, "svid_server_x509_ca_expiry_timestamp_seconds") == (
        ca.not_valid_after_utc.timestamp()
    )
    host, _, port = server.runtime["attest_address"].rpartition(":")
    tls = ssl.create_default_context()
    tls.check_hostname = False
    tls.verify_mode = ssl.CERT_NONE  # only its certificate is wanted
    with tls.wrap_socket(socket.create_connection((host, int(port)), timeout=5)) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    served = x509.load_der_x509_certificate(der)
    assert _metric(body, "svid_server_svid_expiry_timestamp_seconds") == (
        served.not_valid_after_utc.timestamp()
    )


def test_idle_connections_past_the_cap_are_closed_at_once(
    server_with_metrics: ServerProcess,
) -> None:
    """Each connection held a thread and a descriptor of the server for up to 10 s, without a
    bound: anyone reaching the port took the descriptors the datastore and the agents' ports
    need (descriptor_budget.py's HEADROOM counts the metrics listener in 1,024)."""
    server = server_with_metrics
    assert server.proc is not None
    host, port = server.runtime["metrics_address"].rsplit(":", 1)
    pid = server.proc.pid
    idle = _threads(pid)
    held: list[socket.socket] = []
    try:
        # A few at a time, each seen accepted (a thread of its own): one still queued is no
        # test, and all must be held within the 10 s each may take over its request.
        while len(held) < MAX_CONNECTIONS:
            held += [socket.create_connection((host, int(port)), timeout=5) for _ in range(8)]
            want = idle + len(held)
            wait_for(lambda want=want: _threads(pid) >= want, 5, "a thread for each held")
        past = socket.create_connection((host, int(port)), timeout=5)
        with past:
            assert past.recv(1) == b""  # closed by the server, well before our timeout
    finally:
        for conn in held:
            conn.close()
    # The server frees each slot once its thread reads the close: a request made before then
    # is past the cap still, and closed at once (as a loaded machine showed). Half of them
    # ended leaves room, whatever other threads the server started meanwhile.
    room = idle + MAX_CONNECTIONS // 2
    wait_for(lambda: _threads(pid) <= room, 15, "the held connections' threads to end")
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=15) as answer:
        assert answer.read() == b"ok\n"


def _gc_pauses(server: ServerProcess, generation: int) -> tuple[float, float]:
    with urllib.request.urlopen(
        f"http://{server.runtime['metrics_address']}/metrics", timeout=5
    ) as answer:
        body = answer.read().decode()
    name, label = "svid_server_gc_pause_seconds", f'{{generation="{generation}"}}'
    return _metric(body, f"{name}_count{label}"), _metric(body, f"{name}_sum{label}")


def test_the_daemon_times_its_garbage_collections(server_with_metrics: ServerProcess) -> None:
    """`svid-server run` installs the GC pause recorder: the collections that entries kept in
    the server's view bring are counted (a recorder never installed exports zeros)."""
    server = server_with_metrics
    # ~1,000 entries a gen-0 collection (threshold 10,000): 4,000 leave no doubt.
    for start in range(0, 4000, 1000):
        entries = [
            common_pb2.Entry(
                spiffe_id=f"spiffe://{TRUST_DOMAIN}/gc/{n}",
                parent_id=f"spiffe://{TRUST_DOMAIN}/agent/gc",
                selectors=[common_pb2.Selector(type="unix", value=f"uid:{n}")],
            )
            for n in range(start, start + 1000)
        ]
        server.admin("BatchCreateEntry", admin_pb2.BatchCreateEntryRequest(entries=entries))
    count, seconds = _gc_pauses(server, 0)
    assert count > 0
    assert seconds > 0
