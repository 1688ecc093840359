"""First start after the upgrade: an older version's tasks.db and audit.db move into the datastore.

The old files are made here as that version made them (its schemas, verbatim below), filled with
rows sealed by the real audit log, so the chain that is imported is a real one.
"""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
from pathlib import Path

import pytest

from server.audit import AuditLog, Break, EventDraft, Head
from server.cli import main
from server.datastore.legacy_import import (
    IMPORTED_SUFFIX,
    LegacyImportError,
    import_legacy_files,
)
from server.datastore.records import AUDIT_COLUMNS, Credential
from server.datastore.sqlite import SqliteDataStore
from server.tasks.model import Task, TaskState
from server.tasks.store import TaskStore
from svid._clock import FakeClock
from tests.server.fixtures import short_tmpdir, start_server

AGENT = "spiffe://example.org/svid/agent/join_token/n1"
RUNTIME = "spiffe://example.org/agents/bot"

# What tasks.db and audit.db held before the ledger moved into the datastore.
OLD_TASKS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, agent_id TEXT NOT NULL, runtime_id TEXT NOT NULL,
    state TEXT NOT NULL, expires_at INTEGER NOT NULL, body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS credentials (
    kind TEXT NOT NULL, value TEXT NOT NULL, agent_id TEXT NOT NULL, spiffe_id TEXT NOT NULL,
    task_id TEXT NOT NULL, expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS violations (agent_id TEXT NOT NULL, at INTEGER NOT NULL);
"""
OLD_AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL, ts REAL NOT NULL, kind TEXT NOT NULL,
    agent_id TEXT, node_id TEXT, on_behalf_of TEXT, resource TEXT, action TEXT, decision TEXT,
    reason TEXT, task_id TEXT, risk INTEGER, credential_id TEXT, policy_ids TEXT NOT NULL,
    policy_set_hash TEXT, ttl INTEGER, latency_us REAL, extra TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS audit_events_event_id ON audit_events (event_id);
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL
);
"""


def task(n: int, clock: FakeClock, state: TaskState = TaskState.ACTIVE) -> Task:
    now = int(clock.now())
    return Task(
        task_id=f"task-{n}",
        spiffe_id=f"{RUNTIME}/task/task-{n}",
        runtime_id=RUNTIME,
        agent_id=AGENT,
        entry_id="",
        actions=("read",),
        resources=("docs",),
        classification="internal",
        environment="",
        on_behalf_of="user:alice",
        goal_sha256="",
        parent_task_id="",
        depth=0,
        ttl=600,
        created_at=now + n,
        expires_at=now + 600 + n,
        decision="allow",
        reason="",
        policy_ids=("p",),
        policy_set_hash="ab" * 32,
        act={},
        state=state,
    )


def write_old_files(data_dir: Path, clock: FakeClock) -> dict[str, object]:
    """tasks.db and audit.db as the older version left them; returns what they hold."""
    scratch_dir = data_dir.parent / "scratch"
    scratch_dir.mkdir()
    scratch = SqliteDataStore(scratch_dir / "s.sqlite3", clock)
    sub_task = dataclasses.replace(task(3, clock), parent_task_id="task-1", depth=1)
    tasks = [task(1, clock), task(2, clock, TaskState.ENDED), sub_task]
    creds = [
        Credential("jwt_id", f"j{i}", AGENT, RUNTIME, "task-1" if i % 2 else "", 2_000_000_000)
        for i in range(5)
    ]
    log = AuditLog(scratch, clock)
    for i in range(7):
        log.record([], [EventDraft("jwt_minted", agent_id=RUNTIME, credential_id=f"j{i}")])
    events = [tuple(r.values()) for r in scratch.audit_rows()]
    head = log.committed_head()
    view = TaskStore(scratch)
    for t in tasks:
        view.put_task(t)
    bodies = {r.task_id: r.body for r in scratch.list_tasks()}
    scratch.close()

    data_dir.mkdir(exist_ok=True)
    old = sqlite3.connect(data_dir / "tasks.db")
    old.execute("PRAGMA journal_mode=WAL")
    old.executescript(OLD_TASKS_SCHEMA)
    for t in tasks:
        old.execute(
            "INSERT INTO tasks VALUES (?, ?, ?, ?, ?, ?)",
            (t.task_id, t.agent_id, t.runtime_id, t.state.value, t.expires_at, bodies[t.task_id]),
        )
    # The old file's rows have no issuer (the last field; '' in `creds`).
    old.executemany("INSERT INTO credentials VALUES (?, ?, ?, ?, ?, ?)", [c[:6] for c in creds])
    old.executemany("INSERT INTO violations VALUES (?, ?)", [(RUNTIME, 10), (RUNTIME, 20)])
    old.commit()
    old.close()

    audit = sqlite3.connect(data_dir / "audit.db")
    audit.execute("PRAGMA journal_mode=WAL")
    audit.executescript(OLD_AUDIT_SCHEMA)
    marks = ", ".join("?" * len(AUDIT_COLUMNS))
    audit.executemany(
        f"INSERT INTO audit_events ({', '.join(AUDIT_COLUMNS)}) VALUES ({marks})", events
    )
    assert head is not None
    audit.execute("INSERT INTO audit_head VALUES (1, ?, ?)", (head.seq, head.hash))
    audit.commit()
    audit.close()
    return {"tasks": tasks, "creds": creds, "events": events, "head": head}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_old_files_are_imported_once_verified_and_retired(data_dir: Path, clock: FakeClock) -> None:
    old = write_old_files(data_dir, clock)
    store = SqliteDataStore(data_dir / "datastore.sqlite3", clock)

    assert import_legacy_files(store, data_dir, clock) == ["audit.db", "tasks.db"]
    assert not (data_dir / "tasks.db").exists()
    assert not (data_dir / "audit.db").exists()
    assert (data_dir / f"tasks.db{IMPORTED_SUFFIX}").is_file()
    assert (data_dir / f"audit.db{IMPORTED_SUFFIX}").is_file()

    view = TaskStore(store)
    assert view.list_tasks() == old["tasks"]  # every field, oldest first
    assert [t.task_id for t in view.list_tasks(state="active")] == ["task-1", "task-3"]
    # Found by its parent, as the parent's end finds it (the parent is a column now).
    assert [t.task_id for t in view.active_sub_tasks("task-1")] == ["task-3"]
    assert sorted(view.agent_credentials(AGENT, 0)) == sorted(old["creds"])  # type: ignore[arg-type]
    # Recorded before violations were kept by node: counted against none.
    assert view.violations(RUNTIME, "", 0) == 2
    assert [tuple(r.values()) for r in store.audit_rows()] == old["events"]

    # The chain verifies at its new place against the head the old file had (as a checkpoint
    # signed before the upgrade would name it), and grows on from it.
    head = old["head"]
    assert isinstance(head, Head)
    log = AuditLog(store, clock)
    assert log.verify(anchor=head).ok
    log.append("task_end", agent_id=RUNTIME)
    result = log.verify(anchor=head)
    assert result.ok, str(result)
    assert result.checked == head.seq + 1

    assert import_legacy_files(store, data_dir, clock) == []  # nothing left to import
    store.close()


def test_a_crash_after_the_import_committed_does_not_import_twice(
    data_dir: Path, clock: FakeClock
) -> None:
    write_old_files(data_dir, clock)
    store = SqliteDataStore(data_dir / "datastore.sqlite3", clock)
    import_legacy_files(store, data_dir, clock)
    # As if the process died before renaming: the old files are back under their names.
    for name in ("tasks.db", "audit.db"):
        shutil.copy(data_dir / f"{name}{IMPORTED_SUFFIX}", data_dir / name)
    events = len(list(store.audit_rows()))
    assert import_legacy_files(store, data_dir, clock) == []
    assert len(list(store.audit_rows())) == events
    assert len(TaskStore(store).list_tasks()) == 3
    assert not (data_dir / "tasks.db").exists()
    store.close()


def test_a_broken_old_chain_is_not_merged(data_dir: Path, clock: FakeClock) -> None:
    write_old_files(data_dir, clock)
    with sqlite3.connect(data_dir / "audit.db") as conn:
        conn.execute("UPDATE audit_events SET decision = 'deny' WHERE seq = 3")
    store = SqliteDataStore(data_dir / "datastore.sqlite3", clock)
    with pytest.raises(LegacyImportError, match=r"audit\.db .* does not verify.*edited"):
        import_legacy_files(store, data_dir, clock)
    assert (data_dir / "audit.db").is_file()  # left where it was, as evidence
    assert list(store.audit_rows()) == []
    store.close()


def test_an_old_log_is_not_merged_into_a_log_that_has_events(
    data_dir: Path, clock: FakeClock
) -> None:
    write_old_files(data_dir, clock)
    store = SqliteDataStore(data_dir / "datastore.sqlite3", clock)
    AuditLog(store, clock).append("task_begin", agent_id=RUNTIME)
    with pytest.raises(LegacyImportError, match="already holds audit events"):
        import_legacy_files(store, data_dir, clock)
    assert [r["seq"] for r in store.audit_rows()] == [1]
    assert (data_dir / "audit.db").is_file()
    store.close()


def test_verify_reads_the_old_file_until_it_is_imported(
    data_dir: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    old = write_old_files(data_dir, clock)
    head = old["head"]
    assert isinstance(head, Head)
    assert main(["audit", "verify", "--data-dir", str(data_dir)]) == 0
    assert f"{head.seq} events" in capsys.readouterr().out
    store = SqliteDataStore(data_dir / "datastore.sqlite3", clock)
    import_legacy_files(store, data_dir, clock)
    store.close()
    # Now the datastore is the log.
    assert main(["audit", "verify", "--data-dir", str(data_dir)]) == 0
    assert f"{head.seq} events" in capsys.readouterr().out
    with sqlite3.connect(data_dir / "datastore.sqlite3") as conn:
        conn.execute("DELETE FROM audit_events WHERE seq = 2")
    assert main(["audit", "verify", "--data-dir", str(data_dir)]) == 1
    assert str(Break.DELETED) in capsys.readouterr().err


def test_a_server_started_on_an_old_data_dir_imports_it(clock: FakeClock) -> None:
    root = short_tmpdir()
    try:
        old = write_old_files(root / "data", clock)
        head = old["head"]
        assert isinstance(head, Head)
        server = start_server(root)
        try:
            tasks = server.server.tasks.service
            assert tasks.active_task(f"{RUNTIME}/task/task-1") is not None
            assert tasks.active_task(f"{RUNTIME}/task/task-2") is None  # it had ended
            # The start checkpoint names the imported head: the chain goes on from it.
            assert server.server.checkpointer.last is not None
            assert server.server.checkpointer.last.seq == head.seq
            assert server.server.tasks.audit.verify(anchor=head).ok
        finally:
            server.stop()
        assert not (root / "data" / "audit.db").exists()
        assert not (root / "data" / "tasks.db").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)
