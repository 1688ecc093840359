"""An agent's configuration laid out under a test's own directory."""

from __future__ import annotations

from pathlib import Path

from agent_attestor.config import AgentConfig


def config_under(root: Path, trust_domain: str = "") -> AgentConfig:
    """An agent configured to keep its data, socket and private files under `root`."""
    return AgentConfig(
        data_dir=root / "data",
        socket_path=root / "api.sock",
        private_dir=root / "private",
        trust_domain=trust_domain,
    )
