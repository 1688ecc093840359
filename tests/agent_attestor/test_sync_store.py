"""Pure pieces of the server link: backoff, Sync message conversion, the on-disk agent identity."""

from __future__ import annotations

import random
import stat
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent_attestor.agent_store import AgentStore, AgentSvid
from agent_attestor.node_client import sync_state
from agent_attestor.sync import backoff_delay
from svid._clock import FakeClock
from svid._proto import common_pb2, node_pb2
from tests.agent_attestor.pki import LocalCa


def test_backoff_grows_is_jittered_and_capped() -> None:
    rand = random.Random(7)
    delays = [backoff_delay(a, 0.2, 10.0, rand) for a in range(12)]
    assert all(0.2 <= d <= 10.0 for d in delays)
    assert max(delays[:2]) <= 0.4
    assert min(delays[-4:]) >= 5.0  # capped ceiling, jitter keeps at least half of it
    assert len(set(delays)) == len(delays)  # jittered: agents do not retry in lockstep


def test_sync_update_becomes_state() -> None:
    update = node_pb2.SyncUpdate(
        entries=[
            common_pb2.Entry(
                id="e1",
                spiffe_id="spiffe://example.org/w",
                selectors=[common_pb2.Selector(type="unix", value="uid:1")],
                hint="db",
            )
        ],
        bundle=common_pb2.Bundle(trust_domain="example.org", x509_authorities=[b"ca"]),
        revocations=[
            common_pb2.Revocation(kind=common_pb2.Revocation.X509_SERIAL, value="AB12"),
            common_pb2.Revocation(kind=common_pb2.Revocation.JWT_ID, value="jti-1"),
        ],
        crl=[b"crl"],
        federated_bundles={"spiffe://other.org": common_pb2.Bundle(trust_domain="other.org")},
        revision=9,
    )
    state = sync_state(update)
    assert [e.hint for e in state.entries] == ["db"]
    assert state.bundle.x509_authorities == (b"ca",)
    assert state.revoked_serials == frozenset({"ab12"})
    assert state.revoked_jtis == frozenset({"jti-1"})
    assert set(state.federated) == {"other.org"}
    assert state.crl == (b"crl",)


def _svid(tmp_path: Path) -> AgentSvid:
    ca = LocalCa(FakeClock(start=time.time()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.sign_leaf(key.public_key(), "spiffe://example.org/svid/agent/join_token/t")
    return AgentSvid("spiffe://example.org/svid/agent/join_token/t", (cert,), key)


def test_agent_identity_round_trips_with_private_modes(tmp_path: Path) -> None:
    store = AgentStore(
        tmp_path / "d" / "svid.der", tmp_path / "d" / "key.der", tmp_path / "d" / "b"
    )
    assert store.load_svid() is None
    svid = _svid(tmp_path)
    store.save_svid(svid)
    loaded = store.load_svid()
    assert loaded is not None
    assert loaded.spiffe_id == svid.spiffe_id
    assert loaded.chain == svid.chain
    for path in (store.svid_path, store.key_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.svid_path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize("damage", ["garbage-chain", "other-key"])
def test_unusable_identity_on_disk_means_attest_again(tmp_path: Path, damage: str) -> None:
    store = AgentStore(tmp_path / "svid.der", tmp_path / "key.der", tmp_path / "b")
    store.save_svid(_svid(tmp_path))
    if damage == "garbage-chain":
        store.svid_path.write_bytes(b"\x30\x03abc")
    else:
        store.save_svid(
            AgentSvid("x", _svid(tmp_path).chain, ec.generate_private_key(ec.SECP256R1()))
        )
    assert store.load_svid() is None
