"""The server's health tells the truth about its audit ledger, with a real `svid-server run` on
SQLite whose data directory is a small tmpfs filled to the last byte: while the ledger cannot
commit, every identity decision is refused and /healthz answers 503 naming the ledger (the node
service's gRPC health NOT_SERVING), and once space is back it answers 200 by itself, no call
made to find out; the outage is on the audit log, and after a restart the chain verifies with
every credential a client received on record."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from tests.e2e.conftest import ServerProcess
from tests.e2e.small_disk import served_from_a_small_disk
from tests.e2e.test_ledger_fail_closed import assert_all_on_record, set_up
from tests.e2e.test_server_cli import node_channel
from tests.server.fixtures import Agent
from tests.waits import wait_for

pytestmark = pytest.mark.e2e


def healthz(server: ServerProcess) -> tuple[int, str]:
    address = server.runtime["metrics_address"]
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=5) as answer:
            return int(answer.status), answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read().decode()


def node_health(server: ServerProcess, agent: Agent) -> int:
    with node_channel(server, agent) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    return int(reply.status)


def test_healthz_names_the_ledger_while_it_cannot_commit_and_recovers_by_itself() -> None:
    """Fails on main: /healthz said 200 ok all along, while every issuance, task begin and
    revocation was refused for want of the ledger."""
    with served_from_a_small_disk(metrics_address="127.0.0.1:0") as (server, disk):
        data_dir = server.data_dir
        client = set_up(server)
        serving = health_pb2.HealthCheckResponse.SERVING
        with client.stub() as stub:
            assert client.jwt(stub) == 1
            assert healthz(server) == (200, "ok\n")
            disk.fill()
            with pytest.raises(grpc.RpcError) as err:
                client.jwt(stub)
            assert err.value.code() is grpc.StatusCode.UNAVAILABLE
            code, said = healthz(server)
            assert (code, said) == (
                503,
                "unhealthy: the audit ledger cannot commit (disk full)\n",
            )
            assert str(server.root) not in said
            assert node_health(server, client.agent) != serving

            disk.free()
            # No call: a balancer that heeded the 503 sends none.
            wait_for(lambda: healthz(server)[0] == 200, 10, "/healthz to say 200 again")
            assert node_health(server, client.agent) == serving
            assert client.jwt(stub) == 1
        assert server.stop() == 0

        server.start()
        assert healthz(server) == (200, "ok\n")
        assert server.stop() == 0
        assert len(client.jtis) == 2
        assert_all_on_record(client, data_dir)
        verify = server.cli("audit", "verify", "--data-dir", str(data_dir))
        assert "audit chain OK" in verify.stdout
        export = server.cli(
            "audit", "export", "--data-dir", str(data_dir), "--kind", "ledger_outage"
        )
        (outage,) = [json.loads(line) for line in export.stdout.splitlines()]
        assert outage["reason"] == "disk full"
        assert outage["extra"]["began_at"] <= outage["ts"]
