"""A real agent restarted with a bundle.der older than its state file's bundle (a bundle save
the disk refused, the agent stopped before its retry) verifies its server with the state's
roots, and brings bundle.der up to them: it verified with bundle.der's alone, and reached no
server the old roots do not verify (here: none, with no --trust-bundle to fall back on)."""

from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from svid._clock import SystemClock
from tests.agent_attestor.pki import LocalCa
from tests.e2e.agent_process import FAST_RETRIES, agent_stack
from tests.e2e.conftest import make_server, short_tmpdir, wait_for

pytestmark = pytest.mark.e2e
SYNC_UP = "Sync stream up"


def test_a_restart_verifies_the_server_with_the_state_files_newer_roots() -> None:
    root = short_tmpdir()
    with agent_stack(root, make_server(root).start(), flags=FAST_RETRIES) as agent:
        agent.agent_id()
        wait_for(lambda: SYNC_UP in agent.logs(), 20, "the first Sync stream")
        assert agent.stop() == 0  # a clean stop: the state file holds the server's bundle
        saved = agent.data_dir / "bundle.der"
        current = saved.read_bytes()
        # As a refused save leaves it: the roots of a bundle before this one (here another
        # CA's, which verifies nothing of this server), of an older sequence.
        stale = LocalCa(SystemClock()).cert.public_bytes(Encoding.DER)
        saved.write_bytes(stale)
        sequence = agent.data_dir / "bundle.der.sequence"
        sequence.write_text(json.dumps({hashlib.sha256(stale).hexdigest(): 0}))
        agent.use_trust_bundle = False  # nothing given to fall back on
        agent.start()
        wait_for(lambda: agent.logs().count(SYNC_UP) == 2, 20, "a Sync stream after the restart")
        assert "holds older roots than the saved agent state" in agent.logs()
        wait_for(lambda: saved.read_bytes() == current, 20, "bundle.der brought up to date")
        assert "no trust bundle this agent has verifies" not in agent.logs()
