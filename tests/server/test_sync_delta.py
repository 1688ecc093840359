"""Sync sends each agent only what changed for it, catches a reconnecting agent up from its
revision, and splits big snapshots: real server, real gRPC over TLS, real SQLite."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import grpc
import pytest
from cryptography import x509

from server import propagation
from server.changelog import ChangeLog
from server.datastore.records import AttestedAgent, Revocation, Selector
from server.sync_delta import SNAPSHOT_BASE
from svid._proto import admin_pb2, common_pb2, node_pb2
from tests.server.fixtures import Agent, RunningServer, der_chain, make_csr, running_server

TD = "spiffe://example.org"
SNAPSHOT = node_pb2.SyncUpdate.SNAPSHOT
DELTA = node_pb2.SyncUpdate.DELTA
# What gRPC refuses to receive by default: no message may come near it.
GRPC_LIMIT = 4 * 1024 * 1024


@pytest.fixture
def srv() -> Iterator[RunningServer]:
    yield from running_server()


def _entries(parent: str, count: int, prefix: str) -> Iterator[common_pb2.Entry]:
    for n in range(count):
        yield common_pb2.Entry(
            spiffe_id=f"{TD}/{prefix}/{n}",
            parent_id=parent,
            selectors=[common_pb2.Selector(type="unix", value=f"uid:{n}")],
        )


def _create(srv: RunningServer, entries: list[common_pb2.Entry]) -> list[str]:
    ids: list[str] = []
    admin = srv.admin()
    for start in range(0, len(entries), 1000):
        batch = admin_pb2.BatchCreateEntryRequest(entries=entries[start : start + 1000])
        results = admin.BatchCreateEntry(batch, timeout=120).results
        ids.extend(r.id for r in results)
    return ids


def _sync(srv: RunningServer, agent: Agent, since: int = 0, epoch: str = "") -> grpc.Future:
    request = node_pb2.SyncRequest(since_revision=since, epoch=epoch)
    return srv.node_stub(agent).Sync(request, timeout=120)


def _read_snapshot(stream: Iterator[node_pb2.SyncUpdate]) -> list[node_pb2.SyncUpdate]:
    parts = [next(stream)]
    while parts[-1].more:
        parts.append(next(stream))
    return parts


def test_a_write_for_another_agent_reaches_no_other_stream(srv: RunningServer) -> None:
    agent, other = srv.attest(), srv.attest()
    _create(srv, list(_entries(agent.spiffe_id, 500, "held")))
    stream = _sync(srv, agent)
    try:
        assert len(next(stream).entries) == 500
        propagator = srv.server.propagator
        before = propagator.deliveries
        unrelated = srv.create_entry("/elsewhere", other.spiffe_id)
        srv.admin().DeleteEntry(admin_pb2.DeleteEntryRequest(id=unrelated.id))
        # No stream was handed either change: no per-agent work at all.
        assert propagator.deliveries == before
        mine = srv.create_entry("/mine", agent.spiffe_id)
        assert propagator.deliveries == before + 1
        # The next message is the related change alone: nothing was sent for the others.
        update = next(stream)
        assert update.kind == DELTA
        assert [e.id for e in update.entries] == [mine.id]
        assert list(update.removed_entry_ids) == []
    finally:
        stream.cancel()


def test_an_agent_entitled_to_40k_entries_gets_a_chunked_snapshot(srv: RunningServer) -> None:
    agent = srv.attest()
    ids = _create(srv, list(_entries(agent.spiffe_id, 40_000, "many")))
    stream = _sync(srv, agent)
    try:
        parts = _read_snapshot(stream)
        assert len(parts) > 2
        assert all(p.kind == SNAPSHOT for p in parts)
        assert [p.more for p in parts] == [True] * (len(parts) - 1) + [False]
        # Far below gRPC's limit, every one: the agent gets ready whatever it holds.
        assert max(p.ByteSize() for p in parts) <= 1.1 * 1024 * 1024
        assert max(p.ByteSize() for p in parts) < GRPC_LIMIT / 3
        got = [e.id for p in parts for e in p.entries]
        assert sorted(got) == sorted(ids)
        # The bundle rides in the last part, once.
        assert parts[-1].bundle.x509_authorities
        assert not any(p.HasField("bundle") for p in parts[:-1])
    finally:
        stream.cancel()


def test_a_reconnecting_agent_gets_only_what_it_missed(srv: RunningServer) -> None:
    agent, other = srv.attest(), srv.attest()
    kept, dropped = (srv.create_entry(f"/r/{n}", agent.spiffe_id) for n in range(2))
    stream = _sync(srv, agent)
    first = next(stream)
    stream.cancel()
    assert {e.id for e in first.entries} == {kept.id, dropped.id}
    added = srv.create_entry("/r/added", agent.spiffe_id)
    srv.admin().DeleteEntry(admin_pb2.DeleteEntryRequest(id=dropped.id))
    srv.create_entry("/r/unrelated", other.spiffe_id)
    stream = _sync(srv, agent, first.revision, first.epoch)
    try:
        update = next(stream)
        assert update.kind == DELTA
        assert [e.id for e in update.entries] == [added.id]
        assert list(update.removed_entry_ids) == [dropped.id]
        assert not update.HasField("bundle")
        assert update.revision > first.revision
    finally:
        stream.cancel()


def test_a_reconnect_with_nothing_missed_is_one_empty_delta(srv: RunningServer) -> None:
    agent = srv.attest()
    srv.create_entry("/quiet", agent.spiffe_id)
    stream = _sync(srv, agent)
    first = next(stream)
    stream.cancel()
    stream = _sync(srv, agent, first.revision, first.epoch)
    try:
        update = next(stream)
        assert update.kind == DELTA
        assert (list(update.entries), update.revision) == ([], first.revision)
    finally:
        stream.cancel()


def test_a_reconnect_after_the_agents_renewal_is_still_a_delta(srv: RunningServer) -> None:
    """A renewal changes the agent's record but not its selectors: the stream it moves to the
    renewed certificate catches up with a delta, not a snapshot (an attestation with other
    selectors gets one: test_sync_attack)."""
    agent = srv.attest()
    srv.create_entry("/renewing", agent.spiffe_id)
    stream = _sync(srv, agent)
    first = next(stream)
    stream.cancel()
    key, csr = make_csr()
    reply = srv.node_stub(agent).RenewAgent(node_pb2.RenewAgentRequest(csr=csr), timeout=10)
    renewed = Agent(agent.spiffe_id, key, der_chain(reply.svid.cert_chain), reply.svid.bundle)
    stream = _sync(srv, renewed, first.revision, first.epoch)
    try:
        update = next(stream)
        assert update.kind == DELTA
        assert list(update.entries) == []
    finally:
        stream.cancel()


def test_a_record_another_server_wrote_brings_a_snapshot_only_with_other_selectors(
    srv: RunningServer,
) -> None:
    """The agent's record as the change feed brings it (ServerState.apply_agents): renewed
    through another server, the catch-up stays a delta; attested again there with other
    selectors, it is a snapshot, as on the server it attested to."""
    agent = srv.attest()
    state = srv.server.state
    stream = _sync(srv, agent)
    first = next(stream)
    stream.cancel()
    held = state.agents[agent.spiffe_id]

    async def apply(record: AttestedAgent) -> None:
        state.apply_agents([record], [])

    srv.call(apply(replace(held, expires_at=held.expires_at + 60)))
    stream = _sync(srv, agent, first.revision, first.epoch)
    try:
        assert next(stream).kind == DELTA
    finally:
        stream.cancel()
    other = (*held.selectors, Selector("join_token", "rack:7"))
    srv.call(apply(replace(held, selectors=other, attested_at=held.attested_at + 1)))
    stream = _sync(srv, agent, first.revision, first.epoch)
    try:
        assert next(stream).kind == SNAPSHOT
    finally:
        stream.cancel()


def test_a_catch_up_over_more_changes_than_its_snapshot_holds_is_the_snapshot(
    srv: RunningServer,
) -> None:
    """Building a delta costs the window's touches on the event loop, a snapshot the agent's
    entries: an agent asking for an old revision (away long, or on purpose, again and again)
    over a window of 3,000 entries written for another agent gets its one-entry snapshot."""
    agent, other = srv.attest(), srv.attest()
    mine = srv.create_entry("/few/0", agent.spiffe_id)
    stream = _sync(srv, agent)
    first = next(stream)
    stream.cancel()
    _create(srv, list(_entries(other.spiffe_id, SNAPSHOT_BASE + 2000, "busy")))
    stream = _sync(srv, agent, first.revision, first.epoch)
    try:
        update = next(stream)
        assert update.kind == SNAPSHOT
        assert [e.id for e in update.entries] == [mine.id]
    finally:
        stream.cancel()


def test_an_agent_behind_the_ring_or_from_another_epoch_gets_a_snapshot(
    srv: RunningServer,
) -> None:
    agent = srv.attest()
    entry = srv.create_entry("/behind/0", agent.spiffe_id)
    stream = _sync(srv, agent)
    first = next(stream)
    stream.cancel()
    stream = _sync(srv, agent, first.revision, "another-server")
    try:
        assert next(stream).kind == SNAPSHOT
    finally:
        stream.cancel()
    # A small ring: three more changes push the agent's revision out of it.
    log: ChangeLog = srv.server.state.changes
    log._capacity = 2
    for n in range(1, 4):
        srv.create_entry(f"/behind/{n}", agent.spiffe_id)
    assert log.floor > first.revision
    stream = _sync(srv, agent, first.revision, first.epoch)
    try:
        update = next(stream)
        assert update.kind == SNAPSHOT
        assert entry.id in {e.id for e in update.entries}
        assert len(update.entries) == 4
    finally:
        stream.cancel()


def test_the_ring_holds_at_most_its_capacity_in_entries_however_big_the_batches(
    srv: RunningServer,
) -> None:
    """A batch write is one change touching up to a thousand entries (old and new versions):
    a ring bounded by changes alone held a thousand times its capacity in entries, and an
    operator refreshing a thousand entries every few seconds grew the server by ~1 MB a batch
    until it ran out of memory (100,000 changes)."""
    agent = srv.attest()
    log: ChangeLog = srv.server.state.changes
    log._capacity = 1000
    admin = srv.admin()
    ids = _create(srv, list(_entries(agent.spiffe_id, 200, "ring")))
    for round_ in range(10):
        entries = [
            common_pb2.Entry(
                id=entry_id,
                spiffe_id=f"{TD}/ring/{n}",
                parent_id=agent.spiffe_id,
                selectors=[common_pb2.Selector(type="unix", value=f"uid:{n}")],
                x509_svid_ttl=300 + round_,
            )
            for n, entry_id in enumerate(ids)
        ]
        results = admin.BatchUpdateEntry(
            admin_pb2.BatchUpdateEntryRequest(entries=entries), timeout=60
        ).results
        assert all(r.status.code == 0 for r in results)
    held = log.since(log.floor, log.epoch)
    assert held is not None
    assert sum(len(change.entries) for change in held) <= 1000
    # What the ring let go, a reconnecting agent gets as a snapshot; what it holds, as deltas.
    assert held
    assert held[-1].revision == log.head
    assert log.since(log.floor - 1, log.epoch) is None


def test_the_expiry_heap_holds_each_expiring_entry_once_however_often_it_is_written(
    srv: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every write of an entry with an expiry pushed it on the propagator's expiry heap again,
    and a deleted entry stayed there: both until the expiry came, which for an entry expiring
    in a month is a month of writes (a batch of a thousand every few seconds: ~30 MB an hour)."""
    monkeypatch.setattr(propagation, "EXPIRY_SLACK", 0, raising=False)  # no slack: exact
    agent = srv.attest()
    propagator = srv.server.propagator
    assert propagator is not None
    far = int(srv.clock.now()) + 30 * 86400
    entries = list(_entries(agent.spiffe_id, 200, "expiring"))
    for entry in entries:
        entry.expires_at = far
    for entry, entry_id in zip(entries, _create(srv, entries), strict=True):
        entry.id = entry_id
    admin = srv.admin()
    for round_ in range(10):
        for entry in entries:
            entry.x509_svid_ttl = 300 + round_
        results = admin.BatchUpdateEntry(
            admin_pb2.BatchUpdateEntryRequest(entries=entries), timeout=60
        ).results
        assert all(r.status.code == 0 for r in results)
    assert len(propagator._expiries) == 200
    gone = [e.id for e in entries[:150]]
    admin.BatchDeleteEntry(admin_pb2.BatchDeleteEntryRequest(ids=gone), timeout=60)
    assert sorted(i for _, i in propagator._expiries) == sorted(e.id for e in entries[150:])


