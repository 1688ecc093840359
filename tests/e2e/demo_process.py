"""`make run` as a real process for end-to-end tests: `python -m agent_attestor.demo` in a temp dir.

The temp dir stands for the checkout: the demo keeps everything in `<root>/.run/`, and its server
and agent are the processes whose command lines name that directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.conftest import short_tmpdir, wait_for

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 90.0


# What a non-interactive shell does to a job it starts with `&`: SIGINT ignored, which exec keeps.
# Set by a small Python that then execs the demo, not by a preexec_fn: one would make this
# process (which has gRPC threads) fork rather than vfork (agent_attestor/parent_death.py says why
# that crashes children now and then).
_IGNORING_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie nobody reaped (PID 1 in a container may not) has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


@dataclass
class DemoProcess:
    root: Path = field(default_factory=short_tmpdir)
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.root / ".run"

    def start(self, *, ignore_sigint: bool = False) -> DemoProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SVID_", "SPIFFE_"))}
        demo = [sys.executable, "-m", "agent_attestor.demo"]
        if ignore_sigint:
            demo = [sys.executable, "-c", _IGNORING_SIGINT, *demo]
        self.proc = subprocess.Popen(
            demo,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**env, "PYTHONPATH": str(REPO)},
        )
        threading.Thread(target=self._read, daemon=True).start()
        wait_for(self._ready, READY_TIMEOUT, "the demo to be ready")
        return self

    def _read(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the demo exited with {self.proc.returncode}:\n{self.output()}")
        return any("Press Ctrl-C" in line for line in self.lines)

    def output(self) -> str:
        return "".join(self.lines)

    def children(self) -> list[int]:
        """The demo's server and agent: processes whose command line names <root>/.run."""
        found = subprocess.run(
            ["pgrep", "-f", str(self.run_dir)], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in found.stdout.split()]

    def close(self) -> None:
        """Whatever happened, leave no demo, server or agent behind."""
        pids = self.children()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
