"""`make run`: a server and an agent on a local data directory, with a demo workload entry.

Starts `svid-server run` and `svid-agent run` as child processes under `.run/` (SQLite, fresh each
time), attests the agent with a join token, registers `unix:uid:<your uid>` as a workload, prints
how to fetch SVIDs, and stops both cleanly on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_attestor.relay import MAX_UNIX_PATH

TRUST_DOMAIN = "example.org"
START_TIMEOUT = 30.0


def _wait(what: str, check: Callable[[], Any], procs: list[subprocess.Popen[bytes]]) -> Any:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"a child process exited early (code {proc.returncode}); see .run/*.log"
                )
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}; see .run/*.log")


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        short = (
            root if len(str(root / "agent" / "public" / "api.sock")) < MAX_UNIX_PATH - 30 else None
        )
        self.sock_root = short or Path(tempfile.mkdtemp(prefix="svid-demo-"))
        self.admin = self.sock_root / "server" / "private" / "admin.sock"
        self.socket = self.sock_root / "agent" / "public" / "api.sock"

    def _spawn(self, module: str, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.root / log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module, *args], stdout=out, stderr=out, cwd=self.root
            )
        self.procs.append(proc)
        return proc

    def server_cli(self, *args: str) -> Any:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "server.cli",
                *args,
                "--admin-socket",
                str(self.admin),
                "--output",
                "json",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"svid-server {' '.join(args[:2])} failed: {done.stderr.strip()}")
        return (
            json.loads(done.stdout) if done.stdout.strip().startswith(("{", "[")) else done.stdout
        )

    def start(self) -> None:
        data = self.root / "server"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "server.toml"
        config.write_text(
            f'trust_domain = "{TRUST_DOMAIN}"\n'
            f'data_dir = "{data}"\n'
            'bind_address = "127.0.0.1:0"\n'
            'attest_bind_address = "127.0.0.1:0"\n'
            f'admin_socket = "{self.admin}"\n'
            'log_format = "text"\n'
        )
        server = self._spawn("server.cli", ["run", "--config", str(config)], "server.log")
        runtime_file = data / "server.json"

        def runtime() -> dict[str, Any] | None:
            if not runtime_file.exists():
                return None
            info: dict[str, Any] = json.loads(runtime_file.read_text())
            return info if info.get("pid") == server.pid else None

        info = _wait("the server", runtime, self.procs)
        token = self.server_cli("token", "generate")["token"]
        bundle = self.root / "bundle.pem"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "server.cli",
                "bundle",
                "show",
                "--format",
                "pem",
                "--admin-socket",
                str(self.admin),
            ],
            capture_output=True,
            check=True,
            timeout=60,
        )
        bundle.write_bytes(done.stdout)
        self._spawn(
            "agent_attestor.cli",
            [
                "run",
                "--server-address", info["node_address"],
                "--server-attest-address", info["attest_address"],
                "--trust-bundle", str(bundle),
                "--join-token", token,
                "--data-dir", str(self.root / "agent"),
                "--socket-path", str(self.socket),
                "--private-dir", str(self.sock_root / "agent" / "private"),
                "--log-format", "text",
            ],
            "agent.log",
        )  # fmt: skip
        token_id = token.split(".")[0]

        def agent_id() -> str | None:
            listed = self.server_cli("agent", "list")
            items = listed.get("agents", listed) if isinstance(listed, dict) else listed
            ids = [a["spiffe_id"] for a in items if token_id in a["spiffe_id"]]
            return ids[0] if ids else None

        parent = _wait("the agent to attest", agent_id, self.procs)
        user = pwd.getpwuid(os.getuid()).pw_name
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/demo/{_segment(user)}"
        self.server_cli(
            "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", parent,
            "--selector", f"unix:uid:{os.getuid()}",
        )  # fmt: skip
        script = Path(sys.executable).with_name("svid-agent")
        agent_cmd = str(script) if script.exists() else f"{sys.executable} -m agent_attestor.cli"
        print(
            f"""
svidd demo is running (logs in {self.root}/server.log and agent.log).

  agent:     {parent}
  workload:  {spiffe_id}   (any process of user {user}, selector unix:uid:{os.getuid()})

  export SPIFFE_ENDPOINT_SOCKET=unix://{self.socket}

  {agent_cmd} api fetch x509 --write /tmp/svids
  {agent_cmd} api fetch jwt --audience my-service
  {agent_cmd} api watch

Press Ctrl-C to stop the server and the agent.
""",
            flush=True,
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.sock_root != self.root:
            shutil.rmtree(self.sock_root, ignore_errors=True)


def _segment(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name)
    return cleaned.strip(".") or "user"


def main(root: Path | None = None) -> int:
    root = (root or Path.cwd() / ".run").resolve()
    shutil.rmtree(root, ignore_errors=True)  # a fresh trust domain every run
    root.mkdir(parents=True, mode=0o700)
    demo = Demo(root)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        demo.start()
        while not stop and all(p.poll() is None for p in demo.procs):
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping the agent and the server...", flush=True)
        demo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