def test_revocations_reach_every_stream_as_deltas(srv: RunningServer) -> None:
    agent = srv.attest()
    stream = _sync(srv, agent)
    try:
        next(stream)
        _revoke(srv, _revocation("jwt_id", "jti-1"), _revocation("x509_serial", "1234"))
        started = time.monotonic()
        update = next(stream)
        assert time.monotonic() - started < 5
        assert update.kind == DELTA
        assert sorted(r.value for r in update.revocations) == ["1234", "jti-1"]
        # A revoked serial changes the CA-signed CRL: it comes along.
        assert update.crl_changed
        assert update.crl
    finally:
        stream.cancel()


def test_a_revocation_the_crl_does_not_list_brings_no_crl(srv: RunningServer) -> None:
    # A JWT-SVID revoked, or a task's end: the CRL lists serials only, and sending every agent
    # the same CRL again with each such delta was bytes (a CRL can fill half a message) for
    # nothing.
    agent = srv.attest()
    stream = _sync(srv, agent)
    try:
        next(stream)
        _revoke(srv, _revocation("jwt_id", "jti-2"), _revocation("task", "t-2"))
        update = next(stream)
        assert update.kind == DELTA
        assert sorted(r.value for r in update.revocations) == ["jti-2", "t-2"]
        assert not update.crl_changed
        assert not update.crl
    finally:
        stream.cancel()


