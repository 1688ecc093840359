"""The ledger half of the PostgreSQL datastore: tasks, violations, credentials and the audit chain.

A mixin of `PostgresDataStore` (server/datastore/postgres.py), which supplies the pool, the
transactions and the error mapping; the statements are ledger_queries.py's, as on SQLite.
Credentials and audit events go in by COPY: one stream per table for a whole ledger flush.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import psycopg

from server.datastore import ledger_queries as lq
from server.datastore import postgres_sql as ps
from server.datastore import queries as q
from server.datastore.base import JtiClaim, RemovalClaim
from server.datastore.chain import Resealer, rows_to_write
from server.datastore.errors import (
    AgentRemovedError,
    BundleRefusedError,
    JtiHeldError,
    RemovalClaimLostError,
    StorageError,
    TaskEndedMeanwhileError,
    held_message,
)
from server.datastore.postgres_sql import pg
from server.datastore.records import (
    AUDIT_COLUMNS,
    AUDIT_TABLES,
    FEED_FOREIGN_BUNDLE,
    FEED_TASK,
    AuditMark,
    AuditRow,
    AuditSnapshot,
    BundleWrite,
    Credential,
    EventFilter,
    Head,
    Removal,
    TaskCursor,
    TaskRecord,
    credential_chains,
    credential_tasks,
    holding_agents,
)
from server.datastore.sqlite_audit import PAGE, page_rows
from server.datastore.sqlite_ledger import _removal_params, _task_from, _task_params

T = TypeVar("T")
Cursor = psycopg.Cursor[Any]


def _refuse_gone(
    cur: Cursor, agents: list[str], tasks: list[str], chains: Mapping[str, list[str]]
) -> None:
    """AgentRemovedError, before anything is written, when any of `agents` (sorted) is no
    longer admitted: its row gone, banned, or its removal under way (`chains`: the agents of
    the chains of the tokens some credential was exchanged for, which `agents` includes); then
    TaskEndedMeanwhileError when any of `tasks` (sorted) has no row, or one no longer
    'active'.

    Their rows stay locked FOR SHARE until this write commits, so a delete or ban of an agent,
    or the end of a task (its row's compare-and-set out of 'active'), waits for it, and the
    revocations, which read the agent's or task's credentials after that commit, find these.
    A delete, ban or end not yet committed makes the locking statement wait for it instead;
    read committed then judges the row as the change left it (gone, or re-checked for
    `banned` or `state`). The removal row a removal stored is read by the next statement,
    whose snapshot is taken after that wait.

    The agents' advisory keys are taken shared first (ps.SHARE_AGENT_KEYS): a removal takes
    its agent's key exclusive before the row, and the key, unlike the row, is fair, so a write
    coming while a removal waits queues behind it instead of keeping the row share-locked
    for ever with the writes overlapping it.

    Lock order: agent keys, then agent rows, in agent order, then task rows in task order,
    first in the write (then the removal rows of its claims, in agent order, then jti rows,
    then new task rows, then the audit append lock). A removal, an agent's admission or
    renewal lock one agent key (an admission its join token's row before), then its row (a
    removal then its removal row), then only counters; a removal's claim or end locks its
    removal row alone; an end locks one task row, then only counters; other ledger writes
    share these locks and take them in the same order: no cycle of waits can form."""
    ids = {"agent_ids": agents, "task_ids": tasks}
    admitted: set[str] = set()
    if agents:
        cur.execute(pg(ps.SHARE_AGENT_KEYS), ids)
        admitted = {r[0] for r in cur.execute(pg(lq.LOCK_ADMITTED_AGENTS), ids).fetchall()}
    if tasks:
        # The tasks' locks and the removals' read in one round trip: the agents' rows are
        # held already, so no removal of theirs can commit while this waits for an end.
        rows = cur.execute(pg(lq.LOCK_ACTIVE_TASKS_AND_REMOVALS), ids).fetchall()
        active = {key for tag, key in rows if tag == "t"}
        removing = {key for tag, key in rows if tag == "r"}
    else:
        active = set()
        removing = {r[0] for r in cur.execute(pg(lq.REMOVALS_AMONG), ids).fetchall()}
    refused = [a for a in agents if a not in admitted or a in removing]
    if refused:
        raise AgentRemovedError(refused, chains)
    ended = [t for t in tasks if t not in active]
    if ended:
        raise TaskEndedMeanwhileError(ended)


class PostgresLedger:
    """Task records, credential ledger and audit chain on the datastore's pool."""

    def _connection(
        self, what: str, *, bulk: bool = False, held_open: bool = False
    ) -> AbstractContextManager[psycopg.Connection[Any]]:
        raise NotImplementedError  # PostgresDataStore's

    def _write(self, what: str, work: Callable[[Cursor], T], *, bulk: bool = False) -> T:
        raise NotImplementedError  # PostgresDataStore's

    def _rows(self, what: str, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        raise NotImplementedError  # PostgresDataStore's

    def _tuples(
        self, what: str, sql: str, params: Mapping[str, Any], *, bulk: bool = False
    ) -> list[tuple[Any, ...]]:
        raise NotImplementedError  # PostgresDataStore's

    def _append_feed(self, cur: Cursor, kind: str, keys: Iterable[str]) -> None:
        raise NotImplementedError  # PostgresDataStore's

    def _count(self, what: str, sql: str, params: Mapping[str, Any]) -> int:
        return int(self._tuples(what, sql, params)[0][0])

    def _change(self, what: str, sql: str, params: Mapping[str, Any], *, bulk: bool = False) -> int:
        return self._write(
            what, lambda cur: int(cur.execute(pg(sql), dict(params)).rowcount), bulk=bulk
        )

    # -- tasks ----------------------------------------------------------------------------------

    def put_task(self, task: TaskRecord) -> None:
        def work(cur: Cursor) -> None:
            cur.execute(pg(lq.UPSERT_TASK), _task_params(task))
            self._append_feed(cur, FEED_TASK, (task.task_id,))

        self._write("record the task", work)

    def swap_task(self, task: TaskRecord, expected_state: str) -> bool:
        params = {**_task_params(task), "expected_state": expected_state}

        def work(cur: Cursor) -> bool:
            # Read committed: a concurrent swap waits on the row lock, then sees the winner's
            # state and matches nothing.
            if cur.execute(pg(lq.SWAP_TASK), params).rowcount != 1:
                return False
            self._append_feed(cur, FEED_TASK, (task.task_id,))
            return True

        return self._write("record the task", work)

    def get_task(self, task_id: str) -> TaskRecord | None:
        rows = self._rows("read the task", lq.SELECT_TASK, {"task_id": task_id})
        return _task_from(rows[0]) if rows else None

    def list_tasks(
        self,
        *,
        agent_id: str = "",
        state: str = "",
        runtime_ids: Sequence[str] | None = None,
        after: TaskCursor | None = None,
        limit: int = 0,
    ) -> list[TaskRecord]:
        page = lq.task_page(
            agent_id=agent_id, state=state, runtime_ids=runtime_ids, after=after, limit=limit
        )
        if page is None:
            return []
        return [_task_from(r) for r in self._rows("list tasks", *page)]

    def sub_tasks(self, parent_task_id: str, state: str) -> list[TaskRecord]:
        params = {"parent_task_id": parent_task_id, "state": state}
        return [_task_from(r) for r in self._rows("list sub-tasks", lq.SUB_TASKS, params)]

    def due_tasks(self, state: str, now: int) -> list[TaskRecord]:
        rows = self._rows("list due tasks", lq.DUE_TASKS, {"state": state, "now": now})
        return [_task_from(r) for r in rows]

    def add_violation(self, agent_id: str, node_id: str, at: int) -> None:
        params = {"agent_id": agent_id, "node_id": node_id, "at": at}
        self._change("record the violation", lq.INSERT_VIOLATION, params)

    def count_violations(self, agent_id: str, node_id: str, since: int) -> int:
        params = {"agent_id": agent_id, "node_id": node_id, "since": since}
        return self._count("count violations", lq.COUNT_VIOLATIONS, params)

    def prune_violations(self, before: int) -> int:
        return self._change("prune violations", lq.PRUNE_VIOLATIONS, {"before": before}, bulk=True)

    def prune_tasks(self, state: str, before: int) -> int:
        params = {"state": state, "before": before}
        return self._change("prune tasks", lq.PRUNE_TASKS, params, bulk=True)

    # -- credentials ----------------------------------------------------------------------------

    def write_ledger(
        self,
        credentials: Sequence[Credential],
        audit_rows: Sequence[AuditRow],
        jtis: Sequence[JtiClaim] = (),
        now: int = 0,
        reseal: Resealer | None = None,
        *,
        bundles: Sequence[BundleWrite] = (),
        tasks: Sequence[TaskRecord] = (),
        claims: Sequence[RemovalClaim] = (),
    ) -> None:
        if not credentials and not audit_rows and not jtis and not bundles and not tasks:
            return
        # In key order, as claim_jtis: writes of several servers lock jti rows in one order.
        jti_claims = sorted(jtis, key=lambda c: (c.issuer, c.jti))
        holding_tasks = credential_tasks(credentials)
        # In agent order: two finishers' writes lock removal rows in one order.
        removal_claims = sorted(set(claims))

        def work(cur: Cursor) -> None:
            # Plain reads of rows no write changes, before the first lock: the lock order
            # stays _refuse_gone's.
            chains = {
                jti: [r[0] for r in cur.execute(pg(lq.CHAIN_AGENTS), {"task_id": t, "jti": jti})]
                for t, jti in credential_chains(credentials)
            }
            agents = holding_agents(credentials, chains)
            if agents or holding_tasks:
                _refuse_gone(cur, agents, holding_tasks, chains)
            if removal_claims:
                # FOR SHARE until the commit: a takeover's claim (an UPDATE of the row) waits
                # for this write, and its finisher then reads what this one logged. After the
                # agent and task locks, as a removal takes its agent's before its row.
                claimed_by = pg(q.REMOVAL_CLAIMED_BY + " FOR SHARE")
                lost = [
                    c
                    for c in removal_claims
                    if cur.execute(claimed_by, c._asdict()).fetchone() is None
                ]
                if lost:
                    raise RemovalClaimLostError(lost)
            held = [
                (c.issuer, c.jti)
                for c in jti_claims
                if cur.execute(pg(q.CLAIM_JTI), {**c._asdict(), "now": now}).rowcount != 1
            ]
            if held:
                raise JtiHeldError(held_message(held), held)
            if bundles:
                self._put_bundles(cur, bundles)
            for task in tasks:  # new rows (a begin): no other write waits on them
                cur.execute(pg(lq.UPSERT_TASK), _task_params(task))
            if credentials:
                with cur.copy(ps.COPY_CREDENTIALS) as copy:
                    for credential in credentials:
                        copy.write_row(credential)
            if audit_rows:
                cur.execute(ps.LOCK_AUDIT_APPEND)
                row = cur.execute(lq.SELECT_AUDIT_HEAD).fetchone()
                stored = None if row is None else Head(int(row[0]), str(row[1]))
                rows = rows_to_write(stored, audit_rows, reseal)
                with cur.copy(ps.COPY_AUDIT_EVENTS) as copy:
                    for row in rows:
                        copy.write_row(row)
                last = rows[-1]
                cur.execute(pg(lq.UPSERT_AUDIT_HEAD), {"seq": last[0], "hash": last[-1]})
            # The feed's counter is the last lock a transaction takes (_append_feed): after the
            # audit lock, as every other writer of both takes them.
            self._append_feed(cur, FEED_FOREIGN_BUNDLE, [b.bundle.trust_domain for b in bundles])
            self._append_feed(cur, FEED_TASK, [t.task_id for t in tasks])

        what = (
            f"commit {len(credentials)} credential record(s) and {len(audit_rows)} audit event(s)"
        )
        self._write(what, work)

    def resume_removal(self, removal: Removal) -> bool:
        params = _removal_params(removal)

        def work(cur: Cursor) -> bool:
            # The agent's key first, as a removal and an admission take it: an admission
            # under way commits first (and this finds its row), or waits and then finds this.
            cur.execute(pg(ps.LOCK_AGENT_KEY), {"spiffe_id": removal.agent_id})
            return int(cur.execute(pg(q.RESUME_REMOVAL), params).rowcount) == 1

        return self._write("store the removal", work)

    def _put_bundles(self, cur: Cursor, bundles: Sequence[BundleWrite]) -> None:
        """Store (or remove) the foreign bundles in the ledger's transaction: one the store
        refuses (a higher sequence stored; no bundle to remove) rolls the whole write back,
        the events recording it with it. A concurrent write of the same trust domain waits on
        its row, then compares with what that one stored (or finds it gone)."""
        refused: list[tuple[int, BundleWrite]] = []
        # In trust domain order, as the jti claims are in theirs: writes of several servers
        # lock bundle rows in one order. Stable: one domain's writes keep their callers' order.
        for i, b in sorted(enumerate(bundles), key=lambda ib: ib[1].bundle.trust_domain):
            sql, params = q.ledger_bundle_write(b)
            if int(cur.execute(pg(sql), params).rowcount) != 1:
                refused.append((i, b))
        if refused:
            raise BundleRefusedError(
                [b.bundle.trust_domain for _, b in refused if not b.remove],
                [b.bundle.trust_domain for _, b in refused if b.remove],
                positions=[i for i, _ in refused],
            )

    def _credentials(self, sql: str, params: Mapping[str, Any]) -> list[Credential]:
        return [Credential(*r) for r in self._tuples("read credentials", sql, params)]

    def task_credentials(self, task_id: str, now: int) -> list[Credential]:
        params = {"task_id": task_id, "needed_from": ps.needed_from(now)}
        return self._credentials(lq.TASK_CREDENTIALS, params)

    def agent_credentials(self, agent_id: str, now: int) -> list[Credential]:
        params = {"agent_id": agent_id, "needed_from": ps.needed_from(now)}
        return self._credentials(lq.AGENT_CREDENTIALS, params)

    def workload_jwt(self, jti: str, expires_at: int, spiffe_id: str) -> Credential | None:
        params = {"jti": jti, "expires_at": expires_at, "spiffe_id": spiffe_id}
        found = self._credentials(lq.WORKLOAD_JWT, params)
        return found[0] if found else None

    def count_credentials(self, task_id: str) -> int:
        return self._count("count credentials", lq.COUNT_CREDENTIALS, {"task_id": task_id})

    def count_credentials_of(self, task_ids: Sequence[str]) -> dict[str, int]:
        ids = sorted(set(task_ids))
        counts: dict[str, int] = {}
        for start in range(0, len(ids), lq.COUNT_CREDENTIALS_BATCH):
            batch = ids[start : start + lq.COUNT_CREDENTIALS_BATCH]
            for task_id, n in self._tuples("count credentials", *lq.count_credentials_of(batch)):
                counts[task_id] = int(n)
        return counts

    def prune_credentials(self, now: int) -> int:
        # One statement, unlike SQLite's (SqliteLedger.prune_credentials): under MVCC a DELETE
        # locks only the rows it deletes, which no writer touches, so its scan holds up no
        # issuance commit, and chunks would only add round trips and rescans.
        params = {"needed_from": ps.needed_from(now)}
        return self._change("prune credentials", lq.PRUNE_CREDENTIALS, params, bulk=True)

    # -- audit chain ----------------------------------------------------------------------------

    def _head(self, what: str, sql: str) -> Head | None:
        rows = self._tuples(what, sql, {})
        return Head(int(rows[0][0]), str(rows[0][1])) if rows else None

    def audit_head(self) -> Head | None:
        return self._head("read the audit head", lq.SELECT_AUDIT_HEAD)

    def audit_rows(self, where: EventFilter | None = None) -> Iterator[dict[str, Any]]:
        # Bulk limits unless an index serves the filter: a page of another (a kind, a
        # decision, a time range, none) reads the log in seq order until it found a page's
        # worth, which on a very large log takes longer than a statement of the server's own
        # may. The indexed reads (a removal's, a task end's) keep the short limit.
        bulk = not lq.audit_page_indexed(where or EventFilter())

        def fetch(sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
            return self._tuples("read the audit log", sql, params, bulk=bulk)

        return page_rows(fetch, where)

    def audit_base(self) -> Head | None:
        return self._head("read the audit base", lq.SELECT_AUDIT_BASE)

    def audit_marks(self, after: int, limit: int) -> list[AuditMark]:
        rows = self._tuples("read the audit log", lq.AUDIT_MARKS, {"after": after, "limit": limit})
        return [AuditMark(int(seq), float(ts), str(digest)) for seq, ts, digest in rows]

    def prune_audit(self, through: Head, now: float) -> int:
        def work(cur: Cursor) -> int:
            # Two servers pruning at once take turns: the second then sees the first's base
            # and never moves it back.
            cur.execute(pg(ps.LOCK_AUDIT_PRUNE))
            base = cur.execute(lq.SELECT_AUDIT_BASE).fetchone()
            if base is not None and int(base[0]) >= through.seq:
                return 0
            found = cur.execute(pg(lq.AUDIT_HASH_AT), {"seq": through.seq}).fetchone()
            # The base must be a real link of the chain, or verify could never start from it.
            if found is None or found[0] != through.hash:
                raise StorageError(
                    f"cannot prune the audit log through seq {through.seq}: the event "
                    "there is missing or has another hash"
                )
            removed = int(cur.execute(pg(lq.PRUNE_AUDIT_EVENTS), {"seq": through.seq}).rowcount)
            params = {"seq": through.seq, "hash": through.hash, "now": now}
            cur.execute(pg(lq.UPSERT_AUDIT_BASE), params)
            return removed

        return self._write("prune the audit log", work, bulk=True)

    def audit_snapshot(self) -> AbstractContextManager[AuditSnapshot]:
        return self._snapshot()

    @contextmanager
    def _snapshot(self) -> Iterator[AuditSnapshot]:
        """One REPEATABLE READ, READ ONLY transaction on a pool connection of its own: every
        statement in it sees the state of its first, while writers go on. Rows stream through
        a server-side cursor, a page at a time. Creates nothing."""
        with self._connection("read the audit log", held_open=True) as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            try:
                names = {r[0] for r in conn.execute(ps.TABLES_IN_SCHEMA).fetchall()}
                missing = tuple(t for t in AUDIT_TABLES if t not in names)
                head = base = None
                if "audit_head" in names:
                    row = conn.execute(lq.SELECT_AUDIT_HEAD).fetchone()
                    head = None if row is None else Head(int(row[0]), str(row[1]))
                if "audit_base" in names:
                    row = conn.execute(lq.SELECT_AUDIT_BASE).fetchone()
                    base = None if row is None else Head(int(row[0]), str(row[1]))

                def rows() -> Iterator[dict[str, Any]]:
                    if "audit_events" not in names:
                        return
                    with conn.cursor(name=f"audit_snapshot_{secrets.token_hex(6)}") as cur:
                        cur.itersize = PAGE
                        cur.execute(lq.ALL_AUDIT_ROWS)
                        for r in cur:
                            yield dict(zip(AUDIT_COLUMNS, r, strict=True))

                yield AuditSnapshot(missing, head, rows, base)
            finally:
                if not conn.broken:
                    conn.execute("ROLLBACK")
