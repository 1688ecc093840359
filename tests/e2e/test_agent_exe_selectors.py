"""A real agent on a machine where any user may make a user namespace gives no unix:path (any
caller could make its exe name any program: test_exe_mask_shared_mm.py) and says so once at
start, unless its operator sets exe_selectors = "always"."""

from __future__ import annotations

import os
import sys

import pytest

from agent_attestor.userns import ProcSysctls, unprivileged_userns
from svid._proto import workload_pb2
from tests.e2e.agent_process import HEADER, agent_stack, create_entry
from tests.e2e.conftest import make_restartable_server, short_tmpdir

pytestmark = pytest.mark.e2e
ME = os.path.realpath(sys.executable)
WARNING = "no unix:path or unix:sha256 selectors for any caller"


def test_the_agent_withholds_exe_selectors_by_default_and_gives_them_when_told() -> None:
    reason = unprivileged_userns(ProcSysctls())
    if reason is None:
        pytest.skip("no user may make a user namespace here: auto gives exe selectors")
    root = short_tmpdir()
    server = make_restartable_server(root).start()
    with agent_stack(root, server) as agent:
        agent_id = agent.agent_id()
        uid = f"unix:uid:{os.getuid()}"
        # In this order, by-path is in the agent's cache once by-uid is served: withheld, not late.
        create_entry(server, "spiffe://example.org/by-path", agent_id, uid, f"unix:path:{ME}")
        create_entry(server, "spiffe://example.org/by-uid", agent_id, uid)
        msg = agent.wait_svid("spiffe://example.org/by-uid")
        assert [s.spiffe_id for s in msg.svids] == ["spiffe://example.org/by-uid"]
        msg = next(agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
        assert [s.spiffe_id for s in msg.svids] == ["spiffe://example.org/by-uid"]
        [line] = [ln for ln in agent.logs().splitlines() if WARNING in ln]
        assert "exe_selectors" in line
        assert reason in line
        agent.stop()
        agent.start("--exe-selectors", "always")
        msg = agent.wait_svid("spiffe://example.org/by-path")
        assert sorted(s.spiffe_id for s in msg.svids) == [
            "spiffe://example.org/by-path",
            "spiffe://example.org/by-uid",
        ]
        assert sum(WARNING in ln for ln in agent.logs().splitlines()) == 1
