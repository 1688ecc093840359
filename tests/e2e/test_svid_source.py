"""svid.workloadapi against a real `svid-agent` next to a real `svid-server`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from svid import TrustDomain, VerificationError, der_concat
from svid.workloadapi import ENV_SOCKET, Backoff, WorkloadApiClient, WorkloadApiSource
from tests.e2e.agent_process import AgentProcess, agent_stack, create_entry
from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir, wait_for
from tests.e2e.interrupted_setup import PRELUDE

pytestmark = pytest.mark.e2e
WORKLOAD = "spiffe://example.org/svid-source"


@pytest.fixture
def stack() -> Iterator[tuple[ServerProcess, AgentProcess]]:
    root = short_tmpdir()
    server = make_server(root).start()
    with agent_stack(root, server) as agent:
        yield server, agent


def test_source_and_client_against_the_real_agent(
    stack: tuple[ServerProcess, AgentProcess],
) -> None:
    server, agent = stack
    create_entry(server, WORKLOAD, agent.agent_id(), f"unix:uid:{os.getuid()}")
    agent.wait_svid(WORKLOAD)
    address = f"unix://{agent.socket_path}"
    with WorkloadApiClient(None, environ={ENV_SOCKET: address}) as client:
        svids = client.fetch_x509_svids()
        assert [str(s.spiffe_id) for s in svids] == [WORKLOAD]
        jwt = client.fetch_jwt_svid("orders")
        assert client.validate_jwt_svid(jwt.token, "orders").spiffe_id == jwt.spiffe_id
        with pytest.raises(VerificationError):
            client.validate_jwt_svid(jwt.token, "someone-else")

    with WorkloadApiSource(address, backoff=Backoff(0.05, 1.0)) as source:
        assert source.wait_ready(30)
        assert source.x509_bundle_for(TrustDomain("example.org")) is not None
        peer = source.x509_verifier().verify_der(der_concat(svids[0].cert_chain))
        assert str(peer.spiffe_id) == WORKLOAD
        caller = source.jwt_verifier().verify(jwt.token, "orders")
        assert str(caller.spiffe_id) == WORKLOAD
        wait_for(
            lambda: source.revocation_stream_supported is not None,
            10,
            "the revocation stream to answer",
        )
        assert source.revocation_stream_supported is True
        assert not source.rejected_crls


OPEN_INTERRUPTED = (
    PRELUDE
    + """
import sys
from svid.workloadapi import WorkloadApiClient
try:
    with WorkloadApiClient(sys.argv[1]) as client:
        interrupt_next_call_setup()
        client.fetch_x509_bundles()
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(0)
print("not interrupted", flush=True)
sys.exit(1)
"""
)


def test_a_ctrl_c_while_a_stream_opens_leaves_a_client_that_closes(
    stack: tuple[ServerProcess, AgentProcess],
) -> None:
    # Landing in gRPC's setup of the stream, the interrupt left a call no thread completed,
    # and the client's close() waited for it forever: the program could not exit.
    _, agent = stack
    runtime = subprocess.Popen(
        [sys.executable, "-c", OPEN_INTERRUPTED, f"unix://{agent.socket_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = runtime.communicate(timeout=30)
    finally:
        runtime.kill()
    assert (runtime.returncode, out) == (0, "interrupted\n"), err
