"""Tasks from a workload, on asyncio (grpc.aio): the same semantics as svid._tasks_sync.

async with AsyncTaskClient() as client:
    async with client.begin(actions=["read"], resources=["docs"]) as task:
        token = await task.jwt("docs")
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from types import TracebackType
from typing import TypeVar

import grpc

from svid._clock import Clock, ElapsedClock, SystemClock
from svid._errors import SvidError
from svid._jwt import JwtSvid
from svid._proto import (
    revocation_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
    workload_pb2,
    workload_pb2_grpc,
)
from svid._spiffe_id import SpiffeId
from svid._task_errors import (
    TaskDeniedError,
    TaskEndedError,
    closed_client,
    translate,
)
from svid._task_feed_aio import AsyncRevocationFeed
from svid._task_model import (
    Fetched,
    TaskInfo,
    TaskView,
    Tools,
    active_tasks_request,
    agent_jwt,
    audience_key,
    begin_request,
    child_call,
    end_request,
    ended_error,
    fresh_token,
    raised_reason,
)
from svid._task_revocations import (
    LiveTasks,
    cached_jtis,
    ended_with_parent,
    listed_active,
    proven_and_doubted,
    still_doubted,
    unconfirmed_end,
)
from svid._workload_address import address_of, grpc_target
from svid._workload_calls import CHANNEL_OPTIONS, METADATA, REVOCATIONS, RevocationsUpdate
from svid._workload_client_aio import AsyncWatch
from svid._workload_errors import WorkloadApiError

T = TypeVar("T")
log = logging.getLogger("svid.tasks")
DEFAULT_TIMEOUT = 10.0


class AsyncTaskClient:
    """Begins tasks for this workload at the agent's Workload API socket, on asyncio.

    It connects on first use and serves that event loop only (a gRPC asyncio channel is bound
    to one): make one client per loop. ``await close()`` (or ``async with``) when done.

    From its first task on, a task of its own on that loop watches the agent's revocation
    stream, as TaskClient's thread does (not with ``watch_revocations=False``).
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        environ: Mapping[str, str] | None = None,
        clock: Clock | None = None,
        watch_revocations: bool = True,
    ) -> None:
        self.target = grpc_target(socket, environ)
        self.address = address_of(socket, environ)
        self.timeout = timeout
        self.clock: Clock = clock or SystemClock()
        # A cached token's quarter life counted on it: it also counts a sleep of the host
        # (by the wall clock's jump), which CLOCK_MONOTONIC alone does not.
        self._elapsed = ElapsedClock(self.clock)
        # Made on first use, in the loop it then serves: a client made at import time, outside
        # any loop, still works under asyncio.run.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stubs: (
            tuple[task_pb2_grpc.TasksStub, workload_pb2_grpc.SpiffeWorkloadAPIStub] | None
        ) = None
        # Calls that go on after their caller was cancelled (see _carried_on).
        self._carrying_on: set[asyncio.Task[object]] = set()
        self._closed = False
        self._watch_revocations = watch_revocations
        self._live: LiveTasks[AsyncTask] = LiveTasks()
        self._feed = AsyncRevocationFeed(
            self._open_revocations, self._revocations_seen, self.address
        )

    async def close(self) -> None:
        # A cancelled begin's or end's call finishes first: it ends a task it would leave open.
        if self._carrying_on:
            await asyncio.gather(*self._carrying_on, return_exceptions=True)
        self._closed = True
        if self._channel is not None:
            self._check_loop()  # the feed's task, as the channel, is of the loop checked
            await self._feed.close()
            await self._channel.close()

    def _check_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not None and loop is not self._loop:
            raise RuntimeError(
                "this AsyncTaskClient was first used on another event loop, and its gRPC "
                "channel is bound to that loop: make one client per event loop (in the "
                "coroutine asyncio.run runs, say), and use its tasks on that loop only"
            )
        return loop

    @property
    def _tasks(self) -> task_pb2_grpc.TasksStub:
        return self._connect()[0]

    @property
    def _workload(self) -> workload_pb2_grpc.SpiffeWorkloadAPIStub:
        return self._connect()[1]

    def _connect(self) -> tuple[task_pb2_grpc.TasksStub, workload_pb2_grpc.SpiffeWorkloadAPIStub]:
        loop = self._check_loop()
        if self._closed:
            raise closed_client("AsyncTaskClient")
        if self._stubs is None:
            self._loop = loop
            self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
            self._stubs = (
                task_pb2_grpc.TasksStub(self._channel),
                workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel),
            )
        return self._stubs

    def _watching(self, task: AsyncTask) -> None:
        """``task`` is live: it learns of its end from the revocation stream (opened now if it
        is not yet)."""
        self._live.add(task)
        if self._watch_revocations:
            self._feed.start()

    def _open_revocations(self) -> AsyncWatch[RevocationsUpdate]:
        self._connect()
        stub = revocation_pb2_grpc.RevocationsStub(self._channel)
        call = stub.Watch(REVOCATIONS.request(), metadata=METADATA)
        return AsyncWatch(call, REVOCATIONS, self.address)

    async def _revocations_seen(self, update: RevocationsUpdate) -> None:
        """As TaskClient._revocations_seen: every live task named is ended at once, then how
        they ended is asked of the server once for all, within one timeout; one named by
        doubtful tokens alone goes on if the server lists it active (TaskClient._going_on)."""
        named = self._live.named_by(update)
        if not named:
            return
        proven, doubts = proven_and_doubted(named, update)
        # Those the list proves over end before the server is asked about the others: its
        # answer (a timeout, at a server away) must not hold up an end (TaskClient's).
        ended = [task for task in proven if task._revoked()]
        going_on = await self._going_on(doubts) if doubts and not self._closed else set()
        ended += [task for task in doubts if task.task_id not in going_on and task._revoked()]
        if not ended or self._closed:
            return
        learnt = await self._ended_infos([task.info for task in ended])
        for task in ended:
            info = learnt.get(task.task_id)
            if info is not None:
                task._learnt_end(info)

    async def _going_on(self, doubts: Mapping[AsyncTask, frozenset[str]]) -> set[str]:
        """As TaskClient._going_on."""
        going_on, asked = still_doubted(doubts)
        if asked:
            try:
                async with asyncio.timeout(self.timeout):
                    active = await self._active_ids([task.info for task in asked])
            except (TimeoutError, grpc.aio.AioRpcError, SvidError):
                active = set()
            going_on |= listed_active(asked, active)
        return going_on

    async def __aenter__(self) -> AsyncTaskClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def begin(
        self,
        *,
        actions: Iterable[str] = (),
        resources: Iterable[str] = (),
        tools: Tools = (),
        classification: str = "",
        environment: str = "",
        on_behalf_of: str = "",
        goal: str = "",
        ttl: int = 0,
        spiffe_id: SpiffeId | str | None = None,
    ) -> Beginning:
        """Begin a task: ``async with client.begin(...) as task`` ends it on exit, ``task =
        await client.begin(...)`` leaves that to you. Arguments as TaskClient.begin."""
        request = begin_request(
            actions=actions,
            resources=resources,
            tools=tools,
            classification=classification,
            environment=environment,
            on_behalf_of=on_behalf_of,
            goal=goal,
            ttl=ttl,
            spiffe_id=spiffe_id,
        )

        async def begun() -> AsyncTask:
            return AsyncTask(self, await self._begin_task(request))

        return Beginning(begun)

    # -- calls ---------------------------------------------------------------------------------

    def _carried_on(self, call: Coroutine[object, None, T]) -> asyncio.Task[T]:
        """``call`` as a task of its own, kept (and awaited by close()) until it is done."""
        task = asyncio.ensure_future(call)
        self._carrying_on.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._carrying_on.discard)
        return task

    async def _uncancelled(
        self,
        call: Coroutine[object, None, T],
        abandoned: Callable[[asyncio.Task[T]], Coroutine[object, None, None]] | None = None,
    ) -> T:
        """``call``'s result; ``call`` is not cancelled with its caller. A cancelled caller
        waits for it to finish (and then for ``abandoned(call)``, which undoes what the caller
        will never see), then gets its CancelledError; a second cancellation stops only the
        wait. Cancelling a BeginTask or EndTask would lose its effect at the server, not stop
        it: a granted task nobody knows of, or a task left open, its SVIDs valid to its TTL."""
        task = self._carried_on(call)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await asyncio.wait([task])
            if abandoned is not None:
                await asyncio.wait([self._carried_on(abandoned(task))])
            raise

    async def _begin_task(
        self, request: task_pb2.BeginTaskRequest, name: str = "BeginTask"
    ) -> TaskInfo:
        """BeginTask; its errors name ``name``, the method the caller called."""
        return await self._uncancelled(self._begin(request, name), self._end_granted)

    async def _end_granted(self, began: asyncio.Task[TaskInfo]) -> None:
        """End the task a cancelled begin was granted."""
        if began.cancelled() or began.exception() is not None:
            return  # refused or failed: nothing to end
        task_id = began.result().task_id
        try:
            await self._end(task_id, reason="its begin was cancelled before the answer")
        except SvidError as exc:
            log.warning(
                "could not end a task whose begin was cancelled; it runs out at its TTL",
                extra={"task_id": task_id, "error": str(exc)},
            )

    async def _begin(self, request: task_pb2.BeginTaskRequest, name: str) -> TaskInfo:
        try:
            reply = await self._tasks.BeginTask(request, metadata=METADATA, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, name, self.address) from exc
        return TaskInfo.from_proto(reply.task)

    async def _end(self, task_id: str, reason: str = "") -> TaskInfo:
        request = end_request(task_id, reason)
        try:
            reply = await self._tasks.EndTask(request, metadata=METADATA, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "EndTask", self.address) from exc
        return TaskInfo.from_proto(reply.task)

    async def _ended_info(self, info: TaskInfo) -> TaskInfo | None:
        """As TaskClient._ended_info: the task's final state if it is no longer active."""
        return (await self._ended_infos([info])).get(info.task_id)

    async def _ended_infos(self, infos: Sequence[TaskInfo]) -> dict[str, TaskInfo]:
        """As TaskClient._ended_infos: asked once for all, within one timeout in all."""
        learnt: dict[str, TaskInfo] = {}
        try:
            async with asyncio.timeout(self.timeout):
                active = await self._active_ids(infos)
                for info in infos:
                    if info.task_id not in active:
                        learnt[info.task_id] = await self._end(info.task_id)
        except (TimeoutError, grpc.aio.AioRpcError, SvidError):
            pass  # what was learnt so far stands
        return learnt

    async def _active_ids(self, infos: Iterable[TaskInfo]) -> set[str]:
        """The IDs of the active tasks of the runtime identities of ``infos``."""
        active: set[str] = set()
        for first in {info.runtime_id: info for info in infos}.values():
            request = active_tasks_request(first)
            while True:
                reply = await self._tasks.ListTasks(
                    request, metadata=METADATA, timeout=self.timeout
                )
                active.update(t.task_id for t in reply.tasks)
                if not reply.next_page_token:
                    break
                request.page_token = reply.next_page_token
        return active

    async def _fetch_jwt(self, spiffe_id: SpiffeId, audience: tuple[str, ...]) -> JwtSvid:
        request = workload_pb2.JWTSVIDRequest(audience=list(audience), spiffe_id=str(spiffe_id))
        try:
            reply = await self._workload.FetchJWTSVID(
                request, metadata=METADATA, timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "FetchJWTSVID", self.address) from exc
        if not reply.svids:
            raise WorkloadApiError("Workload API FetchJWTSVID returned no SVID", "NO_MESSAGE")
        return agent_jwt(reply.svids[0].svid, "FetchJWTSVID")

    async def _mint_jwt(self, spiffe_id: SpiffeId, audience: tuple[str, ...]) -> JwtSvid:
        request = task_pb2.MintTaskJWTRequest(audience=list(audience), spiffe_id=str(spiffe_id))
        try:
            reply = await self._tasks.MintTaskJWT(request, metadata=METADATA, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise translate(exc, "MintTaskJWT", self.address) from exc
        return agent_jwt(reply.svid, "MintTaskJWT")


def _read_outcome(flight: asyncio.Task[JwtSvid]) -> None:
    """Read a token fetch's error: one whose every caller was cancelled fails unreported,
    rather than warn that its exception was never retrieved."""
    if not flight.cancelled():
        flight.exception()


class Beginning:
    """A task being begun: await it for the task, or ``async with`` it to end the task on exit."""

    def __init__(self, begin: Callable[[], Awaitable[AsyncTask]]) -> None:
        self._begin = begin
        self._task: AsyncTask | None = None

    def __await__(self) -> Generator[object, None, AsyncTask]:
        return self._start().__await__()

    async def _start(self) -> AsyncTask:
        if self._task is None:
            self._task = await self._begin()
        return self._task

    async def __aenter__(self) -> AsyncTask:
        return await self._start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:  # None: the begin itself failed, nothing to end
            await self._task.__aexit__(exc_type, exc, tb)


class AsyncTask(TaskView):
    """A granted task, on asyncio; see svid.tasks.Task for the semantics."""

    def __init__(self, client: AsyncTaskClient, info: TaskInfo) -> None:
        self._client = client
        self._info = info
        self._lock = asyncio.Lock()
        self._jwts: dict[tuple[str, ...], Fetched] = {}
        # Fetches in flight by audience: callers of one await its fetch rather than make theirs.
        self._fetching: dict[tuple[str, ...], asyncio.Task[JwtSvid]] = {}
        # Its running sub-tasks, to end with it; an ended one leaves (as Task's).
        self._children: list[AsyncTask] = []
        self._parent: weakref.ref[AsyncTask] | None = None
        self._ended = False
        self._confirmed = True  # as Task's
        self._not_its_end: frozenset[str] = frozenset()  # as Task's
        client._watching(self)

    def __repr__(self) -> str:
        return f"AsyncTask({self._info.spiffe_id}, {self._info.decision}, ttl={self._info.ttl})"

    @property
    def ended(self) -> bool:
        """As Task.ended: ended by its runtime, or seen ended at the server."""
        return self._ended

    def _cached_jtis(self) -> frozenset[str]:
        return cached_jtis(self._jwts.values())

    def _revoked(self) -> bool:
        """As Task._revoked: ended at once, how it ended asked after; False if ended already."""
        if self._ended:
            return False
        self._mark_ended(unconfirmed_end(self._info), confirmed=False)
        return True

    def _learnt_end(self, info: TaskInfo) -> None:
        self._info = info
        self._confirmed = True

    async def jwt_svid(self, audience: str | Iterable[str], *, fresh: bool = False) -> JwtSvid:
        """As Task.jwt_svid (``fresh`` too)."""
        key = audience_key(audience)
        try:
            return await (self._fresh(key) if fresh else self._jwt_svid(key))
        except TaskDeniedError as denied:
            ended = await self._ended_instead()
            if ended is None:
                raise
            raise ended from denied

    async def _jwt_svid(self, key: tuple[str, ...]) -> JwtSvid:
        # No lock: nothing here awaits between reading the cache and joining or starting a
        # fetch, so one loop's callers cannot interleave there.
        if self._ended:
            raise ended_error(self._info)
        clock = self._client._elapsed
        cached = fresh_token(self._jwts.get(key), clock)
        if cached is not None:
            return cached
        flight = self._fetching.get(key)
        if flight is None or flight.done():  # done: cancelled before it could run
            now = (clock.now(), clock.monotonic())
            flight = self._fetching[key] = asyncio.ensure_future(self._fetch(key, now))
            flight.add_done_callback(_read_outcome)
        # Shielded: a caller cancelled leaves the fetch to the others waiting for it.
        jwt = await asyncio.shield(flight)
        if self._ended:
            raise ended_error(self._info)  # ended while it was being fetched
        return jwt

    async def _fetch(self, key: tuple[str, ...], now: tuple[float, float]) -> JwtSvid:
        """As Task._fetch: a token fetched after the task ended is neither kept nor handed out."""
        try:
            jwt = await self._client._fetch_jwt(self.spiffe_id, key)
        finally:
            if self._fetching.get(key) is asyncio.current_task():
                del self._fetching[key]
        if self._ended:
            raise ended_error(self._info)
        self._jwts[key] = (jwt, *now)
        return jwt

    async def _fresh(self, key: tuple[str, ...]) -> JwtSvid:
        """As Task._fresh."""
        if self._ended:
            raise ended_error(self._info)
        clock = self._client._elapsed
        now = (clock.now(), clock.monotonic())
        jwt = await self._client._mint_jwt(self.spiffe_id, key)
        if self._ended:
            raise ended_error(self._info)
        self._jwts[key] = (jwt, *now)
        return jwt

    async def _ended_instead(self) -> TaskEndedError | None:
        """As Task._ended_instead: a denial for a task the server has ended says so."""
        info = await self._client._ended_info(self._info)
        if info is None:
            return None
        self._mark_ended(info)
        return ended_error(info)

    async def jwt(self, audience: str | Iterable[str], *, fresh: bool = False) -> str:
        return (await self.jwt_svid(audience, fresh=fresh)).token

    def subtask(
        self,
        *,
        actions: Iterable[str] | None = None,
        resources: Iterable[str] | None = None,
        tools: Tools | None = None,
        classification: str = "",
        goal: str = "",
        ttl: int = 0,
    ) -> Beginning:
        actions, resources, tools = self._subtask_scope(actions, resources, tools)
        return self._child(
            actions=actions,
            resources=resources,
            tools=tools,
            classification=classification,
            goal=goal,
            ttl=ttl,
            elevate=False,
        )

    def elevate(
        self,
        *,
        actions: Iterable[str] = (),
        resources: Iterable[str] = (),
        tools: Tools = (),
        classification: str = "",
        goal: str = "",
        ttl: int = 0,
    ) -> Beginning:
        return self._child(
            actions=actions,
            resources=resources,
            tools=tools,
            classification=classification,
            goal=goal,
            ttl=ttl,
            elevate=True,
        )

    def _child(
        self,
        *,
        actions: Iterable[str],
        resources: Iterable[str],
        tools: Tools,
        classification: str,
        goal: str,
        ttl: int,
        elevate: bool,
    ) -> Beginning:
        request = self._child_request(
            actions=actions,
            resources=resources,
            tools=tools,
            classification=classification,
            goal=goal,
            ttl=ttl,
            elevate=elevate,
        )

        async def begun() -> AsyncTask:
            if self._ended:
                raise ended_error(self._info)
            try:
                began = await self._client._begin_task(request, child_call(elevate))
                child = AsyncTask(self._client, began)
            except TaskDeniedError as denied:
                ended = await self._ended_instead()
                if ended is None:
                    raise
                raise ended from denied
            child._parent = weakref.ref(self)
            if not child._ended:  # else ended already (the revocation feed)
                self._children.append(child)
            return child

        return Beginning(begun)

    async def end(self, reason: str = "") -> TaskInfo:
        """End the task (idempotent), saying ``reason`` as Task.end does. Once sent, a
        cancellation waits for it to be done."""
        if self._ended and self._confirmed:
            return self._info
        # As Task.end: one ended by the revocation list alone asks the server how.
        revoked = self._ended
        try:
            return await self._client._uncancelled(self._ending(reason))
        except SvidError:
            if not revoked:
                raise
            return self._info

    async def _ending(self, reason: str) -> TaskInfo:
        info = await self._client._end(self.task_id, reason)
        self._mark_ended(info)
        return info

    def _mark_ended(self, info: TaskInfo | None = None, *, confirmed: bool = True) -> None:
        self._ended = True
        self._confirmed = confirmed
        self._jwts.clear()
        if info is not None:
            self._info = info
        children, self._children = self._children, []
        self._client._live.discard(self)
        for child in children:
            child._mark_ended(ended_with_parent(child._info, self._info))
        parent = self._parent() if self._parent is not None else None
        if parent is not None and self in parent._children:
            parent._children.remove(self)

    async def __aenter__(self) -> AsyncTask:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.end()
            return
        try:
            await self.end(raised_reason(exc_type))
        except SvidError as end_error:
            log.warning(
                "could not end task after an error",
                extra={"task_id": self.task_id, "error": str(end_error)},
            )
