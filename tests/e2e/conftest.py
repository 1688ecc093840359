"""Process helpers for end-to-end tests: real `svid-server run` processes on temp sockets/ports.

`start_server_process(root)` writes a config, spawns the server (logs to a file), waits for its
runtime file and health, and returns a handle with `cli(...)`, `stop()` (SIGTERM) and `kill9()`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from server.cli_output import bundle_pem
from svid._proto import admin_pb2, admin_pb2_grpc
from tests.ports import free_port
from tests.tmpdirs import short_tmpdir
from tests.waits import wait_for

TRUST_DOMAIN = "example.org"
START_TIMEOUT = 30.0
ADMIN_OPTIONS = (("grpc.use_local_subchannel_pool", 1), ("grpc.max_reconnect_backoff_ms", 1000))


def server_command() -> list[str]:
    return [sys.executable, "-m", "server.cli"]


def with_descriptor_limit(soft: int, hard: int) -> list[str]:
    """A prefix that sets RLIMIT_NOFILE and execs the rest of the command line."""
    code = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", code]


class ChildProcess:
    """What the server and agent process helpers share: the runtime file of the child they
    started, and stopping it."""

    proc: subprocess.Popen[bytes] | None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit code. One still running after `timeout` is
        killed, and the TimeoutExpired raised with the end of its log, where it wrote every
        thread's stack first (SIGUSR1): what its stop was waiting for."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                self.proc.send_signal(signal.SIGUSR1)
                time.sleep(1.0)
                self.proc.kill()
                self.proc.wait(5)
                exc.add_note(f"{type(self).__name__}'s log ends:\n{self.logs()[-8000:]}")
                raise
        code = self.proc.returncode
        self.proc = None
        return code

    def logs(self) -> str:
        raise NotImplementedError

    def wait_runtime_file(self, path: Path, what: str, timeout: float) -> dict[str, Any]:
        """The runtime file (JSON, written atomically) of the child running now: one left by
        an earlier run names another pid and is not taken. Fails at once if the child exits."""
        assert self.proc is not None
        proc = self.proc

        def read() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{self.logs()[-4000:]}")
            try:
                info: dict[str, Any] = json.loads(path.read_text())
            except FileNotFoundError:
                return None
            return info if info.get("pid") == proc.pid else None

        return dict(wait_for(read, timeout, f"the {what}'s runtime file ({path.name})"))


@dataclass
class ServerProcess(ChildProcess):
    root: Path
    config_path: Path
    data_dir: Path
    admin_socket: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    descriptor_limit: tuple[int, int] | None = None  # RLIMIT_NOFILE (soft, hard) it starts with
    nohup: bool = False  # started under nohup(1): SIGHUP ignored, as a detached daemon has it
    # Started as `svid-server run &` in a script: a non-interactive shell ignores SIGINT for it.
    sigint_ignored: bool = False

    def start(self, *extra: str) -> ServerProcess:
        """`extra`: flags of this start only (`--new-datastore`, `--restored-datastore`)."""
        runtime_file = self.data_dir / "server.json"
        runtime_file.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        limit = self.descriptor_limit
        self.proc = subprocess.Popen(
            [
                *(with_descriptor_limit(*limit) if limit is not None else []),
                *(["nohup"] if self.nohup else []),
                *(["sh", "-c", 'trap "" INT; exec "$@"', "sh"] if self.sigint_ignored else []),
                *server_command(),
                "run",
                "--config",
                str(self.config_path),
                *extra,
            ],
            stdout=log,
            stderr=log,
            cwd=str(self.root),
        )
        log.close()
        self.runtime = self.wait_runtime_file(runtime_file, "server", START_TIMEOUT)
        return self

    def cli(
        self, *args: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*server_command(), *args, "--admin-socket", str(self.admin_socket)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"svid-server {' '.join(args)} failed: {done.stderr}")
        return done

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--output", "json").stdout)

    def audit_events(self, *filters: str) -> list[dict[str, Any]]:
        """The ledger's events `audit export` gives for `filters` (--task ID, --kind KIND...),
        read from the data directory."""
        out = self.cli("audit", "export", "--data-dir", str(self.data_dir), *filters).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def admin(self, method: str, request: Any, timeout: float = 30) -> Any:
        """One admin RPC, as the CLI's admin commands make it, on a channel of its own (a
        restarted server is found at once): for the set-up of tests whose subject is not the
        CLI, which would pay a Python start per call (the CLI has test_server_cli*.py)."""
        with grpc.insecure_channel(f"unix:{self.admin_socket}", options=ADMIN_OPTIONS) as channel:
            return getattr(admin_pb2_grpc.AdminStub(channel), method)(request, timeout=timeout)

    def bundle_pem(self) -> str:
        """The trust bundle as `svid-server bundle show --format pem` prints it."""
        return bundle_pem(self.admin("GetBundle", admin_pb2.GetBundleRequest()))

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None


def make_server(root: Path, **overrides: Any) -> ServerProcess:
    data_dir = root / "data"
    admin_socket = root / "priv" / "admin.sock"
    values: dict[str, Any] = {
        "trust_domain": TRUST_DOMAIN,
        "data_dir": str(data_dir),
        "bind_address": "127.0.0.1:0",
        "attest_bind_address": "127.0.0.1:0",
        "admin_socket": str(admin_socket),
        "log_format": "json",
        "log_level": "info",
        "shutdown_grace": 1.0,
    }
    values.update(overrides)
    config = root / "server.toml"
    config.write_text(
        "".join(
            f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}\n"
            for k, v in values.items()
        )
    )
    return ServerProcess(root, config, data_dir, admin_socket, root / "server.log")


def make_restartable_server(root: Path, **overrides: Any) -> ServerProcess:
    """make_server on fixed free ports, so that a restarted server is found where its agents
    expect it."""
    return make_server(
        root,
        bind_address=f"127.0.0.1:{free_port()}",
        attest_bind_address=f"127.0.0.1:{free_port()}",
        **overrides,
    )


@pytest.fixture
def server_process() -> Iterator[ServerProcess]:
    root = short_tmpdir()
    server = make_server(root)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
