"""Numbered schema migrations. Each runs in the same transaction as the row that records it.

The DDL sticks to types both SQLite and PostgreSQL understand (TEXT, BIGINT, SMALLINT, DOUBLE
PRECISION); only BLOB and SEQ_KEY below are SQLite's words. The PostgreSQL backend runs this same
list through `postgres_migrations`, which swaps those words (POSTGRES_WORDS), so a migration
appended here applies to both backends; a migration whose SQL truly differs gets an entry in
POSTGRES_OVERRIDES. Never edit a released migration: append a new one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from server.datastore.errors import StorageError

Execute = Callable[[str], object]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    apply: Callable[[Execute], None]


def refuse_newer(done: Iterable[int]) -> None:
    """StorageError when the datastore holds migrations this server does not know: a newer
    server migrated it, and this one would read and write its rows in the old meaning (a
    foreign bundle's sequence, shifted by migration 18, compared raw), silently and for good."""
    unknown = sorted(v for v in done if v > MIGRATIONS[-1].version)
    if unknown:
        raise StorageError(
            f"the datastore's schema is at version {unknown[-1]}, newer than this server's "
            f"({MIGRATIONS[-1].version}): run the newer svid-server (servers sharing a database "
            "are upgraded together)"
        )


def refuse_other(done: Iterable[int], oldest: int) -> None:
    """StorageError unless a store opened without migrating can be read by this release: its
    schema is no newer than this release's (refuse_newer) and no older than `oldest`, the
    first version the caller reads right. Never migrating is the point: servers of the
    previous release may still run on the datastore, and one restarted on a schema migrated
    under it refuses to start, for good."""
    versions = sorted(done)
    refuse_newer(versions)
    if not versions:
        raise StorageError(
            "the datastore holds no svidd schema (no server has started on it): check the "
            "datastore setting or URL"
        )
    if versions[-1] < oldest:
        raise StorageError(
            f"the datastore's schema is at version {versions[-1]}, older than this release's "
            f"({MIGRATIONS[-1].version}), and this command does not migrate it (servers of "
            "the release that made it may be running on it): run the command with that "
            "release's svid-server, or upgrade every server sharing the datastore first (the "
            "first to start migrates it)"
        )


CREATE_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)"""


def _initial_schema(execute: Execute) -> None:
    execute("""
        CREATE TABLE entries (
            id TEXT PRIMARY KEY,
            spiffe_id TEXT NOT NULL,
            parent_id TEXT NOT NULL,
            identity_hash TEXT NOT NULL UNIQUE,
            selectors TEXT NOT NULL,
            x509_svid_ttl BIGINT NOT NULL,
            jwt_svid_ttl BIGINT NOT NULL,
            dns_names TEXT NOT NULL,
            hint TEXT NOT NULL,
            admin SMALLINT NOT NULL,
            expires_at BIGINT NOT NULL,
            revision BIGINT NOT NULL,
            created_at BIGINT NOT NULL
        )""")
    execute("CREATE INDEX entries_spiffe_id ON entries (spiffe_id)")
    execute("CREATE INDEX entries_parent_id ON entries (parent_id)")
    execute("""
        CREATE TABLE agents (
            spiffe_id TEXT PRIMARY KEY,
            attestation_type TEXT NOT NULL,
            serial TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            banned SMALLINT NOT NULL,
            attested_at BIGINT NOT NULL,
            selectors TEXT NOT NULL
        )""")
    execute("""
        CREATE TABLE join_tokens (
            token_id TEXT PRIMARY KEY,
            secret_hash BLOB NOT NULL,
            expires_at BIGINT NOT NULL
        )""")
    execute("""
        CREATE TABLE key_slots (
            slot_id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            status TEXT NOT NULL,
            public_der BLOB NOT NULL,
            kid TEXT NOT NULL,
            not_before BIGINT NOT NULL,
            not_after BIGINT NOT NULL,
            created_at BIGINT NOT NULL
        )""")
    execute("""
        CREATE TABLE revocations (
            kind TEXT NOT NULL,
            value TEXT NOT NULL,
            spiffe_id TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            reason TEXT NOT NULL,
            revoked_at BIGINT NOT NULL,
            PRIMARY KEY (kind, value)
        )""")
    execute("CREATE INDEX revocations_expires_at ON revocations (expires_at)")
    execute("""
        CREATE TABLE counters (
            name TEXT PRIMARY KEY,
            value BIGINT NOT NULL
        )""")
    execute("INSERT INTO counters (name, value) VALUES ('revision', 0)")
    execute("INSERT INTO counters (name, value) VALUES ('bundle_sequence', 0)")


# SQLite's INTEGER is 64-bit and, as the primary key, names the rowid: no second B-tree to keep
# per audit append. PostgreSQL: BIGINT PRIMARY KEY.
SEQ_KEY = "INTEGER PRIMARY KEY"


def _ledger(execute: Execute) -> None:
    """Tasks, issued credentials, violations and the audit chain join the one datastore, so a
    credential's record and its audit event commit in one transaction."""
    execute("""
        CREATE TABLE tasks (
            task_id TEXT PRIMARY KEY,
            agent_id TEXT NOT NULL,
            runtime_id TEXT NOT NULL,
            state TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            body TEXT NOT NULL
        )""")
    execute("CREATE INDEX tasks_agent ON tasks (agent_id, state)")
    execute("CREATE INDEX tasks_state ON tasks (state, expires_at)")
    # No key on (kind, value): random 159-bit serials and 128-bit jtis, each recorded once, and
    # nothing looks one up by them (revocation reads by task and by agent). An index there put
    # every insert on a random page: ten times the cost of the rest of the row.
    execute("""
        CREATE TABLE credentials (
            kind TEXT NOT NULL,
            value TEXT NOT NULL,
            agent_id TEXT NOT NULL,
            spiffe_id TEXT NOT NULL,
            task_id TEXT NOT NULL,
            expires_at BIGINT NOT NULL
        )""")
    execute("CREATE INDEX credentials_task ON credentials (task_id)")
    execute("CREATE INDEX credentials_agent ON credentials (agent_id)")
    execute("""
        CREATE TABLE violations (
            agent_id TEXT NOT NULL,
            at BIGINT NOT NULL
        )""")
    execute("CREATE INDEX violations_agent ON violations (agent_id, at)")
    # No index on event_id (it is the log's random prefix plus seq, so it cannot repeat) nor on
    # ts (only an export by time reads it, and that walks the log in seq order anyway).
    execute(f"""
        CREATE TABLE audit_events (
            seq {SEQ_KEY},
            event_id TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            kind TEXT NOT NULL,
            agent_id TEXT,
            node_id TEXT,
            on_behalf_of TEXT,
            resource TEXT,
            action TEXT,
            decision TEXT,
            reason TEXT,
            task_id TEXT,
            risk BIGINT,
            credential_id TEXT,
            policy_ids TEXT NOT NULL,
            policy_set_hash TEXT,
            ttl BIGINT,
            latency_us DOUBLE PRECISION,
            extra TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""")
    execute("CREATE INDEX audit_events_agent ON audit_events (agent_id, seq)")
    execute("CREATE INDEX audit_events_task ON audit_events (task_id, seq)")
    # The last (seq, hash), written with every append: a cut tail shows while this row stands.
    execute("""
        CREATE TABLE audit_head (
            id SMALLINT PRIMARY KEY CHECK (id = 1),
            seq BIGINT NOT NULL,
            hash TEXT NOT NULL
        )""")
    # Files of older versions (tasks.db, audit.db) imported into this one, each exactly once.
    execute("""
        CREATE TABLE legacy_imports (
            name TEXT PRIMARY KEY,
            imported_at BIGINT NOT NULL,
            detail TEXT NOT NULL
        )""")


