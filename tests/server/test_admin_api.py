"""Admin API over its Unix socket: CRUD, bad input table, socket permissions, audit checkpoints."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from server import app as server_app
from server.audit.checkpoint import CHECKPOINT_FILE, Checkpoint
from server.datastore.errors import StorageError
from server.datastore.records import EventFilter
from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2, node_pb2
from tests.server.fixtures import (
    TLS_NAME,
    TRUST_DOMAIN,
    Agent,
    RunningServer,
    bundle_pem,
    der_chain,
    make_csr,
    managed_server,
    running_server,
)
from tests.server.test_replication_servers import wait_until

TD = f"spiffe://{TRUST_DOMAIN}"
AGENT = f"{TD}/svid/agent/join_token/a1"
UID = common_pb2.Selector(type="unix", value="uid:1000")


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    yield from running_server()


def _entry(**kwargs: object) -> common_pb2.Entry:
    values: dict[str, object] = {
        "spiffe_id": f"{TD}/admin/web",
        "parent_id": AGENT,
        "selectors": [UID],
    }
    values.update(kwargs)
    return common_pb2.Entry(**values)  # type: ignore[arg-type]


def test_socket_is_private(srv: RunningServer) -> None:
    path = Path(srv.runtime.admin_socket)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.stat().st_uid == os.geteuid()


def test_entry_crud(srv: RunningServer) -> None:
    admin = srv.admin()
    created = admin.CreateEntry(
        admin_pb2.CreateEntryRequest(entry=_entry(spiffe_id=f"{TD}/admin/crud", hint="h1"))
    ).entry
    assert created.id
    assert created.revision == 1
    assert created.created_at > 0
    fetched = admin.GetEntry(admin_pb2.GetEntryRequest(id=created.id))
    assert fetched == created
    changed = common_pb2.Entry()
    changed.CopyFrom(created)
    changed.x509_svid_ttl = 90
    updated = admin.UpdateEntry(admin_pb2.UpdateEntryRequest(entry=changed)).entry
    assert updated.x509_svid_ttl == 90
    assert updated.revision == 2
    assert updated.created_at == created.created_at
    listed = admin.ListEntries(admin_pb2.ListEntriesRequest(spiffe_id=f"{TD}/admin/crud")).entries
    assert [e.id for e in listed] == [created.id]
    by_parent = admin.ListEntries(admin_pb2.ListEntriesRequest(parent_id=AGENT)).entries
    assert created.id in [e.id for e in by_parent]
    admin.DeleteEntry(admin_pb2.DeleteEntryRequest(id=created.id))
    with pytest.raises(grpc.RpcError) as exc:
        admin.GetEntry(admin_pb2.GetEntryRequest(id=created.id))
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


def test_update_based_on_a_stale_revision_is_aborted(srv: RunningServer) -> None:
    """Read, change, write (as `entry update` does): a write made in between is not lost."""
    admin = srv.admin()
    created = admin.CreateEntry(
        admin_pb2.CreateEntryRequest(entry=_entry(spiffe_id=f"{TD}/admin/stale"))
    ).entry
    first, second = common_pb2.Entry(), common_pb2.Entry()
    first.CopyFrom(created)
    second.CopyFrom(created)
    first.hint = "first"
    admin.UpdateEntry(admin_pb2.UpdateEntryRequest(entry=first))
    second.x509_svid_ttl = 90
    with pytest.raises(grpc.RpcError) as exc:
        admin.UpdateEntry(admin_pb2.UpdateEntryRequest(entry=second))
    assert exc.value.code() == grpc.StatusCode.ABORTED  # type: ignore[attr-defined]
    assert "revision 2, update was based on 1" in exc.value.details()  # type: ignore[attr-defined]
    stored = admin.GetEntry(admin_pb2.GetEntryRequest(id=created.id))
    assert (stored.hint, stored.x509_svid_ttl, stored.revision) == ("first", 0, 2)
    # Revision 0: whatever is stored.
    second.revision = 0
    updated = admin.UpdateEntry(admin_pb2.UpdateEntryRequest(entry=second)).entry
    assert (updated.x509_svid_ttl, updated.revision) == (90, 3)


def test_duplicate_entry_is_already_exists(srv: RunningServer) -> None:
    admin = srv.admin()
    entry = _entry(spiffe_id=f"{TD}/admin/dup")
    admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry))
    with pytest.raises(grpc.RpcError) as exc:
        admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry))
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]
    listed = admin.ListEntries(admin_pb2.ListEntriesRequest(spiffe_id=f"{TD}/admin/dup")).entries
    assert len(listed) == 1


BAD_CREATES = [
    (_entry(spiffe_id="spiffe://Example.org/x"), "spiffe_id: trust domain character"),
    (_entry(spiffe_id=f"{TD}/a/../b"), "spiffe_id: path has a dot segment"),
    (_entry(spiffe_id=f"{TD}/x/"), "spiffe_id: path has a trailing slash"),
    (_entry(spiffe_id=""), "spiffe_id: required"),
    (_entry(spiffe_id="spiffe://other.org/x"), "not in trust domain"),
    (_entry(spiffe_id=f"{TD}/svid/server"), "reserved"),
    (_entry(spiffe_id=f"{TD}/svid/agent/join_token/x"), "reserved"),
    # Served only as the identity of an active task (its SVIDs would always be refused).
    (_entry(spiffe_id=f"{TD}/ci/task/nightly"), "spiffe_id: a /task/ segment is reserved"),
    (_entry(parent_id=f"{TD}/nobody"), "parent_id: unknown parent"),
    (_entry(parent_id="spiffe://"), "parent_id: trust domain is missing"),
    (_entry(selectors=[]), "selectors: at least one"),
    (_entry(dns_names=["svid-server"]), "reserved for the server"),
    (_entry(dns_names=["-bad-.example"]), "not a valid DNS name"),
    # A label ending in a newline: it went into the X.509-SVID's DNS SAN as it was.
    (_entry(dns_names=["web.example.org\n"]), "not a valid DNS name"),
    (_entry(dns_names=["web\n.example.org"]), "not a valid DNS name"),
    # Each goes into every X.509-SVID of the entry: its certificate could pass 4 MiB.
    (_entry(dns_names=[f"n{i}.example.org" for i in range(101)]), "dns_names: 101 names"),
    (_entry(x509_svid_ttl=-1), "x509_svid_ttl"),
    (_entry(expires_at=-1), "expires_at"),
    # PostgreSQL stores no NUL in text: it was a storage failure there (UNAVAILABLE), stored here.
    (_entry(hint="a\x00b"), "hint: may not contain NUL"),
    (_entry(id="bad id!"), "id:"),
]


@pytest.mark.parametrize(("entry", "message"), BAD_CREATES)
def test_bad_creates_are_invalid_argument(
    srv: RunningServer, entry: common_pb2.Entry, message: str
) -> None:
    admin = srv.admin()
    before = len(admin.ListEntries(admin_pb2.ListEntriesRequest()).entries)
    with pytest.raises(grpc.RpcError) as exc:
        admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert message in exc.value.details()  # type: ignore[attr-defined]
    assert len(admin.ListEntries(admin_pb2.ListEntriesRequest()).entries) == before


@pytest.mark.parametrize(
    ("call", "request_message", "code"),
    [
        ("GetEntry", admin_pb2.GetEntryRequest(id="nosuch"), grpc.StatusCode.NOT_FOUND),
        ("GetEntry", admin_pb2.GetEntryRequest(id=""), grpc.StatusCode.INVALID_ARGUMENT),
        ("DeleteEntry", admin_pb2.DeleteEntryRequest(id="nosuch"), grpc.StatusCode.NOT_FOUND),
        (
            "UpdateEntry",
            admin_pb2.UpdateEntryRequest(entry=_entry(id="nosuch")),
            grpc.StatusCode.NOT_FOUND,
        ),
        ("GetAgent", admin_pb2.GetAgentRequest(spiffe_id=AGENT), grpc.StatusCode.NOT_FOUND),
        ("GetAgent", admin_pb2.GetAgentRequest(spiffe_id="x"), grpc.StatusCode.INVALID_ARGUMENT),
        ("EvictAgent", admin_pb2.EvictAgentRequest(spiffe_id=AGENT), grpc.StatusCode.NOT_FOUND),
        ("BanAgent", admin_pb2.BanAgentRequest(spiffe_id=""), grpc.StatusCode.INVALID_ARGUMENT),
        (
            "CreateJoinToken",
            admin_pb2.CreateJoinTokenRequest(ttl=-5),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "CreateJoinToken",
            admin_pb2.CreateJoinTokenRequest(agent_id="no/slash"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
def test_admin_errors(
    srv: RunningServer, call: str, request_message: object, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        getattr(srv.admin(), call)(request_message, timeout=10)
    assert exc.value.code() == code  # type: ignore[attr-defined]


def test_join_token_response_never_repeats_and_names_agent(srv: RunningServer) -> None:
    admin = srv.admin()
    a = admin.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(ttl=30))
    b = admin.CreateJoinToken(admin_pb2.CreateJoinTokenRequest())
    assert a.token != b.token
    token_id = a.token.split(".")[0]
    assert a.agent_spiffe_id == f"{TD}/svid/agent/join_token/{token_id}"
    assert a.expires_at == int(srv.clock.now()) + 30
    fixed = admin.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(agent_id="node-7"))
    assert fixed.token.startswith("node-7.")
    with pytest.raises(grpc.RpcError) as exc:
        admin.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(agent_id="node-7"))
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS  # type: ignore[attr-defined]


def test_a_join_token_id_ending_in_a_newline_is_refused_before_it_is_stored(
    srv: RunningServer,
) -> None:
    """Its agent ID cannot exist: the refusal names agent_id, and no token is left behind."""
    admin = srv.admin()
    for _ in range(2):  # a row left by the first would make the second ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as exc:
            admin.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(agent_id="node-8\n"))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert exc.value.details().startswith("agent_id: ")  # type: ignore[attr-defined]


def test_agents_list_evict_ban(srv: RunningServer) -> None:
    admin = srv.admin()
    one, two = srv.attest(), srv.attest()
    listed = {a.spiffe_id for a in admin.ListAgents(admin_pb2.ListAgentsRequest()).agents}
    assert {one.spiffe_id, two.spiffe_id} <= listed
    admin.EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=one.spiffe_id))
    admin.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=two.spiffe_id))
    listed_after = {a.spiffe_id: a for a in admin.ListAgents(admin_pb2.ListAgentsRequest()).agents}
    assert one.spiffe_id not in listed_after
    assert listed_after[two.spiffe_id].banned


def _x509_serial(srv: RunningServer, agent: Agent, entry_id: str) -> str:
    """The serial (hex) of an X.509-SVID the agent gets for the entry."""
    (result,) = (
        srv.node_stub(agent)
        .BatchNewX509SVID(
            node_pb2.BatchNewX509SVIDRequest(
                params=[node_pb2.X509SVIDParams(entry_id=entry_id, csr=make_csr()[1])]
            ),
            timeout=10,
        )
        .results
    )
    return format(der_chain(result.cert_chain)[0].serial_number, "x")


def test_an_eviction_cut_short_after_the_agent_went_is_finished_by_a_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The agent's row goes first (so it can mint nothing more), then what it holds is revoked:
    a server that dies in between has not answered the operator, who evicts again."""
    with managed_server() as srv:
        admin = srv.admin()
        agent = srv.attest()
        entry = srv.create_entry("/evict/cut-short", agent.spiffe_id)
        serial = _x509_serial(srv, agent, entry.id)
        service = srv.server.tasks.service

        async def dies(*_args: object, **_kwargs: object) -> int:
            raise StorageError("the server died here")

        monkeypatch.setattr(service, "revoke_agent", dies)
        with pytest.raises(grpc.RpcError):
            admin.EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
        monkeypatch.undo()
        assert agent.spiffe_id not in srv.server.state.agents
        assert serial not in {r.value for r in srv.server.state.revocations}

        # The retry finishes what the first one left: the SVID the agent held is revoked.
        admin.EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
        assert serial in {r.value for r in srv.server.state.revocations}
        audit = srv.server.tasks.audit.store
        evicted = list(
            audit.audit_rows(EventFilter(agent_id=agent.spiffe_id, kind="agent_evicted"))
        )
        assert len(evicted) == 1
        # Then there is nothing left: the agent is not found, as one never seen is.
        for spiffe_id in (agent.spiffe_id, f"{TD}/svid/agent/join_token/never"):
            with pytest.raises(grpc.RpcError) as exc:
                admin.EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=spiffe_id), timeout=10)
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]


