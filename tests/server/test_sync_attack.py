"""Adversarial checks of the Sync stream and its propagation across servers on one datastore.

Each test here shows a defect found on purpose (it fails until the defect is mended): what a
compromised node agent can make a server do through Sync, and what an agent is served by a
server that lost its datastore.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.ca.sealing import KeyEncryptionKey
from server.datastore.records import FeedItem, Revocation
from server.node_api import SYNC_OPENS_BURST
from server.propagation import MAX_STREAMS_PER_AGENT
from svid._proto import admin_pb2, common_pb2, node_pb2
from svid._x509pop import sign_challenge
from tests.server.fixtures import (
    DER,
    PEM,
    TRUST_DOMAIN,
    Agent,
    HeldCatchUp,
    RunningServer,
    der_chain,
    make_csr,
    managed_server,
    running_server,
    short_tmpdir,
    start_server,
)
from tests.server.tcp_cut import CuttableRelay, upstream_of
from tests.server.test_x509pop import _ca, _node, _pop_exchange
from tests.waits import wait_for

# Sync streams one agent can sensibly need at once: one per server connection, plus a few
# while it reconnects or moves its stream to a renewed certificate.
SANE_STREAMS_PER_AGENT = 8


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    yield from running_server()


def _refused(stream: Any) -> int:
    """1 when the stream was refused for the agent's budget, 0 when its snapshot came."""
    try:
        first = next(stream)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return 1
    assert first.kind == node_pb2.SyncUpdate.SNAPSHOT
    return 0


def test_one_agent_cannot_hold_hundreds_of_sync_streams(srv: RunningServer) -> None:
    """A compromised agent opens Sync after Sync on one connection: each costs a snapshot
    (every entitled entry, every revocation, the CRLs and the bundle), a subscription that every
    bundle, revocation, CRL and checkpoint change wakes, and up to MAX_INBOX changes held. The
    server should refuse an agent's streams past a small number (RESOURCE_EXHAUSTED)."""
    agent = srv.attest()
    stub = srv.node_stub(agent)
    streams = []
    refused = 0
    try:
        for _ in range(200):
            stream = stub.Sync(node_pb2.SyncRequest(), timeout=30)
            streams.append(stream)
            refused += _refused(stream)
        propagator = srv.server.propagator
        assert propagator is not None
        held = propagator.subscriber_count
        assert held <= SANE_STREAMS_PER_AGENT, (
            f"one agent holds {held} open Sync streams on one server ({refused} refused)"
        )
    finally:
        for stream in streams:
            stream.cancel()
        time.sleep(0.1)


def test_an_agent_opening_and_cancelling_sync_in_a_loop_is_held_to_a_rate(
    srv: RunningServer,
) -> None:
    """Under the cap on open streams an agent may still open and cancel Sync in a loop, each
    open a snapshot built on the event loop: past a burst it is refused until time passes."""
    agent = srv.attest()
    stub = srv.node_stub(agent)
    for _ in range(SYNC_OPENS_BURST):
        stream = stub.Sync(node_pb2.SyncRequest(), timeout=30)
        assert _refused(stream) == 0
        stream.cancel()
    refused = stub.Sync(node_pb2.SyncRequest(), timeout=30)
    with pytest.raises(grpc.RpcError) as caught:
        next(refused)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "Sync stream rate limit" in caught.value.details()  # type: ignore[attr-defined]
    srv.clock.advance(1)  # two more a second
    stream = stub.Sync(node_pb2.SyncRequest(), timeout=30)
    assert _refused(stream) == 0
    stream.cancel()


def _renewed(srv: RunningServer, agent: Agent) -> Agent:
    key, csr = make_csr()
    reply = srv.node_stub(agent).RenewAgent(node_pb2.RenewAgentRequest(csr=csr), timeout=10)
    return Agent(agent.spiffe_id, key, der_chain(reply.svid.cert_chain), reply.svid.bundle)


def test_an_agent_moving_its_stream_again_and_again_is_never_refused(srv: RunningServer) -> None:
    """A sound agent renews its SVID and moves its Sync stream to the new certificate at once,
    on a new connection (agent_attestor.sync: renew_once, then _sync_once again), many times
    over a server's life: each stream that ends gives its place back, so none is refused."""
    agent = srv.attest()
    stream = srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
    first = next(stream)
    assert first.kind == node_pb2.SyncUpdate.SNAPSHOT
    propagator = srv.server.propagator
    assert propagator is not None
    try:
        for _ in range(3 * MAX_STREAMS_PER_AGENT):
            agent = _renewed(srv, agent)
            stream.cancel()
            request = node_pb2.SyncRequest(since_revision=first.revision, epoch=first.epoch)
            stream = srv.node_stub(agent).Sync(request, timeout=30)
            first = next(stream)  # refused: grpc.RpcError RESOURCE_EXHAUSTED
        wait_for(lambda: propagator.subscriber_count == 1, 10, "the moved streams to end")
    finally:
        stream.cancel()


