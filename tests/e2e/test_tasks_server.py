"""End to end, server side of the task layer: a real `svid-server run` process, a test agent on
the node API (mTLS), and the real CLI for `task`, `audit` and `policy` commands."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_der_public_key

from svid._proto import node_pb2, node_pb2_grpc, task_pb2, task_pb2_grpc
from tests.e2e.agent_process import create_entry, new_token
from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess, make_server, short_tmpdir, wait_for
from tests.e2e.test_server_cli import attest, node_channel
from tests.server.fixtures import Agent, der_chain, make_csr

pytestmark = pytest.mark.e2e
TD = f"spiffe://{TRUST_DOMAIN}"
RUNTIME = f"{TD}/agents/research-bot"
POLICY = """
@id("work")
@ttl_cap("900")
permit (principal is Agent, action in [Action::"read", Action::"write"], resource)
when { resource in context.intent.resources };
"""


@dataclass
class Setup:
    server: ServerProcess
    agent: Agent
    channel: grpc.Channel
    policy_dir: Path

    @property
    def tasks(self) -> task_pb2_grpc.NodeTasksStub:
        return task_pb2_grpc.NodeTasksStub(self.channel)

    @property
    def node(self) -> node_pb2_grpc.NodeStub:
        return node_pb2_grpc.NodeStub(self.channel)

    def begin(self, **kw: Any) -> task_pb2.Task:
        intent = task_pb2.Intent(
            actions=kw.pop("actions", ["read"]),
            resources=kw.pop("resources", ["docs"]),
            classification=kw.pop("classification", ""),
            on_behalf_of=kw.pop("on_behalf_of", "user:alice"),
        )
        request = task_pb2.NodeBeginTaskRequest(
            runtime_id=RUNTIME, intent=intent, ttl=kw.pop("ttl", 300), **kw
        )
        task: task_pb2.Task = self.tasks.BeginTask(request, timeout=10).task
        return task

    def jwt(self, spiffe_id: str, audience: str) -> str:
        reply = self.node.NewJWTSVID(
            node_pb2.NewJWTSVIDRequest(spiffe_id=spiffe_id, audience=[audience]), timeout=10
        )
        return str(reply.token)

    def audit(self, *args: str) -> list[dict[str, Any]]:
        return self.server.audit_events(*args)


@pytest.fixture
def setup() -> Iterator[Setup]:
    root = short_tmpdir("svt")
    policy_dir = root / "policies"
    policy_dir.mkdir()
    (policy_dir / "work.cedar").write_text(POLICY)
    server = make_server(root, policy_dir=str(policy_dir))
    server.start()
    channel = None
    try:
        agent = attest(server, new_token(server), server.bundle_pem().encode())
        create_entry(server, RUNTIME, agent.spiffe_id, "unix:uid:1000")
        channel = node_channel(server, agent)
        yield Setup(server, agent, channel, policy_dir)
    finally:
        if channel is not None:
            channel.close()
        if server.proc is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def claims(setup: Setup, token: str, audience: str) -> dict[str, Any]:
    header = pyjwt.get_unverified_header(token)
    sync = next(setup.node.Sync(node_pb2.SyncRequest(), timeout=10))
    key = {k.kid: k.public_key for k in sync.bundle.jwt_keys}[header["kid"]]
    return pyjwt.decode(
        token,
        load_der_public_key(key),  # type: ignore[arg-type]
        algorithms=[header["alg"]],
        audience=audience,
    )


def test_task_lifecycle_decisions_revocation_and_audit(setup: Setup) -> None:
    task = setup.begin(goal_sha256="0" * 64)
    assert task.spiffe_id == f"{RUNTIME}/task/{task.task_id}"
    # The task identity reaches the agent over Sync, with the runtime's selectors.
    stream = setup.node.Sync(node_pb2.SyncRequest(), timeout=30)
    first = next(stream)
    (entry,) = [e for e in first.entries if e.spiffe_id == task.spiffe_id]
    assert [(s.type, s.value) for s in entry.selectors] == [("unix", "uid:1000")]
    _, csr = make_csr()
    (x509_result,) = setup.node.BatchNewX509SVID(
        node_pb2.BatchNewX509SVIDRequest(
            params=[node_pb2.X509SVIDParams(entry_id=entry.id, csr=csr)]
        ),
        timeout=10,
    ).results
    leaf = der_chain(x509_result.cert_chain)[0]

    # In intent: a JWT with the task claims. Out of intent: denied, flagged.
    token = setup.jwt(task.spiffe_id, "docs")
    got = claims(setup, token, "docs")
    assert got["txn"] == task.task_id
    assert got["scope"] == "read"
    assert got["obo"] == "user:alice"
    assert got["act"] == {"sub": task.spiffe_id}
    assert got["tctx"]["resources"] == ["docs"]
    with pytest.raises(grpc.RpcError) as err:
        setup.jwt(task.spiffe_id, "payroll")
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "lateral movement" in (err.value.details() or "")

    # End: every serial and jti of the task goes on the list, with a CA-signed CRL.
    ended = setup.tasks.EndTask(
        task_pb2.NodeEndTaskRequest(task_id=task.task_id, runtime_ids=[RUNTIME]), timeout=10
    ).task
    assert ended.state == "ended"

    # Deltas: the revocations, with the new CRL, and the task entry's removal.
    pushed: list[node_pb2.SyncUpdate] = []

    def revoked() -> node_pb2.SyncUpdate | None:
        pushed.append(next(stream))
        gone = any(entry.id in u.removed_entry_ids for u in pushed)
        with_crl = [u for u in pushed if u.revocations and u.crl_changed]
        return with_crl[-1] if with_crl and gone else None

    update = wait_for(revoked, 10, "the revocation push")
    values = {(r.kind, r.value) for u in pushed for r in u.revocations}
    assert (1, format(leaf.serial_number, "x")) in values
    assert (2, got["jti"]) in values
    crl = x509.load_der_x509_crl(update.crl[0])
    ca = x509.load_der_x509_certificate(first.bundle.x509_authorities[-1])
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        setup.jwt(task.spiffe_id, "docs")
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED

    # The record: CLI views and the audit trail of this task, hash chain intact.
    shown = setup.server.cli_json("task", "show", task.task_id)
    assert shown["state"] == "ended"
    assert shown["credentials"] == 2
    kinds = [e["kind"] for e in setup.audit("--task", task.task_id)]
    for kind in ("task_begin", "x509_issued", "jwt_minted", "denial", "revocation", "task_end"):
        assert kind in kinds
    (denial,) = setup.audit("--task", task.task_id, "--decision", "deny")
    assert denial["extra"]["flag"] == "lateral_movement"
    assert token not in json.dumps(setup.audit())
    verify = setup.server.cli("audit", "verify", "--data-dir", str(setup.server.data_dir))
    assert "audit chain OK" in verify.stdout


def test_restricted_export_without_permitting_policy_is_denied(setup: Setup) -> None:
    with pytest.raises(grpc.RpcError) as err:
        setup.begin(actions=["export_data"], resources=["s3:reports"], classification="restricted")
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "export_data" in (err.value.details() or "")
    assert setup.server.cli_json("task", "list")["tasks"] == []
    (denial,) = setup.audit("--decision", "deny")
    assert denial["action"] == "export_data"


def test_sub_task_cannot_widen_its_parent(setup: Setup) -> None:
    parent = setup.begin(actions=["read"], resources=["docs"])
    with pytest.raises(grpc.RpcError) as err:
        setup.begin(actions=["read", "write"], resources=["docs"], parent_task_id=parent.task_id)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "privilege chaining" in (err.value.details() or "")
    child = setup.begin(actions=["read"], resources=["docs"], parent_task_id=parent.task_id)
    got = claims(setup, setup.jwt(child.spiffe_id, "docs"), "docs")
    assert got["act"] == {"sub": child.spiffe_id, "act": {"sub": parent.spiffe_id}}
    assert got["obo"] == "user:alice"
    assert got["parent_txn"] == parent.task_id


def test_edited_or_deleted_audit_row_is_named_by_verify(setup: Setup) -> None:
    for _ in range(3):
        setup.begin()
    data_dir = str(setup.server.data_dir)
    db = setup.server.data_dir / "datastore.sqlite3"
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT seq, event_id FROM audit_events ORDER BY seq").fetchall()
        conn.execute("DELETE FROM audit_events WHERE seq = ?", (rows[2][0],))
    done = setup.server.cli("audit", "verify", "--data-dir", data_dir, check=False)
    assert done.returncode == 1
    assert "deleted" in done.stderr
    seq, event_id = rows[1]
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_events SET reason = 'nothing to see' WHERE seq = ?", (seq,))
    done = setup.server.cli("audit", "verify", "--data-dir", data_dir, check=False)
    assert done.returncode == 1
    assert f"seq {seq} (event {event_id})" in done.stderr
    assert "edited" in done.stderr


def test_bad_policy_reload_is_refused_and_the_old_set_keeps_serving(setup: Setup) -> None:
    assert "reloaded" in setup.server.cli("policy", "reload").stdout
    (setup.policy_dir / "work.cedar").write_text(POLICY.replace("permit (", "permit ((", 1))
    done = setup.server.cli("policy", "reload", check=False)
    assert done.returncode == 1
    assert "work.cedar" in done.stderr
    check = setup.server.cli(
        "policy", "validate", "--policy-dir", str(setup.policy_dir), check=False
    )
    assert check.returncode == 1
    assert "work.cedar" in check.stderr
    assert setup.begin().decision == "allow"


def test_operator_revoke_and_agent_eviction_revoke_credentials(setup: Setup) -> None:
    task = setup.begin()
    token = setup.jwt(task.spiffe_id, "docs")
    jti = claims(setup, token, "docs")["jti"]
    revoked = setup.server.cli_json("task", "revoke", task.task_id, "--reason", "incident 42")
    assert revoked["state"] == "revoked"
    assert revoked["end_reason"] == "incident 42"
    plain = setup.jwt(RUNTIME, "docs")
    plain_jti = claims(setup, plain, "docs")["jti"]
    setup.server.cli("agent", "evict", "--spiffe-id", setup.agent.spiffe_id)
    events = setup.audit("--kind", "revocation")
    assert {e["credential_id"] for e in events} >= {jti, plain_jti}
