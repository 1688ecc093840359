"""Process helpers for agent end-to-end tests: a real `svid-agent run` next to a real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from svid._proto import admin_pb2, common_pb2, workload_pb2, workload_pb2_grpc
from tests.e2e.conftest import (
    START_TIMEOUT,
    ChildProcess,
    ServerProcess,
    wait_for,
    with_descriptor_limit,
)

HEADER = (("workload.spiffe.io", "true"),)
# Flags for an agent a test lets fail a few more retries before it looks: they come 0.1-0.3 s
# apart, not up to 1 s (AgentProcess's --reconnect-max), so RETRY_ROUNDS seconds hold several
# of them and outlast any one backoff, where tests waited three or four.
FAST_RETRIES = ("--reconnect-min", "0.1", "--reconnect-max", "0.3")
RETRY_ROUNDS = 1.0


def agent_command() -> list[str]:
    return [sys.executable, "-m", "agent_attestor.cli"]


@dataclass
class AgentProcess(ChildProcess):
    root: Path
    server: ServerProcess
    join_token: str = ""
    proc: subprocess.Popen[bytes] | None = None
    use_trust_bundle: bool = True
    descriptor_limit: int | None = None  # RLIMIT_NOFILE (soft and hard) for the agent
    # (node, attest) address of each server, for an agent that fails over between several;
    # empty: `server`'s own.
    servers: tuple[tuple[str, str], ...] = ()
    # Variables set for the agent process on top of the test's own environment.
    environment: dict[str, str] = field(default_factory=dict)
    data_dir_name: str = "agent"  # under root
    flags: tuple[str, ...] = ()  # given to every start, before start()'s own

    @property
    def data_dir(self) -> Path:
        return self.root / self.data_dir_name

    @property
    def socket_path(self) -> Path:
        return self.root / "ws" / "api.sock"

    @property
    def log_path(self) -> Path:
        return self.root / "agent.log"

    def bundle_file(self) -> Path:
        path = self.root / "bundle.pem"
        if not path.exists():
            path.write_text(self.server.bundle_pem())
        return path

    def start(self, *extra: str) -> AgentProcess:
        limit = self.descriptor_limit
        args = [
            *(with_descriptor_limit(limit, limit) if limit is not None else []),
            *agent_command(),
            "run",
            *self._server_flags(),
            *(["--trust-bundle", str(self.bundle_file())] if self.use_trust_bundle else []),
            "--data-dir",
            str(self.data_dir),
            "--socket-path",
            str(self.socket_path),
            "--reconnect-max",
            "1",
            *self.flags,
            *extra,
        ]
        if self.join_token:
            # As an operator should: from a 0600 file, never on the command line.
            token_file = self.root / "join-token"
            token_file.write_text(self.join_token)
            token_file.chmod(0o600)
            args += ["--join-token-file", str(token_file)]
        log = self.log_path.open("ab")
        env = {**os.environ, **self.environment}
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=str(self.root), env=env)
        log.close()
        wait_for(self._socket_ready, START_TIMEOUT, "the agent's socket")
        return self

    def _server_flags(self) -> list[str]:
        if not self.servers:
            rt = self.server.runtime
            return [
                "--server-address",
                rt["node_address"],
                "--server-attest-address",
                rt["attest_address"],
            ]
        flags = []
        for node, attest in self.servers:
            flags += ["--server-addresses", node, "--server-attest-addresses", attest]
        return flags

    def _socket_ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
        return self.socket_path.exists()

    def runtime(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """This run's agent.json (its metrics address, its pid). The agent writes it just after
        its socket appears, which is all start() waits for; a file left by an earlier run of
        the same data directory names another pid and is not taken."""
        return self.wait_runtime_file(self.data_dir / "agent.json", "agent", timeout)

    def agent_id(self, timeout: float = START_TIMEOUT) -> str:
        """The agent's SPIFFE ID, from the server's agent list (attestation done)."""

        def find() -> str | None:
            for spiffe_id in agent_ids(self.server):
                if self.join_token and self.join_token.split(".")[0] in spiffe_id:
                    return spiffe_id
            return None

        return str(wait_for(find, timeout, "the agent to attest"))

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*agent_command(), *args, "--socket-path", str(self.socket_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def stub(self) -> workload_pb2_grpc.SpiffeWorkloadAPIStub:
        return workload_pb2_grpc.SpiffeWorkloadAPIStub(
            grpc.insecure_channel(f"unix:{self.socket_path}")
        )

    def wait_svid(self, spiffe_id: str, timeout: float = START_TIMEOUT) -> Any:
        stub = self.stub()

        def fetch() -> Any:
            try:
                msg = next(
                    stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=5)
                )
            except grpc.RpcError:
                return None
            return msg if any(s.spiffe_id == spiffe_id for s in msg.svids) else None

        return wait_for(fetch, timeout, f"an SVID for {spiffe_id}", interval=0.1)


def new_token(server: ServerProcess, ttl: int = 0) -> str:
    """A join token (`svid-server token generate [--ttl TTL]`; 0: the server's join_token_ttl)."""
    reply = server.admin("CreateJoinToken", admin_pb2.CreateJoinTokenRequest(ttl=ttl))
    return str(reply.token)


def list_agents(server: ServerProcess) -> list[admin_pb2.Agent]:
    """Every attested agent (`svid-server agent list`), page after page."""
    agents: list[admin_pb2.Agent] = []
    request = admin_pb2.ListAgentsRequest()
    while True:
        reply = server.admin("ListAgents", request)
        agents += reply.agents
        if not reply.next_page_token:
            return agents
        request.page_token = reply.next_page_token


def agent_ids(server: ServerProcess) -> list[str]:
    """The SPIFFE ID of every attested agent, as `svid-server agent list` lists them."""
    return [agent.spiffe_id for agent in list_agents(server)]


def entry(spiffe_id: str, parent_id: str, *selectors: str, **fields: Any) -> common_pb2.Entry:
    """An entry as `svid-server entry create` makes it: selectors as TYPE:VALUE (default this
    uid), then any other field of the entry (x509_svid_ttl=30, federates_with=[...])."""
    made = common_pb2.Entry(spiffe_id=spiffe_id, parent_id=parent_id, **fields)
    for sel in selectors or (f"unix:uid:{os.getuid()}",):
        kind, _, value = sel.partition(":")
        made.selectors.add(type=kind, value=value)
    return made


def create_entry(
    server: ServerProcess, spiffe_id: str, parent_id: str, *selectors: str, **fields: Any
) -> str:
    """`svid-server entry create` of entry(...): the new entry's ID."""
    request = admin_pb2.CreateEntryRequest(entry=entry(spiffe_id, parent_id, *selectors, **fields))
    return str(server.admin("CreateEntry", request).entry.id)


def create_entries(
    server: ServerProcess, parent_id: str, spiffe_ids: list[str], selector: str
) -> dict[str, str]:
    """SPIFFE ID -> entry ID of one entry each under `parent_id`, made in one batch (as
    `svid-server entry create --file` sends them), every one of them created."""
    request = admin_pb2.BatchCreateEntryRequest(
        entries=[entry(sid, parent_id, selector) for sid in spiffe_ids]
    )
    results = server.admin("BatchCreateEntry", request).results
    refused = [(r.spiffe_id, r.status.message) for r in results if r.status.code != 0]
    assert not refused, f"entries refused: {refused}"
    return {sid: str(result.id) for sid, result in zip(spiffe_ids, results, strict=True)}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@contextmanager
def agent_stack(
    root: Path, server: ServerProcess, *, start: bool = True, **agent_options: Any
) -> Iterator[AgentProcess]:
    """A real agent for `server` (started unless `start` is False); on exit the agent and the
    server stop, the agent's log is printed (pytest shows it when a test fails), and `root`
    goes."""
    agent = AgentProcess(root, server, new_token(server), **agent_options)
    try:
        if start:
            agent.start()
        yield agent
    finally:
        agent.stop()
        print("---- agent log ----\n" + agent.logs()[-6000:])
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
