"""Audit retention (`make bench`): prune throughput, and what a prune costs the issuance path.

Rows (printed and stored in benchmark extra_info):
- prune alone: events removed per second, batches of 10k, the shipped pause between batches,
  the head signed first as a server's checkpointer does (a prune reads the chain back from the
  newest checkpoint at or before its target: with none at all, from the base, twice the time)
- Ledger.record latency (one credential + its event, durable on return) from one thread:
  p50 / p99 / max, first with nothing else running, then while a prune of the same size runs
All on the server's datastore file (SqliteDataStore: WAL, synchronous=FULL), events shaped like
issuance's.
"""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path
from typing import Any

from server.audit import AuditLog
from server.audit.checkpointer import Checkpointer
from server.audit.retention import Cut, Pruner, RetentionPolicy
from server.datastore import AttestedAgent
from server.datastore.records import Credential
from server.datastore.sqlite import SqliteDataStore
from svid._clock import SystemClock

EVENTS = 200_000
AGENT = "spiffe://example.org/agents/research-bot"
NODE = "spiffe://example.org/svid/agent/join_token/n1"


def _draft(i: int) -> tuple[Any, ...]:
    return ("jwt_minted", AGENT, NODE, None, "db", "read", "allow", None, "task-1", 0,
            f"jti-{i:012d}", ("default.cedar:work_within_intent",), "ab" * 32, 300, 71.5,
            {})  # fmt: skip


def _setup(path: Path) -> tuple[SqliteDataStore, AuditLog, Pruner]:
    clock = SystemClock()
    store = SqliteDataStore(path / "datastore.sqlite3", clock)
    # The ledger records credentials only of an agent admitted.
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", 2**40))
    log = AuditLog(store, clock)
    for start in range(0, EVENTS, 1000):
        log.append_tuples([_draft(start + i) for i in range(1000)])
    checkpointer = Checkpointer.in_data_dir(
        log,
        path,
        clock,
        interval=60.0,
    )
    # As a server has (it signs the head every minute): a prune reads the chain back to its
    # target from the newest checkpoint at or before it, here the target itself.
    checkpointer.checkpoint()
    return store, log, Pruner(store, log, checkpointer, clock, RetentionPolicy(0, 0))


def _record_latencies(log: AuditLog, stop: threading.Event, out: list[float]) -> None:
    i = 0
    while not stop.is_set():
        cred = Credential("jwt_id", f"live-{i}", AGENT, "spiffe://example.org/w", "", 2_000_000_000)
        t0 = time.perf_counter()
        log.record([cred], [_draft(10**9 + i)])
        out.append((time.perf_counter() - t0) * 1e3)
        i += 1


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def test_audit_prune_cost(benchmark: Any, tmp_path: Path) -> None:
    (tmp_path / "alone").mkdir()
    (tmp_path / "busy").mkdir()
    store, _log, pruner = _setup(tmp_path / "alone")
    start = time.perf_counter()
    removed = pruner.prune(Cut(through=EVENTS)).removed
    alone_s = time.perf_counter() - start
    assert removed == EVENTS
    store.close()

    store, log, pruner = _setup(tmp_path / "busy")
    stop = threading.Event()
    idle: list[float] = []
    thread = threading.Thread(target=_record_latencies, args=(log, stop, idle))
    thread.start()
    time.sleep(2.0)
    stop.set()
    thread.join()

    stop = threading.Event()
    busy: list[float] = []
    thread = threading.Thread(target=_record_latencies, args=(log, stop, busy))
    thread.start()
    start = time.perf_counter()
    removed = pruner.prune(Cut(through=EVENTS)).removed
    busy_s = time.perf_counter() - start
    stop.set()
    thread.join()
    assert removed == EVENTS
    assert log.verify().ok
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    store.close()

    info = {
        "prune_alone_per_s": EVENTS / alone_s,
        "prune_under_issuance_per_s": EVENTS / busy_s,
        "record_idle_p50_ms": _pct(idle, 50),
        "record_idle_p99_ms": _pct(idle, 99),
        "record_idle_max_ms": max(idle),
        "record_pruning_p50_ms": _pct(busy, 50),
        "record_pruning_p99_ms": _pct(busy, 99),
        "record_pruning_max_ms": max(busy),
    }
    benchmark.extra_info.update(info)
    print(
        f"\naudit prune: {EVENTS} events in {alone_s:.2f} s alone "
        f"({info['prune_alone_per_s']:.0f}/s), {busy_s:.2f} s under issuance "
        f"({info['prune_under_issuance_per_s']:.0f}/s); ledger record p50/p99/max "
        f"{info['record_idle_p50_ms']:.2f}/{info['record_idle_p99_ms']:.2f}/"
        f"{info['record_idle_max_ms']:.1f} ms idle ({len(idle)} records) vs "
        f"{info['record_pruning_p50_ms']:.2f}/{info['record_pruning_p99_ms']:.2f}/"
        f"{info['record_pruning_max_ms']:.1f} ms while pruning ({len(busy)} records)"
    )
