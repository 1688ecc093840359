"""The values the datastore keeps. Frozen, so a record read once can be shared across threads."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from svid import MAX_CLOCK_SKEW, MAX_VERIFIER_LEEWAY

X509_KIND = "x509"
JWT_KIND = "jwt"
KEY_KINDS = (X509_KIND, JWT_KIND)

PREPARED = "prepared"
ACTIVE = "active"
RETIRED = "retired"
SLOT_STATUSES = (PREPARED, ACTIVE, RETIRED)

REVOKED_X509_SERIAL = "x509_serial"
REVOKED_JWT_ID = "jwt_id"
# No credential: a task ended (value: its id). Every credential of it is revoked on its own,
# but one that expired before the end is not, and a token of its SPIFFE ID revoked alone may
# be one delegated from it, the task going on: this is what tells resource servers and the
# task's runtime that everything of the task is over.
REVOKED_TASK = "task"
REVOCATION_KINDS = (REVOKED_X509_SERIAL, REVOKED_JWT_ID, REVOKED_TASK)


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    """A workload or node property an entry matches on, such as ``unix:uid:1000``."""

    type: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Selector:
        """``unix:uid:1000`` -> Selector("unix", "uid:1000"): the type ends at the first ':'."""
        kind, sep, value = text.partition(":")
        if not sep or not kind or not value:
            raise ValueError(f"selector must look like 'type:value', got {text!r}")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


@dataclass(frozen=True, slots=True)
class Entry:
    """A registration entry: who (selectors, under parent_id) gets which SPIFFE ID."""

    id: str
    spiffe_id: str
    parent_id: str
    selectors: tuple[Selector, ...]
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    hint: str = ""
    admin: bool = False
    expires_at: int = 0
    revision: int = 0
    created_at: int = 0
    # Foreign trust domain names ("other.org") whose bundles the entry's workloads are given.
    federates_with: tuple[str, ...] = ()


HTTPS_WEB = "https_web"
HTTPS_SPIFFE = "https_spiffe"
PROFILES = (HTTPS_WEB, HTTPS_SPIFFE)


@dataclass(frozen=True, slots=True)
class FederationRelationship:
    """A foreign trust domain we trust, and where its bundle endpoint is.

    https_web: the endpoint's certificate is checked by web PKI, or against `ca_file` when set.
    https_spiffe: it must present an X.509-SVID for `endpoint_spiffe_id`, checked against the
    last known bundle of the foreign trust domain."""

    trust_domain: str
    endpoint_url: str
    profile: str
    endpoint_spiffe_id: str = ""
    ca_file: str = ""
    created_at: int = 0
    updated_at: int = 0


@dataclass(frozen=True, slots=True)
class ForeignBundle:
    """The last good bundle of a foreign trust domain, as SPIFFE bundle JSON."""

    trust_domain: str
    bundle: bytes
    updated_at: int = 0
    # The bundle's spiffe_sequence (0: it has none), kept apart so the store can order writes
    # by it (put_foreign_bundle) without reading the JSON.
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class BundleWrite:
    """A foreign bundle stored in the ledger write that records its change (write_ledger's
    `bundles`), as put_foreign_bundle would store it: refused over a stored higher sequence
    unless `over_newer` (a bundle set by hand). A `remove` write (see `removal`) deletes the
    trust domain's bundle instead, as delete_foreign_bundle would, and is refused when none
    is stored: a removal is on the ledger only if it removed something."""

    bundle: ForeignBundle
    over_newer: bool = False
    remove: bool = False

    @classmethod
    def removal(cls, trust_domain: str) -> BundleWrite:
        return cls(ForeignBundle(trust_domain, b""), remove=True)


@dataclass(frozen=True, slots=True)
class AttestedAgent:
    """A node agent that attested; `serial` is the serial of its newest agent SVID.

    `previous_serial` (until `previous_expires_at`) is the one it renewed with: it is still
    good for open connections, and it is all the agent holds when the renewal's answer was lost.
    Kept in the record, so a server restart or a failover does not lock such an agent out; and
    dropped once the agent calls with its newest (server/agent_authority.py), so a renewal
    with it answered late supersedes nothing the agent uses.
    """

    spiffe_id: str
    attestation_type: str
    serial: str
    expires_at: int
    banned: bool = False
    attested_at: int = 0
    selectors: tuple[Selector, ...] = ()
    previous_serial: str = ""
    previous_expires_at: int = 0

    def renewed(self, serial: str, expires_at: int, held: str) -> AttestedAgent:
        """This record once the agent, presenting its certificate `held`, got a new one.

        The previous certificate is always the one presented, never simply the last one issued:
        an agent that never received a renewal's answer presents the older one again, and
        must keep it (SPIRE keeps its current serial until the new one is used, for the same
        reason)."""
        held_expires = self.expires_at if held == self.serial else self.previous_expires_at
        return replace(
            self,
            serial=serial,
            expires_at=expires_at,
            previous_serial=held,
            previous_expires_at=held_expires,
        )

    def adopted(self, serial: str, expires_at: int) -> AttestedAgent:
        """This record moved to the agent's newer certificate `serial`, one a datastore
        restored from a backup lost (server/restore_adoption.py). No previous certificate:
        the one this record named was superseded by a renewal the backup does not hold, and
        whoever still holds it is not the agent."""
        return replace(self, serial=serial, expires_at=expires_at).without_previous()

    def without_previous(self) -> AttestedAgent:
        """This record taking its current certificate only: the one it renewed with dropped
        once the agent called with its newest (server/agent_authority.py)."""
        return replace(self, previous_serial="", previous_expires_at=0)


# The reasons an agent is removed; its removal's events and revocations carry them.
REMOVAL_EVICTED = "agent evicted"
REMOVAL_BANNED = "agent banned"
REMOVAL_REASONS = (REMOVAL_EVICTED, REMOVAL_BANNED)


@dataclass(frozen=True, slots=True)
class Removal:
    """An agent's removal (eviction or ban) under way: stored with the write that evicts or
    bans the agent, deleted once everything it held is revoked on record. One still stored
    long after it began was cut short (its server died midway) and is finished by another.
    While it is stored the agent is not admitted again, so finishing it never revokes what a
    later admission was issued."""

    agent_id: str
    reason: str  # REMOVAL_EVICTED | REMOVAL_BANNED
    started_at: int

    def __post_init__(self) -> None:
        if self.reason not in REMOVAL_REASONS:
            raise ValueError(
                f"removal reason must be one of {REMOVAL_REASONS}, got {self.reason!r}"
            )

    @property
    def banned(self) -> bool:
        return self.reason == REMOVAL_BANNED


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A single-use join token. Only a hash of the secret is kept, never the secret."""

    token_id: str
    secret_hash: bytes
    expires_at: int

    def __repr__(self) -> str:
        # The hash is not the secret, but keep it out of logs all the same.
        return f"JoinToken(token_id={self.token_id!r}, expires_at={self.expires_at})"


