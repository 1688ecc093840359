"""Task denials on a running server: on the audit log up to the agent's budget, then only
counted."""

from __future__ import annotations

import grpc
import pytest

from server.datastore.records import EventFilter
from svid._proto import task_pb2, task_pb2_grpc
from tests.server.fixtures import TLS_NAME, Agent, RunningServer, managed_server


def _begin_refused(server: RunningServer, agent: Agent, times: int) -> None:
    """BeginTask for a runtime the agent serves no entry of, as a local workload may ask
    again and again: PERMISSION_DENIED each time."""
    channel = grpc.secure_channel(
        server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
    )
    request = task_pb2.NodeBeginTaskRequest(
        runtime_id="spiffe://example.org/agents/nobody",
        intent=task_pb2.Intent(actions=["read"], resources=["https://api.example/x"]),
    )
    try:
        for _ in range(times):
            with pytest.raises(grpc.RpcError) as caught:
                task_pb2_grpc.NodeTasksStub(channel).BeginTask(request, timeout=10)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        channel.close()


def test_task_denials_are_on_record_up_to_the_agents_budget() -> None:
    limits = {"task_denial_rate_per_agent": 1, "task_denial_burst_per_agent": 3}
    with managed_server(**limits) as server:
        agent, other = server.attest(), server.attest()
        _begin_refused(server, agent, 8)
        _begin_refused(server, other, 2)

        def denials(node: Agent) -> int:
            rows = server.server.datastore.audit_rows(EventFilter(kind="denial"))
            return sum(r["node_id"] == node.spiffe_id for r in rows)

        assert denials(agent) == 3
        assert denials(other) == 2  # its budget is its own
        metrics = server.server.metrics.render().decode()
        assert 'svid_server_refusals_unrecorded_total{source="task"} 5.0' in metrics
        server.clock.advance(1)
        _begin_refused(server, agent, 2)
        assert denials(agent) == 4


def test_a_denial_of_a_large_intent_names_a_few_pairs_and_reaches_the_caller() -> None:
    """An intent at its limits that policy refuses whole: the reason named every refused pair
    (10 KB here; past 16 KB, as before the intent had limits, the caller heard
    RESOURCE_EXHAUSTED "metadata size exceeds hard limit" instead of the denial) and went
    into the denial event, the log line and the status. It names a few pairs of each clause
    and counts the others."""
    with managed_server() as server:
        agent = server.attest()
        runtime = server.create_entry("/agents/noisy", agent.spiffe_id).spiffe_id
        # Actions the schema does not know: Cedar is not asked, each pair is refused.
        actions = ["no_such_action_a", "no_such_action_b", "no_such_action_c"]
        resources = [f"https://api.example/r{i:03d}-xxxxxx" for i in range(64)]
        intent = task_pb2.Intent(actions=actions, resources=resources)
        with (
            grpc.secure_channel(
                server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
            ) as channel,
            pytest.raises(grpc.RpcError) as caught,
        ):
            task_pb2_grpc.NodeTasksStub(channel).BeginTask(
                task_pb2.NodeBeginTaskRequest(runtime_id=runtime, intent=intent, ttl=60),
                timeout=10,
            )
        refused = caught.value
        assert refused.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        details = refused.details()  # type: ignore[attr-defined]
        assert len(details.encode()) <= 2048, len(details)
        assert details.count(" and 59 more: no_such_action_") == 3, details
        (denial,) = server.server.datastore.audit_rows(EventFilter(kind="denial"))
        assert denial["reason"] == details
        size = sum(len(str(v)) for v in denial.values())
        assert size < 8 * 1024, f"one denial event is {size} characters"
