"""The agent's directories (its socket's, private_dir's, data_dir's) checked as svid/_safe_dir.py
says, refused with the agent's ConfigError."""

from __future__ import annotations

from pathlib import Path

from agent_attestor.errors import ConfigError
from svid._safe_dir import Who
from svid._safe_dir import secure_dir as _secure_dir

_AGENT = Who("agent", ConfigError)


def secure_dir(
    path: Path,
    key: str,
    mode: int,
    *,
    shared: bool = False,
    parent_mode: int | None = None,
    private: bool = False,
) -> Path:
    """svid._safe_dir.secure_dir for the agent: its refusals are ConfigErrors naming it."""
    return _secure_dir(
        path, key, mode, _AGENT, shared=shared, parent_mode=parent_mode, private=private
    )
