"""Audit retention (`make bench`): prune throughput, and what a prune costs the issuance path.

Rows (printed and stored in benchmark extra_info):
- prune alone: events removed per second, batches of 10k, the shipped pause between batches,
  the head signed first as a server's checkpointer does (a prune reads the chain back from the
  newest checkpoint at or before its target: with none at all, from the base, twice the time)
- Ledger.record latency (one credential + its event, durable on return) from one thread:
  p50 / p99 / max, first with nothing else running, then while a prune of the same size runs
- the credential ledger's prune at 1 M rows (housekeeping's, every minute): the longest a
  one-credential ledger write (issuance's commit) took while it ran, and the prune's own time,
  for one DELETE by expiry (the baseline: the statement the prune ran before, a scan of the
  table under the write lock) and for the shipped prune (found off the lock, deleted by
  rowid); and the longest such write in the half second before each, for reference
  (these through the `table` fixture, the others through extra_info)
All on the server's datastore file (SqliteDataStore: WAL, synchronous=FULL), events shaped like
issuance's.
"""

from __future__ import annotations

import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.report import Table, value_row
from server.audit import AuditLog
from server.audit.checkpointer import Checkpointer
from server.audit.retention import Cut, Pruner, RetentionPolicy
from server.datastore import AttestedAgent
from server.datastore import ledger_queries as lq
from server.datastore.records import Credential, revocation_needed_from
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock, SystemClock

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


CREDENTIALS = 1_000_000
ISSUED_PER_S = 15_000  # batch JWT issuance's rate
T0 = 1_700_000_000
WORKLOAD = "spiffe://example.org/w"


def _issued(start: int, n: int) -> list[Credential]:
    """Credentials as issuance records them, `ISSUED_PER_S` a second from T0: JWT-SVIDs of 5
    minutes for 20 workloads, one X.509-SVID of an hour in 50."""
    out = []
    for i in range(start, start + n):
        issued = T0 + i // ISSUED_PER_S
        if i % 50 == 0:
            out.append(Credential("x509_serial", os.urandom(20).hex(), AGENT, WORKLOAD, "",
                                  issued + 3600, "ca"))  # fmt: skip
        else:
            out.append(Credential("jwt_id", os.urandom(16).hex(), AGENT, f"{WORKLOAD}/{i % 20}",
                                  "", issued + 300))  # fmt: skip
    return out


def _ledger_writes(
    store: SqliteDataStore, stop: threading.Event, out: list[tuple[float, float]]
) -> None:
    i = 0
    while not stop.is_set():
        cred = Credential("jwt_id", f"live-{i}", AGENT, WORKLOAD, "", 2_000_000_000)
        t0 = time.perf_counter()
        store.write_ledger([cred], [])
        out.append((t0, time.perf_counter()))
        i += 1


def _prune_under_writes(
    store: SqliteDataStore, prune: Callable[[SqliteDataStore], int]
) -> tuple[int, float, float, float]:
    """Rows `prune(store)` removed, its time, the longest ledger write overlapping it and the
    longest in the half second before it (s)."""
    stop = threading.Event()
    writes: list[tuple[float, float]] = []
    thread = threading.Thread(target=_ledger_writes, args=(store, stop, writes))
    thread.start()
    time.sleep(0.5)
    start = time.perf_counter()
    removed = prune(store)
    end = time.perf_counter()
    stop.set()
    thread.join()
    during = max(e - s for s, e in writes if s < end and e > start)
    before = max(e - s for s, e in writes if e <= start)
    return int(removed), end - start, during, before


def test_credential_prune_write_lock(benchmark: Any, table: Table, tmp_path: Path) -> None:
    # The table holds ~67 s of issuance; the oldest 6 s of it (but its X.509-SVIDs) are past
    # revocation_needed_from.
    now = T0 + 300 + 6 + int(T0 - revocation_needed_from(T0))
    built = tmp_path / "built.sqlite3"
    store = SqliteDataStore(built, FakeClock(now))
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", 2**40))
    for start in range(0, CREDENTIALS, 10_000):
        store.write_ledger(_issued(start, 10_000), [])
    store.close()  # the last connection: its WAL checkpointed into the file, removed
    shutil.copyfile(built, tmp_path / "copy.sqlite3")

    def one_delete(store: SqliteDataStore) -> int:
        params = {"needed_from": revocation_needed_from(now)}
        with store.transaction() as db:
            return int(db.execute(lq.PRUNE_CREDENTIALS, params).rowcount)

    results = {}
    for name, path, prune in (
        ("one DELETE", built, one_delete),
        ("shipped", tmp_path / "copy.sqlite3", lambda s: s.prune_credentials(now)),
    ):
        store = SqliteDataStore(path, FakeClock(now))
        try:
            results[name] = _prune_under_writes(store, prune)
        finally:
            store.close()
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    (removed, before_s, before_wait, idle), (removed_after, after_s, after_wait, idle_after) = (
        results.values()
    )
    assert removed == removed_after > 0
    what = f"credential prune, {removed:,} of {CREDENTIALS:,} rows"
    table.add(
        value_row(f"{what}: longest ledger write, one DELETE (before)", before_wait * 1e3, "ms"),
        value_row(
            f"{what}: longest ledger write, shipped prune",
            after_wait * 1e3,
            "ms",
            note="found off the write lock, deleted by rowid in chunks",
        ),
        value_row(
            "longest ledger write with no prune running",
            max(idle, idle_after) * 1e3,
            "ms",
            note="the half second before each prune: this machine's noise floor",
        ),
        value_row(f"{what}: one DELETE's time", before_s * 1e3, "ms"),
        value_row(f"{what}: the shipped prune's time", after_s * 1e3, "ms"),
    )
    print(
        f"\n{what}: longest ledger write {before_wait * 1e3:.1f} ms during one DELETE "
        f"({before_s * 1e3:.0f} ms), {after_wait * 1e3:.1f} ms during the shipped prune "
        f"({after_s * 1e3:.0f} ms), {max(idle, idle_after) * 1e3:.1f} ms with none running"
    )
