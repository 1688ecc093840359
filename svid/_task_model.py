"""Values shared by the sync and asyncio task clients: the granted task, the request built from
an intent, and when a cached task JWT is due for refresh."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from svid._clock import Clock
from svid._errors import SvidError
from svid._jwt import JwtSvid
from svid._limits import intent_problem
from svid._proto import task_pb2
from svid._spiffe_id import SpiffeId
from svid._task_errors import TaskEndedError, TaskError, TaskRequestError

TOOL_SEPARATOR = "#"

Tools = Mapping[str, Iterable[str]] | Iterable[str]


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """A task as the server granted it. ``actions``/``resources``/``tools`` are the granted scope
    (maybe narrower than declared: then ``decision`` is ``allow_constrained`` and ``reason``
    says what was cut); ``ttl`` is the granted lifetime in seconds. Once it has ended,
    ``state`` says how (``ended``, ``revoked``, ``expired``) and ``end_reason`` why (an
    operator's revocation reason, say); times are Unix seconds."""

    task_id: str
    spiffe_id: SpiffeId
    runtime_id: SpiffeId
    actions: tuple[str, ...]
    resources: tuple[str, ...]
    tools: tuple[str, ...]
    ttl: int
    expires_at: int
    decision: str
    reason: str
    parent_task_id: str
    elevated: bool
    on_behalf_of: str
    classification: str
    environment: str
    depth: int
    state: str
    policy_ids: tuple[str, ...]
    created_at: int = 0
    ended_at: int = 0
    end_reason: str = ""

    @classmethod
    def from_proto(cls, msg: task_pb2.Task) -> TaskInfo:
        return cls(
            task_id=msg.task_id,
            spiffe_id=SpiffeId.parse(msg.spiffe_id),
            runtime_id=SpiffeId.parse(msg.runtime_id),
            actions=tuple(msg.actions),
            resources=tuple(msg.resources),
            tools=tuple(msg.tools),
            ttl=msg.ttl,
            expires_at=msg.expires_at,
            decision=msg.decision,
            reason=msg.reason,
            parent_task_id=msg.parent_task_id,
            elevated=msg.elevated,
            on_behalf_of=msg.on_behalf_of,
            classification=msg.classification,
            environment=msg.environment,
            depth=msg.depth,
            state=msg.state,
            policy_ids=tuple(msg.policy_ids),
            created_at=msg.created_at,
            ended_at=msg.ended_at,
            end_reason=msg.end_reason,
        )


def ended_error(info: TaskInfo) -> TaskEndedError:
    """What a call on the ended task ``info`` raises: how and why it ended, and what to do."""
    how = info.state if info.state != "active" else "ended"  # "active": ended with its parent
    why = f": {info.end_reason}" if info.end_reason else ""
    return TaskEndedError(
        f"task {info.task_id} has ended ({how}{why}); it mints no more tokens and begins no "
        "sub-tasks: begin a new task"
    )


ACTIVE = "active"
# Page size for the runtime's active tasks when a denial is checked against them (the most
# the API gives).
ACTIVE_PAGE = 5000


def active_tasks_request(info: TaskInfo) -> task_pb2.ListTasksRequest:
    """The first page of the active tasks of ``info``'s runtime identity."""
    return task_pb2.ListTasksRequest(
        spiffe_id=str(info.runtime_id), state=ACTIVE, page_size=ACTIVE_PAGE
    )


class TaskView:
    """The granted task's values, read from ``info`` (shared by the sync and asyncio handles)."""

    _info: TaskInfo
    _ended: bool

    def __del__(self) -> None:
        # A task nobody ended stays active, its SVIDs valid, until its TTL: say so, as an
        # unclosed file does. No RPC here (a finalizer may run on any thread, on a closed
        # loop, or at interpreter exit), so it is not ended.
        if getattr(self, "_ended", True):
            return
        info = self._info
        warnings.warn(
            f"task {info.task_id} was never ended: it stays active, its SVIDs valid, until its "
            f"TTL runs out (expires_at {info.expires_at}); begin it with `with` or call end()",
            ResourceWarning,
            stacklevel=2,
            source=self,
        )

    @property
    def info(self) -> TaskInfo:
        return self._info

    @property
    def task_id(self) -> str:
        return self._info.task_id

    @property
    def spiffe_id(self) -> SpiffeId:
        return self._info.spiffe_id

    @property
    def actions(self) -> tuple[str, ...]:
        return self._info.actions

    @property
    def resources(self) -> tuple[str, ...]:
        return self._info.resources

    @property
    def tools(self) -> tuple[str, ...]:
        return self._info.tools

    @property
    def ttl(self) -> int:
        return self._info.ttl

    @property
    def expires_at(self) -> int:
        return self._info.expires_at

    @property
    def decision(self) -> str:
        return self._info.decision

    @property
    def reason(self) -> str:
        return self._info.reason

    def _subtask_scope(
        self,
        actions: Iterable[str] | None,
        resources: Iterable[str] | None,
        tools: Tools | None,
    ) -> tuple[Iterable[str], Iterable[str], Tools]:
        """A sub-task's scope: what is named, or this task's whole grant when nothing is."""
        if actions is None and resources is None and tools is None:
            return self.actions, self.resources, self.tools
        return actions or (), resources or (), tools or ()

    def _child_request(
        self,
        *,
        actions: Iterable[str],
        resources: Iterable[str],
        tools: Tools,
        classification: str,
        goal: str,
        ttl: int,
        elevate: bool,
    ) -> task_pb2.BeginTaskRequest:
        """A sub-task's or elevated step's request under this task: its principal and
        environment come from this task at the server, so none are sent."""
        return begin_request(
            actions=actions,
            resources=resources,
            tools=tools,
            classification=classification,
            environment="",
            on_behalf_of="",
            goal=goal,
            ttl=ttl,
            spiffe_id=self._info.runtime_id,
            parent_task_id=self.task_id,
            elevate=elevate,
        )


def tool_refs(tools: Tools) -> list[str]:
    """``{"mcp-tickets": ["read_ticket"]}`` or ``["mcp-tickets#read_ticket"]`` as wire refs."""
    if isinstance(tools, Mapping):
        refs: list[str] = []
        for server, names in tools.items():
            if isinstance(names, str):
                raise TypeError(f"tools[{server!r}] must be a list of tool names, not a string")
            refs.extend(f"{server}{TOOL_SEPARATOR}{name}" for name in names)
        return refs
    if isinstance(tools, str):
        raise TypeError("tools must be a mapping or a list of '<server>#<tool>', not a string")
    return list(tools)


def _names(values: Iterable[str], what: str) -> list[str]:
    if isinstance(values, str):
        raise TypeError(f"{what} must be a list of strings, not a string")
    return list(values)


def begin_request(
    *,
    actions: Iterable[str],
    resources: Iterable[str],
    tools: Tools,
    classification: str,
    environment: str,
    on_behalf_of: str,
    goal: str,
    ttl: int,
    spiffe_id: SpiffeId | str | None,
    parent_task_id: str = "",
    elevate: bool = False,
) -> task_pb2.BeginTaskRequest:
    """BeginTask for this intent; TaskRequestError when it is past the limits the agent and
    the server enforce, named in their words, so such an intent never leaves the process."""
    if ttl < 0:
        raise ValueError(f"ttl must not be negative, got {ttl}")
    intent = task_pb2.Intent(
        actions=_names(actions, "actions"),
        resources=_names(resources, "resources"),
        tools=tool_refs(tools),
        classification=classification,
        environment=environment,
        on_behalf_of=on_behalf_of,
        goal=goal,
    )
    too_big = intent_problem(
        intent.actions,
        intent.resources,
        intent.tools,
        classification=classification,
        environment=environment,
        on_behalf_of=on_behalf_of,
    )
    if too_big:
        raise TaskRequestError(too_big, "INVALID_ARGUMENT")
    return task_pb2.BeginTaskRequest(
        spiffe_id=str(spiffe_id) if spiffe_id else "",
        intent=intent,
        ttl=ttl,
        parent_task_id=parent_task_id,
        elevate=elevate,
    )


def child_call(elevate: bool) -> str:
    """What a sub-task's or elevated step's errors name: the method called, not the RPC."""
    return "task.elevate" if elevate else "task.subtask"


# As the server bounds it (server/tasks/end_reason.py): checked here first, so a bad reason
# is the caller's ValueError before the end is sent, not a refused end leaving the task open.
MAX_END_REASON = 200


def end_request(task_id: str, reason: str) -> task_pb2.EndTaskRequest:
    """EndTask for ``task_id``, saying ``reason`` why ("" for a plain end)."""
    if len(reason) > MAX_END_REASON:
        raise ValueError(f"reason must be at most {MAX_END_REASON} characters")
    if "\x00" in reason:
        raise ValueError("reason must not contain NUL (0x00)")
    if not reason.isprintable():
        raise ValueError("reason must be one line of printable text")
    return task_pb2.EndTaskRequest(task_id=task_id, reason=reason)


def raised_reason(exc_type: type[BaseException] | None) -> str:
    """The end reason of a task whose block raised ``exc_type``: its type's name only. The
    exception's message may quote anything the block held, a secret among it, and the reason
    goes to the server's audit log."""
    if exc_type is None:
        return ""
    return f"block raised {exc_type.__name__}"[:MAX_END_REASON]


def audience_key(audience: str | Iterable[str]) -> tuple[str, ...]:
    audiences = (audience,) if isinstance(audience, str) else tuple(audience)
    if not audiences or not all(audiences):
        raise ValueError("an audience is required (one or more non-empty strings)")
    return audiences


def fresh(jwt: JwtSvid, fetched_at: float, now: float, elapsed: float | None = None) -> bool:
    """Whether a cached JWT-SVID may still be handed out at ``now``: until a quarter of its
    lifetime has passed since ``fetched_at``, so a token in use always has a quarter left.
    ``elapsed``: the seconds since the fetch on the monotonic clock (``now - fetched_at`` if
    not given): the quarter is an interval, and on the wall clock a step back kept the token
    handed out for as long as the step, past its exp.

    Not half: the agent (svidd's, as SPIRE's) serves a token from its own cache until half its
    lifetime, so one fetched here may have only that half left; a half counted again from the
    fetch sent requests out with seconds to go. A quarter from the fetch leaves at least a
    quarter of the whole, and the agent is asked once per quarter life, not per request (as
    go-spiffe's JWTSource does: a Workload API call each time).

    The quarter is counted from ``fetched_at`` on this process's clock: iat and exp are the
    issuer's clock, and comparing either with ``now`` lets a skew hand out a token past its exp
    (this clock behind) or never cache at all (this clock ahead). Only the lifetime, exp - iat,
    is taken from the token, a difference on one clock."""
    iat = jwt.claims.get("iat")
    if isinstance(iat, int | float) and not isinstance(iat, bool):
        lifetime = jwt.expires_at - float(iat)
    else:
        lifetime = jwt.expires_at - fetched_at  # no iat: the best guess left
    elapsed = now - fetched_at if elapsed is None else elapsed
    # Never past exp by this clock either (a lifetime the issuer lied about).
    return now < jwt.expires_at and elapsed < lifetime / 4


# A cached token: the token, and when it was fetched on the wall and on the monotonic clock
# (its holder's ElapsedClock, which counts a sleep of the host: see fresh_token).
Fetched = tuple[JwtSvid, float, float]


def agent_jwt(token: str, method: str) -> JwtSvid:
    """A task JWT-SVID as the agent sent it (``method``'s answer): read, not verified (the
    agent is trusted); one that cannot be read is the agent's fault, said as such."""
    try:
        return JwtSvid.parse_insecure(token)
    except SvidError as exc:
        raise TaskError(f"{method} sent an unusable token: {exc}", "BAD_RESPONSE") from exc


def fresh_token(cached: Fetched | None, clock: Clock) -> JwtSvid | None:
    """The token of a cache entry while it is ``fresh`` by ``clock``; else None. ``clock``:
    an ElapsedClock (the one the entry's fetch time was read on), so that a sleep of the host,
    which CLOCK_MONOTONIC does not count, counts towards the quarter life."""
    if cached is not None:
        jwt, fetched_at, fetched_mono = cached
        if fresh(jwt, fetched_at, clock.now(), clock.monotonic() - fetched_mono):
            return jwt
    return None
