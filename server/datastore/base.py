"""The one interface every datastore backend implements (SQLite today, PostgreSQL next).

All timestamps are int unix seconds. Errors are the `server.datastore.errors` tree; a backend
failure (disk full, I/O error) surfaces as the driver's own exception, which callers treat as
internal. Every method is safe to call from any thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from server.datastore.errors import DataStoreError
from server.datastore.records import AttestedAgent, Entry, JoinToken, KeySlot, Revocation


class DataStore(Protocol):
    # -- registration entries -------------------------------------------------------------------

    def create_entry(self, entry: Entry) -> Entry:
        """Store a new entry; assigns `id` (32 hex, in creation order) when empty, revision=1
        and created_at.

        Raises AlreadyExistsError for the same id, or for the same spiffe_id + parent_id +
        selector set as a stored entry.
        """
        ...

    def update_entry(self, entry: Entry) -> Entry:
        """Replace an entry by id and bump its revision; created_at is kept.

        NotFoundError for an unknown id; ConflictError when `entry.revision` is non-zero and is
        not the stored revision; AlreadyExistsError when the change clashes with another entry.
        """
        ...

    def delete_entry(self, entry_id: str) -> None:
        """NotFoundError for an unknown id."""
        ...

    # Batches: one transaction each; items succeed or fail on their own (a refused item writes
    # nothing), results in input order; the revision moves once per batch that changed anything.

    def create_entries(self, entries: Sequence[Entry]) -> list[Entry | DataStoreError]:
        """`create_entry` for each item: the stored entry, or its AlreadyExistsError."""
        ...

    def update_entries(self, entries: Sequence[Entry]) -> list[Entry | DataStoreError]:
        """`update_entry` for each item: the stored entry, or its NotFoundError, ConflictError
        or AlreadyExistsError."""
        ...

    def delete_entries(self, entry_ids: Sequence[str]) -> list[DataStoreError | None]:
        """`delete_entry` for each item: None when deleted, or its NotFoundError."""
        ...

    def get_entry(self, entry_id: str) -> Entry:
        """NotFoundError for an unknown id."""
        ...

    def list_entries(
        self, spiffe_id: str | None = None, parent_id: str | None = None
    ) -> list[Entry]:
        """Entries matching the given filters (all when none), ordered by id."""
        ...

    # -- join tokens ----------------------------------------------------------------------------

    def create_join_token(self, token: JoinToken) -> None:
        """AlreadyExistsError for a token id in use."""
        ...

    def consume_join_token(self, token_id: str, secret_hash: bytes, now: int) -> bool:
        """Use the token up: True when this call deleted it, having found it unexpired
        (expires_at > now) with this hash (compared in constant time).

        Anything else returns False and leaves the row exactly as it was, so a wrong guess
        never disturbs the owner. Exactly one of several concurrent callers with the right
        hash gets True.
        """
        ...

    def prune_join_tokens(self, now: int) -> int:
        """Delete tokens with expires_at <= now; returns how many went."""
        ...

    # -- attested agents ------------------------------------------------------------------------

    def upsert_agent(self, agent: AttestedAgent) -> None:
        """Insert or replace by spiffe_id. A ban is sticky: upsert never clears `banned`."""
        ...

    def get_agent(self, spiffe_id: str) -> AttestedAgent:
        """NotFoundError for an unknown agent."""
        ...

    def list_agents(self) -> list[AttestedAgent]:
        """All agents, ordered by spiffe_id."""
        ...

    def delete_agent(self, spiffe_id: str) -> None:
        """Evict: the agent must attest again. NotFoundError for an unknown agent."""
        ...

    def set_agent_banned(self, spiffe_id: str, banned: bool) -> None:
        """NotFoundError for an unknown agent."""
        ...

    # -- CA and JWT key slots -------------------------------------------------------------------

    def save_key_slot(self, slot: KeySlot) -> None:
        """Insert or replace by slot_id."""
        ...

    def list_key_slots(self, kind: str) -> list[KeySlot]:
        """Slots of one kind ("x509" or "jwt"), oldest not_before first."""
        ...

    def delete_key_slot(self, slot_id: str) -> None:
        """Deleting an absent slot is not an error (the journal may be replayed)."""
        ...

    # -- bundle ---------------------------------------------------------------------------------

    def next_bundle_sequence(self) -> int:
        """Durably increment and return the bundle's spiffe_sequence (monotonic across restarts)."""
        ...

    def bundle_sequence(self) -> int:
        """The current spiffe_sequence without changing it (0 before the first bundle)."""
        ...

    # -- revocations ----------------------------------------------------------------------------

    def add_revocations(self, items: Sequence[Revocation]) -> None:
        """Store all items in one transaction; an already revoked (kind, value) is kept as is."""
        ...

    def list_revocations(self) -> list[Revocation]:
        """All revocations, ordered by (kind, value)."""
        ...

    def prune_revocations(self, now: int) -> int:
        """Delete revocations no verifier can need any more, expires_at + MAX_VERIFIER_LEEWAY
        < now (a verifier accepts through exp + its leeway); returns how many went."""
        ...

    # -- change tracking ------------------------------------------------------------------------

    def revision(self) -> int:
        """Bumped by every write agents care about: entries, agents, revocations, bundle."""
        ...

    def close(self) -> None: ...
