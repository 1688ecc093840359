"""One way for a test to run an svid-server CLI command against a running server."""

from __future__ import annotations

import pytest

from server.cli import main
from tests.server.fixtures import RunningServer


def run_cli(
    capsys: pytest.CaptureFixture[str], srv: RunningServer, *argv: str
) -> tuple[int, str, str]:
    """`svid-server ARGV --admin-socket <srv's>`, in-process: (exit code, stdout, stderr)."""
    code = main([*argv, "--admin-socket", srv.runtime.admin_socket])
    out, err = capsys.readouterr()
    return code, out, err
