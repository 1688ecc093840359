"""Access tokens traded for a workload's JWT-SVID at the token endpoint of a running server are
revoked with the rest of what its node agent holds when the agent is evicted or banned; an
assertion of a trusted foreign issuer is of no agent of ours. A delegated token (a workload
acting for a task) is revoked with either agent: the task's, or the acting workload's."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from server.ca.sealing import KeyEncryptionKey
from server.datastore.errors import StorageError
from server.datastore.records import REVOKED_JWT_ID, EventFilter
from server.oauth.discovery import JWT_BEARER
from server.oauth.grants import Grants
from svid import AccessTokenVerifier, MemoryBundleSource, RevocationSet, Revoked, RevokedError
from svid._jwk import public_key_members
from svid._proto import admin_pb2, node_pb2
from tests.server.fixtures import Agent
from tests.server.oauth.conftest import OTHER_RESOURCE, RESOURCE, OAuthServer, serving_oauth
from tests.server.oauth.test_token_delegation import MCP_ID, OTHER_ID, THIRD, delegate
from tests.server.oauth.test_token_exchange import TaskWorld, begin_task

WORKLOAD_PATH = "/billing/reporter"
PARTNER_ID = "spiffe://partner.org/ci/deployer"


def _jwt_svid(server: OAuthServer, agent: Agent, entry_id: str) -> str:
    """A JWT-SVID for the token endpoint, minted for the workload through its agent."""
    request = node_pb2.NewJWTSVIDRequest(entry_id=entry_id, audience=[server.issuer])
    return str(server.running.node_stub(agent).NewJWTSVID(request, timeout=10).token)


def _access_token(server: OAuthServer, assertion: str) -> str:
    form = {"grant_type": JWT_BEARER, "assertion": assertion, "resource": RESOURCE}
    reply = httpx.post(server.issuer + "/token", data=form, verify=server.ssl_context())
    assert reply.status_code == 200, reply.text
    return str(reply.json()["access_token"])


def _jti(token: str) -> str:
    return _jti_exp(token)[0]


def _jti_exp(token: str) -> tuple[str, int, str]:
    """What the token endpoint looks a token's record up by: its jti, exp and sub."""
    claims = pyjwt.decode(token, options={"verify_signature": False})
    return str(claims["jti"]), int(claims["exp"]), str(claims["sub"])


def _verifier(
    server: OAuthServer, revocations: RevocationSet, audience: str = RESOURCE
) -> AccessTokenVerifier:
    bundle = server.running.server.ca.bundle()
    return AccessTokenVerifier(
        MemoryBundleSource.of(bundle).jwt_bundle_for,
        issuer=server.issuer,
        audience=audience,
        trust_domain=bundle.trust_domain,
        revocations=revocations,
    )


@pytest.mark.parametrize("removal", ["EvictAgent", "BanAgent"])
def test_an_access_token_traded_for_a_workloads_jwt_svid_is_revoked_with_its_agent(
    removal: str,
) -> None:
    with serving_oauth("oar", [RESOURCE]) as server:
        running = server.running
        agent = running.attest()
        entry = running.create_entry(WORKLOAD_PATH, agent.spiffe_id)
        token = _access_token(server, _jwt_svid(server, agent, entry.id))
        jti = _jti(token)
        revocations = RevocationSet()
        verifier = _verifier(server, revocations)
        assert verifier.verify(token).subject == entry.spiffe_id

        request = getattr(admin_pb2, f"{removal}Request")(spiffe_id=agent.spiffe_id)
        getattr(running.admin(), removal)(request, timeout=10)

        revoked = [r for r in running.server.state.revocations if r.value == jti]
        assert [(r.kind, r.spiffe_id) for r in revoked] == [(REVOKED_JWT_ID, entry.spiffe_id)]
        revocations.add([Revoked(r.kind, r.value, r.expires_at) for r in revoked])
        with pytest.raises(RevokedError):
            verifier.verify(token)
        store = running.server.tasks.audit.store
        events = store.audit_rows(EventFilter(kind="revocation", node_id=agent.spiffe_id))
        assert [e["agent_id"] for e in events if e["credential_id"] == jti] == [entry.spiffe_id]