@pytest.mark.parametrize("removal", ["EvictAgent", "BanAgent"])
def test_a_removal_whose_revocation_events_failed_is_finished_by_a_retry(
    removal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's revocations are stored, then the write of their events fails: the
    operator's retry logs them, each once, where an eviction's answered NOT_FOUND (the row
    was gone) and a ban's logged none (they were revoked already)."""
    with managed_server() as srv:
        admin = srv.admin()
        agent = srv.attest()
        entry = srv.create_entry(f"/{removal}/events", agent.spiffe_id)
        serial = _x509_serial(srv, agent, entry.id)
        audit = srv.server.tasks.audit
        append_many = audit.append_many

        def fails(drafts: Any, **kw: Any) -> Any:
            if any(d.kind == "revocation" for d in drafts):
                raise StorageError("disk I/O error")
            return append_many(drafts, **kw)

        if removal == "EvictAgent":
            request: Any = admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id)
        else:
            request = admin_pb2.BanAgentRequest(spiffe_id=agent.spiffe_id)
        monkeypatch.setattr(audit, "append_many", fails)
        with pytest.raises(grpc.RpcError):
            getattr(admin, removal)(request, timeout=10)
        monkeypatch.undo()
        assert serial in {r.value for r in srv.server.state.revocations}
        where = EventFilter(kind="revocation", agent_id=entry.spiffe_id)
        assert list(audit.store.audit_rows(where)) == []

        getattr(admin, removal)(request, timeout=10)
        assert [r["credential_id"] for r in audit.store.audit_rows(where)] == [serial]
        kind = "agent_evicted" if removal == "EvictAgent" else "agent_banned"
        assert (
            len(list(audit.store.audit_rows(EventFilter(agent_id=agent.spiffe_id, kind=kind)))) == 1
        )
        assert audit.verify().ok