def _audit_base(execute: Execute) -> None:
    """Retention: the (seq, hash) the audit chain starts from once older events were pruned.
    One row, written in the transaction that deletes the events it stands for; no row means
    nothing was ever pruned and the chain starts at genesis."""
    execute("""
        CREATE TABLE audit_base (
            id SMALLINT PRIMARY KEY CHECK (id = 1),
            seq BIGINT NOT NULL,
            hash TEXT NOT NULL,
            pruned_at DOUBLE PRECISION NOT NULL
        )""")


def _task_listing(execute: Execute) -> None:
    """Task lists page by (created_at, task_id) after a cursor: one index per filter set they
    take (none; state; agent; agent and state; runtime; runtime and state), each ending in the
    page key, so a page reads its own rows in order and sorts nothing. The old (agent_id,
    state) index is a prefix of one of them."""
    execute("DROP INDEX tasks_agent")
    for name, columns in (
        ("tasks_page", ""),
        ("tasks_page_state", "state, "),
        ("tasks_page_agent", "agent_id, "),
        ("tasks_page_agent_state", "agent_id, state, "),
        ("tasks_page_runtime", "runtime_id, "),
        ("tasks_page_runtime_state", "runtime_id, state, "),
    ):
        execute(f"CREATE INDEX {name} ON tasks ({columns}created_at, task_id)")


