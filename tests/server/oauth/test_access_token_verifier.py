"""svid.AccessTokenVerifier on tokens a running server exchanged: accepted with their typed
claims, and refused once their task ends (the server revokes the exchanged token's jti with the
task's credentials; here the revocations are read from the server's state, tests/e2e and
bench/test_bench_oauth.py take them from a real agent)."""

from __future__ import annotations

import pytest

from server.datastore.records import REVOKED_JWT_ID
from svid import AccessTokenVerifier, MemoryBundleSource, RevocationSet, Revoked, RevokedError
from tests.server.oauth.conftest import RESOURCE, OAuthServer
from tests.server.oauth.test_token_exchange import TXN_TYPE, TaskWorld, begin_task


@pytest.fixture
def world(oauth_server: OAuthServer) -> TaskWorld:
    return begin_task(oauth_server)


def _verifier(world: TaskWorld, revocations: RevocationSet) -> AccessTokenVerifier:
    bundle = world.oauth.running.server.ca.bundle()
    return AccessTokenVerifier(
        MemoryBundleSource.of(bundle).jwt_bundle_for,
        issuer=world.oauth.issuer,
        audience=RESOURCE,
        trust_domain=bundle.trust_domain,
        revocations=revocations,
    )


def _server_revocations(world: TaskWorld) -> list[Revoked]:
    state = world.oauth.running.server.state
    return [
        Revoked(r.kind, r.value, r.expires_at)
        for r in state.revocations
        if r.kind == REVOKED_JWT_ID
    ]


def test_an_exchanged_token_is_accepted_and_refused_after_its_task_ends(
    world: TaskWorld,
) -> None:
    revocations = RevocationSet()
    verifier = _verifier(world, revocations)
    reply = world.exchange()
    assert reply.status_code == 200, reply.text
    token = reply.json()["access_token"]
    verified = verifier.verify(token)
    task = world.task
    assert verified.subject == "user:alice"
    assert verified.act_chain == (task.spiffe_id,)
    assert verified.delegated  # `sub` is the principal as declared, not authenticated
    assert verified.task_id == task.task_id
    assert verified.client_id == task.runtime_id
    assert verified.scopes == {"read", "tool:read_ticket"}
    running = world.oauth.running
    running.call(running.server.tasks.service.end(world.agent, task.task_id, ()))
    revocations.add(_server_revocations(world))
    with pytest.raises(RevokedError):
        verifier.verify(token)


def test_an_exchanged_txn_token_is_verified_as_one(world: TaskWorld) -> None:
    verifier = _verifier(world, RevocationSet())
    reply = world.exchange(requested_token_type=TXN_TYPE)
    assert reply.status_code == 200, reply.text
    txn = verifier.verify_txn_token(reply.json()["access_token"])
    assert txn.task_id == world.task.task_id
    assert txn.delegated
    assert txn.claims["req_wl"] == world.task.spiffe_id
