"""The task service: begin and end tasks, decide every task mint, revoke, audit.

Every decision goes through the PolicyEngine (Cedar) and the pure intent checks; every outcome is
one audit event. A granted task becomes a registration entry `<runtime ID>/task/<id>` parented to
the agent with the runtime's selectors, so it reaches the agent over Sync like any entry, and the
agent pre-issues its X.509-SVID. Ending a task revokes every serial and jti issued for it and
deletes the entry; the revocation list (and a CRL built from it) reaches agents over Sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import threading
from collections import Counter
from collections.abc import (
    Callable,
    Collection,
    Container,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from server.agent_index import AgentIndex
from server.audit import AuditError, AuditLog, EventDraft, EventKind, SecretInAuditError
from server.audit.event import check_no_secret
from server.ca.manager import CaManager
from server.datastore.base import RemovalClaim
from server.datastore.records import (
    REVOKED_TASK,
    AttestedAgent,
    Entry,
    EventFilter,
    Revocation,
    TaskCursor,
)
from server.entitlement import EntryIndex, agent_parents, entitled_entry, live
from server.errors import (
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
)
from server.input_text import refuse_unprintable
from server.issuance import TaskGrant, TaskJwtGrant
from server.policy import (
    INVOKE_TOOL,
    Decision,
    DecisionRequest,
    Flag,
    Intent,
    PolicyEngine,
    check_audiences,
    check_elevation,
    narrow,
    split_tool,
)
from server.policy.engine import MAX_REASON_BYTES
from server.refusal_budget import RefusalBudget
from server.state import ServerState
from server.tasks.crl import CrlCache
from server.tasks.end_reason import runtime_end_reason
from server.tasks.model import (
    TASK_ID_CHARS,
    TASK_PATH,
    Credential,
    Task,
    TaskState,
    is_task_id,
    new_task_id,
    task_end_revocation,
)
from server.tasks.store import TaskStore
from server.tasks.validations import validation_events
from svid import MAX_CLOCK_SKEW
from svid._clock import Clock
from svid._limits import cut_text, intent_problem, principal_problem
from svid._ratelimit import KeyedLimiter
from svid._spiffe_id import MAX_ID_BYTES, SpiffeId

_log = logging.getLogger("svid.server.tasks")
# A granted tool in a token's `scope`: "tool:<name>" (svid.TaskClaims reads it).
TOOL_SCOPE_PREFIX = "tool:"
_HEX = frozenset("0123456789abcdef")
# An end claimed this long ago and never settled was left half done (its server died midway).
END_GRACE = 60
# The end reason of a task whose begin a dead server left half done (cut_short_begins).
BEGIN_CUT_SHORT = "its begin was cut short: the server stopped before the task had its entry"
# ...and before its task-begin event: settle_ends records that event from the row first. Only
# a server from before a row and its event were one transaction (a rolling upgrade) leaves one.
BEGIN_UNLOGGED = (
    "its begin was cut short: the server stopped before the task's begin was on the audit log"
)
# The end reason of a task whose runtime's entry went, or changed (end_unentitled).
RUNTIME_ENTRY_CHANGED = (
    "its runtime's entry {entry_id} was deleted, or no longer gives its workload this identity "
    "through this agent"
)
# The end reason of a task whose agent's SVID expired unrenewed (end_agentless).
AGENT_LAPSED = (
    "its agent's SVID expired and was not renewed (the node left, or attested again under "
    "another agent ID)"
)
# A runtime's tasks ended before their expiry, not expired yet, per node, at most this many
# times max_active_per_runtime: their revocations are listed until their expiry. Default
# TTLs at the default begin rate (20/s x 300 s) stay below 10 x 1000.
ENDED_PER_ACTIVE = 10
# Bound on the per-task facts kept for mints and exchanges (about one per active task).
_FACTS_CACHE_SIZE = 4096
MAX_VIOLATION_COUNTS = 4096
# A denial event's `resource`: what the intent (svid._limits) or a mint's audiences hold at most.
MAX_DENIED_RESOURCE_BYTES = 8192


@dataclass(frozen=True)
class TaskSettings:
    max_ttl: int = 3600
    default_ttl: int = 300
    max_depth: int = 3
    # JWT-SVIDs of a task live at most this long (and never past the task).
    jwt_ttl: int = 300
    # Out-of-intent requests within this window count as the runtime's violations on its node.
    violation_window: int = 3600
    # An elevated step lives at most this long (and never past its parent, nor past policy caps).
    max_elevated_ttl: int = 300
    # Tasks one runtime may hold active at once through one agent (0: no cap).
    max_active_per_runtime: int = 0
    # Rows one page of a workload's own tasks reads at most (TaskService.list with entries):
    # the page skips the tasks of the other workloads of its SPIFFE ID, which may be any number.
    max_scanned_rows: int = 5000
    # Policy decisions an agent's task JWT mints, and its tasks' token exchanges, may ask for,
    # in (action, audience) pairs a second after a burst (0: no limit). A mint is decided afresh
    # over its task's actions times its audiences (~0.15 ms a pair with the shipped policy), so
    # the JWT signing budget, which counts it as one signature, bounds that CPU by a hundredfold
    # too little. It bounds policy work and violation rows: a decision policy answers from its
    # cache is not charged (requests are the signing budget's), but for a delegation's (the
    # budget is all that bounds those), an out-of-intent one, which writes a violation, is (at
    # least one pair), and either is charged before its work. An actor's delegations for an
    # agent's tasks have a budget of their own (the same rate), not that agent's.
    mint_pairs_rate_per_agent: float = 1000.0
    mint_pairs_burst_per_agent: int = 4000


@dataclass(frozen=True)
class TaskList:
    """What TaskService.list found, oldest first."""

    tasks: list[Task]
    # A read of some workloads' tasks that stopped at max_scanned_rows before it found its
    # limit of them: the last row it read (after every task found). A later read goes on after
    # it; None when the rows ran out or the limit was found.
    read_to: TaskCursor | None = None


@dataclass(frozen=True)
class BeginRequest:
    runtime_id: str
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    classification: str = ""
    environment: str = ""
    on_behalf_of: str = ""
    ttl: int = 0
    parent_task_id: str = ""
    goal_sha256: str = ""
    tools: tuple[str, ...] = ()
    # With parent_task_id: an elevated step (see TaskService._decide_begin).
    elevate: bool = False
    # The caller's entry with runtime_id, as its agent found it ("" = the lowest id's).
    runtime_entry_id: str = ""


class TaskService:
    def __init__(
        self,
        *,
        state: ServerState,
        store: TaskStore,
        policy: PolicyEngine,
        audit: AuditLog,
        ca: CaManager,
        server_id: str,
        clock: Clock,
        settings: TaskSettings | None = None,
        denials: RefusalBudget | None = None,
    ) -> None:
        """`denials`: which of an agent's denials are written to the audit log (None: all)."""
        self._state = state
        self._store = store
        self._policy = policy
        self._audit = audit
        self._ca = ca
        self._server_id = server_id
        self._clock = clock
        self.settings = settings or TaskSettings()
        self._denials = denials or RefusalBudget("task", rate=0, burst=1, clock=clock)
        self._mint_pairs = KeyedLimiter(
            self.settings.mint_pairs_rate_per_agent, self.settings.mint_pairs_burst_per_agent, clock
        )
        self._lock = threading.Lock()
        # Active tasks by task SPIFFE ID: the per-mint lookup never touches SQLite.
        self._active: Mapping[str, Task] = MappingProxyType({})
        # How many of them each runtime holds through each agent (max_active_per_runtime), moved
        # with _active. Per agent: one SPIFFE ID runs on many nodes, and one node's instances
        # (or a hostile agent) filling the cap must not refuse the same runtime on the others.
        self._held: Counter[tuple[str, str]] = Counter()
        # The expiries of the tasks each runtime ended early through each agent (a heap per
        # key), at most ENDED_PER_ACTIVE times max_active_per_runtime until then: a runtime
        # beginning and ending tasks at once held none active, while each end kept its
        # entries on the revocation list, sent to every agent, up to max_ttl (20 begins a
        # second of hour-long tasks listed 72k tasks at once). Memory only: a restart forgets
        # them (the begin rate still bounds them).
        self._listed: dict[tuple[str, str], list[int]] = {}
        # Tasks this server ended (id -> expires_at): an end is final, so a row the change
        # feed read before the end never makes one active again here.
        self._ended: dict[str, int] = {}
        self._crl = CrlCache()
        # Per task ID: (the Task object, its intent, its tools split), see _facts_of.
        self._facts: dict[str, tuple[Task, Intent, tuple[tuple[str, str, str], ...]]] = {}
        # Per (agent, runtime): (window start, violations since then), read from the store at
        # most once per clock second; this server's own violations drop the entry at once.
        # Other servers' (one datastore) count here within a second.
        self._violation_counts: dict[tuple[str, str], tuple[int, int]] = {}
        self._violations_added = 0  # moves with each of this server's violations
        # The entries and agents end_unentitled last checked the active tasks against
        # (snapshots), and when the first node alias or runtime's entry live then expires: a
        # task served through an alias ends when it stops covering the agent, and one whose
        # runtime's entry expires ends with it, though no entry changed.
        self._entries_checked: object = None
        self._agents_checked: AgentIndex | None = None
        self._lapses_at = float("inf")
        # Before this time end_agentless ends nothing (hold_agent_lapses_until).
        self._lapses_held_until = 0.0

    def hold_agent_lapses_until(self, at: float) -> None:
        """End no task for its agent's lapse before `at`: on a datastore restored from a
        backup an agent's record names the SVID it held then, expired long since while the
        agent renewed it, and its newer one is adopted only once it calls (restore_adoption.py).
        An agent_svid_ttl after the restore, every SVID signed before it has expired."""
        self._lapses_held_until = at

    @property
    def policy(self) -> PolicyEngine:
        return self._policy

    @property
    def audit(self) -> AuditLog:
        return self._audit

    @property
    def store(self) -> TaskStore:
        return self._store

    def load(self) -> None:
        """Start-up: active tasks from the store into memory."""
        tasks = self._store.list_tasks(state=TaskState.ACTIVE.value)
        self._active = MappingProxyType({t.spiffe_id: t for t in tasks})
        self._held = Counter((t.agent_id, t.runtime_id) for t in self._active.values())

    def _now(self) -> int:
        return int(self._clock.now())

    def _set_active(self, task: Task, active: bool) -> None:
        with self._lock:
            tasks = dict(self._active)
            if active:
                self._put(tasks, task)
            else:
                self._drop(tasks, task)
                self._ended[task.task_id] = task.expires_at
            self._active = MappingProxyType(tasks)

    def _put(self, tasks: dict[str, Task], task: Task) -> None:
        if task.spiffe_id not in tasks:
            self._held[task.agent_id, task.runtime_id] += 1
        tasks[task.spiffe_id] = task

    def _drop(self, tasks: dict[str, Task], task: Task) -> None:
        gone = tasks.pop(task.spiffe_id, None)
        if gone is not None:
            held = (gone.agent_id, gone.runtime_id)
            self._held[held] -= 1
            if not self._held[held]:
                del self._held[held]
            # The cap first: with none, no clock is read per end.
            if self.settings.max_active_per_runtime and gone.expires_at > self._now():
                self._count_early_end(gone)

    def _count_early_end(self, task: Task) -> None:
        """`task` ended before its expiry: its end is listed until then (_ended_early)."""
        if self.settings.max_active_per_runtime:
            key = (task.agent_id, task.runtime_id)
            heapq.heappush(self._listed.setdefault(key, []), task.expires_at)

    def _ended_early(self, agent_id: str, runtime_id: str) -> int:
        """The tasks a runtime ended through an agent before their expiry, not expired yet:
        their end, and their credentials, stay on the revocation list every agent is sent
        until then."""
        key = (agent_id, runtime_id)
        now = self._now()
        with self._lock:
            listed = self._listed.get(key)
            if listed is None:
                return 0
            while listed and listed[0] <= now:
                heapq.heappop(listed)
            if not listed:
                del self._listed[key]
            return len(listed)

    # -- tasks begun or ended through other servers (server.replication) ------------------------

    def reload_tasks(self, task_ids: Collection[str]) -> dict[str, Task | None]:
        """The named tasks as stored now (None: no such row); blocking, run it in a thread."""
        return {task_id: self._store.get_task(task_id) for task_id in task_ids}

    def reload_all_tasks(self) -> dict[str, Task | None]:
        """Every active task as stored now, and None for each one memory holds that is not."""
        stored: dict[str, Task | None] = {
            t.task_id: t for t in self._store.list_tasks(state=TaskState.ACTIVE.value)
        }
        for task in self._active.values():
            stored.setdefault(task.task_id, None)
        return stored

    def apply_tasks(self, loaded: Mapping[str, Task | None]) -> None:
        """Tasks as another server left them: begun ones become active here, ended ones not."""
        now = self._now()
        with self._lock:
            begun, ended = follow_tasks(self._active, self._ended, loaded)
            # Begun and ended elsewhere before this server read the row: never active here, so
            # _drop did not count it, yet its end is listed all the same. Counted here too, or
            # a runtime spreading its begins and ends over the servers of one datastore got
            # ENDED_PER_ACTIVE times its cap listed on each.
            for task in unseen_early_ends(self._active, self._ended, loaded, now):
                self._ended[task.task_id] = task.expires_at  # counted once
                self._count_early_end(task)
            if not begun and not ended:
                return
            tasks = dict(self._active)
            for task in ended:
                self._drop(tasks, task)
                if loaded.get(task.task_id) is not None:
                    # Its row says it ended (not merely gone): read again, it is not counted
                    # again (unseen_early_ends).
                    self._ended[task.task_id] = task.expires_at
            for task in begun:
                self._put(tasks, task)
            self._active = MappingProxyType(tasks)

    def next_expiry(self) -> float:
        """When the next active task runs out (infinity when none is active)."""
        return min((t.expires_at for t in self._active.values()), default=float("inf"))

    def active_task(self, spiffe_id: str) -> Task | None:
        return self._active.get(spiffe_id)

    def violations(self, agent_id: str, runtime_id: str) -> int:
        """The runtime's violations through that agent in the window (a risk signal every
        decision reads): from the store, or as read from it in this clock second. Per agent:
        one SPIFFE ID runs on many nodes, and one node's out-of-intent requests (a hostile
        instance, a compromised agent) must not stop the runtime on every other node."""
        since = self._now() - self.settings.violation_window
        counts = self._violation_counts
        key = (agent_id, runtime_id)
        held = counts.get(key)
        if held is not None and held[0] == since:
            return held[1]
        added = self._violations_added
        count = self._store.violations(runtime_id, agent_id, since)
        if added == self._violations_added:  # else a violation came in meanwhile: not kept
            if len(counts) >= MAX_VIOLATION_COUNTS:
                counts.clear()
            counts[key] = (since, count)
        return count

    # -- begin --------------------------------------------------------------------------------

    def _runtime_entry(self, agent: AttestedAgent, runtime_id: str, entry_id: str = "") -> Entry:
        """The entry the task's entry takes its selectors from, so that its SVIDs reach the
        workload that began it: the one its agent names, else the lowest id with the ID.
        Several entries may give one ID to different workloads (other selectors): the lowest
        id's gave a task one workload began to another, and none of it to the first."""
        try:
            wanted = str(SpiffeId.parse(runtime_id))
        except Exception:
            raise InvalidRequestError(
                f"runtime_id: {runtime_id[:200]!r} is not a SPIFFE ID"
            ) from None
        if is_task_id(wanted):
            raise InvalidRequestError(
                f"runtime_id: {wanted} is a task identity; begin a sub-task with parent_task_id"
            )
        # The task's ID is the runtime's with /task/<id> after it: past a SPIFFE ID's length,
        # every verifier (go-spiffe, py-spiffe, svid) refuses its SVIDs, granted and audited.
        room = MAX_ID_BYTES - len(TASK_PATH) - TASK_ID_CHARS
        if len(wanted.encode()) > room:
            raise InvalidRequestError(
                f"runtime_id: {len(wanted.encode())} bytes leave no room for a task's SPIFFE ID "
                f"(<runtime_id>{TASK_PATH}<task id>, at most {MAX_ID_BYTES} bytes): at most "
                f"{room} bytes"
            )
        entry = entitled_entry(
            self._state.entries,
            agent.spiffe_id,
            agent.selectors,
            self._server_id,
            self._now(),
            spiffe_id=wanted,
            entry_id=entry_id,
        )
        if entry is not None:
            return entry
        if entry_id:
            raise PermissionDeniedError(
                f"{wanted} is not the identity of an entry {entry_id[:80]!r} that agent "
                f"{agent.spiffe_id} may serve"
            )
        raise PermissionDeniedError(
            f"{wanted} is not an identity agent {agent.spiffe_id} may serve"
        )

    def _child_intent(self, req: BeginRequest, parent: Task | None) -> Intent:
        def pick(value: str, inherited: str, default: str) -> str:
            return value or (inherited if parent is not None else default)

        return Intent(
            actions=frozenset(req.actions),
            resources=frozenset(req.resources),
            classification=pick(
                req.classification, parent.classification if parent else "", "internal"
            ),
            environment=pick(req.environment, parent.environment if parent else "", ""),
            on_behalf_of=pick(req.on_behalf_of, parent.on_behalf_of if parent else "", ""),
            delegation_depth=parent.depth + 1 if parent is not None else 0,
            parent_task=parent.task_id if parent is not None else "",
            tools=frozenset(req.tools),
            elevated=req.elevate,
        )

    def _parent(self, agent: AttestedAgent, req: BeginRequest, runtime: Entry) -> Task | None:
        """The active parent of a sub-task or elevated step, begun by the same workload:
        `runtime` is the caller's entry (_runtime_entry). Its ID is public (every token's `txn`
        and `sub`), and another workload of the same SPIFFE ID would otherwise take a sub-task,
        delivered to itself, inside it (its on_behalf_of, its `act` chain)."""
        if not req.parent_task_id:
            return None
        parent = self._store.get_task(req.parent_task_id)
        if parent is None or parent.agent_id != agent.spiffe_id:
            raise NotFoundError(f"parent task {req.parent_task_id[:80]!r} not found")
        if parent.runtime_id != req.runtime_id:
            raise PermissionDeniedError(
                f"parent task {parent.task_id} belongs to {parent.runtime_id}, not {req.runtime_id}"
            )
        if not parent.runtime_entry_id:
            # Begun before tasks recorded their workload: whose it is cannot be told, so
            # nothing more is begun inside it (it ends by its TTL; a new task may be begun).
            raise PermissionDeniedError(
                f"parent task {parent.task_id} was begun before tasks recorded their workload; "
                "begin a new task instead of a sub-task of it"
            )
        if parent.runtime_entry_id != runtime.id:
            raise PermissionDeniedError(f"parent task {parent.task_id} belongs to another workload")
        if not parent.active:
            raise PermissionDeniedError(f"parent task {parent.task_id} is {parent.state.value}")
        return parent

    def _above(self, task: Task) -> Iterator[Task]:
        """The stored tasks above `task`, parent first. A generator: read only when asked, at
        most max_depth + 1 reads (the chain is at most max_depth long); an ancestor no longer
        stored ends the walk."""
        above = task.parent_task_id
        for _ in range(self.settings.max_depth + 1):
            found = self._store.get_task(above) if above else None
            if found is None:
                return
            yield found
            above = found.parent_task_id

    def _chain_ids(self, parent: Task | None) -> Iterator[str]:
        """The SPIFFE IDs of the tasks above a new task and of their runtimes, parent first:
        what its chain proves it may act for. Read only when asked, at most max_depth + 1
        tasks."""
        if parent is None:
            return
        chain = itertools.chain([parent], self._above(parent))
        for task in itertools.islice(chain, self.settings.max_depth + 1):
            yield task.runtime_id
            yield task.spiffe_id

    def _elevated_above(self, parent: Task) -> str:
        """The ID of an elevated step above `parent` in its chain ("" if none). A parent's end
        ends its sub-tasks, so an active parent's ancestors are active."""
        return next((task.task_id for task in self._above(parent) if task.elevated), "")

    def _deny(
        self,
        *,
        agent: AttestedAgent,
        runtime_id: str,
        intent: Intent,
        reason: str,
        flag: Flag | None,
        task_id: str = "",
        decision: Decision | None = None,
        extra: Mapping[str, Any] | None = None,
        audience: Sequence[str] | None = None,
    ) -> PermissionDeniedError:
        """Audit a refusal while its agent has budget for denials on record (past it, only
        counted: what a node's workloads ask for is theirs to repeat), and count it against
        the runtime when flagged; return the error.

        `audience`: a refused mint, recorded as asked for those audiences."""
        # Bounded whatever built it: the reason goes to the log line, the event and the gRPC
        # status (a trailer, refused past 16 KiB: the caller would not hear the denial).
        reason = cut_text(reason, MAX_REASON_BYTES)
        if flag is not None:
            # Whatever the budget: the count is an input of the next decisions (risk).
            self._store.add_violation(runtime_id, agent.spiffe_id, self._now())
            self._violations_added += 1
            self._violation_counts.pop((agent.spiffe_id, runtime_id), None)
        if not self._denials.on_record(agent.spiffe_id):
            return PermissionDeniedError(reason)
        fields: dict[str, Any] = {"decision": "deny", "reason": reason}
        if decision is not None:
            fields.update(decision.audit_fields())
        self._audit.append(
            EventKind.DENIAL,
            agent_id=runtime_id,
            node_id=agent.spiffe_id,
            on_behalf_of=intent.on_behalf_of or None,
            # Within the intent's (or the audiences') limits already; cut all the same, as
            # only `extra` is bounded by the log itself.
            resource=cut_text(
                ",".join(
                    sorted(audience if audience is not None else (*intent.resources, *intent.tools))
                ),
                MAX_DENIED_RESOURCE_BYTES,
            ),
            action=",".join(sorted(intent.actions or {INVOKE_TOOL})),
            task_id=task_id or None,
            risk=self.violations(agent.spiffe_id, runtime_id),
            extra={**(extra or {}), **({"flag": flag.value} if flag else {})},
            **fields,
        )
        _log.info(
            "task request denied",
            extra={"agent_id": runtime_id, "flag": flag.value if flag else "", "reason": reason},
        )
        return PermissionDeniedError(reason)

    def _decide_begin(
        self, agent: AttestedAgent, req: BeginRequest
    ) -> tuple[Task, Entry, EventDraft]:
        """Everything of `begin` that is synchronous: checks, decision, the records to write
        and the task-begin event to append once they are written."""
        # First of all: the intent's size is what the decision costs (every action on every
        # resource is asked of Cedar) and what every record of the task carries.
        too_big = intent_problem(
            req.actions,
            req.resources,
            req.tools,
            classification=req.classification,
            environment=req.environment,
            on_behalf_of=req.on_behalf_of,
        )
        if too_big:
            raise InvalidRequestError(too_big)
        refuse_unprintable("intent.actions", *req.actions)
        refuse_unprintable("intent.resources", *req.resources)
        refuse_unprintable("intent.tools", *req.tools)
        refuse_unprintable("intent.environment", req.environment)
        refuse_unprintable("intent.on_behalf_of", req.on_behalf_of)
        if req.elevate and not req.parent_task_id:
            raise InvalidRequestError(
                "elevate: an elevated step runs inside a task; set parent_task_id"
            )
        if req.goal_sha256 and (len(req.goal_sha256) != 64 or set(req.goal_sha256) - _HEX):
            raise InvalidRequestError("goal_sha256: must be 64 lowercase hex digits")
        try:
            runtime = self._runtime_entry(agent, req.runtime_id, req.runtime_entry_id)
            parent = self._parent(agent, req, runtime)
        except PermissionDeniedError as exc:
            # Refused before any policy decision, and an identity decision all the same.
            raise self._deny(
                agent=agent,
                runtime_id=req.runtime_id,
                intent=self._child_intent(req, None),
                reason=str(exc),
                flag=None,
            ) from None
        cap = self.settings.max_active_per_runtime
        if cap and self._held[agent.spiffe_id, req.runtime_id] >= cap:
            # Not a decision about the intent: nothing for the log (a runtime that keeps asking
            # would fill it); its running tasks are all on record.
            raise RateLimitedError(
                f"runtime {req.runtime_id} holds {cap} active tasks on this node "
                "(max_active_tasks_per_runtime): end one first"
            )
        if cap and self._ended_early(agent.spiffe_id, req.runtime_id) >= cap * ENDED_PER_ACTIVE:
            raise RateLimitedError(
                f"runtime {req.runtime_id} ended {cap * ENDED_PER_ACTIVE} tasks on this node "
                "before their expiry, and every agent is sent their revocations until then "
                f"({ENDED_PER_ACTIVE} x max_active_tasks_per_runtime): ask for TTLs as short "
                "as the work, or wait for one to run out"
            )
        intent = self._child_intent(req, parent)  # RequestError -> INVALID_ARGUMENT
        # Checked on the principal the task gets, inherited ones too: a parent begun before
        # this check may hold one its chain does not prove.
        unproven = principal_problem(intent.on_behalf_of, req.runtime_id, self._chain_ids(parent))
        if unproven:
            raise self._deny(
                agent=agent, runtime_id=req.runtime_id, intent=intent, reason=unproven, flag=None
            )
        ttl = req.ttl or self.settings.default_ttl
        if ttl < 0:
            raise InvalidRequestError(f"ttl: {ttl} is negative")
        ttl = min(ttl, self.settings.max_ttl)
        now = self._now()
        if runtime.expires_at:
            # A task is its runtime's unit of work: it ends when the runtime's entry does.
            ttl = max(1, min(ttl, runtime.expires_at - now))
        if parent is not None:
            # A sub-task only narrows its parent. An elevated step may go beyond it (policy
            # decides its scope alone, seeing `elevated`), for a short time inside the parent's.
            if req.elevate:
                verdict = check_elevation(
                    parent.intent(),
                    intent,
                    parent_remaining_ttl=parent.remaining(now),
                    requested_ttl=ttl,
                    max_ttl=self.settings.max_elevated_ttl,
                    max_depth=self.settings.max_depth,
                    elevated_above=self._elevated_above(parent),
                )
            else:
                verdict = narrow(
                    parent.intent(),
                    intent,
                    parent_remaining_ttl=parent.remaining(now),
                    requested_ttl=ttl,
                    max_depth=self.settings.max_depth,
                )
            if not verdict.ok:
                raise self._deny(
                    agent=agent,
                    runtime_id=req.runtime_id,
                    intent=intent,
                    reason=verdict.reason,
                    flag=verdict.flag,
                    extra={"parent_task": parent.task_id},
                )
            if verdict.max_ttl is not None:
                ttl = min(ttl, verdict.max_ttl)
        decision = self._policy.decide(
            DecisionRequest(
                agent_id=req.runtime_id,
                node_id=agent.spiffe_id,
                intent=intent,
                requested_ttl=ttl,
                violations=self.violations(agent.spiffe_id, req.runtime_id),
            )
        )
        if not decision.allowed:
            raise self._deny(
                agent=agent,
                runtime_id=req.runtime_id,
                intent=intent,
                reason=decision.reason,
                flag=None,
                decision=decision,
            )
        granted = decision.granted
        task_id = new_task_id()
        spiffe_id = f"{req.runtime_id.rstrip('/')}{TASK_PATH}{task_id}"
        ttl = max(1, min(decision.ttl, ttl))
        tools = {r for a, r in granted if a == INVOKE_TOOL and r in intent.tools}
        scope = [(a, r) for a, r in granted if r not in tools]
        task = Task(
            task_id=task_id,
            spiffe_id=spiffe_id,
            runtime_id=req.runtime_id,
            runtime_entry_id=runtime.id,
            agent_id=agent.spiffe_id,
            entry_id="",
            actions=tuple(sorted({a for a, _ in scope})),
            resources=tuple(sorted({r for _, r in scope})),
            tools=tuple(sorted(tools)),
            elevated=req.elevate,
            classification=intent.classification,
            environment=intent.environment,
            on_behalf_of=intent.on_behalf_of,
            goal_sha256=req.goal_sha256,
            parent_task_id=intent.parent_task,
            depth=intent.delegation_depth,
            ttl=ttl,
            created_at=now,
            expires_at=now + ttl,
            decision=decision.outcome.value,
            reason=decision.reason,
            policy_ids=decision.policy_ids,
            policy_set_hash=decision.policy_set_hash,
            act=actor_chain(spiffe_id, parent, intent.on_behalf_of),
        )
        entry = Entry(
            # Agents order a workload's identities by (created_at, id): "task-" sorts after any
            # hex id, so the runtime's own SVID stays the default even within the same second.
            id=f"task-{task_id}",
            spiffe_id=spiffe_id,
            parent_id=agent.spiffe_id,
            selectors=runtime.selectors,
            x509_svid_ttl=ttl,
            jwt_svid_ttl=min(ttl, self.settings.jwt_ttl),
            hint=f"task-{task_id}",
            expires_at=now + ttl,
        )
        # Appended by `begin` once the task's entry and row exist (see there).
        begun = _recordable(
            lambda: EventDraft(
                kind=EventKind.TASK_BEGIN,
                agent_id=req.runtime_id,
                node_id=agent.spiffe_id,
                on_behalf_of=intent.on_behalf_of or None,
                resource=",".join((*task.resources, *task.tools)),
                action=",".join(task.actions),
                task_id=task_id,
                risk=self.violations(agent.spiffe_id, req.runtime_id),
                extra={
                    "spiffe_id": spiffe_id,
                    "parent_task": task.parent_task_id,
                    "depth": task.depth,
                    "goal_sha256": req.goal_sha256,
                    "declared_actions": sorted(intent.actions),
                    "declared_resources": sorted(intent.resources),
                    "declared_tools": sorted(intent.tools),
                    "elevated": intent.elevated,
                    "classification": intent.classification,
                    "environment": intent.environment,
                },
                **decision.audit_fields(),  # type: ignore[arg-type]
            )
        )
        return task, entry, begun

    async def begin(self, agent: AttestedAgent, req: BeginRequest) -> Task:
        """The task's row with its task-begin event (one transaction), then it becomes
        active, and only then its entry is created (and pushed to agents).

        The log records every task stored and none whose row failed, and no agent hears of a
        task before it is active (an SVID it asked for earlier would be refused, or recorded
        without its task and outlive the task's end). If the row and event cannot be written,
        neither is kept and the task never becomes active; if the entry cannot be created, or
        a sub-task's parent ended meanwhile, the task ends at once (row revoked, a task-end
        event saying why) and nothing was issued for it."""
        task, entry, begun = await asyncio.to_thread(self._decide_begin, agent, req)
        # Shielded: a caller hanging up midway must not leave a task half begun (an event
        # committing in its thread while the task is undone, or a row never made active).
        write = asyncio.ensure_future(self._write_begin(task, entry, begun))
        try:
            return await asyncio.shield(write)
        except asyncio.CancelledError:
            # ...and then nobody ever hears this task's ID: end it once it is written, rather
            # than leave it (and its SVIDs) to run out its TTL.
            await asyncio.shield(self._end_unheard(write))
            raise

    async def _end_unheard(self, write: asyncio.Future[Task]) -> None:
        try:
            task = await write
        except Exception:  # not begun: nothing to end (the write undid it)
            return
        try:
            await self._finish(task, TaskState.REVOKED, "its caller hung up before the answer")
        except Exception:
            _log.exception("ending a task nobody heard of failed", extra={"task_id": task.task_id})

    async def _write_begin(self, task: Task, entry: Entry, begun: EventDraft) -> Task:
        task = replace(task, entry_id=entry.id)
        # The row and its event in one transaction: a failure (or a crash) keeps neither, so
        # there is nothing to undo. A commit whose answer was lost (a connection cut at
        # COMMIT) may have kept both: that task has no entry, so nothing is issued for it, and
        # the settle sweep ends it on record (cut_short_begins).
        await asyncio.to_thread(self._store.begin, task, self._audit, begun)
        self._set_active(task, True)
        why = "its parent task ended while it began"
        entry_tried = False
        try:
            if await asyncio.to_thread(self._parent_ended, task):
                raise PermissionDeniedError(
                    f"parent task {task.parent_task_id} ended while this sub-task began"
                )
            why = "its entry could not be created"
            entry_tried = True
            await self._state.create_entry(entry)
        except Exception:
            self._set_active(task, False)
            # Ended meanwhile by another server's sweep (a TTL shorter than this begin), or
            # with its parent: that one recorded the end. Ended here with the entry maybe
            # stored: the undo recorded it with the rest of the end's work.
            done = await self._undo_begin(task, why=why, entry_tried=entry_tried)
            if done is not None:
                try:
                    # The row's reason, which says why the begin failed. Settled only once the
                    # event is on the log: if it is not, settle_ends records it.
                    await self._record_end(done, done.state, done.end_reason, revoked=0)
                    await asyncio.to_thread(self._store.settle, done)
                except Exception:
                    _log.exception(
                        "recording a failed begin failed", extra={"task_id": task.task_id}
                    )
            raise
        _log.info("task begun", extra={"task_id": task.task_id, "agent_id": task.runtime_id})
        return task

    def _parent_ended(self, task: Task) -> bool:
        """Whether a sub-task being begun, stored now, lost its parent meanwhile. Its parent's
        end ends the sub-tasks it finds stored once that end is claimed (_carry_out_end): one
        stored after that is this check's to refuse."""
        if not task.parent_task_id:
            return False
        parent = self._store.get_task(task.parent_task_id)
        return parent is None or not parent.active

    async def _undo_begin(self, task: Task, *, why: str, entry_tried: bool = False) -> Task | None:
        """Best effort after a failed begin, its row and event stored: the caller gets the
        original error either way. The row as this call ended it, when it left its task-end
        event and the row's settling to the caller; None otherwise.

        ``entry_tried``: the entry's write failed, yet it may have committed (its answer lost
        at COMMIT). Then other servers may have followed the feed to an active task with an
        entry and issued for it (the ledger took those, the row being active): the end is
        carried out in full (revocations, the entry deleted, the event), as any end is. If
        that fails midway, the claimed end is left unsettled for `settle_ends` to finish."""
        try:
            self._set_active(task, False)
            done = await asyncio.to_thread(
                self._store.finish, task, TaskState.REVOKED, self._now(), f"begin failed: {why}"
            )
            if done is None:
                return None
            if entry_tried:
                await self._carry_out_end(done)
                return None
            # No entry was ever written: nothing was issued for it.
            return done
        except Exception:
            _log.exception("undoing a failed task begin failed", extra={"task_id": task.task_id})
        return None

    # -- per-mint decisions ---------------------------------------------------------------------

    def _mint_decision(
        self,
        agent_id: str,
        task: Task,
        audience: Sequence[str],
        *,
        actor: str = "",
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The (actions, tool names) this mint may carry, or PermissionDeniedError (audited,
        maybe flagged). Charged to `agent_id`'s decision budget before any work it bounds
        (RateLimitedError past it, with nothing decided or written). `actor`: a delegation by
        that workload, charged to a budget of its own with `agent_id`, even when policy
        answers it from its cache (see exchange_grant)."""
        agent = self._state.agents.get(agent_id) or AttestedAgent(agent_id, "", "", 0)
        intent, split_tools = self._facts_of(task)
        tools_by_name: dict[str, set[str]] = {}
        for _, server, name in split_tools:
            if server in audience:
                tools_by_name.setdefault(name, set()).add(server)
        pairs = [(a, aud) for a in task.actions for aud in audience if aud in task.resources]
        pairs += [(INVOKE_TOOL, ref) for ref, server, _ in split_tools if server in audience]
        verdict = check_audiences(intent, audience)
        if not verdict.ok:
            # Decides nothing, yet writes a violation row (and maybe a denial event): charged
            # first, so that past the budget a runtime's out-of-intent mints write nothing.
            self._charge(agent_id, len(pairs), actor)
            raise self._deny(
                agent=agent,
                runtime_id=task.runtime_id,
                intent=intent,
                audience=audience,
                reason=verdict.reason,
                flag=verdict.flag,
                task_id=task.task_id,
                extra={"audience": list(audience)},
            )
        remaining = task.remaining(self._clock.now())
        if remaining <= 0:
            raise PermissionDeniedError(f"task {task.task_id} has expired")
        request = DecisionRequest(
            agent_id=task.runtime_id,
            node_id=task.agent_id,
            intent=intent,
            requested_ttl=remaining,
            violations=self.violations(task.agent_id, task.runtime_id),
            pairs=tuple(pairs),
        )
        if actor or self._policy.known(request) is None:
            # The same question within the second (a burst of one task's exchanges for a
            # resource, its mints after its agent's restart) is answered from policy's cache,
            # at no cost to what the budget bounds: charged, it refused them for work not done.
            # A second turning between here and decide() lets one decision through uncharged.
            self._charge(agent_id, len(pairs), actor)
        decision = self._policy.decide(request)
        # The token names every audience, so it may carry only what is granted on all of them:
        # an action on each, a tool of each (`tool:<name>` then means that tool of every one).
        granted = set(decision.granted)
        actions = {a for a in task.actions if all((a, aud) in granted for aud in audience)}
        tools = {
            name
            for name in tools_by_name
            if all((INVOKE_TOOL, f"{aud}#{name}") in granted for aud in audience)
        }
        if not actions and not tools:
            raise self._deny(
                agent=agent,
                runtime_id=task.runtime_id,
                intent=intent,
                audience=audience,
                reason=f"context no longer valid: {decision.reason}",
                flag=None,
                task_id=task.task_id,
                decision=decision,
            )
        return tuple(sorted(actions)), tuple(sorted(tools))

    def _charge(self, agent_id: str, pairs: int, actor: str = "") -> None:
        """Take a decision of `pairs` from the agent's budget (or that of `actor`'s delegations
        for its tasks), or RateLimitedError. Not a decision about the intent: nothing for the
        audit log (the agent may ask again at once, and the refusal is what keeps it from
        costing us)."""
        budget = f"{agent_id} delegations by {actor}" if actor else agent_id
        if not self._mint_pairs.try_take(budget, max(1, pairs)):
            whose = f"delegations by {actor} for agent" if actor else "agent"
            raise RateLimitedError(
                f"task JWT decision budget exceeded for {whose} {agent_id}: this asks "
                f"{pairs} (action, audience) pairs, "
                f"{self.settings.mint_pairs_rate_per_agent:g} a second allowed"
            )

    def _facts_of(self, task: Task) -> tuple[Intent, tuple[tuple[str, str, str], ...]]:
        """The task's intent and its tools split (ref, server, name): pure functions of the
        task, read on every mint and exchange, so made once per Task object."""
        facts = self._facts.get(task.task_id)
        if facts is None or facts[0] is not task:
            if len(self._facts) >= _FACTS_CACHE_SIZE:  # ended tasks' facts go with the rest
                self._facts.clear()
            split = tuple((ref, *split_tool(ref)) for ref in task.tools)
            facts = self._facts[task.task_id] = (task, task.intent(), split)
        return facts[1], facts[2]

    # -- the issuer's task port (server.issuance.TaskDecisions) ------------------------------------

    def owns(self, entry: Entry) -> bool:
        return is_task_id(entry.spiffe_id)

    def _held_task(self, agent_id: str, entry: Entry) -> Task:
        # Only an active task is served: its entry reaches agents after it became active
        # (begin), and an X.509-SVID asked for before then would be recorded without the task
        # and outlive its end.
        task = self._active.get(entry.spiffe_id)
        if task is None or task.agent_id != agent_id:
            raise PermissionDeniedError(f"task identity {entry.spiffe_id} is not active")
        return task

    def ended(self, spiffe_id: str) -> bool:
        # Not what keeps a token of an ended task from leaving unrevoked: the ledger refuses a
        # credential recorded after the end was claimed, through any server (TaskStore.finish,
        # AuditStore.write_ledger). This withholds one recorded just before this server's own
        # end claimed it (`_finish` drops the task from `_active` first): that end revokes it,
        # and its caller is better told the task ended than handed a token revoked at once.
        return is_task_id(spiffe_id) and spiffe_id not in self._active

    def x509_grant(self, agent_id: str, entry: Entry) -> TaskGrant:
        task = self._held_task(agent_id, entry)
        return TaskGrant(task.task_id, task.runtime_id, task.expires_at)

    def jwt_grant(self, agent_id: str, entry: Entry, audience: Sequence[str]) -> TaskJwtGrant:
        """A task JWT-SVID decided again: its txn/scope/tctx/act claims and TTL."""
        task = self._held_task(agent_id, entry)
        actions, tools = self._mint_decision(agent_id, task, audience)
        scope = " ".join((*actions, *(f"{TOOL_SCOPE_PREFIX}{t}" for t in tools)))
        claims = task_claims(task, scope)
        ttl = max(
            1, min(entry.jwt_svid_ttl or self.settings.jwt_ttl, task.remaining(self._clock.now()))
        )
        return TaskJwtGrant(
            task_id=task.task_id,
            runtime_id=task.runtime_id,
            on_behalf_of=task.on_behalf_of,
            ttl=ttl,
            scope=scope,
            claims=claims,
            policy_set_hash=self._policy.policy_set_hash,
        )

    def scope_ceiling(self, spiffe_id: str, resource: str) -> frozenset[str] | None:
        """The most an exchange of the active task with this SPIFFE ID could be granted for
        `resource`, decided by nothing: its granted actions if `resource` is one of its
        resources, and `tool:<name>` for each of its tools on `resource` (what _mint_decision
        puts before policy). None when no such task is active. A scope outside it is refused
        before the presented token is spent (server/oauth); when it is empty (`resource` is
        outside the intent), the decision refuses, and flags, as without a scope."""
        task = self._active.get(spiffe_id)
        if task is None:
            return None
        _, split_tools = self._facts_of(task)
        actions = task.actions if resource in task.resources else ()
        tools = (
            f"{TOOL_SCOPE_PREFIX}{name}" for _, server, name in split_tools if server == resource
        )
        return frozenset((*actions, *tools))

    def exchange_grant(
        self, spiffe_id: str, resource: str, *, actor: str = ""
    ) -> tuple[Task, TaskJwtGrant]:
        """An OAuth token exchange (server/oauth) for the active task with this SPIFFE ID: the
        same fresh decision as a task JWT mint, for `resource`, charged to the same budget
        (the task's agent's: RateLimitedError past it); PermissionDeniedError (audited)
        otherwise. Uncharged, an exchanger drove policy decisions and violation rows at will.

        `actor`: a delegation by that workload, charged even when policy answers it from its
        cache: an exchange uses up its subject token (once per resource), itself minted within
        the JWT signing budget, but a delegation presents the same tokens again and again, and
        only this budget bounds the token, credential row and event each one makes. Charged
        to a budget of the actor's with the task's agent, not to the agent's own: else a
        workload a task called, delegating on, spent the budget of that task's node and
        refused its workloads their own task JWT mints and exchanges."""
        task = self._active.get(spiffe_id)
        if task is None:
            raise PermissionDeniedError(f"task identity {spiffe_id[:200]} is not active")
        actions, tools = self._mint_decision(task.agent_id, task, (resource,), actor=actor)
        scope = " ".join((*actions, *(f"{TOOL_SCOPE_PREFIX}{t}" for t in tools)))
        grant = TaskJwtGrant(
            task_id=task.task_id,
            runtime_id=task.runtime_id,
            on_behalf_of=task.on_behalf_of,
            ttl=max(1, task.remaining(self._clock.now())),
            scope=scope,
            claims=task_claims(task, scope),
            policy_set_hash=self._policy.policy_set_hash,
        )
        return task, grant

    def record_validations(self, agent_id: str, validations: Sequence[Any]) -> None:
        """ValidateJWTSVID answers an agent reports (task_pb2.Validation): one event each
        (server.tasks.validations)."""
        events = validation_events(agent_id, validations)
        if events:
            self._audit.append_many(events)

    # -- end and revocation ---------------------------------------------------------------------

    async def end(
        self,
        agent: AttestedAgent,
        task_id: str,
        runtime_ids: Sequence[str],
        reason: str = "",
        runtime_entry_ids: Sequence[str] = (),
    ) -> Task:
        """End the task as its runtime: `reason` is the runtime's own (runtime_end_reason).
        `runtime_ids`, `runtime_entry_ids`: the caller's identities and entries, as its agent
        found them (none: not checked; an agent from before entries were sent sends none)."""
        end_reason = runtime_end_reason(reason)
        task = await asyncio.to_thread(self._store.get_task, task_id)
        if task is None or task.agent_id != agent.spiffe_id:
            raise NotFoundError(f"task {task_id[:80]!r} not found")
        if (runtime_ids and task.runtime_id not in runtime_ids) or not owned_by(
            task, runtime_entry_ids
        ):
            raise PermissionDeniedError(f"task {task_id} belongs to another workload")
        if not task.active:
            return task
        return await self._finish(task, TaskState.ENDED, end_reason)

    async def revoke(self, task_id: str, reason: str) -> Task:
        # Refused before the end is claimed: its revocation and task-end events carry the
        # reason, and one refused after it left the task ended without them, its end never
        # settled (settle_ends failed on the same reason every time).
        check_no_secret("reason", reason)
        task = await asyncio.to_thread(self._store.get_task, task_id)
        if task is None:
            raise NotFoundError(f"task {task_id[:80]!r} not found")
        if not task.active:
            return task
        return await self._finish(task, TaskState.REVOKED, reason or "revoked by an operator")

    async def expire_due(self) -> int:
        now = self._now()
        stored = await asyncio.to_thread(self._store.due, now)
        # Memory's due tasks too: one another server's sweep or EndTask ended first is no
        # longer due in the store, and stayed served here (and kept next_expiry in the past)
        # until the change feed brought its end.
        held = [t for t in self._active.values() if t.expires_at <= now]
        due = {t.task_id: t for t in (*held, *stored)}
        for task in due.values():
            current = await asyncio.to_thread(self._store.get_task, task.task_id)
            if current is not None and current.active:
                await self._finish(current, TaskState.EXPIRED, "task TTL ran out")
            else:
                self._set_active(task, False)
        return len(due)

    async def revoke_agent(
        self,
        agent_id: str,
        reason: str,
        *,
        banned: bool = False,
        claim: RemovalClaim | None = None,
    ) -> int:
        """Eviction or ban: end the agent's tasks, revoke every credential it still holds.
        Run again (a removal retried after one cut short), it does what is left, and logs the
        removal itself only if the first run did not.

        `claim`: the removal's finisher's (server/tasks/removals.py). The removal's own events
        (its event, the agent's revocations) are then logged only while the claim is held,
        in the write's transaction: a finisher that lost it to another server gets LedgerError
        caused by RemovalClaimLostError and logs nothing more, so each is logged once, by
        the holder. (Its tasks' ends are each carried out once by their own compare-and-set.)"""
        kind = EventKind.AGENT_BANNED if banned else EventKind.AGENT_EVICTED
        if not await asyncio.to_thread(self._removal_recorded, agent_id, kind):
            removed = EventDraft(
                kind=kind, agent_id=agent_id, node_id=agent_id, decision="revoked", reason=reason
            )
            await asyncio.to_thread(self._audit.append_many, [removed], claim=claim)
        tasks = await asyncio.to_thread(
            self._store.list_tasks, agent_id=agent_id, state=TaskState.ACTIVE.value
        )
        for task in tasks:
            await self._finish(task, TaskState.REVOKED, reason)
        creds = await asyncio.to_thread(self._store.agent_credentials, agent_id, self._now())
        # Stored and on the log are two commits: a removal cut short between them left
        # revocations without their events, so those are looked for on the log, not inferred.
        recorded = await asyncio.to_thread(self._agent_revocations_recorded, agent_id, creds)
        await self._revoke(
            [c for c in creds if not self._state.is_revoked(c.kind, c.value)],
            reason,
            agent_id=agent_id,
            task=None,
            unrecorded=[c for c in creds if c.value not in recorded],
            claim=claim,
        )
        return len(creds)

    async def removal_left(self, agent_id: str) -> bool:
        """Whether an agent whose row is gone still holds anything its removal would revoke
        (revoke_agent): an active task, a credential some verifier may still accept and not
        revoked, or revoked with no revocation event on the log. Reads only.

        A removal deletes the agent's row first (it can mint nothing more), then revokes, then
        logs the revocations: a server that died in between left the agent gone and its
        credentials and tasks live, or revoked off the record, and the operator, never
        answered, evicts again (AgentRemovals.retried finishes it)."""
        tasks = await asyncio.to_thread(
            self._store.list_tasks, agent_id=agent_id, state=TaskState.ACTIVE.value
        )
        if tasks:
            return True
        creds = await asyncio.to_thread(self._store.agent_credentials, agent_id, self._now())
        if not all(self._state.is_revoked(c.kind, c.value) for c in creds):
            return True
        recorded = await asyncio.to_thread(self._agent_revocations_recorded, agent_id, creds)
        return not all(c.value in recorded for c in creds)

    def _removal_recorded(self, agent_id: str, kind: str) -> bool:
        """Whether the log holds a `kind` event (eviction, ban) of the agent since it last
        attested: that removal is on the log. One from before the agent came back is another
        removal's. Reads the agent's own events (its attestations and removals) by index."""
        recorded = False
        # As it stood before the last allowed attestation, and that attestation's SVID: a deny
        # of the same SVID after it says the admission did not take (the save refused it, the
        # agent removed meanwhile: AgentAdmission.admit), so the agent did not come back.
        before_allow, allowed = False, None
        for row in self._audit.store.audit_rows(EventFilter(agent_id=agent_id)):
            if row["kind"] == kind:
                recorded = True
            elif row["kind"] != EventKind.NODE_ATTESTATION:
                continue
            elif row["decision"] == "allow":
                before_allow, recorded, allowed = recorded, False, row["credential_id"]
            elif allowed is not None and row["credential_id"] == allowed:
                # A removal logged between that allow and this deny is on the log all the same.
                recorded, allowed = before_allow or recorded, None
        return recorded

    def _agent_revocations_recorded(self, agent_id: str, creds: Sequence[Credential]) -> set[str]:
        """The credential ids the log holds a revocation event of, for agent `agent_id`'s
        credentials `creds` (its tasks' too: every revocation event names the node as node_id).
        A delegated token a workload of the agent acts with is its task's too: the end of that
        task, on another node, logged its revocation under that node and the task."""
        rows = self._audit.store.audit_rows(
            EventFilter(kind=EventKind.REVOCATION, node_id=agent_id)
        )
        recorded = {str(row["credential_id"]) for row in rows}
        acted_for = {c.task_id for c in creds if c.agent_id != agent_id and c.value not in recorded}
        for task_id in sorted(acted_for):
            recorded |= self._revocations_recorded(task_id)
        return recorded

    async def _revoke(
        self,
        creds: Sequence[Credential],
        reason: str,
        *,
        agent_id: str,
        task: Task | None,
        unrecorded: Sequence[Credential] | None = None,
        claim: RemovalClaim | None = None,
        ended: Task | None = None,
    ) -> None:
        """Revoke `creds`, then record a revocation event for each of `unrecorded` (default:
        `creds`; a finishing end passes those whose event is not on the log yet), under the
        removal's `claim` if given (revoke_agent). `ended`: a task whose end is published
        with them (its REVOKED_TASK entry), in the same write, so a verifier or runtime that
        sees one of its credentials revoked sees the end with it."""
        events = creds if unrecorded is None else unrecorded
        now = self._now()
        items = tuple(
            Revocation(c.kind, c.value, c.spiffe_id, c.expires_at, reason, now, c.issuer)
            for c in creds
        )
        if ended is not None and not self._state.is_revoked(REVOKED_TASK, ended.task_id):
            items = (task_end_revocation(ended, reason, now), *items)
        if items:
            await self._state.add_revocations(items)
        if not events:
            return
        await asyncio.to_thread(
            self._audit.append_many,
            [
                EventDraft(
                    kind=EventKind.REVOCATION,
                    agent_id=task.runtime_id if task is not None else c.spiffe_id,
                    node_id=agent_id,
                    decision="revoked",
                    reason=reason,
                    task_id=task.task_id if task is not None else (c.task_id or None),
                    credential_id=c.value,
                    extra={"kind": c.kind, "spiffe_id": c.spiffe_id, "expires_at": c.expires_at},
                )
                for c in events
            ],
            claim=claim,
        )

    async def _finish(self, task: Task, state: TaskState, reason: str) -> Task:
        """End an active task once across every server sharing the datastore: the call whose
        write moves the row out of `active` (a compare-and-set, TaskStore.finish) revokes its
        credentials, deletes its entry and records the one task-end event. A call that finds
        it ended already (an EndTask racing an expiry sweep, two servers sweeping the same due
        task) only forgets it here and returns the row as the winner left it. A CAS rather
        than a lease: expiry does not wait for any one server to be alive."""
        self._set_active(task, False)
        now = self._now()
        done = await asyncio.to_thread(self._store.finish, task, state, now, reason)
        if done is None:
            stored = await asyncio.to_thread(self._store.get_task, task.task_id)
            _log.debug("task already ended elsewhere", extra={"task_id": task.task_id})
            return stored if stored is not None else task
        await self._carry_out_end(done)
        return done

    async def _carry_out_end(self, done: Task, *, again: bool = False) -> None:
        """The work of an end this server claimed: revoke what the task was issued, delete its
        entry, record the task-end event, then settle the row (TaskStore.settle). Until then
        the end can be finished by another server (`settle_ends`); `again` is that: what the
        server before did already (revocations, the event) is not done twice."""
        # Sub-tasks live inside their parent: they end with it (each once, by the same CAS).
        # Listed only now that the parent's end is claimed: a sub-task stored after this
        # finds its parent ended and ends itself (_parent_ended). Read by the parent's id in an
        # index, only those rows: the datastore's, not memory's, as a sub-task another server
        # began may not have reached this one's yet. (Read among its runtime's active tasks,
        # each end cost up to a node's cap of rows, and a sweep of n tasks n squared.)
        children = await asyncio.to_thread(self._store.active_sub_tasks, done.task_id)
        for child in children:
            await self._finish(child, done.state, f"parent task {done.task_id} ended")
        now = self._now()
        creds = await asyncio.to_thread(self._store.task_credentials, done.task_id, now)
        # One revoked already (a delegated token whose acting workload's agent was removed
        # first) was logged by what revoked it, or is by that removal's finisher: neither
        # stored nor logged again.
        fresh = unrecorded = [c for c in creds if not self._state.is_revoked(c.kind, c.value)]
        if again:
            # Stored and on the log are two commits: the server before may have died between
            # them, so each is looked for on its own (a revocation stored without its event
            # would otherwise never reach the log).
            recorded = await asyncio.to_thread(self._revocations_recorded, done.task_id)
            unrecorded = [c for c in creds if c.value not in recorded]
        await self._revoke(
            fresh,
            done.end_reason,
            agent_id=done.agent_id,
            task=done,
            unrecorded=unrecorded,
            ended=done,
        )
        if done.entry_id:
            # Deleted in the datastore whether or not this server's memory holds it: the feed
            # may not have brought it here yet (begun on another server), or its write's answer
            # was lost (_undo_begin). LookupError: none stored, or deleted meanwhile (an
            # operator's `entry delete`).
            with contextlib.suppress(LookupError):
                await self._state.delete_entry(done.entry_id)
        if not again or not await asyncio.to_thread(self._end_recorded, done.task_id):
            await self._record_end(done, done.state, done.end_reason, revoked=len(creds))
        await asyncio.to_thread(self._store.settle, done)
        _log.info(
            "task finished",
            extra={"task_id": done.task_id, "state": done.state.value, "revoked": len(creds)},
        )

    def _revocations_recorded(self, task_id: str) -> set[str]:
        """The credential ids the log holds a revocation event of, for task `task_id`."""
        rows = self._audit.store.audit_rows(EventFilter(kind=EventKind.REVOCATION, task_id=task_id))
        return {str(row["credential_id"]) for row in rows}

    def _begin_recorded(self, task_id: str) -> bool:
        rows = self._audit.store.audit_rows(EventFilter(kind=EventKind.TASK_BEGIN, task_id=task_id))
        return next(iter(rows), None) is not None

    def _end_recorded(self, task_id: str) -> bool:
        rows = self._audit.store.audit_rows(EventFilter(kind=EventKind.TASK_END, task_id=task_id))
        return next(iter(rows), None) is not None

    async def settle_ends(self, grace: int = END_GRACE) -> int:
        """Finish the ends claimed more than `grace` seconds ago and never settled, and end
        the tasks whose begin was cut short more than `grace` seconds ago: the server that
        claimed or began one died (or failed) midway. One server at a time runs this (app.py:
        the housekeeping lease holder); returns how many tasks it finished."""
        now = self._now()
        stale = await asyncio.to_thread(self._store.unsettled, now - grace)
        for task in stale:
            self._set_active(task, False)
            _log.warning("finishing a task end left half done", extra={"task_id": task.task_id})
            await self._carry_out_end(task, again=True)
        active = await asyncio.to_thread(self._store.list_tasks, state=TaskState.ACTIVE.value)
        cut_short = cut_short_begins(active, self._state.entries.by_id, now, now - grace)
        if cut_short:
            # Memory may be behind the datastore (another server's entries reach it through
            # the change feed): only an entry missing from the datastore too tells.
            stored = await asyncio.to_thread(
                self._store.stored_entry_ids, [t.entry_id for t in cut_short]
            )
            cut_short = cut_short_begins(cut_short, stored, now, now - grace)
        for task in cut_short:
            _log.warning("ending a task whose begin was cut short", extra={"task_id": task.task_id})
            reason = BEGIN_CUT_SHORT
            if not await asyncio.to_thread(self._begin_recorded, task.task_id):
                # A row an older server stored before its event (a rolling upgrade; a begin
                # now commits both at once). Else the log's only word of the task is its
                # end: a task it never saw begin, though its row was active (its decision and
                # grant are in the row).
                await asyncio.to_thread(self._audit.append_many, [recovered_begin(task)])
                reason = BEGIN_UNLOGGED
            await self._finish(task, TaskState.REVOKED, reason)
        return len(stale) + len(cut_short)

    async def end_unentitled(self) -> int:
        """End the active tasks whose runtime's entry was deleted, or changed its SPIFFE ID or
        selectors, or its parent to one the task's agent does not serve (runtime_changed; the
        workload moved to another node: the task's entry, parented to the old node's agent,
        went on serving there): a task is its runtime's unit of work, and its entry copies
        the runtime's selectors, so it went on serving its SVIDs, for up to its TTL, to the
        workload the operator had just taken the identity from. So does a task served through
        a node alias that no longer covers its agent: the alias deleted or expired, or the
        agent's node selectors changed; and one whose runtime's entry expired (its expiry
        moved before the task's). Memory names the candidates (only when the entries or the
        agents changed since the last call, or an alias or runtime's entry expired); the
        datastore confirms them, as memory may be behind another server's writes. Returns how
        many it ended."""
        entries = self._state.entries
        agents = self._state.agents
        now = self._now()
        full = entries is not self._entries_checked or now >= self._lapses_at
        if full:
            active = list(self._active.values())
        elif agents is self._agents_checked:
            return 0
        else:
            # Only agents' records changed: only those whose node selectors (which aliases
            # match on) changed may have lost an alias. Every renewal changes a record: each
            # sent all that agent's tasks to runtime_changed, and a walk of every active task
            # held the event loop 5 to 17 ms at 10k tasks (now in a thread, as the scans).
            before = self._agents_checked
            active = await asyncio.to_thread(self._moved_agents_tasks, before, agents)
        served = self._served_within(entries)
        changed = await asyncio.to_thread(runtime_changed, active, entries.by_id, served)
        if changed:
            ids = sorted({i for t in changed for i in (t.entry_id, t.runtime_entry_id)})
            stored = await asyncio.to_thread(self._store.stored_entries, ids)
            changed = runtime_changed(changed, stored, served)
        for task in changed:
            _log.warning(
                "ending a task whose runtime's entry went or changed",
                extra={"task_id": task.task_id, "entry_id": task.runtime_entry_id},
            )
            reason = RUNTIME_ENTRY_CHANGED.format(entry_id=task.runtime_entry_id)
            await self._finish(task, TaskState.REVOKED, reason)
        if full:  # else the entries are those it was computed from: still as early or earlier
            # In a thread: a walk of every active task (10 ms at 10k), as runtime_changed's.
            tasks = self._active
            self._lapses_at = await asyncio.to_thread(
                lapses_at, entries, self._server_id, tasks.values(), now
            )
        # Only once all are ended: one that failed is tried again next time.
        self._entries_checked = entries
        self._agents_checked = agents
        return len(changed)

    def _moved_agents_tasks(self, before: AgentIndex | None, after: AgentIndex) -> list[Task]:
        """The active tasks of the agents whose node selectors moved from `before` to
        `after`."""
        tasks = self._active
        with self._lock:
            held = {agent_id for agent_id, _ in self._held}
        moved = moved_agents(held, before, after)
        return [t for t in tasks.values() if t.agent_id in moved] if moved else []

    def _served_within(self, entries: EntryIndex) -> Callable[[Task, Entry], bool]:
        """Whether a task's agent still serves `runtime` (its runtime's entry, from `entries`
        or stored) as `entries` stands: its parent is the agent or a live node alias of the
        agent's (entitled_entry's test at the begin). Judged only on what memory can tell:
        a stored entry whose parent memory has not caught up with yet (a node alias made
        with it on another server may not be here either), or an agent memory does not
        know, counts as served; the feed bringing them changes the entries, and the check
        runs again."""
        now = self._now()
        agents = self._state.agents
        parents: dict[str, frozenset[str]] = {}  # by agent: its aliases are read once

        def served(task: Task, runtime: Entry) -> bool:
            if not live(runtime, now):
                return False  # expired: it serves no one (its expiry moved before the task's)
            if runtime.parent_id == task.agent_id:
                return True
            held = entries.by_id.get(runtime.id)
            agent = agents.get(task.agent_id)
            if held is None or held.parent_id != runtime.parent_id or agent is None:
                return True
            if task.agent_id not in parents:
                parents[task.agent_id] = agent_parents(
                    entries, task.agent_id, agent.selectors, self._server_id, now
                )
            return runtime.parent_id in parents[task.agent_id]

        return served

    async def end_agentless(self) -> int:
        """End the active tasks whose agent's SVID expired unrenewed (agent_lapsed): only
        that agent serves a task's entry, and only it may end the task, so a join-token node
        that attested again (a new token is a new agent ID) could not end the tasks it began
        under its old ID, which went on, their SVIDs and tokens valid and the old ID's cached
        ones still served, up to their TTL. Memory names the candidates; the stored record
        confirms them (a renewal through another server may not be here yet). An evicted or
        banned agent's tasks its removal ends (revoke_agent). Returns how many it ended."""
        now = self._now()
        if now < self._lapses_held_until:
            return 0
        agents = self._state.agents
        lapsed = {
            t.agent_id for t in self._active.values() if agent_lapsed(agents.get(t.agent_id), now)
        }
        ended = 0
        for agent_id in sorted(lapsed):
            stored = await asyncio.to_thread(self._store.stored_agent, agent_id)
            if stored is None or not agent_lapsed(stored, now):
                continue
            tasks = await asyncio.to_thread(
                self._store.list_tasks, agent_id=agent_id, state=TaskState.ACTIVE.value
            )
            # Only those begun under the lapsed SVID (a begin is refused from its expiry on):
            # the node may have attested again under the same ID (x509pop, TPM) since the
            # record was read, and begun tasks with its new SVID, which are not lapsed.
            for task in (t for t in tasks if t.created_at < stored.expires_at):
                _log.warning(
                    "ending a task whose agent's SVID expired",
                    extra={"task_id": task.task_id, "agent_id": agent_id},
                )
                await self._finish(task, TaskState.REVOKED, AGENT_LAPSED)
                ended += 1
        return ended

    async def _record_end(self, task: Task, state: TaskState, reason: str, *, revoked: int) -> None:
        await asyncio.to_thread(
            self._audit.append,
            EventKind.TASK_END,
            agent_id=task.runtime_id,
            node_id=task.agent_id,
            on_behalf_of=task.on_behalf_of or None,
            task_id=task.task_id,
            decision=state.value,
            reason=reason,
            extra={"spiffe_id": task.spiffe_id, "revoked": revoked},
        )

    # -- reads ----------------------------------------------------------------------------------

    def get(self, task_id: str) -> Task:
        task = self._store.get_task(task_id)
        if task is None:
            raise NotFoundError(f"task {task_id[:80]!r} not found")
        return task

    def list(
        self,
        *,
        agent_id: str = "",
        state: str = "",
        runtime_ids: Sequence[str] | None = None,
        runtime_entry_ids: Sequence[str] = (),
        after: TaskCursor | None = None,
        limit: int = 0,
    ) -> TaskList:
        """Oldest first, after `after`, at most `limit` (0: all). With `runtime_entry_ids`,
        only the tasks those workloads own (owned_by): the entry is in a task's body, not a
        column, so rows are read in growing batches until `limit` of theirs are found, the rows
        run out, or max_scanned_rows (at least `limit`) are read: then fewer are found, and
        `read_to` says where the next read goes on."""
        if not runtime_entry_ids or not limit:
            tasks = self._store.list_tasks(
                agent_id=agent_id, state=state, runtime_ids=runtime_ids, after=after, limit=limit
            )
            return TaskList([t for t in tasks if owned_by(t, runtime_entry_ids)])
        bound = max(limit, self.settings.max_scanned_rows)
        found: list[Task] = []
        read = 0
        size = limit
        while True:
            # Growing: a page of a workload whose tasks are dense reads little more than its
            # own, one of a sparse workload few queries.
            size = min(size, bound - read)
            batch = self._store.list_tasks(
                agent_id=agent_id, state=state, runtime_ids=runtime_ids, after=after, limit=size
            )
            read += len(batch)
            found.extend(t for t in batch if owned_by(t, runtime_entry_ids))
            if len(batch) < size or len(found) >= limit:
                return TaskList(found[:limit])
            after = TaskCursor(batch[-1].created_at, batch[-1].task_id)
            if read >= bound:
                return TaskList(found, read_to=after)
            size *= 2

    def crl(self) -> tuple[bytes, ...]:
        """The CRLs of the revoked X.509 serials whose certificates are still valid, each CA's
        signed by that CA (server.tasks.crl); none while there are none."""
        issuers = [(s.ca_certificate, s.sign_crl) for s in self._ca.x509_crl_signers()]
        return self._crl.get(issuers, self._state.revocations, self._clock.now())

    def refresh_crl(self) -> bool:
        """Sign the CRLs again once half their validity has passed, and have every agent take
        them (True when it did): agents get CRLs with each revocation, and a quiet revocation
        list would leave them one whose nextUpdate has passed."""
        if not self._crl.due(self._clock.now()):
            return False
        self.crl()
        self._crl.given()
        self._state.crl_refreshed()
        return True

    async def housekeeping(self) -> None:
        await self.expire_due()
        now = self._now()
        with self._lock:
            # Past its expiry a task is refused anyway (and expired on every server).
            self._ended = {k: at for k, at in self._ended.items() if at >= now}
            # Those of runtimes that begin no more (only a begin looks at its own).
            self._listed = {
                key: kept
                for key, listed in self._listed.items()
                if (kept := [at for at in listed if at > now])
            }
            for kept in self._listed.values():
                heapq.heapify(kept)
        await asyncio.to_thread(self._store.prune, self._now(), self.settings.violation_window)
        # Last: an agent's record it cannot read, run after run, holds up no pruning.
        await self.end_agentless()


def _recordable(draft: Callable[[], EventDraft]) -> EventDraft:
    """The task-begin event, or InvalidRequestError when the intent it records is too large
    for an audit event (the caller's to shrink, not an audit log failure)."""
    try:
        return draft()
    except SecretInAuditError:
        raise  # already the caller's (INVALID_ARGUMENT), with its own message
    except AuditError as exc:
        raise InvalidRequestError(f"intent: too large to record in the audit log: {exc}") from None


def recovered_begin(task: Task) -> EventDraft:
    """The task-begin event of a begin cut short before its event, as its row keeps it: the
    decision and what was granted. What was declared, and the risk read then, are not kept;
    `recovered` says so, and `begun_at` when the task was stored (the event's own time is
    the recovery's)."""
    return EventDraft(
        kind=EventKind.TASK_BEGIN,
        agent_id=task.runtime_id,
        node_id=task.agent_id,
        on_behalf_of=task.on_behalf_of or None,
        resource=",".join((*task.resources, *task.tools)),
        action=",".join(task.actions),
        task_id=task.task_id,
        decision=task.decision,
        reason=task.reason,
        policy_ids=task.policy_ids,
        policy_set_hash=task.policy_set_hash or None,
        ttl=task.ttl,
        extra={
            "spiffe_id": task.spiffe_id,
            "parent_task": task.parent_task_id,
            "depth": task.depth,
            "goal_sha256": task.goal_sha256,
            "elevated": task.elevated,
            "classification": task.classification,
            "environment": task.environment,
            "begun_at": task.created_at,
            "recovered": "its server stopped before recording the begin; recorded from its row",
        },
    )


def cut_short_begins(
    active: Collection[Task], entry_ids: Container[str], now: int, before: int
) -> list[Task]:
    """The active tasks, begun before `before` and not due yet at `now`, that have no entry.

    A begin stores the task's row (active) with its event, and creates its entry last; the
    runtime hears of the task only after both. A row left active without its entry is a begin
    cut short (the server died midway, or the commit's answer was lost): no one holds the
    task, nothing can be issued for it, yet it stayed active until its TTL ran out (its begin
    never on the log, if an older server stored the row alone). Due tasks are left to the
    expiry (their entry expires with them)."""
    return [
        t
        for t in active
        if t.created_at < before and t.expires_at > now and t.entry_id not in entry_ids
    ]


def lapses_at(entries: EntryIndex, server_id: str, active: Iterable[Task], now: int) -> float:
    """When the first node alias, or runtime's entry of an `active` task, live at `now`
    expires (infinity when none will): the tasks it served stop being served then, though no
    entry changes."""
    aliases = (a.expires_at for a in entries.by_parent.get(server_id, ()))
    held = (entries.by_id.get(t.runtime_entry_id) for t in active if t.runtime_entry_id)
    runtimes = (e.expires_at for e in held if e is not None)
    return min((at for at in itertools.chain(aliases, runtimes) if at > now), default=float("inf"))


def moved_agents(
    agent_ids: Iterable[str], before: AgentIndex | None, after: AgentIndex
) -> set[str]:
    """The agents of `agent_ids` whose node selectors differ between the two snapshots (or
    whose record came or went): what an alias covers. A renewal moves none. All of them when
    there is no `before`."""
    moved = set()
    for agent_id in agent_ids:
        old = before.get(agent_id) if before is not None else None
        new = after.get(agent_id)
        if old is new and before is not None:
            continue
        if old is None or new is None or frozenset(old.selectors) != frozenset(new.selectors):
            moved.add(agent_id)
    return moved


def agent_lapsed(agent: AttestedAgent | None, now: int) -> bool:
    """Whether `agent`'s SVID expired unrenewed, MAX_CLOCK_SKEW ago (a server whose clock runs
    ahead ends nothing a renewal on another server still saves). False for no record (memory
    behind, or removed: the removal ends its tasks) and for a banned one (so is its ban's)."""
    return agent is not None and not agent.banned and 0 < agent.expires_at <= now - MAX_CLOCK_SKEW


def runtime_changed(
    active: Iterable[Task],
    entries: Mapping[str, Entry],
    served: Callable[[Task, Entry], bool] = lambda task, runtime: True,
) -> list[Task]:
    """The tasks of `active` whose runtime's entry is not in `entries`, or no longer gives
    their runtime ID, or selects other workloads than their own entry (which copied its
    selectors at the begin), or is not `served` by their agent any more. A task begun before
    its runtime's entry was recorded has none to check; one whose own entry is not in
    `entries` is left to the settle sweep (a begin cut short) or to what `entries` was read
    from (behind another server's writes)."""
    changed = []
    for task in active:
        own = entries.get(task.entry_id) if task.runtime_entry_id else None
        if own is None:
            continue
        runtime = entries.get(task.runtime_entry_id)
        if (
            runtime is None
            or runtime.spiffe_id != task.runtime_id
            or frozenset(runtime.selectors) != frozenset(own.selectors)
            or not served(task, runtime)
        ):
            changed.append(task)
    return changed


def follow_tasks(
    active: Mapping[str, Task], ended: Container[str], loaded: Mapping[str, Task | None]
) -> tuple[list[Task], list[Task]]:
    """What a reload of tasks changes in memory: (begun, ended). `active` is keyed by task
    SPIFFE ID, `ended` holds ids this server ended itself, `loaded` maps task ids to their row
    (None: gone). A row no longer active ends the task; an active row begins it unless this
    server already saw it end (an end is final: the row was read before it)."""
    by_id = {t.task_id: t for t in active.values()}
    begun: list[Task] = []
    gone: list[Task] = []
    for task_id, task in loaded.items():
        held = by_id.get(task_id)
        if task is not None and task.active:
            if task_id not in ended and held != task:
                begun.append(task)
        elif held is not None:
            gone.append(held)
    return begun, gone


def unseen_early_ends(
    active: Mapping[str, Task], ended: Container[str], loaded: Mapping[str, Task | None], now: int
) -> list[Task]:
    """The rows of `loaded` ended before their expiry (not expired yet) by another server,
    that this server neither holds active (keyed by SPIFFE ID) nor already knows ended."""
    return [
        task
        for task_id, task in loaded.items()
        if task is not None
        and not task.active
        and task.state is not TaskState.EXPIRED
        and task.expires_at > now
        and task_id not in ended
        and task.spiffe_id not in active
    ]


def owned_by(task: Task, runtime_entry_ids: Sequence[str]) -> bool:
    """Whether the workload of those entries (one caller's, as its agent found them) may end
    or list `task`: it began it under one of them. No entries: not checked (an agent from
    before entries were sent). A task begun before its entry was recorded has none to check:
    any workload of its runtime ID may end and list it, as before; ending only takes away,
    and refusing would leave its own workload unable to end it before its TTL."""
    if not runtime_entry_ids or not task.runtime_entry_id:
        return True
    return task.runtime_entry_id in runtime_entry_ids


def actor_chain(spiffe_id: str, parent: Task | None, on_behalf_of: str) -> dict[str, Any]:
    """The RFC 8693 `act` value of a task's tokens: this task, the current actor, outermost,
    then each task that delegated to it down to the root. A root task acting for nobody has no
    delegation to state ({})."""
    if parent is not None:
        # A parent begun before this format (act naming its principal) restarts the chain.
        own = parent.act.get("sub") == parent.spiffe_id
        prior = parent.act if own else {"sub": parent.spiffe_id}
        return {"sub": spiffe_id, "act": prior}
    return {"sub": spiffe_id} if on_behalf_of else {}


def task_claims(task: Task, scope: str) -> dict[str, Any]:
    """The claims a task JWT-SVID carries besides the SPIFFE ones (docs/claims.md)."""
    tctx: dict[str, Any] = {
        "classification": task.classification,
        "environment": task.environment,
        "resources": list(task.resources),
    }
    if task.elevated:
        tctx["elevated"] = True
    claims: dict[str, Any] = {"txn": task.task_id, "scope": scope, "tctx": tctx}
    if task.on_behalf_of:
        claims["obo"] = task.on_behalf_of
    if task.act:
        claims["act"] = task.act
    if task.parent_task_id:
        claims["parent_txn"] = task.parent_task_id
    return claims
