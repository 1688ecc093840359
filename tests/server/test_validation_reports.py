"""Agents' ValidateJWTSVID reports on a running server: refusals on the audit log up to the
agent's budget, then only counted; validations that passed likewise, on a budget of their own."""

from __future__ import annotations

from urllib.parse import unquote

import grpc

from server.datastore.records import EventFilter
from svid._proto import task_pb2, task_pb2_grpc
from tests.server.fixtures import TLS_NAME, Agent, RunningServer, managed_server


def _report(server: RunningServer, agent: Agent, validations: list[task_pb2.Validation]) -> None:
    channel = grpc.secure_channel(
        server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
    )
    try:
        task_pb2_grpc.NodeTasksStub(channel).ReportValidations(
            task_pb2.ReportValidationsRequest(validations=validations), timeout=10
        )
    finally:
        channel.close()


def _refused(n: int) -> list[task_pb2.Validation]:
    # What a local process gets by having forged tokens validated: one report each.
    return [
        task_pb2.Validation(subject=f"spiffe://example.org/forged/{i}", audience=["svc"], at=1)
        for i in range(n)
    ]


def test_refused_token_reports_are_on_record_up_to_the_agents_budget() -> None:
    limits = {"validation_refusal_rate_per_agent": 1, "validation_refusal_burst_per_agent": 3}
    with managed_server(**limits) as server:
        agent, other = server.attest(), server.attest()
        passed = task_pb2.Validation(subject="spiffe://example.org/ok", audience=["svc"], ok=True)
        _report(server, agent, [*_refused(5), passed])
        _report(server, agent, [*_refused(5), passed])
        _report(server, other, _refused(2))

        def decisions(node: Agent) -> list[str]:
            rows = server.server.datastore.audit_rows(EventFilter(kind="jwt_validated"))
            return sorted(r["decision"] for r in rows if r["node_id"] == node.spiffe_id)

        assert decisions(agent) == ["allow", "allow", "deny", "deny", "deny"]
        assert decisions(other) == ["deny", "deny"]  # its budget is its own
        metrics = server.server.metrics.render().decode()
        assert 'svid_server_refusals_unrecorded_total{source="validation"} 7.0' in metrics
        server.clock.advance(1)
        _report(server, agent, _refused(2))
        assert decisions(agent).count("deny") == 4


def _accepted(n: int) -> list[task_pb2.Validation]:
    # What a compromised agent can claim its workloads accepted, as fast as it likes.
    return [
        task_pb2.Validation(
            subject="spiffe://example.org/w", audience=["svc"], ok=True, jti=f"j{i}", at=1
        )
        for i in range(n)
    ]


def test_accepted_token_reports_are_on_record_up_to_a_budget_of_their_own() -> None:
    limits = {"validation_accepted_rate_per_agent": 1, "validation_accepted_burst_per_agent": 3}
    with managed_server(**limits) as server:
        agent, other = server.attest(), server.attest()
        _report(server, agent, [*_accepted(5), *_refused(2)])
        _report(server, agent, _accepted(5))
        _report(server, other, _accepted(2))

        def decisions(node: Agent) -> list[str]:
            rows = server.server.datastore.audit_rows(EventFilter(kind="jwt_validated"))
            return sorted(r["decision"] for r in rows if r["node_id"] == node.spiffe_id)

        # The refusals spend the other budget: both on record.
        assert decisions(agent) == ["allow", "allow", "allow", "deny", "deny"]
        assert decisions(other) == ["allow", "allow"]
        metrics = server.server.metrics.render().decode()
        assert 'svid_server_refusals_unrecorded_total{source="validation_accepted"} 7.0' in metrics
        server.clock.advance(1)
        _report(server, agent, _accepted(2))
        assert decisions(agent).count("allow") == 4


def test_accepted_token_reports_are_all_on_record_with_a_rate_of_zero() -> None:
    with managed_server(validation_accepted_rate_per_agent=0) as server:
        agent = server.attest()
        _report(server, agent, _accepted(50))
        rows = server.server.datastore.audit_rows(EventFilter(kind="jwt_validated"))
        assert sum(r["decision"] == "allow" for r in rows) == 50


def test_an_audience_holding_a_comma_cannot_pass_for_two() -> None:
    """Another trust domain's token may name the audience "a,b", and the agent validates it
    for that one audience: its event must not read as the two audiences "a" and "b"."""
    audiences = [["svc,admin"], ["svc", "admin"], ["svc%2Cadmin"], ["docs"]]
    with managed_server() as server:
        agent = server.attest()
        _report(
            server,
            agent,
            [
                # Refused once their signature held: recorded under their subject.
                task_pb2.Validation(
                    subject=f"spiffe://other.org/w{i}", audience=names, at=1, claims_verified=True
                )
                for i, names in enumerate(audiences)
            ],
        )
        rows = server.server.datastore.audit_rows(EventFilter(kind="jwt_validated"))
        recorded = {r["agent_id"]: r["resource"] for r in rows}
        fields = [recorded[f"spiffe://other.org/w{i}"] for i in range(len(audiences))]
        # Each list reads back as itself; a name without a comma or "%" is written as is.
        assert [[unquote(n) for n in f.split(",")] for f in fields] == audiences
        assert fields[1] == "svc,admin"
        assert fields[3] == "docs"
        assert len(set(fields)) == len(fields)
        assert server.server.tasks.service.audit.verify().ok
