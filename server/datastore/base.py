"""The one interface every datastore backend implements (SQLite today, PostgreSQL next).

`DataStore` is every role at once: registration state (entries, agents, join tokens, key slots,
bundle, revocations), task records, the credential ledger and the audit chain. Each role is a
protocol of its own so a component asks for no more than it uses; one backend object implements
them all on one database under one migration runner, which is what lets a credential's record
and its audit event commit in one transaction.

All timestamps are int unix seconds. Errors are the `server.datastore.errors` tree. A failed
ledger or audit operation raises StorageError; a failed registration write still surfaces as
the driver's own exception, which callers treat as internal. Every method is safe to call from
any thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol

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


class RegistrationStore(Protocol):
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

    def get_entries(self, entry_ids: Sequence[str]) -> list[Entry]:
        """The stored entries among `entry_ids`, in no particular order; an unknown id is left
        out. One read for many ids (the change feed's follower reloads a batch at once)."""
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

    def check_join_token(self, token_id: str, secret_hash: bytes, now: int) -> bool:
        """True when the token is there, unexpired (expires_at > now), with this hash
        (compared in constant time). A read: it never changes the row, so a wrong guess never
        disturbs the owner. The token is spent by `admit_agent`."""
        ...

    def prune_join_tokens(self, now: int) -> int:
        """Delete tokens with expires_at <= now; returns how many went."""
        ...

    # -- attested agents ------------------------------------------------------------------------

    def upsert_agent(self, agent: AttestedAgent, replacing: AttestedAgent | None = None) -> None:
        """Save the agent's record, a compare-and-swap against the record the caller read.
        Without `replacing` (the caller read none), inserted only: AgentReplacedError, nothing
        written, when the agent has a row (admitted meanwhile, perhaps banned since), so a
        ban is never overwritten and the caller never holds a record other than the stored
        one. With `replacing`, only that record, still stored unbanned with the same
        attested_at and carrying the held serial, is replaced; AgentReplacedError, nothing
        written, otherwise (evicted, banned, attested again). RemovalUnderWayError, nothing
        written, while a removal of the agent is stored."""
        ...

    def adopt_agent_certificate(self, agent: AttestedAgent, replacing: AttestedAgent) -> bool:
        """Save `agent` (`replacing` moved to a newer certificate: AttestedAgent.adopted) only
        while the stored record is `replacing` as read: unbanned, the same attested_at, and
        `replacing.serial` its current serial (not merely its previous). True when written;
        False, nothing written, when another write came first (a renewal, another server's
        adoption, an eviction, a ban). Of several concurrent callers at most one gets True."""
        ...

    def admit_agent(
        self,
        agent: AttestedAgent,
        token: TokenUse,
        now: int,
        replacing: AttestedAgent | None = None,
    ) -> bool:
        """Spend the join token and save the agent in ONE transaction: True when this call
        deleted the token, having found it unexpired (expires_at > now) with this hash, and
        saved the agent with it. Anything else returns False and writes nothing (the token
        stays as it was). Exactly one of several concurrent callers with the right hash gets
        True. RemovalUnderWayError, nothing written (the token unspent), while a removal of
        the agent is stored; AgentReplacedError likewise when the save upsert_agent would
        make is refused (a row there without `replacing`, or not the record `replacing`)."""
        ...

    def get_agent(self, spiffe_id: str) -> AttestedAgent:
        """NotFoundError for an unknown agent."""
        ...

    def list_agents(self) -> list[AttestedAgent]:
        """All agents, ordered by spiffe_id."""
        ...

    def delete_agent(
        self, spiffe_id: str, removal: Removal | None = None, *, unless_banned: bool = False
    ) -> None:
        """Evict: the agent must attest again. NotFoundError for an unknown agent. With
        `removal` (of this agent; ValueError otherwise), it is stored in the same transaction,
        replacing any stored for the agent: no moment has the agent gone and no removal.
        `unless_banned`: a banned agent is kept, ban and all, and ConflictError raised."""
        ...

    def set_agent_banned(
        self, spiffe_id: str, banned: bool, removal: Removal | None = None
    ) -> None:
        """NotFoundError for an unknown agent. `removal` as for delete_agent."""
        ...

    def prune_agents(self, before: int, *, batch: int = AGENT_PRUNE_BATCH) -> list[str]:
        """Delete the agents whose SVIDs (current and previous) expired before `before`,
        except banned ones and those with a removal stored, `batch` at most per transaction
        (each naming its agents in the change feed), until a batch finds fewer; returns their
        SPIFFE IDs, sorted."""
        ...

    # -- agent removals under way (records.Removal) ----------------------------------------------

    def removal_of(self, agent_id: str) -> Removal | None:
        """The stored removal of the agent, if any."""
        ...

    def list_removals(self, before: int) -> list[Removal]:
        """The stored removals with started_at <= before, oldest first."""
        ...

    def end_removal(self, removal: Removal) -> bool:
        """Delete the stored removal if it is still `removal` (same agent, reason and
        started_at): True when this call deleted it. A newer removal of the agent stays."""
        ...

    def claim_removal(self, agent_id: str, holder: str, now: int, ttl: int) -> bool:
        """Atomically claim the agent's stored removal for `holder` until now + ttl, or keep
        claiming it: True when it was unclaimed, its claim lapsed (claimed_until <= now: its
        finisher died) or `holder` has it. False, changing nothing, while another holder's
        claim runs, or when no removal of the agent is stored. Exactly one of several
        concurrent callers gets True. ValueError for ttl <= 0."""
        ...

    def renew_removal_claim(self, agent_id: str, holder: str, now: int, ttl: int) -> bool:
        """Keep `holder`'s claim on the agent's stored removal until now + ttl: True while no
        other holder claimed it since, lapsed or not. False, changing nothing, once another
        holder did (even one that let it go since, or died) or no removal is stored: the
        claim's finisher then stops, as another may have logged the removal's events.
        ValueError for ttl <= 0."""
        ...

    def release_removal_claim(self, agent_id: str, holder: str) -> None:
        """Let the claim go at once if `holder` has it (a finisher that failed, or finished a
        removal a newer one replaced); anyone's else, or none, is left as it is."""
        ...

    def resume_removal(self, removal: Removal) -> bool:
        """Store `removal` for an agent that has no row, so that what an older removal left
        (one stored before removals were, or whose record was lost) is finished under a
        claim like any other: True when this call stored it. False, changing nothing, when
        the agent has a row (it was admitted again: an eviction of it is a new removal) or a
        removal of it is stored already (finish that one)."""
        ...

    # -- CA and JWT key slots -------------------------------------------------------------------

    def save_key_slot(self, slot: KeySlot, *, fence: LeaseFence | None = None) -> None:
        """Insert or replace by slot_id. `fence`: only while its lease is held (LeaseFence;
        LeaseLostError, nothing written, if not)."""
        ...

    def list_key_slots(self, kind: str) -> list[KeySlot]:
        """Slots of one kind ("x509" or "jwt"), oldest not_before first."""
        ...

    def delete_key_slot(self, slot_id: str, *, fence: LeaseFence | None = None) -> None:
        """Deleting an absent slot is not an error (the journal may be replayed). `fence`: as
        save_key_slot's."""
        ...

    def delete_key_slots(self, slot_ids: Sequence[str], *, fence: LeaseFence | None = None) -> None:
        """delete_key_slot for each, all in one transaction (an operator's forget of lost
        keys: all of them or none)."""
        ...

    # -- leases (one server at a time does a job, e.g. CA rotation) ------------------------------

    def acquire_lease(self, name: str, holder: str, now: int, ttl: int) -> bool:
        """Atomically take or keep the lease `name` until now + ttl: True when it was free,
        already `holder`'s (renewed), or its holder let it expire (expires_at <= now; taken
        over). False, changing nothing, while another holder's lease runs. Exactly one of
        several concurrent callers for a free lease gets True. ValueError for ttl <= 0.
        PostgreSQL counts `now` on the database's clock (postgres_time.py): servers sharing
        it agree on the expiry whatever their own clocks say."""
        ...

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up if `holder` has it (a clean shutdown hands over at once); a
        lease held by someone else, or by no one, is left as it is."""
        ...

    # -- bundle ---------------------------------------------------------------------------------

    def next_bundle_sequence(self, *, fence: LeaseFence | None = None) -> int:
        """Durably increment and return the bundle's spiffe_sequence (monotonic across restarts).
        `fence`: only while that lease is held (LeaseLostError otherwise)."""
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
        + MAX_CLOCK_SKEW < now (a verifier accepts through exp + its leeway, by a clock that may
        run behind this server's; see revocation_needed_from); returns how many went."""
        ...

    # -- change tracking ------------------------------------------------------------------------

    def revision(self) -> int:
        """Bumped by every write agents care about: entries, agents, revocations, bundle."""
        ...

    def close(self) -> None: ...


class TaskRecordStore(Protocol):
    """Tasks (the task layer's rows) and the out-of-intent violations that feed its risk."""

    def put_task(self, task: TaskRecord) -> None:
        """Insert or replace by task_id; durable when this returns."""
        ...

    def swap_task(self, task: TaskRecord, expected_state: str) -> bool:
        """Replace the row of `task.task_id` with `task` only while its stored state is
        `expected_state`, in one atomic step: True when this call replaced it (durable, its
        feed row with it); False, changing nothing, when the row is absent or in another state.
        Of several concurrent callers (any servers) expecting the same state, exactly one gets
        True: the one whose write ends a task records the end and revokes."""
        ...

    def get_task(self, task_id: str) -> TaskRecord | None: ...

    def list_tasks(
        self,
        *,
        agent_id: str = "",
        state: str = "",
        runtime_ids: Sequence[str] | None = None,
        after: TaskCursor | None = None,
        limit: int = 0,
    ) -> list[TaskRecord]:
        """Tasks matching every filter given ("" and None match all; runtime_ids, at most 256,
        match any of them), oldest first: by (created_at, task_id), only those after `after`,
        at most `limit` (0: all). A keyset page, served by an index for each filter set."""
        ...

    def sub_tasks(self, parent_task_id: str, state: str) -> list[TaskRecord]:
        """The tasks in `state` whose parent_task_id is `parent_task_id` (none for ""), oldest
        first: read by index, only those rows."""
        ...

    def due_tasks(self, state: str, now: int) -> list[TaskRecord]:
        """Tasks in `state` whose expires_at <= now, soonest first."""
        ...

    def add_violation(self, agent_id: str, node_id: str, at: int) -> None:
        """A violation of runtime `agent_id` through the node (agent) `node_id`."""
        ...

    def count_violations(self, agent_id: str, node_id: str, since: int) -> int:
        """Violations of runtime `agent_id` through node `node_id` with at > since."""
        ...

    def prune_violations(self, before: int) -> int:
        """Delete violations with at <= before; returns how many went."""
        ...

    def prune_tasks(self, state: str, before: int) -> int:
        """Delete the tasks in `state` whose expires_at < before; returns how many went."""
        ...


class CredentialStore(Protocol):
    """Reads of the credential ledger (written by AuditStore.write_ledger)."""

    def task_credentials(self, task_id: str, now: int) -> list[Credential]:
        """Credentials of the task some verifier may still accept at `now` (a verifier takes
        one through exp + its leeway), ordered by (kind, value)."""
        ...

    def agent_credentials(self, agent_id: str, now: int) -> list[Credential]:
        """Credentials issued through the agent some verifier may still accept at `now`, the
        delegated tokens a workload of it acts with (its `actor_agent_id`) and, in turn, the
        tokens derived from those (`derived_from`), each once, by (kind, value)."""
        ...

    def workload_jwt(self, jti: str, expires_at: int, spiffe_id: str) -> Credential | None:
        """The workload (not task) JWT recorded with this jti, expiry (its `exp`) and SPIFFE ID
        (its `sub`), or None: one search of an index (migration 21) and a read of that
        workload's JWTs of that second, made per JWT-bearer grant."""
        ...

    def count_credentials(self, task_id: str) -> int: ...

    def count_credentials_of(self, task_ids: Sequence[str]) -> dict[str, int]:
        """How many credentials each of the tasks has (any number of IDs; those without any
        are left out): one grouped query per COUNT_CREDENTIALS_BATCH of them."""
        ...

    def prune_credentials(self, now: int) -> int:
        """Forget credentials no verifier can accept any more; returns how many went."""
        ...


class AuditStore(Protocol):
    """The audit chain's rows and head, and the one write that commits issued credentials with
    the events that record them."""

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
        """Commit the credential rows, the sealed audit rows (consecutive seqs, AUDIT_COLUMNS)
        and the new audit head in ONE durable transaction: all of it is on disk when this
        returns, or none of it and StorageError is raised.

        Several servers may append to one chain. So, inside that transaction and before
        writing, the stored head must be exactly the head the rows were sealed on: the first
        row's seq - 1 and prev_hash, or an empty chain when the first seq is 1. Otherwise
        another writer moved the chain since: ChainMovedError (a StorageError) carrying the
        stored head, and nothing is written; or, given `reseal`, the rows it returns for the
        stored head are written instead, in the same transaction (chain.rows_to_write). The
        check and the write are one atomic step against other writers (SQLite: the write
        lock of BEGIN IMMEDIATE; PostgreSQL: SELECT ... FOR UPDATE on the head row).
        Credential rows alone (no audit rows) are not checked.

        `jtis` (the OAuth token endpoint's assertions, see AssertionReplayStore) are claimed
        in the same transaction, each as claim_jtis would at `now`: a token and the claim of
        the assertion it was issued for are durable together or not at all. When any of them
        is held already (a replay, or a repeat within `jtis`), nothing is written and
        JtiHeldError names the held ones.

        The credentials' agents (Credential.agent_id; "" is of no agent) must be admitted at
        the commit: stored, not banned, no removal under way. A removal revokes what its
        agent holds as read after its own commit, so a credential committed later would never
        be revoked: nothing is written and AgentRemovedError names those agents. Likewise the
        credentials' tasks (Credential.task_id; "" is of no task) must be active at the commit:
        an end moves the task's row out of 'active' and then reads its credentials to revoke
        them, so nothing is written and TaskEndedMeanwhileError names the tasks that are not. The
        checks and the write are one step against removals and ends (SQLite: BEGIN
        IMMEDIATE's write lock; PostgreSQL: the agents' rows, then the tasks' rows, locked FOR
        SHARE until the commit).

        `bundles` (foreign bundles whose change the audit rows record, server/federation) are
        stored in the same transaction, each as put_foreign_bundle would store it, feed row
        and all: a bundle is stored only with the event recording its change, so none is
        served that the ledger does not hold; a removal (BundleWrite.removal) is deleted
        there as delete_foreign_bundle would, so none is dropped that the ledger does not say
        was. When the store refuses one (it holds a higher sequence; a removal finds no
        bundle), nothing is written and BundleRefusedError names its trust domain.

        `tasks` are stored in the same transaction, each as put_task would store it (feed row
        and all): a task's row and the event recording its begin are durable together or not
        at all, so the log never misses a task a server stored, nor records one it did not.

        `claims` (agent removals' finishers, server/tasks/removals.py) must each still be
        held at the commit: the agent's removal stored and claimed by that holder. A finisher
        that lost its claim (it lapsed and another server took it over, or the removal was
        finished) must not log what the new holder logs too: nothing is written and
        RemovalClaimLostError names the agents. The check and the write are one step against
        claims (SQLite: BEGIN IMMEDIATE's write lock; PostgreSQL: the removal rows locked FOR
        SHARE until the commit, so a takeover waits for this write and then reads it)."""
        ...

    def audit_head(self) -> Head | None:
        """The recorded head, or None for an empty log."""
        ...

    def audit_rows(self, where: EventFilter | None = None) -> Iterator[dict[str, Any]]:
        """Raw rows in seq order, as stored (not validated); `where` narrows them. Streams in
        pages, so a large log never sits in memory."""
        ...

    def audit_snapshot(self) -> AbstractContextManager[AuditSnapshot]:
        """The tables, the head and every row as of one instant, for a verify that must not
        mistake appends landing meanwhile for tampering. Creates nothing."""
        ...

    def close(self) -> None: ...


class AuditRetentionStore(Protocol):
    """Pruning the oldest audit events behind a recorded base (server/audit/retention.py)."""

    def audit_base(self) -> Head | None:
        """The (seq, hash) of the last pruned event, which the remaining chain links to; None
        when nothing was ever pruned (the chain starts at genesis)."""
        ...

    def audit_marks(self, after: int, limit: int) -> list[AuditMark]:
        """(seq, ts, hash) of up to `limit` events with seq > `after`, in seq order."""
        ...

    def audit_rows_after(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` raw audit rows with seq > `after`, in seq order (as audit_rows): what
        a checkpoint or a prune record is verified against before it is signed."""
        ...

    def prune_audit(self, through: Head, now: float) -> int:
        """In one transaction: delete every event with seq <= through.seq and record `through`
        as the base. Returns how many rows went; 0 when the base is already there or past it.
        StorageError, changing nothing, when the event at through.seq does not exist with
        through.hash."""
        ...


class AuditCheckpointStore(Protocol):
    """What the servers sharing this datastore share of the audit checkpoints
    (server/audit/checkpointer.py): the newest signed checkpoint and prune record, the key that
    signs them (sealed). The chain's rows after a point, which the signer verifies before it
    signs a head other servers wrote, come from AuditRetentionStore."""

    def save_audit_record(self, record: AuditRecord) -> bool:
        """Keep `record` as the newest of its kind, in one atomic step, unless the one stored
        is as new (a higher seq, or the same seq signed at the same time or later): True when
        kept, and then a feed row (FEED_AUDIT_RECORD, key: the kind) is written with it."""
        ...

    def audit_records(self) -> list[AuditRecord]:
        """The newest record of each kind, as stored (not verified), oldest signed first."""
        ...

    def offer_audit_key(self, key: SealedAuditKey) -> SealedAuditKey:
        """Store `key` as the trust domain's checkpoint key unless one is stored already;
        returns the one stored (of several concurrent offers exactly one stands)."""
        ...


class ChangeFeed(Protocol):
    """What changed, for the servers sharing this datastore (server/replication.py).

    Every write that concerns a server's in-memory view appends, in its own transaction, one
    row per row it touched (FeedItem: entries, agents, revocations added, key slots, tasks).
    Revisions are consecutive, with no gaps, and commit in order across processes: a reader
    that saw revision N saw every row up to N. A row only names what changed; the reader
    reloads it.
    """

    def feed_head(self) -> int:
        """The newest revision written (0 on a fresh datastore); never goes back, even when
        every row was pruned."""
        ...

    def feed_since(self, after: int, limit: int) -> list[FeedItem]:
        """Up to `limit` rows with revision > `after`, oldest first. When they are not
        `after + 1`, `after + 2`, ... (or there is none while feed_head() > after), rows were
        pruned meanwhile (rows go by their writer's clock, so a hole may sit between kept
        rows): reload everything."""
        ...

    def prune_feed(self, before: int) -> int:
        """Delete rows written before `before` (at < before); returns how many went."""
        ...

    def newest_feed_at(self) -> int | None:
        """The time (its writer's clock, whole seconds) of the newest row the feed holds, None
        when it holds none. Pruning takes the oldest rows first, so while any row is left
        this is at or after every write the feed ever named."""
        ...

    def announce_policy(self, policy_set_hash: str) -> None:
        """Write one feed row (FEED_POLICY, key: `policy_set_hash`): a server reloaded its
        policy set, and every server sharing the datastore reloads its own."""
        ...

    def announced_policy(self) -> PolicyAnnouncement | None:
        """The newest FEED_POLICY row the feed still holds (None: none), by an index."""
        ...

    def wait_feed(self, after: int, timeout: float) -> bool:
        """Block up to `timeout` seconds (real time) until feed_head() > after: True when it
        is, False on timeout or when the store is closing. A hint only: a reader polls
        feed_since() now and then whatever this returns."""
        ...

    def feed_reading(
        self, on_connected: Callable[[], None] | None = None
    ) -> AbstractContextManager[None]:
        """The calls this thread makes meanwhile are the follower's (its feed reads, the rows
        they name, wait_feed): a store with a pool of connections serves them from
        connections of their own, so they never wait behind a burst of other calls (the
        server's view would turn stale meanwhile). `on_connected` is called once, as the
        first of those calls has its connection and before it asks anything (a store with
        no pool may not call it): the follower dates its read from then, not from a wait
        for a connection."""
        ...


class JtiClaim(NamedTuple):
    issuer: str
    jti: str
    expires_at: int


class LeaseFence(NamedTuple):
    """A write only a lease's holder may make (the ca-rotation lease's key-slot writes): the
    backend checks, in the write's own transaction, that `holder` holds lease `name` unexpired
    at `now` (by the caller's clock; PostgreSQL counts it on the database's, as acquire_lease
    does), and refuses the write otherwise (LeaseLostError). A holder paused past the lease's
    life between taking it and writing wrote beside the server that took it over."""

    name: str
    holder: str
    now: int


class RemovalClaim(NamedTuple):
    """A removal finisher's claim on the agent's stored removal, which a ledger write holding
    it requires (AuditStore.write_ledger's `claims`)."""

    agent_id: str
    holder: str


class AssertionReplayStore(Protocol):
    """The `jti`s of assertions the OAuth token endpoint accepted (server/oauth), kept until
    they expire, so that none is accepted twice by any server sharing the database. The
    endpoint claims them with the token's ledger commit (AuditStore.write_ledger's `jtis`, the
    same insert as claim_jtis)."""

    def claim_jtis(self, claims: Sequence[JtiClaim], now: int) -> list[bool]:
        """Record each (issuer, jti) until its expires_at, each by ONE atomic insert-if-absent,
        all in one transaction (one commit for a batch of concurrent requests); per claim True
        when it was not held (or held only more than MAX_CLOCK_SKEW past its expiry), False for
        a replay (also for a repeat within the batch). Durable when this returns."""
        ...

    def prune_jtis(self, now: int) -> int:
        """Forget jtis more than MAX_CLOCK_SKEW past their expiry (a server whose clock runs
        behind may still accept the assertion); returns how many went."""
        ...


class FederationStore(Protocol):
    """Relationships with foreign trust domains and their last good bundles (server/federation)."""

    def create_relationship(self, rel: FederationRelationship) -> FederationRelationship:
        """Store a new relationship (timestamps set); AlreadyExistsError for its trust domain."""
        ...

    def update_relationship(self, rel: FederationRelationship) -> FederationRelationship:
        """Replace a relationship's endpoint settings; NotFoundError when there is none."""
        ...

    def get_relationship(self, trust_domain: str) -> FederationRelationship:
        """NotFoundError when there is none."""
        ...

    def list_relationships(self) -> list[FederationRelationship]:
        """Every relationship, by trust domain."""
        ...

    def delete_relationship(self, trust_domain: str) -> None:
        """NotFoundError when there is none; its foreign bundle stays (delete that apart)."""
        ...

    def put_foreign_bundle(self, bundle: ForeignBundle, *, over_newer: bool = False) -> bool:
        """Store (or replace) a foreign trust domain's bundle, in one atomic step, unless the
        stored one carries a higher sequence (a bundle with sequence 0 is not ordered and
        replaces it; `over_newer`: replace it whatever its sequence, a bundle set by hand).
        True when stored, and then a feed row (FEED_FOREIGN_BUNDLE) is written with it."""
        ...

    def list_foreign_bundles(self) -> list[ForeignBundle]:
        """Every foreign bundle, by trust domain."""
        ...

    def delete_foreign_bundle(self, trust_domain: str) -> None:
        """NotFoundError when there is none."""
        ...


class DataStore(
    RegistrationStore,
    FederationStore,
    ChangeFeed,
    TaskRecordStore,
    CredentialStore,
    AuditStore,
    AuditRetentionStore,
    AuditCheckpointStore,
    AssertionReplayStore,
    Protocol,
):
    """All persistent state of the server, behind one object and one migration runner."""
