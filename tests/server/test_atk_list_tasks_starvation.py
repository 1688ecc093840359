"""Attack repro: one agent's task listings starve every other agent's task begins.

NodeTasks.ListTasks has no budget: each call reads up to a page of the caller's tasks and counts
each one's credentials (a query per task) on the event loop's default executor, the thread pool
that every other agent's BeginTask and EndTask also run on (TaskService.begin: the decision, the
task row, the audit event). One agent holding a few hundred tasks and calling ListTasks from a
few dozen concurrent calls keeps that pool busy, and another agent's first task waits behind it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.serialization import Encoding

from svid._proto import task_pb2, task_pb2_grpc
from tests.server.fixtures import (
    TLS_NAME,
    Agent,
    RunningServer,
    bundle_pem,
    key_pem,
    managed_server,
)

HOSTILE_TASKS = 600
LISTERS = 32
# What one task begin may take while another agent lists its tasks.
VICTIM_BOUND = 2.0
_READ_DOCS = task_pb2.Intent(actions=["read"], resources=["docs"])


def _channel(server: RunningServer, agent: Agent) -> grpc.Channel:
    return grpc.secure_channel(
        server.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
    )


# The hostile agent's listers, in a process of their own (their own GIL, as on another host).
_LISTERS = """
import sys, threading, grpc
from svid._proto import task_pb2, task_pb2_grpc
address, files, runtime, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
bundle, key, chain = (open(f"{files}/{n}", "rb").read() for n in ("bundle", "key", "chain"))
creds = grpc.ssl_channel_credentials(bundle, key, chain)
said = threading.Event()
def run():
    with grpc.secure_channel(
        address, creds, options=[("grpc.ssl_target_name_override", "svid-server")]
    ) as channel:
        stub = task_pb2_grpc.NodeTasksStub(channel)
        while True:
            stub.ListTasks(
                task_pb2.NodeListTasksRequest(runtime_ids=[runtime], page_size=5000), timeout=120
            )
            if not said.is_set():  # once: nobody reads the pipe after the first line
                said.set()
                print("listed", flush=True)
for _ in range(count):
    threading.Thread(target=run, daemon=True).start()
threading.Event().wait()
"""


def _start_listers(
    server: RunningServer, agent: Agent, runtime: str, files: Path
) -> subprocess.Popen[bytes]:
    (files / "bundle").write_bytes(bundle_pem(agent.bundle))
    (files / "key").write_bytes(key_pem(agent.key))
    (files / "chain").write_bytes(b"".join(c.public_bytes(Encoding.PEM) for c in agent.chain))
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            _LISTERS,
            server.runtime.node_address,
            str(files),
            runtime,
            str(LISTERS),
        ],
        stdout=subprocess.PIPE,
    )


def test_one_agents_task_listings_do_not_starve_another_agents_begin() -> None:
    with managed_server() as server:
        hostile, honest = server.attest(), server.attest()
        runtime = server.create_entry("/agents/lister", hostile.spiffe_id).spiffe_id
        victim = server.create_entry("/agents/victim", honest.spiffe_id).spiffe_id
        with _channel(server, hostile) as channel:
            stub = task_pb2_grpc.NodeTasksStub(channel)
            for _ in range(HOSTILE_TASKS):
                stub.BeginTask(
                    task_pb2.NodeBeginTaskRequest(runtime_id=runtime, intent=_READ_DOCS, ttl=900),
                    timeout=10,
                )
                server.clock.advance(0.05)  # within task_begin_rate_per_runtime (20 a second)
        files = Path(tempfile.mkdtemp(prefix="atk-"))
        listers = _start_listers(server, hostile, runtime, files)
        try:
            assert listers.stdout is not None
            assert listers.stdout.readline() == b"listed\n"  # the listings are under way
            time.sleep(1)
            with _channel(server, honest) as channel:
                stub = task_pb2_grpc.NodeTasksStub(channel)
                started = time.monotonic()
                stub.BeginTask(
                    task_pb2.NodeBeginTaskRequest(runtime_id=victim, intent=_READ_DOCS, ttl=300),
                    timeout=60,
                )
                took = time.monotonic() - started
        finally:
            listers.kill()
            listers.wait()
            shutil.rmtree(files, ignore_errors=True)
        assert took < VICTIM_BOUND, (
            f"another agent's task begin took {took:.1f} s while one agent ran {LISTERS} "
            f"ListTasks calls at a time, each of {HOSTILE_TASKS} tasks"
        )