def test_crls_signed_again_reach_every_stream_alone(srv: RunningServer) -> None:
    agent = srv.attest()
    stream = _sync(srv, agent)
    try:
        next(stream)
        _revoke(srv, _revocation("x509_serial", "1234"))
        first = next(stream)
        srv.server.state.crl_refreshed()  # what TaskService.refresh_crl does once due
        update = next(stream)
        assert update.kind == DELTA
        assert update.crl_changed
        assert list(update.crl) == list(first.crl)  # the cache's own; signed again once due
        assert not update.revocations
        assert not update.entries
        assert not update.HasField("bundle")
    finally:
        stream.cancel()


def _revocation(kind: str, value: str) -> Revocation:
    return Revocation(kind, value, f"{TD}/x", int(time.time()) + 600, "test", int(time.time()))


def _revoke(srv: RunningServer, *revocations: Revocation) -> None:
    """Adds `revocations` to the server's state, on its event loop."""
    srv.call(srv.server.state.add_revocations(revocations))


def _serials(revocations: list[Revocation]) -> set[int]:
    return {int(r.value, 16) for r in revocations}


def _crl_serials(parts: list[node_pb2.SyncUpdate], srv: RunningServer) -> list[int]:
    (ca,) = (x509.load_der_x509_certificate(a) for a in srv.bundle().x509_authorities)
    out = []
    for der in (c for p in parts for c in p.crl):
        crl = x509.load_der_x509_crl(der)
        assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
        out.extend(e.serial_number for e in crl)
    return out


