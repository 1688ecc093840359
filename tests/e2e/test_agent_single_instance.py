"""A second `svid-agent run` on a running agent's data directory or Workload API socket (the unit
started twice, a config copied for another node) is refused at once, naming what is taken, and
the running agent serves on: the second took the socket over, and removed it (with the first's
runtime file) when it stopped, leaving the first running with no socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.agent_process import agent_stack, create_entry
from tests.e2e.conftest import START_TIMEOUT, make_server, short_tmpdir

pytestmark = pytest.mark.e2e


def _replaced(args: list[str], flag: str, value: str) -> list[str]:
    at = args.index(flag)
    return [*args[: at + 1], value, *args[at + 2 :]]


@contextlib.contextmanager
def _serving_agent(root: Path) -> Iterator[tuple[Any, str, list[str]]]:
    """An agent serving an SVID (its ID given) to this uid, and the command line it runs: what a
    second start on its data_dir or socket would run."""
    server = make_server(root).start()
    with agent_stack(root, server) as agent:
        sid = "spiffe://example.org/first"
        create_entry(server, sid, agent.agent_id(), f"unix:uid:{os.getuid()}")
        agent.wait_svid(sid)
        assert agent.proc is not None
        yield agent, sid, [str(arg) for arg in agent.proc.args]  # type: ignore[union-attr]


def test_a_second_agent_on_the_same_data_dir_or_socket_is_refused_and_the_first_serves_on() -> None:
    root = short_tmpdir()
    with _serving_agent(root) as (agent, sid, args):
        assert agent.proc is not None
        other_dir = str(root / "agent-2")
        for second, refusal in (
            (args, f"data_dir: another agent is running on {agent.data_dir} (pid "),
            (
                _replaced(args, "--data-dir", other_dir),
                f"socket_path: another agent is listening on {agent.socket_path}",
            ),
        ):
            done = subprocess.run(
                second,
                cwd=str(root),
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT,
                check=False,
            )
            assert done.returncode == 2, done.stderr
            assert refusal in done.stderr
            assert "Traceback" not in done.stderr
            # The first agent's socket and runtime file are where they were, and it serves.
            assert agent.socket_path.exists()
            assert agent.runtime()["pid"] == agent.proc.pid
            agent.wait_svid(sid)


def test_a_second_agent_with_take_over_wait_waits_for_the_first_to_stop_then_serves() -> None:
    # A DaemonSet rolled out with maxSurge: the new pod's agent starts on the same hostPath
    # data_dir and socket while the old one serves, and the old one is stopped only then.
    # Refused, the new one never started and the rollout stalled.
    root = short_tmpdir()
    with _serving_agent(root) as (agent, sid, args):
        first = agent.proc
        assert first is not None
        second = subprocess.Popen(
            [*args, "--take-over-wait", "60", "--log-format", "text"],
            cwd=str(root),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert second.stdout is not None
            assert second.stderr is not None
            waiting = second.stderr.readline().decode()
            with agent.log_path.open("ab") as log:
                log.write(waiting.encode())
            # The rest of its log goes where the first's went (a full pipe would hold it).
            copier = threading.Thread(
                target=_copy, args=(second.stderr, agent.log_path), daemon=True
            )
            copier.start()
            said = f"another agent is running on {agent.data_dir} (pid {first.pid}): waiting up"
            assert said in waiting, waiting
            # Waiting, it touches neither the data_dir nor the socket: the first serves on.
            assert agent.runtime()["pid"] == first.pid
            agent.wait_svid(sid)
            assert second.poll() is None

            first.send_signal(signal.SIGTERM)
            assert first.wait(START_TIMEOUT) == 0
            # Printed once it holds the data_dir, the first gone.
            line = second.stdout.readline().decode()
            assert line.startswith("SPIFFE_ENDPOINT_SOCKET="), line
            agent.proc = second  # stopped with the stack
            assert agent.runtime()["pid"] == second.pid
            agent.wait_svid(sid)  # the same identity, from the data_dir the first left
        finally:
            if second.poll() is None and agent.proc is not second:
                second.kill()
                second.wait()


def _copy(source: Any, path: Path) -> None:
    with path.open("ab") as sink:
        shutil.copyfileobj(source, sink, 1)
