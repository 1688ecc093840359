"""What one connection to the Workload API socket can make the agent hold before any check.

The security header and the caller's identity are checked by the handlers, and a unary
handler runs only once its whole request message has arrived: until then grpcio buffers it,
up to the server's max_receive_message_length (4 MiB, endpoint.MAX_MESSAGE), on each of the
100 streams a connection may hold (MAX_STREAMS_PER_CONNECTION). The largest request the API
takes is a 64 KiB token; a caller of any uid, with no identity and no header, that sends all but
the end of 4 MiB messages holds ~400 MB of the agent's memory per connection, and 256
connections per uid (the admission limit): the whole node's memory. The stream budget does not
apply: it counts streams once a handler runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.agent_attestor.harness import Harness
from tests.users import NOBODY

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@as_root
def test_one_unidentified_connection_cannot_make_the_agent_buffer_hundreds_of_mib(
    agent: Harness,
) -> None:
    """Fails on main: 100 partial 4 MiB FetchJWTSVID requests on one connection of `nobody`,
    which holds no identity and sends no header, grow the agent by ~400 MB."""
    os.chmod(agent.root, 0o755)
    os.chmod(agent.socket_path.parent, 0o755)
    code = textwrap.dedent(
        f"""
        import os, sys
        from tests.agent_attestor.raw_h2 import StalledClient
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        client = StalledClient({str(agent.socket_path)!r}, window=65535)
        sent = client.send_partial_messages(
            "/SpiffeWorkloadAPI/FetchJWTSVID", streams=100, size={4 * MIB - 64}
        )
        print(sent, flush=True)
        sys.stdin.read()
        """
    )
    before = _rss()
    attacker = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert attacker.stdout is not None
        sent = int(attacker.stdout.readline())
        grown = _rss() - before
    finally:
        assert attacker.stdin is not None
        attacker.stdin.close()
        attacker.wait(30)
    assert grown < 64 * MIB, (
        f"one connection without identity or header sent {sent // MIB} MiB of unfinished "
        f"requests and the agent grew by {grown // MIB} MiB"
    )
