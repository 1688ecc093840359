"""Task lists page like the admin lists (keyset tokens bound to their filters, pages bounded in
items and bytes), on the admin socket (TaskAdmin) and the node API (NodeTasks): a real server
with its SQLite datastore, over real gRPC."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest

from server import listing
from svid._proto import common_pb2, task_pb2, task_pb2_grpc
from tests.server.fixtures import TLS_NAME, TRUST_DOMAIN, Agent, RunningServer, running_server

TD = f"spiffe://{TRUST_DOMAIN}"
BOT = f"{TD}/agents/bot"
HELPER = f"{TD}/agents/helper"

Request = task_pb2.AdminListTasksRequest | task_pb2.NodeListTasksRequest


@dataclass
class World:
    srv: RunningServer
    first: Agent
    second: Agent
    channels: list[grpc.Channel]

    def admin(self) -> task_pb2_grpc.TaskAdminStub:
        channel = grpc.insecure_channel(f"unix:{self.srv.runtime.admin_socket}")
        self.channels.append(channel)
        return task_pb2_grpc.TaskAdminStub(channel)

    def node(self, agent: Agent) -> task_pb2_grpc.NodeTasksStub:
        channel = grpc.secure_channel(
            self.srv.runtime.node_address, agent.credentials(), options=list(TLS_NAME)
        )
        self.channels.append(channel)
        return task_pb2_grpc.NodeTasksStub(channel)

    def begin(self, agent: Agent, runtime_id: str) -> task_pb2.Task:
        request = task_pb2.NodeBeginTaskRequest(
            runtime_id=runtime_id,
            intent=task_pb2.Intent(actions=["read"], resources=["docs"]),
            ttl=600,
        )
        task: task_pb2.Task = self.node(agent).BeginTask(request, timeout=10).task
        return task

    def end(self, agent: Agent, task_id: str) -> None:
        self.node(agent).EndTask(task_pb2.NodeEndTaskRequest(task_id=task_id), timeout=10)

    def shared_entries(self) -> tuple[Any, Any]:
        """Two entries of one SPIFFE ID (`/agents/shared`) on the first agent, for two
        workloads (uids 1001 and 1002)."""
        a, b = (
            self.srv.create_entry(
                "/agents/shared",
                self.first.spiffe_id,
                selectors=[common_pb2.Selector(type="unix", value=f"uid:{uid}")],
            )
            for uid in (1001, 1002)
        )
        return a, b


def _world() -> Iterator[World]:
    gen = running_server()
    srv = next(gen)
    first, second = srv.attest(), srv.attest()
    for agent in (first, second):
        srv.create_entry("/agents/bot", agent.spiffe_id)
    srv.create_entry("/agents/helper", first.spiffe_id)
    w = World(srv, first, second, [])
    try:
        yield w
    finally:
        for channel in w.channels:
            channel.close()
        next(gen, None)


def _tasks(world: World) -> list[task_pb2.Task]:
    """Eleven tasks over three seconds (so some share a created_at), ENDED of them ended."""
    made = []
    for n in range(11):
        if n % 4 == 3:
            world.srv.clock.advance(1)
        agent = world.second if n % 5 == 4 else world.first
        made.append(world.begin(agent, HELPER if n % 3 == 2 and agent is world.first else BOT))
    for n in ENDED:
        agent = world.first if made[n].agent_id == world.first.spiffe_id else world.second
        world.end(agent, made[n].task_id)
    return made


ENDED = (1, 4, 7)
# The module's tests only read: the one that writes while it pages has a server of its own.
world = pytest.fixture(scope="module")(_world)
tasks = pytest.fixture(scope="module")(_tasks)


def _ordered(tasks: list[task_pb2.Task]) -> list[str]:
    return [t.task_id for t in sorted(tasks, key=lambda t: (t.created_at, t.task_id))]


def _pages(
    call: Callable[[Request], task_pb2.ListTasksResponse],
    request: Request,
    between: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """The task ids of every page, following tokens; `between(n)` runs after page n."""
    pages: list[list[str]] = []
    while True:
        reply = call(request)
        pages.append([t.task_id for t in reply.tasks])
        if not reply.next_page_token:
            return pages
        request.page_token = reply.next_page_token
        if between is not None:
            between(len(pages))


def _invalid(call: Callable[[], object], message: str) -> None:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert message in exc.value.details()  # type: ignore[attr-defined]


def test_admin_pages_every_task_oldest_first(world: World, tasks: list[task_pb2.Task]) -> None:
    admin = world.admin()
    pages = _pages(admin.ListTasks, task_pb2.AdminListTasksRequest(page_size=4))
    assert [len(p) for p in pages] == [4, 4, 3]
    assert [i for p in pages for i in p] == _ordered(tasks)
    (whole,) = _pages(admin.ListTasks, task_pb2.AdminListTasksRequest())
    assert whole == _ordered(tasks)
    # A page size that divides the total leaves no empty last page.
    assert [
        len(p) for p in _pages(admin.ListTasks, task_pb2.AdminListTasksRequest(page_size=1))
    ] == [1] * 11


def test_admin_filters_by_agent_state_and_runtime(world: World, tasks: list[task_pb2.Task]) -> None:
    admin = world.admin()
    ended = {tasks[n].task_id for n in ENDED}
    for fields, keep in [
        ({"agent_id": world.second.spiffe_id}, lambda t: t.agent_id == world.second.spiffe_id),
        ({"state": "ended"}, lambda t: t.task_id in ended),
        ({"state": "active"}, lambda t: t.task_id not in ended),
        ({"runtime_id": HELPER}, lambda t: t.runtime_id == HELPER),
        (
            {"agent_id": world.first.spiffe_id, "runtime_id": BOT, "state": "active"},
            lambda t: (
                t.agent_id == world.first.spiffe_id
                and t.runtime_id == BOT
                and t.task_id not in ended
            ),
        ),
    ]:
        expected = _ordered([t for t in tasks if keep(t)])
        assert expected, fields
        pages = _pages(admin.ListTasks, task_pb2.AdminListTasksRequest(page_size=2, **fields))  # type: ignore[arg-type]
        assert [i for p in pages for i in p] == expected, fields
        assert all(len(p) <= 2 for p in pages)
    listed = admin.ListTasks(task_pb2.AdminListTasksRequest(state="ended")).tasks
    assert {t.state for t in listed} == {"ended"}


def test_node_pages_only_the_callers_tasks(world: World, tasks: list[task_pb2.Task]) -> None:
    node = world.node(world.first)
    mine = [t for t in tasks if t.agent_id == world.first.spiffe_id]
    request = task_pb2.NodeListTasksRequest(runtime_ids=[BOT, HELPER], page_size=3)
    pages = _pages(node.ListTasks, request)
    assert [i for p in pages for i in p] == _ordered(mine)
    assert all(len(p) <= 3 for p in pages)
    assert len(pages) >= 3
    # The runtimes the workload holds: only those tasks (BOT's tasks of the other agent, no).
    request = task_pb2.NodeListTasksRequest(runtime_ids=[HELPER], page_size=1)
    assert [i for p in _pages(node.ListTasks, request) for i in p] == _ordered(
        [t for t in mine if t.runtime_id == HELPER]
    )
    ended = {tasks[n].task_id for n in ENDED}
    request = task_pb2.NodeListTasksRequest(runtime_ids=[BOT, HELPER], state="ended", page_size=1)
    assert [i for p in _pages(node.ListTasks, request) for i in p] == _ordered(
        [t for t in mine if t.task_id in ended]
    )
    other = world.node(world.second)
    request = task_pb2.NodeListTasksRequest(runtime_ids=[BOT, HELPER], page_size=2)
    assert [i for p in _pages(other.ListTasks, request) for i in p] == _ordered(
        [t for t in tasks if t.agent_id == world.second.spiffe_id]
    )


def test_paging_while_tasks_begin_and_end_neither_repeats_nor_skips() -> None:
    gen = _world()
    world = next(gen)
    try:
        tasks = _tasks(world)
        ended = {tasks[n].task_id for n in ENDED}
        order = _ordered([t for t in tasks if t.task_id not in ended])
        last = next(t for t in tasks if t.task_id == order[-1])
        added: list[str] = []

        def write(page: int) -> None:
            if page == 1:
                # One not yet served ends (it leaves the active listing); one begins a
                # second later (it sorts after every cursor, so a later page carries it).
                owner = world.first if last.agent_id == world.first.spiffe_id else world.second
                world.end(owner, last.task_id)
                world.srv.clock.advance(1)
                added.append(world.begin(world.first, BOT).task_id)

        request = task_pb2.AdminListTasksRequest(state="active", page_size=3)
        flat = [i for p in _pages(world.admin().ListTasks, request, write) for i in p]
        assert len(flat) == len(set(flat))
        assert flat == order[:-1] + added
    finally:
        next(gen, None)


def test_a_page_ends_early_on_bytes(
    world: World, tasks: list[task_pb2.Task], monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = world.admin()
    (whole,) = _pages(admin.ListTasks, task_pb2.AdminListTasksRequest())
    one = admin.ListTasks(task_pb2.AdminListTasksRequest(page_size=1)).tasks[0].ByteSize()
    monkeypatch.setattr(listing, "MAX_PAGE_BYTES", one * 3)
    pages = _pages(admin.ListTasks, task_pb2.AdminListTasksRequest(page_size=5000))
    assert [i for p in pages for i in p] == whole
    assert len(pages) >= len(whole) // 3
    assert max(len(p) for p in pages) <= 3


def test_bad_and_foreign_page_tokens_are_refused(world: World, tasks: list[task_pb2.Task]) -> None:
    admin = world.admin()
    node = world.node(world.first)
    token = admin.ListTasks(task_pb2.AdminListTasksRequest(page_size=1)).next_page_token
    node_token = node.ListTasks(
        task_pb2.NodeListTasksRequest(runtime_ids=[BOT], page_size=1)
    ).next_page_token
    assert token
    assert node_token
    other_filters = "page_token: issued for a listing with different filters"
    _invalid(
        lambda: admin.ListTasks(task_pb2.AdminListTasksRequest(state="active", page_token=token)),
        other_filters,
    )
    _invalid(
        lambda: admin.ListTasks(task_pb2.AdminListTasksRequest(page_token=node_token)),
        other_filters,
    )
    _invalid(
        lambda: node.ListTasks(task_pb2.NodeListTasksRequest(runtime_ids=[BOT], page_token=token)),
        other_filters,
    )
    # Another agent, or the same agent for other identities, cannot page on with it.
    _invalid(
        lambda: world.node(world.second).ListTasks(
            task_pb2.NodeListTasksRequest(runtime_ids=[BOT], page_token=node_token)
        ),
        other_filters,
    )
    _invalid(
        lambda: node.ListTasks(
            task_pb2.NodeListTasksRequest(runtime_ids=[BOT, HELPER], page_token=node_token)
        ),
        other_filters,
    )
    _invalid(
        lambda: admin.ListTasks(task_pb2.AdminListTasksRequest(page_token="not-a-token")),
        "page_token: not a token this server issued",
    )
    # Bound to the right filters but not carrying a cursor this server writes.
    for after in ("x", "12:", ":t", "-1:t", "1" * 19 + ":t", "\u0661:t"):  # an Arabic-Indic digit
        forged = listing.encode_token(after, ["tasks", "", "", ""])
        _invalid(
            lambda forged=forged: admin.ListTasks(
                task_pb2.AdminListTasksRequest(page_token=forged)
            ),
            "page_token: not a token this server issued",
        )
    for request, message in [
        (task_pb2.AdminListTasksRequest(page_size=5001), "page_size: 5001 is out of range"),
        (task_pb2.AdminListTasksRequest(page_size=-1), "page_size: -1 is out of range"),
        (task_pb2.AdminListTasksRequest(state="finished"), "state: 'finished' is not one of"),
        (task_pb2.AdminListTasksRequest(agent_id="node-1"), "agent_id:"),
        (task_pb2.AdminListTasksRequest(runtime_id="spiffe://x/../y"), "runtime_id:"),
    ]:
        _invalid(lambda request=request: admin.ListTasks(request), message)
    _invalid(
        lambda: node.ListTasks(task_pb2.NodeListTasksRequest(runtime_ids=[BOT], state="done")),
        "state: 'done' is not one of",
    )
    _invalid(
        lambda: node.ListTasks(task_pb2.NodeListTasksRequest(runtime_ids=[BOT], page_size=9999)),
        "page_size: 9999 is out of range",
    )
    # The right token with the same filters pages on.
    reply = admin.ListTasks(task_pb2.AdminListTasksRequest(page_size=1, page_token=token))
    assert len(reply.tasks) == 1


def test_node_ends_and_pages_only_the_tasks_of_the_callers_own_entry() -> None:
    """Two workloads hold one SPIFFE ID through two entries of one agent: each lists and ends
    only the tasks it began (the agent sends the caller's entries), however they interleave."""
    gen = _world()
    world = next(gen)
    try:
        shared = f"{TD}/agents/shared"
        a, b = world.shared_entries()
        node = world.node(world.first)
        begun: dict[str, list[task_pb2.Task]] = {a.id: [], b.id: []}
        for n in range(9):
            if n % 4 == 3:
                world.srv.clock.advance(1)
            entry = b if n % 3 else a  # B's tasks lie between A's: filtered pages skip them
            request = task_pb2.NodeBeginTaskRequest(
                runtime_id=shared,
                intent=task_pb2.Intent(actions=["read"], resources=["docs"]),
                ttl=600,
                runtime_entry_id=entry.id,
            )
            begun[entry.id].append(node.BeginTask(request, timeout=10).task)
        for entry in (a, b):
            request = task_pb2.NodeListTasksRequest(
                runtime_ids=[shared], runtime_entry_ids=[entry.id], page_size=2
            )
            pages = _pages(node.ListTasks, request)
            assert [i for p in pages for i in p] == _ordered(begun[entry.id])
            assert all(len(p) <= 2 for p in pages)
        theirs = begun[a.id][0]
        with pytest.raises(grpc.RpcError) as exc:
            node.EndTask(
                task_pb2.NodeEndTaskRequest(
                    task_id=theirs.task_id, runtime_ids=[shared], runtime_entry_ids=[b.id]
                ),
                timeout=10,
            )
        assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        assert "belongs to another workload" in exc.value.details()  # type: ignore[attr-defined]
        ended = node.EndTask(
            task_pb2.NodeEndTaskRequest(
                task_id=theirs.task_id, runtime_ids=[shared], runtime_entry_ids=[a.id]
            ),
            timeout=10,
        ).task
        assert ended.state == "ended"
    finally:
        next(gen, None)


def test_task_and_entry_ids_of_a_malformed_shape_are_refused_before_any_lookup(
    world: World, tasks: list[task_pb2.Task], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Task IDs are the server's own (16 lowercase hex digits) and entry IDs 1-64 of
    A-Z a-z 0-9 _ -: anything else, a megabyte of it included, is INVALID_ARGUMENT naming the
    field, never echoing it, and never reaches the datastore."""
    store = world.srv.server.tasks.service.store
    looked_up: list[int] = []
    for name in ("get_task", "list_tasks"):
        real = getattr(store, name)

        def spy(*args: object, _real: Callable[..., object] = real, **kwargs: object) -> object:
            looked_up.append(sum(len(str(a)) for a in (*args, *kwargs.values())))
            return _real(*args, **kwargs)

        monkeypatch.setattr(store, name, spy)
    huge = "a" * 1_000_000
    mine = next(t for t in tasks if t.agent_id == world.first.spiffe_id)
    node, admin = world.node(world.first), world.admin()

    def begin(**fields: object) -> object:
        request = task_pb2.NodeBeginTaskRequest(
            runtime_id=BOT, intent=task_pb2.Intent(actions=["read"], resources=["docs"]), ttl=60
        )
        for key, value in fields.items():
            setattr(request, key, value)
        return node.BeginTask(request, timeout=10)

    calls: list[tuple[Callable[[], object], str]] = [
        (lambda: begin(parent_task_id=huge), "parent_task_id"),
        (lambda: begin(parent_task_id=mine.task_id.upper()), "parent_task_id"),
        (lambda: begin(parent_task_id=mine.task_id + "0"), "parent_task_id"),
        (lambda: begin(runtime_entry_id=huge), "runtime_entry_id"),
        (lambda: begin(runtime_entry_id="a/b"), "runtime_entry_id"),
        (lambda: begin(runtime_id=BOT + "/" + huge), "runtime_id"),
        (
            lambda: node.EndTask(task_pb2.NodeEndTaskRequest(task_id=huge), timeout=10),
            "task_id",
        ),
        (lambda: node.EndTask(task_pb2.NodeEndTaskRequest(), timeout=10), "task_id"),
        (
            lambda: node.EndTask(
                task_pb2.NodeEndTaskRequest(task_id=mine.task_id, runtime_entry_ids=[huge]),
                timeout=10,
            ),
            "runtime_entry_ids",
        ),
        (
            lambda: node.EndTask(
                task_pb2.NodeEndTaskRequest(task_id=mine.task_id, runtime_ids=[BOT + huge]),
                timeout=10,
            ),
            "runtime_ids",
        ),
        (
            lambda: node.ListTasks(
                task_pb2.NodeListTasksRequest(runtime_ids=[BOT], runtime_entry_ids=[huge]),
                timeout=10,
            ),
            "runtime_entry_ids",
        ),
        (
            lambda: node.ListTasks(
                task_pb2.NodeListTasksRequest(runtime_ids=[BOT + huge]), timeout=10
            ),
            "runtime_ids",
        ),
        (lambda: admin.ShowTask(task_pb2.AdminTaskRequest(task_id=huge), timeout=10), "task_id"),
        (
            lambda: admin.RevokeTask(task_pb2.AdminTaskRequest(task_id=huge), timeout=10),
            "task_id",
        ),
    ]
    for call, field in calls:
        with pytest.raises(grpc.RpcError) as exc:
            call()
        code, details = exc.value.code(), exc.value.details()  # type: ignore[attr-defined]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, code, details[:200])
        assert details.startswith(f"{field}: "), (field, details[:200])
        assert len(details) < 200, field
    assert looked_up == []
    # The well-formed ones still go through.
    assert admin.ShowTask(task_pb2.AdminTaskRequest(task_id=mine.task_id)).task_id == mine.task_id
    assert looked_up


def test_a_page_of_the_callers_own_tasks_reads_a_bounded_number_of_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another workload of the caller's SPIFFE ID may hold any number of tasks on the node,
    and a page of the caller's own skips them: it reads at most max_scanned_rows rows (or the
    page size + 1, if more), then hands a token on from the last row read, so a page may be
    short, even empty. Following the tokens to the end yields exactly the caller's tasks."""
    gen = _world()
    world = next(gen)
    try:
        shared = f"{TD}/agents/shared"
        a, b = world.shared_entries()
        node = world.node(world.first)
        mine: list[task_pb2.Task] = []
        for n in range(43):
            if n % 10 == 9:
                world.srv.clock.advance(1)
            entry = a if n in (0, 20, 21, 42) else b
            request = task_pb2.NodeBeginTaskRequest(
                runtime_id=shared,
                intent=task_pb2.Intent(actions=["read"], resources=["docs"]),
                ttl=600,
                runtime_entry_id=entry.id,
            )
            task = node.BeginTask(request, timeout=10).task
            if entry is a:
                mine.append(task)
        service = world.srv.server.tasks.service
        scanned = 8
        monkeypatch.setattr(service, "settings", replace(service.settings, max_scanned_rows=8))
        reads: list[int] = []
        real = service.store.list_tasks

        def counted(**kwargs: Any) -> list[Any]:
            rows: list[Any] = real(**kwargs)
            reads[-1] += len(rows)
            return rows

        monkeypatch.setattr(service.store, "list_tasks", counted)
        request = task_pb2.NodeListTasksRequest(
            runtime_ids=[shared], runtime_entry_ids=[a.id], page_size=2
        )
        pages: list[list[str]] = []
        while True:
            reads.append(0)
            reply = node.ListTasks(request, timeout=10)
            pages.append([t.task_id for t in reply.tasks])
            if not reply.next_page_token:
                break
            request.page_token = reply.next_page_token
        assert [i for p in pages for i in p] == _ordered(mine)
        assert max(reads) <= scanned, reads
        assert any(len(p) < 2 for p in pages[:-1]), pages  # short pages went on with a token
        assert sum(reads) < 43 + 3 * len(pages)  # no row read over and over
    finally:
        next(gen, None)
