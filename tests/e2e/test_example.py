"""`make example` for real (`python -m examples.run`): a real svid-server and svid-agent, the MCP
server of examples/ under uvicorn called by its agent runtime with the real `mcp` SDK over
streamable HTTP, and the two mTLS services; then every process is gone, also after Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import short_tmpdir, wait_for
from tests.e2e.demo_process import REPO, alive
from tests.ports import free_port

pytestmark = pytest.mark.e2e
RUN_TIMEOUT = 90.0


@dataclass
class Example:
    root: Path
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def descendants(self) -> set[int]:
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            parents[int(stat.parent.name)] = int(fields[1])
        found, frontier = set(), {self.proc.pid}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
            found |= frontier
        return found


@pytest.fixture
def example() -> Iterator[Example]:
    root = short_tmpdir("svx")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SVID_", "SPIFFE_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.run"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    running = Example(root, proc)
    threading.Thread(target=running.read, daemon=True).start()
    try:
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        print(running.output)  # shown when a test fails
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_line(example: Example, text: str) -> None:
    wait_for(lambda: text in example.output, RUN_TIMEOUT, repr(text), interval=0.05)


def test_the_example_runs_end_to_end_and_stops_everything(example: Example) -> None:
    _wait_for_line(example, "[billing] ")  # every server is up: note who they are
    children = example.descendants()
    assert len(children) >= 5  # server, agent, MCP server, orders service, billing client
    assert example.proc.wait(RUN_TIMEOUT) == 0
    out = example.output

    # The task may call read_ticket; the server runs it with the task's typed claims.
    task_id = re.search(r"task (\w+): allow, tools \['mcp-tickets#read_ticket'\]", out)
    assert task_id is not None
    assert f"read_ticket(T-1001) by task {task_id.group(1)} for user:alice" in out
    assert "read_ticket -> ticket T-1001: the printer" in out
    # The other tool: 403 naming the scope to ask for; asking is refused by the operator's policy.
    refused = re.search(r"export_customer_data -> 403 (.*)", out)
    assert refused is not None
    assert 'error="insufficient_scope"' in refused.group(1)
    assert 'scope="tool:export_customer_data"' in refused.group(1)
    assert "asked for ['export_customer_data'] -> denied" in out
    assert "no_customer_export_tool" in out
    # The task ended: its token is refused as revoked.
    after = re.search(r"its token now -> (.*)", out)
    assert after is not None
    assert after.group(1).startswith('401 Bearer realm="mcp-tickets", error="invalid_token"')
    assert "is revoked" in after.group(1)

    # mTLS: three calls admitted, across a rotation of the client's SVID without a restart.
    calls = re.findall(
        r"\[billing\] 3 open orders for spiffe://example.org/services/billing "
        r"\(its certificate (\w+)\)",
        out,
    )
    assert len(calls) == 3
    assert len(set(calls)) >= 2
    # Another workload of the same trust domain is refused in the handshake.
    assert (
        "[orders] refused a caller: TLS peer spiffe://example.org/services/intruder "
        "is not authorised" in out
    )
    assert "[intruder] refused by the server" in out
    assert "open orders for spiffe://example.org/services/intruder" not in out

    assert "Traceback" not in out
    wait_for(lambda: not any(alive(pid) for pid in children), 10, "every child to exit")


def test_ctrl_c_stops_every_process_of_the_example(example: Example) -> None:
    _wait_for_line(example, "[billing] ")
    children = example.descendants()
    assert len(children) >= 5
    example.proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    assert example.proc.wait(30) == 0
    assert time.monotonic() - started < 20
    assert "stopping the agent and the server" in example.output
    assert "Traceback" not in example.output
    wait_for(lambda: not any(alive(pid) for pid in children), 10, "every child to exit")


# The README's MCP server block, found by the line before it.
README_MCP = "An MCP server whose every tool call needs a task token granting that tool"
# A stand-in for uvicorn.run: what the README block reaches if it goes on to serve.
SERVED = "import uvicorn\nuvicorn.run = lambda *a, **k: print('served')\n"


def _readme_mcp_block() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"```python\n(.*?)```", text[text.index(README_MCP) :], re.DOTALL)
    assert found is not None, "README.md lost its MCP server block"
    return found.group(1)


def test_the_mcp_servers_refuse_to_start_saying_why_when_the_agent_gives_no_bundles() -> None:
    # They called wait_ready(10) and ignored its False: with no agent they served anyway,
    # refusing every token (fail closed) without a word of why.
    root = short_tmpdir("svn")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SVID_", "SPIFFE_"))}
    env |= {"PYTHONPATH": str(REPO), "SPIFFE_ENDPOINT_SOCKET": f"unix://{root}/no-agent.sock"}
    examples = REPO / "examples"
    commands = {
        "tickets_server.py": [str(examples / "tickets_server.py"), str(free_port())],
        "oauth_tickets_server.py": [
            str(examples / "oauth_tickets_server.py"),
            str(free_port()),
            "https://127.0.0.1:1",
        ],
        "README": ["-c", SERVED + _readme_mcp_block()],
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in commands.items()
    }
    try:
        for name, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                pytest.fail(f"{name} served with no agent:\n{out}")
            assert proc.returncode != 0, f"{name}:\n{out}"
            assert "served" not in out.splitlines(), name
            assert f"Workload API at unix://{root}/no-agent.sock" in out, f"{name}:\n{out}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)
