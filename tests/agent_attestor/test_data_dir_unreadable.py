"""A file of the agent's data directory it cannot read (a directory at bundle.der's name, a mode
its user cannot read) stops `svid-agent run` at once with one line naming the file: the Sync
loop retried it for ever, saying only "cannot reach or attest to the server"."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.app import AgentApp
from agent_attestor.config import AgentConfig
from agent_attestor.errors import DataFileUnreadableError
from svid._clock import FakeClock
from tests.agent_attestor.pki import LocalCa
from tests.tmpdirs import removed_after

AGENT = "spiffe://example.org/svid/agent/join_token/t1"


@pytest.fixture
def root() -> Iterator[Path]:
    yield from removed_after("adu")


def test_run_stops_naming_a_bundle_file_it_cannot_read(root: Path) -> None:
    data = root / "data"
    (data / "bundle.der").mkdir(parents=True)
    data.chmod(0o700)
    bundle = root / "bundle.pem"
    bundle.write_bytes(LocalCa(FakeClock(start=time.time())).cert.public_bytes(Encoding.PEM))
    started = time.monotonic()
    done = subprocess.run(
        [
            *(sys.executable, "-m", "agent_attestor.cli", "run", "--data-dir", str(data)),
            *("--socket-path", str(root / "ws" / "api.sock"), "--trust-bundle", str(bundle)),
            *("--server-address", "127.0.0.1:1", "--server-attest-address", "127.0.0.1:1"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "SVID_AGENT_JOIN_TOKEN": "t1.secret"},
        timeout=20,
        check=False,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert time.monotonic() - started < 15
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("svid-agent: trust bundle file: cannot read "), done.stderr[-2000:]
    assert str(data / "bundle.der") in last
    assert "it is a directory, not a regular file" in last
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["agent_svid.der", "agent_key.der"])
def test_the_app_refuses_an_identity_file_it_cannot_read(tmp_path: Path, name: str) -> None:
    config = AgentConfig(
        data_dir=tmp_path / "data", socket_path=tmp_path / "a.sock", private_dir=tmp_path / "p"
    )
    key = ec.generate_private_key(ec.SECP256R1())
    ca = LocalCa(FakeClock(start=time.time()))
    store = AgentStore(config.agent_svid_path, config.agent_key_path, config.bundle_path)
    store.save_svid(AgentSvid(AGENT, (ca.sign_leaf(key.public_key(), AGENT),), key))
    path = config.data_dir / name
    path.unlink()
    path.mkdir()
    with pytest.raises(DataFileUnreadableError, match=f"cannot read {path}: it is a directory"):
        AgentApp(config)


def _config(tmp_path: Path) -> AgentConfig:
    return AgentConfig(
        data_dir=tmp_path / "data", socket_path=tmp_path / "a.sock", private_dir=tmp_path / "p"
    )


@pytest.mark.parametrize("own_svid", [True, False])
def test_the_app_refuses_a_directory_at_the_state_files_name(
    tmp_path: Path, own_svid: bool
) -> None:
    # Restored (own SVID) or discarded (none): either way the start crashed with a traceback.
    config = _config(tmp_path)
    if own_svid:
        key = ec.generate_private_key(ec.SECP256R1())
        ca = LocalCa(FakeClock(start=time.time()))
        store = AgentStore(config.agent_svid_path, config.agent_key_path, config.bundle_path)
        store.save_svid(AgentSvid(AGENT, (ca.sign_leaf(key.public_key(), AGENT),), key))
    config.state_path.mkdir(parents=True)
    match = f"agent state file: cannot read {config.state_path}: it is a directory"
    with pytest.raises(DataFileUnreadableError, match=match):
        AgentApp(config)
    assert config.state_path.is_dir()  # left for the operator: never removed with its content


def test_the_app_refuses_a_fifo_at_the_bundle_files_name(tmp_path: Path) -> None:
    # Read, it waited for a writer for ever: the start hung without a word.
    config = _config(tmp_path)
    config.data_dir.mkdir(mode=0o700)
    os.mkfifo(config.bundle_path)
    with pytest.raises(DataFileUnreadableError, match="it is a FIFO, not a regular file"):
        AgentApp(config)
