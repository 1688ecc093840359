"""A real server on PostgreSQL: selected by the `datastore` setting, serving admin and node
calls from the database, keeping its state across a restart, and never logging the password."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

import pytest

from server.ca.sealing import KeyEncryptionKey
from server.datastore.postgres import PostgresDataStore
from svid._clock import FakeClock
from svid._proto import admin_pb2
from tests.server.fixtures import managed_server

pytest.importorskip("psycopg")

SECRET = "not-logged-pw"


def with_password(dsn: str) -> str:
    """The test server trusts local connections, so a password is accepted and ignored."""
    return dsn.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@", 1)


def kek_file(where: Path) -> Path:
    """The key-encryption key servers sharing a PostgreSQL datastore share their CA under."""
    path = where / "kek"
    KeyEncryptionKey.generate().write_new(path)
    return path


def test_a_server_on_postgresql_serves_and_restarts_from_it(
    postgres_dsn: str, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    dsn = with_password(postgres_dsn)
    assert SECRET in dsn, "the test DSN is not of the expected form"
    shared = {"datastore": dsn, "key_encryption_key_file": str(kek_file(tmp_path))}
    with caplog.at_level(logging.INFO), managed_server(**shared, log_level="info") as server:
        agent = server.attest()
        entry = server.create_entry("/web", agent.spiffe_id)
    # Another server (its own data_dir: nothing of the first on disk) reads the same database.
    with managed_server(**shared) as again:
        got = again.admin().GetEntry(admin_pb2.GetEntryRequest(id=entry.id), timeout=10)
        assert got.spiffe_id == entry.spiffe_id
    store = PostgresDataStore(postgres_dsn, FakeClock())
    try:
        assert [a.spiffe_id for a in store.list_agents()] == [agent.spiffe_id]
        assert [e.id for e in store.list_entries()] == [entry.id]
        assert len(store.list_key_slots("x509")) >= 1  # the CA journal is there too
    finally:
        store.close()
    started = [r for r in caplog.records if r.getMessage() == "server started"]
    assert started
    assert getattr(started[0], "datastore", "").startswith("postgresql://postgres:***@")
    assert not [r for r in caplog.records if SECRET in r.getMessage() + str(r.__dict__)]


def test_the_server_keeps_serving_when_its_database_connections_die(
    postgres_dsn: str, tmp_path: Path
) -> None:
    """A PostgreSQL restart or failover cuts every connection: a call caught on a dead one
    answers UNAVAILABLE (nothing else), and the server then serves again on fresh ones."""
    import grpc
    import psycopg

    from tests import postgres

    app = f"svidd-test-server-conn-{secrets.token_hex(4)}"
    dsn = f"{postgres_dsn}&application_name={app}"
    with managed_server(datastore=dsn, key_encryption_key_file=str(kek_file(tmp_path))) as server:
        server.attest()
        with psycopg.connect(postgres.server_dsn(), autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (app,),
            ).fetchone()
        assert killed is not None
        assert killed[0] >= 1
        failures = []
        for _ in range(3):
            try:
                server.join_token()
            except grpc.RpcError as e:
                failures.append(e.code())
        assert failures in ([], [grpc.StatusCode.UNAVAILABLE]), failures
        agent = server.attest()  # a join token, the agent's record, its SVID: all fresh writes
        assert agent.spiffe_id


def test_a_validation_report_with_a_nul_is_recorded(postgres_dsn: str, tmp_path: Path) -> None:
    """The claims of a refused token are anyone's: one with a NUL in its `sub` (PostgreSQL text
    holds none) failed the agent's whole report as storage unavailable, and the agent, which
    retries such a report, then sent no validation to the audit log again."""
    import grpc

    from server.datastore.records import EventFilter
    from svid._proto import task_pb2, task_pb2_grpc
    from tests.server.fixtures import TLS_NAME

    with managed_server(
        datastore=postgres_dsn, key_encryption_key_file=str(kek_file(tmp_path))
    ) as server:
        agent = server.attest()
        reports = [
            task_pb2.Validation(
                subject="spiffe://example.org/x\x00", audience=["a\x00"], at=1, claims_verified=True
            ),
            task_pb2.Validation(subject="spiffe://example.org/ok", audience=["svc"], ok=True),
        ]
        channel = grpc.secure_channel(
            server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
        )
        task_pb2_grpc.NodeTasksStub(channel).ReportValidations(
            task_pb2.ReportValidationsRequest(validations=reports), timeout=10
        )
        channel.close()
        rows = server.server.datastore.audit_rows(EventFilter(kind="jwt_validated"))
        recorded = sorted((r["agent_id"], r["resource"]) for r in rows)
    assert recorded == [
        ("spiffe://example.org/ok", "svc"),
        ("spiffe://example.org/x\ufffd", "a\ufffd"),
    ]


def test_task_calls_naming_a_nul_are_refused_as_input(postgres_dsn: str, tmp_path: Path) -> None:
    """No task id, runtime or cursor holds a NUL; on PostgreSQL (whose text holds none) a call
    naming one failed as storage unavailable, which a caller retries."""
    import grpc

    from server import listing
    from svid._proto import task_pb2, task_pb2_grpc
    from tests.server.fixtures import TLS_NAME

    with managed_server(
        datastore=postgres_dsn, key_encryption_key_file=str(kek_file(tmp_path))
    ) as server:
        agent = server.attest()
        node_channel = grpc.secure_channel(
            server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
        )
        admin_channel = grpc.insecure_channel(f"unix:{server.runtime.admin_socket}")
        node = task_pb2_grpc.NodeTasksStub(node_channel)
        admin = task_pb2_grpc.TaskAdminStub(admin_channel)
        query = ["tasks", "", "", ""]
        forged = listing.encode_token("1:a\x00", query)
        calls = {
            "end": (
                lambda: node.EndTask(task_pb2.NodeEndTaskRequest(task_id="t\x00"), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT,  # not the shape of a task id
            ),
            "show": (
                lambda: admin.ShowTask(task_pb2.AdminTaskRequest(task_id="t\x00"), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            "list": (
                lambda: node.ListTasks(
                    task_pb2.NodeListTasksRequest(runtime_ids=["spiffe://example.org/a\x00"]),
                    timeout=10,
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            "page": (
                lambda: admin.ListTasks(
                    task_pb2.AdminListTasksRequest(page_token=forged), timeout=10
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        }
        codes = {}
        for name, (call, _) in calls.items():
            with pytest.raises(grpc.RpcError) as exc:
                call()
            codes[name] = exc.value.code()  # type: ignore[attr-defined]
        node_channel.close()
        admin_channel.close()
    assert codes == {name: code for name, (_, code) in calls.items()}
