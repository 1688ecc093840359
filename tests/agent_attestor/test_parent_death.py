"""agent_attestor.parent_death: what the demo starts dies with it, even when the demo is killed
with SIGKILL, without a preexec_fn (real processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent_attestor import parent_death
from tests.e2e.conftest import wait_for
from tests.e2e.demo_process import alive

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="prctl(PR_SET_PDEATHSIG)")

# A parent that starts a long sleep through parent_death, says its pid, then waits to be killed.
PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from agent_attestor import parent_death
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    child = subprocess.Popen(parent_death.command(sleep))
    print(child.pid, flush=True)
    time.sleep(60)
    """
)


def test_the_child_gets_sigterm_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        # The launcher execs the program in place: the same pid runs the sleep.
        wait_for(
            lambda: b"time.sleep(60)" in Path(f"/proc/{child}/cmdline").read_bytes(),
            10,
            "the child to exec its program",
        )
        assert alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not alive(child), 10, "the orphaned child to end")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def test_a_parent_gone_before_the_signal_was_armed_ends_the_child_at_once() -> None:
    # The named parent is no process's pid (above any pid_max), so not this test's: as if the
    # real parent had died already.
    done = subprocess.run(
        [sys.executable, "-m", "agent_attestor.parent_death", "99999999", "true"],
        check=False,
        timeout=30,
    )
    assert done.returncode == -signal.SIGTERM


def test_the_program_runs_with_its_arguments_and_exit_code() -> None:
    argv = parent_death.command(
        [sys.executable, "-c", "import sys; sys.exit(int(sys.argv[1]))", "7"]
    )
    assert argv[:4] == [sys.executable, "-m", "agent_attestor.parent_death", str(os.getpid())]
    assert subprocess.run(argv, check=False, timeout=30).returncode == 7


def test_a_bad_command_line_is_refused_with_its_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert parent_death.main(["not-a-pid", "true"]) == 2
    assert parent_death.main(["123"]) == 2
    assert (
        "usage: python -m agent_attestor.parent_death PARENT_PID PROGRAM" in capsys.readouterr().err
    )
