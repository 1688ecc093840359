"""The public task API (svid.tasks) against the real stack: a `svid-server run` process with an
operator's policy directory, a `svid-agent run` process, and this test as the agent runtime on
the agent's socket; tokens checked by a svid verifier fed from the same agent. No private
client, no svid._proto."""

from __future__ import annotations

import asyncio
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

import svid
from svid.tasks import (
    AsyncTaskClient,
    TaskClient,
    TaskDeniedError,
    TaskEndedError,
    TaskError,
    TaskRequestError,
)
from tests.e2e.agent_process import AgentProcess, create_entry, new_token
from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess, make_server, short_tmpdir, wait_for
from tests.e2e.held_socket import HeldSocket
from tests.e2e.interrupted_setup import CTRL_C_SAID, PRELUDE

pytestmark = pytest.mark.e2e
RUNTIME = f"spiffe://{TRUST_DOMAIN}/agents/research-bot"
SECRET = "vault:reports/api-key"
TICKETS = "mcp-tickets"

# The operator's policy: the shipped default, one tool kept out of reach, and a secret that may
# be fetched only in a short elevated step of a task working for someone.
EXTRA_POLICY = f"""
@id("no_customer_export_tool")
@reason("export_customer_data is not for agents")
forbid (
  principal,
  action == Action::"invoke_tool",
  resource == Tool::"{TICKETS}#export_customer_data"
);

@id("secret_in_elevated_step")
@ttl_cap("30")
permit (
  principal == Agent::"{RUNTIME}",
  action == Action::"fetch_secret",
  resource == Resource::"{SECRET}"
)
when {{ context.intent.elevated && context.intent.on_behalf_of != "" }};

@id("readme_elevated_step")
@ttl_cap("30")
permit (
  principal == Agent::"{RUNTIME}",
  action == Action::"fetch_secret",
  resource == Resource::"vault:x"
)
when {{ context.intent.elevated }};
"""
README = Path(__file__).resolve().parents[2] / "README.md"
README_MARKER = "<!-- tests/e2e/test_tasks_sdk.py runs this block -->"


@dataclass
class Stack:
    server: ServerProcess
    agent: AgentProcess
    source: svid.WorkloadApiSource

    @property
    def address(self) -> str:
        return f"unix://{self.agent.socket_path}"

    def verify(self, token: str, audience: str) -> svid.VerifiedJwt:
        return self.source.jwt_verifier().verify(token, audience)

    def task_state(self, task_id: str) -> str:
        shown = self.server.cli_json("task", "show", task_id)
        return str(shown.get("task", shown)["state"])

    def end_event_reason(self, task_id: str) -> str:
        """The reason on the server's task_end audit event of `task_id`."""
        (event,) = self.server.audit_events("--task", task_id, "--kind", "task_end")
        return str(event["reason"])

    def task_for(self, on_behalf_of: str) -> dict[str, Any] | None:
        """The server's task working for `on_behalf_of` (a name one test gives one task)."""
        listed = self.server.cli_json("task", "list", "--runtime-id", RUNTIME)["tasks"]
        return next((t for t in listed if t.get("on_behalf_of") == on_behalf_of), None)

    def held(self) -> HeldSocket:
        """A socket in front of the agent's that can hold either direction's bytes back."""
        return HeldSocket(
            self.agent.root / f"held-{uuid.uuid4().hex[:8]}.sock", self.agent.socket_path
        )