@dataclass(frozen=True, slots=True)
class TokenUse:
    """A join token an attestation presented: checked when the agent attests, spent in the
    transaction that saves the agent's record (DataStore.admit_agent)."""

    token_id: str
    secret_hash: bytes

    def __repr__(self) -> str:
        return f"TokenUse(token_id={self.token_id!r})"


@dataclass(frozen=True, slots=True)
class KeySlot:
    """The journal row of one CA or JWT signing key.

    `public_der` is the CA certificate's DER for kind "x509", the SubjectPublicKeyInfo DER for
    kind "jwt". `sealed_key` is the private key sealed under the trust domain's key-encryption
    key (server/ca/sealing.py) when several servers share the keys; empty when the private key
    lives in this server's KeyStore instead.
    """

    slot_id: str
    kind: str
    status: str
    public_der: bytes
    kid: str
    not_before: int
    not_after: int
    created_at: int
    sealed_key: bytes = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class Revocation:
    """A revoked credential: an X.509-SVID serial (decimal text) or a JWT-SVID ``jti``; or an
    ended task (REVOKED_TASK: its id, and its SPIFFE ID as ``spiffe_id``)."""

    kind: str
    value: str
    spiffe_id: str
    expires_at: int
    reason: str
    revoked_at: int
    # The issuing CA's subject key id (hex) for an X.509 serial; '' for a JWT, and for a serial
    # recorded before issuers were (server.tasks.crl lists those under every CA).
    issuer: str = ""


