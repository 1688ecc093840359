"""Values of the task layer: a task on record (and, from the issuance spine, the credential
record that names a task)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from server.datastore.records import Credential
from server.policy import Intent

__all__ = ["TASK_PATH", "Credential", "Task", "TaskState", "is_task_id"]

TASK_PATH = "/task/"


class TaskState(StrEnum):
    ACTIVE = "active"
    ENDED = "ended"  # the runtime ended it
    REVOKED = "revoked"  # an operator, an eviction or a ban ended it
    EXPIRED = "expired"  # its TTL ran out


@dataclass(frozen=True)
class Task:
    """A granted task. `actions`/`resources` are the granted scope, maybe narrower than declared."""

    task_id: str
    spiffe_id: str
    runtime_id: str
    agent_id: str
    entry_id: str
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    classification: str
    environment: str
    on_behalf_of: str
    goal_sha256: str
    parent_task_id: str
    depth: int
    ttl: int
    created_at: int
    expires_at: int
    decision: str
    reason: str
    policy_ids: tuple[str, ...]
    policy_set_hash: str
    # RFC 8693 `act` claim value (current actor outermost), or {} when acting for nobody.
    act: dict[str, Any]
    state: TaskState = TaskState.ACTIVE
    ended_at: int = 0
    end_reason: str = ""

    @property
    def active(self) -> bool:
        return self.state is TaskState.ACTIVE

    def intent(self) -> Intent:
        """The granted scope as an intent: what every per-mint decision is checked against."""
        return Intent(
            actions=frozenset(self.actions),
            resources=frozenset(self.resources),
            classification=self.classification,
            environment=self.environment,
            on_behalf_of=self.on_behalf_of,
            delegation_depth=self.depth,
            parent_task=self.parent_task_id,
        )

    def remaining(self, now: float) -> int:
        return max(0, int(self.expires_at - now))


def is_task_id(spiffe_id: str) -> bool:
    return TASK_PATH in spiffe_id
