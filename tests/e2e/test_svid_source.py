"""svid.workloadapi against a real `svid-agent` next to a real `svid-server`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from svid import TrustDomain, VerificationError, der_concat
from svid._workload_errors import SILENT
from svid.tasks import Task, TaskClient
from svid.workloadapi import (
    ENV_SOCKET,
    AsyncWorkloadApiSource,
    Backoff,
    WorkloadApiClient,
    WorkloadApiSource,
    WorkloadApiUnavailableError,
)
from tests.e2e.agent_process import AgentProcess, agent_stack, create_entry
from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir, wait_for
from tests.e2e.interrupted_setup import PRELUDE

pytestmark = pytest.mark.e2e
WORKLOAD = "spiffe://example.org/svid-source"


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[ServerProcess, AgentProcess]]:
    """One server and agent for the module, WORKLOAD's entry on record: the tests that stop
    the agent (SIGSTOP) let it go on again (SIGCONT) before they end."""
    root = short_tmpdir()
    server = make_server(root).start()
    with agent_stack(root, server) as agent:
        create_entry(server, WORKLOAD, agent.agent_id(), f"unix:uid:{os.getuid()}")
        yield server, agent


def _serving(stack: tuple[ServerProcess, AgentProcess]) -> AgentProcess:
    """The module's agent, once it serves WORKLOAD's SVID."""
    _, agent = stack
    agent.wait_svid(WORKLOAD)
    return agent


def test_source_and_client_against_the_real_agent(
    stack: tuple[ServerProcess, AgentProcess],
) -> None:
    agent = _serving(stack)
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


# Longer than three of the client's keepalive pings: an agent that counted them as abuse
# (gRPC's default ping policy) would have closed the connection by then.
QUIET = 18.0
HUNG = 30.0


@contextmanager
def _frozen(agent: AgentProcess) -> Iterator[None]:
    """The agent stopped (SIGSTOP): its socket stays open and nothing on it answers."""
    assert agent.proc is not None
    os.kill(agent.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(agent.proc.pid, signal.SIGCONT)


async def _until(predicate: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(HUNG):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise TimeoutError(f"timed out after {HUNG}s waiting for {what}") from None


def test_a_hung_agent_makes_the_sources_revocation_data_stale(
    stack: tuple[ServerProcess, AgentProcess], caplog: pytest.LogCaptureFixture
) -> None:
    # A hung agent keeps its connections open: the quiet revocation stream never broke, so
    # revocation_staleness() stayed 0 and max_revocation_staleness never refused anything,
    # while revocations made meanwhile reached no verifier. The sync and the async source
    # watch the one hang side by side (one hang, not one each: a hang lasts up to two pings).
    agent = _serving(stack)
    address = f"unix://{agent.socket_path}"

    async def run() -> None:
        with WorkloadApiSource(address, backoff=Backoff(0.05, 1.0)) as source:
            async with AsyncWorkloadApiSource(address, backoff=Backoff(0.05, 1.0)) as aio:
                both = (source, aio)
                await _until(
                    lambda: all(s.revocations_updated_at is not None for s in both),
                    "the revocations",
                )
                caplog.set_level(logging.INFO, logger="svid.workloadapi")
                quiet_until = time.monotonic() + QUIET
                while time.monotonic() < quiet_until:  # a healthy agent's quiet stream stays up
                    assert source.revocation_staleness() == 0.0, source.errors
                    assert aio.revocation_staleness() == 0.0, aio.errors
                    await asyncio.sleep(0.2)
                # No stream broke, however briefly (the sources say so on svid.workloadapi;
                # grpc.aio's poller may log on asyncio of a loop an earlier test closed).
                said = [r for r in caplog.records if r.name.startswith("svid")]
                assert not said, caplog.text
                with _frozen(agent):
                    await _until(
                        lambda: all(s.revocation_staleness() > 0 for s in both),
                        "the hang to be seen by both sources",
                    )
                await _until(
                    lambda: all(s.revocation_staleness() == 0 for s in both), "the agent again"
                )

    asyncio.run(run())


def test_a_call_to_a_hung_agent_fails_saying_it_stopped_answering(
    stack: tuple[ServerProcess, AgentProcess],
) -> None:
    # Its ping unanswered, the call failed before its deadline with gRPC's own words:
    # "Stream removed (ping timeout)".
    agent = _serving(stack)
    address = f"unix://{agent.socket_path}"
    with (
        WorkloadApiClient(address, timeout=HUNG) as client,
        TaskClient(address, timeout=HUNG) as tasks,
    ):
        client.fetch_x509_svids()  # both connected before the hang
        with tasks.begin(actions=["read"], resources=["orders", "wiki"]) as task:
            with _frozen(agent):
                with pytest.raises(WorkloadApiUnavailableError, match="stopped answer") as raised:
                    client.fetch_jwt_svid("orders")
                assert "ping timeout" not in str(raised.value)
                # The task client's connection pings on its own: gone already while the call
                # above waited (a loaded machine), this call meets a new one the agent never
                # answers.
                with pytest.raises(
                    WorkloadApiUnavailableError, match=f"stopped answering|{SILENT}"
                ):
                    task.jwt("wiki")
            # Backing off from a connection that timed out, the task client's channel fails a
            # call made as the agent resumes at once: one made after that ends the task.
            wait_for(lambda: _ends(task), HUNG, "the task ended once the agent answers again")


def _ends(task: Task) -> bool:
    try:
        task.end()
    except WorkloadApiUnavailableError:
        return False
    return True
