"""X509Source / AsyncX509Source (this workload's own SVIDs), revocation callbacks and freshness,
against a real gRPC Workload API on a temp Unix socket; every test runs sync and asyncio."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from svid import (
    RevocationEvent,
    RevocationSet,
    RevokedError,
    StaleRevocationsError,
    TrustDomain,
    VerificationError,
    der_concat,
)
from svid._proto import revocation_pb2
from svid.workloadapi import Backoff, WorkloadApiUnavailableError
from tests.svid.aio_facade import FLAVORS, SyncSource, new_source, stopped
from tests.svid.resigned import edi_party_twin
from tests.svid.tls_pki import Pki, make_pki
from tests.svid.workload_fake import Server, State, eventually, signed_crl
from tests.tmpdirs import short_tmpdir

ME = "spiffe://example.org/me"
FAST = Backoff(0.02, 0.2)
FOREIGN = TrustDomain("foreign.org")


@dataclass
class Agent:
    pki: Pki
    state: State
    server: Server


@pytest.fixture(params=FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def agent() -> Iterator[Agent]:
    root = short_tmpdir("x5s")
    pki = make_pki()
    state = State(
        x509={"spiffe://example.org": der_concat([pki.root.cert])},
        svids=[pki.svid(ME)],
    )
    server = Server(state, root / "agent.sock").start()
    yield Agent(pki, state, server)
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def source(agent: Agent, flavor: str) -> Iterator[Any]:
    src = new_source(flavor, agent.server.address, x509=True, backoff=FAST)
    with src:
        src.require_ready(10)
        yield src
    assert stopped(src)


def test_source_keeps_the_newest_svid(agent: Agent, source: Any) -> None:
    first = source.svid
    assert str(first.spiffe_id) == ME
    assert source.svids == (first,)
    assert source.x509_bundle_for(agent.pki.trust_domain) is not None
    assert source.jwt_bundles == {}  # an X509Source does not watch JWT bundles by default
    rotated = agent.pki.svid(ME)
    agent.state.change(svids=[rotated, agent.pki.svid("spiffe://example.org/me/task/t-1")])
    eventually(lambda: source.svid.leaf.serial_number == rotated.leaf.serial_number, "rotation")
    assert str(source.svid_for("spiffe://example.org/me/task/t-1").spiffe_id).endswith("t-1")
    with pytest.raises(WorkloadApiUnavailableError, match=r"for spiffe://example\.org/other"):
        source.svid_for("spiffe://example.org/other")
    # Every SVID revoked (the agent ends the stream with PERMISSION_DENIED): present none.
    agent.state.change(deny=True)
    eventually(lambda: source.svids == (), "SVIDs dropped")
    with pytest.raises(WorkloadApiUnavailableError, match="has not given this workload"):
        _ = source.svid


def test_require_ready_says_what_is_missing(flavor: str, tmp_path: Path) -> None:
    src = new_source(flavor, f"unix://{tmp_path}/none.sock", x509=True, backoff=FAST).start()
    try:
        with pytest.raises(WorkloadApiUnavailableError, match="no answer yet on FetchX509SVID"):
            src.require_ready(0.3)
        with pytest.raises(WorkloadApiUnavailableError):
            _ = src.svid
    finally:
        src.stop()


def test_with_an_x509_source_waits_for_the_first_svid(agent: Agent, flavor: str) -> None:
    if flavor == "sync":
        from svid import X509Source

        with X509Source(agent.server.address, backoff=FAST) as src:
            assert str(src.svid.spiffe_id) == ME
        return
    from svid import AsyncX509Source

    async def main() -> str:
        async with AsyncX509Source(agent.server.address, backoff=FAST) as src:
            return str(src.svid.spiffe_id)

    assert asyncio.run(main()) == ME


def test_on_revoked_through_the_stream(agent: Agent, source: Any, flavor: str) -> None:
    events: list[RevocationEvent] = []
    on_thread = threading.Event()
    unsubscribe = source.on_revoked(events.append)
    if isinstance(source, SyncSource):  # coroutine callbacks run on the source's loop

        async def async_callback(event: RevocationEvent) -> None:
            await asyncio.sleep(0)
            on_thread.set()

        source.on_revoked(async_callback)
    serial = format(source.svid.leaf.serial_number, "x")
    verifier = source.x509_verifier()
    verifier.verify_der(source.svid.chain_der())
    agent.state.change(
        revoked=[
            revocation_pb2.Revoked(kind="x509_serial", value=serial.upper()),
            revocation_pb2.Revoked(
                kind="jwt_id",
                value="j-9",
                expires_at=int(time.time()) + 60,
                spiffe_id="spiffe://example.org/agents/bot/task/t-7",  # the agent says whose
            ),
        ]
    )
    eventually(lambda: len(events) == 2, "two revocation events")
    by_kind = {e.kind: e for e in events}
    assert by_kind["x509_serial"].value == serial
    assert str(by_kind["x509_serial"].spiffe_id) == ME  # our own SVID: its identity is known
    assert by_kind["x509_serial"].task_id is None
    assert by_kind["jwt_id"].task_id == by_kind["jwt_id"].txn == "t-7"
    with pytest.raises(RevokedError):
        verifier.verify_der(source.svid.chain_der())
    if flavor == "asyncio":
        assert on_thread.wait(5)
    unsubscribe()
    agent.state.change(
        revoked=[revocation_pb2.Revoked(kind="jwt_id", value="j-10", spiffe_id="not an ID")]
    )
    eventually(lambda: source.revocations.is_jti_revoked("j-10"), "j-10 revoked")
    assert len(events) == 2


def test_verification_fails_closed_while_the_agent_is_away(agent: Agent, source: Any) -> None:
    verifier = source.x509_verifier(max_revocation_staleness=0.5)
    chain = source.svid.chain_der()
    eventually(lambda: source.revocations_updated_at is not None, "first revocation update")
    assert source.revocation_staleness() == 0.0
    verifier.verify_der(chain)
    agent.server.stop()
    eventually(lambda: source.revocation_staleness() > 0.5, "stale revocation data")
    with pytest.raises(StaleRevocationsError, match="is the local agent down"):
        verifier.verify_der(chain)
    agent.server.start()
    eventually(lambda: source.revocation_staleness() == 0.0, "fresh again")
    verifier.verify_der(chain)


def test_bundles_are_dropped_when_the_agent_says_the_identity_is_gone(
    agent: Agent, flavor: str
) -> None:
    # The agent ends every stream with PERMISSION_DENIED once this workload holds no identity
    # (or the agent is banned): it no longer backs those bundles, which would go on verifying
    # peers and tokens, never updated again, with keys the trust domain may have withdrawn.
    agent.state.change(jwt={"spiffe://example.org": b'{"keys": []}'})
    src = new_source(flavor, agent.server.address, x509=True, jwt_bundles=True, backoff=FAST)
    with src:
        src.require_ready(10)
        td = agent.pki.trust_domain
        chain = src.svid.chain_der()
        verifier = src.x509_verifier()
        verifier.verify_der(chain)
        assert src.jwt_bundle_for(td) is not None
        agent.state.change(deny=True)
        eventually(lambda: src.svids == (), "SVIDs dropped")
        eventually(lambda: src.x509_bundle_for(td) is None, "X.509 bundles dropped")
        eventually(lambda: src.jwt_bundle_for(td) is None, "JWT bundles dropped")
        with pytest.raises(VerificationError):
            verifier.verify_der(chain)
        agent.state.change(deny=False)
        eventually(lambda: src.x509_bundle_for(td) is not None, "X.509 bundles back")
        verifier.verify_der(chain)
    assert stopped(src)


class _BrokenWhileArmed(RevocationSet):
    """A revocation set whose replace fails with no SvidError while ``armed``: any fault of
    applying an update (a bug, an exception a library raises that we did not foresee)."""

    armed = False

    def replace(self, *args: Any, **kwargs: Any) -> None:
        if self.armed:
            raise RuntimeError("applying this update failed")
        super().replace(*args, **kwargs)


def test_an_update_that_cannot_be_applied_makes_the_revocations_stale_and_the_stream_retries(
    agent: Agent, flavor: str
) -> None:
    # Any exception from applying an update counts as an unusable update: the stream is
    # reopened (a fresh full state may apply) and the revocation data ages meanwhile, so
    # max_revocation_staleness refuses; a loop that died instead would leave the set frozen
    # and counted as live for ever.
    revocations = _BrokenWhileArmed()
    src = new_source(flavor, agent.server.address, x509=True, revocations=revocations, backoff=FAST)
    with src:
        src.require_ready(10)
        chain = src.svid.chain_der()
        verifier = src.x509_verifier(max_revocation_staleness=0.3)
        eventually(lambda: src.revocation_staleness() == 0.0, "first revocation update")
        verifier.verify_der(chain)
        revocations.armed = True
        serial = format(src.svid.leaf.serial_number, "x")
        agent.state.change(revoked=[revocation_pb2.Revoked(kind="x509_serial", value=serial)])
        eventually(lambda: src.revocation_staleness() > 0.3, "stale revocation data")
        with pytest.raises(StaleRevocationsError):
            verifier.verify_der(chain)
        revocations.armed = False
        eventually(lambda: src.revocation_staleness() == 0.0, "fresh again")
        with pytest.raises(RevokedError):
            verifier.verify_der(chain)
    assert stopped(src)


def test_a_federated_authority_that_cannot_be_read_leaves_our_crls_in_force(
    agent: Agent, flavor: str
) -> None:
    # A federated bundle's authority with our root's subject name and an ediPartyName in its
    # SAN (cryptography cannot read it; Go and OpenSSL can, SPIRE serves it unchanged): every
    # CRL of our root is checked against it too. That raised out of the streams' loops and
    # ended them, so revocations stopped arriving while the data still counted as fresh.
    pki = agent.pki
    peer = pki.svid("spiffe://example.org/peer", under_root=True)
    agent.state.change(crls=[signed_crl(pki.root, [])])
    src = new_source(flavor, agent.server.address, x509=True, backoff=FAST)
    with src:
        src.require_ready(10)
        verifier = src.x509_verifier(federated=True, max_revocation_staleness=5)

        def accepted() -> bool:
            try:
                return bool(verifier.verify_der(peer.chain_der()).spiffe_id == peer.spiffe_id)
            except VerificationError:  # until the revocation stream's first message
                return False

        eventually(accepted, "the peer verified on fresh revocation data")
        agent.state.change(
            x509={
                "spiffe://example.org": der_concat([pki.root.cert]),
                "spiffe://foreign.org": der_concat([edi_party_twin(pki.root, "foreign.org")]),
            }
        )
        eventually(lambda: src.x509_bundle_for(FOREIGN) is not None, "foreign bundle")
        agent.state.change(crls=[signed_crl(pki.root, [peer.leaf.serial_number])])

        def refused() -> bool:
            try:
                verifier.verify_der(peer.chain_der())
            except RevokedError:
                return True
            return False

        eventually(refused, "the revocation of the peer's leaf", timeout=5)
    assert stopped(src)
