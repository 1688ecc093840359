"""The task service on real parts: SQLite datastore, task store and audit log files, the CA,
the default Cedar policy set, and the issuance spine it serves as the task port. Only the clock
is fake."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jwt as pyjwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID

from server.audit import AuditError, AuditLog, EventKind, LedgerError, SecretInAuditError
from server.ca.keys import KeyStore
from server.ca.manager import CaConfig, CaManager
from server.ca.rotation import activate_at
from server.ca.signer import IssuedJwt
from server.convert import revocation_to_proto
from server.datastore.base import DataStore
from server.datastore.errors import RemovalUnderWayError, StorageError
from server.datastore.records import (
    REMOVAL_EVICTED,
    REVOKED_X509_SERIAL,
    X509_KIND,
    AttestedAgent,
    Credential,
    Entry,
    EventFilter,
    Revocation,
    Selector,
)
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from server.errors import (
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
)
from server.events import ChangeNotifier
from server.ids import ServerIds
from server.issuance import Issuer, MeteredLedger
from server.issuance.datastore_ledger import DatastoreLedger
from server.issuance.issuer import JwtRequest
from server.ledger import Ledger
from server.metrics import Metrics
from server.policy import PolicyEngine
from server.state import ServerState
from server.tasks.crl import REFRESH_AFTER
from server.tasks.model import TaskState
from server.tasks.removals import AgentRemovals
from server.tasks.service import (
    BEGIN_CUT_SHORT,
    BEGIN_UNLOGGED,
    ENDED_PER_ACTIVE,
    BeginRequest,
    TaskService,
    TaskSettings,
    runtime_changed,
)
from server.tasks.store import TaskStore
from svid import MAX_CLOCK_SKEW, MAX_VERIFIER_LEEWAY, RevokedError, X509Bundle, X509Verifier
from svid._bundle import BundleSet
from svid._clock import FakeClock, to_datetime
from svid._crl import revoked_from_crls
from svid._proto import common_pb2
from svid._revocation import RevocationSet
from svid._source import MemoryBundleSource
from svid._spiffe_id import TrustDomain
from svid._verify_jwt import DEFAULT_LEEWAY
from tests.server.conftest import TRUST_DOMAIN, openssl_verify
from tests.server.fixtures import der_chain, make_csr

AGENT = "spiffe://example.org/svid/agent/join_token/t1"
RUNTIME = "spiffe://example.org/agents/research-bot"
SELECTORS = (Selector("unix", "uid:1000"),)


@dataclass
class World:
    service: TaskService
    state: ServerState
    audit: AuditLog
    store: TaskStore
    ca: CaManager
    clock: FakeClock
    agent: AttestedAgent
    tmp: Path
    issuer: Issuer

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    def mint_jwt(self, entry: Entry, audience: Sequence[str]) -> IssuedJwt:
        """A JWT-SVID through the issuance spine, as the node API asks for one."""
        issued: IssuedJwt = self.run(self.issuer.issue_jwt(self.agent, entry, audience))
        return issued

    def close(self) -> None:
        self.store.close()

    def begin(self, **kw: Any) -> Any:
        values: dict[str, Any] = {
            "runtime_id": RUNTIME,
            "actions": ("read",),
            "resources": ("docs",),
            "on_behalf_of": "user:alice",
            "ttl": 600,
        }
        values.update(kw)
        return self.run(self.service.begin(self.agent, BeginRequest(**values)))

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.audit.store.audit_rows() if r["kind"] == kind]


def make_world(
    tmp_path: Path,
    clock: FakeClock,
    datastore: DataStore,
    ca_manager: CaManager,
    *,
    store: TaskStore | None = None,
    policy_dir: Path | None = None,
    settings: TaskSettings | None = None,
) -> World:
    state = ServerState(datastore, clock, ChangeNotifier())
    state.load()
    state.set_bundle(ca_manager.bundle(), {})
    agent = AttestedAgent(AGENT, "join_token", "abc", int(clock.now()) + 3600, selectors=())
    # One datastore for everything, as app.py wires it.
    audit = AuditLog(datastore, clock)
    store = store or TaskStore(datastore)
    policy = PolicyEngine(policy_dir, clock, trust_domain="example.org")
    service = TaskService(
        state=state,
        store=store,
        policy=policy,
        audit=audit,
        ca=ca_manager,
        server_id="spiffe://example.org/svid/server",
        clock=clock,
        settings=settings,
    )
    issuer = Issuer(
        state=state,
        ca=ca_manager,
        ids=ServerIds(TrustDomain("example.org")),
        ledger=MeteredLedger(DatastoreLedger(Ledger(audit)), Metrics()),
        tasks=service,
        clock=clock,
        metrics=Metrics(),
        executor=ThreadPoolExecutor(2),
    )

    async def setup() -> None:
        await state.save_agent(agent, None)
        await state.create_entry(Entry("", RUNTIME, AGENT, SELECTORS))

    asyncio.run(setup())
    return World(service, state, audit, store, ca_manager, clock, agent, tmp_path, issuer)


@pytest.fixture
def world(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> Iterator[World]:
    w = make_world(tmp_path, clock, datastore, ca_manager)
    yield w
    w.close()


def decode(world: World, token: str, audience: str) -> dict[str, Any]:
    header = pyjwt.get_unverified_header(token)
    key = world.ca.bundle().jwt_authorities[header["kid"]]
    return pyjwt.decode(
        token,
        key,  # type: ignore[arg-type]
        algorithms=[header["alg"]],
        audience=audience,
        options={"verify_exp": False, "verify_iat": False},
    )


def issue_x509(world: World, spiffe_id: str) -> x509.Certificate:
    """An X.509-SVID through the issuance spine, as the node API asks for one."""
    (entry,) = [e for e in world.state.entries.by_id.values() if e.spiffe_id == spiffe_id]
    _, csr = make_csr()
    (outcome,) = world.run(world.issuer.issue_x509(world.agent, [(entry.id, csr)]))
    if outcome.error is not None:
        raise outcome.error
    return x509.load_der_x509_certificate(outcome.chain_der)


def test_begin_grants_a_task_identity_with_an_entry(world: World) -> None:
    task = world.begin(goal_sha256="ab" * 32)
    assert task.spiffe_id == f"{RUNTIME}/task/{task.task_id}"
    assert task.actions == ("read",)
    assert task.resources == ("docs",)
    assert task.decision == "allow"
    entry = world.state.entries.by_id[task.entry_id]
    assert entry.spiffe_id == task.spiffe_id
    assert entry.id == f"task-{task.task_id}"
    assert entry.parent_id == AGENT
    assert entry.selectors == SELECTORS
    assert entry.expires_at == task.expires_at == int(world.clock.now()) + 600
    assert world.store.get_task(task.task_id) == task
    (event,) = world.events("task_begin")
    assert event["task_id"] == task.task_id
    assert event["agent_id"] == RUNTIME
    assert event["decision"] == "allow"
    assert event["policy_set_hash"]
    assert "goal" not in event["extra"].replace("goal_sha256", "")


def test_task_jwt_carries_task_claims_and_is_recorded(world: World) -> None:
    task = world.begin()
    entry = world.state.entries.by_id[task.entry_id]
    issued = world.mint_jwt(entry, ["docs"])
    claims = decode(world, issued.token, "docs")
    assert claims["sub"] == task.spiffe_id
    assert claims["jti"] == issued.jti
    assert claims["txn"] == task.task_id
    assert claims["scope"] == "read"
    assert claims["tctx"] == {
        "classification": "internal",
        "environment": "",
        "resources": ["docs"],
    }
    # RFC 8693: the principal in a claim of its own, `act` the actor chain (this task).
    assert claims["obo"] == "user:alice"
    assert claims["act"] == {"sub": task.spiffe_id}
    assert "parent_txn" not in claims
    assert claims["exp"] - claims["iat"] <= 300
    assert [c.value for c in world.store.task_credentials(task.task_id, 0)] == [issued.jti]
    (event,) = world.events("jwt_minted")
    assert event["credential_id"] == issued.jti
    assert issued.token not in str(event)


def test_undeclared_audience_is_denied_flagged_and_counted(world: World) -> None:
    task = world.begin()
    entry = world.state.entries.by_id[task.entry_id]
    with pytest.raises(PermissionDeniedError, match="lateral movement: audience payroll"):
        world.mint_jwt(entry, ["payroll"])
    (event,) = world.events("denial")
    assert event["task_id"] == task.task_id
    assert '"flag":"lateral_movement"' in event["extra"]
    assert world.service.violations(AGENT, RUNTIME) == 1


def test_repeated_violations_stop_issuance(world: World) -> None:
    task = world.begin()
    entry = world.state.entries.by_id[task.entry_id]
    for _ in range(3):
        with pytest.raises(PermissionDeniedError):
            world.mint_jwt(entry, ["elsewhere"])
    with pytest.raises(PermissionDeniedError, match="stop_risky_agents"):
        world.mint_jwt(entry, ["docs"])
    with pytest.raises(PermissionDeniedError, match="stop_risky_agents"):
        world.begin()


def test_violations_are_read_once_per_clock_second_and_this_servers_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every decision reads the risk signal; the store is asked once per clock second.
    reads: list[str] = []
    read = world.store.violations

    def counted(runtime_id: str, node_id: str, since: int) -> int:
        reads.append(runtime_id)
        return read(runtime_id, node_id, since)

    monkeypatch.setattr(world.store, "violations", counted)
    task = world.begin()
    entry = world.state.entries.by_id[task.entry_id]
    for _ in range(5):
        world.mint_jwt(entry, ["docs"])
    assert reads == [RUNTIME]
    # This server's own violation counts at once, without waiting for the second to pass.
    with pytest.raises(PermissionDeniedError):
        world.mint_jwt(entry, ["elsewhere"])
    assert world.service.violations(AGENT, RUNTIME) == 1
    # Another server's (written to the shared store) counts once the clock has moved on.
    world.store.add_violation(RUNTIME, AGENT, int(world.clock.now()))
    assert world.service.violations(AGENT, RUNTIME) == 1
    world.clock.advance(1)
    assert world.service.violations(AGENT, RUNTIME) == 2


def test_restricted_export_without_a_policy_is_denied(world: World) -> None:
    with pytest.raises(PermissionDeniedError, match="export_data"):
        world.begin(
            actions=("export_data",), resources=("s3:reports",), classification="restricted"
        )
    (event,) = world.events("denial")
    assert event["decision"] == "deny"
    assert event["action"] == "export_data"
    assert world.store.list_tasks() == []


def test_sub_task_may_narrow_but_never_widen(world: World) -> None:
    parent = world.begin(actions=("read", "write"), resources=("docs", "wiki"))
    with pytest.raises(PermissionDeniedError, match="privilege chaining: sub-task adds resources"):
        world.begin(actions=("read",), resources=("docs", "payroll"), parent_task_id=parent.task_id)
    child = world.begin(actions=("read",), resources=("docs",), parent_task_id=parent.task_id)
    assert child.depth == 1
    assert child.parent_task_id == parent.task_id
    assert child.expires_at <= parent.expires_at
    entry = world.state.entries.by_id[child.entry_id]
    claims = decode(world, world.mint_jwt(entry, ["docs"]).token, "docs")
    assert claims["act"] == {"sub": child.spiffe_id, "act": {"sub": parent.spiffe_id}}
    assert claims["obo"] == "user:alice"
    assert claims["parent_txn"] == parent.task_id
    assert world.service.violations(AGENT, RUNTIME) == 1


def test_delegation_depth_is_capped(world: World) -> None:
    task = world.begin()
    for _ in range(3):
        task = world.begin(parent_task_id=task.task_id)
    with pytest.raises(PermissionDeniedError, match="delegation depth 4 exceeds the cap of 3"):
        world.begin(parent_task_id=task.task_id)


def test_end_revokes_every_credential_and_publishes_a_crl(world: World) -> None:
    task = world.begin()
    entry = world.state.entries.by_id[task.entry_id]
    issued = world.mint_jwt(entry, ["docs"])
    leaf = issue_x509(world, task.spiffe_id)
    assert world.service.crl() == ()
    done = world.run(world.service.end(world.agent, task.task_id, [RUNTIME]))
    assert done.state is TaskState.ENDED
    revoked = {(r.kind, r.value) for r in world.state.revocations}
    assert revoked == {
        ("jwt_id", issued.jti),
        ("x509_serial", format(leaf.serial_number, "x")),
        ("task", task.task_id),
    }
    assert task.entry_id not in world.state.entries.by_id
    with pytest.raises(PermissionDeniedError, match="not entitled"):
        world.mint_jwt(entry, ["docs"])
    (der,) = world.service.crl()
    crl = x509.load_der_x509_crl(der)
    ca_cert = world.ca.x509_signer().ca_certificate
    assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    assert [e["decision"] for e in world.events("revocation")] == ["revoked", "revoked"]
    assert world.events("task_end")[0]["decision"] == "ended"
    assert world.audit.verify().ok


# Where the task's end happens: through this server, or through another one sharing the
# datastore whose end this server has not heard of (memory still holds the task active; only
# the ledger, refusing the record, can tell).
ENDS = ["here", "elsewhere"]


def _end_before_commit(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    task: Any,
    where: str = "here",
) -> None:
    """The task ends after its credential was granted and signed, before it is on record:
    the end's revocations cannot name it."""
    ledger = world.issuer._ledger
    commit, record_later = ledger.commit, ledger.record_later

    async def end() -> None:
        if where == "here":
            await world.service.end(world.agent, task.task_id, [RUNTIME])
        else:  # the other server's claim (TaskService._finish there); it revokes what it reads
            ended = world.store.finish(task, TaskState.ENDED, int(world.clock.now()), "ended")
            assert ended is not None
            assert world.store.task_credentials(task.task_id, 0) == []

    ends = [end]  # once: the issuer commits again without the refused credentials

    async def ending_commit(credentials: Any, events: Any) -> None:
        while ends:
            await ends.pop()()
        await commit(credentials, events)

    def ending_record_later(credentials: Any, events: Any, *rest: Any) -> Any:
        while ends:
            asyncio.run_coroutine_threadsafe(ends.pop()(), loop).result()
        return record_later(credentials, events, *rest)

    # One loop for the calls, so a signing thread can end the task on it.
    loop = asyncio.new_event_loop()
    request.addfinalizer(loop.close)
    monkeypatch.setattr(ledger, "commit", ending_commit)
    monkeypatch.setattr(ledger, "record_later", ending_record_later)
    monkeypatch.setattr(world, "run", loop.run_until_complete)


