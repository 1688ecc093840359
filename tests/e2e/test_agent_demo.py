"""`make run` (agent_attestor.demo) and the agent's insecure bootstrap, as real processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.e2e.agent_process import AgentProcess, new_token
from tests.e2e.conftest import make_server, short_tmpdir, wait_for
from tests.e2e.demo_process import DemoProcess, alive

pytestmark = pytest.mark.e2e


def test_make_run_demo_serves_the_printed_identity_and_stops_cleanly() -> None:
    root = short_tmpdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent_attestor.demo"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("Press Ctrl-C" in x for x in lines), 60, "the demo to be ready")
        text = "".join(lines)
        socket_uri = re.search(r"SPIFFE_ENDPOINT_SOCKET=(unix://\S+)", text)
        workload = re.search(r"workload:\s+(spiffe://\S+)", text)
        assert socket_uri is not None
        assert workload is not None
        fetched = subprocess.run(
            [sys.executable, "-m", "agent_attestor.cli", "api", "fetch", "x509"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "SPIFFE_ENDPOINT_SOCKET": socket_uri.group(1)},
            check=False,
        )
        assert fetched.returncode == 0, fetched.stderr
        assert workload.group(1) in fetched.stdout
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        reader.join(5)
        children = subprocess.run(
            ["pgrep", "-f", str(root / ".run")], capture_output=True, text=True, check=False
        )
        assert children.stdout.strip() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def test_insecure_bootstrap_attests_then_trusts_the_served_bundle() -> None:
    root = short_tmpdir()
    server = make_server(root).start()
    agent = AgentProcess(root, server, new_token(server))
    try:
        agent.use_trust_bundle = False
        agent.start("--insecure-bootstrap")
        agent.agent_id()
        assert "INSECURE BOOTSTRAP" in agent.logs()
        wait_for(lambda: agent.cli("healthcheck").returncode == 0, 30, "agent health")
        assert (agent.data_dir / "bundle.der").exists()
    finally:
        agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_demo_started_with_sigint_ignored_still_stops_on_sigint_and_reaps_both_daemons() -> None:
    demo = DemoProcess()
    try:
        demo.start(ignore_sigint=True)
        assert demo.proc is not None
        children = demo.children()
        assert len(children) == 2, demo.output()
        demo.proc.send_signal(signal.SIGINT)
        assert demo.proc.wait(40) == 0
        assert "stopping the agent and the server" in demo.output()
        assert [pid for pid in children if alive(pid)] == []
        assert demo.children() == []
    finally:
        demo.close()


def test_demo_daemons_exit_when_the_demo_is_killed() -> None:
    demo = DemoProcess()
    try:
        demo.start()
        assert demo.proc is not None
        children = demo.children()
        assert len(children) == 2, demo.output()
        demo.proc.kill()  # no chance to clean up: the daemons must notice on their own
        demo.proc.wait(10)
        wait_for(lambda: not any(alive(pid) for pid in children), 40, "the daemons to exit")
    finally:
        demo.close()


def test_a_second_demo_in_the_same_directory_is_refused_and_leaves_the_first_running() -> None:
    first = DemoProcess()
    try:
        first.start()
        children = first.children()
        sockets = sorted(first.run_dir.rglob("*.sock"))
        assert sockets, first.output()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SVID_", "SPIFFE_"))}
        second = subprocess.run(
            [sys.executable, "-m", "agent_attestor.demo"],
            cwd=first.root,
            env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert second.returncode == 1
        assert "already running" in second.stderr
        # Wiping .run/ under the first demo deleted its data and sockets: alive, unreachable.
        assert sorted(first.run_dir.rglob("*.sock")) == sockets
        assert first.children() == children
    finally:
        first.close()


def test_the_printed_export_works_in_a_checkout_whose_path_holds_a_space() -> None:
    """Pasted into a shell, `export SPIFFE_ENDPOINT_SOCKET=unix:///tmp/a b/...` (the demo's
    line, and the agent's own first line) set the variable to the part before the space and
    failed on the rest: the demo's next step did not work."""
    demo = DemoProcess(root=short_tmpdir(prefix="sv d"))
    try:
        demo.start()
        printed = [line.strip() for line in demo.lines]
        exports = [next(x for x in printed if x.startswith("export SPIFFE_ENDPOINT_SOCKET="))]
        agent_log = (demo.run_dir / "agent.log").read_text().splitlines()
        exports.append("export " + next(x for x in agent_log if x.startswith("SPIFFE_ENDPOINT")))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SVID_", "SPIFFE_"))}
        for export in exports:
            fetched = subprocess.run(
                [
                    "bash",
                    "-c",
                    f'{export} && exec "$0" -m agent_attestor.cli api fetch x509',
                    sys.executable,
                ],
                capture_output=True,
                text=True,
                timeout=60,
                env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
                check=False,
            )
            assert fetched.returncode == 0, (export, fetched.stderr)
            assert "spiffe://example.org/demo/" in fetched.stdout
    finally:
        demo.close()
