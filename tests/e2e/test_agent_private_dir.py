"""A real agent whose data_dir is too deep for a socket path keeps its internal socket in a
directory under $TMPDIR: one per data_dir, reused after a crash and removed by a clean stop,
so restarts leave nothing behind."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.agent_process import agent_stack
from tests.e2e.conftest import make_server, short_tmpdir

pytestmark = pytest.mark.e2e
# Deep enough that <data_dir>/private/api.sock is over the 107 bytes of a socket path.
DEEP = "/".join(["a-rather-long-directory-name"] * 5)


@pytest.fixture
def tmpdir_root() -> Iterator[Path]:
    """The agent's $TMPDIR, its own: other agents on this machine use /tmp meanwhile."""
    path = short_tmpdir("svt")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_restarts_after_a_crash_and_a_clean_stop_leave_no_private_dir(tmpdir_root: Path) -> None:
    root = short_tmpdir()
    with agent_stack(
        root,
        make_server(root).start(),
        environment={"TMPDIR": str(tmpdir_root)},
        data_dir_name=DEEP,
    ) as agent:
        assert len(str(agent.data_dir / "private" / "api.sock")) > 107
        agent.runtime()
        (first,) = tmpdir_root.iterdir()
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(30)
        agent.proc = None
        # A restart after a crash takes up the directory the crashed run left.
        agent.start()
        agent.runtime()
        assert list(tmpdir_root.iterdir()) == [first]
        assert agent.stop() == 0
        # A clean stop removes it: each start made a new one that nothing ever removed.
        assert list(tmpdir_root.iterdir()) == []
        agent.start()
        agent.runtime()
        assert len(list(tmpdir_root.iterdir())) == 1
        assert agent.stop() == 0
        assert list(tmpdir_root.iterdir()) == []
