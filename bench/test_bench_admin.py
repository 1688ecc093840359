"""Provisioning at scale through the admin API (`make bench`), against a real `svid-server run`
process over its admin Unix socket, with its real SQLite file.

Rows:
- 100,000 entries created through BatchCreateEntry (batches of 1,000, the server's maximum),
  spread over 100 agents: total seconds and entries/s. Goal: <= 60 s (the row's ratio is
  60 s / measured, goal >= 1).
- the same with a Sync stream open for one of those agents, so every batch also wakes a
  connected agent's stream (one notification per batch).
- reading all 100,000 back through ListEntries pages (page size 5,000): seconds.
- for reference, entries/s through the single-entry CreateEntry, 2,000 entries (one
  transaction, one fsync, one notification each).

The machine is shared (2 cores, other engineers' runs come and go): numbers vary by 2x run to run.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from svid._proto import admin_pb2, admin_pb2_grpc, common_pb2, node_pb2, node_pb2_grpc
from tests.e2e.conftest import TRUST_DOMAIN, ServerProcess, make_server, short_tmpdir
from tests.e2e.test_server_cli import attest, node_channel

TOTAL = 100_000
BATCH = 1000
AGENTS = 100
GOAL_SECONDS = 60.0
SINGLE = 2000
TD = f"spiffe://{TRUST_DOMAIN}"


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    root = short_tmpdir()
    proc = make_server(root, log_level="warning")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(root, ignore_errors=True)


def _admin(server: ServerProcess) -> tuple[grpc.Channel, admin_pb2_grpc.AdminStub]:
    channel = grpc.insecure_channel(f"unix:{server.admin_socket}")
    return channel, admin_pb2_grpc.AdminStub(channel)


def _parent(n: int) -> str:
    return f"{TD}/svid/agent/join_token/bench{n}"


def _batches(parents: list[str]) -> list[admin_pb2.BatchCreateEntryRequest]:
    """Built before the clock starts: the row measures the server, not the test's protobufs."""
    requests = []
    for start in range(0, TOTAL, BATCH):
        requests.append(
            admin_pb2.BatchCreateEntryRequest(
                entries=[
                    common_pb2.Entry(
                        spiffe_id=f"{TD}/bench/w{n}",
                        parent_id=parents[n % len(parents)],
                        selectors=[common_pb2.Selector(type="unix", value=f"uid:{n}")],
                    )
                    for n in range(start, start + BATCH)
                ]
            )
        )
    return requests


def _create_all(admin: admin_pb2_grpc.AdminStub, requests: list[Any]) -> float:
    started = time.perf_counter()
    for request in requests:
        results = admin.BatchCreateEntry(request, timeout=120).results
        refused = [r.status.message for r in results if r.status.code]
        assert not refused, refused[:3]
    return time.perf_counter() - started


def _list_all(admin: admin_pb2_grpc.AdminStub) -> tuple[float, int]:
    started = time.perf_counter()
    token, count = "", 0
    while True:
        reply = admin.ListEntries(
            admin_pb2.ListEntriesRequest(page_size=5000, page_token=token), timeout=60
        )
        count += len(reply.entries)
        token = reply.next_page_token
        if not token:
            return time.perf_counter() - started, count


def _row(
    name: str, value: float, unit: str, ratio: float | None, goal: float | None
) -> dict[str, Any]:
    return {
        "row": name,
        "value": value,
        "unit": unit,
        "baseline": f"{GOAL_SECONDS:g} s goal" if goal else "-",
        "ratio": ratio,
        "goal": goal,
    }


def test_100k_entries_through_batch_create(benchmark: Any, server: ServerProcess) -> None:
    channel, admin = _admin(server)
    try:
        requests = _batches([_parent(n) for n in range(AGENTS)])
        seconds = benchmark.pedantic(lambda: _create_all(admin, requests), rounds=1, iterations=1)
        list_seconds, listed = _list_all(admin)
        assert listed == TOTAL
    finally:
        channel.close()
    rate = TOTAL / seconds
    print(
        f"\n[bench] {TOTAL:,} entries via BatchCreateEntry: {seconds:.1f} s ({rate:,.0f}/s; "
        f"goal <= {GOAL_SECONDS:g} s); listing them all back: {list_seconds:.2f} s"
    )
    benchmark.extra_info["rows"] = [
        _row("admin: 100k entries, batch create (s)", seconds, "s", GOAL_SECONDS / seconds, 1.0),
        _row("admin: batch create rate", rate, "entries/s", None, None),
        _row("admin: list 100k entries, every page (s)", list_seconds, "s", None, None),
    ]


def test_100k_entries_with_a_sync_stream_open(benchmark: Any, server: ServerProcess) -> None:
    bundle = server.cli("bundle", "show").stdout.encode()
    agent = attest(server, server.cli_json("token", "generate")["token"], bundle)
    parents = [agent.spiffe_id] + [_parent(n) for n in range(1, AGENTS)]
    updates = 0
    with node_channel(server, agent) as node:
        stream = node_pb2_grpc.NodeStub(node).Sync(node_pb2.SyncRequest(), timeout=600)

        def drain() -> None:
            nonlocal updates
            try:
                for _ in stream:
                    updates += 1
            except grpc.RpcError:
                pass

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        channel, admin = _admin(server)
        try:
            requests = _batches(parents)
            seconds = benchmark.pedantic(
                lambda: _create_all(admin, requests), rounds=1, iterations=1
            )
        finally:
            channel.close()
            stream.cancel()
            reader.join(10)
    rate = TOTAL / seconds
    print(
        f"\n[bench] {TOTAL:,} entries via BatchCreateEntry, one agent's Sync stream open "
        f"({TOTAL // AGENTS:,} of them its own): {seconds:.1f} s ({rate:,.0f}/s); "
        f"the stream got {updates} updates for {TOTAL // BATCH} batches"
    )
    benchmark.extra_info["rows"] = [
        _row(
            "admin: 100k entries, batch create, Sync open (s)",
            seconds,
            "s",
            GOAL_SECONDS / seconds,
            1.0,
        ),
    ]


def test_single_entry_create_for_reference(benchmark: Any, server: ServerProcess) -> None:
    channel, admin = _admin(server)
    try:
        requests = [
            admin_pb2.CreateEntryRequest(
                entry=common_pb2.Entry(
                    spiffe_id=f"{TD}/single/w{n}",
                    parent_id=_parent(n % AGENTS),
                    selectors=[common_pb2.Selector(type="unix", value=f"uid:{n}")],
                )
            )
            for n in range(SINGLE)
        ]

        def run() -> float:
            started = time.perf_counter()
            for request in requests:
                admin.CreateEntry(request, timeout=30)
            return time.perf_counter() - started

        seconds = benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        channel.close()
    rate = SINGLE / seconds
    print(f"\n[bench] {SINGLE:,} entries via CreateEntry, one per call: {rate:,.0f}/s")
    benchmark.extra_info["rows"] = [
        _row("admin: single CreateEntry rate (reference)", rate, "entries/s", None, None),
    ]