def _task_credentials_recorded(world: World, task: Any) -> list[str]:
    return [c.value for c in world.store.task_credentials(task.task_id, 0)]


@pytest.mark.parametrize("where", ENDS)
def test_a_credential_of_a_task_that_ends_while_it_is_issued_is_not_handed_out(
    world: World, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, where: str
) -> None:
    task = world.begin()
    entry = world.state.entries.by_id[task.entry_id]
    _end_before_commit(world, monkeypatch, request, task, where)
    with pytest.raises(PermissionDeniedError, match="ended while"):
        world.mint_jwt(entry, ["docs"])
    stored = world.store.get_task(task.task_id)
    assert stored is not None
    assert not stored.active
    assert _task_credentials_recorded(world, task) == []  # nothing the end missed


@pytest.mark.parametrize("where", ENDS)
def test_an_x509_svid_of_a_task_that_ends_while_it_is_issued_is_not_handed_out(
    world: World, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, where: str
) -> None:
    """In a batch with the runtime's own SVID, which is issued and recorded all the same."""
    task = world.begin()
    _end_before_commit(world, monkeypatch, request, task, where)
    entries = world.state.entries.by_id.values()
    (runtime,) = [e for e in entries if e.spiffe_id == RUNTIME]
    (of_task,) = [e for e in entries if e.spiffe_id == task.spiffe_id]
    asks = [(runtime.id, make_csr()[1]), (of_task.id, make_csr()[1])]
    plain, refused = world.run(world.issuer.issue_x509(world.agent, asks))
    assert plain.error is None
    assert isinstance(refused.error, PermissionDeniedError)
    assert "ended while" in str(refused.error)
    assert _task_credentials_recorded(world, task) == []
    serial = format(x509.load_der_x509_certificate(plain.chain_der).serial_number, "x")
    held = world.store.agent_credentials(world.agent.spiffe_id, 0)
    assert serial in {c.value.lower() for c in held}


@pytest.mark.parametrize("where", ENDS)
def test_a_batch_jwt_of_a_task_that_ends_while_it_is_issued_is_not_handed_out(
    world: World, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, where: str
) -> None:
    task = world.begin()
    entry = world.state.entries.by_id[task.entry_id]
    runtime = next(e for e in world.state.entries.by_id.values() if e.spiffe_id == RUNTIME)
    _end_before_commit(world, monkeypatch, request, task, where)
    asks = [JwtRequest(runtime.id, "", ("docs",)), JwtRequest(entry.id, "", ("docs",))]
    plain, of_task = world.run(world.issuer.issue_jwts(world.agent, asks))
    assert isinstance(plain, IssuedJwt)
    assert isinstance(of_task, PermissionDeniedError)
    assert "ended while" in str(of_task)
    assert _task_credentials_recorded(world, task) == []
    held = world.store.agent_credentials(world.agent.spiffe_id, 0)
    assert plain.jti in {c.value for c in held}


def _second_server(world: World) -> TaskService:
    """Another server's task layer on the same datastore (its sweep sees the same rows)."""
    other = TaskService(
        state=world.state,
        store=TaskStore(world.audit.store),  # type: ignore[arg-type]
        policy=world.service.policy,
        audit=world.audit,
        ca=world.ca,
        server_id="spiffe://example.org/svid/server",
        clock=world.clock,
    )
    other.load()
    return other


def test_two_servers_expiring_one_task_end_it_once(world: World) -> None:
    task = world.begin(ttl=60)
    entry = world.state.entries.by_id[task.entry_id]
    world.mint_jwt(entry, ["docs"])
    other = _second_server(world)
    world.clock.advance(61)

    async def both() -> list[int]:
        return await asyncio.gather(world.service.expire_due(), other.expire_due())

    world.run(both())
    (end,) = world.events("task_end")
    assert end["decision"] == "expired"
    assert len(world.events("revocation")) == 1
    assert world.store.get_task(task.task_id).state is TaskState.EXPIRED  # type: ignore[union-attr]
    assert other.active_task(task.spiffe_id) is None
    assert world.service.active_task(task.spiffe_id) is None


def test_a_sweep_forgets_a_due_task_another_server_ended_first(world: World) -> None:
    """The other server's sweep claimed and settled the end before this one's read the row
    (the store no longer lists it as due): this server must not go on serving it."""
    task = world.begin(ttl=60)
    other = _second_server(world)
    world.clock.advance(61)
    world.run(other.expire_due())
    assert world.service.active_task(task.spiffe_id) is not None  # the change feed lags
    world.run(world.service.expire_due())
    assert world.service.active_task(task.spiffe_id) is None
    assert world.service.next_expiry() == float("inf")
    assert len(world.events("task_end")) == 1


def test_an_end_racing_another_servers_sweep_ends_the_task_once(world: World) -> None:
    task = world.begin(ttl=60)
    entry = world.state.entries.by_id[task.entry_id]
    world.mint_jwt(entry, ["docs"])
    other = _second_server(world)
    world.clock.advance(60)

    async def both() -> list[Any]:
        return await asyncio.gather(
            world.service.end(world.agent, task.task_id, ()), other.expire_due()
        )

    ended, _ = world.run(both())
    (end,) = world.events("task_end")
    assert len(world.events("revocation")) == 1
    # The caller is told how the task did end, whichever server's write ended it.
    assert ended.state.value == end["decision"]
    assert world.audit.verify().ok


def test_end_revokes_a_jwt_past_exp_that_a_verifier_still_accepts(world: World) -> None:
    """A verifier takes a JWT until exp + its leeway; ending the task then must still name it,
    even after the credential housekeeping has run."""
    task = world.begin()
    entry = world.state.entries.by_id[task.entry_id]
    issued = world.mint_jwt(entry, ["docs"])
    world.clock.set(issued.expires_at + DEFAULT_LEEWAY)
    world.run(world.service.housekeeping())
    world.run(world.service.end(world.agent, task.task_id, [RUNTIME]))
    assert ("jwt_id", issued.jti) in {(r.kind, r.value) for r in world.state.revocations}


def test_an_end_says_the_task_ended_though_no_credential_of_it_is_left_to_revoke(
    world: World,
) -> None:
    """A task whose agent never minted its X.509-SVID, and whose one token expired long
    before its end, had nothing revoked at its end: a resource server's stream or MCP session
    that token opened, and the task's runtime, never heard of the end."""
    task = world.begin(ttl=3600)
    entry = world.state.entries.by_id[task.entry_id]
    issued = world.mint_jwt(entry, ["docs"])
    world.clock.set(issued.expires_at + MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW + 1)
    world.run(world.service.housekeeping())
    world.run(world.service.end(world.agent, task.task_id, [RUNTIME]))
    (ended,) = world.state.revocations
    assert (ended.kind, ended.value, ended.spiffe_id) == ("task", task.task_id, task.spiffe_id)
    assert ended.expires_at == task.expires_at
    # What agents are sent (svid.common.v1.Revocation), and no CRL entry.
    sent = revocation_to_proto(ended)
    assert (sent.kind, sent.value) == (common_pb2.Revocation.TASK, task.task_id)
    assert sent.spiffe_id == task.spiffe_id
    assert world.service.crl() == ()
    # Only the end's event: no credential was revoked.
    assert world.events("revocation") == []


def test_a_token_revoked_with_an_evicted_acting_agent_does_not_say_its_task_ended(
    world: World,
) -> None:
    """A token delegated from a task is revoked with the acting workload's agent, the task
    going on: no task revocation is published for it."""
    task = world.begin()
    other = "spiffe://example.org/svid/agent/join_token/t2"
    acting = AttestedAgent(other, "join_token", "y", int(world.clock.now()) + 3600, selectors=())
    world.run(world.state.save_agent(acting, None))
    delegated = Credential(
        "jwt_id", "j-delegated", AGENT, task.spiffe_id, task.task_id, int(world.clock.now()) + 60
    )._replace(actor_agent_id=other)
    world.audit.store.write_ledger([delegated], [])
    world.run(world.service.revoke_agent(other, "agent evicted"))
    assert {(r.kind, r.value) for r in world.state.revocations} == {("jwt_id", "j-delegated")}
    assert world.store.get_task(task.task_id).state is TaskState.ACTIVE  # type: ignore[union-attr]


def test_credential_records_go_once_no_verifier_can_accept_them(world: World) -> None:
    task = world.begin()
    entry = world.state.entries.by_id[task.entry_id]
    issued = world.mint_jwt(entry, ["docs"])
    world.clock.set(issued.expires_at + MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW)
    world.run(world.service.housekeeping())
    assert world.store.count_credentials(task.task_id) == 1
    world.clock.set(issued.expires_at + MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW + 1)
    world.run(world.service.housekeeping())
    assert world.store.count_credentials(task.task_id) == 0


def test_only_the_owning_runtime_may_end_a_task(world: World) -> None:
    task = world.begin()
    with pytest.raises(PermissionDeniedError, match="another workload"):
        world.run(world.service.end(world.agent, task.task_id, ["spiffe://example.org/other"]))
    other = AttestedAgent("spiffe://example.org/svid/agent/join_token/t2", "join_token", "x", 0)
    with pytest.raises(NotFoundError):
        world.run(world.service.end(other, task.task_id, [RUNTIME]))


def test_an_end_records_the_runtimes_reason_on_the_task_and_its_event(world: World) -> None:
    plain, failed = world.begin(), world.begin()
    done = world.run(world.service.end(world.agent, plain.task_id, [RUNTIME]))
    assert done.end_reason == "ended by its runtime"
    done = world.run(
        world.service.end(world.agent, failed.task_id, [RUNTIME], "block raised ValueError")
    )
    assert done.end_reason == "ended by its runtime: block raised ValueError"
    reasons = {e["task_id"]: e["reason"] for e in world.events("task_end")}
    assert reasons == {
        plain.task_id: "ended by its runtime",
        failed.task_id: "ended by its runtime: block raised ValueError",
    }
    assert world.audit.verify().ok


def test_an_end_reason_that_looks_like_a_credential_is_dropped_and_the_task_still_ends(
    world: World,
) -> None:
    task = world.begin()
    leaked = "bad token eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlc2lnbmF0dXJl"
    done = world.run(world.service.end(world.agent, task.task_id, [RUNTIME], leaked))
    assert done.state is TaskState.ENDED
    assert done.end_reason == (
        "ended by its runtime: its reason was dropped: it looked like a credential"
    )
    (event,) = [e for e in world.events("task_end") if e["task_id"] == task.task_id]
    assert "eyJ" not in event["reason"]
    assert world.store.unsettled(int(world.clock.now()) + 3600) == []  # the end was settled


@pytest.mark.parametrize(
    ("reason", "refusal"),
    [
        ("x" * 201, "at most 200 characters"),
        ("block\x00raised", "NUL"),
        # Shown on an operator's terminal by `task show`: no forged lines, no escapes.
        ("done)\nCredentials    : 0", "one line of printable text"),
        ("\x1b[2Jdone", "one line of printable text"),
    ],
)
def test_an_end_reason_too_long_or_not_one_printable_line_is_refused(
    world: World, reason: str, refusal: str
) -> None:
    task = world.begin()
    with pytest.raises(InvalidRequestError, match=refusal):
        world.run(world.service.end(world.agent, task.task_id, [RUNTIME], reason))
    assert world.store.get_task(task.task_id).state is TaskState.ACTIVE  # type: ignore[union-attr]
    assert world.events("task_end") == []


def test_ending_a_parent_ends_its_sub_tasks(world: World) -> None:
    parent = world.begin(actions=("read", "write"))
    child = world.begin(actions=("read",), parent_task_id=parent.task_id)
    world.run(world.service.revoke(parent.task_id, "operator says so"))
    assert world.store.get_task(child.task_id).state is TaskState.REVOKED  # type: ignore[union-attr]
    assert world.service.active_task(child.spiffe_id) is None


@pytest.mark.parametrize("change", ["deleted", "selectors", "spiffe_id"])
def test_a_task_ends_when_its_runtimes_entry_is_deleted_or_changed(
    world: World, change: str
) -> None:
    """An operator deleting a workload's entry (or moving its identity to other workloads)
    left its tasks running, each task entry still selecting the old workload, its SVIDs
    served for up to the task's TTL."""
    (runtime,) = [e for e in world.state.entries.by_id.values() if e.spiffe_id == RUNTIME]
    task = world.begin()
    issue_x509(world, task.spiffe_id)
    assert world.run(world.service.end_unentitled()) == 0
    if change == "deleted":
        world.run(world.state.delete_entry(runtime.id))
    elif change == "selectors":
        moved = dataclasses.replace(runtime, selectors=(Selector("unix", "uid:2000"),))
        world.run(world.state.update_entry(moved))
    else:
        moved = dataclasses.replace(runtime, spiffe_id=f"{RUNTIME}-renamed")
        world.run(world.state.update_entry(moved))
    assert world.run(world.service.end_unentitled()) == 1
    ended = world.store.get_task(task.task_id)
    assert ended is not None
    assert ended.state is TaskState.REVOKED
    assert f"runtime's entry {runtime.id}" in ended.end_reason
    assert world.service.active_task(task.spiffe_id) is None
    assert task.entry_id not in world.state.entries.by_id
    (cred,) = world.store.task_credentials(task.task_id, 0)
    assert world.state.is_revoked(cred.kind, cred.value)
    (event,) = world.events("task_end")
    assert event["task_id"] == task.task_id


def test_a_task_goes_on_when_another_entry_changes_or_its_runtimes_keeps_its_selectors(
    world: World,
) -> None:
    (runtime,) = [e for e in world.state.entries.by_id.values() if e.spiffe_id == RUNTIME]
    task = world.begin()
    world.run(world.state.create_entry(Entry("", f"{RUNTIME}-2", AGENT, SELECTORS)))
    world.run(world.state.update_entry(dataclasses.replace(runtime, x509_svid_ttl=120)))
    assert world.run(world.service.end_unentitled()) == 0
    assert world.service.active_task(task.spiffe_id) is not None


