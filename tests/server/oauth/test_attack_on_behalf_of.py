"""ATTACK REPRO: a task's self-declared on_behalf_of becomes the `sub` of a signed access token
(fails on purpose)."""

from __future__ import annotations

from tests.server.oauth.conftest import RESOURCE, OAuthServer
from tests.server.oauth.test_token_exchange import begin_task

BILLING = "/billing-service"


def test_attack_a_task_cannot_get_an_access_token_whose_subject_is_another_workload(
    oauth_server: OAuthServer,
) -> None:
    """ATTACK REPRO (fails on purpose until fixed): `on_behalf_of` is whatever the runtime
    declares (server/tasks/service.py checks only its length and that it is printable; the
    shipped policy never looks at it but for `!= ""`), and an exchange makes it the access
    token's `sub` (server/oauth/grants.py `_task_token`: `task.on_behalf_of or
    task.runtime_id`), signed by the issuer. A runtime naming another workload's SPIFFE ID
    gets a token for the resource whose `sub` is that workload, the subject a JWT-bearer
    token of the workload itself carries: `svid.mcp.AccessTokenAuth` hands the tool
    `subject` = the billing service. (The same holds for any user, `user:ceo`: nothing
    authenticates the principal the task claims to work for.) A principal is to be proven
    (a subject token of it) or at least never a SPIFFE ID the task's chain does not hold.
    """
    running = oauth_server.running
    world = begin_task(oauth_server)
    billing = running.create_entry(BILLING, world.agent.spiffe_id)
    posing = begin_task(oauth_server, on_behalf_of=billing.spiffe_id)
    reply = posing.exchange()
    if reply.status_code == 200:
        claims = posing.decode(reply.json()["access_token"], RESOURCE)
        assert claims["sub"] != billing.spiffe_id, (
            f"a task of {posing.task.runtime_id} got a token for {RESOURCE} whose subject is "
            f"{claims['sub']}"
        )
