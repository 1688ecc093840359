"""The README's quickstart commands, run as written against a real `make run` demo.

The block is read from README.md, so the README and what works cannot drift apart (issue 11,
item 14). The same demo shows the join token reaches the agent without its command line
(item 3).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.demo_process import REPO, DemoProcess, cmdline

pytestmark = pytest.mark.e2e

README = REPO / "README.md"
MARKER = "<!-- tests/e2e/test_demo_readme.py runs this block"
# What the block must at least show; each is checked against its command's output below.
EXPECTED = {
    "svid-agent api fetch x509": "spiffe://example.org/demo/",
    "svid-agent api fetch jwt": "spiffe://example.org/demo/",
    "svid-server entry show": "spiffe://example.org/demo/",
    "svid-server audit verify": "",
    "svid-server policy validate": "is valid",
    "svid-server task list": "No tasks.",
}


def readme_block() -> list[str]:
    text = README.read_text()
    assert MARKER in text, f"README.md lost the marked quickstart block ({MARKER} ...)"
    block = re.search(r"```sh\n(.*?)```", text[text.index(MARKER) :], re.DOTALL)
    assert block is not None
    return [line for line in block.group(1).splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo() -> Iterator[DemoProcess]:
    running = DemoProcess()
    try:
        running.start()
        # The README runs from the checkout, where make run left .venv; here the venv is ours.
        (running.root / ".venv").symlink_to(Path(sys.executable).parent.parent)
        yield running
    finally:
        running.close()


def test_the_readme_quickstart_commands_work_against_the_demo(
    demo: DemoProcess, tmp_path: Path
) -> None:
    lines = readme_block()
    exports = [line for line in lines if line.startswith("export ")]
    commands = [line for line in lines if not line.startswith(("export ", "#"))]
    for wanted in EXPECTED:
        assert any(wanted in c for c in commands), f"README block lacks `{wanted}`"
    # The export the README shows is the one the demo prints (with $PWD = the checkout).
    for export in exports:
        printed = export.split("#")[0].strip().replace("$PWD", str(demo.root))
        assert printed in demo.output(), f"{export!r} is not what make run prints"

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SVID_", "SPIFFE_"))}
    for command in commands:
        script = "\n".join([*exports, command.replace("/tmp/svids", str(tmp_path / "svids"))])
        done = subprocess.run(
            ["bash", "-ec", script],
            cwd=demo.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"`{command}` failed:\n{done.stdout}{done.stderr}"
        for wanted, shows in EXPECTED.items():
            if wanted in command:
                assert shows in done.stdout, f"`{command}` printed:\n{done.stdout}"
    assert (tmp_path / "svids" / "svid.0.pem").exists()


def test_the_demo_prints_the_admin_commands_the_readme_shows(demo: DemoProcess) -> None:
    for wanted in (w for w in EXPECTED if w.startswith("svid-server")):
        subcommand = wanted.removeprefix("svid-server ")
        assert re.search(rf"svid-server {subcommand}\b", demo.output()), demo.output()
    assert str(demo.run_dir / "server.toml") in demo.output()


def test_the_demo_agent_gets_its_join_token_without_a_command_line(demo: DemoProcess) -> None:
    agent_id = re.search(r"agent:\s+(\S+)", demo.output())
    assert agent_id is not None
    token_id = agent_id.group(1).rsplit("/", 1)[1]
    agents = [pid for pid in demo.children() if "agent_attestor.cli" in cmdline(pid)]
    assert len(agents) == 1
    args = cmdline(agents[0])
    assert "--join-token" not in args
    assert not any(arg.startswith(f"{token_id}.") for arg in args), args
    token_file = Path(args[args.index("--join-token-file") + 1])
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.read_text().strip().startswith(f"{token_id}.")
    assert "cmdline" not in (demo.run_dir / "agent.log").read_text()  # no --join-token warning
