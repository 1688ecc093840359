"""tests/agent_attestor/exe_mask.c, built for the tests that mask a process's exe link."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_MASK_C = Path(__file__).with_name("exe_mask.c")


@contextlib.contextmanager
def built_exe_mask() -> Iterator[Path]:
    """exe_mask.c built where `nobody` may run it; skips the test without a C compiler for
    x86_64, which the helper's inline syscalls are written for."""
    compiler = shutil.which("cc")
    if compiler is None or platform.machine() != "x86_64":
        pytest.skip("needs a C compiler for x86_64")
    where = Path(tempfile.mkdtemp(prefix="exe-mask-", dir="/tmp"))
    try:
        os.chmod(where, 0o755)
        binary = where / "exe_mask"
        subprocess.run(
            [compiler, "-static", "-O1", "-fno-stack-protector", "-o", str(binary), str(_MASK_C)],
            check=True,
            capture_output=True,
        )
        yield binary
    finally:
        shutil.rmtree(where)
