"""The Makefile's set-up step, run by real make with a stand-in Python that records its calls.

A cold `make run` spent ~85 s in `pip install --quiet` with nothing on screen (issue 11, item 16):
it must say what it is doing and let pip show its progress.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Stands in for python3 and .venv/bin/python: logs each call; `-m venv DIR` makes DIR/bin/python.
FAKE_PYTHON = """#!/bin/sh
echo "$0 $*" >> "$(dirname "$0")/../calls.log"
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python"
fi
if [ "$1 $2" = "-m pip" ]; then
    echo "pip says: Collecting things"
fi
"""


def _make(checkout: Path, python: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", ".venv/.installed", f"PYTHON={python}"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_cold_setup_says_it_is_installing_and_lets_pip_show_progress(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, checkout / name)
    tools = tmp_path / "tools" / "bin"
    tools.mkdir(parents=True)
    python = tools / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)

    done = _make(checkout, python)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "installing" in out.lower()
    announced = out.lower().index("installing")
    assert announced < out.index("pip says"), "the announcement must come before pip runs"

    calls = (checkout / ".venv" / "calls.log").read_text().splitlines()
    installs = [c for c in calls if "pip install" in c and "-e" in c.split()]
    assert len(installs) == 1
    assert "--quiet" not in installs[0].split()
    assert "-q" not in installs[0].split()
    assert "--progress-bar on" in installs[0]
    assert (checkout / ".venv" / ".installed").exists()

    again = _make(checkout, python)
    assert again.returncode == 0, again.stderr
    assert "installing" not in again.stdout.lower()  # only the first run sets up
