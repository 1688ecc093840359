"""The README's svid.tls blocks, run as written (only the port changes) in their own processes,
each workload with its own real Workload API (a fake agent serving real certificates), and held
to the goal of issue 14: an mTLS server or client with rotation and ID authorisation in <= 5 lines.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from svid import tls
from tests.ports import free_port
from tests.svid.tls_pki import make_pki, plain_context
from tests.svid.tls_world import (
    CLIENT,
    INTRUDER,
    SERVER,
    Workload,
    raw_request,
    sock_root,
    workload,
)

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- tests/svid/test_readme_tls.py runs this block: {} -->"
MAX_LINES = 5


def block(name: str) -> str:
    text = README.read_text()
    marker = MARKER.format(name)
    assert marker in text, f"README.md lost the block {marker}"
    found = re.search(r"```python\n(.*?)```", text[text.index(marker) :], re.DOTALL)
    assert found is not None
    return found.group(1)


def tls_lines(code: str) -> list[str]:
    """The lines that set up mTLS: from the source on, without blanks and comments (the
    application's handler and the imports are not TLS code)."""
    lines = code.splitlines()
    start = next(i for i, line in enumerate(lines) if "X509Source(" in line)
    return [line for line in lines[start:] if line.strip() and not line.strip().startswith("#")]


def run(code: str, agent: Workload, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": agent.agent.address}
    return subprocess.Popen(
        [sys.executable, "-c", code.replace("8443", str(port))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_listening(port: int, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server block exited: {proc.communicate()[1]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the server block never listened")


@pytest.fixture
def workloads() -> Iterator[tuple[Workload, Workload]]:
    pki = make_pki()
    with sock_root() as root, workload(pki, SERVER, root) as s, workload(pki, CLIENT, root) as c:
        yield s, c


@pytest.mark.parametrize("name", ["server", "client", "asyncio server"])
def test_the_readme_blocks_are_five_lines_or_fewer(name: str) -> None:
    lines = tls_lines(block(name))
    assert len(lines) <= MAX_LINES, "\n".join(lines)


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        return proc.communicate(timeout=10)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]


def test_readme_server_and_client_as_written(workloads: tuple[Workload, Workload]) -> None:
    server_wl, client_wl = workloads
    port = free_port()
    server = run(block("server"), server_wl, port)
    try:
        wait_listening(port, server)
        client = run(block("client"), client_wl, port)
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err
        assert out == f"hello {CLIENT}\n"
        # Rotation: the server process presents its new SVID without a restart.
        old = server_wl.serial
        assert server_wl.rotate() != old
        client = run(block("client"), client_wl, port)
        out, err = client.communicate(timeout=60)
        assert out == f"hello {CLIENT}\n", err
        # Another workload of the trust domain is refused: the server block authorises one ID.
        pki = server_wl.pki
        assert raw_request(plain_context(pki.svid(INTRUDER), pki, server=False), port) == b""
    finally:
        _stop(server)


def test_readme_asyncio_server_as_written(workloads: tuple[Workload, Workload]) -> None:
    server_wl, client_wl = workloads
    port = free_port()
    server = run(block("asyncio server"), server_wl, port)
    try:
        wait_listening(port, server)

        async def call() -> bytes:
            ctx = tls.client_context(client_wl.source, SERVER)
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
            answer = await reader.read()
            writer.close()
            return answer

        assert asyncio.run(call()) == f"hello {CLIENT}\n".encode()
    finally:
        _stop(server)