def revocation_needed_from(now: float) -> float:
    """The earliest credential expiry some verifier may still accept at `now`.

    A verifier takes a token through exp + its leeway (at most MAX_VERIFIER_LEEWAY), so a
    revocation, and the record of a credential that may need one, lives until then, by the
    verifier's clock and by that of any server that may still end the credential's task: this
    server's may run up to MAX_CLOCK_SKEW ahead of theirs.
    """
    return now - MAX_VERIFIER_LEEWAY - MAX_CLOCK_SKEW


# How long the row of an agent whose SVID expired, and of a task that ended, outlives what could
# still use it: no request can, yet each join token makes a new agent ID that every server loads
# at start, and an operator looking into an incident reads both within the audit events' own
# retention (30 days by default). SPIRE's `spire-server agent purge` takes agents expired as long.
EXPIRED_RECORD_RETENTION = 30 * 86400
# Agents one prune transaction deletes at most: a large fleet's first prune commits batch after
# batch instead of holding every row it deletes, and the revision and feed counters every other
# write bumps last, in one long transaction.
AGENT_PRUNE_BATCH = 1000


def prune_in_batches(
    prune: Callable[[int, int, str], list[str]], before: int, batch: int
) -> list[str]:
    """`prune(before, limit, after)` (one transaction, the IDs above `after` it deleted,
    sorted) run again from the last ID deleted until a batch deletes fewer than `batch`; every
    ID, sorted. Each batch starts past the last one's IDs, so the rows kept below them (live,
    and on PostgreSQL the dead ones not yet vacuumed) are not scanned again batch after
    batch."""
    if batch <= 0:
        raise ValueError(f"a prune batch must be positive, got {batch}")
    gone: list[str] = []
    after = ""
    while True:
        removed = prune(before, batch, after)
        gone.extend(removed)
        if len(removed) < batch:
            return sorted(gone)
        after = removed[-1]


def expired_record_kept_from(now: float) -> int:
    """The earliest expiry (an agent's SVID, a task's TTL) whose row is kept at `now`: past it,
    a credential issued under it may want a revocation until revocation_needed_from, and the
    row stays EXPIRED_RECORD_RETENTION longer."""
    return math.floor(revocation_needed_from(now)) - EXPIRED_RECORD_RETENTION


# -- the change feed: what another server must reload ----------------------------------------------

FEED_ENTRY = "entry"  # key: the entry's id
FEED_AGENT = "agent"  # key: the agent's SPIFFE ID
FEED_REVOCATION = "revocation"  # key: "<kind>:<value>"
FEED_KEY_SLOT = "key_slot"  # key: the slot's id, or FEED_BUNDLE_SEQUENCE
# The key of the key_slot row a bundle sequence bump writes: the lease holder numbers a bundle
# after journaling its slots, and a server that reloaded between the two would otherwise keep
# the new slots under the old number (a release that predates it reloads its slots too).
FEED_BUNDLE_SEQUENCE = "#bundle_sequence"
FEED_TASK = "task"  # key: the task's id
FEED_AUDIT_RECORD = "audit_record"  # key: the record's kind ("checkpoint" or "prune")
FEED_RELATIONSHIP = "federation_relationship"  # key: the foreign trust domain
FEED_FOREIGN_BUNDLE = "foreign_bundle"  # key: the foreign trust domain
# key: the hash of the policy set a `policy reload` loaded: every server reloads its own
# policy_dir and reports when its set differs (server/policy/fleet.py). Nothing is stored
# but the row: the policies are files each server reads, as before.
FEED_POLICY = "policy"
FEED_KINDS = (
    FEED_ENTRY,
    FEED_AGENT,
    FEED_REVOCATION,
    FEED_KEY_SLOT,
    FEED_TASK,
    FEED_AUDIT_RECORD,
    FEED_RELATIONSHIP,
    FEED_FOREIGN_BUNDLE,
    FEED_POLICY,
)


