"""Attack repro: task listings whose callers give up keep their threads but not their turns.

ListTasks runs a listing on the default executor within the agent's turns (2 running) and the
listings' share of that pool (MAX_LISTINGS). A call cancelled (its deadline passed, its client
gone) leaves the `async with` at once, but the thread it started cannot be stopped and runs on:
an agent asking with a deadline shorter than its listings frees its turn at each call and holds
as many of the pool's threads as it likes, the threads every agent's begins and ends run on."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import grpc
import pytest

from server.tasks import grpc_api
from svid._proto import task_pb2, task_pb2_grpc
from tests.server.fixtures import managed_server

LISTING_SECONDS = 0.6
CALLERS = 8


def test_a_cancelled_listing_keeps_its_turn_until_its_thread_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running = 0
    most = 0
    lock = threading.Lock()
    read = grpc_api._Page.read

    def slow_read(self: grpc_api._Page, *args: Any, **kwargs: Any) -> Any:
        # A listing as slow as a large page on a loaded datastore, counted while it runs.
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(LISTING_SECONDS)
            return read(self, *args, **kwargs)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(grpc_api._Page, "read", slow_read)
    with managed_server() as server:
        hostile = server.attest()
        runtime = server.create_entry("/agents/lister", hostile.spiffe_id).spiffe_id
        stub = task_pb2_grpc.NodeTasksStub(server.node_channel(hostile))
        stop = time.monotonic() + 3 * LISTING_SECONDS

        def give_up_early() -> None:
            while time.monotonic() < stop:
                # Its deadline passes, or it is refused: it asks again.
                with contextlib.suppress(grpc.RpcError):
                    stub.ListTasks(
                        task_pb2.NodeListTasksRequest(runtime_ids=[runtime]), timeout=0.1
                    )

        callers = [threading.Thread(target=give_up_early) for _ in range(CALLERS)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        time.sleep(LISTING_SECONDS)  # the last ones end
    assert 0 < most <= grpc_api.MAX_LISTINGS, (
        f"{most} listings ran at once on the default executor (MAX_LISTINGS "
        f"{grpc_api.MAX_LISTINGS}), their callers having given up"
    )
