"""Attack repro: what a hostile runtime's refused begins leave in the server's memory.

The policy engine keeps each decision in a cache keyed by (request, whole second) so that a
burst of one task's mints within a second is decided once. A decision from an earlier second can
never be served again, yet the cache forgets only when it holds 4096 entries, and an entry of an
intent at the size limits (512 pairs, each with its own PairResult and reason) weighs ~120 KB.
One workload, within its default begin rate (20 a second), makes the server hold ~500 MB that no
later request can use, then drops it all and does it again."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import grpc
import pytest

import server.policy as policy_package
from svid._proto import task_pb2, task_pb2_grpc
from tests.server.fixtures import TLS_NAME, managed_server

BEGINS = 300
# Within the intent's limits: 8 actions x 64 resources = 512 decisions, < 2,048 bytes of names.
ACTIONS = [f"act{i}" for i in range(8)]
# What the decisions of past seconds may keep, at most (they can never be served again).
ALLOWED_BYTES = 16 * 1024 * 1024


def _intent(n: int) -> task_pb2.Intent:
    return task_pb2.Intent(
        actions=ACTIONS, resources=[f"n{n:05d}-r{i:02d}-pad-pad-pad" for i in range(64)]
    )


def test_refused_begins_of_past_seconds_do_not_pile_up_in_the_decision_cache() -> None:
    with managed_server() as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/hostile", agent.spiffe_id).spiffe_id
        policy_dir = str(Path(policy_package.__file__).parent)
        tracemalloc.start()
        try:
            mine = [tracemalloc.Filter(True, f"{policy_dir}/*")]
            before = tracemalloc.take_snapshot().filter_traces(mine)
            with grpc.secure_channel(
                server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
            ) as channel:
                stub = task_pb2_grpc.NodeTasksStub(channel)
                for n in range(BEGINS):
                    with pytest.raises(grpc.RpcError) as caught:
                        stub.BeginTask(
                            task_pb2.NodeBeginTaskRequest(
                                runtime_id=runtime, intent=_intent(n), ttl=300
                            ),
                            timeout=30,
                        )
                    code = caught.value.code()  # type: ignore[attr-defined]
                    assert code == grpc.StatusCode.PERMISSION_DENIED
                    # The default task_begin_rate_per_runtime (20 a second): never past it.
                    server.clock.advance(0.05)
            # Every decision made is of a second gone by now.
            server.clock.advance(2)
            after = tracemalloc.take_snapshot().filter_traces(mine)
        finally:
            tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        full = grown / BEGINS * 4096 / 1e6
        assert grown < ALLOWED_BYTES, (
            f"{BEGINS} refused begins of one runtime left {grown / 1e6:.0f} MB of decisions "
            f"of past seconds in the server (at 4096 entries: ~{full:.0f} MB)"
        )