@pytest.mark.parametrize("removal", ["EvictAgent", "BanAgent"])
def test_a_token_granted_while_its_agent_is_removed_does_not_leave(
    removal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The grant checked the assertion (its JWT-SVID not revoked yet) before the removal
    committed, and reaches the ledger after the removal read what the agent holds: a token
    recorded then would never be revoked. It is refused, on record, and nothing is issued."""
    with serving_oauth("oag", [RESOURCE]) as server:
        running = server.running
        agent = running.attest()
        entry = running.create_entry(WORKLOAD_PATH, agent.spiffe_id)
        assertion = _jwt_svid(server, agent, entry.id)
        minting, release = threading.Event(), threading.Event()
        mint = Grants._mint

        def held(self: Grants, *args: Any, **kwargs: Any) -> Any:
            minting.set()
            release.wait(20)
            return mint(self, *args, **kwargs)

        monkeypatch.setattr(Grants, "_mint", held)
        form = {"grant_type": JWT_BEARER, "assertion": assertion, "resource": RESOURCE}
        replies: list[httpx.Response] = []

        def post() -> None:
            context = server.ssl_context()
            replies.append(httpx.post(server.issuer + "/token", data=form, verify=context))

        poster = threading.Thread(target=post)
        poster.start()
        try:
            assert minting.wait(10)
            request = getattr(admin_pb2, f"{removal}Request")(spiffe_id=agent.spiffe_id)
            getattr(running.admin(), removal)(request, timeout=10)  # revoked what it held
        finally:
            release.set()
            poster.join(30)
        (reply,) = replies
        if reply.status_code == 200:  # then it must at least have been revoked
            revoked = {r.value for r in running.server.state.revocations}
            assert _jti(reply.json()["access_token"]) in revoked, "a live token of a removed agent"
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"] == "invalid_grant"
        assert "evicted or banned" in reply.json()["error_description"]
        store = running.server.tasks.audit.store
        refused = store.audit_rows(EventFilter(kind="oauth_jwt_bearer", decision="deny"))
        assert [e["reason"] for e in refused if "evicted or banned" in e["reason"]]
        held_now = store.agent_credentials(agent.spiffe_id, 0)
        assert {c.spiffe_id for c in held_now} == {entry.spiffe_id}  # the JWT-SVID alone


def _partner_assertion(key: ec.EllipticCurvePrivateKey, server: OAuthServer, jti: str) -> str:
    """A JWT-SVID of the trusted partner domain, whose issuer chose its `jti`."""
    now, audience = int(server.running.clock.now()), server.issuer
    claims = {"sub": PARTNER_ID, "aud": audience, "iat": now, "exp": now + 120, "jti": jti}
    return pyjwt.encode(claims, key, algorithm="ES256", headers={"kid": "p1", "typ": "JWT"})


def test_an_assertion_of_a_trusted_foreign_issuer_is_of_no_agent(tmp_path: Path) -> None:
    """Its jti is the foreign issuer's to choose, even one of ours: the token it buys is not
    taken for a credential of our agent (nor revoked by that agent's eviction)."""
    key = ec.generate_private_key(ec.SECP256R1())
    member: dict[str, Any] = {**public_key_members(key.public_key()), "kid": "p1"}
    bundle = tmp_path / "partner.jwks"
    bundle.write_text(json.dumps({"keys": [{**member, "use": "jwt-svid"}]}))
    with serving_oauth(
        "oaf", [RESOURCE], oauth_trusted_bundles=[f"partner.org={bundle}"]
    ) as server:
        running = server.running
        agent = running.attest()
        entry = running.create_entry(WORKLOAD_PATH, agent.spiffe_id)
        ours = _jti(_jwt_svid(server, agent, entry.id))
        token = _access_token(server, _partner_assertion(key, server, ours))
        store = running.server.datastore
        recorded = store.workload_jwt(*_jti_exp(token))
        assert recorded is not None
        assert (recorded.spiffe_id, recorded.agent_id) == (PARTNER_ID, "")
        assert ours in {c.value for c in store.agent_credentials(agent.spiffe_id, 0)}


def test_no_token_leaves_while_the_assertions_record_cannot_be_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A token recorded with no agent would outlive the agent's eviction: refused as
    unavailable instead, and the assertion, not used up, buys the token once the read works."""
    with serving_oauth("oau", [RESOURCE]) as server:
        running = server.running
        agent = running.attest()
        entry = running.create_entry(WORKLOAD_PATH, agent.spiffe_id)
        assertion = _jwt_svid(server, agent, entry.id)

        def broken(jti: str, expires_at: int, spiffe_id: str) -> None:
            raise StorageError("cannot read credentials: disk I/O error")

        monkeypatch.setattr(running.server.datastore, "workload_jwt", broken)
        form = {"grant_type": JWT_BEARER, "assertion": assertion, "resource": RESOURCE}
        reply = httpx.post(server.issuer + "/token", data=form, verify=server.ssl_context())
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"] == "temporarily_unavailable"
        monkeypatch.undo()
        token = _access_token(server, assertion)
        recorded = running.server.datastore.workload_jwt(*_jti_exp(token))
        assert recorded is not None
        assert recorded.agent_id == agent.spiffe_id


@contextmanager
def _delegating_server(
    request: pytest.FixtureRequest, backend: str, where: Path, *, chained: bool = False
) -> Iterator[OAuthServer]:
    """A server whose RESOURCE is served by the workload MCP_ID, which may act for a task
    towards OTHER_RESOURCE (`chained`: served by OTHER_ID, which may act on towards THIRD); on
    SQLite or PostgreSQL."""
    overrides: dict[str, Any] = {}
    if backend == "postgresql":
        KeyEncryptionKey.generate().write_new(where / "kek")
        overrides["datastore"] = request.getfixturevalue("postgres_dsn")
        overrides["key_encryption_key_file"] = str(where / "kek")
    resources, workloads = [RESOURCE, OTHER_RESOURCE], [f"{RESOURCE}={MCP_ID}"]
    if chained:
        resources.append(THIRD)
        workloads.append(f"{OTHER_RESOURCE}={OTHER_ID}")
    with serving_oauth("odr", resources, oauth_resource_workloads=workloads, **overrides) as server:
        yield server


@pytest.mark.parametrize(
    ("backend", "removed", "removal"),
    [
        ("sqlite", "actor", "EvictAgent"),
        ("sqlite", "actor", "BanAgent"),
        ("sqlite", "task", "EvictAgent"),
        ("postgresql", "actor", "EvictAgent"),
        ("postgresql", "task", "EvictAgent"),
    ],
)
def test_a_delegated_token_is_revoked_with_the_acting_workloads_agent_or_the_tasks(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, removed: str, removal: str
) -> None:
    """The workload MCP_ID, on a node of its own, acts for a task of another node: the token it
    gets is held by a workload of each node, so removing either revokes it, the revocation on
    the log under the node removed. A compromised acting workload's token does not outlive its
    agent's eviction."""
    with _delegating_server(request, backend, tmp_path) as server:
        running = server.running
        world = begin_task(server, resources=(server.issuer, RESOURCE, OTHER_RESOURCE))
        actor_agent = running.attest()
        mcp = running.create_entry("/mcp-tickets", actor_agent.spiffe_id)
        assert mcp.spiffe_id == MCP_ID
        actor = _jwt_svid(server, actor_agent, mcp.id)  # minted through the actor's agent
        subject = world.exchange().json()["access_token"]
        reply = delegate(world, subject, actor)
        assert reply.status_code == 200, reply.text
        token = str(reply.json()["access_token"])
        jti = _jti(token)
        revocations = RevocationSet()
        verifier = _verifier(server, revocations, OTHER_RESOURCE)
        assert verifier.verify(token).claims["client_id"] == MCP_ID

        node = actor_agent.spiffe_id if removed == "actor" else world.agent.spiffe_id
        request_type = getattr(admin_pb2, f"{removal}Request")
        getattr(running.admin(), removal)(request_type(spiffe_id=node), timeout=10)

        revoked = [r for r in running.server.state.revocations if r.value == jti]
        assert [(r.kind, r.spiffe_id) for r in revoked] == [(REVOKED_JWT_ID, world.task.spiffe_id)]
        revocations.add([Revoked(r.kind, r.value, r.expires_at) for r in revoked])
        with pytest.raises(RevokedError):
            verifier.verify(token)
        store = running.server.tasks.audit.store
        events = store.audit_rows(EventFilter(kind="revocation", node_id=node))
        assert [e["task_id"] for e in events if e["credential_id"] == jti] == [world.task.task_id]
        if removed == "actor":
            # The task itself goes on: only what the acting workload holds was revoked.
            assert running.server.tasks.service.get(world.task.task_id).active


def test_a_delegated_token_its_task_revoked_is_not_logged_again_by_the_actors_removal(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The task's end revoked the delegated token and logged it (under the task's node): the
    acting workload's agent, evicted after, holds nothing left to log, and evicting it again
    finds nothing to do."""
    with _delegating_server(request, "sqlite", tmp_path) as server:
        running = server.running
        world = begin_task(server, resources=(server.issuer, RESOURCE, OTHER_RESOURCE))
        actor_agent = running.attest()
        mcp = running.create_entry("/mcp-tickets", actor_agent.spiffe_id)
        subject = world.exchange().json()["access_token"]
        reply = delegate(world, subject, _jwt_svid(server, actor_agent, mcp.id))
        assert reply.status_code == 200, reply.text
        jti = _jti(reply.json()["access_token"])
        service = running.server.tasks.service
        running.call(service.end(world.agent, world.task.task_id, ()))

        evict = admin_pb2.EvictAgentRequest(spiffe_id=actor_agent.spiffe_id)
        running.admin().EvictAgent(evict, timeout=10)
        store = running.server.tasks.audit.store
        events = store.audit_rows(EventFilter(kind="revocation"))
        assert [e["node_id"] for e in events if e["credential_id"] == jti] == [
            world.agent.spiffe_id
        ]
        assert not running.call(service.removal_left(actor_agent.spiffe_id))


def test_no_delegated_token_leaves_while_the_actor_tokens_record_cannot_be_read(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delegated token recorded without the acting workload's agent would outlive that
    agent's eviction: refused as unavailable (not a refusal of the request on the log), and
    the same tokens, the actor token not used up, get it once the read works."""
    with _delegating_server(request, "sqlite", tmp_path) as server:
        running = server.running
        world = begin_task(server, resources=(server.issuer, RESOURCE, OTHER_RESOURCE))
        actor_agent = running.attest()
        mcp = running.create_entry("/mcp-tickets", actor_agent.spiffe_id)
        actor = _jwt_svid(server, actor_agent, mcp.id)
        subject = world.exchange().json()["access_token"]

        def broken(jti: str, expires_at: int, spiffe_id: str) -> None:
            raise StorageError("cannot read credentials: disk I/O error")

        monkeypatch.setattr(running.server.datastore, "workload_jwt", broken)
        reply = delegate(world, subject, actor)
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"] == "temporarily_unavailable"
        monkeypatch.undo()
        reply = delegate(world, subject, actor)
        assert reply.status_code == 200, reply.text
        jti = _jti(reply.json()["access_token"])
        held = running.server.datastore.agent_credentials(actor_agent.spiffe_id, 0)
        assert [c.task_id for c in held if c.value == jti] == [world.task.task_id]
        events = world.events("oauth_token_exchange")
        assert not [e for e in events if e["decision"] == "deny"]
        (granted,) = [e for e in events if e["credential_id"] == jti]
        assert json.loads(granted["extra"])["actor_node"] == actor_agent.spiffe_id


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_delegated_token_the_actors_removal_revoked_is_not_logged_again_by_its_tasks_end(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """The acting workload's agent, evicted first, revoked the delegated token and logged it
    (under that node): the task's end after it revokes the rest of what the task holds, and
    the token is on the log once, stored revoked once."""
    with _delegating_server(request, backend, tmp_path) as server:
        running = server.running
        world = begin_task(server, resources=(server.issuer, RESOURCE, OTHER_RESOURCE))
        actor_agent = running.attest()
        mcp = running.create_entry("/mcp-tickets", actor_agent.spiffe_id)
        subject = world.exchange().json()["access_token"]
        reply = delegate(world, subject, _jwt_svid(server, actor_agent, mcp.id))
        assert reply.status_code == 200, reply.text
        jti = _jti(reply.json()["access_token"])
        evict = admin_pb2.EvictAgentRequest(spiffe_id=actor_agent.spiffe_id)
        running.admin().EvictAgent(evict, timeout=10)
        service = running.server.tasks.service
        running.call(service.end(world.agent, world.task.task_id, ()))

        store = running.server.tasks.audit.store
        events = store.audit_rows(EventFilter(kind="revocation"))
        assert [e["node_id"] for e in events if e["credential_id"] == jti] == [
            actor_agent.spiffe_id
        ]
        # The subject token, the task's own, is revoked and logged by the end, once too.
        subject_jti = _jti(subject)
        events = store.audit_rows(EventFilter(kind="revocation", task_id=world.task.task_id))
        assert [e["node_id"] for e in events if e["credential_id"] == subject_jti] == [
            world.agent.spiffe_id
        ]
        stored = running.server.datastore.list_revocations()
        assert [r.value for r in stored].count(jti) == 1


@dataclass
class _Chain:
    """A task's token acted for by MCP_ID (on a node of its own), whose token OTHER_ID (on a
    third node) acts for in turn: `second`, derived from `first`."""

    world: TaskWorld
    first_agent: Agent
    second_agent: Agent
    first: str
    second_actor: str

    def second(self) -> httpx.Response:
        return delegate(self.world, self.first, self.second_actor, THIRD)


def _chain(server: OAuthServer) -> _Chain:
    running = server.running
    world = begin_task(server, resources=(server.issuer, RESOURCE, OTHER_RESOURCE, THIRD))
    first_agent, second_agent = running.attest(), running.attest()
    mcp = running.create_entry("/mcp-tickets", first_agent.spiffe_id)
    orders = running.create_entry("/orders", second_agent.spiffe_id)
    assert (mcp.spiffe_id, orders.spiffe_id) == (MCP_ID, OTHER_ID)
    subject = world.exchange().json()["access_token"]
    reply = delegate(world, subject, _jwt_svid(server, first_agent, mcp.id))
    assert reply.status_code == 200, reply.text
    second_actor = _jwt_svid(server, second_agent, orders.id)
    return _Chain(world, first_agent, second_agent, reply.json()["access_token"], second_actor)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_token_derived_from_a_delegated_one_is_revoked_with_the_first_actors_agent(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    """OTHER_ID acts for the token MCP_ID got acting for the task: the token it gets derives
    from MCP_ID's, so evicting MCP_ID's agent (compromised, say) revokes both, each on the log
    under that node, and neither outlives it; the task and OTHER_ID's node go on."""
    with _delegating_server(request, backend, tmp_path, chained=True) as server:
        running = server.running
        chain = _chain(server)
        reply = chain.second()
        assert reply.status_code == 200, reply.text
        token = str(reply.json()["access_token"])
        jtis = {_jti(chain.first), _jti(token)}
        revocations = RevocationSet()
        verifier = _verifier(server, revocations, THIRD)
        assert verifier.verify(token).act_chain[:2] == (OTHER_ID, MCP_ID)

        node = chain.first_agent.spiffe_id
        running.admin().EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=node), timeout=10)

        revoked = [r for r in running.server.state.revocations if r.value in jtis]
        assert sorted(r.value for r in revoked) == sorted(jtis)
        revocations.add([Revoked(r.kind, r.value, r.expires_at) for r in revoked])
        with pytest.raises(RevokedError):
            verifier.verify(token)
        store = running.server.tasks.audit.store
        events = store.audit_rows(EventFilter(kind="revocation", node_id=node))
        assert sorted(e["credential_id"] for e in events if e["credential_id"] in jtis) == sorted(
            jtis
        )
        assert running.server.tasks.service.get(chain.world.task.task_id).active
        # OTHER_ID can no longer act for the token revoked.
        refused = chain.second()
        assert refused.status_code == 400, refused.text
        assert "revoked" in refused.json()["error_description"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_token_derived_while_the_first_actors_agent_is_evicted_does_not_leave(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTHER_ID's exchange checked MCP_ID's token (not revoked yet) before MCP_ID's agent's
    eviction committed, and reaches the ledger after the eviction read what that agent holds:
    a token derived from it recorded then would never be revoked. It is refused, on record,
    and nothing is issued."""
    with _delegating_server(request, backend, tmp_path, chained=True) as server:
        running = server.running
        chain = _chain(server)
        minting, release = threading.Event(), threading.Event()
        mint = Grants._mint

        def held(self: Grants, *args: Any, **kwargs: Any) -> Any:
            minting.set()
            release.wait(20)
            return mint(self, *args, **kwargs)

        monkeypatch.setattr(Grants, "_mint", held)
        replies: list[httpx.Response] = []
        poster = threading.Thread(target=lambda: replies.append(chain.second()))
        poster.start()
        try:
            assert minting.wait(10)
            evict = admin_pb2.EvictAgentRequest(spiffe_id=chain.first_agent.spiffe_id)
            running.admin().EvictAgent(evict, timeout=10)  # revoked what it held
        finally:
            release.set()
            poster.join(30)
        (reply,) = replies
        if reply.status_code == 200:  # then it must at least have been revoked
            revoked = {r.value for r in running.server.state.revocations}
            assert _jti(reply.json()["access_token"]) in revoked, "a live derived token"
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"] == "invalid_grant"
        assert "evicted or banned" in reply.json()["error_description"]
        store = running.server.tasks.audit.store
        refused = store.audit_rows(EventFilter(kind="oauth_token_exchange", decision="deny"))
        assert [e["reason"] for e in refused if "evicted or banned" in e["reason"]]
        task_id = chain.world.task.task_id
        held_now = running.server.datastore.task_credentials(task_id, 0)
        assert not [c for c in held_now if c.derived_from == _jti(chain.first)]