@dataclass
class Partitioned:
    """A reaches PostgreSQL directly, B through a relay the test cuts."""

    a: RunningServer
    b: RunningServer
    relay: CuttableRelay


@pytest.fixture
def partitioned(postgres_dsn: str) -> Iterator[Partitioned]:
    root = short_tmpdir()
    KeyEncryptionKey.generate().write_new(root / "kek")
    relay = CuttableRelay(upstream_of(postgres_dsn))
    shared = {"key_encryption_key_file": str(root / "kek")}
    a = start_server(
        root, admin_socket=str(root / "a" / "admin.sock"), datastore=postgres_dsn, **shared
    )
    b = start_server(
        root,
        admin_socket=str(root / "b" / "admin.sock"),
        datastore=relay.dsn_through(postgres_dsn),
        **shared,
    )
    try:
        yield Partitioned(a, b, relay)
    finally:
        relay.cut()  # a frozen relay's calls fail now, rather than hold B's threads for ever
        b.stop()
        a.stop()
        shutil.rmtree(root, ignore_errors=True)


def _snapshot(server: RunningServer, agent: Agent) -> frozenset[str] | grpc.StatusCode:
    """What a fresh Sync snapshot on `server` hands the agent ("entry <id>", "revoked <value>"),
    or the code it refused with."""
    stream = server.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=5)
    try:
        held: set[str] = set()
        while True:
            update = next(stream)
            held.update(f"entry {e.id}" for e in update.entries)
            held.update(f"revoked {r.value}" for r in update.revocations)
            if not update.more:
                return frozenset(held)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    finally:
        stream.cancel()


def test_a_server_cut_off_from_postgresql_goes_on_serving_its_stale_view_over_sync(
    partitioned: Partitioned,
) -> None:
    """B loses its database (a partition). Through A, which still has it, an entry is deleted
    and a JWT revoked. B's feed cannot bring either, yet B goes on answering Sync from memory:
    a snapshot made seconds later still hands the agent the deleted entry and lacks the
    revocation (a snapshot replaces the agent's revocations: an agent failing over from A to
    B loses one it held). Its open streams stay up, so its agents never move to A. The README
    promises a change reaches every server's agents within feed_poll_interval (1 s); failing
    closed, B would refuse Sync (UNAVAILABLE) once its view can no longer be known fresh."""
    a, b = partitioned.a, partitioned.b
    agent = a.attest()
    entry = a.create_entry("/web", agent.spiffe_id)
    wait_for(lambda: entry.id in b.server.state.entries.by_id, 10, "B to learn the entry")
    assert _snapshot(b, agent) == {f"entry {entry.id}"}

    partitioned.relay.cut()
    a.admin().DeleteEntry(admin_pb2.DeleteEntryRequest(id=entry.id), timeout=10)
    now = int(a.clock.now())
    revoked = Revocation(
        "jwt_id", "jti-stolen", f"spiffe://{TRUST_DOMAIN}/web", now + 300, "t", now
    )
    a.call(a.server.state.add_revocations((revoked,)))
    fresh = _snapshot(a, agent)
    assert fresh == {"revoked jti-stolen"}
    # Several feed poll intervals (1 s) later: B has had every chance to notice.
    time.sleep(3.5)
    served = _snapshot(b, agent)
    assert served in (fresh, grpc.StatusCode.UNAVAILABLE), (
        f"B, cut off from the database for 3.5 s, still serves its stale view: {served}, "
        f"where A serves {fresh}"
    )


def _issue(server: RunningServer, agent: Agent, entry_id: str, timeout: float) -> str:
    """The status code name of an X.509-SVID request through `server` ("OK": signed)."""
    request = node_pb2.BatchNewX509SVIDRequest(
        params=[node_pb2.X509SVIDParams(entry_id=entry_id, csr=make_csr()[1])]
    )
    try:
        reply = server.node_stub(agent).BatchNewX509SVID(request, timeout=timeout)
    except grpc.RpcError as exc:
        return str(exc.code().name)  # type: ignore[attr-defined]
    return (
        grpc.StatusCode.OK.name
        if reply.results[0].error.code == 0
        else str(reply.results[0].error.code)
    )