def _feed(execute: Execute) -> None:
    """The change feed (server/replication.py): one row per row of the registration state a
    write touched, numbered by a counter bumped in the write's own transaction, so revisions
    commit in order across processes and a reader that saw revision N saw everything up to N.
    Pruned by age (`at`)."""
    execute(f"""
        CREATE TABLE feed (
            revision {SEQ_KEY},
            at BIGINT NOT NULL,
            kind TEXT NOT NULL,
            key TEXT NOT NULL
        )""")
    execute("CREATE INDEX feed_at ON feed (at)")
    execute("INSERT INTO counters (name, value) VALUES ('feed', 0)")


def _shared_keys(execute: Execute) -> None:
    """Several servers share one CA and one JWT key set: each key slot may carry its private key
    sealed under the trust domain's key-encryption key (NULL or empty: the key is in this
    server's KeyStore), and a lease row names the one server that rotates them. NULL rather than
    a default: SQLite would store a '' default as text, and PostgreSQL has no portable empty
    bytea literal."""
    execute("ALTER TABLE key_slots ADD COLUMN sealed_key BLOB")
    execute("""
        CREATE TABLE leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            expires_at BIGINT NOT NULL
        )""")


def _oauth_jtis(execute: Execute) -> None:
    """OAuth: jtis of accepted JWT-bearer assertions and exchanged subject tokens, until they
    expire (server/oauth). The primary key is what makes the replay check one atomic insert."""
    execute("""
        CREATE TABLE oauth_jtis (
            issuer TEXT NOT NULL,
            jti TEXT NOT NULL,
            expires_at BIGINT NOT NULL,
            PRIMARY KEY (issuer, jti)
        )""")
    execute("CREATE INDEX oauth_jtis_expiry ON oauth_jtis (expires_at)")


def _federation(execute: Execute) -> None:
    """SPIFFE federation (server/federation): the relationships with foreign trust domains, the
    last good bundle of each, and the foreign trust domains an entry federates with (a JSON
    list, like selectors). A foreign bundle may be set before any relationship exists (the
    bootstrap), so the two tables stand apart."""
    execute("""
        CREATE TABLE federation_relationships (
            trust_domain TEXT PRIMARY KEY,
            endpoint_url TEXT NOT NULL,
            profile TEXT NOT NULL,
            endpoint_spiffe_id TEXT NOT NULL,
            ca_file TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL
        )""")
    execute("""
        CREATE TABLE foreign_bundles (
            trust_domain TEXT PRIMARY KEY,
            bundle BLOB NOT NULL,
            updated_at BIGINT NOT NULL
        )""")
    execute("ALTER TABLE entries ADD COLUMN federates_with TEXT NOT NULL DEFAULT '[]'")


def _audit_records(execute: Execute) -> None:
    """Audit checkpoints shared by the servers on one datastore (server/audit/checkpointer.py):
    the newest signed checkpoint and prune record, one row per kind, each written with a feed
    row so every server pushes it to its agents; and the one key that signs them, sealed under
    the key-encryption key (one row, inserted once: the first server's key stands)."""
    execute("""
        CREATE TABLE audit_records (
            kind TEXT PRIMARY KEY,
            seq BIGINT NOT NULL,
            signed_at DOUBLE PRECISION NOT NULL,
            line TEXT NOT NULL
        )""")
    execute("""
        CREATE TABLE audit_signing_key (
            id SMALLINT PRIMARY KEY CHECK (id = 1),
            key_id TEXT NOT NULL,
            public_der BLOB NOT NULL,
            sealed_key BLOB NOT NULL,
            created_at BIGINT NOT NULL
        )""")


def _agent_previous_serial(execute: Execute) -> None:
    """The certificate an agent renewed with stays good until it expires (AttestedAgent): kept
    with the agent's record, where memory alone lost it on a restart or a failover."""
    execute("ALTER TABLE agents ADD COLUMN previous_serial TEXT NOT NULL DEFAULT ''")
    execute("ALTER TABLE agents ADD COLUMN previous_expires_at BIGINT NOT NULL DEFAULT 0")


