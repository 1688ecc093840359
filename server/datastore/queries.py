# ruff: noqa: S608, S105 - column lists are constants; every value is a bound parameter
"""Every DML statement of the datastore, in SQL that SQLite (>= 3.24) and PostgreSQL both run.

Parameters use the `:name` style; a PostgreSQL driver wants `%(name)s`, a mechanical rewrite.
Upserts use `INSERT ... ON CONFLICT ... DO UPDATE`, never SQLite's `INSERT OR REPLACE`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.datastore.errors import DataStoreError
from server.datastore.records import FEED_POLICY, BundleWrite, ForeignBundle
from svid import MAX_CLOCK_SKEW

MIGRATION_VERSIONS = "SELECT version FROM schema_migrations"
RECORD_MIGRATION = (
    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (:version, :name, :now)"
)

_ENTRY_COLUMNS = (
    "id, spiffe_id, parent_id, identity_hash, selectors, x509_svid_ttl, jwt_svid_ttl, "
    "dns_names, hint, admin, expires_at, revision, created_at, federates_with"
)
INSERT_ENTRY = (
    f"INSERT INTO entries ({_ENTRY_COLUMNS}) VALUES (:id, :spiffe_id, :parent_id, "
    ":identity_hash, :selectors, :x509_svid_ttl, :jwt_svid_ttl, :dns_names, :hint, :admin, "
    ":expires_at, :revision, :created_at, :federates_with)"
)
# Either uniqueness (id, identity_hash) makes this a no-op with rowcount 0.
INSERT_ENTRY_UNLESS_EXISTS = f"{INSERT_ENTRY} ON CONFLICT DO NOTHING"
UPDATE_ENTRY = (
    "UPDATE entries SET spiffe_id = :spiffe_id, parent_id = :parent_id, "
    "identity_hash = :identity_hash, selectors = :selectors, x509_svid_ttl = :x509_svid_ttl, "
    "jwt_svid_ttl = :jwt_svid_ttl, dns_names = :dns_names, hint = :hint, admin = :admin, "
    "expires_at = :expires_at, revision = :revision, federates_with = :federates_with "
    "WHERE id = :id"
)
DELETE_ENTRY = "DELETE FROM entries WHERE id = :id"
SELECT_ENTRY = f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = :id"
ENTRY_BY_IDENTITY = "SELECT id FROM entries WHERE identity_hash = :identity_hash"


def select_entries_in(count: int) -> str:
    """The entries whose id is one of `count` parameters :i0, :i1, ..."""
    names = ", ".join(f":i{n}" for n in range(count))
    return f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id IN ({names})"


# A NULL filter matches everything, so one statement serves every filter combination.


def list_entries(*, spiffe_id: bool, parent_id: bool) -> str:
    """Entries, ordered by id, filtered by the columns asked for. Each filter is a plain
    equality, so that entries_spiffe_id or entries_parent_id serves it: written as
    `(:spiffe_id IS NULL OR spiffe_id = :spiffe_id)`, one query for every case, the planner
    read the whole table in id order for any of them."""
    where = [f"{c} = :{c}" for c, on in (("spiffe_id", spiffe_id), ("parent_id", parent_id)) if on]
    return (
        f"SELECT {_ENTRY_COLUMNS} FROM entries "
        + (f"WHERE {' AND '.join(where)} " if where else "")
        + "ORDER BY id"
    )


INSERT_JOIN_TOKEN = (
    "INSERT INTO join_tokens (token_id, secret_hash, expires_at) "
    "VALUES (:token_id, :secret_hash, :expires_at)"
)
SELECT_JOIN_TOKEN = (
    "SELECT token_id, secret_hash, expires_at FROM join_tokens WHERE token_id = :token_id"
)
# Only the holder of the secret, before expiry, may remove a token: a guess never changes the row.
CONSUME_JOIN_TOKEN = (
    "DELETE FROM join_tokens WHERE token_id = :token_id AND secret_hash = :secret_hash "
    "AND expires_at > :now"
)
PRUNE_JOIN_TOKENS = "DELETE FROM join_tokens WHERE expires_at <= :now"

_AGENT_COLUMNS = (
    "spiffe_id, attestation_type, serial, expires_at, banned, attested_at, selectors, "
    "previous_serial, previous_expires_at"
)
# A first admission (no record read): inserted only while the agent has no row. A row there
# was written since the caller looked (another admission, perhaps banned since): overwriting it
# would take its place, and a ban of it would no longer be the record the server holds.
INSERT_AGENT = (
    f"INSERT INTO agents ({_AGENT_COLUMNS}) VALUES (:spiffe_id, :attestation_type, :serial, "
    ":expires_at, :banned, :attested_at, :selectors, :previous_serial, :previous_expires_at) "
    "ON CONFLICT (spiffe_id) DO NOTHING"
)
# A compare-and-swap: the agent's record is replaced only while it is still the admission the
# caller read (same serial and attestation time, not banned). An eviction and a new attestation
# meanwhile left another record (or none), which a stale renewal must not overwrite.
REPLACE_AGENT = (
    "UPDATE agents SET attestation_type = :attestation_type, serial = :serial, "
    "expires_at = :expires_at, previous_serial = :previous_serial, "
    "previous_expires_at = :previous_expires_at, attested_at = :attested_at, "
    "selectors = :selectors WHERE spiffe_id = :spiffe_id AND attested_at = :read_attested_at "
    "AND banned = 0 AND (serial = :held OR previous_serial = :held)"
)
# A record moved to a newer certificate a restored datastore lost (AttestedAgent.adopted): only
# while it still names, as its current one, the certificate the caller read. Stricter than
# REPLACE_AGENT (no previous serial): a record renewed or adopted since names the read serial
# as previous at most, and the newer certificate there must not be clobbered.
ADOPT_AGENT_CERTIFICATE = (
    "UPDATE agents SET serial = :serial, expires_at = :expires_at, "
    "previous_serial = :previous_serial, previous_expires_at = :previous_expires_at "
    "WHERE spiffe_id = :spiffe_id AND serial = :read_serial "
    "AND attested_at = :read_attested_at AND banned = 0"
)
SELECT_AGENT = f"SELECT {_AGENT_COLUMNS} FROM agents WHERE spiffe_id = :spiffe_id"
LIST_AGENTS = f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY spiffe_id"
DELETE_AGENT = "DELETE FROM agents WHERE spiffe_id = :spiffe_id"
# An eviction the server makes on its own (an upgraded node's former agent) never lifts a ban
# another server stored that this one has not heard of: only the operator does.
DELETE_AGENT_NOT_BANNED = "DELETE FROM agents WHERE spiffe_id = :spiffe_id AND banned = 0"
AGENT_BANNED = "SELECT 1 FROM agents WHERE spiffe_id = :spiffe_id AND banned = 1"
# A banned agent stays (its ban must hold against a new attestation under its ID), and so does
# one whose removal is stored (its finisher revokes what the agent holds, and it may be evicted
# and attested again meanwhile: that agent is a current one).
# Join-token agents only: a join token is spent, so nothing attests under that ID again. An
# x509pop node attests again under its ID for as long as its certificate lasts: its row stays,
# so the operator can still ban it by ID while it is away.
# At most :limit rows, the first in ID order: one batch of a prune. The DELETE repeats the
# conditions, so a row re-attested (or banned) after the batch was picked is judged as that
# write left it (PostgreSQL's READ COMMITTED re-checks an updated row) and stays.
_PRUNABLE_AGENT = (
    "attestation_type = 'join_token' AND banned = 0 "
    "AND expires_at < :before "
    "AND previous_expires_at < :before "
    "AND NOT EXISTS (SELECT 1 FROM removals WHERE removals.agent_id = agents.spiffe_id)"
)
PRUNE_AGENTS = (
    f"DELETE FROM agents WHERE {_PRUNABLE_AGENT} AND spiffe_id IN "
    f"(SELECT spiffe_id FROM agents WHERE {_PRUNABLE_AGENT} AND spiffe_id > :after "
    "ORDER BY spiffe_id LIMIT :limit) "
    "RETURNING spiffe_id"
)
SET_AGENT_BANNED = "UPDATE agents SET banned = :banned WHERE spiffe_id = :spiffe_id"

_REMOVAL_COLUMNS = "agent_id, reason, started_at"
# A removal of an agent replaces any older one of it: the newer covers everything the agent
# holds, the older's credentials too.
UPSERT_REMOVAL = (
    f"INSERT INTO removals ({_REMOVAL_COLUMNS}) VALUES (:agent_id, :reason, :started_at) "
    "ON CONFLICT (agent_id) DO UPDATE SET reason = excluded.reason, "
    "started_at = excluded.started_at"
)
SELECT_REMOVAL = f"SELECT {_REMOVAL_COLUMNS} FROM removals WHERE agent_id = :agent_id"
LIST_REMOVALS = (
    f"SELECT {_REMOVAL_COLUMNS} FROM removals WHERE started_at <= :before "
    "ORDER BY started_at, agent_id"
)
# One statement decides: a claim lapsed (or this holder's own) is taken, a running one is
# not. A concurrent caller waits on the row (PostgreSQL) or the write lock (SQLite), then
# finds it taken.
CLAIM_REMOVAL = (
    "UPDATE removals SET claimed_by = :holder, claimed_until = :until "
    "WHERE agent_id = :agent_id AND (claimed_by = :holder OR claimed_until <= :now)"
)
# A ledger write of a removal's finisher holds its claim (AuditStore.write_ledger's `claims`):
# the removal's row, claimed by that holder (PostgreSQL appends FOR SHARE: a takeover waits
# for the write, then its finisher reads what the write logged).
REMOVAL_CLAIMED_BY = (
    "SELECT agent_id FROM removals WHERE agent_id = :agent_id AND claimed_by = :holder"
)
# What an older removal left, stored to be finished under a claim (resume_removal): only for
# an agent with no row (one admitted again is evicted anew) and none stored already.
RESUME_REMOVAL = (
    f"INSERT INTO removals ({_REMOVAL_COLUMNS}) SELECT :agent_id, :reason, :started_at "
    "WHERE NOT EXISTS (SELECT 1 FROM agents WHERE spiffe_id = :agent_id) "
    "ON CONFLICT (agent_id) DO NOTHING"
)
# A finisher keeping its claim (AgentRemovals' renewals): only while no one else took it, even
# lapsed. CLAIM_REMOVAL would take it back from a holder that took it over and let it go (or
# died), under the finisher whose log write may be in flight still: that write would commit
# beside what the other holder logged.
RENEW_REMOVAL_CLAIM = (
    "UPDATE removals SET claimed_until = :until WHERE agent_id = :agent_id AND claimed_by = :holder"
)
RELEASE_REMOVAL_CLAIM = (
    "UPDATE removals SET claimed_until = 0 WHERE agent_id = :agent_id AND claimed_by = :holder"
)
# Only the removal the finisher read: a newer one of the same agent is not finished yet.
END_REMOVAL = (
    "DELETE FROM removals WHERE agent_id = :agent_id AND reason = :reason "
    "AND started_at = :started_at"
)

_SLOT_COLUMNS = (
    "slot_id, kind, status, public_der, kid, not_before, not_after, created_at, sealed_key"
)
UPSERT_KEY_SLOT = (
    f"INSERT INTO key_slots ({_SLOT_COLUMNS}) VALUES (:slot_id, :kind, :status, :public_der, "
    ":kid, :not_before, :not_after, :created_at, :sealed_key) ON CONFLICT (slot_id) DO UPDATE "
    "SET kind = excluded.kind, status = excluded.status, public_der = excluded.public_der, "
    "kid = excluded.kid, not_before = excluded.not_before, not_after = excluded.not_after, "
    "created_at = excluded.created_at, sealed_key = excluded.sealed_key"
)
LIST_KEY_SLOTS = (
    f"SELECT {_SLOT_COLUMNS} FROM key_slots WHERE kind = :kind ORDER BY not_before, slot_id"
)
DELETE_KEY_SLOT = "DELETE FROM key_slots WHERE slot_id = :slot_id"

# One statement, so taking a lease is atomic on either backend: insert a free name, renew our
# own, or take over one whose holder let it expire; otherwise change nothing (rowcount 0).
ACQUIRE_LEASE = (
    "INSERT INTO leases (name, holder, expires_at) VALUES (:name, :holder, :expires_at) "
    "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
    "expires_at = excluded.expires_at "
    "WHERE leases.holder = excluded.holder OR leases.expires_at <= :now"
)
RELEASE_LEASE = "DELETE FROM leases WHERE name = :name AND holder = :holder"
# A write fenced by a lease (LeaseFence): the lease's row, still its holder's and unexpired
# (PostgreSQL appends FOR SHARE: a takeover, an UPDATE of the row, waits for the write).
LEASE_HELD = "SELECT name FROM leases WHERE name = :name AND holder = :holder AND expires_at > :now"

_REVOCATION_COLUMNS = "kind, value, spiffe_id, expires_at, reason, revoked_at, issuer"
INSERT_REVOCATION = (
    f"INSERT INTO revocations ({_REVOCATION_COLUMNS}) VALUES (:kind, :value, :spiffe_id, "
    ":expires_at, :reason, :revoked_at, :issuer) ON CONFLICT (kind, value) DO NOTHING"
)
LIST_REVOCATIONS = f"SELECT {_REVOCATION_COLUMNS} FROM revocations ORDER BY kind, value"
PRUNE_REVOCATIONS = "DELETE FROM revocations WHERE expires_at < :needed_from"

BUMP_COUNTER = "UPDATE counters SET value = value + 1 WHERE name = :name"
SELECT_COUNTER = "SELECT value FROM counters WHERE name = :name"

# The change feed: the counter moves by the rows a write appends, in the write's transaction.
BUMP_COUNTER_BY = "UPDATE counters SET value = value + :n WHERE name = :name"
# Rows go in as multi-row VALUES (sqlite_audit.insert_many): revision, at, kind, key.
FEED_INTO = "INSERT INTO feed (revision, at, kind, key)"
FEED_SINCE = (
    "SELECT revision, at, kind, key FROM feed WHERE revision > :after "
    "ORDER BY revision LIMIT :limit"
)
# The newest policy announcement outlives the retention: a server started a day after a fleet
# reload still compares its set with it (pruned, it started silent). The old rows left after
# the first statement are announcements only, so neither reads more than the pruned range
# (feed_at). At most two announcements stay: the newest old one, and any newer.
PRUNE_FEED = f"DELETE FROM feed WHERE at < :before AND kind <> '{FEED_POLICY}'"
PRUNE_FEED_POLICY = (
    f"DELETE FROM feed WHERE at < :before AND kind = '{FEED_POLICY}' AND revision < "
    f"(SELECT MAX(revision) FROM feed WHERE at < :before AND kind = '{FEED_POLICY}')"
)
NEWEST_FEED_AT = "SELECT MAX(at) AS at FROM feed"
# A search of migration 23's partial index (feed_policy), which holds the announcements only:
# the kind is named as the index's literal (a bound parameter is not matched to it).
NEWEST_POLICY_ANNOUNCEMENT = (
    f"SELECT revision, key, at FROM feed WHERE kind = '{FEED_POLICY}' "
    "ORDER BY revision DESC LIMIT 1"
)

# One statement, so two servers on one database cannot both accept a jti: the row is inserted,
# or an expired holder is overwritten; a live holder leaves the row unchanged (rowcount 0).
# ON CONFLICT ... DO UPDATE ... WHERE is the same in SQLite (>= 3.24) and PostgreSQL.
# A claim is held until MAX_CLOCK_SKEW past its expiry by the clock of the server that reads it:
# another server, whose clock runs behind, may still accept the assertion (and must find the
# claim) after this one's clock passed the expiry. Neither a prune nor a re-claim lets it go
# earlier.
_JTI_GONE = f"expires_at <= :now - {int(MAX_CLOCK_SKEW)}"
CLAIM_JTI = f"""
INSERT INTO oauth_jtis (issuer, jti, expires_at) VALUES (:issuer, :jti, :expires_at)
ON CONFLICT (issuer, jti) DO UPDATE SET expires_at = excluded.expires_at
WHERE oauth_jtis.{_JTI_GONE}"""
PRUNE_JTIS = f"DELETE FROM oauth_jtis WHERE {_JTI_GONE}"

_RELATIONSHIP_COLUMNS = (
    "trust_domain, endpoint_url, profile, endpoint_spiffe_id, ca_file, created_at, updated_at"
)
INSERT_RELATIONSHIP = (
    f"INSERT INTO federation_relationships ({_RELATIONSHIP_COLUMNS}) VALUES (:trust_domain, "
    ":endpoint_url, :profile, :endpoint_spiffe_id, :ca_file, :created_at, :updated_at) "
    "ON CONFLICT DO NOTHING"
)
UPDATE_RELATIONSHIP = (
    "UPDATE federation_relationships SET endpoint_url = :endpoint_url, profile = :profile, "
    "endpoint_spiffe_id = :endpoint_spiffe_id, ca_file = :ca_file, updated_at = :updated_at "
    "WHERE trust_domain = :trust_domain"
)
SELECT_RELATIONSHIP = (
    f"SELECT {_RELATIONSHIP_COLUMNS} FROM federation_relationships "
    "WHERE trust_domain = :trust_domain"
)
LIST_RELATIONSHIPS = (
    f"SELECT {_RELATIONSHIP_COLUMNS} FROM federation_relationships ORDER BY trust_domain"
)
DELETE_RELATIONSHIP = "DELETE FROM federation_relationships WHERE trust_domain = :trust_domain"
# A spiffe_sequence is a uint64 and the column a signed BIGINT: it is stored shifted down by
# 2**63 (migration 18), so the whole range fits and orders as the sequences do. 0 (no sequence)
# is stored as the lowest BIGINT, NO_SEQUENCE.
_SEQUENCE_SHIFT = 2**63
NO_SEQUENCE = -_SEQUENCE_SHIFT


def stored_sequence(sequence: int) -> int:
    """The column's value for a bundle's spiffe_sequence (0 to 2**64 - 1)."""
    if not 0 <= sequence < 2**64:
        raise DataStoreError(f"spiffe_sequence {sequence} is not a uint64")
    return sequence - _SEQUENCE_SHIFT


def read_sequence(stored: int) -> int:
    """The spiffe_sequence a column's value stands for (stored_sequence undone)."""
    return int(stored) + _SEQUENCE_SHIFT


