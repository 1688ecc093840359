"""End to end: a real `svid-server run` process driven by the real CLI and a test agent."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from svid._proto import node_pb2, node_pb2_grpc
from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess
from tests.server.fixtures import PEM, TLS_NAME, Agent, der_chain, make_csr

pytestmark = pytest.mark.e2e
TD = f"spiffe://{TRUST_DOMAIN}"


def attest(server: ServerProcess, token: str, bundle_pem: bytes) -> Agent:
    key, csr = make_csr()
    creds = grpc.ssl_channel_credentials(bundle_pem)
    with grpc.secure_channel(server.runtime["attest_address"], creds, options=TLS_NAME) as ch:
        params = node_pb2.AttestParams(
            data=node_pb2.AttestationData(type="join_token", payload=token.encode()), csr=csr
        )
        replies = list(
            node_pb2_grpc.NodeStub(ch).Attest(
                iter([node_pb2.AttestRequest(params=params)]), timeout=10
            )
        )
    result = replies[-1].result
    return Agent(result.spiffe_id, key, der_chain(result.cert_chain), result.bundle)


def node_channel(server: ServerProcess, agent: Agent) -> grpc.Channel:
    return grpc.secure_channel(
        server.runtime["node_address"], agent.credentials(), options=TLS_NAME
    )


def test_cli_against_a_running_server(server_process: ServerProcess, tmp_path: Path) -> None:
    server = server_process
    assert server.cli("healthcheck").stdout.strip() == "Server is healthy."

    pem = server.cli("bundle", "show").stdout
    bundle_file = tmp_path / "bundle.pem"
    bundle_file.write_text(pem)
    shown = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-in", str(bundle_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    spiffe = json.loads(server.cli("bundle", "show", "--format", "spiffe").stdout)
    assert {k["use"] for k in spiffe["keys"]} == {"x509-svid", "jwt-svid"}

    token = server.cli_json("token", "generate", "--ttl", "300")
    assert "token" in token
    agent = attest(server, token["token"], pem.encode())
    assert agent.spiffe_id == token["agent_spiffe_id"]

    entry = server.cli_json(
        "entry",
        "create",
        "--spiffe-id",
        f"{TD}/e2e/web",
        "--parent-id",
        agent.spiffe_id,
        "--selector",
        "unix:uid:1000",
        "--dns",
        "web.example.org",
    )
    text = server.cli("entry", "show", "--spiffe-id", f"{TD}/e2e/web").stdout
    assert "Found 1 entry" in text
    assert entry["id"] in text
    updated = server.cli_json("entry", "update", "--id", entry["id"], "--x509-ttl", "90")
    assert updated["x509_svid_ttl"] == 90

    with node_channel(server, agent) as channel:
        results = (
            node_pb2_grpc.NodeStub(channel)
            .BatchNewX509SVID(
                node_pb2.BatchNewX509SVIDRequest(
                    params=[node_pb2.X509SVIDParams(entry_id=entry["id"], csr=make_csr()[1])]
                ),
                timeout=10,
            )
            .results
        )
    chain = der_chain(results[0].cert_chain)
    leaf_file = tmp_path / "leaf.pem"
    leaf_file.write_bytes(chain[0].public_bytes(PEM))
    args = ["openssl", "verify", "-CAfile", str(bundle_file)]
    if len(chain) > 1:
        (tmp_path / "inter.pem").write_bytes(b"".join(c.public_bytes(PEM) for c in chain[1:]))
        args += ["-untrusted", str(tmp_path / "inter.pem")]
    verified = subprocess.run([*args, str(leaf_file)], capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    life = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert 90 <= life.total_seconds() <= 120

    agents = server.cli_json("agent", "list")["agents"]
    assert [a["spiffe_id"] for a in agents] == [agent.spiffe_id]
    assert (
        "Attestation type : join_token"
        in server.cli("agent", "show", "--spiffe-id", agent.spiffe_id).stdout
    )
    server.cli("agent", "ban", "--spiffe-id", agent.spiffe_id)
    assert server.cli_json("agent", "show", "--spiffe-id", agent.spiffe_id)["banned"] is True
    with node_channel(server, agent) as channel, pytest.raises(grpc.RpcError) as exc:
        node_pb2_grpc.NodeStub(channel).RenewAgent(
            node_pb2.RenewAgentRequest(csr=make_csr()[1]), timeout=10
        )
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    server.cli("agent", "evict", "--spiffe-id", agent.spiffe_id)
    assert server.cli_json("agent", "list")["agents"] == []

    server.cli("entry", "delete", "--id", entry["id"])
    assert server.cli_json("entry", "show")["entries"] == []

    bad = server.cli("entry", "show", "--id", "nosuch", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip() == "svid-server: error: NOT_FOUND: entry nosuch not found"

    # Logs are JSON lines and never carry the token's secret.
    logs = server.logs()
    secret = token["token"].split(".", 1)[1]
    assert secret not in logs
    for line in logs.splitlines():
        if line.startswith("{"):
            json.loads(line)
    assert server.stop() == 0
    assert not server.admin_socket.exists()
    assert '"msg":"server stopped"' in server.logs()


def test_sync_pushes_a_cli_created_entry_within_a_second(server_process: ServerProcess) -> None:
    server = server_process
    pem = server.cli("bundle", "show").stdout.encode()
    agent = attest(server, server.cli_json("token", "generate")["token"], pem)
    updates: list[tuple[float, node_pb2.SyncUpdate]] = []
    first_seen = threading.Event()
    with node_channel(server, agent) as channel:
        stream = node_pb2_grpc.NodeStub(channel).Sync(node_pb2.SyncRequest(), timeout=60)

        def reader() -> None:
            try:
                for update in stream:
                    updates.append((time.monotonic(), update))
                    first_seen.set()
            except grpc.RpcError:
                pass

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        assert first_seen.wait(10)
        assert list(updates[0][1].entries) == []
        created = server.cli_json(
            "entry",
            "create",
            "--spiffe-id",
            f"{TD}/e2e/pushed",
            "--parent-id",
            agent.spiffe_id,
            "--selector",
            "unix:uid:1000",
        )
        acknowledged = time.monotonic()

        def pushed() -> Any:
            for when, update in updates:
                if any(e.id == created["id"] for e in update.entries):
                    return when
            return None

        from tests.e2e.conftest import wait_for

        when = wait_for(pushed, 5, "the pushed entry")
        assert when - acknowledged < 1.0
        stream.cancel()
        thread.join(5)


def test_metrics_endpoint(tmp_path: Path) -> None:
    import urllib.request

    from tests.e2e.conftest import make_server, short_tmpdir

    root = short_tmpdir()
    server = make_server(root, metrics_address="127.0.0.1:0")
    server.start()
    try:
        base = f"http://{server.runtime['metrics_address']}"
        pem = server.cli("bundle", "show").stdout.encode()
        attest(server, server.cli_json("token", "generate")["token"], pem)
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as reply:
            body = reply.read().decode()
        assert 'svid_server_attestations_total{result="ok",type="join_token"} 1.0' in body
        assert 'svid_server_svids_issued_total{kind="agent"} 1.0' in body
        with urllib.request.urlopen(f"{base}/healthz", timeout=5) as reply:
            assert reply.status == 200
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_bad_config_fails_fast_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('trust_domain = "Bad_Domain"\n')
    from tests.e2e.conftest import server_command

    done = subprocess.run(
        [*server_command(), "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("svid-server: config error: trust_domain:")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("bind_address", "in use, or no such address/directory"),
        # Found before anything else starts: nothing is left running to the garbage collector.
        ("metrics_address", "Address already in use"),
    ],
)
def test_port_in_use_fails_with_the_key_named(key: str, why: str) -> None:
    import socket

    from tests.e2e.conftest import make_server, server_command, short_tmpdir

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    root = short_tmpdir()
    try:
        server = make_server(root, **{key: f"127.0.0.1:{port}"})
        done = subprocess.run(
            [*server_command(), "run", "--config", str(server.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        busy.close()
        shutil.rmtree(root, ignore_errors=True)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"svid-server: config error: {key}: cannot listen on 127.0.0.1:{port} ({why})"
    assert "Traceback" not in done.stderr
    assert "Exception ignored" not in done.stderr