SERVER_ID = "spiffe://example.org/svid/server"
ALIAS = "spiffe://example.org/nodes/rack-1"


@pytest.mark.parametrize(
    ("parent", "alias_selector", "ends"),
    [
        ("spiffe://example.org/svid/agent/join_token/t2", "", True),  # another node's agent
        (ALIAS, "rack:1", False),  # a node alias the task's agent matches
        (ALIAS, "rack:2", True),  # a node alias it does not
        ("spiffe://example.org/nodes/gone", "", True),  # a parent that is nothing
    ],
)
def test_a_task_ends_when_its_runtimes_entry_moves_to_a_parent_its_agent_does_not_serve(
    world: World, parent: str, alias_selector: str, ends: bool
) -> None:
    """An operator moving a workload's entry to another node's agent (the workload moved)
    left its tasks running on the old node: each task entry, parented to the old agent and
    selecting the old workload, still served there for up to the task's TTL."""
    agent = dataclasses.replace(world.agent, selectors=(Selector("rack", "1"),))
    assert world.run(world.state.save_agent(agent, world.agent))
    if alias_selector:
        kind, value = alias_selector.split(":")
        world.run(world.state.create_entry(Entry("", ALIAS, SERVER_ID, (Selector(kind, value),))))
    (runtime,) = [e for e in world.state.entries.by_id.values() if e.spiffe_id == RUNTIME]
    task = world.begin()
    assert world.run(world.service.end_unentitled()) == 0
    moved = world.state.entries.by_id[runtime.id]
    world.run(world.state.update_entry(dataclasses.replace(moved, parent_id=parent)))
    assert world.run(world.service.end_unentitled()) == int(ends)
    stored = world.store.get_task(task.task_id)
    assert stored is not None
    if ends:
        assert stored.state is TaskState.REVOKED
        assert "through this agent" in stored.end_reason
        assert task.entry_id not in world.state.entries.by_id
    else:
        assert stored.active
        assert world.service.active_task(task.spiffe_id) is not None


@pytest.mark.parametrize("lost", ["expired", "deleted", "node_selectors"])
def test_a_task_served_through_a_node_alias_ends_once_the_alias_stops_covering_its_agent(
    world: World, lost: str
) -> None:
    """A task whose runtime's entry is parented to a node alias ran on after the alias expired
    or the agent's node selectors changed (only a deleted alias, an entry change, ended it):
    its SVIDs were served, up to its TTL, by a node no longer given the runtime's identity."""
    agent = dataclasses.replace(world.agent, selectors=(Selector("rack", "1"),))
    assert world.run(world.state.save_agent(agent, world.agent))
    world.agent = agent
    alias_expiry = int(world.clock.now()) + 60
    alias = world.run(
        world.state.create_entry(
            Entry("", ALIAS, SERVER_ID, (Selector("rack", "1"),), expires_at=alias_expiry)
        )
    )
    (runtime,) = [e for e in world.state.entries.by_id.values() if e.spiffe_id == RUNTIME]
    world.run(world.state.update_entry(dataclasses.replace(runtime, parent_id=ALIAS)))
    task = world.begin()
    assert world.run(world.service.end_unentitled()) == 0
    world.clock.advance(30)
    assert world.run(world.service.end_unentitled()) == 0  # nothing changed yet
    if lost == "expired":
        world.clock.advance(30)
    elif lost == "deleted":
        world.run(world.state.delete_entry(alias.id))
    else:
        moved = dataclasses.replace(agent, selectors=(Selector("rack", "2"),))
        assert world.run(world.state.save_agent(moved, agent))
    assert world.run(world.service.end_unentitled()) == 1
    stored = world.store.get_task(task.task_id)
    assert stored is not None
    assert stored.state is TaskState.REVOKED
    assert "through this agent" in stored.end_reason
    assert world.service.active_task(task.spiffe_id) is None


def _a_task_through_a_node_alias(world: World) -> tuple[AttestedAgent, Any]:
    """The agent, given node selector rack:1, and a task begun whose runtime's entry is
    parented to a node alias selecting rack:1: served through the alias, not the agent's ID."""
    agent = dataclasses.replace(world.agent, selectors=(Selector("rack", "1"),))
    assert world.run(world.state.save_agent(agent, world.agent))
    world.agent = agent
    world.run(world.state.create_entry(Entry("", ALIAS, SERVER_ID, (Selector("rack", "1"),))))
    (runtime,) = [e for e in world.state.entries.by_id.values() if e.spiffe_id == RUNTIME]
    world.run(world.state.update_entry(dataclasses.replace(runtime, parent_id=ALIAS)))
    task = world.begin()
    assert world.run(world.service.end_unentitled()) == 0
    return agent, task


def test_an_agents_renewal_ends_none_of_its_tasks_served_through_a_node_alias(
    world: World,
) -> None:
    agent, task = _a_task_through_a_node_alias(world)
    renewed = dataclasses.replace(agent, expires_at=agent.expires_at + 600)
    assert world.run(world.state.save_agent(renewed, agent))
    assert world.run(world.service.end_unentitled()) == 0
    assert world.service.active_task(task.spiffe_id) is not None