def policy_dir(root: Path) -> Path:
    """A policy directory under `root`: the shipped policy with EXTRA_POLICY."""
    policy = root / "policy"
    policy.mkdir()
    default = resources.files("server.policy").joinpath("default.cedar").read_text("utf-8")
    (policy / "svid.cedar").write_text(default + EXTRA_POLICY)
    return policy


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    root = short_tmpdir("svk")
    policy = policy_dir(root)
    server = make_server(root, policy_dir=str(policy))
    server.start()
    agent = AgentProcess(root, server, join_token=new_token(server))
    source: svid.WorkloadApiSource | None = None
    try:
        agent.start()
        create_entry(server, RUNTIME, agent.agent_id())
        agent.wait_svid(RUNTIME)
        source = svid.WorkloadApiSource(f"unix://{agent.socket_path}").start()
        assert source.wait_ready(20)
        yield Stack(server, agent, source)
    except BaseException:
        print(agent.logs()[-4000:])
        print(server.logs()[-4000:])
        raise
    finally:
        if source is not None:
            source.stop()
        agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_task_begins_mints_and_ends_through_the_public_sync_api(stack: Stack) -> None:
    with TaskClient(stack.address) as client:
        with client.begin(
            actions=["read"],
            resources=["docs"],
            on_behalf_of="user:alice",
            goal="summarise the Q3 reports",
            ttl=300,
        ) as task:
            assert task.decision == "allow"
            assert task.actions == ("read",)
            assert task.ttl == 300
            assert str(task.spiffe_id) == f"{RUNTIME}/task/{task.task_id}"
            # Usable at once: BeginTask answers once the agent serves the task.
            token = task.jwt("docs")
            assert task.jwt("docs") == token  # cached
            claims = stack.verify(token, "docs").task
            assert claims is not None
            assert claims.task_id == task.task_id
            assert claims.runtime_id == svid.SpiffeId.parse(RUNTIME)
            assert claims.on_behalf_of == "user:alice"
            assert claims.delegation_chain == (str(task.spiffe_id),)
            assert claims.allows("read", audience="docs")
            with pytest.raises(TaskDeniedError, match="lateral movement") as err:
                task.jwt("payroll")
            assert "payroll" in err.value.reason
        assert task.ended
        assert task.info.state == "ended"
        assert stack.task_state(task.task_id) == "ended"
        with pytest.raises(TaskEndedError):
            task.jwt("docs")

        # An error inside the block still ends the task, and the error is the one raised.
        failing = client.begin(actions=["read"], resources=["docs"])
        with pytest.raises(RuntimeError, match="tool crashed"), failing:
            raise RuntimeError("tool crashed")
        assert stack.task_state(failing.task_id) == "ended"


def test_a_denial_raises_a_typed_error_carrying_the_decisions_reason(stack: Stack) -> None:
    with TaskClient(stack.address) as client:
        with pytest.raises(TaskDeniedError) as err:
            client.begin(
                actions=["export_data"], resources=["s3:reports"], classification="restricted"
            )
        assert "no_restricted_export" in err.value.reason
        assert err.value.code == "PERMISSION_DENIED"
        # The decision's reason begins "denied: ": the message says so once.
        assert err.value.reason.startswith("denied: ")
        assert str(err.value) == f"BeginTask {err.value.reason}"


def test_a_task_jwt_is_fetched_again_once_half_its_lifetime_has_passed(stack: Stack) -> None:
    with (
        TaskClient(stack.address) as client,
        client.begin(actions=["read"], resources=["docs"], ttl=8) as task,
    ):
        first = task.jwt_svid("docs")
        assert task.jwt_svid("docs") is first
        lifetime = first.expires_at - int(first.claims["iat"])
        assert 0 < lifetime <= 8
        time.sleep(lifetime / 2 + 0.3)
        second = task.jwt_svid("docs")
        assert second.claims["jti"] != first.claims["jti"]
        assert stack.verify(second.token, "docs").task is not None


def test_a_fresh_task_jwt_is_minted_anew_and_then_handed_out(stack: Stack) -> None:
    """jwt(fresh=True): one the task has not traded, for a place that takes each once (svidd's
    token endpoint); a task JWT-SVID as any other, and what the task hands out next."""
    with TaskClient(stack.address) as client:
        with client.begin(actions=["read"], resources=["docs"]) as task:
            cached = task.jwt_svid("docs")
            fresh = task.jwt_svid("docs", fresh=True)
            assert fresh.claims["jti"] != cached.claims["jti"]
            assert task.jwt("docs") == fresh.token
            assert stack.verify(fresh.token, "docs").task is not None
            # (Not asked for a resource outside the task: each such request counts towards
            # stop_risky_agents for this module's runtime, which the other tests share.)
        with pytest.raises(TaskEndedError):
            task.jwt("docs", fresh=True)

    async def run() -> tuple[str, str, str]:
        async with (
            AsyncTaskClient(stack.address) as aclient,
            aclient.begin(actions=["read"], resources=["docs"]) as atask,
        ):
            first = await atask.jwt("docs")
            again = await atask.jwt("docs", fresh=True)
            return first, again, await atask.jwt("docs")

    first, again, after = asyncio.run(run())
    assert again != first
    assert after == again


