"""`make run`: a server and an agent on a local data directory, with a demo workload entry.

Starts `svid-server run` and `svid-agent run` as child processes under `.run/` (SQLite, fresh each
time), attests the agent with a join token (handed over in a 0600 file: a command line is readable
by every local user), registers `unix:uid:<your uid>` as a workload, prints how to fetch SVIDs and
how to reach the server's admin socket, and stops both cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_attestor import parent_death
from svid._durable import write_durably
from svid._runtime_file import MAX_BYTES as RUNTIME_MAX_BYTES
from svid._small_file import SmallFileError, read_small_file
from svid._unix_socket import MAX_UNIX_PATH, unix_path_size, unix_uri

TRUST_DOMAIN = "example.org"
START_TIMEOUT = 30.0
LOCK = "demo.lock"  # held by the running demo


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


def server_runtime(runtime_file: Path, pid: int) -> dict[str, Any] | None:
    """The started server's runtime file (server.json) once server `pid` wrote it; None before.
    Read as the daemons read their files: something else at its name (a FIFO: the wait hung on
    it) is not a server started."""
    try:
        info = json.loads(
            read_small_file(runtime_file, max_bytes=RUNTIME_MAX_BYTES, follow_links=False)
        )
    except (SmallFileError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("pid") == pid else None


class Demo:
    """A server and an agent as child processes under ``root`` (also what `make example` runs
    its example on: ``boot``, then ``entry`` for each workload it needs)."""

    def __init__(self, root: Path, policy: str = "") -> None:
        self.root = root
        self.policy = policy  # Cedar text for policy_dir; empty: the shipped default policy
        self.procs: list[subprocess.Popen[bytes]] = []
        # In bytes, as the kernel counts them: in characters, a checkout under a non-ASCII path
        # (two bytes a letter) kept sockets there past sun_path, and the server refused to start.
        longest = unix_path_size(root / "agent" / "public" / "api.sock")
        short = root if longest < MAX_UNIX_PATH - 30 else None
        self.sock_root = short or Path(tempfile.mkdtemp(prefix="svid-demo-"))
        self.admin = self.sock_root / "server" / "private" / "admin.sock"
        self.socket = self.sock_root / "agent" / "public" / "api.sock"

    def _spawn(self, module: str, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.root / log, "ab") as out:
            return self.spawn([sys.executable, "-m", module, *args], stdout=out)

    def spawn(
        self, argv: list[str], *, stdout: Any, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a child process that ``stop`` ends and that dies with this one."""
        proc = subprocess.Popen(
            parent_death.command(argv),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env=env,
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

    def boot(self) -> str:
        """Start the server and an agent attested to it; returns the agent's SPIFFE ID."""
        data = self.root / "server"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "server.toml"
        # Empty: the shipped default policy serves until *.cedar files appear (`policy reload`).
        policy = self.root / "policy"
        policy.mkdir(exist_ok=True)
        if self.policy:
            write_durably(policy / "policy.cedar", self.policy.encode(), 0o644)
        write_durably(
            config,
            (
                f'trust_domain = "{TRUST_DOMAIN}"\n'
                f'data_dir = "{data}"\n'
                'bind_address = "127.0.0.1:0"\n'
                'attest_bind_address = "127.0.0.1:0"\n'
                f'admin_socket = "{self.admin}"\n'
                f'policy_dir = "{policy}"\n'
                'log_format = "text"\n'
            ).encode(),
            0o644,
        )
        server = self._spawn("server.cli", ["run", "--config", str(config)], "server.log")
        runtime_file = data / "server.json"
        info = _wait("the server", lambda: server_runtime(runtime_file, server.pid), self.procs)
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
        write_durably(bundle, done.stdout, 0o644)
        token_file = self.root / "join-token"
        write_durably(token_file, (token + "\n").encode(), 0o600)  # 0600 from its first byte
        self._spawn(
            "agent_attestor.cli",
            [
                "run",
                "--server-address", info["node_address"],
                "--server-attest-address", info["attest_address"],
                "--trust-bundle", str(bundle),
                "--join-token-file", str(token_file),
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

        agent: str = _wait("the agent to attest", agent_id, self.procs)
        return agent

    def entry(self, spiffe_id: str, parent: str, *options: str) -> None:
        """Register ``spiffe_id`` for this user's processes (``unix:uid``) under the agent
        ``parent``; ``options`` are more `entry create` flags."""
        self.server_cli(
            "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", parent,
            "--selector", f"unix:uid:{os.getuid()}", *options,
        )  # fmt: skip

    def start(self) -> None:
        parent = self.boot()
        user, segment = workload_user(os.getuid())
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/demo/{segment}"
        self.entry(spiffe_id, parent)
        agent_cmd = _command("svid-agent", "agent_attestor.cli")
        server_cmd = _command("svid-server", "server.cli")
        # Paths in the lines to paste are shell-quoted: a checkout whose path holds a space
        # printed an export that set the variable to the part before it, and failed.
        config = self.root / "server.toml"
        print(
            f"""
svidd demo is running (logs in {self.root}/server.log and agent.log).

  agent:     {parent}
  workload:  {spiffe_id}   (any process of user {user}, selector unix:uid:{os.getuid()})

  export SPIFFE_ENDPOINT_SOCKET={shlex.quote(unix_uri(self.socket))}

  {agent_cmd} api fetch x509 --write /tmp/svids
  {agent_cmd} api fetch jwt --audience my-service
  {agent_cmd} api watch

  Admin commands find the server's socket ({self.admin})
  when run from {self.root.parent}; elsewhere add --config {shlex.quote(str(config))}

  {server_cmd} entry show
  {server_cmd} audit verify
  {server_cmd} policy validate        # policies: *.cedar in {self.root / "policy"}
  {server_cmd} task list

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


def _command(script: str, module: str) -> str:
    """How to run one of our CLIs, shell-quoted: the venv's script (relative when under cwd),
    else -m."""
    path = Path(sys.executable).with_name(script)
    if not path.exists():
        return f"{shlex.quote(sys.executable)} -m {module}"
    try:
        return shlex.quote(str(path.relative_to(Path.cwd())))
    except ValueError:
        return shlex.quote(str(path))


def workload_user(uid: int) -> tuple[str, str]:
    """How the demo names the user of `uid`, and the SPIFFE ID path segment made of it. A uid
    with no passwd entry (a container's arbitrary one) stopped `make run` with a KeyError."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}", f"uid-{uid}"
    return name, _segment(name)


def _segment(name: str) -> str:
    # ASCII only: a SPIFFE ID path takes no other letter, and str.isalnum() is true of "ö",
    # so a user named "jöhn" failed `make run` at its entry create.
    cleaned = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "-" for c in name)
    return cleaned.strip(".") or "user"


def supervise(demo: Demo, work: Callable[[Demo], int], name: str) -> int:
    """Run ``work(demo)`` and stop the demo's processes afterwards, on Ctrl-C or SIGTERM too."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Set both explicitly: a shell that starts a job in the background hands it SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler, so Ctrl-C / kill -INT did nothing.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return work(demo)
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the shutdown short and leave the daemons running;
        # stop() is bounded (SIGTERM, then SIGKILL).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("stopping the agent and the server...", flush=True)
        demo.stop()


def fresh_root(root: Path | None) -> Path:
    root = (root or Path.cwd() / ".run").resolve()
    _refuse_if_held(root / LOCK)
    shutil.rmtree(root, ignore_errors=True)  # a fresh trust domain every run
    root.mkdir(parents=True, mode=0o700)
    _hold(root / LOCK)
    return root


def _refuse_if_held(lock: Path) -> None:
    """Wiping the directory of a demo still running deleted its datastore and sockets under it,
    and its stop later removed the next demo's sockets: that one ran on, unreachable."""
    try:
        # O_NONBLOCK|O_NOFOLLOW: a FIFO at its name hung `make run` waiting for a writer. Only
        # a regular file is a running demo's lock (_hold makes it); anything else is wiped.
        fd = os.open(lock, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip()
        raise SystemExit(
            f"a demo is already running in {lock.parent} (pid {pid}); stop it first (Ctrl-C)"
        ) from None
    finally:
        os.close(fd)


def _hold(lock: Path) -> None:
    """Lock ``lock`` for as long as this process lives (the descriptor is not inherited)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())


def _serve(demo: Demo) -> int:
    demo.start()
    while all(p.poll() is None for p in demo.procs):
        time.sleep(0.2)
    print("make run: a child process exited; see .run/*.log", file=sys.stderr)
    return 1


def main(root: Path | None = None) -> int:
    return supervise(Demo(fresh_root(root)), _serve, "make run")


if __name__ == "__main__":
    sys.exit(main())