def _housekeeping_minutes(srv: RunningServer) -> None:
    """90 s of the server's clock, in steps its lease renews at: the task layer's housekeeping
    (every 60 s) runs at least once, on the lease holder (server_app.MAX_LEASE_WAIT patched
    short, so a renewal follows each step at once)."""
    lease = srv.server.housekeeping
    for _ in range(6):
        srv.clock.advance(15)
        wait_until(lambda: lease.next_renewal() > srv.clock.monotonic(), 3, "the lease renewal")


@pytest.mark.parametrize("removal", ["EvictAgent", "BanAgent"])
@pytest.mark.parametrize("dies", ["before revoking", "before the revocation events"])
def test_a_removal_cut_short_is_finished_by_housekeeping_with_no_retry(
    removal: str, dies: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server fails midway through an eviction or a ban (before it revokes anything, or
    with the revocations stored and their events not), and no operator ever retries: the
    housekeeping lease holder finishes it once it is a minute old. Each credential the agent
    held is revoked, each revocation and the removal itself on the log once."""
    # The lease loop notices a jump of the test's clock within this much real time.
    monkeypatch.setattr(server_app, "MAX_LEASE_WAIT", 0.05)
    with managed_server() as srv:
        admin = srv.admin()
        agent = srv.attest()
        entry = srv.create_entry(f"/{removal}/cut-short", agent.spiffe_id)
        serials = {_x509_serial(srv, agent, entry.id) for _ in range(2)}
        audit = srv.server.tasks.audit
        append_many = audit.append_many

        async def dies_at_once(*_args: object, **_kwargs: object) -> int:
            raise StorageError("the server died here")

        def dies_at_the_events(drafts: Any, **kw: Any) -> Any:
            if any(d.kind == "revocation" for d in drafts):
                raise StorageError("the server died here")
            return append_many(drafts, **kw)

        if removal == "EvictAgent":
            request: Any = admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id)
        else:
            request = admin_pb2.BanAgentRequest(spiffe_id=agent.spiffe_id)
        with monkeypatch.context() as fault:
            if dies == "before revoking":
                fault.setattr(srv.server.tasks.service, "revoke_agent", dies_at_once)
            else:
                fault.setattr(audit, "append_many", dies_at_the_events)
            with pytest.raises(grpc.RpcError):
                getattr(admin, removal)(request, timeout=10)
        where = EventFilter(kind="revocation", agent_id=entry.spiffe_id)
        assert list(audit.store.audit_rows(where)) == []

        # Nobody retries: housekeeping runs, a minute on.
        _housekeeping_minutes(srv)

        def logged() -> list[str]:
            return [r["credential_id"] for r in audit.store.audit_rows(where)]

        wait_until(lambda: len(logged()) >= len(serials), 10, "the revocation events")
        assert serials <= {r.value for r in srv.server.state.revocations}
        kind = "agent_evicted" if removal == "EvictAgent" else "agent_banned"
        removed = EventFilter(agent_id=agent.spiffe_id, kind=kind)
        wait_until(lambda: srv.server.datastore.list_removals(2**62) == [], 5, "the removal")
        # Once each, housekeeping having run again since.
        _housekeeping_minutes(srv)
        time.sleep(1.5)
        assert sorted(logged()) == sorted(serials)
        assert len(list(audit.store.audit_rows(removed))) == 1
        assert audit.verify().ok


def test_a_removal_cut_short_is_finished_while_another_housekeeping_job_fails_every_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Until its removal is finished the agent is not admitted again: a job run in the same
    slot that fails run after run (settling task ends, here) must not hold it up."""
    monkeypatch.setattr(server_app, "MAX_LEASE_WAIT", 0.05)
    with managed_server() as srv:
        agent = srv.attest()
        entry = srv.create_entry("/evicted/next-to-a-failing-job", agent.spiffe_id)
        serial = _x509_serial(srv, agent, entry.id)
        service = srv.server.tasks.service
        store = srv.server.datastore

        async def fails(*_args: object, **_kwargs: object) -> int:
            raise StorageError("this job fails every run")

        with monkeypatch.context() as fault:
            fault.setattr(service, "revoke_agent", fails)
            with pytest.raises(grpc.RpcError):
                srv.admin().EvictAgent(
                    admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id), timeout=10
                )
        assert [r.agent_id for r in store.list_removals(2**62)] == [agent.spiffe_id]
        monkeypatch.setattr(service, "settle_ends", fails)

        _housekeeping_minutes(srv)
        wait_until(lambda: not store.list_removals(2**62), 10, "the removal to be finished")
        where = EventFilter(kind="revocation", agent_id=entry.spiffe_id)
        assert [r["credential_id"] for r in store.audit_rows(where)] == [serial]


