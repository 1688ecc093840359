"""One uid asking for ever-new JWT audiences must not spend its node's minting budget for all.

The flooding workload is a real process running as `nobody` over the real socket; the other is
this test process (uid 0). The fake server refuses mints past a per-agent budget, as the
server's `jwt_rate_per_agent` does.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_attestor.mint_budget import MINTS_PER_UID_BURST, MINTS_PER_UID_RATE
from agent_attestor.model import Selector
from svid._proto import workload_pb2
from tests.agent_attestor.harness import HEADER, Harness
from tests.users import NOBODY

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
ROOT = Path(__file__).resolve().parents[2]
SERVER_BUDGET = 300  # above one uid's burst (200), below what the flood asks for


@pytest.fixture
def agent() -> Iterator[Harness]:
    h = Harness()
    os.chmod(h.root, 0o755)
    os.chmod(h.socket_path.parent, 0o755)
    try:
        yield h
    finally:
        h.close()


def _fetch_as_nobody(socket_path: Path, audiences: list[str]) -> list[list[str]]:
    """[code, token or details] of one FetchJWTSVID per audience, asked by a `nobody` process."""
    script = textwrap.dedent(
        f"""
        import json, os, grpc
        from svid._proto import workload_pb2, workload_pb2_grpc
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel("unix:{socket_path}"))
        out = []
        for aud in {audiences!r}:
            try:
                reply = stub.FetchJWTSVID(
                    workload_pb2.JWTSVIDRequest(audience=[aud]), metadata={HEADER!r}, timeout=20
                )
                out.append(["OK", reply.svids[0].svid])
            except grpc.RpcError as exc:
                out.append([exc.code().name, exc.details()])
        print(json.dumps(out))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@as_root
def test_one_uid_minting_fresh_audiences_leaves_the_others_their_first_token(
    agent: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    agent.add_entry("/flooder", frozenset({Selector("unix", f"uid:{NOBODY}")}))
    agent.add_entry("/quiet")  # uid 0: this test process
    agent.signer.jwt_budget = SERVER_BUDGET
    flood = [f"aud-{i}" for i in range(SERVER_BUDGET + 20)]

    with caplog.at_level(logging.WARNING, logger="agent_attestor.mint_budget"):
        answers = _fetch_as_nobody(agent.socket_path, flood)

    codes = [code for code, _ in answers]
    assert codes == ["OK"] * MINTS_PER_UID_BURST + ["RESOURCE_EXHAUSTED"] * (
        len(flood) - MINTS_PER_UID_BURST
    )
    details = answers[-1][1]
    assert f"uid {NOBODY}" in details
    assert "jwt_mints_per_uid_rate" in details
    assert agent.signer.jwt_calls == MINTS_PER_UID_BURST  # refused before the server was asked
    # One line, however many refusals (the clock stands still within the minute).
    assert [r.getMessage() for r in caplog.records] == [
        "refused JWT-SVID mints of a uid past its rate"
    ]

    # The other workload's first token is still minted.
    reply = agent.stub().FetchJWTSVID(
        workload_pb2.JWTSVIDRequest(audience=["quiet-aud"]), metadata=HEADER, timeout=20
    )
    assert [s.spiffe_id for s in reply.svids] == ["spiffe://example.org/quiet"]

    # The flooder's cached tokens cost nothing and are still served, while a new one is refused.
    mints = agent.signer.jwt_calls
    again = _fetch_as_nobody(agent.socket_path, ["aud-0", "aud-199", "aud-new"])
    assert again[:2] == answers[0:1] + answers[199:200]
    assert again[2][0] == "RESOURCE_EXHAUSTED"
    assert agent.signer.jwt_calls == mints

    # The bucket refills at its rate (the server's budget would refill too: not counted here).
    agent.signer.jwt_budget = None
    agent.clock.advance(1)
    later = _fetch_as_nobody(
        agent.socket_path, [f"late-{i}" for i in range(int(MINTS_PER_UID_RATE) + 1)]
    )
    assert [code for code, _ in later] == ["OK"] * int(MINTS_PER_UID_RATE) + ["RESOURCE_EXHAUSTED"]