def test_a_server_whose_database_goes_silent_answers_issuance_unavailable_not_never(
    partitioned: Partitioned,
) -> None:
    """B's database stops answering without closing its connections (packets dropped by a
    firewall, its host frozen): no keepalive, statement or TCP user timeout is set on B's
    connections, so a ledger write waits on TCP's retransmission timeout (about 15 minutes on
    Linux), holding a worker thread. The README promises that a datastore that cannot commit
    makes every issuing call answer UNAVAILABLE "the server cannot record issued credentials";
    here the agent's call answers nothing until its own deadline."""
    a, b = partitioned.a, partitioned.b
    agent = a.attest()
    entry = a.create_entry("/web", agent.spiffe_id)
    wait_for(lambda: entry.id in b.server.state.entries.by_id, 10, "B to learn the entry")
    assert _issue(b, agent, entry.id, timeout=10) == "OK"

    partitioned.relay.freeze()
    started = time.monotonic()
    answer = _issue(b, agent, entry.id, timeout=8)
    took = time.monotonic() - started
    assert answer == "UNAVAILABLE", f"B answered {answer} after {took:.1f} s"


def test_a_revocation_through_a_is_not_withdrawn_by_a_revocation_b_reads_back_before_it(
    partitioned: Partitioned,
) -> None:
    """B adds a revocation and reads the list back (ServerState.add_revocations); A's
    revocation commits after that read, and B's feed brings it before the read-back is
    installed. `_set_revocations` then replaces memory with the list read earlier: A's
    revocation is dropped and logged as removed, so B's agents are told the token is no
    longer revoked. The feed's cursor is past A's row: nothing brings it back until the next
    revocation anywhere. Only the interleaving is held here (B's feed reads its rows once A's is
    committed; B's read-back returns once its feed has applied A's row)."""
    a, b = partitioned.a, partitioned.b
    agent = a.attest()
    wait_for(lambda: agent.spiffe_id in b.server.state.agents, 10, "B to learn the agent")
    state_b = b.server.state
    follower = b.server.follower
    assert follower is not None
    original_page = follower._page
    released = threading.Event()

    def held_page(cursor: int) -> tuple[int, list[FeedItem]]:
        # B's feed reads its next rows only once A's revocation is among them.
        released.wait(10)
        return original_page(cursor)

    store_b = b.server.datastore
    original_list = store_b.list_revocations
    armed, read_back = threading.Event(), threading.Event()

    def list_revocations() -> list[Revocation]:
        rows = original_list()
        if armed.is_set():
            armed.clear()
            read_back.set()
            wait_for(
                lambda: "jti-a" in {r.value for r in state_b.revocations}, 10, "B to apply A's"
            )
        return rows

    follower._page = held_page  # type: ignore[method-assign]
    store_b.list_revocations = list_revocations  # type: ignore[method-assign]
    now = int(a.clock.now())
    web = f"spiffe://{TRUST_DOMAIN}/web"
    through_b = Revocation("jwt_id", "jti-b", web, now + 300, "t", now)
    through_a = Revocation("jwt_id", "jti-a", web, now + 300, "t", now)
    armed.set()
    with ThreadPoolExecutor(1) as pool:
        adding = pool.submit(b.call, state_b.add_revocations((through_b,)))
        assert read_back.wait(10)
        a.call(a.server.state.add_revocations((through_a,)))
        released.set()
        adding.result(timeout=20)
    assert _snapshot(a, agent) == {"revoked jti-a", "revoked jti-b"}
    with contextlib.suppress(TimeoutError):  # held or not, what B serves is checked below
        wait_for(lambda: "jti-a" in {r.value for r in state_b.revocations}, 3, "A's on B")
    served = _snapshot(b, agent)
    assert served == {"revoked jti-a", "revoked jti-b"}, (
        f"B withdrew the revocation made through A: its agents get {served}"
    )


def _intermediate(root: x509.Certificate, root_key: Any, key: Any) -> x509.Certificate:
    """An intermediate CA over `key`: called twice with one key, two certificates of one CA
    (re-issued, as an operator does when it nears its end), each with its own fingerprint."""
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-intermediate")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )


