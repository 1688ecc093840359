"""What one agent's task JWT mints may cost the server: decisions budgeted in pairs, and a share
of the JWT batch threads (tests/server/test_atk_task_mint_cost.py is the attack both answer)."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from svid._proto import node_pb2, node_pb2_grpc, task_pb2, task_pb2_grpc
from tests.server.fixtures import TLS_NAME, Agent, RunningServer, managed_server

RESOURCES = [f"r{i:02d}" for i in range(64)]
# The shipped policy grants these on the task's declared resources.
ACTIONS = ["read", "write", "invoke_tool"]


def _channel(server: RunningServer, agent: Agent) -> grpc.Channel:
    return grpc.secure_channel(
        server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
    )


def _task(server: RunningServer, agent: Agent, path: str) -> task_pb2.Task:
    runtime = server.create_entry(path, agent.spiffe_id).spiffe_id
    with _channel(server, agent) as channel:
        reply = task_pb2_grpc.NodeTasksStub(channel).BeginTask(
            task_pb2.NodeBeginTaskRequest(
                runtime_id=runtime,
                intent=task_pb2.Intent(actions=ACTIONS, resources=RESOURCES),
                ttl=900,
            ),
            timeout=10,
        )
    task: task_pb2.Task = reply.task
    assert set(task.actions) == set(ACTIONS)
    return task


def _mints(
    task: task_pb2.Task, count: int, audiences: int, seed: int = 0
) -> node_pb2.BatchNewJWTSVIDRequest:
    # Each mint its own audience set, so each is its own decision (none reused).
    pick = random.Random(seed)
    return node_pb2.BatchNewJWTSVIDRequest(
        requests=[
            node_pb2.NewJWTSVIDRequest(
                spiffe_id=task.spiffe_id, audience=sorted(pick.sample(RESOURCES, audiences))
            )
            for _ in range(count)
        ]
    )


def test_task_mints_are_charged_by_the_pairs_they_decide() -> None:
    # 8 audiences x 3 actions = 24 pairs a mint: a burst of 100 pairs decides 4 of them.
    with managed_server(
        task_mint_pairs_rate_per_agent=50, task_mint_pairs_burst_per_agent=100
    ) as server:
        agent = server.attest()
        task = _task(server, agent, "/agents/minter")
        with _channel(server, agent) as channel:
            stub = node_pb2_grpc.NodeStub(channel)
            reply = stub.BatchNewJWTSVID(_mints(task, 6, 8), timeout=30)
            assert [bool(r.svid.token) for r in reply.results] == [True] * 4 + [False] * 2
            for refused in reply.results[4:]:
                assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                assert "task JWT decision budget exceeded" in refused.error.message
                assert "24 (action, audience) pairs" in refused.error.message
            # A single mint (24 pairs, 4 left) is charged the same way.
            with pytest.raises(grpc.RpcError) as caught:
                stub.NewJWTSVID(
                    node_pb2.NewJWTSVIDRequest(spiffe_id=task.spiffe_id, audience=RESOURCES[:8]),
                    timeout=10,
                )
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            # The budget refills at its rate: 50 pairs a second, two mints of 24.
            server.clock.advance(1)
            reply = stub.BatchNewJWTSVID(_mints(task, 3, 8, seed=1), timeout=30)
            assert [bool(r.svid.token) for r in reply.results] == [True, True, False]
            # Another agent's budget is its own.
            other = server.attest()
            theirs = _task(server, other, "/agents/other")
            with _channel(server, other) as their_channel:
                reply = node_pb2_grpc.NodeStub(their_channel).BatchNewJWTSVID(
                    _mints(theirs, 4, 8), timeout=30
                )
            assert all(r.svid.token for r in reply.results)


def test_one_agents_task_batches_leave_a_jwt_thread_to_another_agent() -> None:
    # No decision budget here: only the share of threads stands between the two agents.
    with managed_server(signing_processes=1, task_mint_pairs_rate_per_agent=0) as server:
        hostile, honest = server.attest(), server.attest()
        task = _task(server, hostile, "/agents/minter")
        mine = _task(server, honest, "/agents/victim")
        # 96 pairs a mint (~14 ms): each of the two batches holds a thread for seconds.
        answered: list[float] = []
        started = time.monotonic()

        def mint(batch: node_pb2.BatchNewJWTSVIDRequest) -> None:
            with _channel(server, hostile) as channel:
                node_pb2_grpc.NodeStub(channel).BatchNewJWTSVID(batch, timeout=120)
            answered.append(time.monotonic() - started)

        # Two batches, as many as the pool has threads (signing_processes = 1).
        minting = [
            threading.Thread(target=mint, args=(_mints(task, 120, 32, seed),), daemon=True)
            for seed in (1, 2)
        ]
        for thread in minting:
            thread.start()
        time.sleep(0.5)
        with _channel(server, honest) as channel:
            asked = time.monotonic()
            reply = node_pb2_grpc.NodeStub(channel).BatchNewJWTSVID(_mints(mine, 1, 1), timeout=120)
            took = time.monotonic() - asked
        assert reply.results[0].svid.token
        for thread in minting:
            thread.join(120)
        assert len(answered) == 2
        # The hostile batches were still under way: the victim did not just wait them out.
        assert min(answered) > asked - started + took
        assert took < 1.5, f"another agent's task JWT took {took:.1f} s"
