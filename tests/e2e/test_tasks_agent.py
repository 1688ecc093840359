"""End to end through the whole path: a workload (this test) on the agent's socket, a real
`svid-agent run` process, a real `svid-server run` process. The six scenarios of issue 6 that
involve a running agent, plus the verifier fed from the agent after a task ends."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

import svid
from svid._proto import (
    revocation_pb2,
    revocation_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
    workload_pb2,
    workload_pb2_grpc,
)
from tests.e2e.agent_process import agent_ids, create_entry, new_token
from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess, make_server, short_tmpdir, wait_for
from tests.users import NOBODY

pytestmark = pytest.mark.e2e
TD = f"spiffe://{TRUST_DOMAIN}"
RUNTIME = f"{TD}/agents/research-bot"
HEADER = (("workload.spiffe.io", "true"),)
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class AgentProcess:
    root: Path
    proc: subprocess.Popen[bytes]
    socket_path: Path

    def logs(self) -> str:
        path = self.root / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_agent(root: Path, server: ServerProcess, token: str) -> AgentProcess:
    bundle = root / "bundle.pem"
    bundle.write_text(server.bundle_pem())
    socket_path = root / "public" / "api.sock"
    config = root / "agent.toml"
    values = {
        "server_address": server.runtime["node_address"],
        "server_attest_address": server.runtime["attest_address"],
        "trust_bundle": str(bundle),
        "join_token": token,
        "data_dir": str(root / "agent"),
        "socket_path": str(socket_path),
        "log_level": "info",
    }
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    with (root / "agent.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent_attestor.cli", "run", "--config", str(config)],
            stdout=log,
            stderr=log,
        )
    return AgentProcess(root, proc, socket_path)


@dataclass
class Path3:
    server: ServerProcess
    agent: AgentProcess
    channel: grpc.Channel

    @property
    def tasks(self) -> task_pb2_grpc.TasksStub:
        return task_pb2_grpc.TasksStub(self.channel)

    @property
    def workload(self) -> workload_pb2_grpc.SpiffeWorkloadAPIStub:
        return workload_pb2_grpc.SpiffeWorkloadAPIStub(self.channel)

    def begin(self, **kw: Any) -> task_pb2.Task:
        intent = task_pb2.Intent(
            actions=kw.pop("actions", ["read"]),
            resources=kw.pop("resources", ["docs"]),
            classification=kw.pop("classification", ""),
            on_behalf_of=kw.pop("on_behalf_of", "user:alice"),
            goal=kw.pop("goal", "summarise the Q3 reports"),
        )
        request = task_pb2.BeginTaskRequest(intent=intent, ttl=kw.pop("ttl", 300), **kw)
        task: task_pb2.Task = self.tasks.BeginTask(request, metadata=HEADER, timeout=10).task
        return task

    def jwt(self, spiffe_id: str, audience: str) -> str:
        reply = self.workload.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(spiffe_id=spiffe_id, audience=[audience]),
            metadata=HEADER,
            timeout=10,
        )
        return str(reply.svids[0].svid)

    def jwt_eventually(self, spiffe_id: str, audience: str) -> str:
        """The task entry reaches the agent over Sync a moment after BeginTask returns."""

        def attempt() -> str | None:
            try:
                return self.jwt(spiffe_id, audience)
            except grpc.RpcError as exc:
                if exc.code() is grpc.StatusCode.PERMISSION_DENIED and "entitled" in (
                    exc.details() or ""
                ):
                    return None
                raise

        return str(wait_for(attempt, 10, f"a JWT-SVID for {spiffe_id}"))


@pytest.fixture
def path3() -> Iterator[Path3]:
    root = short_tmpdir("sva")
    server = make_server(root)
    server.start()
    agent: AgentProcess | None = None
    channel: grpc.Channel | None = None
    try:
        agent = start_agent(root, server, new_token(server))

        def attested() -> str | None:
            listed = agent_ids(server)
            return listed[0] if listed else None

        agent_id = wait_for(attested, 20, "the agent to attest")
        create_entry(server, RUNTIME, agent_id, f"unix:uid:{os.getuid()}")
        channel = grpc.insecure_channel(f"unix:{agent.socket_path}")
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)

        def has_svid() -> bool:
            try:
                stream = stub.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=5
                )
                first = next(stream)
                stream.cancel()
                return bool(first.svids)
            except grpc.RpcError:
                return False

        wait_for(has_svid, 20, "the runtime's X.509-SVID at the agent", interval=0.1)
        yield Path3(server, agent, channel)
    except BaseException:
        if agent is not None:
            print(agent.logs()[-4000:])
        print(server.logs()[-4000:])
        raise
    finally:
        if channel is not None:
            channel.close()
        if agent is not None:
            agent.stop()
        if server.proc is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_research_task_reads_documents_then_ends_and_is_revoked_everywhere(
    path3: Path3,
) -> None:
    x509_stream = path3.workload.FetchX509SVID(
        workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=60
    )
    assert [s.spiffe_id for s in next(x509_stream).svids] == [RUNTIME]
    task = path3.begin()
    assert task.spiffe_id == f"{RUNTIME}/task/{task.task_id}"

    # The task X.509-SVID joins the open stream, after the runtime's own (still the default).
    def with_task() -> workload_pb2.X509SVIDResponse | None:
        msg = next(x509_stream)
        return msg if len(msg.svids) == 2 else None

    msg = wait_for(with_task, 10, "the task X.509-SVID on the open stream")
    assert [s.spiffe_id for s in msg.svids] == [RUNTIME, task.spiffe_id]
    serial = svid.parse_der_certs(msg.svids[1].x509_svid)[0].serial_number

    # In intent: a JWT-SVID with the task claims, accepted by a svid verifier fed from the agent.
    token = path3.jwt_eventually(task.spiffe_id, "docs")
    bundles = path3.workload.FetchJWTBundles(
        workload_pb2.JWTBundlesRequest(), metadata=HEADER, timeout=10
    )
    jwks = next(bundles).bundles[TD]
    bundles.cancel()
    jwt_bundle = svid.JwtBundle.parse_jwks(svid.TrustDomain(TRUST_DOMAIN), jwks)
    revocations = svid.RevocationSet()
    verifier = svid.JwtVerifier(lambda _td: jwt_bundle, revocations=revocations)
    verified = verifier.verify(token, "docs")
    assert str(verified.spiffe_id) == task.spiffe_id
    assert verified.claims["txn"] == task.task_id
    assert verified.claims["scope"] == "read"
    assert verified.claims["obo"] == "user:alice"
    assert verified.claims["act"] == {"sub": task.spiffe_id}
    watch = revocation_pb2_grpc.RevocationsStub(path3.channel).Watch(
        revocation_pb2.WatchRequest(), metadata=HEADER, timeout=60
    )
    next(watch)

    # End: the verifier fed from the agent refuses the JWT, the stream drops the X.509-SVID and
    # the CRL lists its serial.
    path3.tasks.EndTask(task_pb2.EndTaskRequest(task_id=task.task_id), metadata=HEADER, timeout=10)

    def fed() -> bool:
        items = next(watch).items
        revocations.replace(svid.Revoked(i.kind, i.value, i.expires_at) for i in items)
        return revocations.is_jti_revoked(str(verified.claims["jti"]))

    wait_for(fed, 5, "the revocation list from the agent")
    with pytest.raises(svid.RevokedError):
        verifier.verify(token, "docs")
    watch.cancel()

    def without_task() -> workload_pb2.X509SVIDResponse | None:
        msg = next(x509_stream)
        return msg if len(msg.svids) == 1 and msg.crl else None

    msg = wait_for(without_task, 10, "the stream without the task SVID, with a CRL")
    assert [s.spiffe_id for s in msg.svids] == [RUNTIME]
    crl = x509.load_der_x509_crl(msg.crl[0])
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    x509_stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        path3.workload.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="docs", svid=token),
            metadata=HEADER,
            timeout=10,
        )
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        path3.jwt(task.spiffe_id, "docs")
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED

    # The audit log has the whole story, validation at the agent included.
    def validated() -> list[dict[str, Any]] | None:
        out = path3.server.cli(
            "audit", "export", "--data-dir", str(path3.server.data_dir), "--kind", "jwt_validated"
        ).stdout
        events = [json.loads(line) for line in out.splitlines() if line.strip()]
        return events or None

    (event,) = wait_for(validated, 5, "the agent's validation report")
    assert event["decision"] == "deny"
    assert event["task_id"] == task.task_id


def test_out_of_intent_audience_is_denied_and_flagged(path3: Path3) -> None:
    task = path3.begin()
    path3.jwt_eventually(task.spiffe_id, "docs")
    with pytest.raises(grpc.RpcError) as err:
        path3.jwt(task.spiffe_id, "payroll")
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "lateral movement" in (err.value.details() or "")
    out = path3.server.cli(
        "audit", "export", "--data-dir", str(path3.server.data_dir), "--decision", "deny"
    ).stdout
    (denial,) = [json.loads(line) for line in out.splitlines()]
    assert denial["task_id"] == task.task_id
    assert denial["extra"]["flag"] == "lateral_movement"


def test_restricted_export_and_widening_sub_task_are_denied(path3: Path3) -> None:
    with pytest.raises(grpc.RpcError) as err:
        path3.begin(actions=["export_data"], resources=["s3:reports"], classification="restricted")
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    parent = path3.begin()
    with pytest.raises(grpc.RpcError) as err:
        path3.begin(resources=["docs", "payroll"], parent_task_id=parent.task_id)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "privilege chaining" in (err.value.details() or "")
    listed = path3.tasks.ListTasks(task_pb2.ListTasksRequest(), metadata=HEADER, timeout=10)
    assert [t.task_id for t in listed.tasks] == [parent.task_id]


def _agent_cli(
    path3: Path3, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent_attestor.cli", *args, "--socket-path",
         str(path3.agent.socket_path)],
        capture_output=True, text=True, timeout=60, check=False, input=stdin,
    )  # fmt: skip


def test_a_task_goal_can_be_kept_off_the_command_line(path3: Path3, tmp_path: Path) -> None:
    """A goal on argv is readable by every local user in /proc/<pid>/cmdline while the command
    runs: it may come from stdin or a file instead, hashed the same (edges stripped, as on argv)."""
    goal_file = tmp_path / "goal.txt"
    goal_file.write_text("secret plan\n")
    hashes = []
    for how, stdin in (
        (["--goal", " secret plan "], None),
        (["--goal", "-"], "secret plan\n"),
        (["--goal-file", str(goal_file)], None),
    ):
        begun = _agent_cli(
            path3, "task", "begin", "--action", "read", "--resource", "docs", *how,
            "--output", "json", stdin=stdin,
        )  # fmt: skip
        assert begun.returncode == 0, begun.stderr
        assert "secret plan" not in begun.stdout + begun.stderr
        hashes.append(json.loads(begun.stdout)["tasks"][0]["goal_sha256"])
    assert hashes == [hashlib.sha256(b"secret plan").hexdigest()] * 3
    missing = _agent_cli(
        path3, "task", "begin", "--action", "read", "--goal-file", str(tmp_path / "none")
    )
    assert missing.returncode == 2
    assert f"--goal-file: cannot read {tmp_path / 'none'}: No such file" in missing.stderr
    both = _agent_cli(path3, "task", "begin", "--goal", "x", "--goal-file", str(goal_file))
    assert both.returncode == 2
    assert "not allowed with argument" in both.stderr


def test_task_commands_of_the_agent_cli(path3: Path3) -> None:
    begun = _agent_cli(
        path3, "task", "begin", "--action", "read", "--resource", "docs",
        "--on-behalf-of", "user:alice", "--goal", "secret plan", "--output", "json",
    )  # fmt: skip
    assert begun.returncode == 0, begun.stderr
    task = json.loads(begun.stdout)["tasks"][0]
    assert task["spiffe_id"] == f"{RUNTIME}/task/{task['task_id']}"
    assert task["actions"] == ["read"]
    assert task["state"] == "active"
    assert "secret plan" not in begun.stdout  # only the goal's hash leaves the node

    step_run = _agent_cli(
        path3, "task", "begin", "--parent-task", task["task_id"], "--elevate",
        "--tool", "mcp-tickets#read_ticket", "--output", "json",
    )  # fmt: skip
    assert step_run.returncode == 0, step_run.stderr
    step = json.loads(step_run.stdout)["tasks"][0]
    assert step["elevated"] is True
    assert step["tools"] == ["mcp-tickets#read_ticket"]
    assert step["parent_task_id"] == task["task_id"]
    ended_step = _agent_cli(path3, "task", "end", "--id", step["task_id"], "--output", "json")
    assert ended_step.returncode == 0, ended_step.stderr

    listed = _agent_cli(path3, "task", "list", "--output", "json")
    listed_ids = sorted(t["task_id"] for t in json.loads(listed.stdout)["tasks"])
    assert listed_ids == sorted([task["task_id"], step["task_id"]])

    path3.jwt_eventually(task["spiffe_id"], "docs")
    denied = _agent_cli(
        path3, "api", "fetch", "jwt", "--audience", "payroll", "--spiffe-id", task["spiffe_id"]
    )
    assert denied.returncode == 1
    assert "PERMISSION_DENIED" in denied.stderr
    assert "lateral movement" in denied.stderr

    ended = _agent_cli(
        path3, "task", "end", "--id", task["task_id"], "--reason", "plan done", "--output", "json"
    )
    assert ended.returncode == 0, ended.stderr
    (shown,) = json.loads(ended.stdout)["tasks"]
    assert shown["state"] == "ended"
    assert shown["end_reason"] == "ended by its runtime: plan done"

    shown_text = _agent_cli(path3, "task", "list", "--state", "ended")
    assert "Ended       : ended by its runtime: plan done" in shown_text.stdout

    unknown = _agent_cli(path3, "task", "end", "--id", "0000000000000000")
    assert unknown.returncode == 1
    assert "svid-agent:" in unknown.stderr


def test_agent_cli_task_list_follows_pages_and_filters(path3: Path3) -> None:
    begun = [path3.begin() for _ in range(3)]
    path3.tasks.EndTask(
        task_pb2.EndTaskRequest(task_id=begun[1].task_id), metadata=HEADER, timeout=10
    )

    def listed(*flags: str) -> list[str]:
        out = _agent_cli(path3, "task", "list", "--output", "json", *flags)
        assert out.returncode == 0, out.stderr
        return [t["task_id"] for t in json.loads(out.stdout)["tasks"]]

    ids = [t.task_id for t in sorted(begun, key=lambda t: (t.created_at, t.task_id))]
    assert listed("--page-size", "1") == ids  # three pages, every one read
    assert listed("--page-size", "2", "--state", "active") == [
        i for i in ids if i != begun[1].task_id
    ]
    assert listed("--state", "ended") == [begun[1].task_id]
    assert listed("--spiffe-id", RUNTIME, "--page-size", "1") == ids
    foreign = _agent_cli(path3, "task", "list", "--spiffe-id", f"{TD}/someone-else")
    assert foreign.returncode == 1
    assert "PERMISSION_DENIED" in foreign.stderr
    for bad in ("0", "5001"):
        refused = _agent_cli(path3, "task", "list", "--page-size", bad)
        assert refused.returncode != 0
        assert "page" in refused.stderr, refused.stderr


def test_fetch_jwt_without_spiffe_id_ignores_open_tasks_and_never_counts_against_the_runtime(
    path3: Path3,
) -> None:
    # A standard client (py-spiffe's JwtSource.fetch_svid(audience)) names no SPIFFE ID. While a
    # task is open, that must neither mint for the task nor record a violation: six such calls
    # used to flag lateral movement six times and lock the runtime out of every task begin.
    task = path3.begin()
    path3.jwt_eventually(task.spiffe_id, "docs")
    for _ in range(6):
        reply = path3.workload.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["payroll"]), metadata=HEADER, timeout=10
        )
        assert [s.spiffe_id for s in reply.svids] == [RUNTIME]
    out = path3.server.cli(
        "audit", "export", "--data-dir", str(path3.server.data_dir), "--decision", "deny"
    ).stdout
    assert [json.loads(line) for line in out.splitlines() if line.strip()] == []
    again = path3.begin()
    assert again.spiffe_id == f"{RUNTIME}/task/{again.task_id}"


def _tasks_as_nobody(socket_path: Path, calls: str) -> dict[str, Any]:
    """Run `calls` (Python, with `tasks` a TasksStub on the agent's socket and `out` a dict
    printed as JSON) as `nobody`, once the agent serves it an identity."""
    script = textwrap.dedent(
        f"""
        import json, os, time, grpc
        from svid._proto import task_pb2, task_pb2_grpc
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        tasks = task_pb2_grpc.TasksStub(grpc.insecure_channel("unix:{socket_path}"))
        H = {HEADER!r}
        def code(call):
            try:
                call()
                return "OK"
            except grpc.RpcError as exc:
                return exc.code().name
        for _ in range(200):  # its entry reaches the agent over Sync
            if code(lambda: tasks.ListTasks(task_pb2.ListTasksRequest(), metadata=H)) == "OK":
                break
            time.sleep(0.1)
        out = {{}}
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script + textwrap.dedent(calls) + "\nprint(json.dumps(out))\n"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(ROOT),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another uid")
def test_a_workload_ends_lists_and_extends_only_its_own_tasks_of_a_shared_identity(
    path3: Path3,
) -> None:
    """This test (root) and `nobody` hold RUNTIME through two entries. The task ID is public
    (every token's `txn`): `nobody` can name this test's task but not end it, list it or begin
    a sub-task inside it; and this test cannot end nobody's task."""
    (agent_id,) = agent_ids(path3.server)
    create_entry(path3.server, RUNTIME, agent_id, f"unix:uid:{NOBODY}")
    for path in (path3.agent.root, path3.agent.socket_path.parent):
        path.chmod(0o755)
    mine = path3.begin()
    theirs = _tasks_as_nobody(
        path3.agent.socket_path,
        f"""
        intent = task_pb2.Intent(actions=["read"], resources=["docs"], on_behalf_of="user:eve")
        out["sub"] = code(lambda: tasks.BeginTask(task_pb2.BeginTaskRequest(
            intent=task_pb2.Intent(actions=["read"], resources=["docs"]),
            parent_task_id={mine.task_id!r}, ttl=60), metadata=H, timeout=10))
        out["end"] = code(lambda: tasks.EndTask(
            task_pb2.EndTaskRequest(task_id={mine.task_id!r}), metadata=H, timeout=10))
        out["own"] = tasks.BeginTask(
            task_pb2.BeginTaskRequest(intent=intent, ttl=300), metadata=H, timeout=10
        ).task.task_id
        listed = tasks.ListTasks(task_pb2.ListTasksRequest(), metadata=H, timeout=10)
        out["listed"] = [t.task_id for t in listed.tasks]
        """,
    )
    assert (theirs["sub"], theirs["end"]) == ("PERMISSION_DENIED", "PERMISSION_DENIED")
    assert theirs["listed"] == [theirs["own"]]
    listed = path3.tasks.ListTasks(task_pb2.ListTasksRequest(), metadata=HEADER, timeout=10)
    assert [(t.task_id, t.state) for t in listed.tasks] == [(mine.task_id, "active")]
    with pytest.raises(grpc.RpcError) as err:
        path3.tasks.EndTask(
            task_pb2.EndTaskRequest(task_id=theirs["own"]), metadata=HEADER, timeout=10
        )
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    ended = path3.tasks.EndTask(
        task_pb2.EndTaskRequest(task_id=mine.task_id), metadata=HEADER, timeout=10
    ).task
    assert ended.state == "ended"
