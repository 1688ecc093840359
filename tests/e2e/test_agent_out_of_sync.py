"""A real server, agent and svid source: while the agent has lost its server, revocations made
there cannot reach it, and the source's revocation data is counted stale though its own stream
to the agent stays healthy. The agent said nothing of its link: revocation_staleness() stayed 0
and max_revocation_staleness admitted, for as long as the partition lasted, tokens the server
revoked meanwhile."""

from __future__ import annotations

import os
import signal
import time

import pytest

from svid import StaleRevocationsError
from svid.workloadapi import Backoff, WorkloadApiClient, WorkloadApiSource
from tests.e2e.agent_process import agent_stack, create_entry
from tests.e2e.conftest import make_restartable_server, short_tmpdir, wait_for

pytestmark = pytest.mark.e2e
WORKLOAD = "spiffe://example.org/out-of-sync"
BOUND = 3.0  # the verifier's max_revocation_staleness
HEARTBEAT = 0.25  # the server's sync_heartbeat_interval: silent 0.5 s, the agent says so
# How late past the bound a refusal may come on a loaded machine: the agent's message, the
# source's thread and this test's polling.
LATE = 4.0


def _refused(verify: object) -> bool:
    try:
        verify()  # type: ignore[operator]
    except StaleRevocationsError:
        return True
    return False


def test_a_verifier_refuses_while_its_agent_has_lost_the_server_and_admits_once_back() -> None:
    root = short_tmpdir()
    server = make_restartable_server(root).start()
    with agent_stack(root, server) as agent:
        create_entry(server, WORKLOAD, agent.agent_id(), f"unix:uid:{os.getuid()}")
        agent.wait_svid(WORKLOAD)
        address = f"unix://{agent.socket_path}"
        with WorkloadApiClient(address) as client:
            token = client.fetch_jwt_svid("orders").token
        with WorkloadApiSource(address, backoff=Backoff(0.05, 1.0)) as source:
            verifier = source.jwt_verifier(max_revocation_staleness=BOUND)
            wait_for(lambda: source.revocations_updated_at is not None, 30, "the revocations")
            assert source.revocation_staleness() == 0.0
            verifier.verify(token, "orders")
            told = source.revocations_updated_at

            stopping = time.monotonic()  # the agent loses its Sync stream after this
            server.stop()
            # The agent says so at once: a message comes on the quiet stream.
            wait_for(lambda: source.revocation_staleness() > 0, BOUND, "the agent to say")
            assert source.revocations_updated_at != told
            wait_for(
                lambda: _refused(lambda: verifier.verify(token, "orders")),
                BOUND + LATE,
                "the verifier to refuse",
            )
            assert time.monotonic() - stopping >= BOUND  # not before its bound
            assert not source.errors, source.errors  # the stream to the agent never broke

            server.start()
            wait_for(lambda: source.revocation_staleness() == 0.0, 60, "the agent in sync")
            verifier.verify(token, "orders")
            assert not source.errors, source.errors


def test_a_server_hung_with_its_stream_open_is_counted_stale_since_it_was_last_heard() -> None:
    """A stopped server (SIGSTOP; a network black hole alike) closes nothing: the agent heard of
    it only when keepalive failed, ~20 s on, said it was in sync all along, and then counted its
    staleness from there, 20 s short. Its heartbeats stopping now say so within two intervals."""
    root = short_tmpdir()
    server = make_restartable_server(root, sync_heartbeat_interval=HEARTBEAT).start()
    with agent_stack(root, server) as agent:
        create_entry(server, WORKLOAD, agent.agent_id(), f"unix:uid:{os.getuid()}")
        agent.wait_svid(WORKLOAD)
        with WorkloadApiSource(f"unix://{agent.socket_path}", backoff=Backoff(0.05, 1.0)) as source:
            wait_for(lambda: source.revocation_staleness() == 0.0, 30, "the agent in sync")
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                wait_for(lambda: source.revocation_staleness() > 0, BOUND, "the agent to say")
                # Counted from the last message heard, before the stop, not from the notice two
                # intervals on (a message the server sent as it stopped may land a little late).
                assert source.revocation_staleness() >= time.monotonic() - stopped - 0.05
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            wait_for(lambda: source.revocation_staleness() == 0.0, 30, "back in sync")
            assert not source.errors, source.errors