def _revocation_issuer(execute: Execute) -> None:
    """The CA that issued each X.509-SVID, by its subject key id (hex): serials are unique per
    issuer only, so a CRL lists a serial only when the CA signing it issued the certificate
    (server.tasks.crl). '' on JWT rows and on rows recorded before this column."""
    execute("ALTER TABLE credentials ADD COLUMN issuer TEXT NOT NULL DEFAULT ''")
    execute("ALTER TABLE revocations ADD COLUMN issuer TEXT NOT NULL DEFAULT ''")


def _audit_node_revocations(execute: Execute) -> None:
    """The revocation events of one node's credentials, by node: an agent's removal cut short
    between storing its revocations and logging them is finished by logging those not on the
    log yet, and only this finds them. Partial, so the issuance events (nearly every append)
    pay for no third index; a query naming kind 'revocation' and the node reads it."""
    execute(
        "CREATE INDEX audit_events_node_revocations ON audit_events (node_id, seq) "
        "WHERE kind = 'revocation'"
    )


def _removals(execute: Execute) -> None:
    """Agent removals under way (records.Removal): a row is written in the same transaction as
    the agent's delete or ban and deleted once its revocations and their events are all
    written, so one a dead server left behind is found, and finished, by the housekeeping
    lease holder. Few rows, each short-lived: the primary key is all a lookup needs."""
    execute("""
        CREATE TABLE removals (
            agent_id TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            started_at BIGINT NOT NULL
        )""")


def _workload_jwt_by_jti(execute: Execute) -> None:
    """A workload's JWT-SVID by its exp and jti: the token endpoint records an access token
    traded for one with the agent the JWT-SVID was minted through, so evicting that agent
    revokes it too. Migration 2 left (kind, value) unindexed for its insert cost (a random
    page per row): led by expires_at, which rises with the clock, each insert lands by the
    index's right edge (SQLite, 100k rows in: 2 us a row more, where (value) alone cost 15),
    and the assertion carries its exp. Partial: X.509 serials and tasks' JWTs (recorded with
    their task's agent) pay for nothing."""
    execute(
        "CREATE INDEX credentials_workload_jwt ON credentials (expires_at, value) "
        "WHERE kind = 'jwt_id' AND task_id = ''"
    )


def _workload_jwt_by_subject(execute: Execute) -> None:
    """Migration 14's index, keyed by the JWT-SVID's subject instead of its jti. A jti is
    random: the JWTs of one second landed at random places among that second's, so a batch of
    100 dirtied up to 100 index pages, each a page written to the WAL at its commit, and batch
    issuance ran a fifth slower than before migration 14. The entries of one workload in one
    second are in insertion (rowid) order, so a batch of a workload's JWTs is appended in one
    place; the lookup reads that workload's JWTs of that second (few: the agent caches them)
    for the jti. Its predicate is migration 14's, so the lookup's literals still match it."""
    execute("DROP INDEX credentials_workload_jwt")
    execute(
        "CREATE INDEX credentials_workload_jwt_by_subject ON credentials (expires_at, spiffe_id) "
        "WHERE kind = 'jwt_id' AND task_id = ''"
    )


def _actor_agent(execute: Execute) -> None:
    """A delegated access token is held by the workload acting for the task as well as by the
    task: recorded with the acting workload's agent too, so removing that agent revokes it.
    NULL on every other row (nothing to bind per insert; the column is added without a rewrite
    on both backends) and left out of the index, which only those few rows pay for; a query
    naming the column with '=' implies IS NOT NULL, so it reads the index."""
    execute("ALTER TABLE credentials ADD COLUMN actor_agent_id TEXT")
    execute(
        "CREATE INDEX credentials_actor_agent ON credentials (actor_agent_id) "
        "WHERE actor_agent_id IS NOT NULL"
    )


def _removal_claims(execute: Execute) -> None:
    """Who is finishing a removal, and until when (server/tasks/removals.py): servers sharing
    the datastore each log a revocation once only if one finisher at a time works on it. The
    claim is a lease on the row, so a finisher that died is taken over once it lapses, and it
    goes with the row. '' and 0: claimed by no one."""
    execute("ALTER TABLE removals ADD COLUMN claimed_by TEXT NOT NULL DEFAULT ''")
    execute("ALTER TABLE removals ADD COLUMN claimed_until BIGINT NOT NULL DEFAULT 0")