def test_a_sub_task_token_carries_its_parents_txn_and_ends_with_it(stack: Stack) -> None:
    with TaskClient(stack.address) as client:
        with client.begin(
            actions=["read", "write"], resources=["docs", "wiki"], on_behalf_of="user:alice"
        ) as task:
            sub = task.subtask(actions=["read"], resources=["docs"])
            assert sub.info.parent_task_id == task.task_id
            claims = stack.verify(sub.jwt("docs"), "docs").task
            assert claims is not None
            assert claims.parent_task_id == task.task_id
            assert claims.delegation_chain == (str(sub.spiffe_id), str(task.spiffe_id))
            assert claims.on_behalf_of == "user:alice"
            with pytest.raises(TaskDeniedError, match="privilege chaining") as err:
                task.subtask(actions=["read"], resources=["payroll"])
            # Named as the method called, not the RPC under it.
            assert str(err.value).startswith("task.subtask denied: ")
            with pytest.raises(TaskDeniedError) as err:
                task.elevate(actions=["export_data"], resources=["s3:reports"])
            assert str(err.value).startswith("task.elevate denied: ")
        assert sub.ended
        assert stack.task_state(sub.task_id) == "ended"


def test_a_long_task_gets_a_short_elevated_step_that_ends_alone(stack: Stack) -> None:
    with TaskClient(stack.address) as client:
        with pytest.raises(TaskDeniedError, match="fetch_secret"):
            client.begin(actions=["fetch_secret"], resources=[SECRET], on_behalf_of="user:alice")
        with client.begin(
            actions=["read"], resources=["docs"], on_behalf_of="user:alice", ttl=900
        ) as task:
            assert task.ttl == 900
            with task.elevate(actions=["fetch_secret"], resources=[SECRET], ttl=300) as step:
                assert step.info.elevated
                assert step.ttl == 30
                assert step.expires_at <= task.expires_at
                claims = stack.verify(step.jwt(SECRET), SECRET).task
                assert claims is not None
                assert claims.elevated
                assert claims.allows("fetch_secret")
                assert claims.parent_task_id == task.task_id
            assert stack.task_state(step.task_id) == "ended"
            assert stack.task_state(task.task_id) == "active"
            parent_claims = stack.verify(task.jwt("docs"), "docs").task
            assert parent_claims is not None
            assert not parent_claims.elevated


def test_a_task_is_granted_one_tool_of_a_server_and_refused_another(stack: Stack) -> None:
    with TaskClient(stack.address) as client:
        with pytest.raises(TaskDeniedError, match="not for agents"):
            client.begin(tools={TICKETS: ["export_customer_data"]})
        with client.begin(tools={TICKETS: ["read_ticket", "export_customer_data"]}) as task:
            assert task.decision == "allow_constrained"
            assert task.tools == (f"{TICKETS}#read_ticket",)
            assert "no_customer_export_tool" in task.reason
            claims = stack.verify(task.jwt(TICKETS), TICKETS).task
            assert claims is not None
            assert claims.scope == ("tool:read_ticket",)
            assert claims.grants_tool("read_ticket", audience=TICKETS)
            assert not claims.grants_tool("export_customer_data", audience=TICKETS)
            assert claims.required_scope("export_customer_data") == "tool:export_customer_data"


def test_the_async_api_has_the_same_semantics(stack: Stack) -> None:
    async def run() -> tuple[str, str]:
        async with AsyncTaskClient(stack.address) as client:
            with pytest.raises(TaskDeniedError, match="no_restricted_export"):
                await client.begin(
                    actions=["export_data"], resources=["s3:reports"], classification="restricted"
                )
            async with client.begin(
                actions=["read"], resources=["docs"], on_behalf_of="user:alice"
            ) as task:
                token = await task.jwt("docs")
                assert await task.jwt("docs") == token
                sub = await task.subtask()
                claims = stack.verify(await sub.jwt("docs"), "docs").task
                assert claims is not None
                assert claims.parent_task_id == task.task_id
                # (A malformed request: a refused sub-task would count against the runtime.)
                with pytest.raises(TaskRequestError, match=r"^task\.subtask: bad request: "):
                    await task.subtask(actions=["read"], tools=["no-server-named"])
                with pytest.raises(TaskDeniedError, match=r"^task\.elevate denied: "):
                    await task.elevate(actions=["export_data"], resources=["s3:reports"])
                async with task.elevate(actions=["fetch_secret"], resources=[SECRET]) as step:
                    assert step.ttl == 30
                    await step.jwt(SECRET)
                assert step.ended
            assert task.ended
            assert sub.ended
            with pytest.raises(TaskEndedError):
                await task.jwt("docs")
            return token, task.task_id

    token, task_id = asyncio.run(run())
    assert stack.task_state(task_id) == "ended"

    # The ended task's tokens are refused once the revocation reaches the verifier.
    def refused() -> bool:
        try:
            stack.verify(token, "docs")
        except svid.RevokedError:
            return True
        return False

    wait_for(refused, 10, "the task's token to be revoked at the verifier")


