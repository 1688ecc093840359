"""Jobs that happen once per trust domain while two real servers share one datastore (SQLite
file or PostgreSQL schema): a task's end (a compare-and-set on its row), audit checkpoints and
retention (the holder of the housekeeping lease). server/housekeeping.py has the table.

Each server runs in-process on its own loop, with its own data directory (checkpoint key and
file) and a key-encryption key shared through the datastore, as separate hosts would.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from server import app as server_app
from server.audit.checkpoint import (
    CHECKPOINT,
    CHECKPOINT_FILE,
    PRUNE,
    Checkpoint,
    CheckpointFile,
)
from server.ca.sealing import KeyEncryptionKey
from server.datastore.errors import StorageError
from server.datastore.records import EventFilter
from server.housekeeping import DEFAULT_LEASE_TTL, HOUSEKEEPING_LEASE, Lease
from server.tasks.model import Task, TaskState
from server.tasks.removals import REMOVAL_GRACE
from server.tasks.service import END_GRACE, BeginRequest
from svid._proto import admin_pb2
from tests.server.fixtures import RunningServer, short_tmpdir, start_server
from tests.server.test_admin_api import _x509_serial
from tests.server.test_replication_servers import wait_until

LEASE_TTL = 30


@dataclass
class Pair:
    root: Path
    options: dict[str, Any]
    a: RunningServer
    b: RunningServer | None = None

    def start(self, name: str) -> RunningServer:
        return start_server(
            self.root,
            data_dir=str(self.root / name / "data"),
            admin_socket=str(self.root / name / "admin.sock"),
            **self.options,
        )

    def start_b(self) -> RunningServer:
        self.b = self.start("b")
        return self.b

    def restart_b(self) -> RunningServer:
        assert self.b is not None
        self.b.stop()
        return self.start_b()

    def checkpoints(self, server: RunningServer) -> CheckpointFile:
        return CheckpointFile(server.config.data_dir / CHECKPOINT_FILE)


def _pair(request: pytest.FixtureRequest, **options: Any) -> Iterator[Pair]:
    root = short_tmpdir()
    KeyEncryptionKey.generate().write_new(root / "kek")
    options["key_encryption_key_file"] = str(root / "kek")
    if request.param == "postgresql":
        options["datastore"] = request.getfixturevalue("postgres_dsn")
    else:
        options["datastore"] = str(root / "shared.sqlite3")
    pair = Pair(root, options, a=start_server(root, data_dir=str(root / "a" / "data"),
                                              admin_socket=str(root / "a" / "admin.sock"),
                                              **options))  # fmt: skip
    try:
        yield pair
    finally:
        for server in (pair.b, pair.a):
            if server is not None:
                server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """A started; B is started by the test (`start_b`), after what it needs A to have done."""
    yield from _pair(request)


@pytest.fixture(params=["sqlite", "postgresql"])
def pruning_pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """As `pair`, both keeping 2 audit events, pruning and checkpointing every 0.2 s."""
    yield from _pair(
        request, audit_max_events=2, audit_prune_interval=0.2, audit_checkpoint_interval=0.2
    )


# -- a task's end -------------------------------------------------------------------------------


def _begin_through_a(pair: Pair, ttl: int) -> tuple[Task, Any]:
    """An agent and its runtime (through A), then a task begun through A; B started after."""
    agent = pair.a.attest()
    runtime = pair.a.create_entry("/bot", agent.spiffe_id)
    record = pair.a.server.state.agents[agent.spiffe_id]
    request = BeginRequest(
        runtime_id=runtime.spiffe_id, actions=("read",), resources=("docs",), ttl=ttl
    )
    task: Task = pair.a.call(pair.a.server.tasks.service.begin(record, request))
    # Started after A's writes: the task is among those B loads at its start.
    b = pair.start_b()
    wait_until(lambda: b.server.tasks.service.active_task(task.spiffe_id), 2, "B to hold the task")
    return task, record


@dataclass
class Overlap:
    b_done: threading.Event
    b_claims: list[Task | None]  # what B's claims of the end returned (None: moved nothing)


def _overlap_ends(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> Overlap:
    """Make A's and B's ends of a task overlap: both have read it active before either writes
    (A's write waits for B's end to begin; B's write waits for A's)."""
    assert pair.b is not None
    store_a = pair.a.server.tasks.service.store
    store_b = pair.b.server.tasks.service.store
    finish_a, finish_b = store_a.finish, store_b.finish
    b_ending, overlap = threading.Event(), Overlap(threading.Event(), [])

    def a_finish(task: Task, *args: Any) -> Task | None:
        assert b_ending.wait(10), "B never began to end the task"
        return finish_a(task, *args)

    def b_finish(task: Task, *args: Any) -> Task | None:
        b_ending.set()
        row = store_b.get_task
        wait_until(lambda: not row(task.task_id).active, 10, "A to end the task")  # type: ignore[union-attr]
        try:
            claim = finish_b(task, *args)
            overlap.b_claims.append(claim)
            return claim
        finally:
            overlap.b_done.set()

    monkeypatch.setattr(store_a, "finish", a_finish)
    monkeypatch.setattr(store_b, "finish", b_finish)
    return overlap


def _ends_on_record(pair: Pair, task: Task) -> list[dict[str, Any]]:
    """The task-end events of the task, once the first is there and a moment went by for any
    other to follow."""
    store = pair.a.server.datastore

    def ends() -> list[dict[str, Any]]:
        return list(store.audit_rows(EventFilter(kind="task_end", task_id=task.task_id)))

    wait_until(ends, 5, "a task-end event")
    time.sleep(0.3)
    return ends()


def _settled(pair: Pair, task: Task, state: TaskState) -> None:
    """The row as the end left it: its state, and no end left to finish."""
    store = pair.a.server.tasks.service.store
    stored = store.get_task(task.task_id)
    assert stored is not None
    assert stored.state is state
    wait_until(lambda: not store.unsettled(2**62), 2, "the end to be settled")


def _renewed_now(lease: Lease, clock: Any) -> bool:
    """Whether the lease's renewal at the clock's present time has answered, and got it: its
    ask is made (next_renewal moves) before the datastore answers, and the test's next step
    of the clocks must not overtake a renewal still on its way (the other server then finds
    the row lapsed at the new time and takes it)."""
    return lease.held_until >= clock.monotonic() + DEFAULT_LEASE_TTL * 2 / 3


def test_a_task_that_expires_is_ended_by_one_server(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, _ = _begin_through_a(pair, ttl=10)
    assert pair.b is not None
    overlap = _overlap_ends(pair, monkeypatch)
    for server in (pair.a, pair.b):
        server.clock.advance(11)  # both sweeps find it due
    assert overlap.b_done.wait(10)
    assert [e["decision"] for e in _ends_on_record(pair, task)] == ["expired"]
    assert overlap.b_claims == [None]  # B's write moved nothing: A's had ended it
    _settled(pair, task, TaskState.EXPIRED)
    for server in (pair.a, pair.b):
        wait_until(
            lambda s=server: s.server.tasks.service.active_task(task.spiffe_id) is None,  # type: ignore[misc]
            2,
            "the task to be inactive",
        )


def test_an_end_through_a_racing_bs_expiry_sweep_ends_the_task_once(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, record = _begin_through_a(pair, ttl=10)
    assert pair.b is not None
    overlap = _overlap_ends(pair, monkeypatch)
    pair.b.clock.advance(11)  # B's sweep finds it due while A's EndTask runs
    ended: Task = pair.a.call(pair.a.server.tasks.service.end(record, task.task_id, ()))
    assert ended.state is TaskState.ENDED
    assert overlap.b_done.wait(10)
    assert [e["decision"] for e in _ends_on_record(pair, task)] == ["ended"]
    assert overlap.b_claims == [None]
    _settled(pair, task, TaskState.ENDED)


# -- the housekeeping lease ---------------------------------------------------------------------


def test_only_the_lease_holder_checkpoints_and_prunes(pruning_pair: Pair) -> None:
    pair = pruning_pair
    for _ in range(3):
        pair.a.attest()  # audit events to prune, all through A
    b = pair.start_b()  # its head holds them too: it would prune them as well
    assert pair.a.server.housekeeping.held
    assert not b.server.housekeeping.held
    a_file, b_file = pair.checkpoints(pair.a), pair.checkpoints(b)
    first: Checkpoint = wait_until(lambda: a_file.last(PRUNE), 5, "A to sign a prune record")
    pair.a.attest()
    wait_until(lambda: a_file.last(PRUNE) != first, 5, "A to prune again")
    # Several of B's intervals went by: it signed nothing, neither at start nor since. Its
    # file holds what A signed (and stored in the datastore) only.
    a_lines = set(a_file.path.read_text().splitlines())
    wait_until(lambda: b_file.last(PRUNE), 5, "B to file A's prune record")
    assert set(b_file.path.read_text().splitlines()) <= a_lines


def test_the_lease_moves_to_b_when_a_stops_renewing(pair: Pair) -> None:
    b = pair.start_b()
    a_lease, b_lease = pair.a.server.housekeeping, b.server.housekeeping
    assert a_lease.held
    assert not b_lease.held
    # Only A's checkpoint (filed from the datastore): B signed none.
    adopted = pair.checkpoints(b).last(CHECKPOINT)
    assert adopted == pair.checkpoints(pair.a).last(CHECKPOINT)

    async def stop_renewing() -> None:
        for task in asyncio.all_tasks():
            if task.get_name() == "housekeeping-lease":
                task.cancel()

    pair.a.call(stop_renewing())  # as if A hung or died
    b.attest()  # an event past A's last checkpoint
    pair.a.clock.advance(LEASE_TTL / 3)
    b.clock.advance(LEASE_TTL / 3)
    assert not b.call(asyncio.to_thread(b_lease.renew))  # A's lease still runs
    for server in (pair.a, b):
        server.clock.advance(LEASE_TTL)
    wait_until(lambda: b_lease.held, 5, "B to take the lease over")
    assert not a_lease.held  # A's own view: its last renewal is too old to act on
    store = b.server.datastore
    assert not store.acquire_lease(HOUSEKEEPING_LEASE, a_lease.holder, int(b.clock.now()), 1)
    # The new holder anchored the head it found at once.
    head = store.audit_head()
    assert head is not None
    assert adopted is not None
    assert head.seq > adopted.seq  # B's lease writes nothing to the chain, but attests do
    wait_until(
        lambda: getattr(pair.checkpoints(b).last(CHECKPOINT), "seq", 0) == head.seq,
        5,
        "B's first checkpoint",
    )


def test_only_the_lease_holder_finishes_an_end_left_half_done(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    task, record = _begin_through_a(pair, ttl=600)
    assert pair.b is not None
    service_a, service_b = pair.a.server.tasks.service, pair.b.server.tasks.service
    settle = service_a.store.settle

    def dies(_task: Task) -> bool:
        raise StorageError("A died here")

    monkeypatch.setattr(service_a.store, "settle", dies)
    with pytest.raises(StorageError):
        pair.a.call(service_a.end(record, task.task_id, ()))
    monkeypatch.setattr(service_a.store, "settle", settle)
    assert service_a.store.unsettled(2**62) != []
    b_tries: list[int] = []
    finish_on_b = service_b.settle_ends

    async def spy(grace: int = END_GRACE) -> int:
        b_tries.append(grace)
        return await finish_on_b(grace)

    monkeypatch.setattr(service_b, "settle_ends", spy)
    # The lease loop notices a jump of the test's clock within this much real time (1 s in a
    # server, where the clock moves by itself): nine jumps need not take nine seconds.
    monkeypatch.setattr(server_app, "MAX_LEASE_WAIT", 0.05)
    lease = pair.a.server.housekeeping
    # Housekeeping runs every 60 s (of the clocks): the end is stale (END_GRACE) at the
    # second run. 135 s on both clocks, A renewing its lease on the way.
    for _ in range(9):
        for server in (pair.a, pair.b):
            server.clock.advance(15)
        wait_until(lambda: _renewed_now(lease, pair.a.clock), 3, "A to renew")
    # A housekeeping run also checkpoints and prunes: seconds on a loaded machine.
    wait_until(lambda: not service_a.store.unsettled(2**62), 20, "A to finish the end")
    assert b_tries == []  # B ran its housekeeping too, but the lease is A's
    assert [e["decision"] for e in _ends_on_record(pair, task)] == ["ended"]


def test_a_removal_cut_short_on_b_is_finished_by_the_lease_holder_alone(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B evicts an agent and fails midway (before revoking anything); nobody retries. A, the
    housekeeping lease holder, finishes the removal a minute on; B, running its housekeeping
    too, does not."""
    agent = pair.a.attest()
    entry = pair.a.create_entry("/evicted-through-b", agent.spiffe_id)
    serial = _x509_serial(pair.a, agent, entry.id)
    b = pair.start_b()

    async def dies(*_args: object, **_kwargs: object) -> int:
        raise StorageError("B died here")

    with monkeypatch.context() as fault:
        fault.setattr(b.server.tasks.service, "revoke_agent", dies)
        with pytest.raises(grpc.RpcError):
            b.admin().EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id=agent.spiffe_id), timeout=10)
    b_tries: list[int] = []
    finish_on_b = b.server.tasks.removals.finish_cut_short

    async def spy(grace: int = REMOVAL_GRACE) -> int:
        b_tries.append(grace)
        return await finish_on_b(grace)

    monkeypatch.setattr(b.server.tasks.removals, "finish_cut_short", spy)
    monkeypatch.setattr(server_app, "MAX_LEASE_WAIT", 0.05)
    lease = pair.a.server.housekeeping
    # 90 s on both clocks, A renewing its lease on the way: housekeeping runs once at least.
    for _ in range(6):
        for server in (pair.a, b):
            server.clock.advance(15)
        wait_until(lambda: _renewed_now(lease, pair.a.clock), 3, "A to renew")
    store = pair.a.server.datastore
    wait_until(lambda: store.list_removals(2**62) == [], 20, "A to finish the removal")
    where = EventFilter(kind="revocation", agent_id=entry.spiffe_id)
    assert [r["credential_id"] for r in store.audit_rows(where)] == [serial]
    evicted = EventFilter(kind="agent_evicted", agent_id=agent.spiffe_id)
    assert len(list(store.audit_rows(evicted))) == 1
    # Every server serves the revocation (B through the change feed).
    for server in (pair.a, b):
        wait_until(
            lambda s=server: serial in {r.value for r in s.server.state.revocations},  # type: ignore[misc]
            5,
            "the revocation to be served",
        )
    assert b_tries == []  # B ran its housekeeping too, but the lease is A's