def _foreign_bundle_sequence(execute: Execute) -> None:
    """A foreign bundle's spiffe_sequence beside its JSON: a write carrying a lower one than the
    stored row's is refused in the same statement (put_foreign_bundle), so a server whose copy
    lags the change feed cannot store an older bundle, fetched from a lagging endpoint replica,
    that every other server would then adopt. Rows stored before carry 0 until their next
    write: 0 orders nothing, as before."""
    execute("ALTER TABLE foreign_bundles ADD COLUMN spiffe_sequence BIGINT NOT NULL DEFAULT 0")


def _foreign_bundle_sequence_uint64(execute: Execute) -> None:
    """spiffe_sequence is a uint64 and the column a signed BIGINT: from here the column holds
    the sequence minus 2**63 (queries.stored_sequence), so the whole range fits and orders.
    Rows written under 17 hold sequences below 2**63 as they are (0: none) and are shifted
    alike. The column's DEFAULT 0 no longer means "none", but every write names the value."""
    # 2**63 as 2**63 - 1 and 1: the literal 2**63 is no BIGINT on either backend.
    execute(
        "UPDATE foreign_bundles SET spiffe_sequence = spiffe_sequence - 9223372036854775807 - 1"
    )


def _derived_from(execute: Execute) -> None:
    """A token exchanged for another of this ledger (a delegation of a delegated token) depends
    on every agent holding that one: the link to it, so removing any of them revokes the
    derived tokens too (ledger_queries.AGENT_CREDENTIALS follows it). NULL on every other row
    and left out of the index, as migration 15's column."""
    execute("ALTER TABLE credentials ADD COLUMN derived_from TEXT")
    execute(
        "CREATE INDEX credentials_derived_from ON credentials (derived_from) "
        "WHERE derived_from IS NOT NULL"
    )


def _violations_by_node(execute: Execute) -> None:
    """A violation counts against the runtime on the node (agent) it came through: one SPIFFE ID
    runs on many nodes, and one node's out-of-intent requests must not stop the others'. Rows
    written before carry no node ('') and so count against none (they age out within the
    violation window)."""
    execute("ALTER TABLE violations ADD COLUMN node_id TEXT NOT NULL DEFAULT ''")
    execute("DROP INDEX violations_agent")
    execute("CREATE INDEX violations_agent_node ON violations (agent_id, node_id, at)")


_TASK_PARENT_INDEX = (
    "CREATE INDEX tasks_parent ON tasks (parent_task_id, state, created_at, task_id) "
    "WHERE parent_task_id <> ''"
)


def _task_parent(execute: Execute) -> None:
    """A task's end ends its sub-tasks: found by the parent's id in an index, where each end
    read and parsed its runtime's every active task (up to a node's cap), so a sweep of n
    tasks read n squared rows. Partial: top-level tasks, most of them, cost no index entry.
    Rows written before get the parent from their body; a body that is not JSON (a damaged
    row, unreadable anyway) is passed over, not left to fail the migration and with it every
    start of the upgraded server."""
    execute("ALTER TABLE tasks ADD COLUMN parent_task_id TEXT NOT NULL DEFAULT ''")
    execute(
        "UPDATE tasks SET parent_task_id = json_extract(body, '$.parent_task_id') "
        "WHERE CASE WHEN json_valid(body) THEN json_extract(body, '$.parent_task_id') END <> ''"
    )
    execute(_TASK_PARENT_INDEX)


def _task_parent_postgres(execute: Execute) -> None:
    """_task_parent in PostgreSQL's words: its JSON operators are not SQLite's, and before
    version 16 it cannot ask whether text is JSON but by catching the cast's error."""
    execute(
        "CREATE FUNCTION pg_temp.svidd_task_parent(body TEXT) RETURNS TEXT LANGUAGE plpgsql "
        "AS $$ BEGIN RETURN COALESCE(body::jsonb ->> 'parent_task_id', ''); "
        "EXCEPTION WHEN invalid_text_representation THEN RETURN ''; END $$"
    )
    execute("ALTER TABLE tasks ADD COLUMN parent_task_id TEXT NOT NULL DEFAULT ''")
    execute(
        "UPDATE tasks SET parent_task_id = found.parent FROM (SELECT task_id, "
        "pg_temp.svidd_task_parent(body) AS parent FROM tasks) AS found "
        "WHERE tasks.task_id = found.task_id AND found.parent <> ''"
    )
    execute("DROP FUNCTION pg_temp.svidd_task_parent(TEXT)")
    execute(_TASK_PARENT_INDEX)


