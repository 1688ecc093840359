"""Acting as another local user in tests: the agent and CLIs treat uids differently, and tests
run as root, which every permission check lets through."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

NOBODY = 65534


def system_python() -> str:
    """A python another user may run: the test's interpreter may sit where that user cannot
    read it (under /root); the system one of the same version, given the test's packages on its
    path."""
    found = shutil.which(f"python{sys.version_info[0]}.{sys.version_info[1]}", path="/usr/bin:/bin")
    assert found, "a system python of the test's version, for a process of another user"
    return found


def as_another_user() -> list[str]:
    """A command prefix that drops root (root opens any socket); nothing for anyone else."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv to drop privileges")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def hold_connections_as_nobody(socket_path: Path, count: int) -> subprocess.Popen[str]:
    """A `nobody` process that opens up to `count` connections to `socket_path`, prints how many
    it holds, and keeps them until its stdin closes."""
    code = textwrap.dedent(
        f"""
        import os, socket, sys
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        held = []
        for _ in range({count}):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect({str(socket_path)!r})
            except OSError:
                s.close()
                continue
            held.append(s)
        print(len(held), flush=True)
        sys.stdin.read()
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
