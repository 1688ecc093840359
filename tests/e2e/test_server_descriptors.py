"""The server's file descriptors: the limit it runs with, and who may hold them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import make_server, short_tmpdir

pytestmark = pytest.mark.e2e


@pytest.fixture
def root() -> Iterator[Path]:
    path = short_tmpdir("sfd")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _open_files_limit(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open files limit for pid {pid}")


def _started_line(log: str) -> dict[str, object]:
    for line in log.splitlines():
        if '"server started"' in line:
            record: dict[str, object] = json.loads(line)
            return record
    raise AssertionError(f"no start-up line in the log:\n{log[-4000:]}")


def test_the_server_raises_its_soft_descriptor_limit_to_the_hard_one_and_logs_it(
    root: Path,
) -> None:
    server = make_server(root)
    server.descriptor_limit = (256, 4096)
    server.start()
    try:
        assert server.proc is not None
        assert _open_files_limit(server.proc.pid) == (4096, 4096)
        assert _started_line(server.logs())["descriptor_limit"] == 4096
    finally:
        server.stop()
