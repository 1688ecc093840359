"""Attack repro: one agent's task JWT batches hold the server's JWT threads for every agent.

Every task JWT mint is a fresh policy decision over the task's actions times the audiences asked
(TaskService._mint_decision): 96 Cedar pairs for a task of the shipped policy's three everyday
actions asked for 32 audiences, ~14 ms of CPU. The budget charges a task mint as one signature
(jwt_rate_per_agent 500 a second, burst 1000), as it charges a workload JWT that costs a few
hundred microseconds, so one BatchNewJWTSVID of 1000 task mints for different audience sets
(each its own decision) holds one of the server's JWT batch threads (`svid-jwt`, two per signing
process) for many seconds, and the budget refills one such batch every 2 s. A few of them hold
every thread, and another agent's batch holding a task mint waits for one to be free."""

from __future__ import annotations

import random
import threading
import time

import grpc

from svid._proto import node_pb2, node_pb2_grpc, task_pb2, task_pb2_grpc
from tests.server.fixtures import TLS_NAME, Agent, RunningServer, managed_server

RESOURCES = [f"r{i:02d}" for i in range(64)]
# The shipped policy grants these on the task's declared resources.
ACTIONS = ["read", "write", "invoke_tool"]
MINTS = 1000
# signing_processes = 1 (the default on a one-CPU host): two JWT batch threads.
BATCHES = 2
VICTIM_BOUND = 3.0


def _channel(server: RunningServer, agent: Agent) -> grpc.Channel:
    return grpc.secure_channel(
        server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
    )


def _task(server: RunningServer, agent: Agent, runtime: str) -> task_pb2.Task:
    with _channel(server, agent) as channel:
        task: task_pb2.Task = (
            task_pb2_grpc.NodeTasksStub(channel)
            .BeginTask(
                task_pb2.NodeBeginTaskRequest(
                    runtime_id=runtime,
                    intent=task_pb2.Intent(actions=ACTIONS, resources=RESOURCES),
                    ttl=900,
                ),
                timeout=10,
            )
            .task
        )
    return task


def test_one_agents_task_mints_do_not_hold_back_another_agents_task_jwt() -> None:
    with managed_server(signing_processes=1) as server:
        hostile, honest = server.attest(), server.attest()
        task = _task(
            server, hostile, server.create_entry("/agents/minter", hostile.spiffe_id).spiffe_id
        )
        mine = _task(
            server, honest, server.create_entry("/agents/victim", honest.spiffe_id).spiffe_id
        )
        assert set(task.actions) == set(ACTIONS)
        pick = random.Random(7)
        answered: list[node_pb2.BatchNewJWTSVIDResponse] = []

        def mint(batch: node_pb2.BatchNewJWTSVIDRequest) -> None:
            with _channel(server, hostile) as channel:
                answered.append(node_pb2_grpc.NodeStub(channel).BatchNewJWTSVID(batch, timeout=600))

        minting = []
        for _ in range(BATCHES):
            batch = node_pb2.BatchNewJWTSVIDRequest(
                requests=[
                    node_pb2.NewJWTSVIDRequest(
                        spiffe_id=task.spiffe_id, audience=sorted(pick.sample(RESOURCES, 32))
                    )
                    for _ in range(MINTS)
                ]
            )
            thread = threading.Thread(target=mint, args=(batch,), daemon=True)
            thread.start()
            minting.append(thread)
            # The agent waits for its budget to refill (500 a second) before the next batch.
            time.sleep(0.5)
            server.clock.advance(2)
        time.sleep(1)
        with _channel(server, honest) as channel:
            stub = node_pb2_grpc.NodeStub(channel)
            started = time.monotonic()
            reply = stub.BatchNewJWTSVID(
                node_pb2.BatchNewJWTSVIDRequest(
                    requests=[
                        node_pb2.NewJWTSVIDRequest(spiffe_id=mine.spiffe_id, audience=["r00"])
                    ]
                ),
                timeout=600,
            )
            took = time.monotonic() - started
        assert reply.results[0].svid.token
        for thread in minting:
            thread.join(600)
        assert len(answered) == BATCHES
        assert took < VICTIM_BOUND, (
            f"another agent's task JWT took {took:.1f} s while one agent's {BATCHES} batches "
            f"of {MINTS} task mints were decided"
        )