def test_a_begin_cancelled_in_flight_ends_the_task_the_server_granted(stack: Stack) -> None:
    # The server grants the task, its answer is on the way, the caller is cancelled (a timeout,
    # a shutdown): the task must not stay open until its TTL with nobody to end it.
    principal = f"user:cancelled-{uuid.uuid4().hex[:8]}"

    async def run(held: HeldSocket) -> None:
        async with AsyncTaskClient(held.address) as client:
            await (await client.begin(actions=["read"], resources=["docs"])).end()  # connected
            held.hold_answers()
            beginning = asyncio.ensure_future(
                client.begin(actions=["read"], resources=["docs"], on_behalf_of=principal)
            )
            await asyncio.to_thread(wait_for, lambda: stack.task_for(principal), 20, "the grant")
            beginning.cancel()
            held.release()
            with pytest.raises(asyncio.CancelledError):
                await beginning

    with stack.held() as held:
        asyncio.run(run(held))
    granted = stack.task_for(principal)
    assert granted is not None
    assert granted["state"] == "ended"
    assert granted["end_reason"].endswith("its begin was cancelled before the answer")


def test_an_end_cancelled_in_flight_still_ends_the_task(stack: Stack) -> None:
    # Leaving `async with` while being cancelled: the EndTask must reach the server anyway.
    async def run(held: HeldSocket) -> str:
        async with AsyncTaskClient(held.address) as client:
            task = await client.begin(actions=["read"], resources=["docs"])
            held.hold_requests()
            ending = asyncio.ensure_future(task.__aexit__(None, None, None))
            await asyncio.to_thread(wait_for, lambda: held.requests.held, 10, "the EndTask")
            ending.cancel()
            await asyncio.sleep(0.3)  # what the cancellation sends is held too
            held.release()
            with pytest.raises(asyncio.CancelledError):
                await ending
            assert task.ended
            return task.task_id

    with stack.held() as held:
        task_id = asyncio.run(run(held))
    assert stack.task_state(task_id) == "ended"


# A runtime pressing Ctrl-C is a child process given a real SIGINT: a simulated one in this
# process (_thread.interrupt_main) could land after the test's `raises` block, or never, and a
# stray KeyboardInterrupt ends the whole test session. The runtimes watch no revocations: the
# stream's own request, opened at the first task, would be held with the call under test.
BEGIN_INTERRUPTED = (
    CTRL_C_SAID
    + """
import sys
from svid.tasks import TaskClient
with TaskClient(sys.argv[1], watch_revocations=False) as client:
    client.begin(actions=["read"], resources=["docs"]).end()  # connected
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        client.begin(actions=["read"], resources=["docs"], on_behalf_of=sys.argv[2])
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(0)
print("not interrupted", flush=True)
sys.exit(1)
"""
)

END_INTERRUPTED = (
    CTRL_C_SAID
    + """
import sys
from svid.tasks import TaskClient
# The EndTask is held as long as the test takes to interrupt it: it must not run out of time.
with TaskClient(sys.argv[1], watch_revocations=False, timeout=120) as client:
    task = client.begin(actions=["read"], resources=["docs"])
    print(task.task_id, flush=True)
    sys.stdin.readline()
    try:
        with task:
            pass
    except KeyboardInterrupt:
        print("interrupted", task.ended, flush=True)
        sys.exit(0)
print("not interrupted", flush=True)
sys.exit(1)
"""
)


