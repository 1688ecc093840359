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

from svid._proto import workload_pb2, workload_pb2_grpc
from tests.e2e.conftest import (
    START_TIMEOUT,
    ChildProcess,
    ServerProcess,
    wait_for,
    with_descriptor_limit,
)

HEADER = (("workload.spiffe.io", "true"),)


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
            path.write_text(self.server.cli("bundle", "show", "--format", "pem").stdout)
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
            agents = self.server.cli_json("agent", "list")
            items = agents.get("agents", agents) if isinstance(agents, dict) else agents
            for item in items:
                if self.join_token and self.join_token.split(".")[0] in item["spiffe_id"]:
                    return str(item["spiffe_id"])
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


def new_token(server: ServerProcess) -> str:
    out = server.cli_json("token", "generate")
    return str(out["token"])


def create_entry(
    server: ServerProcess, spiffe_id: str, parent_id: str, *selectors: str, **kw: Any
) -> str:
    args = ["entry", "create", "--spiffe-id", spiffe_id, "--parent-id", parent_id]
    for sel in selectors or (f"unix:uid:{os.getuid()}",):
        args += ["--selector", sel]
    for key, value in kw.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    out = server.cli_json(*args)
    return str(out.get("id") or out.get("entry", {}).get("id"))


def create_entries(
    server: ServerProcess, parent_id: str, spiffe_ids: list[str], selector: str
) -> dict[str, str]:
    """SPIFFE ID -> entry ID of one entry each under `parent_id`, made by one `entry create
    --file` (a CLI process per entry costs a Python start each)."""
    source = server.root / f"entries-{len(spiffe_ids)}-{os.urandom(4).hex()}.jsonl"
    lines = [
        json.dumps({"spiffe_id": sid, "parent_id": parent_id, "selectors": [selector]})
        for sid in spiffe_ids
    ]
    source.write_text("\n".join(lines) + "\n")
    try:
        results = server.cli_json("entry", "create", "--file", str(source))["results"]
    finally:
        source.unlink()
    return {sid: str(result["id"]) for sid, result in zip(spiffe_ids, results, strict=True)}


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