def foreign_bundle_of(row: Mapping[str, Any]) -> ForeignBundle:
    """A LIST_FOREIGN_BUNDLES row, on either backend."""
    return ForeignBundle(
        row["trust_domain"],
        bytes(row["bundle"]),
        row["updated_at"],
        read_sequence(row["spiffe_sequence"]),
    )


UPSERT_FOREIGN_BUNDLE = (
    "INSERT INTO foreign_bundles (trust_domain, bundle, updated_at, spiffe_sequence) VALUES "
    "(:trust_domain, :bundle, :updated_at, :sequence) ON CONFLICT (trust_domain) DO UPDATE SET "
    "bundle = excluded.bundle, updated_at = excluded.updated_at, "
    "spiffe_sequence = excluded.spiffe_sequence"
)
# The same, unless the stored bundle's sequence is higher (a bundle without one, NO_SEQUENCE,
# is not ordered: it replaces what is stored, as it did before sequences were compared).
UPSERT_FOREIGN_BUNDLE_NOT_OLDER = (
    UPSERT_FOREIGN_BUNDLE + " WHERE excluded.spiffe_sequence = :no_sequence "
    "OR excluded.spiffe_sequence >= foreign_bundles.spiffe_sequence"
)


def foreign_bundle_write(bundle: ForeignBundle, over_newer: bool) -> tuple[str, dict[str, Any]]:
    """put_foreign_bundle's statement and parameters, on either backend: one row changed when
    the bundle is stored."""
    sql = UPSERT_FOREIGN_BUNDLE if over_newer else UPSERT_FOREIGN_BUNDLE_NOT_OLDER
    return sql, {
        "trust_domain": bundle.trust_domain,
        "bundle": bundle.bundle,
        "updated_at": bundle.updated_at,
        "sequence": stored_sequence(bundle.sequence),
        "no_sequence": NO_SEQUENCE,
    }


def ledger_bundle_write(write: BundleWrite) -> tuple[str, dict[str, Any]]:
    """A ledger write's bundle (write_ledger's `bundles`) as a statement and its parameters,
    on either backend: a store as put_foreign_bundle's, a removal as delete_foreign_bundle's;
    one row changed when the store took it."""
    if write.remove:
        return DELETE_FOREIGN_BUNDLE, {"trust_domain": write.bundle.trust_domain}
    return foreign_bundle_write(write.bundle, write.over_newer)


LIST_FOREIGN_BUNDLES = (
    "SELECT trust_domain, bundle, updated_at, spiffe_sequence FROM foreign_bundles "
    "ORDER BY trust_domain"
)
DELETE_FOREIGN_BUNDLE = "DELETE FROM foreign_bundles WHERE trust_domain = :trust_domain"
