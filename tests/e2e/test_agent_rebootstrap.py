"""A real agent back from a downtime in which its trust domain's CA was replaced outright: its
saved bundle no longer verifies the server, and the operator's new join token and current
--trust-bundle get it attested again, without deleting anything by hand. Without a bundle from
the operator it trusts nothing it cannot verify."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.agent_process import AgentProcess, agent_stack, new_token
from tests.e2e.conftest import ServerProcess, make_server, short_tmpdir, wait_for

pytestmark = pytest.mark.e2e


@dataclass
class Downtime:
    agent: AgentProcess  # stopped, its saved bundle the old CA's
    old_bundle: bytes
    new_server: ServerProcess  # a new CA: none of the old one's roots


@pytest.fixture
def downtime() -> Iterator[Downtime]:
    root, new_root = short_tmpdir(), short_tmpdir()
    with agent_stack(root, make_server(root).start()) as agent:
        agent.agent_id()
        bundle = agent.data_dir / "bundle.der"
        wait_for(bundle.exists, 30, "the agent's saved bundle")
        assert agent.stop() == 0
        agent.server.stop()
        new_server = make_server(new_root).start()
        try:
            # Long enough away that its SVID expired: the agent attests again.
            for name in ("agent_svid.der", "agent_key.der"):
                (agent.data_dir / name).unlink()
            agent.server = new_server
            agent.join_token = new_token(new_server)
            (agent.root / "bundle.pem").unlink()  # bundle_file() writes the new server's
            yield Downtime(agent, bundle.read_bytes(), new_server)
        finally:
            agent.stop()
            new_server.stop()
            shutil.rmtree(new_root, ignore_errors=True)


def test_a_new_join_token_and_the_given_bundle_attest_past_a_stale_saved_bundle(
    downtime: Downtime,
) -> None:
    agent = downtime.agent
    agent.start()
    # It attested: the join token is spent on the new server, the saved bundle is its CA's.
    agent.agent_id(timeout=20)
    saved = agent.data_dir / "bundle.der"
    wait_for(lambda: saved.read_bytes() != downtime.old_bundle, 20, "the new bundle saved")
    assert "does not verify the server" in agent.logs()


def test_without_a_given_bundle_a_stale_saved_bundle_is_not_bypassed(
    downtime: Downtime,
) -> None:
    agent = downtime.agent
    agent.use_trust_bundle = False
    agent.start()
    wait_for(lambda: "cannot reach or attest" in agent.logs(), 20, "a refused attestation")
    token_id = agent.join_token.split(".")[0]
    agents = downtime.new_server.cli_json("agent", "list")
    items = agents.get("agents", agents) if isinstance(agents, dict) else agents
    assert not any(token_id in item["spiffe_id"] for item in items)
    assert (agent.data_dir / "bundle.der").read_bytes() == downtime.old_bundle