def _pop_agent(srv: RunningServer, chain: list[x509.Certificate], key: Any) -> Agent:
    agent_key, csr = make_csr()
    payload = b"".join(c.public_bytes(DER) for c in chain)
    result = _pop_exchange(srv, payload, csr, lambda nonce: sign_challenge(key, nonce))
    return Agent(result.spiffe_id, agent_key, der_chain(result.cert_chain), result.bundle)


def _first_message(srv: RunningServer, agent: Agent, since: int, epoch: str) -> Any:
    stream = srv.node_stub(agent).Sync(
        node_pb2.SyncRequest(since_revision=since, epoch=epoch), timeout=10
    )
    try:
        return next(stream)
    finally:
        stream.cancel()


def test_a_catch_up_after_attesting_again_with_other_selectors_drops_what_they_no_longer_reach(
    tmp_path: Path,
) -> None:
    """An x509pop node's intermediate CA is re-issued (same key) while the agent is away; its
    SVID ran out, so it attests again with the same leaf (the same agent ID) and the new
    intermediate: its `ca:fingerprint` selector changes, and the node alias it matched by the
    old one no longer reaches it. It then asks Sync for what came after its saved revision,
    as a restarted agent does. A live stream starts again from a snapshot when the agent's
    selectors change (node_api.Sync); this catch-up does not: the delta covers only entries
    touched in the window, so the workload entry under the alias is never removed and the
    agent keeps serving it (and never gets what the new selectors reach)."""
    root, root_key = _ca("node-root")
    ca_file = tmp_path / "node-ca.pem"
    ca_file.write_bytes(root.public_bytes(PEM))
    inter_key = ec.generate_private_key(ec.SECP256R1())
    old_inter = _intermediate(root, root_key, inter_key)
    new_inter = _intermediate(root, root_key, inter_key)
    leaf, leaf_key = _node(old_inter, inter_key, "rack3")
    with managed_server(x509pop_ca_bundle=str(ca_file)) as srv:
        agent = _pop_agent(srv, [leaf, old_inter], leaf_key)
        old_fp = hashlib.sha1(old_inter.public_bytes(DER), usedforsecurity=False).hexdigest()
        alias = srv.create_entry(
            "/nodes/old-intermediate",
            f"spiffe://{TRUST_DOMAIN}/svid/server",
            selectors=[common_pb2.Selector(type="x509pop", value=f"ca:fingerprint:{old_fp}")],
        )
        workload = srv.create_entry("/rack3/web", alias.spiffe_id)
        reached = _first_message(srv, agent, 0, "")
        assert [e.id for e in reached.entries] == [workload.id]

        again = _pop_agent(srv, [leaf, new_inter], leaf_key)
        assert again.spiffe_id == agent.spiffe_id
        assert _first_message(srv, again, 0, "").entries == []  # a snapshot: not reached
        caught_up = _first_message(srv, again, reached.revision, reached.epoch)
        assert caught_up.kind == node_pb2.SyncUpdate.SNAPSHOT or list(
            caught_up.removed_entry_ids
        ) == [workload.id], (
            f"the catch-up after attesting again with other selectors leaves the agent its "
            f"entry under the alias it no longer matches: kind {caught_up.kind}, removed "
            f"{list(caught_up.removed_entry_ids)}, entries {[e.id for e in caught_up.entries]}"
        )


def test_sync_streams_waiting_for_their_snapshot_s_catch_up_count_against_the_cap(
    srv: RunningServer,
) -> None:
    """Streams waiting for the view to catch up before their snapshot (a slow feed read) hold
    a place among the agent's MAX_STREAMS_PER_AGENT: an agent opening more meanwhile is
    refused at once, not left to pile up waiters that each then build a snapshot."""
    node = srv.server.node
    assert node is not None
    held_catch_up = HeldCatchUp(srv.call)
    node._view._catch_up = held_catch_up
    node._view.bound = 60.0  # the waiters wait for the gate, not for the bound
    agent = srv.attest()
    stub = srv.node_stub(agent)
    streams = [stub.Sync(node_pb2.SyncRequest(), timeout=30) for _ in range(MAX_STREAMS_PER_AGENT)]
    try:
        wait_for(
            lambda: held_catch_up.waiting == MAX_STREAMS_PER_AGENT,
            10,
            "the streams to wait for the view",
        )
        fifth = stub.Sync(node_pb2.SyncRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            next(fifth)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "open Sync streams" in caught.value.details()  # type: ignore[attr-defined]
        held_catch_up.release()
        for stream in streams:
            assert _refused(stream) == 0  # the waiters are served once the view caught up
    finally:
        held_catch_up.release()
        for stream in streams:
            stream.cancel()
