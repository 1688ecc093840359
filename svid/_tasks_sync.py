"""Tasks from a workload, synchronously: begin over the agent's socket, mint task JWTs, end."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any

import grpc

from svid._call_setup import CallSetup
from svid._clock import Clock, ElapsedClock, SystemClock
from svid._errors import SvidError
from svid._jwt import JwtSvid
from svid._proto import (
    revocation_pb2,
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
    no_answer,
    translate,
)
from svid._task_feed import RevocationFeed
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
from svid._workload_client import Watch
from svid._workload_errors import WorkloadApiError

log = logging.getLogger("svid.tasks")
DEFAULT_TIMEOUT = 10.0


class TaskClient:
    """Begins tasks for this workload at the agent's Workload API socket.

    ``socket`` is ``unix:///path`` or ``tcp://IP:port`` (default: SPIFFE_ENDPOINT_SOCKET).
    Thread-safe; close() it, or use it as a context manager, when done.

    From its first task on, a background thread watches the agent's revocation stream: a task
    the server ends behind the runtime's back (an operator's revocation, its TTL, its parent's
    end) is marked ended as soon as the agent pushes the revocation of its credentials.
    ``watch_revocations=False`` goes without: such an end is then learnt when the task's next
    token is refused.
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
        self._channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self._tasks_stub = task_pb2_grpc.TasksStub(self._channel)
        self._workload_stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)
        self._setup = CallSetup("svid-tasks")
        self._closed = False
        self._watch_revocations = watch_revocations
        self._live: LiveTasks[Task] = LiveTasks()
        self._feed = RevocationFeed(
            _stream_opener(revocation_pb2_grpc.RevocationsStub(self._channel), self.address),
            _deliverer(weakref.ref(self)),
            self.address,
        )
        # A client dropped unclosed: its feed thread stops rather than hold the stream open.
        weakref.finalize(self, self._feed.close)

    def close(self) -> None:
        self._closed = True
        self._feed.close()
        self._setup.close()
        self._channel.close()
        # After the channel's close, which ends any call the feed's thread is waiting on.
        self._feed.join(self.timeout)

    def _watching(self, task: Task) -> None:
        """``task`` is live: it learns of its end from the revocation stream (opened now if it
        is not yet)."""
        self._live.add(task)
        if self._watch_revocations:
            self._feed.start()

    def _revocations_seen(self, update: RevocationsUpdate) -> None:
        """The agent's revocation list: every live task it names is over. All are ended at
        once (parents first: theirs end with them); then how they ended is asked of the server
        once for all, within one timeout, not one task after another. A task the list names
        by doubtful tokens alone (doubtful_jtis) is asked about once the others have ended,
        all of those at once, and goes on if the server lists it active."""
        named = self._live.named_by(update)
        if not named:
            return
        proven, doubts = proven_and_doubted(named, update)
        # Those the list proves over end before the server is asked about the others: the
        # ask (up to a timeout, 10 s by default, at a server away) held up an end it proved,
        # the task minting tokens meanwhile, whenever one update named both kinds.
        ended = [task for task in proven if task._revoked()]
        going_on = self._going_on(doubts) if doubts and not self._closed else set()
        ended += [task for task in doubts if task.task_id not in going_on and task._revoked()]
        if not ended or self._closed:
            return
        learnt = self._ended_infos([task.info for task in ended])
        for task in ended:
            info = learnt.get(task.task_id)
            if info is not None:
                task._learnt_end(info)

    def _going_on(self, doubts: Mapping[Task, frozenset[str]]) -> set[str]:
        """The IDs of the tasks of ``doubts`` (each with the doubtful jtis the list names it
        by: proven_and_doubted) that the server says were not their end (tokens delegated
        from them, revoked as the acting workload's agent was removed): they are listed
        active. Asked once for all, within one timeout; when it cannot be told, none (fail
        closed). Ended by them, every runtime whose task delegated to a removed node lost its
        task to TaskEndedError, the server holding it active."""
        going_on, asked = still_doubted(doubts)
        if asked:
            try:
                active = self._active_ids(
                    [task.info for task in asked], self.clock.monotonic() + self.timeout
                )
            except (grpc.RpcError, SvidError):
                active = set()
            going_on |= listed_active(asked, active)
        return going_on

    @property
    def _tasks(self) -> task_pb2_grpc.TasksStub:
        if self._closed:
            raise closed_client("TaskClient")
        return self._tasks_stub

    @property
    def _workload(self) -> workload_pb2_grpc.SpiffeWorkloadAPIStub:
        if self._closed:
            raise closed_client("TaskClient")
        return self._workload_stub

    def __enter__(self) -> TaskClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
    ) -> Task:
        """Begin a task with this intent; use the result as a context manager to end it.

        ``tools`` maps a server (its audience) to tool names, or lists ``"<server>#<tool>"``.
        ``goal`` is hashed by the agent; only the hash leaves the node. ``ttl`` 0 takes the
        server's default. Raises TaskDeniedError (with the decision's ``reason``) when refused,
        and TaskRequestError, before any call, for an intent past the agent's limits.
        """
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
        return Task(self, self._begin(request))

    # -- calls ---------------------------------------------------------------------------------

    def _begin(self, request: task_pb2.BeginTaskRequest, name: str = "BeginTask") -> TaskInfo:
        """BeginTask; its errors name ``name``, the method the caller called."""
        call = self._start(self._tasks.BeginTask, request)
        try:
            reply = call.result().result()
        except grpc.RpcError as exc:
            raise translate(exc, name, self.address) from exc
        except BaseException:
            # Interrupted (Ctrl-C) while the server may be granting the task: the call goes on,
            # and its answer is the only record of the task's ID. Without ending it here the
            # task would stay open, its SVIDs valid, until its TTL. A second interrupt stops it.
            self._end_granted(call)
            raise
        return TaskInfo.from_proto(reply.task)

    def _start(
        self, method: Any, request: Any, timeout: float | None = None
    ) -> Future[grpc.Future]:
        """``method`` called with ``request`` as a future, set up out of a Ctrl-C's reach."""
        return self._setup.start(
            method.future, request, metadata=METADATA, timeout=timeout or self.timeout
        )

    def _end_granted(self, call: Future[grpc.Future]) -> None:
        """End the task an interrupted begin was granted."""
        granted = _settled(call)
        if granted is None:
            return  # refused or failed: nothing to end
        task_id = granted.task.task_id
        try:
            self._end(task_id, reason="its begin was interrupted before the answer")
        except SvidError as exc:
            log.warning(
                "could not end a task whose begin was interrupted; it runs out at its TTL",
                extra={"task_id": task_id, "error": str(exc)},
            )

    def _end(
        self,
        task_id: str,
        ended: Callable[[TaskInfo], object] | None = None,
        reason: str = "",
        timeout: float | None = None,
    ) -> TaskInfo:
        """EndTask saying ``reason``; ``ended`` is given the ended task, also when an interrupt
        (Ctrl-C) comes while waiting. A blocking call is cancelled when interrupted, leaving the
        task open, its SVIDs valid, until its TTL: this one is a future, waited for then (a
        second interrupt stops the wait) before the interrupt goes on."""
        request = end_request(task_id, reason)
        call = self._start(self._tasks.EndTask, request, timeout)
        try:
            reply = call.result().result()
        except grpc.RpcError as exc:
            raise translate(exc, "EndTask", self.address) from exc
        except BaseException:
            done = _settled(call)
            if done is not None and ended is not None:
                ended(TaskInfo.from_proto(done.task))
            raise
        info = TaskInfo.from_proto(reply.task)
        if ended is not None:
            ended(info)
        return info

    def _ended_info(self, info: TaskInfo) -> TaskInfo | None:
        """The task's final state if the server no longer has it active, else None (None too
        when that cannot be learnt: the caller then raises the error it has)."""
        return self._ended_infos([info]).get(info.task_id)

    def _ended_infos(self, infos: Sequence[TaskInfo]) -> dict[str, TaskInfo]:
        """By task ID, the final state of those of ``infos`` the server no longer has active,
        asked once for all and within one timeout in all (a server that does not answer then
        costs one timeout, not one per task); one left out is active, or was not learnt."""
        deadline = self.clock.monotonic() + self.timeout
        learnt: dict[str, TaskInfo] = {}
        try:
            active = self._active_ids(infos, deadline)
            for info in infos:
                if info.task_id not in active:
                    # Not active: EndTask changes nothing and answers how and why it ended.
                    learnt[info.task_id] = self._end(info.task_id, timeout=self._left(deadline))
        except (grpc.RpcError, SvidError):
            pass  # what was learnt so far stands
        return learnt

    def _active_ids(self, infos: Iterable[TaskInfo], deadline: float) -> set[str]:
        """The IDs of the active tasks of the runtime identities of ``infos``."""
        active: set[str] = set()
        for first in {info.runtime_id: info for info in infos}.values():
            request = active_tasks_request(first)
            while True:
                reply = self._tasks.ListTasks(
                    request, metadata=METADATA, timeout=self._left(deadline)
                )
                active.update(t.task_id for t in reply.tasks)
                if not reply.next_page_token:
                    break
                request.page_token = reply.next_page_token
        return active

    def _left(self, deadline: float) -> float:
        left = deadline - self.clock.monotonic()
        if left <= 0:
            raise no_answer("ListTasks", self.address)
        return left

    def _fetch_jwt(self, spiffe_id: SpiffeId, audience: tuple[str, ...]) -> JwtSvid:
        request = workload_pb2.JWTSVIDRequest(audience=list(audience), spiffe_id=str(spiffe_id))
        try:
            reply = self._workload.FetchJWTSVID(request, metadata=METADATA, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise translate(exc, "FetchJWTSVID", self.address) from exc
        if not reply.svids:
            raise WorkloadApiError("Workload API FetchJWTSVID returned no SVID", "NO_MESSAGE")
        return agent_jwt(reply.svids[0].svid, "FetchJWTSVID")

    def _mint_jwt(self, spiffe_id: SpiffeId, audience: tuple[str, ...]) -> JwtSvid:
        request = task_pb2.MintTaskJWTRequest(audience=list(audience), spiffe_id=str(spiffe_id))
        try:
            reply = self._tasks.MintTaskJWT(request, metadata=METADATA, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise translate(exc, "MintTaskJWT", self.address) from exc
        return agent_jwt(reply.svid, "MintTaskJWT")


def _stream_opener(
    stub: revocation_pb2_grpc.RevocationsStub, address: str
) -> Callable[[], Watch[RevocationsUpdate]]:
    def open_watch() -> Watch[RevocationsUpdate]:
        call = stub.Watch(revocation_pb2.WatchRequest(), metadata=METADATA)
        return Watch(call, REVOCATIONS, address)

    return open_watch


def _deliverer(client: weakref.ref[TaskClient]) -> Callable[[RevocationsUpdate], bool]:
    """Deliveries to ``client`` while it exists, without keeping it alive."""

    def deliver(update: RevocationsUpdate) -> bool:
        held = client()
        if held is None:
            return False
        held._revocations_seen(update)
        return True

    return deliver


def _settled(call: Future[grpc.Future]) -> Any:
    """The reply of a call its caller was interrupted waiting for, or None if it failed."""
    try:
        return call.result().result()
    except grpc.RpcError:
        return None


class Task(TaskView):
    """A granted task. ``with`` ends it on exit (on an exception too, recorded at the server as
    "block raised <exception type>"); ``end()`` does it by hand.

    ``jwt(audience)`` gives a task JWT-SVID, cached and fetched again once a quarter of its
    lifetime has passed since its fetch (the agent may serve it half-lived: ``fresh``); once
    the agent's revocation stream says the server ended the task, ``ended`` is True and ``jwt``
    raises TaskEndedError (its sub-tasks with it). ``info`` then says how it
    ended once the server has told (within the client's timeout); until then, or when it
    cannot be asked, its ``end_reason`` says only that the agent's revocation list names the
    task's credentials, and ``end()`` asks again. Threads
    asking for one audience at once share one fetch; a fetch in flight holds up no other
    audience and no end. A ``jwt`` whose fetch answers after the task ended raises
    TaskEndedError: the token is neither handed out nor kept.
    ``subtask(...)`` narrows this task; ``elevate(...)`` begins a short elevated step inside
    it, decided by policy on its own, whose end leaves this task running.
    """

    def __init__(self, client: TaskClient, info: TaskInfo) -> None:
        self._client = client
        self._info = info
        self._lock = threading.Lock()
        self._jwts: dict[tuple[str, ...], Fetched] = {}
        # Fetches in flight by audience: callers of one join its fetch rather than make theirs.
        self._fetching: dict[tuple[str, ...], Future[JwtSvid | None]] = {}
        # Its running sub-tasks, to end with it; an ended one leaves (_mark_ended): kept, a long
        # task held every sub-task it ever began.
        self._children: list[Task] = []
        self._parent: weakref.ref[Task] | None = None
        self._ended = False
        # False while how it ended is not known: ended by the revocation list alone.
        self._confirmed = True
        # Revoked jtis of its SPIFFE ID the server showed were not its end (TaskClient._going_on).
        self._not_its_end: frozenset[str] = frozenset()
        client._watching(self)

    def __repr__(self) -> str:
        return f"Task({self._info.spiffe_id}, {self._info.decision}, ttl={self._info.ttl})"

    @property
    def ended(self) -> bool:
        """Whether the task has ended: by its runtime, or at the server (seen on the agent's
        revocation stream, or when a token was refused)."""
        return self._ended

    def _cached_jtis(self) -> frozenset[str]:
        with self._lock:  # never held across a call: a revocation check does not wait on one
            return cached_jtis(self._jwts.values())

    def _revoked(self) -> bool:
        """The agent's revocation list names this task's credentials: the server has ended it.
        Ended at once, fail closed, saying only that (the list does not say how: the client
        asks the server, then _learnt_end); False if it had ended already."""
        with self._lock:
            if self._ended:
                return False
        self._mark_ended(unconfirmed_end(self._info), confirmed=False)
        return True

    def _learnt_end(self, info: TaskInfo) -> None:
        """How the server says this task, ended by the revocation list, ended."""
        with self._lock:
            self._info = info
            self._confirmed = True

    # -- tokens --------------------------------------------------------------------------------

    def jwt_svid(self, audience: str | Iterable[str], *, fresh: bool = False) -> JwtSvid:
        """A task JWT-SVID for ``audience`` (each mint is a policy decision at the server).
        Raises TaskEndedError once the task has ended, however it ended.

        The same one is handed out for a while (the agent's and this task's caches); ``fresh``
        asks the agent to mint one anew (counted against this uid's minting rate: past it,
        RESOURCE_EXHAUSTED), which is then the one handed out. For a place that takes a task
        JWT-SVID once, as svidd's token endpoint does per resource: asking it again (an OAuth
        step-up after ``insufficient_scope``) needs one the task has not traded there."""
        key = audience_key(audience)
        try:
            return self._fresh(key) if fresh else self._jwt_svid(key)
        except TaskDeniedError as denied:
            ended = self._ended_instead()
            if ended is None:
                raise
            raise ended from denied

    def _jwt_svid(self, key: tuple[str, ...]) -> JwtSvid:
        while True:
            with self._lock:
                if self._ended:
                    raise ended_error(self._info)
                clock = self._client._elapsed
                cached = fresh_token(self._jwts.get(key), clock)
                if cached is not None:
                    return cached
                flight = self._fetching.get(key)
                lead = flight is None
                if flight is None:
                    flight = self._fetching[key] = Future()
            if lead:
                return self._fetch(key, (clock.now(), clock.monotonic()), flight)
            jwt = self._join(key, flight)
            if jwt is not None:
                return jwt
            # None: the caller fetching it was interrupted; round again, to fetch it here.

    def _fetch(
        self, key: tuple[str, ...], now: tuple[float, float], flight: Future[JwtSvid | None]
    ) -> JwtSvid:
        """The token for ``key`` from the agent, shared with the callers that joined
        ``flight``; no lock is held meanwhile. One fetched after the task ended is neither
        kept nor handed out: the end may have come before the agent minted it."""
        try:
            jwt = self._client._fetch_jwt(self.spiffe_id, key)
        except Exception as exc:
            self._landed(key, flight)
            flight.set_exception(exc)
            raise
        except BaseException:
            # A Ctrl-C: it is this caller's alone, the others fetch again.
            self._landed(key, flight)
            flight.set_result(None)
            raise
        with self._lock:
            ended = self._ended
            if not ended:
                self._jwts[key] = (jwt, *now)
            if self._fetching.get(key) is flight:
                del self._fetching[key]
        if ended:
            error = ended_error(self._info)
            flight.set_exception(error)
            raise error
        flight.set_result(jwt)
        return jwt

    def _fresh(self, key: tuple[str, ...]) -> JwtSvid:
        """A token for ``key`` minted anew, kept in place of the cached one: a later plain
        ``jwt_svid`` hands out the newest. A fetch in flight is not joined (it may bring the
        token already spent); one landing later replaces it, which a caller asking fresh again
        then gets past."""
        with self._lock:
            if self._ended:
                raise ended_error(self._info)
            clock = self._client._elapsed
            now = (clock.now(), clock.monotonic())
        jwt = self._client._mint_jwt(self.spiffe_id, key)
        with self._lock:
            if self._ended:
                raise ended_error(self._info)  # ended while it was being minted
            self._jwts[key] = (jwt, *now)
        return jwt

    def _landed(self, key: tuple[str, ...], flight: Future[JwtSvid | None]) -> None:
        with self._lock:
            if self._fetching.get(key) is flight:
                del self._fetching[key]

    def _join(self, key: tuple[str, ...], flight: Future[JwtSvid | None]) -> JwtSvid | None:
        """The token another caller is fetching for ``key``; None if it was interrupted."""
        try:
            jwt = flight.result(self._client.timeout)
        except TimeoutError:
            # Its fetch has its own deadline, as long: a Ctrl-C that struck its caller between
            # two steps left it unsettled. Gone, the next caller fetches again.
            self._landed(key, flight)
            raise no_answer("FetchJWTSVID", self._client.address) from None
        if jwt is not None and self._ended:
            raise ended_error(self._info)  # ended while it was being fetched
        return jwt

    def _ended_instead(self) -> TaskEndedError | None:
        """What to raise instead of a denial when the server has ended this task (an
        operator's revocation, its TTL, its parent's end): the denial was then the agent no
        longer serving its identity, not a policy decision. None while it is active."""
        info = self._client._ended_info(self._info)
        if info is None:
            return None
        self._mark_ended(info)
        return ended_error(info)

    def jwt(self, audience: str | Iterable[str], *, fresh: bool = False) -> str:
        """The bearer token of ``jwt_svid(audience, fresh=fresh)``."""
        return self.jwt_svid(audience, fresh=fresh).token

    # -- sub-tasks -----------------------------------------------------------------------------

    def subtask(
        self,
        *,
        actions: Iterable[str] | None = None,
        resources: Iterable[str] | None = None,
        tools: Tools | None = None,
        classification: str = "",
        goal: str = "",
        ttl: int = 0,
    ) -> Task:
        """A sub-task that narrows this one (by default: the whole granted scope). It ends with
        this task, and no later than it."""
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
    ) -> Task:
        """A short elevated step inside this task: its own policy decision (policies see
        ``context.intent.elevated``), a TTL within this task's and the server's elevated-step
        cap. Ending it leaves this task running."""
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
    ) -> Task:
        if self._ended:
            raise ended_error(self._info)
        request = self._child_request(
            actions=actions,
            resources=resources,
            tools=tools,
            classification=classification,
            goal=goal,
            ttl=ttl,
            elevate=elevate,
        )
        try:
            child = Task(self._client, self._client._begin(request, child_call(elevate)))
        except TaskDeniedError as denied:
            ended = self._ended_instead()
            if ended is None:
                raise
            raise ended from denied
        child._parent = weakref.ref(self)
        with self._lock:
            if not child._ended:  # else ended already (the revocation feed): nothing to end
                self._children.append(child)
        return child

    def _child_ended(self, child: Task) -> None:
        with self._lock:
            if child in self._children:
                self._children.remove(child)

    # -- end -----------------------------------------------------------------------------------

    def end(self, reason: str = "") -> TaskInfo:
        """End the task (idempotent): the server revokes every SVID of it and its sub-tasks.
        ``reason`` (short plain text, never a secret: it goes to the audit log) says why; the
        server records "ended by its runtime: <reason>"."""
        with self._lock:
            if self._ended and self._confirmed:
                return self._info
            # Ended by the revocation list, how not yet known: EndTask changes nothing, and
            # says; if it cannot, the task is ended all the same.
            revoked = self._ended
        try:
            return self._client._end(self.task_id, self._mark_ended, reason)
        except SvidError:
            if not revoked:
                raise
            return self._info

    def _mark_ended(self, info: TaskInfo | None = None, *, confirmed: bool = True) -> None:
        with self._lock:
            self._ended = True
            self._confirmed = confirmed
            self._jwts.clear()
            if info is not None:
                self._info = info
            info = self._info
            children, self._children = self._children, []
        self._client._live.discard(self)
        for child in children:  # the server ended them with this task
            child._mark_ended(ended_with_parent(child._info, info))
        parent = self._parent() if self._parent is not None else None
        if parent is not None:
            parent._child_ended(self)

    def __enter__(self) -> Task:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.end()
            return
        try:
            self.end(raised_reason(exc_type))
        except SvidError as end_error:
            # The body's exception is the one to see; the task still runs out at its TTL.
            log.warning(
                "could not end task after an error",
                extra={"task_id": self.task_id, "error": str(end_error)},
            )