def _feed_policy(execute: Execute) -> None:
    """A server's start reads the newest policy announcement (and a prune the newest old one):
    without an index on kind, a feed holding none was read backwards to its first row (60 ms
    at a million rows, once per start). Partial: the feed's other rows, nearly all of them,
    cost no index entry; the queries name the kind as this literal to be served by it."""
    execute("CREATE INDEX feed_policy ON feed (revision) WHERE kind = 'policy'")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _initial_schema),
    Migration(2, "ledger: tasks, credentials, violations, audit", _ledger),
    Migration(3, "audit retention: the prune base", _audit_base),
    Migration(4, "task listing: keyset indexes", _task_listing),
    Migration(5, "change feed", _feed),
    Migration(6, "shared keys: sealed key slots and leases", _shared_keys),
    Migration(7, "oauth: replayed assertion jtis", _oauth_jtis),
    Migration(8, "federation: relationships, foreign bundles, entries federate with", _federation),
    Migration(9, "audit checkpoints shared: records and the signing key", _audit_records),
    Migration(10, "agents: the previous SVID serial", _agent_previous_serial),
    Migration(11, "credentials and revocations: the issuing CA", _revocation_issuer),
    Migration(12, "audit: revocation events by node", _audit_node_revocations),
    Migration(13, "agents: removals under way", _removals),
    Migration(14, "credentials: a workload's JWT by its exp and jti", _workload_jwt_by_jti),
    Migration(15, "credentials: a delegated token's acting workload's agent", _actor_agent),
    Migration(16, "agents: removals claimed by their finisher", _removal_claims),
    Migration(17, "federation: a foreign bundle's spiffe_sequence", _foreign_bundle_sequence),
    Migration(
        18,
        "federation: a foreign bundle's spiffe_sequence as a uint64",
        _foreign_bundle_sequence_uint64,
    ),
    Migration(19, "credentials: the token a delegated token was exchanged for", _derived_from),
    Migration(20, "violations: by node", _violations_by_node),
    Migration(21, "credentials: a workload's JWT by its exp and subject", _workload_jwt_by_subject),
    Migration(22, "tasks: sub-tasks by their parent", _task_parent),
    Migration(23, "feed: policy announcements by revision", _feed_policy),
)

# The newest migration that changed a table `audit verify` reads (audit_events, audit_head,
# audit_base): it reads any schema from this one on without migrating it. A migration that
# changes one of those tables sets this to its own version.
AUDIT_CHAIN_SCHEMA = 3


# -- PostgreSQL: the same list, translated -----------------------------------------------------

# SQLite's words and PostgreSQL's for them. SEQ_KEY goes first: it is a phrase of other words.
POSTGRES_WORDS: tuple[tuple[str, str], ...] = (
    (SEQ_KEY, "BIGINT PRIMARY KEY"),
    ("BLOB", "BYTEA"),
)
_POSTGRES_PATTERN = re.compile(
    "|".join(rf"\b{re.escape(word)}\b" for word, _ in POSTGRES_WORDS), re.IGNORECASE
)
_POSTGRES_WORD = {word.upper(): theirs for word, theirs in POSTGRES_WORDS}

# Version -> the PostgreSQL body of a migration whose SQL cannot be translated word for word.
POSTGRES_OVERRIDES: Mapping[int, Callable[[Execute], None]] = {22: _task_parent_postgres}


def postgres_ddl(sql: str) -> str:
    """`sql` with SQLite's words (POSTGRES_WORDS) in PostgreSQL's."""
    return _POSTGRES_PATTERN.sub(lambda m: _POSTGRES_WORD[m.group(0).upper()], sql)


def _translated(migration: Migration) -> Callable[[Execute], None]:
    def apply(execute: Execute) -> None:
        migration.apply(lambda sql: execute(postgres_ddl(sql)))

    return apply


def postgres_migrations(
    migrations: Sequence[Migration] = MIGRATIONS,
    overrides: Mapping[int, Callable[[Execute], None]] = POSTGRES_OVERRIDES,
) -> tuple[Migration, ...]:
    """`migrations` as PostgreSQL runs them: each translated, or its override."""
    return tuple(
        Migration(m.version, m.name, overrides.get(m.version) or _translated(m)) for m in migrations
    )