def test_an_agents_renewal_sends_end_unentitled_over_none_of_its_tasks(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every agent's renewal changes its record, and each change walked and checked every
    task of that agent on the event loop, though only a change of its node selectors can
    take an alias from it (17 ms a second at 10k tasks, with agents renewing all the time)."""
    agent, task = _a_task_through_a_node_alias(world)
    checked: list[str] = []

    def spied(active: Any, *args: Any) -> Any:
        active = list(active)
        checked.extend(t.task_id for t in active)
        return runtime_changed(active, *args)

    monkeypatch.setattr("server.tasks.service.runtime_changed", spied)
    renewed = dataclasses.replace(agent, expires_at=agent.expires_at + 600, serial="def")
    assert world.run(world.state.save_agent(renewed, agent))
    assert world.run(world.service.end_unentitled()) == 0
    assert checked == []
    moved = dataclasses.replace(renewed, selectors=(Selector("rack", "2"),))
    assert world.run(world.state.save_agent(moved, renewed))
    assert world.run(world.service.end_unentitled()) == 1
    assert set(checked) == {task.task_id}  # memory names it, the datastore confirms it


def test_a_move_memory_has_not_caught_up_with_ends_no_task_yet(world: World) -> None:
    """The datastore says the runtime's entry moved (another server's write) before memory
    does: the new parent may be a node alias written with it that memory has not seen
    either, so the task is judged once the feed brings the move."""
    (runtime,) = [e for e in world.state.entries.by_id.values() if e.spiffe_id == RUNTIME]
    task = world.begin()
    stored = dataclasses.replace(runtime, parent_id=ALIAS)
    assert world.service._served_within(world.state.entries)(task, stored)
    world.run(world.state.update_entry(stored))
    (moved,) = [e for e in world.state.entries.by_id.values() if e.spiffe_id == RUNTIME]
    assert not world.service._served_within(world.state.entries)(task, moved)


def test_an_end_reads_only_its_own_sub_tasks(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """An end looked for its sub-tasks among every active task of its runtime on its node
    (up to the node's cap): each end read them all, and an eviction or an expiry sweep of n
    tasks read n squared rows. Now only the sub-tasks' own rows are read."""
    other = f"{RUNTIME}-2"
    world.run(world.state.create_entry(Entry("", other, AGENT, SELECTORS)))
    for _ in range(3):
        world.begin(runtime_id=other)
    siblings = [world.begin() for _ in range(3)]
    parent = world.begin(actions=("read", "write"))
    child = world.begin(actions=("read",), parent_task_id=parent.task_id)
    grandchild = world.begin(actions=("read",), parent_task_id=child.task_id)
    rows = world.store._rows
    read: list[str] = []

    def counted(name: str) -> Any:
        method = getattr(rows, name)

        def read_rows(*args: Any, **kw: Any) -> Any:
            found = method(*args, **kw)
            read.extend(r.task_id for r in found)
            return found

        return read_rows

    for name in ("list_tasks", "sub_tasks", "due_tasks"):
        monkeypatch.setattr(rows, name, counted(name))
    world.run(world.service.end(world.agent, parent.task_id, [RUNTIME]))
    for task in (child, grandchild):
        assert world.store.get_task(task.task_id).state is TaskState.ENDED  # type: ignore[union-attr]
    assert sorted(read) == sorted([child.task_id, grandchild.task_id])
    assert all(world.service.active_task(t.spiffe_id) is not None for t in siblings)
    assert len(world.store.list_tasks(state="active")) == 6


def test_a_sub_task_whose_parent_ends_while_it_begins_does_not_outlive_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parent's end lands after the sub-task was decided (its parent active) and before
    it was stored: the end found no such sub-task to end with it."""
    parent = world.begin(actions=("read", "write"))
    write_begin = world.service._write_begin

    async def parent_ends_first(task: Any, entry: Entry, begun: Any) -> Any:
        await world.service.end(world.agent, parent.task_id, [RUNTIME])
        return await write_begin(task, entry, begun)

    monkeypatch.setattr(world.service, "_write_begin", parent_ends_first)
    with pytest.raises(PermissionDeniedError, match=f"parent task {parent.task_id}"):
        world.begin(actions=("read",), parent_task_id=parent.task_id)
    (child,) = [t for t in world.store.list_tasks() if t.parent_task_id == parent.task_id]
    assert child.state is TaskState.REVOKED
    assert world.service.active_task(child.spiffe_id) is None
    assert child.entry_id not in world.state.entries.by_id
    assert {e["task_id"] for e in world.events("task_end")} == {parent.task_id, child.task_id}


def _parent_ends_while_the_sub_task_begins(world: World, monkeypatch: pytest.MonkeyPatch) -> Any:
    parent = world.begin(actions=("read", "write"))
    write_begin = world.service._write_begin

    async def parent_ends_first(task: Any, entry: Entry, begun: Any) -> Any:
        await world.service.end(world.agent, parent.task_id, [RUNTIME])
        return await write_begin(task, entry, begun)

    monkeypatch.setattr(world.service, "_write_begin", parent_ends_first)
    return parent


def test_a_sub_task_refused_as_its_parent_ended_says_so_on_its_end_event(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its task-end event said only 'begin failed', the row why: the log, what an auditor
    reads, lacked the reason."""
    parent = _parent_ends_while_the_sub_task_begins(world, monkeypatch)
    with pytest.raises(PermissionDeniedError):
        world.begin(actions=("read",), parent_task_id=parent.task_id)
    (child,) = [t for t in world.store.list_tasks() if t.parent_task_id == parent.task_id]
    (end,) = [e for e in world.events("task_end") if e["task_id"] == child.task_id]
    assert end["reason"] == child.end_reason
    assert end["reason"] == "begin failed: its parent task ended while it began"
    assert world.store.unsettled(world.clock.now() + 3600) == []


def test_a_sub_task_end_event_that_fails_is_recorded_by_the_settle_sweep(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row was settled before its task-end event was appended: when the append failed (the
    log's storage down a moment), nothing ever recorded the end of a task the log saw begin."""
    parent = _parent_ends_while_the_sub_task_begins(world, monkeypatch)
    append = world.audit.append

    def log_down_for_the_sub_task(kind: str, **fields: Any) -> Any:
        if kind == "task_end" and fields["task_id"] != parent.task_id:
            raise AuditError("audit storage unavailable")
        return append(kind, **fields)

    monkeypatch.setattr(world.audit, "append", log_down_for_the_sub_task)
    with pytest.raises(PermissionDeniedError):
        world.begin(actions=("read",), parent_task_id=parent.task_id)
    monkeypatch.setattr(world.audit, "append", append)
    (child,) = [t for t in world.store.list_tasks() if t.parent_task_id == parent.task_id]
    assert [e["task_id"] for e in world.events("task_end")] == [parent.task_id]
    world.clock.advance(61)
    assert world.run(world.service.settle_ends()) == 1
    (end,) = [e for e in world.events("task_end") if e["task_id"] == child.task_id]
    assert end["reason"] == "begin failed: its parent task ended while it began"
    assert world.run(world.service.settle_ends()) == 0
    assert world.audit.verify().ok


def test_a_task_x509_svid_renewed_late_in_its_task_ends_with_the_task(world: World) -> None:
    task = world.begin(ttl=600)
    first = issue_x509(world, task.spiffe_id)
    assert first.not_valid_after_utc.timestamp() == task.expires_at
    world.clock.advance(500)  # the agent renews at half of the SVID's life, and later
    renewed = issue_x509(world, task.spiffe_id)
    assert renewed.not_valid_after_utc.timestamp() <= task.expires_at


def test_a_task_ends_no_later_than_its_runtimes_entry(world: World) -> None:
    runtime = "spiffe://example.org/agents/contractor"
    until = int(world.clock.now()) + 100
    world.run(world.state.create_entry(Entry("", runtime, AGENT, SELECTORS, expires_at=until)))
    task = world.begin(runtime_id=runtime, ttl=600)
    assert (task.ttl, task.expires_at) == (100, until)
    assert world.state.entries.by_id[task.entry_id].expires_at == until


def test_ttl_expiry_revokes(world: World) -> None:
    task = world.begin(ttl=60)
    issue_x509(world, task.spiffe_id)
    world.clock.advance(61)
    assert world.run(world.service.expire_due()) == 1
    assert world.store.get_task(task.task_id).state is TaskState.EXPIRED  # type: ignore[union-attr]
    assert sorted(r.kind for r in world.state.revocations) == ["task", "x509_serial"]


def test_evicting_an_agent_revokes_its_outstanding_credentials(world: World) -> None:
    task = world.begin()
    plain = issue_x509(world, RUNTIME)
    issue_x509(world, task.spiffe_id)
    assert world.run(world.service.revoke_agent(AGENT, "agent evicted")) == 2
    serials = {r.value for r in world.state.revocations if r.kind == "x509_serial"}
    assert format(plain.serial_number, "x") in serials
    assert len(serials) == 2
    assert world.store.get_task(task.task_id).state is TaskState.REVOKED  # type: ignore[union-attr]


def _node_attested_again(world: World) -> tuple[Any, Any]:
    """The node's old agent (SVID expiring in 300 s) with a task, and the agent the node
    attested again as with a new join token (a new agent ID) with one of its own."""
    old = dataclasses.replace(world.agent, expires_at=int(world.clock.now()) + 300)
    assert world.run(world.state.save_agent(old, world.agent))
    world.agent = old
    old_task = world.begin(ttl=3000)
    new = AttestedAgent(
        AGENT.replace("t1", "t2"), "join_token", "abd", int(world.clock.now()) + 3600, selectors=()
    )
    world.run(world.state.save_agent(new, None))
    world.run(world.state.create_entry(Entry("", RUNTIME, new.spiffe_id, SELECTORS)))
    request = BeginRequest(
        runtime_id=RUNTIME,
        actions=("read",),
        resources=("docs",),
        on_behalf_of="user:alice",
        ttl=3000,
    )
    new_task = world.run(world.service.begin(new, request))
    return old_task, new_task


def test_a_task_ends_once_its_agents_svid_expired_unrenewed(world: World) -> None:
    """A join-token node that attests again gets a new agent ID: the tasks it began under
    the old one, which only the old ID may end, ran to their TTL, their credentials valid.
    They end once the old agent's SVID has expired (and MAX_CLOCK_SKEW more)."""
    old_task, new_task = _node_attested_again(world)
    cert = issue_x509(world, old_task.spiffe_id)
    world.clock.advance(300 + MAX_CLOCK_SKEW - 1)
    assert world.run(world.service.end_agentless()) == 0
    world.clock.advance(1)
    world.run(world.service.housekeeping())  # as the housekeeping loop runs it
    ended = world.store.get_task(old_task.task_id)
    assert ended is not None
    assert ended.state is TaskState.REVOKED
    assert "agent's SVID expired" in ended.end_reason
    assert world.state.is_revoked("x509_serial", format(cert.serial_number, "x"))
    assert old_task.entry_id not in world.state.entries.by_id
    assert world.service.active_task(new_task.spiffe_id) is not None
    assert world.run(world.service.end_agentless()) == 0


def test_a_task_of_an_agent_renewed_through_another_server_goes_on(world: World) -> None:
    """Memory holds the agent's expired record; the datastore its renewal (another server's
    write the feed has not brought yet): the task goes on."""
    old_task, _ = _node_attested_again(world)
    held = world.state.agents[world.agent.spiffe_id]
    renewed = dataclasses.replace(held, serial="renewed", expires_at=held.expires_at + 3600)
    world.store._rows.upsert_agent(renewed, held)
    world.clock.advance(300 + MAX_CLOCK_SKEW)
    assert world.state.agents[world.agent.spiffe_id].expires_at == held.expires_at
    assert world.run(world.service.end_agentless()) == 0
    assert world.service.active_task(old_task.spiffe_id) is not None


def test_a_task_begun_after_its_agent_attested_again_is_not_ended_as_lapsed(world: World) -> None:
    """The agent's record is confirmed lapsed; before its tasks are listed the node attests
    again under the same agent ID (x509pop, TPM: the ID is the node's) on another server and
    begins a task there. That task was begun with a live SVID: it goes on. The ones begun
    under the lapsed SVID end."""
    held = dataclasses.replace(world.agent, expires_at=int(world.clock.now()) + 300)
    assert world.run(world.state.save_agent(held, world.agent))
    world.agent = held
    old_task = world.begin(ttl=3000)
    world.clock.advance(300 + MAX_CLOCK_SKEW)
    now = int(world.clock.now())
    again = dataclasses.replace(held, serial="again", expires_at=now + 3600, attested_at=now)
    fresh = dataclasses.replace(
        old_task, task_id="task-fresh", spiffe_id=old_task.spiffe_id + "-fresh", created_at=now
    )
    store = world.service._store
    stored_agent, list_tasks = store.stored_agent, store.list_tasks
    attested: list[bool] = []

    def attest_again() -> None:
        # The other server's re-admission and begin, landing between this one's two reads.
        if not attested:
            attested.append(True)
            store._rows.upsert_agent(again, held)
            store.put_task(fresh)

    def read_agent(agent_id: str) -> Any:
        found = stored_agent(agent_id)
        attest_again()
        return found

    def read_tasks(**kw: Any) -> Any:
        found = list_tasks(**kw)
        attest_again()
        return found

    store.stored_agent = read_agent  # type: ignore[method-assign]
    store.list_tasks = read_tasks  # type: ignore[method-assign]
    world.run(world.service.end_agentless())
    assert world.store.get_task("task-fresh").state is TaskState.ACTIVE  # type: ignore[union-attr]
    assert world.store.get_task(old_task.task_id).state is TaskState.REVOKED  # type: ignore[union-attr]


def test_a_restored_datastores_agents_are_not_lapsed_before_they_could_call(
    world: World,
) -> None:
    """A restored record names the SVID the agent held at the backup, expired while it
    renewed; its newer one is adopted only once it calls. Until that one, signed before the
    restore, has expired (an agent_svid_ttl on), its tasks go on."""
    held = dataclasses.replace(world.agent, expires_at=int(world.clock.now()) + 300)
    assert world.run(world.state.save_agent(held, world.agent))
    world.agent = held
    task = world.begin(ttl=3000)
    world.clock.advance(300 + MAX_CLOCK_SKEW)
    world.service.hold_agent_lapses_until(int(world.clock.now()) + 3600)
    assert world.run(world.service.end_agentless()) == 0
    assert world.service.active_task(task.spiffe_id) is not None
    world.clock.advance(3600)
    assert world.run(world.service.end_agentless()) == 1


def test_records_are_pruned_while_agent_lapses_cannot_be_read(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> None:
    """A lapsed agent's record that cannot be read (run after run, a damaged row) does not
    hold up the pruning of old records, which ran after it."""
    faulty = FaultInjectingDataStore(datastore)
    world = make_world(tmp_path, clock, faulty, ca_manager)
    held = dataclasses.replace(world.agent, expires_at=int(clock.now()) + 300)
    assert world.run(world.state.save_agent(held, world.agent))
    world.agent = held
    world.begin(ttl=3000)
    clock.advance(300 + MAX_CLOCK_SKEW)
    faulty.inject(sqlite3.OperationalError("disk I/O error"), method="get_agent")
    faulty.calls.clear()
    with pytest.raises(sqlite3.OperationalError):
        world.run(world.service.housekeeping())
    assert "prune_credentials" in faulty.calls
    world.close()


def test_a_begin_refused_before_the_policy_decision_is_on_the_ledger_too(world: World) -> None:
    # Every identity decision is audited: refusing a runtime its agent may not serve, or a
    # parent task of another runtime, is one as much as a policy denial.
    other = "spiffe://example.org/agents/someone-else"
    with pytest.raises(PermissionDeniedError, match="may serve"):
        world.begin(runtime_id=other)
    parent = world.begin()
    (refused,) = world.events("denial")
    assert refused["agent_id"] == other
    assert refused["node_id"] == AGENT
    assert "may serve" in refused["reason"]
    world.run(world.service.end(world.agent, parent.task_id, [RUNTIME]))
    with pytest.raises(PermissionDeniedError, match="is ended"):
        world.begin(parent_task_id=parent.task_id)
    assert [e["reason"] for e in world.events("denial")][1].endswith("is ended")
    assert world.audit.verify().ok


def test_runtime_must_be_entitled_and_not_a_task(world: World) -> None:
    with pytest.raises(PermissionDeniedError, match="may serve"):
        world.begin(runtime_id="spiffe://example.org/agents/someone-else")
    task = world.begin()
    with pytest.raises(InvalidRequestError, match="task identity"):
        world.begin(runtime_id=task.spiffe_id)
    with pytest.raises(InvalidRequestError, match="goal_sha256"):
        world.begin(goal_sha256="the raw goal text")
    with pytest.raises(NotFoundError, match="parent task"):
        world.begin(parent_task_id="nope")


def test_a_task_entry_takes_the_selectors_of_the_callers_entry_its_agent_names(
    world: World,
) -> None:
    # Two workloads given one ID by two entries: the task's entry took the selectors of the
    # entry with the lowest id, so a task one began went (X.509 pushed, JWTs on request) to the
    # other, and the one that began it could fetch nothing of it.
    def add(path: str) -> Entry:
        selectors = (*SELECTORS, Selector("unix", f"path:{path}"))
        created: Entry = world.run(world.state.create_entry(Entry("", RUNTIME, AGENT, selectors)))
        return created

    first, second = sorted((add("/opt/a"), add("/opt/b")), key=lambda e: e.id)
    task = world.begin(runtime_entry_id=second.id)
    assert world.state.entries.by_id[task.entry_id].selectors == second.selectors
    sub = world.begin(parent_task_id=task.task_id, runtime_entry_id=second.id)
    assert world.state.entries.by_id[sub.entry_id].selectors == second.selectors
    other = world.run(world.state.create_entry(Entry("", f"{RUNTIME}-2", AGENT, SELECTORS)))
    for wrong in ("nope", other.id):
        with pytest.raises(PermissionDeniedError, match="may serve"):
            world.begin(runtime_entry_id=wrong)
    assert first.id < second.id


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        # Past the intent's limits (svid._limits), refused before anything is decided.
        ("environment", "e" * 5000, "intent.environment: 5000 bytes, at most 256 bytes"),
        (
            "resources",
            tuple(f"https://api.example.org/v1/{n:03d}" for n in range(200)),
            "intent.resources: 200 values, at most 64 allowed",
        ),
        # Recorded in the task-begin event's extra, which has a size limit: within the
        # intent's limits, names that JSON escapes may still pass it. It was refused as "audit
        # log unavailable" (UNAVAILABLE, a server fault logged), not as the caller's.
        (
            "resources",
            (*(f"{n}" + '"' * 255 for n in range(7)), "7" + '"' * 239),
            "intent: too large to record",
        ),
        # PostgreSQL text holds no NUL: there the event's write failed as storage unavailable.
        ("on_behalf_of", "user:\x00alice", "intent.on_behalf_of: may not contain NUL"),
        ("environment", "prod\x00", "intent.environment: may not contain NUL"),
        ("resources", ("do\x00cs",), "may not contain NUL"),
        # Printed on an operator's terminal by `task show`: a newline forges a line of the
        # view, an escape sequence rewrites the screen.
        ("on_behalf_of", "alice\n    Decision   : allow", "intent.on_behalf_of: one line"),
        ("environment", "prod\x1b[2J", "intent.environment: one line of printable text"),
        ("resources", ("docs\r",), "intent.resources: one line"),
        ("actions", ("read\u202e",), "intent.actions: one line"),
        ("tools", ("mcp-a#read\x07",), "one line of printable text"),
    ],
)
def test_an_intent_that_cannot_be_recorded_is_a_bad_request(
    world: World, field: str, value: object, needle: str
) -> None:
    with pytest.raises(InvalidRequestError, match=needle):
        world.begin(**{field: value})
    assert world.store.list_tasks() == []
    assert world.events("task_begin") == []


def test_policy_ttl_cap_constrains_the_grant(world: World) -> None:
    task = world.begin(ttl=3600)
    assert task.ttl == 900
    assert task.decision == "allow_constrained"


def test_active_tasks_survive_a_restart(world: World) -> None:
    task = world.begin()
    again = TaskService(
        state=world.state,
        store=TaskStore(SqliteDataStore(world.tmp / "datastore.sqlite3", world.clock)),
        policy=world.service.policy,
        audit=world.audit,
        ca=world.ca,
        server_id="spiffe://example.org/svid/server",
        clock=world.clock,
    )
    again.load()
    assert again.active_task(task.spiffe_id) == task
    again.store.close()


def test_crl_der_is_stable_until_the_list_changes(world: World) -> None:
    task = world.begin()
    issue_x509(world, task.spiffe_id)
    world.run(world.service.end(world.agent, task.task_id, []))
    first = world.service.crl()
    assert world.service.crl() == first
    assert x509.load_der_x509_crl(first[0]).public_bytes(Encoding.DER) == first[0]


def test_crls_are_signed_again_and_pushed_before_their_next_update(world: World) -> None:
    assert not world.service.refresh_crl()  # nothing revoked: no CRL to keep current
    now = int(world.clock.now())
    # A certificate living past the refresh (a task's own would have expired, and left no CRL).
    expires_at = now + 4 * REFRESH_AFTER
    revoked = Revocation("x509_serial", "7b", "spiffe://example.org/w", expires_at, "test", now)
    world.run(world.state.add_revocations((revoked,)))
    first = x509.load_der_x509_crl(world.service.crl()[0])
    head = world.state.changes.head
    world.clock.advance(REFRESH_AFTER - 1)
    assert not world.service.refresh_crl()
    world.clock.advance(1)
    assert world.service.refresh_crl()
    (change,) = world.state.changes.since(head, world.state.changes.epoch) or []
    assert change.crl  # every agent's stream takes the CRLs again
    second = x509.load_der_x509_crl(world.service.crl()[0])
    assert second.next_update_utc > first.next_update_utc > second.last_update_utc
    assert [e.serial_number for e in second] == [e.serial_number for e in first]
    assert not world.service.refresh_crl()


def test_a_snapshot_signing_the_crls_again_leaves_every_other_agents_refresh_due(
    world: World,
) -> None:
    # An agent's snapshot past half the validity signs the CRLs again for that agent alone:
    # the refresh still pushes them to every other agent, whose CRL runs out at its nextUpdate.
    now = int(world.clock.now())
    revoked = Revocation(
        "x509_serial", "7b", "spiffe://example.org/w", now + 10 * REFRESH_AFTER, "test", now
    )
    world.run(world.state.add_revocations((revoked,)))
    first = x509.load_der_x509_crl(world.service.crl()[0])
    world.clock.advance(REFRESH_AFTER)
    snapshot = world.service.crl()  # a reconnecting agent's Sync snapshot
    assert x509.load_der_x509_crl(snapshot[0]).next_update_utc > first.next_update_utc
    head = world.state.changes.head
    assert world.service.refresh_crl()
    (change,) = world.state.changes.since(head, world.state.changes.epoch) or []
    assert change.crl
    assert world.service.crl() is snapshot  # still fresh: pushed as signed, not again
    assert not world.service.refresh_crl()


def _crl_verifier(world: World, crls: tuple[bytes, ...]) -> X509Verifier:
    """A relying party as svid's source makes one: the trust bundle, and the CRLs the server
    signed (those of no bundle authority pending, for an intermediate CA to vouch for)."""
    bundles = {TRUST_DOMAIN: X509Bundle(TRUST_DOMAIN, world.ca.bundle().x509_authorities)}
    result = revoked_from_crls(crls, bundles)
    revocations = RevocationSet()
    revocations.replace(result.revoked, result.next_update, result.pending)
    source = MemoryBundleSource()
    source.set_x509_bundles(BundleSet(bundles))
    return X509Verifier(source.x509_bundle_for, clock=world.clock, revocations=revocations)


def test_each_ca_signs_a_crl_of_the_serials_it_issued_after_a_rotation(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, keystore: KeyStore
) -> None:
    ca = CaManager(CaConfig(TRUST_DOMAIN, ca_ttl=1200), datastore, keystore, clock)
    ca.initialize()
    world = make_world(tmp_path, clock, datastore, ca)
    try:
        (first,) = ca.key_slots(X509_KIND)
        clock.set(activate_at(first.not_before, first.not_after) - 100)
        ca.rotate()
        old_leaf = issue_x509(world, RUNTIME)  # by the first CA, good past the rotation
        clock.advance(101)
        ca.rotate()
        old_ca, new_ca = (
            x509.load_der_x509_certificate(s.public_der) for s in ca.key_slots(X509_KIND)
        )
        assert ca.x509_signer().ca_certificate == new_ca
        new_leaf = issue_x509(world, RUNTIME)
        assert (old_leaf.issuer, new_leaf.issuer) == (old_ca.subject, new_ca.subject)
        world.state.set_bundle(ca.bundle(), {})
        world.run(world.service.revoke_agent(AGENT, "evicted"))

        crls = world.service.crl()
        by_issuer = {}
        for der in crls:
            crl = x509.load_der_x509_crl(der)
            by_issuer[crl.issuer] = [e.serial_number for e in crl]
        # Each CA lists what it issued, and nothing another CA did.
        assert by_issuer == {
            old_ca.subject: [old_leaf.serial_number],
            new_ca.subject: [new_leaf.serial_number],
        }
        authorities = {TRUST_DOMAIN: X509Bundle(TRUST_DOMAIN, ca.bundle().x509_authorities)}
        assert revoked_from_crls(crls, authorities).rejected == ()
        verifier = _crl_verifier(world, crls)
        for leaf in (old_leaf, new_leaf):
            with pytest.raises(RevokedError):
                verifier.verify_der(leaf.public_bytes(Encoding.DER))
            # And as OpenSSL reads them: the leaf's own CA's CRL is found, and lists it.
            result = openssl_verify(
                tmp_path, leaf, ca.bundle().x509_authorities, at=clock.now(), crls=crls
            )
            assert result.returncode != 0
            assert "certificate revoked" in result.stdout + result.stderr
    finally:
        world.close()


def test_an_upstream_servers_crls_revoke_its_leaves_for_svid_and_openssl(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, keystore: KeyStore
) -> None:
    # The bundle holds the upstream root only; the server's own CA, under it, signs the leaves
    # and their CRLs, and travels in every SVID's chain.
    root_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Upstream Root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(to_datetime(clock.now() - 60))
        .not_valid_after(to_datetime(clock.now() + 86400 * 30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False
        )
        .sign(root_key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "upstream.pem", tmp_path / "upstream.key"
    cert_path.write_bytes(root.public_bytes(Encoding.PEM))
    key_path.write_bytes(root_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    key_path.chmod(0o600)
    config = CaConfig(TRUST_DOMAIN, upstream_cert=cert_path, upstream_key=key_path)
    ca = CaManager(config, datastore, keystore, clock)
    ca.initialize()
    world = make_world(tmp_path, clock, datastore, ca)
    try:
        assert ca.bundle().x509_authorities == (root,)
        task = world.begin()
        (entry,) = [e for e in world.state.entries.by_id.values() if e.spiffe_id == task.spiffe_id]
        (outcome,) = world.run(world.issuer.issue_x509(world.agent, [(entry.id, make_csr()[1])]))
        leaf, server_ca = der_chain(outcome.chain_der)
        assert server_ca == ca.x509_signer().ca_certificate
        world.run(world.service.end(world.agent, task.task_id, [RUNTIME]))
        crls = world.service.crl()
        assert [x509.load_der_x509_crl(d).issuer for d in crls] == [server_ca.subject]

        with pytest.raises(RevokedError):
            _crl_verifier(world, crls).verify_der(outcome.chain_der)
        result = openssl_verify(tmp_path, leaf, [root], [server_ca], at=clock.now(), crls=crls)
        assert result.returncode != 0
        assert "certificate revoked" in result.stdout + result.stderr
    finally:
        world.close()


def test_workload_issuance_is_recorded_and_audited_in_batches(world: World) -> None:
    leaf = issue_x509(world, RUNTIME)
    (cred,) = world.store.agent_credentials(AGENT, 0)
    assert cred.value == format(leaf.serial_number, "x")
    assert cred.task_id == ""
    (event,) = world.events("x509_issued")
    assert event["credential_id"] == cred.value
    assert event["node_id"] == AGENT


def test_reported_validations_become_audit_events(world: World) -> None:
    from svid._proto import task_pb2

    world.service.record_validations(
        AGENT,
        [
            task_pb2.Validation(subject=RUNTIME, audience=["docs"], ok=True, jti="j1", txn="t1"),
            task_pb2.Validation(audience=["docs"], ok=False, reason="token has been revoked"),
        ],
    )
    ok, refused = world.events("jwt_validated")
    assert (ok["decision"], ok["credential_id"], ok["task_id"]) == ("allow", "j1", "t1")
    assert (refused["decision"], refused["reason"]) == ("deny", "token has been revoked")
    assert refused["node_id"] == AGENT


def test_a_refused_forged_token_is_not_filed_under_the_task_and_runtime_it_names(
    world: World,
) -> None:
    """Any local workload may have a forged token validated: one naming another workload's
    task (its ID is every token's `txn`) was filed under that task, that runtime and that jti,
    a refusal the task never had, in `audit export --task` and the agent_id index alike."""
    from svid._proto import task_pb2

    task = world.begin()
    forged, revoked = (
        task_pb2.Validation(
            subject=task.spiffe_id,
            audience=["docs"],
            ok=False,
            reason=reason,
            jti="j1",
            txn=task.task_id,
            claims_verified=verified,
        )
        for reason, verified in (("token signature is invalid", False), ("revoked", True))
    )
    world.service.record_validations(AGENT, [forged, revoked])
    unsigned, signed = world.events("jwt_validated")
    assert (unsigned["agent_id"], unsigned["task_id"], unsigned["credential_id"]) == (None,) * 3
    assert json.loads(unsigned["extra"])["claimed"] == {
        "sub": task.spiffe_id,
        "txn": task.task_id,
        "jti": "j1",
    }
    assert unsigned["reason"] == "token signature is invalid"
    # A token whose signature held, refused all the same (revoked), is the task's own.
    assert (signed["agent_id"], signed["task_id"], signed["credential_id"]) == (
        task.spiffe_id,
        task.task_id,
        "j1",
    )
    filed = world.audit.store.audit_rows(EventFilter(task_id=task.task_id, kind="jwt_validated"))
    assert [r["seq"] for r in filed] == [signed["seq"]]
    assert world.audit.verify().ok


def test_a_reported_claim_that_looks_like_a_token_is_not_recorded(world: World) -> None:
    from svid._proto import task_pb2

    forged = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    world.service.record_validations(
        AGENT, [task_pb2.Validation(subject=forged, audience=["docs"], ok=False, reason="bad")]
    )
    (event,) = world.events("jwt_validated")
    assert event["decision"] == "deny"
    assert forged not in str(event)
    assert world.audit.verify().ok


# -- the task-begin event is written only for a task that exists ------------------------------


class FailingTaskStore(TaskStore):
    """The real task store whose next begin's row fails (a full or unwritable disk)."""

    fail_next = False

    def begin(self, task: Any, log: AuditLog, begun: Any) -> None:
        if self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("disk I/O error")
        super().begin(task, log, begun)


def no_trace_of_a_task(world: World) -> None:
    assert world.events("task_begin") == []
    assert [e.spiffe_id for e in world.state.entries.by_id.values()] == [RUNTIME]
    assert [t for t in world.store.list_tasks() if t.active] == []
    assert world.service.next_expiry() == float("inf")


def test_a_task_whose_entry_cannot_be_created_ends_on_record(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> None:
    """The entry is created last (once the task is active): if that fails, the log says the
    task began and ended at once, and nothing can be issued for it."""
    faulty = FaultInjectingDataStore(datastore)
    world = make_world(tmp_path, clock, faulty, ca_manager)
    faulty.inject(sqlite3.OperationalError("disk I/O error"), method="create_entry")
    with pytest.raises(sqlite3.OperationalError):
        world.begin()
    (begun,) = world.events("task_begin")
    (ended,) = world.events("task_end")
    assert ended["task_id"] == begun["task_id"]
    assert (ended["decision"], ended["reason"]) == (
        "revoked",
        "begin failed: its entry could not be created",
    )
    assert json.loads(ended["extra"])["revoked"] == 0
    assert [e.spiffe_id for e in world.state.entries.by_id.values()] == [RUNTIME]
    (task,) = world.store.list_tasks()
    assert task.state is TaskState.REVOKED
    assert world.service.active_task(task.spiffe_id) is None
    assert world.audit.verify().ok
    world.close()


def _entry_committed_then_lost(
    world: World, datastore: SqliteDataStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> list[Credential]:
    """Make the next begin's entry write commit and then fail (its answer lost at COMMIT),
    after another server following the feed minted an X.509-SVID for the task, the ledger
    taking it (the task active). Returns the list that holds that credential once minted."""
    create = datastore.create_entry
    minted: list[Credential] = []

    def committed_then_lost(entry: Entry) -> Entry:
        create(entry)
        (task,) = [t for t in world.store.list_tasks() if t.entry_id == entry.id]
        assert task.active
        credential = Credential(
            REVOKED_X509_SERIAL,
            "abc123",
            AGENT,
            entry.spiffe_id,
            task.task_id,
            int(clock.now()) + 300,
        )
        world.store.record([credential])  # the other server's mint: accepted, task active
        minted.append(credential)
        raise StorageError("server closed the connection unexpectedly")

    monkeypatch.setattr(datastore, "create_entry", committed_then_lost)
    return minted


def test_a_begin_whose_entry_commit_went_unanswered_revokes_what_was_issued_meanwhile(
    tmp_path: Path,
    clock: FakeClock,
    datastore: SqliteDataStore,
    ca_manager: CaManager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The entry's write commits but its answer is lost (a connection cut at COMMIT). Between
    that commit and the undo's claim of the end, another server that followed the change feed
    (task row active, entry there) issued the runtime an X.509-SVID for the task, the ledger
    taking it. The undo carries out the end in full: that SVID is revoked, the entry deleted
    from the datastore, and the end recorded once."""
    world = make_world(tmp_path, clock, datastore, ca_manager)
    minted = _entry_committed_then_lost(world, datastore, clock, monkeypatch)
    with pytest.raises(StorageError):
        world.begin()
    (task,) = world.store.list_tasks()
    assert task.state is TaskState.REVOKED
    (credential,) = minted
    assert (credential.kind, credential.value) in {
        (r.kind, r.value) for r in world.state.revocations
    }
    assert datastore.get_entries([task.entry_id]) == []
    (ended,) = world.events("task_end")
    assert (ended["task_id"], json.loads(ended["extra"])["revoked"]) == (task.task_id, 1)
    (revoked,) = world.events("revocation")
    assert revoked["credential_id"] == "abc123"
    assert world.store.unsettled(clock.now() + 3600) == []
    assert world.audit.verify().ok
    world.close()


def test_a_begin_undo_cut_short_after_its_claim_is_finished_by_the_settle_sweep(
    tmp_path: Path,
    clock: FakeClock,
    datastore: SqliteDataStore,
    ca_manager: CaManager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, and the datastore fails again while the undo carries out the end: the end
    stays claimed and unsettled, and the sweep finishes it (revocation, entry, one event)."""
    world = make_world(tmp_path, clock, datastore, ca_manager)
    read_credentials = world.store.task_credentials
    minted = _entry_committed_then_lost(world, datastore, clock, monkeypatch)

    def down(task_id: str, now: float) -> Any:
        monkeypatch.setattr(world.store, "task_credentials", read_credentials)
        raise StorageError("could not connect to server")

    monkeypatch.setattr(world.store, "task_credentials", down)
    with pytest.raises(StorageError):
        world.begin()
    (task,) = world.store.list_tasks()
    assert task.state is TaskState.REVOKED
    assert world.events("task_end") == []  # neither the undo nor its caller recorded it
    (credential,) = minted
    clock.advance(61)
    assert world.run(world.service.settle_ends()) == 1
    assert (credential.kind, credential.value) in {
        (r.kind, r.value) for r in world.state.revocations
    }
    assert datastore.get_entries([task.entry_id]) == []
    (ended,) = world.events("task_end")
    assert json.loads(ended["extra"])["revoked"] == 1
    assert world.run(world.service.settle_ends()) == 0
    world.close()


def test_a_task_entry_reaches_agents_only_once_its_task_is_active(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[object] = []
    create = world.state.create_entry

    async def watching(entry: Entry) -> Entry:
        seen.append(world.service.active_task(entry.spiffe_id))
        return await create(entry)

    monkeypatch.setattr(world.state, "create_entry", watching)
    task = world.begin()
    assert seen == [task]


def test_a_task_entry_gets_no_svid_unless_its_task_is_active(world: World) -> None:
    """An entry of a task that is not (yet, or any more) active: refused, nothing recorded."""
    pending = f"{RUNTIME}/task/0123456789abcdef"
    world.run(world.state.create_entry(Entry("task-pending", pending, AGENT, SELECTORS)))
    with pytest.raises(PermissionDeniedError, match="not active"):
        issue_x509(world, pending)
    with pytest.raises(PermissionDeniedError, match="not active"):
        world.mint_jwt(world.state.entries.by_id["task-pending"], ["docs"])
    assert world.store.agent_credentials(AGENT, 0) == []
    assert world.events("x509_issued") == world.events("jwt_minted") == []


def test_every_task_credential_is_recorded_with_its_task(world: World) -> None:
    task = world.begin()
    leaf = issue_x509(world, task.spiffe_id)
    issued = world.mint_jwt(world.state.entries.by_id[task.entry_id], ["docs"])
    creds = world.store.task_credentials(task.task_id, 0)
    assert {c.value for c in creds} == {format(leaf.serial_number, "x"), issued.jti}
    assert {e["task_id"] for e in world.events("x509_issued") + world.events("jwt_minted")} == {
        task.task_id
    }


def test_a_failed_task_row_write_leaves_no_task_begin_event(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> None:
    store = FailingTaskStore(datastore)
    world = make_world(tmp_path, clock, datastore, ca_manager, store=store)
    store.fail_next = True
    with pytest.raises(sqlite3.OperationalError):
        world.begin()
    no_trace_of_a_task(world)
    assert world.store.list_tasks() == []
    # The next begin works and is recorded once.
    task = world.begin()
    assert [e["task_id"] for e in world.events("task_begin")] == [task.task_id]
    world.close()


def _begin_event_fails(world: World, monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """The audit write of the next task-begin event fails with `error`."""
    append_many = world.audit.append_many

    def fails(drafts: Any, **kw: Any) -> Any:
        if any(d.kind == "task_begin" for d in drafts):
            raise error
        return append_many(drafts, **kw)

    monkeypatch.setattr(world.audit, "append_many", fails)


@pytest.mark.parametrize("fault", ["audit write", "ledger commit"])
def test_a_task_whose_begin_event_cannot_be_written_is_not_stored(
    tmp_path: Path,
    clock: FakeClock,
    any_datastore: DataStore,
    ca_manager: CaManager,
    monkeypatch: pytest.MonkeyPatch,
    *,
    fault: str,
) -> None:
    """The task's row and its task-begin event are one transaction: when the event's write
    fails, neither is kept (no row, active or undone), and the begin is refused."""
    faulty = FaultInjectingDataStore(any_datastore)
    world = make_world(tmp_path, clock, faulty, ca_manager)
    if fault == "audit write":
        _begin_event_fails(world, monkeypatch, LedgerError("the audit write failed"))
    else:
        faulty.inject(StorageError("disk I/O error"), method="write_ledger")
    with pytest.raises(AuditError):
        world.begin()
    no_trace_of_a_task(world)
    assert world.store.list_tasks() == []
    monkeypatch.undo()
    task = world.begin()  # the next begin works, recorded once
    assert [e["task_id"] for e in world.events("task_begin")] == [task.task_id]
    assert world.audit.verify().ok


class _Killed(BaseException):
    """The server process died here: no handler of it runs (not an Exception)."""


def _restarted(world: World, datastore: DataStore, settings: TaskSettings | None = None) -> World:
    """A new server process on the same datastore: memory as load() finds it."""
    state = ServerState(datastore, world.clock, ChangeNotifier())
    state.load()
    state.set_bundle(world.ca.bundle(), {})
    audit = AuditLog(datastore, world.clock)
    store = TaskStore(datastore)
    service = TaskService(
        state=state,
        store=store,
        policy=PolicyEngine(None, world.clock, trust_domain="example.org"),
        audit=audit,
        ca=world.ca,
        server_id="spiffe://example.org/svid/server",
        clock=world.clock,
        settings=settings,
    )
    service.load()
    return dataclasses.replace(world, service=service, state=state, audit=audit, store=store)


def test_a_begin_killed_at_its_commit_leaves_neither_task_nor_event(
    tmp_path: Path, clock: FakeClock, any_datastore: DataStore, ca_manager: CaManager
) -> None:
    """The server dies as the begin commits its task's row and task-begin event (one
    transaction): after the restart there is no task the log never heard of, active until the
    settle sweep, nor an event of a task never stored; the sweep has nothing to do."""
    faulty = FaultInjectingDataStore(any_datastore)
    world = make_world(tmp_path, clock, faulty, ca_manager)
    faulty.inject(_Killed(), method="write_ledger")
    with pytest.raises(_Killed):
        world.begin(ttl=3600)
    world = _restarted(world, any_datastore)
    assert world.store.list_tasks() == []
    assert world.events("task_begin") == []
    clock.advance(61)
    assert world.run(world.service.settle_ends()) == 0
    assert world.events("task_end") == []


def test_a_begin_cut_short_by_a_crash_ends_on_record_after_the_restart(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> None:
    """The server dies after the task's row and begin event are stored, before its entry:
    the runtime never got the task. After the restart it must not stay active without an
    entry until its TTL runs out: it ends on record."""
    faulty = FaultInjectingDataStore(datastore)
    world = make_world(tmp_path, clock, faulty, ca_manager)
    faulty.inject(_Killed(), method="create_entry")
    with pytest.raises(_Killed):
        world.begin(ttl=3600)
    (row,) = world.store.list_tasks()
    assert row.active  # as the dead server left it

    world = _restarted(world, datastore)
    assert world.service.active_task(row.spiffe_id) is not None
    assert world.run(world.service.settle_ends()) == 0  # it may be a begin still under way
    clock.advance(61)
    assert world.run(world.service.settle_ends()) == 1
    assert world.service.active_task(row.spiffe_id) is None
    (ended,) = world.store.list_tasks()
    assert ended.state is TaskState.REVOKED
    (end,) = world.events("task_end")
    assert end["task_id"] == row.task_id
    assert "begin was cut short" in end["reason"]
    assert [e.spiffe_id for e in world.state.entries.by_id.values()] == [RUNTIME]
    assert world.run(world.service.settle_ends()) == 0
    assert world.audit.verify().ok


def _begun_by_an_older_server(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next begin as a server from before a task's row and its begin event were one
    transaction left it when it died between the two: the row stored alone."""

    def row_only(task: Any, _log: AuditLog, _begun: Any) -> None:
        world.store.put_task(task)
        raise _Killed()

    monkeypatch.setattr(world.store, "begin", row_only)


@pytest.mark.parametrize(
    ("dies_at", "reason"),
    [("older server", BEGIN_UNLOGGED), ("create_entry", BEGIN_CUT_SHORT)],
)
def test_a_begin_cut_short_before_its_event_is_on_the_log_begun_then_ended(
    tmp_path: Path,
    clock: FakeClock,
    any_datastore: DataStore,
    ca_manager: CaManager,
    monkeypatch: pytest.MonkeyPatch,
    *,
    dies_at: str,
    reason: str,
) -> None:
    """A row an older server stored before its begin event, then died: the sweep ended it
    with a task-end event, the log's only word of a task it never saw begin, and its reason
    said the begin lacked only its entry. The begin goes on the log first, from the row."""
    faulty = FaultInjectingDataStore(any_datastore)
    world = make_world(tmp_path, clock, faulty, ca_manager)
    if dies_at == "older server":
        _begun_by_an_older_server(world, monkeypatch)
    else:
        faulty.inject(_Killed(), method=dies_at)
    with pytest.raises(_Killed):
        world.begin(ttl=3600, goal_sha256="ab" * 32)
    monkeypatch.undo()
    (row,) = world.store.list_tasks()

    world = _restarted(world, any_datastore)
    clock.advance(61)
    assert world.run(world.service.settle_ends()) == 1
    task_events = [r for r in world.audit.store.audit_rows() if r["task_id"] == row.task_id]
    assert [e["kind"] for e in task_events] == ["task_begin", "task_end"]
    begun, ended = task_events
    assert ended["reason"] == reason
    assert (begun["decision"], begun["agent_id"], begun["node_id"]) == (
        row.decision,
        RUNTIME,
        AGENT,
    )
    assert begun["decision"].startswith("allow")
    assert (begun["action"], begun["resource"]) == ("read", "docs")
    extra = json.loads(begun["extra"])
    assert (extra["spiffe_id"], extra["goal_sha256"]) == (row.spiffe_id, "ab" * 32)
    assert ("recovered" in extra) == (dies_at == "older server")
    assert world.run(world.service.settle_ends()) == 0
    assert world.audit.verify().ok


def test_a_task_whose_entry_this_server_has_not_seen_yet_is_not_taken_for_a_cut_short_begin(
    world: World,
) -> None:
    """Servers sharing a datastore learn of each other's entries through the change feed: a
    follower behind (or down) must not make a live task look like a begin cut short."""
    task = world.begin(ttl=3600)
    world.state.apply_entries((), [task.entry_id])  # as if this server had not caught up
    world.clock.advance(61)
    assert world.run(world.service.settle_ends()) == 0
    assert world.service.active_task(task.spiffe_id) is not None
    assert world.events("task_end") == []


def test_an_end_whose_event_failed_is_finished_once_later(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> None:
    faulty = FaultInjectingDataStore(datastore)
    world = make_world(tmp_path, clock, faulty, ca_manager)
    task = world.begin()
    faulty.inject(StorageError("disk I/O error"), method="write_ledger")
    with pytest.raises(AuditError):
        world.run(world.service.end(world.agent, task.task_id, ()))
    assert world.events("task_end") == []
    assert world.service.active_task(task.spiffe_id) is None
    # Claimed, not settled: left for whichever server finishes ends, once it is surely stale.
    assert [t.task_id for t in world.store.unsettled(int(clock.now()) + 1)] == [task.task_id]
    assert world.run(world.service.settle_ends()) == 0
    clock.advance(61)
    assert world.run(world.service.settle_ends()) == 1
    (end,) = world.events("task_end")
    assert end["decision"] == "ended"
    assert world.store.unsettled(int(clock.now()) + 1) == []
    assert world.run(world.service.settle_ends()) == 0
    world.close()


def test_an_end_cut_short_after_its_event_is_not_recorded_twice(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = world.begin()
    entry = world.state.entries.by_id[task.entry_id]
    issued = world.mint_jwt(entry, ["docs"])
    settle = world.store.settle

    def dies(_task: Any) -> bool:
        raise StorageError("the server died here")

    monkeypatch.setattr(world.store, "settle", dies)
    with pytest.raises(StorageError):
        world.run(world.service.end(world.agent, task.task_id, ()))
    monkeypatch.setattr(world.store, "settle", settle)
    world.clock.advance(61)
    assert world.run(world.service.settle_ends()) == 1
    # Revoked and recorded once: what the first server did is not done again.
    assert len(world.events("task_end")) == 1
    assert [e["credential_id"] for e in world.events("revocation")] == [issued.jti]
    assert ("jwt_id", issued.jti) in {(r.kind, r.value) for r in world.state.revocations}
    assert world.store.unsettled(int(world.clock.now()) + 1) == []
    assert world.audit.verify().ok


def test_an_end_cut_short_between_its_revocations_and_their_events_records_them_later(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = world.begin()
    issued = world.mint_jwt(world.state.entries.by_id[task.entry_id], ["docs"])
    append_many = world.audit.append_many

    def dies(drafts: Any, **kw: Any) -> Any:
        if any(d.kind == "revocation" for d in drafts):
            raise StorageError("the server died here")
        return append_many(drafts, **kw)

    # The revocations are stored (and pushed); the server dies before their events commit.
    monkeypatch.setattr(world.audit, "append_many", dies)
    with pytest.raises(StorageError):
        world.run(world.service.end(world.agent, task.task_id, ()))
    monkeypatch.setattr(world.audit, "append_many", append_many)
    assert ("jwt_id", issued.jti) in {(r.kind, r.value) for r in world.state.revocations}
    assert world.events("revocation") == []
    world.clock.advance(61)
    assert world.run(world.service.settle_ends()) == 1
    # The revocation the first try stored is on the log too, once.
    assert [e["credential_id"] for e in world.events("revocation")] == [issued.jti]
    assert len(world.events("task_end")) == 1
    assert world.audit.verify().ok


# -- tasks begun or ended through another server (the change feed) --------------------------------


def test_a_task_row_read_before_its_end_here_does_not_make_it_active_again(world: World) -> None:
    task = world.begin()
    row_before_end = world.store.get_task(task.task_id)
    assert row_before_end is not None
    assert row_before_end.active
    world.run(world.service.end(world.agent, task.task_id, ()))
    # The change feed's follower may hold a row it read before the end: it changes nothing.
    world.service.apply_tasks({task.task_id: row_before_end})
    assert world.service.active_task(task.spiffe_id) is None


def test_tasks_begun_and_ended_elsewhere_follow_their_rows(world: World) -> None:
    task = world.begin()
    world.service.apply_tasks({task.task_id: None})  # gone (e.g. the row was pruned)
    assert world.service.active_task(task.spiffe_id) is None
    world.service.apply_tasks({task.task_id: task})  # begun through another server
    assert world.service.active_task(task.spiffe_id) == task
    ended = world.store.finish(task, TaskState.ENDED, int(world.clock.now()), "ended elsewhere")
    assert world.service.reload_tasks([task.task_id]) == {task.task_id: ended}
    assert world.service.reload_all_tasks() == {task.task_id: None}
    world.service.apply_tasks(world.service.reload_all_tasks())
    assert world.service.active_task(task.spiffe_id) is None


def test_an_exchange_decides_on_the_task_as_held_now_not_a_remembered_copy(world: World) -> None:
    # The service remembers each task's intent and split tools; a task held anew (as another
    # server left it, say) must be decided on as it is now.
    task = world.begin(tools=("docs#read_doc", "docs#list_docs"))
    _, grant = world.service.exchange_grant(task.spiffe_id, "docs")
    assert set(grant.scope.split()) == {"read", "tool:read_doc", "tool:list_docs"}
    narrowed = dataclasses.replace(task, tools=("docs#read_doc",))
    world.service._set_active(narrowed, True)
    _, grant = world.service.exchange_grant(task.spiffe_id, "docs")
    assert set(grant.scope.split()) == {"read", "tool:read_doc"}


def test_a_revocation_reason_quoting_a_token_is_refused_before_anything_is_done(
    world: World,
) -> None:
    task = world.begin()
    entry = world.state.entries.by_id[task.entry_id]
    issued = world.mint_jwt(entry, ["docs"])
    # An operator pastes the leaked token into the reason: the audit log must not keep it.
    with pytest.raises(SecretInAuditError, match="reason looks like a JWT"):
        world.run(world.service.revoke(task.task_id, f"leaked: {issued.token}"))
    # Nothing half done: no end without its events, left for settle_ends to fail on for ever.
    assert world.service.active_task(task.spiffe_id) is not None
    assert world.store.unsettled(int(world.clock.now()) + 3600) == []
    assert world.events("revocation") == []
    world.run(world.service.revoke(task.task_id, "its token leaked"))
    assert [e["credential_id"] for e in world.events("revocation")] == [issued.jti]
    (end,) = world.events("task_end")
    assert end["reason"] == "its token leaked"
    assert world.audit.verify().ok


# -- an agent's removal cut short ------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def any_datastore(
    request: pytest.FixtureRequest, clock: FakeClock, datastore: SqliteDataStore
) -> Iterator[DataStore]:
    """The task world's datastore on either backend (the CA keeps its keys on SQLite)."""
    if request.param == "sqlite":
        yield datastore
        return
    from server.datastore.postgres import PostgresDataStore

    store = PostgresDataStore(request.getfixturevalue("postgres_dsn"), clock)
    yield store
    store.close()


def _dies_before_agent_revocation_events(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server dies once the agent's own revocations are stored, before their events."""
    append_many = world.audit.append_many

    def dies(drafts: Any, **kw: Any) -> Any:
        if any(d.kind == "revocation" and d.task_id is None for d in drafts):
            raise _Killed()
        return append_many(drafts, **kw)

    monkeypatch.setattr(world.audit, "append_many", dies)


def test_an_eviction_cut_short_before_its_revocation_events_is_finished_by_a_retry(
    tmp_path: Path,
    clock: FakeClock,
    any_datastore: DataStore,
    ca_manager: CaManager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = make_world(tmp_path, clock, any_datastore, ca_manager)
    task = world.begin()
    in_task = world.mint_jwt(world.state.entries.by_id[task.entry_id], ["docs"])
    plain = format(issue_x509(world, RUNTIME).serial_number, "x")
    (runtime_entry,) = [e for e in world.state.entries.by_id.values() if e.spiffe_id == RUNTIME]
    jwt = world.mint_jwt(runtime_entry, ["docs"])
    _dies_before_agent_revocation_events(world, monkeypatch)
    world.run(world.state.evict_agent(AGENT))
    with pytest.raises(_Killed):
        world.run(world.service.revoke_agent(AGENT, "agent evicted"))
    monkeypatch.undo()
    revoked = {r.value for r in world.state.revocations}
    assert {in_task.jti, plain, jwt.jti} <= revoked
    assert [e["credential_id"] for e in world.events("revocation")] == [in_task.jti]

    # Restarted, the operator evicts again: the agent is gone, its revocations are stored,
    # and still the retry has work to do: their events.
    world = _restarted(world, any_datastore)
    removals = AgentRemovals(world.state, world.service, world.clock)
    assert world.run(removals.retried(AGENT, "agent evicted"))
    events = world.events("revocation")
    assert sorted(e["credential_id"] for e in events) == sorted([in_task.jti, plain, jwt.jti])
    assert {e["node_id"] for e in events} == {AGENT}
    assert len(world.events("agent_evicted")) == 1
    assert len(world.events("task_end")) == 1
    # Then nothing is left: a second retry is NOT_FOUND (admin_api), and logs nothing more.
    assert not world.run(removals.retried(AGENT, "agent evicted"))
    assert len(world.events("revocation")) == 3
    assert world.audit.verify().ok


def test_an_agent_evicted_again_after_it_attested_again_is_logged_again(world: World) -> None:
    """A retried removal logs its eviction once; a new one (the agent came back) is new."""
    removals = AgentRemovals(world.state, world.service, world.clock)
    issue_x509(world, RUNTIME)
    world.run(removals.carry_out(world.run(world.state.evict_agent(AGENT))))
    world.run(world.service.revoke_agent(AGENT, "agent evicted"))  # a retry: nothing new
    assert len(world.events("agent_evicted")) == 1
    world.audit.append(EventKind.NODE_ATTESTATION, agent_id=AGENT, node_id=AGENT, decision="allow")
    world.run(world.state.save_agent(world.agent, None))
    issue_x509(world, RUNTIME)
    world.run(removals.carry_out(world.run(world.state.evict_agent(AGENT))))
    assert len(world.events("agent_evicted")) == 2
    assert len(world.events("revocation")) == 2


def test_an_admission_denied_after_its_allow_does_not_hide_the_agents_removal(
    world: World,
) -> None:
    """The agent was removed while its admission's allow was committed: the save refused it
    and a deny of the same SVID followed (AgentAdmission.admit). That agent did not come back,
    so the removal's eviction on the log is still its own, and a finisher logs it once."""
    issue_x509(world, RUNTIME)
    world.run(world.state.evict_agent(AGENT))
    world.run(world.service.revoke_agent(AGENT, "agent evicted"))
    fields = {"agent_id": AGENT, "node_id": AGENT, "credential_id": "5e"}
    world.audit.append(EventKind.NODE_ATTESTATION, decision="allow", **fields)
    world.audit.append(EventKind.NODE_ATTESTATION, decision="deny", reason="removed", **fields)
    world.run(world.service.revoke_agent(AGENT, "agent evicted"))  # the removal finished again
    assert len(world.events("agent_evicted")) == 1


def test_an_eviction_logged_between_an_allow_and_the_deny_voiding_it_is_not_logged_again(
    world: World,
) -> None:
    """The agent attests again and its allow is committed; the operator's eviction commits and
    is logged; then the save refuses that SVID (a deny of it). The eviction is on the log all
    the same: the removal run again (cut short, retried) does not log it twice."""
    fields = {"agent_id": AGENT, "node_id": AGENT}
    world.audit.append(EventKind.NODE_ATTESTATION, decision="allow", credential_id="51", **fields)
    world.audit.append(EventKind.NODE_ATTESTATION, decision="allow", credential_id="52", **fields)
    world.run(world.service.revoke_agent(AGENT, "agent evicted"))
    world.audit.append(
        EventKind.NODE_ATTESTATION, decision="deny", reason="removed", credential_id="52", **fields
    )
    world.run(world.service.revoke_agent(AGENT, "agent evicted"))
    assert len(world.events("agent_evicted")) == 1


# -- an agent's removal cut short, finished by housekeeping ----------------------------------------


def _dies_before_the_removal_event(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server dies once the agent's row is written, before anything is revoked."""
    append_many = world.audit.append_many

    def dies(drafts: Any, **kw: Any) -> Any:
        if any(d.kind in ("agent_evicted", "agent_banned") for d in drafts):
            raise _Killed()
        return append_many(drafts, **kw)

    monkeypatch.setattr(world.audit, "append_many", dies)


def _holdings(world: World) -> tuple[Any, set[str]]:
    """A task with a JWT-SVID, and a workload X.509- and JWT-SVID, through the agent."""
    task = world.begin()
    in_task = world.mint_jwt(world.state.entries.by_id[task.entry_id], ["docs"])
    plain = format(issue_x509(world, RUNTIME).serial_number, "x")
    (runtime_entry,) = [e for e in world.state.entries.by_id.values() if e.spiffe_id == RUNTIME]
    jwt = world.mint_jwt(runtime_entry, ["docs"])
    return task, {in_task.jti, plain, jwt.jti}


@pytest.mark.parametrize(
    "case",
    [
        ("evict", "revocation events"),
        ("evict", "removal event"),
        ("ban", "revocation events"),
        ("ban", "removal event"),
    ],
)
def test_a_removal_cut_short_is_finished_by_housekeeping_after_a_restart(
    tmp_path: Path,
    clock: FakeClock,
    any_datastore: DataStore,
    ca_manager: CaManager,
    monkeypatch: pytest.MonkeyPatch,
    *,
    case: tuple[str, str],
) -> None:
    """The server dies midway through an eviction or a ban; restarted, nobody retries. The
    housekeeping run finishes it once it is a minute old (younger, it may be another live
    server's): every credential the agent held revoked, each on the log once."""
    removal, dies_at = case
    world = make_world(tmp_path, clock, any_datastore, ca_manager)
    task, held = _holdings(world)
    if dies_at == "revocation events":
        _dies_before_agent_revocation_events(world, monkeypatch)
    else:
        _dies_before_the_removal_event(world, monkeypatch)
    remove = world.state.evict_agent if removal == "evict" else world.state.ban_agent
    stored = world.run(remove(AGENT))
    with pytest.raises(_Killed):
        world.run(AgentRemovals(world.state, world.service, clock).carry_out(stored))
    monkeypatch.undo()

    world = _restarted(world, any_datastore)
    removals = AgentRemovals(world.state, world.service, clock)
    assert world.run(removals.finish_cut_short()) == 0  # it may be a removal under way
    clock.advance(61)
    assert world.run(removals.finish_cut_short()) == 1
    assert held <= {r.value for r in world.state.revocations}
    events = world.events("revocation")
    assert sorted(e["credential_id"] for e in events) == sorted(held)
    assert {e["node_id"] for e in events} == {AGENT}
    kind = "agent_evicted" if removal == "evict" else "agent_banned"
    assert len(world.events(kind)) == 1
    (end,) = world.events("task_end")
    assert end["task_id"] == task.task_id
    assert any_datastore.list_removals(2**62) == []
    # Done: a later run finds nothing, and logs nothing more.
    clock.advance(61)
    assert world.run(removals.finish_cut_short()) == 0
    assert len(world.events("revocation")) == len(held)
    assert world.audit.verify().ok


def test_an_agent_is_not_admitted_again_before_its_removal_cut_short_is_finished(
    tmp_path: Path,
    clock: FakeClock,
    any_datastore: DataStore,
    ca_manager: CaManager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Were it admitted, the finisher would list what the new admission was issued with what
    the removed agent held, and revoke it all: it is refused until the removal is done."""
    world = make_world(tmp_path, clock, any_datastore, ca_manager)
    _, held = _holdings(world)
    _dies_before_the_removal_event(world, monkeypatch)
    stored = world.run(world.state.evict_agent(AGENT))
    with pytest.raises(_Killed):
        world.run(AgentRemovals(world.state, world.service, clock).carry_out(stored))
    monkeypatch.undo()
    world = _restarted(world, any_datastore)
    with pytest.raises(RemovalUnderWayError, match=AGENT):
        world.run(world.state.save_agent(world.agent, None))
    assert AGENT not in world.state.agents

    clock.advance(61)
    removals = AgentRemovals(world.state, world.service, clock)
    assert world.run(removals.finish_cut_short()) == 1
    # Finished: the agent comes back, and what it is issued now stays good.
    world.run(world.state.save_agent(world.agent, None))
    fresh = format(issue_x509(world, RUNTIME).serial_number, "x")
    clock.advance(61)
    assert world.run(removals.finish_cut_short()) == 0
    revoked = {r.value for r in world.state.revocations}
    assert held <= revoked
    assert fresh not in revoked


def test_a_retried_eviction_finishes_the_removal_under_way_and_forgets_it(
    tmp_path: Path,
    clock: FakeClock,
    datastore: SqliteDataStore,
    ca_manager: CaManager,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The operator's retry (admin_api: the agent is not found) does at once what housekeeping
    would a minute on, removal event included when the agent held nothing."""
    world = make_world(tmp_path, clock, datastore, ca_manager)
    _dies_before_the_removal_event(world, monkeypatch)
    stored = world.run(world.state.evict_agent(AGENT))
    with pytest.raises(_Killed):
        world.run(AgentRemovals(world.state, world.service, clock).carry_out(stored))
    monkeypatch.undo()
    removals = AgentRemovals(world.state, world.service, clock)
    assert world.run(removals.retried(AGENT, "agent evicted"))
    assert len(world.events("agent_evicted")) == 1
    assert datastore.list_removals(2**62) == []
    assert not world.run(removals.retried(AGENT, "agent evicted"))  # then NOT_FOUND
    clock.advance(61)
    assert world.run(removals.finish_cut_short()) == 0
    assert len(world.events("agent_evicted")) == 1


# -- one removal, two servers finishing it -------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def two_stores(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore
) -> Iterator[tuple[DataStore, DataStore]]:
    """Two servers' own datastores on one database (the CA keeps its keys on SQLite)."""
    if request.param == "sqlite":
        other = SqliteDataStore(tmp_path / "datastore.sqlite3", clock)
        yield datastore, other
        other.close()
        return
    from server.datastore.postgres import PostgresDataStore

    dsn = request.getfixturevalue("postgres_dsn")
    first, second = PostgresDataStore(dsn, clock), PostgresDataStore(dsn, clock)
    yield first, second
    first.close()
    second.close()


class TwoServers(NamedTuple):
    """Server A (world) on the first of two_stores, its agent holding `held` (_holdings), and
    the datastores of A and of B (a server of its own: _restarted on it)."""

    world: World
    held: set[str]
    store_a: DataStore
    store_b: DataStore


@pytest.fixture
def two_servers(
    tmp_path: Path,
    clock: FakeClock,
    two_stores: tuple[DataStore, DataStore],
    ca_manager: CaManager,
) -> TwoServers:
    store_a, store_b = two_stores
    world = make_world(tmp_path, clock, store_a, ca_manager)
    _, held = _holdings(world)
    return TwoServers(world, held, store_a, store_b)


def _held_before_agent_revocation_events(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event]:
    """The removal of an agent with very much to revoke: the agent's own revocations are
    stored, their events wait until the test releases them. (reached, release)"""
    reached, release = threading.Event(), threading.Event()
    append_many = world.audit.append_many

    def held(drafts: Any, **kw: Any) -> Any:
        if any(d.kind == "revocation" and d.task_id is None for d in drafts):
            reached.set()
            assert release.wait(20)
        return append_many(drafts, **kw)

    monkeypatch.setattr(world.audit, "append_many", held)
    return reached, release


def _logged_once(world: World, held: set[str]) -> None:
    events = world.events("revocation")
    assert sorted(e["credential_id"] for e in events) == sorted(held)  # each once
    assert len(world.events("agent_evicted")) == 1
    assert len(world.events("task_end")) == 1
    assert world.audit.store.list_removals(2**62) == []  # type: ignore[attr-defined]
    assert world.audit.verify().ok


@pytest.mark.parametrize("second", ["housekeeping", "retry"])
def test_two_servers_finishing_one_removal_log_each_revocation_once(
    clock: FakeClock,
    two_servers: TwoServers,
    monkeypatch: pytest.MonkeyPatch,
    *,
    second: str,
) -> None:
    """An operator's eviction on server A runs past the grace (very much to revoke); server
    B's housekeeping, or the operator's retry on B, comes upon it. A's claim, renewed as it
    works, keeps B from finishing it too: B's housekeeping leaves it, B's retry waits for it,
    and every revocation is logged once."""
    world, held, _, store_b = two_servers
    reached, release = _held_before_agent_revocation_events(world, monkeypatch)
    claims_on_a: list[float] = []  # when A's claim, or a renewal of it, was taken (clock time)
    for name in ("claim_removal", "renew_removal_claim"):
        taking = getattr(world.state, name)

        async def counted(*args: Any, _taking: Any = taking) -> bool:
            when = clock.now()
            taken = bool(await _taking(*args))
            if taken:
                claims_on_a.append(when)
            return taken

        monkeypatch.setattr(world.state, name, counted)
    other = _restarted(world, store_b)
    quick = {"renew_every": 0.01, "wait_every": 0.01}
    on_a = AgentRemovals(world.state, world.service, clock, holder="a", **quick)  # type: ignore[arg-type]
    on_b = AgentRemovals(other.state, other.service, clock, holder="b", **quick)  # type: ignore[arg-type]

    async def scenario() -> None:
        removal = await world.state.evict_agent(AGENT)
        evicting = asyncio.create_task(on_a.carry_out(removal))
        assert await asyncio.to_thread(reached.wait, 20)  # revoked on A, not yet logged
        clock.advance(61)  # past the grace, and past the claim's first life
        async with asyncio.timeout(20):
            while claims_on_a and claims_on_a[-1] < clock.now():  # A renews it, as it works
                await asyncio.sleep(0.01)
        retrying = None
        if second == "housekeeping":
            assert await on_b.finish_cut_short() == 0  # A's to finish
        else:
            retrying = asyncio.create_task(on_b.retried(AGENT, "agent evicted"))
            await asyncio.sleep(0.2)
            assert not retrying.done()  # waiting for A, as for its own
        release.set()
        await asyncio.wait_for(evicting, 20)
        if retrying is not None:
            assert await asyncio.wait_for(retrying, 20)  # done: A finished it

    world.run(scenario())
    _logged_once(world, held)


def test_a_removal_whose_finisher_died_is_taken_over_once_its_claim_lapses(
    clock: FakeClock,
    two_servers: TwoServers,
) -> None:
    """Server A claimed the removal and died before revoking anything (no renewal, no
    release). While its claim runs, B's housekeeping leaves the removal alone and the
    operator's retry on B waits; once it lapses, the retry takes it over and finishes it."""
    world, held, store_a, store_b = two_servers
    world.run(world.state.evict_agent(AGENT))
    assert store_a.claim_removal(AGENT, "a", int(clock.now()), 300)
    other = _restarted(world, store_b)
    on_b = AgentRemovals(other.state, other.service, clock, holder="b", wait_every=0.01)
    clock.advance(61)
    assert world.run(on_b.finish_cut_short()) == 0
    assert world.events("revocation") == []

    async def retry() -> bool:
        retrying = asyncio.create_task(on_b.retried(AGENT, "agent evicted"))
        await asyncio.sleep(0.2)
        assert not retrying.done()
        clock.advance(240)  # A's claim lapses
        return await asyncio.wait_for(retrying, 20)

    assert world.run(retry())
    _logged_once(world, held)
    clock.advance(61)
    assert world.run(on_b.finish_cut_short()) == 0


def test_a_finisher_that_lost_its_claim_logs_nothing_more(
    clock: FakeClock,
    two_servers: TwoServers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Server A's finisher stalls with its log write of the agent's revocations in flight (the
    revocations stored); its claim lapses unrenewed, and B's housekeeping takes the removal
    over and finishes it, logging them. A's write, let go then, is refused: its claim is B's
    now, and each revocation is on the log once, by the holder of the claim."""
    world, held, _, store_b = two_servers
    reached, release = _held_before_agent_revocation_events(world, monkeypatch)
    # A stalled server: it does not renew its claim in time.
    stalled = {"renew_every": 3600.0, "wait_every": 0.01}
    on_a = AgentRemovals(world.state, world.service, clock, holder="a", **stalled)  # type: ignore[arg-type]

    async def scenario() -> None:
        removal = await world.state.evict_agent(AGENT)
        evicting = asyncio.create_task(on_a.carry_out(removal))
        assert await asyncio.to_thread(reached.wait, 20)  # revoked on A, the write in flight
        other = _restarted(world, store_b)
        on_b = AgentRemovals(other.state, other.service, clock, holder="b", wait_every=0.01)
        clock.advance(61)  # past the grace, and past A's claim
        assert await on_b.finish_cut_short() == 1
        release.set()
        await asyncio.wait_for(evicting, 20)  # A leaves the rest to B: done there

    world.run(scenario())
    _logged_once(world, held)


def test_a_finisher_whose_claim_was_taken_over_does_not_claim_it_back_under_its_stalled_write(
    clock: FakeClock,
    two_servers: TwoServers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Server A's finisher stalls with its log write of the agent's revocations in flight; B
    takes the lapsed claim over, logs those revocations, and fails before ending the removal
    (its claim let go). A's next renewal must not take the claim back as if it had been A's
    all along: its stalled write would then commit under it, each revocation logged twice.
    A gives up instead (B's claim came between), finishes what is left under a new claim of
    its own, and its stalled write is refused."""
    world, held, _, store_b = two_servers
    reached, release = _held_before_agent_revocation_events(world, monkeypatch)
    other = _restarted(world, store_b)

    async def dies_before_its_end(removal: Any) -> bool:
        raise StorageError("server B died before ending the removal")

    monkeypatch.setattr(other.state, "end_removal", dies_before_its_end)
    on_a = AgentRemovals(
        world.state, world.service, clock, holder="a", claim_ttl=30, renew_every=0.01
    )
    on_b = AgentRemovals(other.state, other.service, clock, holder="b", wait_every=0.01)
    # A's tries to keep (or take) its claim: (clock time at the call, the answer).
    kept_since: list[float] = []
    tried = asyncio.Event()
    for name in ("claim_removal", "renew_removal_claim"):  # the latter: with the fix only
        original = getattr(world.state, name, None)
        if original is None:
            continue

        async def counted(*args: Any, _original: Any = original) -> bool:
            when = clock.now()
            taken = bool(await _original(*args))
            if kept_since and when >= kept_since[0]:
                tried.set()
            return taken

        monkeypatch.setattr(world.state, name, counted)

    def b_takes_over() -> None:
        # In a thread with its own loop, A's loop waiting for it: A cannot see B's claim
        # while it runs, only what B leaves.
        assert asyncio.run(on_b.finish_cut_short()) == 0  # B's end failed

    async def scenario() -> None:
        removal = await world.state.evict_agent(AGENT)
        evicting = asyncio.create_task(on_a.carry_out(removal))
        assert await asyncio.to_thread(reached.wait, 20)  # revoked on A, the write in flight
        clock.advance(61)  # past the grace, and past A's claim
        taking_over = threading.Thread(target=b_takes_over)
        taking_over.start()
        taking_over.join(20)  # A's loop held
        assert not taking_over.is_alive()
        assert sorted(e["credential_id"] for e in world.events("revocation")) == sorted(held)
        kept_since.append(clock.now())
        await asyncio.wait_for(tried.wait(), 20)  # A tried to keep its claim since
        release.set()
        await asyncio.wait_for(evicting, 20)

    world.run(scenario())
    _logged_once(world, held)


def test_two_retries_of_a_removal_that_left_no_record_finish_it_under_one_claim(
    clock: FakeClock,
    two_servers: TwoServers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An eviction left the agent gone and what it held live, and no removal stored (a server
    from before removals were stored did it). The operator's retries on A and on B at once
    (admin_api's _finish_removal) finish it as any removal is, under one claim: B's waits for
    A's, and each revocation is logged once, where both finished it unclaimed."""
    world, held, store_a, store_b = two_servers
    assert store_a.end_removal(world.run(world.state.evict_agent(AGENT)))  # no record of it
    reached, release = _held_before_agent_revocation_events(world, monkeypatch)
    other = _restarted(world, store_b)
    on_a = AgentRemovals(world.state, world.service, clock, holder="a", wait_every=0.01)
    on_b = AgentRemovals(other.state, other.service, clock, holder="b", wait_every=0.01)

    async def scenario() -> None:
        retry_a = asyncio.create_task(on_a.retried(AGENT, REMOVAL_EVICTED))
        assert await asyncio.to_thread(reached.wait, 20)  # A revoked, logging
        retry_b = asyncio.create_task(on_b.retried(AGENT, REMOVAL_EVICTED))
        await asyncio.sleep(0.2)
        assert not retry_b.done()  # waiting for A's finisher
        release.set()
        assert await asyncio.wait_for(retry_a, 20)
        assert await asyncio.wait_for(retry_b, 20)

    world.run(scenario())
    _logged_once(world, held)
    assert not world.run(on_a.retried(AGENT, REMOVAL_EVICTED))  # nothing left: NOT_FOUND


def test_a_server_clock_running_ahead_does_not_prune_the_credential_records_an_end_needs(
    world: World,
) -> None:
    """Two servers on one datastore, the other's clock 30 s ahead. Its housekeeping deletes
    credential records at exp + MAX_VERIFIER_LEEWAY by its clock; an end through this server,
    20 s before that by this server's (and the verifiers') clock, then finds no record of the
    JWT and does not revoke it, while a verifier at that leeway still takes it."""
    task = world.begin(ttl=3600)
    entry = world.state.entries.by_id[task.entry_id]
    issued = world.mint_jwt(entry, ["docs"])
    ahead = FakeClock(issued.expires_at + MAX_VERIFIER_LEEWAY + 10)
    other = TaskService(
        state=world.state,
        store=TaskStore(world.audit.store),  # type: ignore[arg-type]
        policy=world.service.policy,
        audit=world.audit,
        ca=world.ca,
        server_id="spiffe://example.org/svid/server",
        clock=ahead,
    )
    other.load()
    world.clock.set(issued.expires_at + MAX_VERIFIER_LEEWAY - 20)
    world.run(other.housekeeping())
    assert world.service.active_task(task.spiffe_id) is not None  # still running: not expired
    world.run(world.service.end(world.agent, task.task_id, [RUNTIME]))
    assert ("jwt_id", issued.jti) in {(r.kind, r.value) for r in world.state.revocations}


def test_a_fresh_crl_is_taken_by_a_relying_party_whose_clock_is_a_few_seconds_behind(
    world: World,
) -> None:
    """SVIDs are backdated 10 s for clock skew between machines (ca/signer.py); the CRLs are
    not: their thisUpdate is the server's now. OpenSSL with CRL checks refuses a CRL whose
    thisUpdate is in its future, so a relying party 5 s behind the server refuses every
    unrevoked SVID for those 5 s after each revocation (each one signs the CRLs again)."""
    leaf = issue_x509(world, RUNTIME)  # not revoked
    task = world.begin()
    issue_x509(world, task.spiffe_id)
    world.run(world.service.end(world.agent, task.task_id, [RUNTIME]))
    crls = world.service.crl()
    assert crls
    ca_cert = world.ca.x509_signer().ca_certificate
    behind = world.clock.now() - 5
    result = openssl_verify(world.tmp, leaf, [ca_cert], at=behind, crls=crls)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tasks_ended_early_through_another_server_count_here_though_never_seen_active(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> None:
    """Two servers on one datastore: a runtime beginning and ending each task at once through
    one, and the other reading the rows only once ended (never active there), left the
    other's count at 0: each server listed ten times the cap of ended tasks, so a runtime
    spreading its begins over the servers multiplied the bound by their number."""
    settings = TaskSettings(max_active_per_runtime=1)
    world = make_world(tmp_path, clock, datastore, ca_manager, settings=settings)
    other = _restarted(world, datastore, settings)
    try:
        ids = []
        for _ in range(ENDED_PER_ACTIVE):
            task = world.begin(ttl=60)
            world.run(world.service.end(world.agent, task.task_id, [RUNTIME]))
            ids.append(task.task_id)
        other.service.apply_tasks(other.service.reload_tasks(ids))
        other.service.apply_tasks(other.service.reload_tasks(ids))  # read again: once
        world.service.apply_tasks(world.service.reload_tasks(ids))  # its own ends: once
        assert other.service._ended_early(AGENT, RUNTIME) == ENDED_PER_ACTIVE
        assert world.service._ended_early(AGENT, RUNTIME) == ENDED_PER_ACTIVE
        with pytest.raises(RateLimitedError, match="before their expiry"):
            other.begin(ttl=60)
    finally:
        world.close()


def test_the_count_of_tasks_ended_early_forgets_them_once_they_expire(
    tmp_path: Path, clock: FakeClock, datastore: SqliteDataStore, ca_manager: CaManager
) -> None:
    """Each runtime's tasks ended before their expiry are counted until then; a runtime that
    begins no more must not leave its count held for good (one per runtime and node)."""
    settings = TaskSettings(max_active_per_runtime=1)
    world = make_world(tmp_path, clock, datastore, ca_manager, settings=settings)
    try:
        task = world.begin(ttl=60)
        world.run(world.service.end(world.agent, task.task_id, [RUNTIME]))
        assert world.service._ended_early(AGENT, RUNTIME) == 1
        clock.advance(61)
        world.run(world.service.housekeeping())
        assert world.service._listed == {}
    finally:
        world.close()


def test_a_task_ends_once_its_runtimes_entry_expires_after_its_expiry_was_moved_earlier(
    world: World,
) -> None:
    """A begin caps a task's TTL at its runtime's entry's expiry, but an operator moving that
    expiry earlier afterwards left the task, and its entry's SVIDs, going on past it."""
    (runtime,) = [e for e in world.state.entries.by_id.values() if e.spiffe_id == RUNTIME]
    task = world.begin(ttl=600)
    expiry = int(world.clock.now()) + 30
    world.run(world.state.update_entry(dataclasses.replace(runtime, expires_at=expiry)))
    assert world.run(world.service.end_unentitled()) == 0
    world.clock.advance(31)
    assert world.run(world.service.end_unentitled()) == 1
    stored = world.store.get_task(task.task_id)
    assert stored is not None
    assert stored.state is TaskState.REVOKED
    assert f"runtime's entry {runtime.id}" in stored.end_reason