def test_bundle(srv: RunningServer) -> None:
    bundle = srv.bundle()
    assert bundle.trust_domain == TRUST_DOMAIN
    assert bundle.x509_authorities
    assert all(k.kid and k.public_key for k in bundle.jwt_keys)
    assert bundle.sequence >= 1


def test_admin_service_is_not_on_the_network_ports(srv: RunningServer) -> None:
    creds = grpc.ssl_channel_credentials(bundle_pem(srv.bundle()))
    channel = grpc.secure_channel(srv.runtime.attest_address, creds, options=TLS_NAME)
    stub = admin_pb2_grpc.AdminStub(channel)
    with pytest.raises(grpc.RpcError) as exc:
        stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(), timeout=5)
    channel.close()
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_audit_checkpoint_signs_the_committed_head_and_appends_it(srv: RunningServer) -> None:
    reply = srv.admin().AuditCheckpoint(admin_pb2.AuditCheckpointRequest(), timeout=10)
    head = srv.server.tasks.audit.committed_head()
    assert (reply.seq, reply.hash) == ((head.seq, head.hash) if head else (0, "0" * 64))
    cp = Checkpoint.parse(reply.line)
    cp.verify_signature(cp.public_key_object())
    assert (cp.seq, cp.hash, cp.count, cp.key_id) == (
        reply.seq,
        reply.hash,
        reply.count,
        reply.key_id,
    )
    lines = (srv.config.data_dir / CHECKPOINT_FILE).read_text().splitlines()
    assert lines[-1] == reply.line


def test_a_failed_checkpoint_is_unavailable_and_names_no_path() -> None:
    with managed_server() as srv:
        path = srv.config.data_dir / CHECKPOINT_FILE
        path.unlink()
        path.mkdir()  # the append now fails on the file system
        with pytest.raises(grpc.RpcError) as exc:
            srv.admin().AuditCheckpoint(admin_pb2.AuditCheckpointRequest(), timeout=10)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        details = exc.value.details()  # type: ignore[attr-defined]
        assert details == "the server cannot record: audit checkpoint failed"
        assert str(srv.config.data_dir) not in details
