"""The task decision port: what the issuer asks the task layer before signing for a task.

The issuer knows nothing of tasks beyond this Protocol; server.tasks implements it and app.py
hands that implementation to the issuer. A task identity is issued only while its task is
active, and every task credential is recorded with its task id so ending the task revokes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from server.datastore.records import Entry


@dataclass(frozen=True, slots=True)
class TaskGrant:
    """The task an X.509-SVID is issued for: recorded with it, and named in its audit event."""

    task_id: str
    runtime_id: str
    # When the task runs out: its SVID, however late in the task it is renewed, ends by then.
    expires_at: int


@dataclass(frozen=True, slots=True)
class TaskJwtGrant:
    """A task JWT mint the task layer allowed: the claims to add and what to record."""

    task_id: str
    runtime_id: str
    on_behalf_of: str
    ttl: int
    scope: str
    claims: Mapping[str, Any]
    policy_set_hash: str


class TaskDecisions(Protocol):
    def owns(self, entry: Entry) -> bool:
        """True when `entry` is a task identity: its issuance is the task layer's to decide.
        Called per request on the hot path: an in-memory check, no decision."""
        ...

    def x509_grant(self, agent_id: str, entry: Entry) -> TaskGrant:
        """The grant of an owned entry's task while it is active and `agent_id` holds it;
        PermissionDeniedError otherwise (not yet, or no longer, active)."""
        ...

    def jwt_grant(self, agent_id: str, entry: Entry, audience: Sequence[str]) -> TaskJwtGrant:
        """A fresh policy decision for a JWT of an owned entry: the grant, or
        PermissionDeniedError (the task layer audits its own denials)."""
        ...

    def ended(self, spiffe_id: str) -> bool:
        """Whether `spiffe_id` is a task identity whose task is no longer active: asked once a
        credential granted for it is on record. In memory, so it knows of this server's ends
        only: one recorded after an end was claimed, on any server, is refused by the ledger
        instead (TaskEndedMeanwhileError); this withholds one recorded just before this
        server's end, which that end revokes."""
        ...