class PolicyAnnouncement(NamedTuple):
    """A FEED_POLICY row: a server loaded set `policy_set_hash`, announced at `revision`. The
    revision tells two announcements apart (one hash may be announced again, and an older
    one is read after a newer one served); the hash alone cannot."""

    revision: int
    policy_set_hash: str
    # Unix seconds, by the announcer's clock: a restored datastore's announcements from the
    # backup are older than the checkpoints signed before the restore, one made since newer.
    at: int


class FeedItem(NamedTuple):
    """One row of the change feed: the row named by (kind, key) changed in the transaction
    that wrote revision `revision`, at `at` (unix seconds). It names the row, never its
    contents: a reader reloads the row as it is now."""

    revision: int
    at: int
    kind: str
    key: str


# -- the ledger: issued credentials, tasks, audit -------------------------------------------------


class Credential(NamedTuple):
    """An issued credential, recorded so it can be revoked: an X.509 serial (hex) or a jti.

    A named tuple, not a frozen dataclass: one is built per SVID on the issuing thread (a
    frozen dataclass costs 3x as much to make) and it is already the row the ledger writes."""

    kind: str  # REVOKED_X509_SERIAL | REVOKED_JWT_ID
    value: str
    agent_id: str
    spiffe_id: str
    task_id: str  # "" for a workload (non-task) credential
    expires_at: int
    issuer: str = ""  # X.509: the issuing CA's subject key id (hex); "" for a JWT
    # A delegated token's: the agent of the workload acting for the task, which holds it too
    # (removing either agent revokes it). None for every other credential: a column NULL in
    # every row of a batch is written as a literal, costing the insert nothing.
    actor_agent_id: str | None = None
    # A token exchanged for another of this ledger (delegation): that token's jti, of the same
    # task. Removing an agent revokes what it holds and every token derived from those,
    # following this link (AGENT_CREDENTIALS). None for every other credential.
    derived_from: str | None = None


def credential_agents(credentials: Sequence[Credential]) -> list[str]:
    """The agents `credentials` were issued through, each once, sorted (the order a ledger
    write locks their rows in): each one's own and, for a delegated token, its acting
    workload's (its removal revokes the token too, so it must be admitted as well); "" and
    None (of no agent here) left out."""
    agents = {c[2] for c in credentials}  # agent_id: by index, a write may hold thousands
    agents.update(c[7] for c in credentials if c[7])  # actor_agent_id, set on a few only
    agents.discard("")
    return sorted(agents)


def credential_chains(credentials: Sequence[Credential]) -> list[tuple[str, str]]:
    """The (task_id, jti) of the tokens `credentials` were exchanged for (`derived_from`), each
    once, sorted: a ledger write admits the agents of their chains too (CHAIN_AGENTS)."""
    return sorted({(c[4], c[8]) for c in credentials if c[8]})  # task_id, derived_from


def holding_agents(
    credentials: Sequence[Credential], chains: Mapping[str, Iterable[str]]
) -> list[str]:
    """credential_agents, and the agents of the `chains` (jti -> agents, CHAIN_AGENTS) of the
    tokens some were exchanged for: every agent whose removal revokes one, sorted."""
    agents = set(credential_agents(credentials)).union(*chains.values())
    agents.discard("")
    return sorted(agents)