def test_x509_revocations_past_one_crl_reach_an_agent_as_several_crls(srv: RunningServer) -> None:
    agent = srv.attest()
    now = int(srv.clock.now())

    def revoked(n: int, expires_at: int) -> Revocation:
        return Revocation(
            "x509_serial", format((1 << 127) | n, "x"), f"{TD}/x", expires_at, "t", now
        )

    # Expired certificates (their revocations still kept for the verifier leeway) need no entry.
    expired = [revoked(n, now - 60) for n in range(2000)]
    valid = [revoked(n, now + 600) for n in range(2000, 32_000)]
    srv.call(srv.server.state.add_revocations((*expired, *valid)), timeout=120)
    stream = _sync(srv, agent)
    try:
        parts = _read_snapshot(stream)
        assert max(p.ByteSize() for p in parts) <= 1.1 * 1024 * 1024
        assert sum(len(p.crl) for p in parts) > 1
        listed = _crl_serials(parts, srv)
        assert len(listed) == len(set(listed))
        assert set(listed) == _serials(valid)
        # One more revocation: the delta run carries the whole new set, said to be new.
        more = revoked(40_000, now + 600)
        _revoke(srv, more)
        run = _read_snapshot(stream)
        assert {p.kind for p in run} == {DELTA}
        assert run[-1].crl_changed
        assert max(p.ByteSize() for p in run) <= 1.1 * 1024 * 1024
        assert set(_crl_serials(run, srv)) == _serials([*valid, more])
    finally:
        stream.cancel()
