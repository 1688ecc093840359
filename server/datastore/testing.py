"""A test double that wraps a real datastore and fails on demand (like SPIRE's fakedatastore).

    store = FaultInjectingDataStore(SqliteDataStore(tmp_path / "db", clock))
    store.inject(sqlite3.OperationalError("disk I/O error"), method="create_entry")

Queued errors are raised in order by the next calls that match; the real store underneath is
never touched by a failed call, so tests see exactly what survived.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from server.datastore.base import DataStore, JtiClaim, LeaseFence, RemovalClaim
from server.datastore.chain import Resealer
from server.datastore.errors import DataStoreError
from server.datastore.records import (
    AGENT_PRUNE_BATCH,
    AttestedAgent,
    AuditMark,
    AuditRecord,
    AuditRow,
    AuditSnapshot,
    BundleWrite,
    Credential,
    Entry,
    EventFilter,
    FederationRelationship,
    FeedItem,
    ForeignBundle,
    Head,
    JoinToken,
    KeySlot,
    PolicyAnnouncement,
    Removal,
    Revocation,
    SealedAuditKey,
    TaskCursor,
    TaskRecord,
    TokenUse,
)


@dataclass(frozen=True, slots=True)
class _Fault:
    error: BaseException
    method: str | None


class FaultInjectingDataStore:
    def __init__(self, inner: DataStore) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._faults: deque[_Fault] = deque()
        self.calls: list[str] = []

    def inject(self, error: BaseException, method: str | None = None, count: int = 1) -> None:
        """Make the next `count` calls of `method` (any method when None) raise `error`."""
        with self._lock:
            self._faults.extend(_Fault(error, method) for _ in range(count))

    def pending(self) -> int:
        with self._lock:
            return len(self._faults)

    def _enter(self, method: str) -> None:
        with self._lock:
            self.calls.append(method)
            for fault in self._faults:
                if fault.method in (None, method):
                    self._faults.remove(fault)
                    raise fault.error

    def create_entry(self, entry: Entry) -> Entry:
        self._enter("create_entry")
        return self.inner.create_entry(entry)

    def update_entry(self, entry: Entry) -> Entry:
        self._enter("update_entry")
        return self.inner.update_entry(entry)

    def delete_entry(self, entry_id: str) -> None:
        self._enter("delete_entry")
        self.inner.delete_entry(entry_id)

    def create_entries(self, entries: Sequence[Entry]) -> list[Entry | DataStoreError]:
        self._enter("create_entries")
        return self.inner.create_entries(entries)

    def update_entries(self, entries: Sequence[Entry]) -> list[Entry | DataStoreError]:
        self._enter("update_entries")
        return self.inner.update_entries(entries)

    def delete_entries(self, entry_ids: Sequence[str]) -> list[DataStoreError | None]:
        self._enter("delete_entries")
        return self.inner.delete_entries(entry_ids)

    def get_entry(self, entry_id: str) -> Entry:
        self._enter("get_entry")
        return self.inner.get_entry(entry_id)

    def get_entries(self, entry_ids: Sequence[str]) -> list[Entry]:
        self._enter("get_entries")
        return self.inner.get_entries(entry_ids)

    def list_entries(
        self, spiffe_id: str | None = None, parent_id: str | None = None
    ) -> list[Entry]:
        self._enter("list_entries")
        return self.inner.list_entries(spiffe_id, parent_id)

    def create_join_token(self, token: JoinToken) -> None:
        self._enter("create_join_token")
        self.inner.create_join_token(token)

    def check_join_token(self, token_id: str, secret_hash: bytes, now: int) -> bool:
        self._enter("check_join_token")
        return self.inner.check_join_token(token_id, secret_hash, now)

    def prune_join_tokens(self, now: int) -> int:
        self._enter("prune_join_tokens")
        return self.inner.prune_join_tokens(now)

    def upsert_agent(self, agent: AttestedAgent, replacing: AttestedAgent | None = None) -> None:
        self._enter("upsert_agent")
        self.inner.upsert_agent(agent, replacing)

    def adopt_agent_certificate(self, agent: AttestedAgent, replacing: AttestedAgent) -> bool:
        self._enter("adopt_agent_certificate")
        return self.inner.adopt_agent_certificate(agent, replacing)

    def admit_agent(
        self,
        agent: AttestedAgent,
        token: TokenUse,
        now: int,
        replacing: AttestedAgent | None = None,
    ) -> bool:
        self._enter("admit_agent")
        return self.inner.admit_agent(agent, token, now, replacing)

    def get_agent(self, spiffe_id: str) -> AttestedAgent:
        self._enter("get_agent")
        return self.inner.get_agent(spiffe_id)

    def list_agents(self) -> list[AttestedAgent]:
        self._enter("list_agents")
        return self.inner.list_agents()

    def delete_agent(
        self, spiffe_id: str, removal: Removal | None = None, *, unless_banned: bool = False
    ) -> None:
        self._enter("delete_agent")
        self.inner.delete_agent(spiffe_id, removal, unless_banned=unless_banned)

    def set_agent_banned(
        self, spiffe_id: str, banned: bool, removal: Removal | None = None
    ) -> None:
        self._enter("set_agent_banned")
        self.inner.set_agent_banned(spiffe_id, banned, removal)

    def removal_of(self, agent_id: str) -> Removal | None:
        self._enter("removal_of")
        return self.inner.removal_of(agent_id)

    def list_removals(self, before: int) -> list[Removal]:
        self._enter("list_removals")
        return self.inner.list_removals(before)

    def end_removal(self, removal: Removal) -> bool:
        self._enter("end_removal")
        return self.inner.end_removal(removal)

    def claim_removal(self, agent_id: str, holder: str, now: int, ttl: int) -> bool:
        self._enter("claim_removal")
        return self.inner.claim_removal(agent_id, holder, now, ttl)

    def renew_removal_claim(self, agent_id: str, holder: str, now: int, ttl: int) -> bool:
        self._enter("renew_removal_claim")
        return self.inner.renew_removal_claim(agent_id, holder, now, ttl)

    def release_removal_claim(self, agent_id: str, holder: str) -> None:
        self._enter("release_removal_claim")
        self.inner.release_removal_claim(agent_id, holder)

    def resume_removal(self, removal: Removal) -> bool:
        self._enter("resume_removal")
        return self.inner.resume_removal(removal)

    def save_key_slot(self, slot: KeySlot, *, fence: LeaseFence | None = None) -> None:
        self._enter("save_key_slot")
        self.inner.save_key_slot(slot, fence=fence)

    def list_key_slots(self, kind: str) -> list[KeySlot]:
        self._enter("list_key_slots")
        return self.inner.list_key_slots(kind)

    def delete_key_slot(self, slot_id: str, *, fence: LeaseFence | None = None) -> None:
        self._enter("delete_key_slot")
        self.inner.delete_key_slot(slot_id, fence=fence)

    def delete_key_slots(self, slot_ids: Sequence[str], *, fence: LeaseFence | None = None) -> None:
        self._enter("delete_key_slots")
        self.inner.delete_key_slots(slot_ids, fence=fence)

    def acquire_lease(self, name: str, holder: str, now: int, ttl: int) -> bool:
        self._enter("acquire_lease")
        return self.inner.acquire_lease(name, holder, now, ttl)

    def release_lease(self, name: str, holder: str) -> None:
        self._enter("release_lease")
        self.inner.release_lease(name, holder)

    def next_bundle_sequence(self, *, fence: LeaseFence | None = None) -> int:
        self._enter("next_bundle_sequence")
        return self.inner.next_bundle_sequence(fence=fence)

    def bundle_sequence(self) -> int:
        self._enter("bundle_sequence")
        return self.inner.bundle_sequence()

    def add_revocations(self, items: Sequence[Revocation]) -> None:
        self._enter("add_revocations")
        self.inner.add_revocations(items)

    def list_revocations(self) -> list[Revocation]:
        self._enter("list_revocations")
        return self.inner.list_revocations()

    def prune_revocations(self, now: int) -> int:
        self._enter("prune_revocations")
        return self.inner.prune_revocations(now)

    def revision(self) -> int:
        self._enter("revision")
        return self.inner.revision()

    def feed_head(self) -> int:
        self._enter("feed_head")
        return self.inner.feed_head()

    def feed_since(self, after: int, limit: int) -> list[FeedItem]:
        self._enter("feed_since")
        return self.inner.feed_since(after, limit)

    def prune_feed(self, before: int) -> int:
        self._enter("prune_feed")
        return self.inner.prune_feed(before)

    def newest_feed_at(self) -> int | None:
        self._enter("newest_feed_at")
        return self.inner.newest_feed_at()

    def announce_policy(self, policy_set_hash: str) -> None:
        self._enter("announce_policy")
        self.inner.announce_policy(policy_set_hash)

    def announced_policy(self) -> PolicyAnnouncement | None:
        self._enter("announced_policy")
        return self.inner.announced_policy()

    def wait_feed(self, after: int, timeout: float) -> bool:
        self._enter("wait_feed")
        return self.inner.wait_feed(after, timeout)

    def feed_reading(
        self, on_connected: Callable[[], None] | None = None
    ) -> AbstractContextManager[None]:
        return self.inner.feed_reading(on_connected)

    def put_task(self, task: TaskRecord) -> None:
        self._enter("put_task")
        self.inner.put_task(task)

    def swap_task(self, task: TaskRecord, expected_state: str) -> bool:
        self._enter("swap_task")
        return self.inner.swap_task(task, expected_state)

    def get_task(self, task_id: str) -> TaskRecord | None:
        self._enter("get_task")
        return self.inner.get_task(task_id)

    def list_tasks(
        self,
        *,
        agent_id: str = "",
        state: str = "",
        runtime_ids: Sequence[str] | None = None,
        after: TaskCursor | None = None,
        limit: int = 0,
    ) -> list[TaskRecord]:
        self._enter("list_tasks")
        return self.inner.list_tasks(
            agent_id=agent_id, state=state, runtime_ids=runtime_ids, after=after, limit=limit
        )

    def sub_tasks(self, parent_task_id: str, state: str) -> list[TaskRecord]:
        self._enter("sub_tasks")
        return self.inner.sub_tasks(parent_task_id, state)

    def due_tasks(self, state: str, now: int) -> list[TaskRecord]:
        self._enter("due_tasks")
        return self.inner.due_tasks(state, now)

    def add_violation(self, agent_id: str, node_id: str, at: int) -> None:
        self._enter("add_violation")
        self.inner.add_violation(agent_id, node_id, at)

    def count_violations(self, agent_id: str, node_id: str, since: int) -> int:
        self._enter("count_violations")
        return self.inner.count_violations(agent_id, node_id, since)

    def prune_violations(self, before: int) -> int:
        self._enter("prune_violations")
        return self.inner.prune_violations(before)

    def prune_tasks(self, state: str, before: int) -> int:
        self._enter("prune_tasks")
        return self.inner.prune_tasks(state, before)

    def prune_agents(self, before: int, *, batch: int = AGENT_PRUNE_BATCH) -> list[str]:
        self._enter("prune_agents")
        return self.inner.prune_agents(before, batch=batch)

    def task_credentials(self, task_id: str, now: int) -> list[Credential]:
        self._enter("task_credentials")
        return self.inner.task_credentials(task_id, now)

    def agent_credentials(self, agent_id: str, now: int) -> list[Credential]:
        self._enter("agent_credentials")
        return self.inner.agent_credentials(agent_id, now)

    def workload_jwt(self, jti: str, expires_at: int, spiffe_id: str) -> Credential | None:
        self._enter("workload_jwt")
        return self.inner.workload_jwt(jti, expires_at, spiffe_id)

    def count_credentials(self, task_id: str) -> int:
        self._enter("count_credentials")
        return self.inner.count_credentials(task_id)

    def count_credentials_of(self, task_ids: Sequence[str]) -> dict[str, int]:
        self._enter("count_credentials_of")
        return self.inner.count_credentials_of(task_ids)

    def prune_credentials(self, now: int) -> int:
        self._enter("prune_credentials")
        return self.inner.prune_credentials(now)

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
        self._enter("write_ledger")
        self.inner.write_ledger(
            credentials, audit_rows, jtis, now, reseal, bundles=bundles, tasks=tasks, claims=claims
        )

    def audit_head(self) -> Head | None:
        self._enter("audit_head")
        return self.inner.audit_head()

    def audit_rows(self, where: EventFilter | None = None) -> Iterator[dict[str, Any]]:
        self._enter("audit_rows")
        return self.inner.audit_rows(where)

    def audit_base(self) -> Head | None:
        self._enter("audit_base")
        return self.inner.audit_base()

    def audit_marks(self, after: int, limit: int) -> list[AuditMark]:
        self._enter("audit_marks")
        return self.inner.audit_marks(after, limit)

    def prune_audit(self, through: Head, now: float) -> int:
        self._enter("prune_audit")
        return self.inner.prune_audit(through, now)

    def audit_snapshot(self) -> AbstractContextManager[AuditSnapshot]:
        self._enter("audit_snapshot")
        return self.inner.audit_snapshot()

    def save_audit_record(self, record: AuditRecord) -> bool:
        self._enter("save_audit_record")
        return self.inner.save_audit_record(record)

    def audit_records(self) -> list[AuditRecord]:
        self._enter("audit_records")
        return self.inner.audit_records()

    def offer_audit_key(self, key: SealedAuditKey) -> SealedAuditKey:
        self._enter("offer_audit_key")
        return self.inner.offer_audit_key(key)

    def audit_rows_after(self, after: int, limit: int) -> list[dict[str, Any]]:
        self._enter("audit_rows_after")
        return self.inner.audit_rows_after(after, limit)

    def claim_jtis(self, claims: Sequence[JtiClaim], now: int) -> list[bool]:
        self._enter("claim_jtis")
        return self.inner.claim_jtis(claims, now)

    def prune_jtis(self, now: int) -> int:
        self._enter("prune_jtis")
        return self.inner.prune_jtis(now)

    def create_relationship(self, rel: FederationRelationship) -> FederationRelationship:
        self._enter("create_relationship")
        return self.inner.create_relationship(rel)

    def update_relationship(self, rel: FederationRelationship) -> FederationRelationship:
        self._enter("update_relationship")
        return self.inner.update_relationship(rel)

    def get_relationship(self, trust_domain: str) -> FederationRelationship:
        self._enter("get_relationship")
        return self.inner.get_relationship(trust_domain)

    def list_relationships(self) -> list[FederationRelationship]:
        self._enter("list_relationships")
        return self.inner.list_relationships()

    def delete_relationship(self, trust_domain: str) -> None:
        self._enter("delete_relationship")
        self.inner.delete_relationship(trust_domain)

    def put_foreign_bundle(self, bundle: ForeignBundle, *, over_newer: bool = False) -> bool:
        self._enter("put_foreign_bundle")
        return self.inner.put_foreign_bundle(bundle, over_newer=over_newer)

    def list_foreign_bundles(self) -> list[ForeignBundle]:
        self._enter("list_foreign_bundles")
        return self.inner.list_foreign_bundles()

    def delete_foreign_bundle(self, trust_domain: str) -> None:
        self._enter("delete_foreign_bundle")
        self.inner.delete_foreign_bundle(trust_domain)

    def close(self) -> None:
        self._enter("close")
        self.inner.close()


def _conforms(store: FaultInjectingDataStore) -> DataStore:
    return store  # mypy checks the wrapper still implements the whole interface