def credential_tasks(credentials: Sequence[Credential]) -> list[str]:
    """The tasks `credentials` were issued for, each once, sorted (the order a ledger write
    locks their rows in, after the agents'); "" (a workload's) left out."""
    tasks = {c[4] for c in credentials}  # task_id: by index, as credential_agents
    tasks.discard("")
    return sorted(tasks)


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as the datastore keeps it: the columns it is looked up by, and the task itself
    as JSON text (`body`) that only the task layer reads."""

    task_id: str
    agent_id: str
    runtime_id: str
    state: str
    expires_at: int
    created_at: int
    body: str
    # The task it is a sub-task (or elevated step) of, "" for none: a column (body has it too)
    # so an end finds its sub-tasks by index, not by reading its runtime's every task.
    parent_task_id: str = ""


class TaskCursor(NamedTuple):
    """Where a task listing goes on: after the task with this (created_at, task_id), the order
    tasks are listed in."""

    created_at: int
    task_id: str


# The audit row, in the order the chain hashes it (server.audit.event.CANONICAL_FIELDS) and then
# the row's own hash. policy_ids and extra are JSON text.
AUDIT_COLUMNS: tuple[str, ...] = (
    "seq",
    "event_id",
    "ts",
    "kind",
    "agent_id",
    "node_id",
    "on_behalf_of",
    "resource",
    "action",
    "decision",
    "reason",
    "task_id",
    "risk",
    "credential_id",
    "policy_ids",
    "policy_set_hash",
    "ttl",
    "latency_us",
    "extra",
    "prev_hash",
    "hash",
)
AUDIT_TABLES = ("audit_events", "audit_head")
# A sealed audit row: the values of AUDIT_COLUMNS in that order.
AuditRow = tuple[Any, ...]


@dataclass(frozen=True)
class Head:
    """The newest event of a log: publish it elsewhere to anchor the chain against truncation."""

    seq: int
    hash: str


class AuditMark(NamedTuple):
    """Where one event sits in the chain and when it was written: what a prune plans from."""

    seq: int
    ts: float
    hash: str


@dataclass(frozen=True)
class EventFilter:
    agent_id: str | None = None
    task_id: str | None = None
    since: float | None = None
    until: float | None = None
    decision: str | None = None
    kind: str | None = None
    # The node (agent) an event happened on or to: revocations of an agent's credentials.
    node_id: str | None = None


@dataclass(frozen=True)
class AuditSnapshot:
    """What one read transaction saw. `rows` streams inside that transaction: use it before
    the snapshot's context ends."""

    missing_tables: tuple[str, ...]
    head: Head | None
    rows: Callable[[], Iterator[dict[str, Any]]]
    # Where the chain starts after retention pruned older events (None: from genesis).
    base: Head | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """A signed audit checkpoint or prune record as shared through the datastore: its kind,
    seq and signing time (what decides which is newer), and its line as signed
    (svid._audit_checkpoint). Stored as given: a reader checks the signature."""

    kind: str
    seq: int
    signed_at: float
    line: str


@dataclass(frozen=True, slots=True)
class SealedAuditKey:
    """The trust domain's audit checkpoint key: its id (sha256 of the public key's DER), the
    public key (DER SubjectPublicKeyInfo) and the private key sealed under the key-encryption
    key (server/ca/sealing.py)."""

    key_id: str
    public_der: bytes
    sealed_key: bytes
    created_at: int


def key_slot_params(slot: KeySlot) -> dict[str, object]:
    """The row of a key slot, as both backends write it; ValueError for an unknown kind."""
    if slot.kind not in KEY_KINDS:
        raise ValueError(f"key slot kind must be one of {KEY_KINDS}, got {slot.kind!r}")
    return {
        "slot_id": slot.slot_id,
        "kind": slot.kind,
        "status": slot.status,
        "public_der": slot.public_der,
        "kid": slot.kid,
        "not_before": slot.not_before,
        "not_after": slot.not_after,
        "created_at": slot.created_at,
        "sealed_key": slot.sealed_key,
    }
