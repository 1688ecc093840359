"""Audit append cost (`make bench`), against a raw SQLite insert baseline in the same run.

Rows (printed and stored in benchmark extra_info):
- raw: one INSERT + COMMIT per row on a WAL, synchronous=FULL database (the durability floor)
- AuditLog.append: one event, durable (committed) when it returns
- AuditLog.append from 4 threads at once: group commit shares one transaction between them
- AuditLog.append_many: 100 events per transaction (e.g. a revocation covering many credentials)
- Ledger.record: one credential record and its event, committed together (durable on return)
- Ledger.record of 100 credentials and their 100 events in one transaction (a CSR batch)
All on the server's one datastore file (SqliteDataStore: WAL, synchronous=FULL).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from server.audit import AuditLog, EventDraft
from server.datastore import AttestedAgent
from server.datastore.records import Credential
from server.datastore.sqlite import SqliteDataStore
from server.ledger import Ledger
from svid._clock import SystemClock

N = 2000
THREADS = 4
AGENT = "spiffe://example.org/agents/research-bot"


def _fields(i: int) -> dict[str, Any]:
    return {
        "agent_id": AGENT,
        "node_id": "spiffe://example.org/svid/agent/join_token/n1",
        "task_id": "task-1",
        "resource": "docs",
        "action": "read",
        "decision": "allow",
        "credential_id": f"jti-{i}",
        "policy_ids": ("default.cedar:work_within_intent",),
        "policy_set_hash": "ab" * 32,
        "ttl": 300,
        "latency_us": 71.5,
        "risk": 0,
    }


def _credential(i: int) -> Credential:
    return Credential("jwt_id", f"jti-{i}", AGENT, "spiffe://example.org/w", "", 2_000_000_000)


def _raw_us_per_row(path: Path, n: int) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    body = "x" * 400  # about the size of one encoded event
    start = time.perf_counter()
    for i in range(n):
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO t VALUES (?, ?)", (i, body))
        db.execute("COMMIT")
    elapsed = time.perf_counter() - start
    db.close()
    return elapsed / n * 1e6


def test_audit_append_cost(benchmark: Any, tmp_path: Path) -> None:
    raw_us = _raw_us_per_row(tmp_path / "raw.db", N)

    clock = SystemClock()
    store = SqliteDataStore(tmp_path / "datastore.sqlite3", clock)
    # The ledger records credentials only of an agent admitted.
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", 2**40))
    log = AuditLog(store, clock)
    start = time.perf_counter()
    for i in range(N):
        log.append("jwt_minted", **_fields(i))
    single_us = (time.perf_counter() - start) / N * 1e6

    def worker(k: int) -> None:
        for i in range(N // THREADS):
            log.append("jwt_minted", **_fields(k * N + i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(THREADS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    threaded_us = (time.perf_counter() - start) / N * 1e6

    drafts = [EventDraft("revocation", **_fields(i)) for i in range(100)]
    start = time.perf_counter()
    for _ in range(N // 100):
        log.append_many(drafts)
    batch_us = (time.perf_counter() - start) / N * 1e6

    ledger = Ledger(log)
    start = time.perf_counter()
    for i in range(N):
        ledger.record([_credential(i)], [EventDraft("jwt_minted", **_fields(i))])
    ledger_us = (time.perf_counter() - start) / N * 1e6

    start = time.perf_counter()
    for k in range(N // 100):
        creds = [_credential(N + k * 100 + i) for i in range(100)]
        ledger.record(creds, [EventDraft("jwt_minted", **_fields(i)) for i in range(100)])
    ledger_batch_us = (time.perf_counter() - start) / N * 1e6

    counter = iter(range(10**9))
    benchmark.pedantic(
        lambda: log.append("jwt_minted", **_fields(next(counter))), rounds=500, iterations=1
    )
    assert log.verify().ok

    benchmark.extra_info.update(
        {
            "raw_insert_commit_us": raw_us,
            "append_us": single_us,
            "append_per_s": 1e6 / single_us,
            "append_4_threads_us": threaded_us,
            "append_many_100_us": batch_us,
            "ledger_record_us": ledger_us,
            "ledger_record_100_us": ledger_batch_us,
        }
    )
    print(
        f"\naudit append: {single_us:.0f} us/event ({1e6 / single_us:.0f}/s) vs raw sqlite "
        f"insert+commit {raw_us:.0f} us/row ({single_us / raw_us:.2f}x); "
        f"{THREADS} threads (group commit) {threaded_us:.0f} us/event "
        f"({1e6 / threaded_us:.0f}/s); append_many(100) {batch_us:.1f} us/event "
        f"({1e6 / batch_us:.0f}/s); ledger record (credential + event, one commit) "
        f"{ledger_us:.0f} us/credential ({1e6 / ledger_us:.0f}/s), batch of 100 "
        f"{ledger_batch_us:.1f} us/credential ({1e6 / ledger_batch_us:.0f}/s)"
    )
