"""Which of a client's live tasks an agent's revocation list ends (svid._task_revocations)."""

from __future__ import annotations

import gc
from dataclasses import dataclass, replace

from svid._revocation import KIND_JWT_ID, KIND_TASK, KIND_X509_SERIAL, Revoked
from svid._spiffe_id import SpiffeId
from svid._task_model import TaskInfo
from svid._task_revocations import (
    LiveTasks,
    doubtful_jtis,
    ended_with_parent,
    unconfirmed_end,
)
from svid._workload_calls import RevocationsUpdate

RUNTIME = "spiffe://example.org/agents/bot"


def info(task_id: str, depth: int = 0, parent: str = "") -> TaskInfo:
    return TaskInfo(
        task_id=task_id,
        spiffe_id=SpiffeId.parse(f"{RUNTIME}/task/{task_id}"),
        runtime_id=SpiffeId.parse(RUNTIME),
        actions=("read",),
        resources=("docs",),
        tools=(),
        ttl=300,
        expires_at=2_000_000_000,
        decision="allow",
        reason="",
        parent_task_id=parent,
        elevated=False,
        on_behalf_of="",
        classification="",
        environment="",
        depth=depth,
        state="active",
        policy_ids=(),
    )


@dataclass(eq=False)
class Held:
    """A task as the watch sees it: its info and the jtis of the tokens it holds."""

    info: TaskInfo
    jtis: frozenset[str] = frozenset()

    @property
    def spiffe_id(self) -> SpiffeId:
        return self.info.spiffe_id

    def _cached_jtis(self) -> frozenset[str]:
        return self.jtis


def update(*items: Revoked) -> RevocationsUpdate:
    return RevocationsUpdate(items, (), 1)


def test_a_task_is_named_by_its_spiffe_id_or_by_a_cached_tokens_jti_parents_first() -> None:
    live: LiveTasks[Held] = LiveTasks()
    sub = Held(info("t2", depth=1, parent="t1"))
    parent = Held(info("t1"))
    by_jti = Held(info("t3"), frozenset({"jti-3"}))
    other = Held(info("t4"), frozenset({"jti-4"}))
    for task in (sub, parent, by_jti, other):
        live.add(task)
    listed = update(
        Revoked(KIND_X509_SERIAL, "0a", 0.0, f"{RUNTIME}/task/t2"),
        Revoked(KIND_JWT_ID, "jti-1", 0.0, f"{RUNTIME}/task/t1"),
        Revoked(KIND_JWT_ID, "jti-3", 0.0, ""),  # whose it is not said: the jti matches
        Revoked(KIND_JWT_ID, "jti-9", 0.0, f"{RUNTIME}/task/t9"),
        Revoked(KIND_X509_SERIAL, "jti-4", 0.0, ""),  # a serial, not a jti
    )
    assert live.named_by(listed) == [parent, by_jti, sub]
    live.discard(parent)
    live.discard(Held(info("t2")))  # another object with the same ID is not the task
    assert live.named_by(listed) == [by_jti, sub]


def test_a_task_dropped_by_its_runtime_is_not_held_alive() -> None:
    live: LiveTasks[Held] = LiveTasks()
    live.add(Held(info("t1")))
    gc.collect()
    assert live.named_by(update(Revoked(KIND_JWT_ID, "j", 0.0, f"{RUNTIME}/task/t1"))) == []


def test_an_end_the_server_did_not_confirm_says_why_and_a_sub_task_follows_its_parent() -> None:
    assert unconfirmed_end(info("t1")).end_reason == (
        "the agent's revocation list names its credentials"
    )
    parent = replace(info("t1"), state="revoked", end_reason="misuse", ended_at=1_700_000_000)
    child = ended_with_parent(info("t2", depth=1, parent="t1"), parent)
    assert (child.state, child.end_reason, child.ended_at) == (
        "revoked",
        "parent task t1 ended",
        1_700_000_000,
    )
    ended = replace(info("t3"), state="ended", end_reason="done")
    assert ended_with_parent(ended, parent) is ended  # one that ended first keeps its own end


def test_a_token_of_the_tasks_id_it_does_not_hold_is_doubtful_its_svid_or_own_token_sure() -> None:
    task = Held(info("t1"), frozenset({"jti-own"}))
    sid = f"{RUNTIME}/task/t1"
    delegated = Revoked(KIND_JWT_ID, "jti-delegated", 0.0, sid)
    assert doubtful_jtis(task, update(delegated)) == {"jti-delegated"}
    assert doubtful_jtis(task, update(delegated, Revoked(KIND_X509_SERIAL, "0a", 0.0, sid))) is None
    assert doubtful_jtis(task, update(delegated, Revoked(KIND_JWT_ID, "jti-own", 0.0, ""))) is None


def test_a_tasks_end_ends_only_the_task_of_the_identity_it_names() -> None:
    """A task client took any end of its task's ID for its task's: the end of a task of
    another runtime or trust domain with the same ID ended it (its tokens dropped, its
    `with` block told so). An end naming no identity (an older agent's) still ends it."""
    live: LiveTasks[Held] = LiveTasks()
    task = Held(info("t1"))
    live.add(task)
    for other in ("spiffe://foreign.org/agents/bot/task/t1", f"{RUNTIME}-2/task/t1"):
        twin = update(Revoked(KIND_TASK, "t1", 0.0, other))
        assert live.named_by(twin) == []
        assert doubtful_jtis(task, twin) == frozenset()
    for ended in (
        update(Revoked(KIND_TASK, "t1", 0.0)),
        update(Revoked(KIND_TASK, "t1", 0.0, "x")),
    ):
        assert live.named_by(ended) == [task]
        assert doubtful_jtis(task, ended) is None
    own = update(Revoked(KIND_TASK, "t1", 0.0, f"{RUNTIME}/task/t1"))
    assert live.named_by(own) == [task]
    assert doubtful_jtis(task, own) is None