# Ctrl-C while gRPC is still setting the EndTask up. Landing there on the main thread left the
# call with no thread to complete it: the task stayed open, and the client's close() waited
# forever.
END_INTERRUPTED_IN_SETUP = (
    PRELUDE
    + """
import sys
from svid.tasks import TaskClient
# Without the revocation stream: open, it keeps gRPC's call thread running, and the moment
# under test, that thread's start for the end, never comes.
with TaskClient(sys.argv[1], watch_revocations=False) as client:
    task = client.begin(actions=["read"], resources=["docs"])
    interrupt_next_call_setup()
    try:
        with task:
            pass
    except KeyboardInterrupt:
        print(task.task_id, task.ended, flush=True)
        sys.exit(0)
print("not interrupted", flush=True)
sys.exit(1)
"""
)


def _runtime(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt(runtime: subprocess.Popen[str], held: HeldSocket) -> list[str]:
    """Ctrl-C for the runtime while its call is held, then the call let through once the
    runtime says the Ctrl-C landed (CTRL_C_SAID): what the runtime printed after."""
    assert runtime.stdout is not None
    runtime.send_signal(signal.SIGINT)
    landed, _, _ = select.select([runtime.stdout], [], [], 60)
    assert landed, "the runtime did not take the Ctrl-C within 60 s"
    assert runtime.stdout.readline() == "ctrl-c\n"
    held.release()
    out, err = runtime.communicate(timeout=60)
    assert runtime.returncode == 0, err
    return out.splitlines()


def test_a_begin_interrupted_in_flight_ends_the_task_the_server_granted(stack: Stack) -> None:
    # Ctrl-C while the server's grant is on its way: the sync twin of the cancelled begin.
    principal = f"user:interrupted-{uuid.uuid4().hex[:8]}"
    with stack.held() as held:
        runtime = _runtime(BEGIN_INTERRUPTED, held.address, principal)
        try:
            assert runtime.stdout is not None
            assert runtime.stdin is not None
            assert runtime.stdout.readline().strip() == "ready"
            held.hold_answers()
            runtime.stdin.write("go\n")
            runtime.stdin.flush()
            wait_for(lambda: stack.task_for(principal), 20, "the grant")
            assert _interrupt(runtime, held) == ["interrupted"]
        finally:
            runtime.kill()
    granted = stack.task_for(principal)
    assert granted is not None
    assert granted["state"] == "ended"
    assert granted["end_reason"].endswith("its begin was interrupted before the answer")


def test_a_task_dropped_without_being_ended_warns_naming_it(stack: Stack) -> None:
    # A forgotten end leaves the task active, its SVIDs valid, until its TTL: say so, as an
    # unclosed file does, naming the task and what to do; an ended one is dropped silently.
    with TaskClient(stack.address) as client:
        forgotten = client.begin(actions=["read"], resources=["docs"])
        task_id = forgotten.task_id
        with pytest.warns(ResourceWarning, match=f"task {task_id} was never ended") as seen:
            del forgotten  # its last reference
        assert "end()" in str(seen[0].message)
        assert stack.task_state(task_id) == "active"
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            with client.begin(actions=["read"], resources=["docs"]) as ended:
                ended.subtask()
            del ended

    async def dropped() -> str:
        async with AsyncTaskClient(stack.address) as client:
            task = await client.begin(actions=["read"], resources=["docs"])
            return task.task_id

    with pytest.warns(ResourceWarning, match="was never ended"):
        asyncio.run(dropped())


def test_an_async_client_serves_the_loop_it_is_first_used_on_and_names_a_wrong_one(
    stack: Stack,
) -> None:
    # Made outside any loop (at import time, say) and used under asyncio.run: it works.
    client = AsyncTaskClient(stack.address)

    async def use() -> None:
        async with client.begin(actions=["read"], resources=["docs"]) as task:
            await task.jwt("docs")

    asyncio.run(use())
    # A gRPC asyncio channel serves one loop: another loop is told so, not "attached to a
    # different loop" from deep inside asyncio (or "Event loop is closed").
    with pytest.raises(RuntimeError, match=r"another event loop.*one client per event loop"):
        asyncio.run(use())


def test_a_task_revoked_at_the_server_says_why_when_the_runtime_ends_it(stack: Stack) -> None:
    # An operator revokes the task while the runtime still works in it: leaving the block must
    # tell the runtime that, and why, not only that the task is no longer active.
    with TaskClient(stack.address) as client:
        with client.begin(actions=["read"], resources=["docs"]) as task:
            stack.server.cli("task", "revoke", task.task_id, "--reason", "suspected misuse")
        assert task.info.state == "revoked"
        assert task.info.end_reason == "suspected misuse"
        with client.begin(actions=["read"], resources=["docs"]) as ended:
            pass
        assert ended.info.end_reason == "ended by its runtime"
        assert ended.info.ended_at >= ended.info.created_at > 0


def test_a_task_outliving_its_client_says_so_and_keeps_the_blocks_own_error(stack: Stack) -> None:
    # A task used after its client was closed got gRPC's own ValueError / UsageError ("Cannot
    # invoke RPC on closed channel!"), which also replaced the exception raised in its block.
    with TaskClient(stack.address) as client:
        task = client.begin(actions=["read"], resources=["docs"])
    with pytest.raises(TaskError, match="TaskClient was closed"):
        task.jwt("docs")
    with pytest.raises(RuntimeError, match="tool crashed"), task:
        raise RuntimeError("tool crashed")
    with pytest.raises(TaskError, match="TaskClient was closed"):
        client.begin(actions=["read"], resources=["docs"])
    stack.server.cli("task", "revoke", task.task_id)

    async def run() -> None:
        async with AsyncTaskClient(stack.address) as client:
            task = await client.begin(actions=["read"], resources=["docs"])
        with pytest.raises(TaskError, match="AsyncTaskClient was closed"):
            await task.jwt("docs")
        with pytest.raises(RuntimeError, match="tool crashed"):
            async with task:
                raise RuntimeError("tool crashed")
        stack.server.cli("task", "revoke", task.task_id)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # those tasks were never ended
        asyncio.run(run())


def test_a_task_revoked_while_in_use_refuses_further_tokens_as_ended_saying_why(
    stack: Stack,
) -> None:
    # The agent no longer serves a revoked task's identity: its refusal ("caller is not
    # entitled to ...") read as a policy denial, which a runtime may retry or report as one.
    # Without the revocation stream, which would otherwise often tell first.
    def unserved(task_id: svid.SpiffeId) -> None:
        def gone() -> bool:
            try:
                with svid.WorkloadApiClient(stack.address) as workload:
                    workload.fetch_jwt_svid("docs", task_id)
            except svid.workloadapi.WorkloadApiPermissionError:
                return True
            return False

        wait_for(gone, 10, "the agent to stop serving the revoked task")

    with (
        TaskClient(stack.address, watch_revocations=False) as client,
        client.begin(actions=["read"], resources=["docs", "wiki"]) as task,
    ):
        task.jwt("docs")
        stack.server.cli("task", "revoke", task.task_id, "--reason", "suspected misuse")
        unserved(task.spiffe_id)
        with pytest.raises(TaskEndedError, match="revoked: suspected misuse") as err:
            task.jwt("wiki")
        assert "begin a new task" in str(err.value)
        assert task.ended
        assert task.info.state == "revoked"
        with pytest.raises(TaskEndedError, match="revoked: suspected misuse"):
            task.subtask()

    async def run() -> None:
        async with (
            AsyncTaskClient(stack.address, watch_revocations=False) as client,
            client.begin(actions=["read"], resources=["docs"]) as task,
        ):
            await asyncio.to_thread(stack.server.cli, "task", "revoke", task.task_id)
            await asyncio.to_thread(unserved, task.spiffe_id)
            with pytest.raises(TaskEndedError, match="revoked: revoked by an operator"):
                await task.jwt("docs")
            assert task.ended
            with pytest.raises(TaskEndedError, match="revoked by an operator"):
                await task.elevate(actions=["read"], resources=["docs"])

    asyncio.run(run())


def test_the_readmes_task_block_runs_as_written(stack: Stack) -> None:
    text = README.read_text()
    assert README_MARKER in text, "README.md lost the svid.tasks block's marker"
    found = re.search(r"```python\n(.*?)```", text[text.index(README_MARKER) :], re.DOTALL)
    assert found is not None
    code = found.group(1) + "print('done', task.ended, step.ended, bool(secret_token))\n"
    env = {**os.environ, "SPIFFE_ENDPOINT_SOCKET": stack.address}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "allow ('read',) ('mcp-tickets#read_ticket',) 900",
        "done True True True",
    ]


