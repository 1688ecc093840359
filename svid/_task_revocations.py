"""Which of a task client's live tasks the agent's revocation list says are over.

When a task ends, however it ends (its runtime, an operator, its TTL, its parent's end, its
agent's removal), the server says so (a KIND_TASK entry naming the task's id) and revokes its
X.509-SVID and the JWT-SVIDs its runtime fetched, which it revokes only then; the agent lists
each with the task's SPIFFE ID when the server named it. So a list naming the task's end, its
X.509 serial, or the jti of a token the task holds, means the task is over: the end alone
tells it of a task with no X.509-SVID (its agent never minted one) and no token held. A token of
the task's SPIFFE ID it does not hold may be one delegated from it (a token exchange acting for
another workload), which the server also revokes when that workload's agent is removed, the
task going on: such a token alone is doubtful (doubtful_jtis), and only the server can tell.
Shared by the sync and asyncio clients; no I/O here.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Generic, Protocol, TypeVar

from svid._revocation import KIND_JWT_ID, KIND_TASK, Revoked
from svid._source_state import named_task, said_id
from svid._spiffe_id import SpiffeId
from svid._task_model import Fetched, TaskInfo
from svid._workload_calls import RevocationsUpdate

# Said when the server could not tell how the task ended: its credentials are revoked all the
# same, so the task is treated as over (fail closed).
UNCONFIRMED_REASON = "the agent's revocation list names its credentials"


class Watched(Protocol):
    """A task as the revocation watch sees it."""

    @property
    def spiffe_id(self) -> SpiffeId: ...

    @property
    def info(self) -> TaskInfo: ...

    def _cached_jtis(self) -> frozenset[str]: ...

    # The doubtful jtis the server showed were not its end (still_doubted, listed_active).
    _not_its_end: frozenset[str]


T = TypeVar("T", bound=Watched)


class LiveTasks(Generic[T]):
    """A client's tasks not yet known to be over, by SPIFFE ID. Held weakly: a task its runtime
    dropped without ending is still collected, and warns that it was never ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: weakref.WeakValueDictionary[str, T] = weakref.WeakValueDictionary()

    def add(self, task: T) -> None:
        with self._lock:
            self._tasks[str(task.spiffe_id)] = task

    def discard(self, task: T) -> None:
        key = str(task.spiffe_id)
        with self._lock:
            if self._tasks.get(key) is task:
                del self._tasks[key]

    def named_by(self, update: RevocationsUpdate) -> list[T]:
        """The live tasks ``update`` revokes a credential of, parents before their sub-tasks
        (a parent's end then ends its sub-tasks without asking the server about each)."""
        with self._lock:
            tasks = list(self._tasks.items())
        if not tasks:
            return []
        ids = {item.spiffe_id for item in update.items if item.spiffe_id}
        jtis = {item.value for item in update.items if item.kind == KIND_JWT_ID}
        # Ends that name the task's SPIFFE ID are in `ids`; by the task ID alone only those
        # naming none (see ended_by_id).
        ended = {item.value for item in update.items if ended_by_id(item)}
        hit = [
            task
            for key, task in tasks
            if key in ids
            or task.info.task_id in ended
            or (jtis and not jtis.isdisjoint(task._cached_jtis()))
        ]
        return sorted(hit, key=lambda task: task.info.depth)


def ended_by_id(item: Revoked) -> bool:
    """Whether `item` is a task's end to match on its task ID alone: one that names no task
    identity of that ID (named_task; an end naming one is matched on it, in `ids`)."""
    return item.kind == KIND_TASK and named_task(said_id(item), item.value) is None


def doubtful_jtis(task: Watched, update: RevocationsUpdate) -> frozenset[str] | None:
    """None when ``update`` (which names ``task``: LiveTasks.named_by) proves it over: it
    says the task ended, or names its X.509 serial or a token it holds. Else the jtis of the
    tokens it names by the task's SPIFFE ID alone, which may be tokens delegated from the task
    whose acting workload's agent was removed: an end of the task only if the server no longer
    lists it active."""
    sid = str(task.spiffe_id)
    held = task._cached_jtis()
    doubtful: set[str] = set()
    task_id = task.info.task_id
    for item in update.items:
        if item.value == task_id and ended_by_id(item):
            return None
        if item.kind == KIND_JWT_ID and item.value in held:
            return None
        if item.spiffe_id == sid:
            if item.kind != KIND_JWT_ID:
                return None
            doubtful.add(item.value)
    return frozenset(doubtful)


def proven_and_doubted(
    named: Iterable[T], update: RevocationsUpdate
) -> tuple[list[T], dict[T, frozenset[str]]]:
    """``named`` (LiveTasks.named_by, in its order) split into the tasks ``update`` proves
    over, and the others by the jtis that name them (doubtful_jtis), which only the server
    can tell about: the first end at once, without waiting for that answer."""
    proven: list[T] = []
    doubted: dict[T, frozenset[str]] = {}
    for task in named:
        jtis = doubtful_jtis(task, update)
        if jtis is None:
            proven.append(task)
        else:
            doubted[task] = jtis
    return proven, doubted


def still_doubted(doubts: Mapping[T, frozenset[str]]) -> tuple[set[str], dict[T, frozenset[str]]]:
    """``doubts`` (proven_and_doubted's) less what the server already told: the IDs of the tasks
    every doubtful jti of which it showed was not their end (they go on), and the others with
    the jtis still to ask about."""
    going_on: set[str] = set()
    asked: dict[T, frozenset[str]] = {}
    for task, jtis in doubts.items():
        left = jtis - task._not_its_end
        if left:
            asked[task] = left
        else:
            going_on.add(task.info.task_id)
    return going_on, asked


def listed_active(asked: Mapping[T, frozenset[str]], active: set[str]) -> set[str]:
    """The IDs of the ``asked`` tasks the server lists ``active``: they go on, and the jtis they
    were asked about are remembered as not their end (never asked about again)."""
    going_on: set[str] = set()
    for task, jtis in asked.items():
        if task.info.task_id in active:
            task._not_its_end |= jtis
            going_on.add(task.info.task_id)
    return going_on


def cached_jtis(cached: Iterable[Fetched]) -> frozenset[str]:
    """The jtis of a task's cached tokens (as its ``_jwts`` values hold them)."""
    jtis = (jwt.claims.get("jti") for jwt, _, _ in cached)
    return frozenset(jti for jti in jtis if isinstance(jti, str) and jti)


def unconfirmed_end(info: TaskInfo) -> TaskInfo:
    """``info`` of a task whose credentials are revoked but whose end the server could not be
    asked about (unreachable, or not yet showing it)."""
    return replace(info, end_reason=info.end_reason or UNCONFIRMED_REASON)


def ended_with_parent(child: TaskInfo, parent: TaskInfo) -> TaskInfo:
    """A sub-task's info once its parent has ended: the server ends it the same way, saying
    so (server/tasks/service.py)."""
    if child.state != "active":
        return child
    return replace(
        child,
        state=parent.state,
        end_reason=f"parent task {parent.task_id} ended",
        ended_at=parent.ended_at,
    )
