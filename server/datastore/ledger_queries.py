# ruff: noqa: S608 - column lists and filters are constants; every value is a bound parameter
"""The ledger's statements (tasks, credentials, violations, audit), in SQL SQLite and PostgreSQL
both run, like queries.py. Multi-row inserts are built by the backend from the `*_INTO` heads:
only the placeholder syntax differs between drivers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.datastore.records import AUDIT_COLUMNS, EventFilter, TaskCursor

_TASK_COLUMNS = "task_id, agent_id, runtime_id, state, expires_at, created_at, body, parent_task_id"
UPSERT_TASK = (
    f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES (:task_id, :agent_id, :runtime_id, :state, "
    ":expires_at, :created_at, :body, :parent_task_id) ON CONFLICT (task_id) DO UPDATE SET "
    "agent_id = excluded.agent_id, runtime_id = excluded.runtime_id, state = excluded.state, "
    "expires_at = excluded.expires_at, created_at = excluded.created_at, body = excluded.body, "
    "parent_task_id = excluded.parent_task_id"
)
# The compare-and-set of a task's state: the row changes only while it is in :expected_state,
# so of several servers ending one task exactly one write moves it (rowcount 1).
SWAP_TASK = (
    "UPDATE tasks SET agent_id = :agent_id, runtime_id = :runtime_id, state = :state, "
    "expires_at = :expires_at, created_at = :created_at, body = :body, "
    "parent_task_id = :parent_task_id WHERE task_id = :task_id AND state = :expected_state"
)
SELECT_TASK = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE task_id = :task_id"
# A task's sub-tasks in a state, by the partial index tasks_parent (migration 22). The
# `<> ''` term is the index's own condition, spelled out so SQLite's planner may use it with a
# bound parameter (it cannot prove `= :parent_task_id` excludes '').
SUB_TASKS = (
    f"SELECT {_TASK_COLUMNS} FROM tasks WHERE parent_task_id = :parent_task_id "
    "AND parent_task_id <> '' AND state = :state ORDER BY created_at, task_id"
)
DUE_TASKS = (
    f"SELECT {_TASK_COLUMNS} FROM tasks WHERE state = :state AND expires_at <= :now "
    "ORDER BY expires_at, task_id"
)


def list_tasks(
    *, agent: bool, state: bool, runtime_count: int | None, after: bool, limit: bool
) -> str:
    """Tasks in (created_at, task_id) order, with only the filters asked for in the WHERE
    clause (so the planner picks the migration's index for that set): :agent_id, :state,
    runtime_id in :r0 .. :r{runtime_count - 1} unless `runtime_count` is None, after the
    cursor (:after_created_at, :after_task_id), at most :limit rows.

    Several runtimes are one arm per runtime joined by UNION ALL: each arm reads its index in
    order and the engine merges them, stopping at the limit (an IN list would read every
    matching row and sort them).
    """
    common = []
    if agent:
        common.append("agent_id = :agent_id")
    if state:
        common.append("state = :state")
    if after:
        common.append("(created_at, task_id) > (:after_created_at, :after_task_id)")

    def arm(conditions: list[str]) -> str:
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        return f"SELECT {_TASK_COLUMNS} FROM tasks{where}"

    if runtime_count is None:
        arms = [arm(common)]
    else:
        arms = [arm([f"runtime_id = :r{i}", *common]) for i in range(runtime_count)]
    sql = " UNION ALL ".join(arms) + " ORDER BY created_at, task_id"
    return sql + " LIMIT :limit" if limit else sql


def task_page(
    *,
    agent_id: str,
    state: str,
    runtime_ids: Sequence[str] | None,
    after: TaskCursor | None,
    limit: int,
) -> tuple[str, dict[str, Any]] | None:
    """The statement and parameters of a DataStore.list_tasks call; None when it asks for no
    runtime at all (an empty `runtime_ids`), which matches nothing."""
    runtimes = None if runtime_ids is None else sorted(set(runtime_ids))
    if runtimes is not None and not runtimes:
        return None
    params: dict[str, Any] = {"agent_id": agent_id, "state": state, "limit": limit}
    if runtimes is not None:
        params.update({f"r{i}": r for i, r in enumerate(runtimes)})
    if after is not None:
        params.update(after_created_at=after.created_at, after_task_id=after.task_id)
    sql = list_tasks(
        agent=bool(agent_id),
        state=bool(state),
        runtime_count=None if runtimes is None else len(runtimes),
        after=after is not None,
        limit=limit > 0,
    )
    return sql, params


CREDENTIAL_COLUMNS = (
    "kind",
    "value",
    "agent_id",
    "spiffe_id",
    "task_id",
    "expires_at",
    "issuer",
    "actor_agent_id",
    "derived_from",
)
CREDENTIALS_INTO = f"INSERT INTO credentials ({', '.join(CREDENTIAL_COLUMNS)})"
_CREDENTIALS = f"SELECT {', '.join(CREDENTIAL_COLUMNS)} FROM credentials"
TASK_CREDENTIALS = (
    f"{_CREDENTIALS} WHERE task_id = :task_id AND expires_at >= :needed_from ORDER BY kind, value"
)
_C_COLUMNS = ", ".join(f"c.{column}" for column in CREDENTIAL_COLUMNS)
# Those of its own tasks and workloads, then the delegated tokens a workload of it acts with
# (migration 15's partial index) and, in turn, every token exchanged for one of those
# (derived_from, migration 19's partial index): one row each, as a token's actor_agent_id is
# never its agent_id (server.oauth.grants) and a derived token's agent_id is its subject's
# (the task's agent), so none of the second part is of the first. One exchanged for a token
# of the agent's own is of the same task, so of the first part already.
AGENT_CREDENTIALS = (
    f"WITH RECURSIVE acting ({', '.join(CREDENTIAL_COLUMNS)}) AS ("
    f"{_CREDENTIALS} WHERE actor_agent_id = :agent_id AND expires_at >= :needed_from "
    f"UNION SELECT {_C_COLUMNS} FROM credentials AS c JOIN acting AS a "
    "ON c.derived_from = a.value AND c.task_id = a.task_id WHERE c.expires_at >= :needed_from) "
    f"{_CREDENTIALS} WHERE agent_id = :agent_id AND expires_at >= :needed_from "
    f"UNION ALL SELECT {', '.join(CREDENTIAL_COLUMNS)} FROM acting ORDER BY kind, value"
)
# The agents holding the token :jti of task :task_id or any it was exchanged for in turn: a
# token exchanged for it depends on each (their removal revokes it, AGENT_CREDENTIALS), so a
# ledger write admits them all. By the task's index: a chain is of one task.
CHAIN_AGENTS = (
    "WITH RECURSIVE chain (agent_id, actor_agent_id, derived_from) AS ("
    "SELECT agent_id, actor_agent_id, derived_from FROM credentials "
    "WHERE task_id = :task_id AND kind = 'jwt_id' AND value = :jti "
    "UNION SELECT c.agent_id, c.actor_agent_id, c.derived_from FROM credentials AS c "
    "JOIN chain ON c.task_id = :task_id AND c.kind = 'jwt_id' AND c.value = chain.derived_from) "
    "SELECT agent_id FROM chain UNION "
    "SELECT actor_agent_id FROM chain WHERE actor_agent_id IS NOT NULL"
)
# The agents of a ledger write's credentials (:agent_ids, a JSON array) that it may not record
# any for: no row (evicted), banned, or a removal under way. A removal reads the agent's
# credentials to revoke them only after its delete or ban committed, so a credential written
# after that commit would never be revoked (SQLite: run under BEGIN IMMEDIATE's write lock,
# no removal can commit between this read and the write's commit).
NOT_ADMITTED_AGENTS = (
    "SELECT ids.value FROM json_each(:agent_ids) AS ids WHERE NOT EXISTS "
    "(SELECT 1 FROM agents WHERE spiffe_id = ids.value AND banned = 0) "
    "OR EXISTS (SELECT 1 FROM removals WHERE agent_id = ids.value)"
)
# PostgreSQL's two steps of the same check, see PostgresLedger.write_ledger.
LOCK_ADMITTED_AGENTS = (
    "SELECT spiffe_id FROM agents WHERE spiffe_id = ANY(:agent_ids) AND banned = 0 "
    "ORDER BY spiffe_id FOR SHARE"
)
REMOVALS_AMONG = "SELECT agent_id FROM removals WHERE agent_id = ANY(:agent_ids)"
# The tasks of a ledger write's credentials (:task_ids, a JSON array) that it may not record
# any for: no row, or a row no longer 'active' (TaskState.ACTIVE). An end moves the row out of
# 'active' (to 'ending', TaskStore.finish) and only then reads the task's credentials to revoke
# them, so a credential written after that commit would never be revoked (SQLite: run under
# BEGIN IMMEDIATE's write lock, as NOT_ADMITTED_AGENTS).
NOT_ACTIVE_TASKS = (
    "SELECT ids.value FROM json_each(:task_ids) AS ids WHERE NOT EXISTS "
    "(SELECT 1 FROM tasks WHERE task_id = ids.value AND state = 'active')"
)
# PostgreSQL's: the active ones, their rows locked FOR SHARE, and, in the same statement (one
# round trip less), REMOVALS_AMONG's rows, tagged (PostgresLedger.write_ledger).
LOCK_ACTIVE_TASKS_AND_REMOVALS = (
    "WITH active AS (SELECT task_id FROM tasks WHERE task_id = ANY(:task_ids) "
    "AND state = 'active' ORDER BY task_id FOR SHARE) "
    "SELECT 't', task_id FROM active "
    "UNION ALL SELECT 'r', agent_id FROM removals WHERE agent_id = ANY(:agent_ids)"
)
# The literals match migration 21's partial index, which a bound parameter could not use.
WORKLOAD_JWT = (
    f"{_CREDENTIALS} WHERE kind = 'jwt_id' AND task_id = '' "
    "AND expires_at = :expires_at AND spiffe_id = :spiffe_id AND value = :jti LIMIT 1"
)
COUNT_CREDENTIALS = "SELECT COUNT(*) AS n FROM credentials WHERE task_id = :task_id"
# Task IDs one grouped count names at most: well under SQLite's oldest bound on parameters (999).
COUNT_CREDENTIALS_BATCH = 500


def count_credentials_of(task_ids: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """One grouped count of the credentials of each of `task_ids` (at most
    COUNT_CREDENTIALS_BATCH): a task list page counts them in one query, not one per task.
    Tasks without credentials have no row."""
    names = [f"t{i}" for i in range(len(task_ids))]
    sql = (
        "SELECT task_id, COUNT(*) AS n FROM credentials "
        f"WHERE task_id IN ({', '.join(f':{n}' for n in names)}) GROUP BY task_id"
    )
    return sql, dict(zip(names, task_ids, strict=True))


# PostgreSQL's prune; SQLite's finds the rows off its write lock first (SqliteLedger's).
PRUNE_CREDENTIALS = "DELETE FROM credentials WHERE expires_at < :needed_from"
PRUNE_TASKS = "DELETE FROM tasks WHERE state = :state AND expires_at < :before"

INSERT_VIOLATION = (
    "INSERT INTO violations (agent_id, node_id, at) VALUES (:agent_id, :node_id, :at)"
)
COUNT_VIOLATIONS = (
    "SELECT COUNT(*) AS n FROM violations "
    "WHERE agent_id = :agent_id AND node_id = :node_id AND at > :since"
)
PRUNE_VIOLATIONS = "DELETE FROM violations WHERE at <= :before"

AUDIT_EVENTS_INTO = f"INSERT INTO audit_events ({', '.join(AUDIT_COLUMNS)})"
SELECT_AUDIT_HEAD = "SELECT seq, hash FROM audit_head WHERE id = 1"
UPSERT_AUDIT_HEAD = (
    "INSERT INTO audit_head (id, seq, hash) VALUES (1, :seq, :hash) "
    "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash"
)
ALL_AUDIT_ROWS = f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_events ORDER BY seq"
AUDIT_ROWS_AFTER = (
    f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_events WHERE seq > :after ORDER BY seq"
)
# Retention (server/audit/retention.py): the base row, the marks a prune plans its batches
# from, and one batch's delete. Seq is the key, so each is a range or point on it.
SELECT_AUDIT_BASE = "SELECT seq, hash FROM audit_base WHERE id = 1"
UPSERT_AUDIT_BASE = (
    "INSERT INTO audit_base (id, seq, hash, pruned_at) VALUES (1, :seq, :hash, :now) "
    "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, "
    "pruned_at = excluded.pruned_at"
)
AUDIT_MARKS = "SELECT seq, ts, hash FROM audit_events WHERE seq > :after ORDER BY seq LIMIT :limit"
AUDIT_HASH_AT = "SELECT hash FROM audit_events WHERE seq = :seq"
PRUNE_AUDIT_EVENTS = "DELETE FROM audit_events WHERE seq <= :seq"
COUNT_AUDIT_EVENTS = "SELECT COUNT(*) AS n FROM audit_events"


def audit_page_indexed(where: EventFilter) -> bool:
    """Whether audit_page's pages of `where` are read through an index of audit_events (the
    agent's, the task's, a node's revocations'), not by reading the log in seq order until a
    page's worth matched, which on a very large log may take minutes."""
    return (
        where.agent_id is not None
        or where.task_id is not None
        or (where.node_id is not None and where.kind == "revocation")
    )


def audit_page(where: EventFilter) -> tuple[str, dict[str, Any]]:
    """One page of audit rows after :after (seq order, at most :limit rows) matching `where`;
    the caller binds :after and :limit."""
    clauses = ["seq > :after"]
    params: dict[str, Any] = {}
    for column, value in (
        ("agent_id", where.agent_id),
        ("task_id", where.task_id),
        ("decision", where.decision),
        ("kind", where.kind),
        ("node_id", where.node_id),
    ):
        if value is not None:
            clauses.append(f"{column} = :{column}")
            params[column] = value
    if where.since is not None:
        clauses.append("ts >= :since")
        params["since"] = where.since
    if where.until is not None:
        clauses.append("ts < :until")
        params["until"] = where.until
    sql = (
        f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit_events WHERE {' AND '.join(clauses)} "
        "ORDER BY seq LIMIT :limit"
    )
    return sql, params


INSERT_LEGACY_IMPORT = (
    "INSERT INTO legacy_imports (name, imported_at, detail) VALUES (:name, :now, :detail)"
)
SELECT_LEGACY_IMPORT = "SELECT name FROM legacy_imports WHERE name = :name"
