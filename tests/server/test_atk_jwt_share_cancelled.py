"""Attack repro: task JWT batches whose callers give up keep their threads but not the share.

An agent's batches naming task identities hold at most its share of the JWT batch threads
(AgentTurns, half of them). A batch cancelled (its deadline passed, its client gone) leaves the
share at once, while the thread running its policy decisions cannot be stopped and runs on: an
agent asking with a deadline shorter than its batches holds every JWT batch thread again."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import grpc
import pytest

from server.issuance.issuer import Issuer
from svid._proto import node_pb2, node_pb2_grpc, task_pb2, task_pb2_grpc
from tests.server.fixtures import managed_server

BATCH_SECONDS = 0.6
CALLERS = 6


def test_a_cancelled_task_jwt_batch_keeps_its_share_until_its_thread_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = 0
    most = 0
    lock = threading.Lock()
    issue = Issuer._issue_jwt_batch

    def slow_issue(self: Issuer, *args: Any, **kwargs: Any) -> Any:
        # A batch as slow as a thousand task mints' decisions, counted while it runs.
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(BATCH_SECONDS)
            return issue(self, *args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(Issuer, "_issue_jwt_batch", slow_issue)
    # One signing process: two JWT batch threads, one for an agent's task batches.
    with managed_server(signing_processes=1) as server:
        hostile = server.attest()
        runtime = server.create_entry("/agents/minter", hostile.spiffe_id).spiffe_id
        channel = server.node_channel(hostile)
        task = (
            task_pb2_grpc.NodeTasksStub(channel)
            .BeginTask(
                task_pb2.NodeBeginTaskRequest(
                    runtime_id=runtime,
                    intent=task_pb2.Intent(actions=["read"], resources=["r00"]),
                    ttl=900,
                ),
                timeout=10,
            )
            .task
        )
        stub = node_pb2_grpc.NodeStub(channel)
        batch = node_pb2.BatchNewJWTSVIDRequest(
            requests=[node_pb2.NewJWTSVIDRequest(spiffe_id=task.spiffe_id, audience=["r00"])]
        )
        stop = time.monotonic() + 3 * BATCH_SECONDS

        def give_up_early() -> None:
            while time.monotonic() < stop:
                # Its deadline passes, or it is refused: it asks again.
                with contextlib.suppress(grpc.RpcError):
                    stub.BatchNewJWTSVID(batch, timeout=0.1)

        callers = [threading.Thread(target=give_up_early) for _ in range(CALLERS)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        time.sleep(BATCH_SECONDS)  # the last ones end
    assert 0 < most <= 1, (
        f"{most} of one agent's task JWT batches ran at once on the 2 JWT batch threads "
        "(its share: 1), their callers having given up"
    )
