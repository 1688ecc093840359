"""Task records, issued credentials and out-of-intent violations, as the task layer sees them.

A view onto the server's one datastore (its task, credential and audit roles): the rows live
with everything else, under the one migration runner, so a credential's record commits with
its audit event (`AuditLog.record`). This class only turns `Task` values into rows and back,
and tells the ledger's outage of the task rows the storage cannot write.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, replace
from typing import Protocol

from server.audit import AuditLog, EventDraft
from server.audit.outage import LedgerOutage, telling
from server.datastore.base import AuditStore, CredentialStore, RegistrationStore, TaskRecordStore
from server.datastore.records import (
    AttestedAgent,
    Entry,
    TaskCursor,
    TaskRecord,
    expired_record_kept_from,
)
from server.tasks.model import Credential, Task, TaskState


class TaskRows(TaskRecordStore, CredentialStore, AuditStore, RegistrationStore, Protocol):
    """The datastore roles the task layer uses (entries: read only, see stored_entry_ids)."""


def _task_from(record: TaskRecord) -> Task:
    data = json.loads(record.body)
    data["state"] = TaskState(data["state"])
    for key in ("actions", "resources", "policy_ids"):
        data[key] = tuple(data[key])
    return Task(**data)


# The row's state column while the end of a task is being carried out (revocations, entry, the
# task-end event): the body already holds the end; the column turns to it once that is written,
# so an end a server left half done (it died midway) can be found and finished by another.
ENDING = "ending"
# The settled states of a task that is over: no credential is issued under it again.
_OVER = (TaskState.ENDED, TaskState.REVOKED, TaskState.EXPIRED)


def _record(task: Task, column: str = "") -> TaskRecord:
    data = asdict(task)
    data["state"] = task.state.value
    return TaskRecord(
        task_id=task.task_id,
        agent_id=task.agent_id,
        runtime_id=task.runtime_id,
        state=column or task.state.value,
        expires_at=task.expires_at,
        created_at=task.created_at,
        body=json.dumps(data, sort_keys=True),
        parent_task_id=task.parent_task_id,
    )


class TaskStore:
    """Thread-safe as the datastore is; closing is the datastore owner's job."""

    def __init__(self, rows: TaskRows, outage: LedgerOutage | None = None) -> None:
        self._rows = rows
        # Told of a task row (or a violation's) the storage could not write: an end, a
        # revocation or a flagged denial fails there before its event reaches the audit log,
        # which would never hear of the outage.
        self._outage = outage

    def close(self) -> None:
        """Nothing to close: the datastore belongs to whoever built it (app.py)."""

    # -- tasks ----------------------------------------------------------------------------------

    def put_task(self, task: Task) -> None:
        with telling(self._outage):
            self._rows.put_task(_record(task))

    def begin(self, task: Task, log: AuditLog, begun: EventDraft) -> None:
        """Store a task being begun with its task-begin event in one transaction (the log's
        write, AuditLog.append_many's `tasks`): both are durable when this returns, neither is
        stored when it raises. So the log never misses a task stored, not even for a moment
        (a server dying between two writes left one until the settle sweep), nor records one
        that is not."""
        log.append_many([begun], tasks=(_record(task),))

    def get_task(self, task_id: str) -> Task | None:
        if "\x00" in task_id:
            return None  # no task id holds one (and PostgreSQL text cannot: a query fails)
        record = self._rows.get_task(task_id)
        return None if record is None else _task_from(record)

    def list_tasks(
        self,
        *,
        agent_id: str = "",
        state: str = "",
        runtime_ids: Sequence[str] | None = None,
        after: TaskCursor | None = None,
        limit: int = 0,
    ) -> list[Task]:
        """Oldest first, after `after`, at most `limit` (0: all): see TaskRecordStore."""
        records = self._rows.list_tasks(
            agent_id=agent_id, state=state, runtime_ids=runtime_ids, after=after, limit=limit
        )
        return [_task_from(r) for r in records]

    def active_sub_tasks(self, task_id: str) -> list[Task]:
        """The active tasks begun inside `task_id` (its sub-tasks and elevated steps)."""
        records = self._rows.sub_tasks(task_id, TaskState.ACTIVE.value)
        return [_task_from(r) for r in records]

    def due(self, now: int) -> list[Task]:
        """Active tasks whose TTL has run out."""
        return [_task_from(r) for r in self._rows.due_tasks(TaskState.ACTIVE.value, now)]

    def finish(self, task: Task, state: TaskState, at: int, reason: str) -> Task | None:
        """Claim the end of an active task: the ended task when this call moved its row out of
        `active` (to ENDING, until `settle`), None when it was not active any more (another
        server, or another path of this one, ended it first; that one does the end's work)."""
        done = replace(task, state=state, ended_at=at, end_reason=reason)
        with telling(self._outage):
            swapped = self._rows.swap_task(_record(done, ENDING), TaskState.ACTIVE.value)
        return done if swapped else None

    def settle(self, task: Task) -> bool:
        """The end's work is written: the row's state becomes the task's own. False when it
        was settled already."""
        with telling(self._outage):
            return self._rows.swap_task(_record(task), ENDING)

    def unsettled(self, before: int) -> list[Task]:
        """Tasks whose end was claimed before `before` and never settled."""
        return [
            task
            for task in (_task_from(r) for r in self._rows.list_tasks(state=ENDING))
            if task.ended_at < before
        ]

    def stored_entry_ids(self, entry_ids: Sequence[str]) -> set[str]:
        """The ids among `entry_ids` of entries stored now (whichever server made them)."""
        return set(self.stored_entries(entry_ids))

    def stored_agent(self, agent_id: str) -> AttestedAgent | None:
        """The agent's record as stored now (whichever server wrote it), None when none is."""
        try:
            return self._rows.get_agent(agent_id)
        except LookupError:  # the datastore's NotFoundError
            return None

    def stored_entries(self, entry_ids: Sequence[str]) -> dict[str, Entry]:
        """The entries among `entry_ids` stored now, by id (whichever server wrote them)."""
        return {e.id: e for e in self._rows.get_entries(entry_ids)}

    # -- credentials ----------------------------------------------------------------------------

    def record(self, creds: Iterable[Credential]) -> None:
        """Credentials alone, without audit events (AuditLog.record commits both at once)."""
        self._rows.write_ledger(list(creds), ())

    def task_credentials(self, task_id: str, now: int) -> list[Credential]:
        """Credentials of the task some verifier may still accept at `now`."""
        return self._rows.task_credentials(task_id, now)

    def agent_credentials(self, agent_id: str, now: int) -> list[Credential]:
        """Credentials issued through the agent some verifier may still accept at `now`."""
        return self._rows.agent_credentials(agent_id, now)

    def count_credentials(self, task_id: str) -> int:
        return self._rows.count_credentials(task_id)

    def count_credentials_of(self, task_ids: Sequence[str]) -> dict[str, int]:
        """Each task's count_credentials (0 for those left out), in grouped queries."""
        return self._rows.count_credentials_of(task_ids)

    # -- risk signal ----------------------------------------------------------------------------

    def add_violation(self, runtime_id: str, node_id: str, at: int) -> None:
        with telling(self._outage):  # a flagged denial's count is written before its event
            self._rows.add_violation(runtime_id, node_id, at)

    def violations(self, runtime_id: str, node_id: str, since: int) -> int:
        """The runtime's violations through that node (agent) with at > since."""
        return self._rows.count_violations(runtime_id, node_id, since)

    def prune(self, now: int, violation_window: int) -> int:
        """Forget credentials no verifier can accept any more, old violations, and tasks over
        for EXPIRED_RECORD_RETENTION past the last use of a credential of theirs; returns how
        many rows went. A task whose end is under way (ENDING) stays: its finisher reads it."""
        gone = self._rows.prune_credentials(now)
        gone += self._rows.prune_violations(now - violation_window)
        before = expired_record_kept_from(now)
        return gone + sum(self._rows.prune_tasks(s.value, before) for s in _OVER)
