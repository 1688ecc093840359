"""A workload sees its X.509-SVID renewed at half its life (±10 % jitter), never after expiry.

Moved here from `make bench` (issue 13): the rotation point is a constant of the design, so it is
a correctness check, not a performance figure. The pure decision is tested in
tests/agent_attestor/test_rotation.py; this checks it end to end, on the certificate's own
NotBefore -> NotAfter as SPIRE and clients measure it, with real processes.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import pytest

from svid._der import parse_der_certs
from svid._proto import workload_pb2
from tests.e2e.agent_process import HEADER, AgentProcess, create_entry, new_token
from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir

pytestmark = pytest.mark.e2e
UID_SELECTOR = f"unix:uid:{os.getuid()}"
# The shortest TTL issue 11 names; with the server's 10 s back-dating a leaf lives 40 s on paper,
# so each rotation comes ~10 s after the one before.
ROTATION_TTL = 30
ROTATIONS = 2


@pytest.fixture
def stack() -> Iterator[tuple[ServerProcess, AgentProcess]]:
    root = short_tmpdir()
    server = make_server(root, log_level="warning").start()
    agent = AgentProcess(root, server, new_token(server))
    try:
        agent.start("--log-level", "warning")
        yield server, agent
    finally:
        agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(180)
def test_svid_is_renewed_at_half_its_life_before_it_expires(
    stack: tuple[ServerProcess, AgentProcess],
) -> None:
    server, agent = stack
    sid = "spiffe://example.org/rotating"
    create_entry(server, sid, agent.agent_id(), UID_SELECTOR, x509_svid_ttl=ROTATION_TTL)
    agent.wait_svid(sid)
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    fractions: list[float] = []
    margins: list[float] = []
    prev_serial, prev_before, prev_after = None, 0.0, 0.0
    while len(fractions) < ROTATIONS:
        msg = next(stream)
        svid = next((s for s in msg.svids if s.spiffe_id == sid), None)
        if svid is None:
            continue
        leaf = parse_der_certs(svid.x509_svid)[0]
        now = time.time()
        if leaf.serial_number == prev_serial:
            continue
        if prev_serial is not None:
            fractions.append((now - prev_before) / (prev_after - prev_before))
            margins.append(prev_after - now)
        prev_serial = leaf.serial_number
        prev_before = leaf.not_valid_before_utc.timestamp()
        prev_after = leaf.not_valid_after_utc.timestamp()
    stream.cancel()
    assert all(0.4 <= f <= 0.62 for f in fractions), fractions  # 0.6 plus delivery (0.6 s of 30)
    assert min(margins) > 0, margins