def test_an_end_interrupted_in_flight_still_ends_the_task(stack: Stack) -> None:
    # Ctrl-C while leaving a task's block: the interrupted EndTask was dropped, the task left
    # open at the server and not ended in the runtime either.
    with stack.held() as held:
        runtime = _runtime(END_INTERRUPTED, held.address)
        try:
            assert runtime.stdout is not None
            assert runtime.stdin is not None
            task_id = runtime.stdout.readline().strip()
            assert task_id, runtime.communicate(timeout=60)[1]  # its begin failed: why
            # The runtime's next call is the EndTask: its request message is held, found by
            # its HTTP/2 frames. Not by counting the bytes a closed gate holds: a ping or a
            # window update the connection sent as the gate closed was all it counted, the
            # EndTask waiting behind it in the socket, unseen.
            held.hold_next_call()
            runtime.stdin.write("go\n")
            runtime.stdin.flush()
            wait_for(lambda: held.call_held, 60, "the EndTask")
            assert _interrupt(runtime, held) == ["interrupted True"]
        finally:
            runtime.kill()
    assert stack.task_state(task_id) == "ended"


def test_an_interrupt_while_the_end_is_being_set_up_still_ends_the_task(stack: Stack) -> None:
    runtime = _runtime(END_INTERRUPTED_IN_SETUP, stack.address)
    try:
        out, err = runtime.communicate(timeout=30)
    finally:
        runtime.kill()
    assert runtime.returncode == 0, err
    task_id, ended = out.split()
    assert ended == "True"
    assert stack.task_state(task_id) == "ended"


