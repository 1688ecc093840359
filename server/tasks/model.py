"""Values of the task layer: a task on record (and, from the issuance spine, the credential
record that names a task)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from server.datastore.records import REVOKED_TASK, Credential, Revocation
from server.policy import Intent

__all__ = [
    "TASK_ID_CHARS",
    "TASK_PATH",
    "Credential",
    "Task",
    "TaskState",
    "is_task_id",
    "is_task_key",
    "new_task_id",
    "task_end_revocation",
]

TASK_PATH = "/task/"
# Every task ID this server ever made (new_task_id): 64 random bits in lowercase hex.
TASK_ID_CHARS = 16
_TASK_KEY = re.compile(rf"[0-9a-f]{{{TASK_ID_CHARS}}}")


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
    # The RFC 8693 `act` chain of its tokens: this task outermost, then the task that began it,
    # and so on to the root task ({} for a root task acting for nobody). Who the chain acts for
    # is `on_behalf_of`, never an `act` member.
    act: dict[str, Any]
    state: TaskState = TaskState.ACTIVE
    ended_at: int = 0
    end_reason: str = ""
    # Granted tools, "<server>#<tool>" (a row written before tools existed has none).
    tools: tuple[str, ...] = ()
    # A short elevated step inside its parent (see TaskService.begin).
    elevated: bool = False
    # The registration entry of the workload that began it (its runtime_id may be several
    # workloads' through several entries): only that workload ends it, lists it, or begins
    # sub-tasks of it. "" for a task begun before it was recorded (see service.owned_by).
    runtime_entry_id: str = ""

    def __post_init__(self) -> None:
        # Rows come back from JSON with lists.
        object.__setattr__(self, "tools", tuple(self.tools))

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
            tools=frozenset(self.tools),
            elevated=self.elevated,
        )

    def remaining(self, now: float) -> int:
        return max(0, int(self.expires_at - now))


def is_task_id(spiffe_id: str) -> bool:
    return TASK_PATH in spiffe_id


def new_task_id() -> str:
    return secrets.token_hex(TASK_ID_CHARS // 2)


def is_task_key(text: str) -> bool:
    """Whether `text` has the shape of a task ID new_task_id makes (not a task's SPIFFE ID:
    see is_task_id). What a caller names a task by is checked with it before any lookup."""
    return _TASK_KEY.fullmatch(text) is not None


def task_end_revocation(task: Task, reason: str, now: int) -> Revocation:
    """The revocation that says `task` ended (REVOKED_TASK), published with its credentials'.

    Kept as long as a credential of the task may be: none outlives the task's own expiry
    (issuance clamps them to it), and one ended by its TTL keeps it the verifier leeway past
    now, as any revocation."""
    return Revocation(
        REVOKED_TASK, task.task_id, task.spiffe_id, max(task.expires_at, now), reason, now
    )