def test_a_runtime_ends_a_task_saying_why_and_the_server_records_it(stack: Stack) -> None:
    # EndTask carried no reason: every end by the runtime read "ended by its runtime".
    with TaskClient(stack.address) as client:
        task = client.begin(actions=["read"], resources=["docs"])
        with pytest.raises(ValueError, match="at most 200"):
            task.end(reason="x" * 201)
        with pytest.raises(ValueError, match="NUL"):
            task.end(reason="gave\x00up")
        with pytest.raises(ValueError, match="one line of printable text"):
            task.end(reason="gave up\nState          : active")
        assert not task.ended
        info = task.end(reason="user cancelled")
        assert info.end_reason == "ended by its runtime: user cancelled"
        assert stack.end_event_reason(task.task_id) == "ended by its runtime: user cancelled"
        # A reason that looks like a credential is dropped by the server; the task still ends.
        leaky = client.begin(actions=["read"], resources=["docs"])
        jwt_shaped = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlc2lnbmF0dXJl"
        info = leaky.end(reason=f"bad token {jwt_shaped}")
        assert info.state == "ended"
        assert "eyJ" not in info.end_reason
        assert "eyJ" not in stack.end_event_reason(leaky.task_id)

    async def run() -> str:
        async with AsyncTaskClient(stack.address) as client:
            task = await client.begin(actions=["read"], resources=["docs"])
            with pytest.raises(ValueError, match="at most 200"):
                await task.end(reason="x" * 201)
            info = await task.end(reason="plan finished early")
            assert info.end_reason == "ended by its runtime: plan finished early"
            return task.task_id

    task_id = asyncio.run(run())
    assert stack.end_event_reason(task_id) == "ended by its runtime: plan finished early"


def test_a_task_whose_block_raised_is_recorded_so_naming_only_the_exception_type(
    stack: Stack,
) -> None:
    # A block that raised ended its task as "ended by its runtime", as a clean end does. The
    # exception's message may hold a secret: only its type goes to the server.
    secret = "password=hunter2"
    with TaskClient(stack.address) as client:
        with (
            pytest.raises(ValueError, match="hunter2"),
            client.begin(actions=["read"], resources=["docs"]) as task,
        ):
            raise ValueError(secret)
        assert task.info.end_reason == "ended by its runtime: block raised ValueError"
        assert stack.end_event_reason(task.task_id) == task.info.end_reason
        with client.begin(actions=["read"], resources=["docs"]) as clean:
            pass
        assert clean.info.end_reason == "ended by its runtime"

    async def run() -> str:
        async with AsyncTaskClient(stack.address) as client:
            with pytest.raises(KeyError):
                async with client.begin(actions=["read"], resources=["docs"]) as task:
                    raise KeyError(secret)
            assert task.info.end_reason == "ended by its runtime: block raised KeyError"
            return task.task_id

    task_id = asyncio.run(run())
    assert stack.end_event_reason(task_id) == "ended by its runtime: block raised KeyError"
