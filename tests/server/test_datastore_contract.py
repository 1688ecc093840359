"""The datastore contract: every role of `DataStore`, run against every backend.

Each backend is a factory that opens (or reopens) one store at a fixed place: SQLite on a real
file, PostgreSQL in a fresh schema of a real server (tests/postgres.py; skipped when there is
none, unless SVIDD_REQUIRE_POSTGRES=1). The same tests pass unchanged on both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from server.datastore import (
    AlreadyExistsError,
    AttestedAgent,
    ChainMovedError,
    ConflictError,
    Credential,
    DataStore,
    Entry,
    JoinToken,
    KeySlot,
    NotFoundError,
    Revocation,
    Selector,
    StorageError,
    TaskRecord,
)
from server.datastore import ledger_queries as lq
from server.datastore.base import JtiClaim, LeaseFence, RemovalClaim
from server.datastore.errors import (
    AgentRemovedError,
    AgentReplacedError,
    BundleRefusedError,
    JtiHeldError,
    LeaseLostError,
    RemovalClaimLostError,
    RemovalUnderWayError,
    TaskEndedMeanwhileError,
)
from server.datastore.migrations import MIGRATIONS
from server.datastore.records import (
    AUDIT_COLUMNS,
    FEED_BUNDLE_SEQUENCE,
    FEED_KEY_SLOT,
    HTTPS_SPIFFE,
    HTTPS_WEB,
    REMOVAL_BANNED,
    REMOVAL_EVICTED,
    AuditRecord,
    BundleWrite,
    EventFilter,
    FederationRelationship,
    ForeignBundle,
    Head,
    PolicyAnnouncement,
    Removal,
    SealedAuditKey,
    TaskCursor,
    TokenUse,
    prune_in_batches,
)
from server.datastore.sqlite import SqliteDataStore
from svid import MAX_CLOCK_SKEW, MAX_VERIFIER_LEEWAY, SpiffeBundle
from svid._clock import Clock, FakeClock
from svid._spiffe_id import TrustDomain
from tests.clocks import SteppedClock

NOW = 1_700_000_000
AGENT = "spiffe://example.org/svid/agent/join_token/t1"
OTHER_AGENT = "spiffe://example.org/svid/agent/join_token/t2"
RUNTIME = "spiffe://example.org/agents/bot"

Opener = Callable[[], DataStore]


def _sqlite(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Opener:
    return lambda: SqliteDataStore(tmp_path / "datastore.sqlite3", clock)


def _postgres(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Opener:
    from server.datastore.postgres import PostgresDataStore

    dsn: str = request.getfixturevalue("postgres_dsn")
    return lambda: PostgresDataStore(dsn, clock)


# name -> factory(request, tmp_path, clock) of an opener of one store at a fixed place.
Backend = Callable[[pytest.FixtureRequest, Path, Clock], Opener]
BACKENDS: dict[str, Backend] = {"sqlite": _sqlite, "postgresql": _postgres}


@pytest.fixture(params=sorted(BACKENDS))
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens the backend; calling it again reopens the same data (a restart)."""
    opened: list[DataStore] = []
    make = BACKENDS[request.param](request, tmp_path, FakeClock(NOW))

    def opener() -> DataStore:
        store = make()
        opened.append(store)
        return store

    yield opener
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: Opener) -> DataStore:
    return open_store()


def admit(store: DataStore, *agents: str, tasks: Sequence[str] = ()) -> DataStore:
    """Store the agents (AGENT and OTHER_AGENT unless named) the ledger records credentials of,
    and `tasks` active (of AGENT): a ledger write refuses those of an agent not admitted, or
    of a task not active."""
    for agent_id in agents or (AGENT, OTHER_AGENT):
        store.upsert_agent(AttestedAgent(agent_id, "join_token", "1", NOW + 3600))
    for task_id in tasks:
        store.put_task(task(task_id))
    return store


def task(task_id: str, *, agent: str = AGENT, runtime: str = RUNTIME, **kw: object) -> TaskRecord:
    values: dict[str, object] = {
        "state": "active",
        "expires_at": NOW + 600,
        "created_at": NOW,
        "body": f'{{"task_id": "{task_id}"}}',
    }
    values.update(kw)
    return TaskRecord(task_id, agent, runtime, **values)  # type: ignore[arg-type]


def cred(
    value: str, *, agent: str = AGENT, task_id: str = "", expires_at: int = NOW + 300
) -> Credential:
    return Credential("jwt_id", value, agent, RUNTIME, task_id, expires_at)


# Sequences as migration 17 stored them (unshifted): 0 (none), a low one, the highest it could.
MIGRATION_17_SEQUENCES = {"none.org": 0, "five.org": 5, "top.org": 2**63 - 1}


def assert_migration_17_sequences_carried_over(store: DataStore) -> None:
    """After migration 18, MIGRATION_17_SEQUENCES' rows read back as written and still order
    the next write (the test of each backend stores them its own way)."""
    assert store.schema_versions() == [m.version for m in MIGRATIONS]
    found = {b.trust_domain: b.sequence for b in store.list_foreign_bundles()}
    assert found == MIGRATION_17_SEQUENCES

    def put(td: str, sequence: int) -> bool:
        return store.put_foreign_bundle(ForeignBundle(td, b"{}", 6, sequence))

    assert not put("five.org", 4)
    assert put("five.org", 6)
    assert put("none.org", 1)  # a row of no sequence orders nothing
    assert not put("top.org", 2**63 - 2)
    assert put("top.org", 2**63)


def assert_migration_22_announcement_carried_over(store: DataStore, clock: Clock) -> None:
    """After migration 23, the announcement a store at 22 held (revision 1 of hash "h1" at 5,
    under a newer row of another kind at revision 2) is read back as the newest, and the next
    one is numbered after both (the test of each backend stores them its own way)."""
    assert store.schema_versions() == [m.version for m in MIGRATIONS]
    assert store.announced_policy() == PolicyAnnouncement(1, "h1", 5)
    store.announce_policy("h2")
    assert store.announced_policy() == PolicyAnnouncement(3, "h2", int(clock.now()))


# Task bodies as a store at migration 21 held them, the parent only in the body: none (""), "p",
# JSON null, and a damaged body ("x", not JSON) the migration passes over (it failed every start).
MIGRATION_21_TASK_BODIES = (
    ("p", '{"task_id": "p", "parent_task_id": ""}'),
    ("c", '{"task_id": "c", "parent_task_id": "p"}'),
    ("n", '{"task_id": "n", "parent_task_id": null}'),
    ("x", "{not json"),
)


def assert_migration_22_parents_carried_over(store: DataStore) -> None:
    """After migration 22, the sub-task of MIGRATION_21_TASK_BODIES is found by its parent, and
    a task with no parent is no one's sub-task."""
    assert [t.task_id for t in store.sub_tasks("p", "active")] == ["c"]
    assert store.sub_tasks("", "active") == []


def audit_rows(first_seq: int, count: int, prev: str = "0" * 64) -> list[tuple[object, ...]]:
    """Rows shaped as the audit log seals them (the store does not judge the hashes)."""
    rows = []
    for seq in range(first_seq, first_seq + count):
        digest = f"{seq:064x}"
        values: dict[str, object] = dict.fromkeys(AUDIT_COLUMNS)
        values.update(
            seq=seq,
            event_id=f"log-{seq}",
            ts=float(NOW + seq),
            kind="jwt_minted",
            agent_id=AGENT if seq % 2 else OTHER_AGENT,
            task_id=f"task-{seq % 3}",
            decision="allow",
            credential_id=f"jti-{seq}",
            policy_ids="[]",
            extra="{}",
            prev_hash=prev,
            hash=digest,
        )
        rows.append(tuple(values[c] for c in AUDIT_COLUMNS))
        prev = digest
    return rows


# -- registration -------------------------------------------------------------------------------


def test_entries_round_trip(store: DataStore) -> None:
    sels = (Selector("unix", "uid:1000"),)
    made = store.create_entry(Entry("", "spiffe://example.org/web", AGENT, sels, hint="h"))
    assert store.get_entry(made.id) == made
    with pytest.raises(AlreadyExistsError):
        store.create_entry(Entry("", "spiffe://example.org/web", AGENT, sels))
    changed = store.update_entry(Entry(made.id, made.spiffe_id, AGENT, sels, hint="x", revision=1))
    assert changed.revision == 2
    with pytest.raises(ConflictError):
        store.update_entry(Entry(made.id, made.spiffe_id, AGENT, sels, revision=1))
    assert store.list_entries(parent_id=AGENT) == [changed]
    store.delete_entry(made.id)
    with pytest.raises(NotFoundError):
        store.get_entry(made.id)


_UID_1000 = (Selector("unix", "uid:1000"),)


def _entry(store: DataStore, name: str) -> Entry:
    """An entry for spiffe://example.org/<name> made one at a time."""
    return store.create_entry(Entry("", f"spiffe://example.org/{name}", AGENT, _UID_1000))


def _batched_entry(store: DataStore, name: str) -> Entry:
    """An entry for spiffe://example.org/<name> made by a batch, stamped by its own path."""
    (made,) = store.create_entries([Entry("", f"spiffe://example.org/{name}", AGENT, _UID_1000)])
    assert isinstance(made, Entry)
    return made


def _assert_sorted_as_made(made: list[Entry]) -> None:
    """Entries in the order made sort in that order by (created_at, id), no two alike: the
    oldest entry a workload matches is its default identity."""
    stamps = [(e.created_at, e.id) for e in made]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_an_entry_made_after_a_step_back_of_the_clock_sorts_after_those_made_before(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    # A workload's default identity is its oldest entry, by (created_at, id). Stamped with the
    # wall clock alone, an entry made after a step back sorted first: every workload it
    # matched had its default SVID switched to the new entry's.
    clock = SteppedClock(FakeClock(NOW))
    store = BACKENDS[backend](request, tmp_path, clock)()
    try:
        first = _entry(store, "a")
        clock.offset = -3600.0  # the step back
        _assert_sorted_as_made([first, _entry(store, "b"), _batched_entry(store, "c")])
    finally:
        store.close()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_an_entry_made_after_a_restart_on_a_clock_stepped_back_sorts_after_those_made_before(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    # The floor on created_at (and on the ids' milliseconds, which order entries within a
    # second) was kept in memory only: restarted on a clock stepped back, the server stamped
    # a new entry before the older ones, and it became the default identity of the workloads
    # it matched.
    clock = SteppedClock(FakeClock(NOW))
    opener = BACKENDS[backend](request, tmp_path, clock)
    store = opener()
    try:
        first = _entry(store, "a")
    finally:
        store.close()
    clock.offset = -3600.0  # the step back, then the restart
    store = opener()
    try:
        _assert_sorted_as_made([first, _entry(store, "b"), _batched_entry(store, "c")])
    finally:
        store.close()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_an_entry_made_through_a_server_whose_clock_is_behind_sorts_after_the_others(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    # Two servers on one database, B's clock a minute behind A's: each kept its own floor on
    # created_at (and on the ids' milliseconds), read from the store once, so B stamped an
    # entry made after A's before it, and it became the default identity of the workloads
    # both matched.
    ahead, behind = SteppedClock(FakeClock(NOW)), SteppedClock(FakeClock(NOW))
    ahead.offset = 60.0
    a = BACKENDS[backend](request, tmp_path, ahead)()
    b = BACKENDS[backend](request, tmp_path, behind)()
    try:
        made = [_entry(b, "a"), _entry(a, "b"), _entry(b, "c"), _entry(a, "d")]
        _assert_sorted_as_made([*made, _batched_entry(b, "e")])
    finally:
        a.close()
        b.close()


def test_get_entries_reads_many_ids_at_once(store: DataStore) -> None:
    sels = (Selector("unix", "uid:1000"),)
    made = store.create_entries(
        [Entry("", f"spiffe://example.org/w/{i}", AGENT, sels) for i in range(1200)]
    )
    ids = [e.id for e in made if isinstance(e, Entry)]
    assert len(ids) == 1200
    wanted = [*ids[::2], "missing", ids[1]]
    found = store.get_entries(wanted)
    assert sorted(e.id for e in found) == sorted({*ids[::2], ids[1]})
    assert {e.id: e for e in found}[ids[1]] == store.get_entry(ids[1])
    assert store.get_entries([]) == []


def test_join_tokens_are_single_use(store: DataStore) -> None:
    store.create_join_token(JoinToken("t", b"h" * 32, NOW + 60))
    admitted = AttestedAgent(AGENT, "join_token", "1", NOW + 3600)
    assert not store.check_join_token("t", b"g" * 32, NOW)
    assert not store.admit_agent(admitted, TokenUse("t", b"g" * 32), NOW)
    assert store.list_agents() == []
    assert store.check_join_token("t", b"h" * 32, NOW)
    assert store.admit_agent(admitted, TokenUse("t", b"h" * 32), NOW)
    assert store.list_agents() == [admitted]
    assert not store.check_join_token("t", b"h" * 32, NOW)
    assert not store.admit_agent(admitted, TokenUse("t", b"h" * 32), NOW)
    store.create_join_token(JoinToken("old", b"h" * 32, NOW))
    assert store.prune_join_tokens(NOW) == 1


def test_agents_keep_a_ban(store: DataStore) -> None:
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
    store.set_agent_banned(AGENT, True)
    # A first admission of the agent that read no record (it began before the one banned),
    # saved after the ban: refused, not an overwrite of the banned record.
    with pytest.raises(AgentReplacedError, match=AGENT):
        store.upsert_agent(AttestedAgent(AGENT, "join_token", "2", NOW + 3600))
    store.create_join_token(JoinToken("t", b"h" * 32, NOW + 60))
    with pytest.raises(AgentReplacedError, match=AGENT):
        store.admit_agent(
            AttestedAgent(AGENT, "join_token", "3", NOW + 3600), TokenUse("t", b"h" * 32), NOW
        )
    assert store.check_join_token("t", b"h" * 32, NOW)  # its spend rolled back
    assert store.get_agent(AGENT).banned
    assert [a.serial for a in store.list_agents()] == ["1"]
    store.delete_agent(AGENT)
    with pytest.raises(NotFoundError):
        store.get_agent(AGENT)


def test_agents_expired_long_ago_are_pruned_but_a_ban_or_a_removal_holds(
    open_store: Opener,
) -> None:
    """Expired (current and previous SVID) before the bound: gone, each named in the change
    feed. A banned agent stays (a new attestation under its ID must still be refused), and so
    does one whose removal is stored (its finisher has work to do)."""
    store = open_store()
    old = NOW - 10
    for name in ("gone-1", "gone-2", "banned", "removing"):
        store.upsert_agent(AttestedAgent(f"{AGENT}-{name}", "join_token", "1", old))
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", old, previous_expires_at=NOW))
    store.upsert_agent(AttestedAgent(OTHER_AGENT, "join_token", "1", NOW))
    ban = Removal(f"{AGENT}-banned", REMOVAL_BANNED, old)
    store.set_agent_banned(ban.agent_id, True, ban)
    store.end_removal(ban)  # the ban outlives its removal
    removing = Removal(f"{AGENT}-removing", REMOVAL_EVICTED, old)
    store.set_agent_banned(removing.agent_id, False, removing)
    head = store.feed_head()

    assert store.prune_agents(NOW) == [f"{AGENT}-gone-1", f"{AGENT}-gone-2"]
    assert [a.spiffe_id for a in store.list_agents()] == [
        AGENT,
        f"{AGENT}-banned",
        f"{AGENT}-removing",
        OTHER_AGENT,
    ]
    assert {i.key for i in store.feed_since(head, 10)} == {f"{AGENT}-gone-1", f"{AGENT}-gone-2"}
    assert store.prune_agents(NOW) == []
    assert store.feed_head() == head + 2


def test_a_prune_of_more_agents_than_a_batch_removes_them_all_a_batch_per_transaction(
    store: DataStore,
) -> None:
    """A large fleet's first prune does not hold every row it deletes (and the feed's counter)
    in one long transaction: it commits a batch at a time, each batch its own revision, and
    names every agent it removed, in the feed and in its answer."""
    old = NOW - 10
    names = [f"{AGENT}-{n:02d}" for n in range(25)]
    for name in names:
        store.upsert_agent(AttestedAgent(name, "join_token", "1", old))
    store.upsert_agent(AttestedAgent(OTHER_AGENT, "join_token", "1", NOW))
    revision, head = store.revision(), store.feed_head()

    assert store.prune_agents(NOW, batch=10) == names
    assert [a.spiffe_id for a in store.list_agents()] == [OTHER_AGENT]
    assert store.revision() == revision + 3  # 10 + 10 + 5: three transactions
    assert sorted(i.key for i in store.feed_since(head, 100)) == names
    assert store.prune_agents(NOW, batch=10) == []
    assert store.revision() == revision + 3


def test_a_batched_prune_past_live_agents_and_mixed_case_names_misses_none(
    store: DataStore,
) -> None:
    """Each batch starts past the last ID the one before deleted: live agents between the
    stale ones, and names a database collation orders otherwise than Python does (case,
    accents), are neither pruned nor make a stale one be skipped."""
    old = NOW - 10
    stems = ["a", "B", "c", "D", "e", "\u00e9", "F", "g", "H", "i", "J", "k", "L"]
    stale = [f"{AGENT}-{stem}-{n}" for n, stem in enumerate(stems)]
    live = [f"{AGENT}-{stem}-{n}-live" for n, stem in enumerate(stems)]
    for name in stale:
        store.upsert_agent(AttestedAgent(name, "join_token", "1", old))
    for name in live:
        store.upsert_agent(AttestedAgent(name, "join_token", "1", NOW + 3600))

    assert store.prune_agents(NOW, batch=2) == sorted(stale)
    assert sorted(a.spiffe_id for a in store.list_agents()) == sorted(live)


def test_tasks_over_are_pruned_by_their_expiry_in_their_state(store: DataStore) -> None:
    """Only the state asked for and an expiry before the bound: an active task, or one whose
    end is under way, stays however old."""
    admit(store)
    store.put_task(task("ended", state="ended", expires_at=NOW - 1))
    store.put_task(task("ended-late", state="ended", expires_at=NOW))
    store.put_task(task("ending", state="ending", expires_at=NOW - 1))
    store.put_task(task("active", expires_at=NOW - 1))
    assert store.prune_tasks("ended", NOW) == 1
    assert store.prune_tasks("ended", NOW) == 0
    assert [t.task_id for t in store.list_tasks()] == ["active", "ended-late", "ending"]


def test_a_removal_is_stored_with_the_agents_delete_or_ban_until_it_ends(
    open_store: Opener,
) -> None:
    store = open_store()
    for agent_id in (AGENT, OTHER_AGENT):
        store.upsert_agent(AttestedAgent(agent_id, "join_token", "1", NOW + 3600))
    evicted = Removal(AGENT, REMOVAL_EVICTED, NOW)
    banned = Removal(OTHER_AGENT, REMOVAL_BANNED, NOW + 5)
    store.delete_agent(AGENT, evicted)
    store.set_agent_banned(OTHER_AGENT, True, banned)
    # Durable with the delete and the ban: a restart finds them.
    store = open_store()
    assert store.removal_of(AGENT) == evicted
    assert store.removal_of(RUNTIME) is None
    assert store.list_removals(NOW + 5) == [evicted, banned]  # oldest first
    assert store.list_removals(NOW + 4) == [evicted]
    assert store.list_removals(NOW - 1) == []
    # Only a removal of the agent written: a refused delete or ban stores none.
    with pytest.raises(NotFoundError):
        store.delete_agent(AGENT, Removal(AGENT, REMOVAL_EVICTED, NOW + 1))
    with pytest.raises(ValueError, match="removal of"):
        store.set_agent_banned(OTHER_AGENT, True, Removal(AGENT, REMOVAL_BANNED, NOW + 1))
    assert store.list_removals(2**62) == [evicted, banned]


def test_an_agent_save_with_the_record_read_replaces_only_that_record(store: DataStore) -> None:
    """The compare-and-swap a renewal or a re-attestation saves with: the record read is
    replaced while it is still stored; evicted and admitted again, renewed by another server,
    or banned meanwhile, nothing is written (a join token's spend rolled back with it)."""
    read = AttestedAgent(AGENT, "x509pop", "1", NOW + 3600, attested_at=NOW)
    store.upsert_agent(read)
    renewed = read.renewed("2", NOW + 7200, "1")
    store.upsert_agent(renewed, read)
    assert store.get_agent(AGENT) == renewed
    # Retried after its answer was lost, through a server whose copy still shows the record
    # read before that renewal: the same admission, carrying a certificate still the
    # record's (its previous), so it goes through.
    retried = read.renewed("3", NOW + 7200, "1")
    store.upsert_agent(retried, read)
    assert store.get_agent(AGENT) == retried
    # Carrying a certificate the record no longer holds (2 was replaced by that retry): stale.
    with pytest.raises(AgentReplacedError, match=AGENT):
        store.upsert_agent(renewed.renewed("x", NOW + 7200, "2"), renewed)
    assert store.get_agent(AGENT) == retried
    # Evicted, then attested again with a new serial (the attack-node race).
    store.delete_agent(AGENT)
    again = AttestedAgent(AGENT, "x509pop", "4", NOW + 3600, attested_at=NOW + 10)
    store.upsert_agent(again)
    with pytest.raises(AgentReplacedError):
        store.upsert_agent(renewed.renewed("5", NOW + 7200, "2"), renewed)
    # Attested again with the same serial number is another admission all the same.
    with pytest.raises(AgentReplacedError):
        store.upsert_agent(again, replace(again, attested_at=NOW))
    store.create_join_token(JoinToken("t", b"h" * 32, NOW + 60))
    with pytest.raises(AgentReplacedError):
        store.admit_agent(replace(again, serial="6"), TokenUse("t", b"h" * 32), NOW, renewed)
    assert store.check_join_token("t", b"h" * 32, NOW)
    assert store.get_agent(AGENT) == again
    # Evicted and not back: nothing to replace, and nothing inserted.
    store.delete_agent(AGENT)
    with pytest.raises(AgentReplacedError):
        store.upsert_agent(again.renewed("7", NOW + 7200, "4"), again)
    assert store.list_agents() == []
    # Banned meanwhile: the ban stands.
    store.upsert_agent(again)
    store.set_agent_banned(AGENT, True)
    with pytest.raises(AgentReplacedError):
        store.upsert_agent(again.renewed("8", NOW + 7200, "4"), again)
    assert store.get_agent(AGENT) == replace(again, banned=True)
    # The token admission whose record is still the one read goes through.
    store.upsert_agent(AttestedAgent(OTHER_AGENT, "join_token", "1", NOW + 3600))
    other = store.get_agent(OTHER_AGENT)
    admitted = replace(other, serial="9", previous_serial="1", previous_expires_at=NOW + 3600)
    assert store.admit_agent(admitted, TokenUse("t", b"h" * 32), NOW, other)
    assert store.get_agent(OTHER_AGENT) == admitted


def test_an_adopted_certificate_replaces_only_the_serial_read(store: DataStore) -> None:
    read = AttestedAgent(AGENT, "join_token", "1", NOW + 600, attested_at=NOW - 60)
    store.upsert_agent(read)
    revision, feed = store.revision(), store.feed_head()
    adopted = read.adopted("3", NOW + 3600)
    assert store.adopt_agent_certificate(adopted, read)
    assert store.get_agent(AGENT) == adopted
    assert (store.revision(), store.feed_head()) == (revision + 1, feed + 1)
    # Renewed since: the serial read is only its previous one now, and the renewal stands.
    renewed = adopted.renewed("4", NOW + 7200, "3")
    store.upsert_agent(renewed, adopted)
    assert not store.adopt_agent_certificate(adopted.adopted("5", NOW + 3600), adopted)
    assert store.get_agent(AGENT) == renewed
    # Attested again (same serial, another admission), banned, evicted: nothing written.
    again = replace(renewed, attested_at=renewed.attested_at + 1)
    store.upsert_agent(again, renewed)
    assert not store.adopt_agent_certificate(renewed.adopted("6", NOW + 3600), renewed)
    store.set_agent_banned(AGENT, True)
    assert not store.adopt_agent_certificate(again.adopted("7", NOW + 3600), again)
    store.delete_agent(AGENT)
    assert not store.adopt_agent_certificate(again.adopted("8", NOW + 3600), again)
    assert store.list_agents() == []
    assert store.feed_head() == feed + 5  # the renewal, re-attestation, ban and eviction's


def test_concurrent_adoptions_of_one_record_have_one_winner(open_store: Opener) -> None:
    # One store object per server: separate connections, as separate servers have.
    stores = [open_store() for _ in range(4)]
    read = AttestedAgent(AGENT, "join_token", "1", NOW + 600)
    stores[0].upsert_agent(read)
    barrier = threading.Barrier(len(stores))
    won: list[str] = []

    def adopt(k: int) -> None:
        barrier.wait()
        if stores[k].adopt_agent_certificate(read.adopted(f"n{k}", NOW + 3600), read):
            won.append(f"n{k}")

    threads = [threading.Thread(target=adopt, args=(k,)) for k in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert stores[0].get_agent(AGENT).serial == won[0]


def test_the_newest_feed_row_is_the_time_of_the_last_write_named(store: DataStore) -> None:
    assert store.newest_feed_at() is None
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 600))
    assert store.newest_feed_at() == NOW  # the store's clock
    store.prune_feed(NOW)
    assert store.newest_feed_at() == NOW
    store.prune_feed(NOW + 1)
    assert store.newest_feed_at() is None


def test_an_agent_under_removal_is_neither_admitted_nor_saved(store: DataStore) -> None:
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
    store.upsert_agent(AttestedAgent(OTHER_AGENT, "join_token", "1", NOW + 3600))
    evicted = Removal(AGENT, REMOVAL_EVICTED, NOW)
    store.delete_agent(AGENT, evicted)
    store.set_agent_banned(OTHER_AGENT, True, Removal(OTHER_AGENT, REMOVAL_BANNED, NOW))
    back = AttestedAgent(AGENT, "join_token", "2", NOW + 3600)
    store.create_join_token(JoinToken("t", b"h" * 32, NOW + 60))
    revision = store.revision()
    with pytest.raises(RemovalUnderWayError, match=AGENT):
        store.admit_agent(back, TokenUse("t", b"h" * 32), NOW)
    with pytest.raises(RemovalUnderWayError):
        store.upsert_agent(back)
    # A renewal of the banned agent: its ban refuses it, removal or not.
    read = AttestedAgent(OTHER_AGENT, "join_token", "1", NOW + 3600)
    with pytest.raises(AgentReplacedError):
        store.upsert_agent(read.renewed("2", NOW + 3600, "1"), read)
    # Nothing written: the token unspent, no agent back, the banned one as it was.
    assert store.check_join_token("t", b"h" * 32, NOW)
    assert [(a.spiffe_id, a.serial) for a in store.list_agents()] == [(OTHER_AGENT, "1")]
    assert store.revision() == revision
    # Once the removal ends, the agent may come back.
    assert store.end_removal(evicted)
    assert store.admit_agent(back, TokenUse("t", b"h" * 32), NOW)
    assert store.get_agent(AGENT) == back


def test_a_removal_is_claimed_by_one_finisher_at_a_time_until_its_claim_lapses(
    open_store: Opener,
) -> None:
    store = open_store()
    assert not store.claim_removal(AGENT, "a", NOW, 30)  # no removal stored: nothing to claim
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
    banned = Removal(AGENT, REMOVAL_BANNED, NOW)
    store.set_agent_banned(AGENT, True, banned)
    with pytest.raises(ValueError, match="ttl"):
        store.claim_removal(AGENT, "a", NOW, 0)
    assert store.claim_removal(AGENT, "a", NOW, 30)
    assert not store.claim_removal(AGENT, "b", NOW + 19, 30)  # a's claim runs
    # Evicted while a finishes the ban: the newer removal stays a's to finish (its claim,
    # across a restart too).
    evicted = Removal(AGENT, REMOVAL_EVICTED, NOW + 10)
    store.delete_agent(AGENT, evicted)
    store = open_store()
    # Not at the claim's last second: a store opened later may count the database's clock a
    # second on from the first one's (each rounds its measure of it; a hand-moved clock stands
    # still while the database's runs). The boundaries below are all of this store's writes.
    assert not store.claim_removal(AGENT, "b", NOW + 20, 30)
    assert store.removal_of(AGENT) == evicted
    assert store.claim_removal(AGENT, "a", NOW + 20, 30)  # renewed, until NOW + 50
    assert not store.claim_removal(AGENT, "b", NOW + 49, 30)
    # a died: its claim lapses and b takes it over; a, back, cannot take it again.
    assert store.claim_removal(AGENT, "b", NOW + 50, 30)
    assert not store.claim_removal(AGENT, "a", NOW + 51, 30)
    store.release_removal_claim(AGENT, "a")  # not a's: left as it is
    assert not store.claim_removal(AGENT, "a", NOW + 51, 30)
    store.release_removal_claim(AGENT, "b")  # b failed: free at once
    assert store.claim_removal(AGENT, "a", NOW + 51, 30)
    assert store.end_removal(evicted)
    assert not store.claim_removal(AGENT, "a", NOW + 52, 30)


def test_a_renewal_keeps_a_removal_claim_only_while_no_one_else_took_it(
    open_store: Opener,
) -> None:
    """A finisher's renewal keeps its claim, lapsed too if no one took it meanwhile; never one
    another holder took since, even let go (released, or lapsed as its server died): taken
    back, the finisher's write in flight would commit beside what that holder logged."""
    store = open_store()
    assert not store.renew_removal_claim(AGENT, "a", NOW, 30)  # nothing stored
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
    store.delete_agent(AGENT, Removal(AGENT, REMOVAL_EVICTED, NOW))
    with pytest.raises(ValueError, match="ttl"):
        store.renew_removal_claim(AGENT, "a", NOW, 0)
    assert not store.renew_removal_claim(AGENT, "a", NOW, 30)  # never claimed: not a's
    assert store.claim_removal(AGENT, "a", NOW, 30)
    assert store.renew_removal_claim(AGENT, "a", NOW + 20, 30)  # until NOW + 50
    assert not store.claim_removal(AGENT, "b", NOW + 49, 30)
    assert store.renew_removal_claim(AGENT, "a", NOW + 60, 30)  # lapsed, no one took it
    assert not store.claim_removal(AGENT, "b", NOW + 89, 30)
    assert store.claim_removal(AGENT, "b", NOW + 90, 30)  # a stalled: b takes it over
    assert not store.renew_removal_claim(AGENT, "a", NOW + 91, 30)
    store.release_removal_claim(AGENT, "b")  # b failed
    assert not store.renew_removal_claim(AGENT, "a", NOW + 92, 30)
    assert store.claim_removal(AGENT, "c", NOW + 92, 30)
    assert not store.renew_removal_claim(AGENT, "a", NOW + 200, 30)  # c died: still not a's
    assert store.renew_removal_claim(AGENT, "c", NOW + 200, 30)


def test_a_ledger_write_holding_a_removal_claim_commits_only_while_it_is_held(
    store: DataStore,
) -> None:
    """A finisher's events commit only while it holds the removal's claim: taken over by
    another finisher, or the removal finished, nothing of the write is kept."""
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
    evicted = Removal(AGENT, REMOVAL_EVICTED, NOW)
    store.delete_agent(AGENT, evicted)
    a, b = RemovalClaim(AGENT, "a"), RemovalClaim(AGENT, "b")
    with pytest.raises(RemovalClaimLostError, match=AGENT):  # not claimed yet
        store.write_ledger([], audit_rows(1, 1), claims=[a])
    assert store.claim_removal(AGENT, "a", NOW, 30)
    store.write_ledger([], audit_rows(1, 1), claims=[a])
    assert store.claim_removal(AGENT, "b", NOW + 30, 30)  # a's lapsed: b takes it over
    with pytest.raises(RemovalClaimLostError) as lost:
        store.write_ledger([], audit_rows(2, 1, f"{1:064x}"), claims=[a])
    assert lost.value.agents == {AGENT}
    assert store.audit_head() == Head(1, f"{1:064x}")
    store.write_ledger([], audit_rows(2, 1, f"{1:064x}"), claims=[b])
    assert store.end_removal(evicted)
    with pytest.raises(RemovalClaimLostError):  # finished: no claim stands
        store.write_ledger([], audit_rows(3, 1, f"{2:064x}"), claims=[b])
    assert store.audit_head() == Head(2, f"{2:064x}")


def test_a_ledger_write_stores_its_tasks_with_its_events_or_neither(store: DataStore) -> None:
    head = store.feed_head()
    with pytest.raises(ChainMovedError):  # the events refused: the task is not kept either
        store.write_ledger([], audit_rows(2, 1), tasks=[task("t1")])
    assert store.get_task("t1") is None
    assert store.feed_head() == head
    store.write_ledger([], audit_rows(1, 1), tasks=[task("t1"), task("t2")])
    assert store.get_task("t1") == task("t1")
    assert store.get_task("t2") == task("t2")
    assert [i.key for i in store.feed_since(head, 10)] == ["t1", "t2"]
    assert store.audit_head() == Head(1, f"{1:064x}")


def test_what_an_older_removal_left_is_stored_as_a_removal_only_for_an_agent_gone(
    store: DataStore,
) -> None:
    older = Removal(AGENT, REMOVAL_EVICTED, NOW)
    assert store.resume_removal(older)
    assert store.removal_of(AGENT) == older
    assert not store.resume_removal(Removal(AGENT, REMOVAL_EVICTED, NOW + 5))  # one stored
    assert store.removal_of(AGENT) == older
    store.upsert_agent(AttestedAgent(OTHER_AGENT, "join_token", "1", NOW + 3600))
    assert not store.resume_removal(Removal(OTHER_AGENT, REMOVAL_EVICTED, NOW))  # admitted
    assert store.removal_of(OTHER_AGENT) is None


def test_one_of_several_finishers_claiming_a_removal_at_once_gets_it(
    open_store: Opener,
) -> None:
    store = open_store()
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
    store.delete_agent(AGENT, Removal(AGENT, REMOVAL_EVICTED, NOW))
    stores = [open_store() for _ in range(4)]  # one per server
    start = threading.Barrier(len(stores))
    got: list[bool] = []

    def claim(one: DataStore, holder: str) -> None:
        start.wait()
        got.append(one.claim_removal(AGENT, holder, NOW, 30))

    threads = [
        threading.Thread(target=claim, args=(one, f"server-{i}")) for i, one in enumerate(stores)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(got) == [False, False, False, True]


def test_ending_a_removal_leaves_a_newer_one_of_the_agent(store: DataStore) -> None:
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
    first = Removal(AGENT, REMOVAL_BANNED, NOW)
    store.set_agent_banned(AGENT, True, first)
    newer = Removal(AGENT, REMOVAL_BANNED, NOW + 9)  # banned again: it replaces the first
    store.set_agent_banned(AGENT, True, newer)
    assert store.list_removals(2**62) == [newer]
    assert not store.end_removal(first)  # a finisher of the first, late
    assert store.removal_of(AGENT) == newer
    assert store.end_removal(newer)
    assert not store.end_removal(newer)
    assert store.list_removals(2**62) == []


def test_key_slots_bundle_and_revocations(store: DataStore) -> None:
    slot = KeySlot("s1", "jwt", "active", b"der", "kid", NOW, NOW + 10, NOW)
    store.save_key_slot(slot)
    assert store.list_key_slots("jwt") == [slot]
    store.delete_key_slot("s1")
    store.delete_key_slot("s1")
    assert store.list_key_slots("jwt") == []
    before = store.revision()
    assert store.next_bundle_sequence() == store.bundle_sequence() == 1
    store.add_revocations([Revocation("jwt_id", "j", RUNTIME, NOW, "r", NOW)])
    assert [r.value for r in store.list_revocations()] == ["j"]
    assert store.revision() == before + 2
    assert store.prune_revocations(NOW + int(MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW) + 1) == 1


def test_a_bundle_sequence_bump_is_named_in_the_change_feed(store: DataStore) -> None:
    """The lease holder journals its new slots, then numbers the bundle: a server that read
    the feed between the two has the new slots under the old number, and reads the number
    only when the feed names it again."""
    store.save_key_slot(KeySlot("s1", "jwt", "active", b"der", "kid", NOW, NOW + 10, NOW))
    after_save = store.feed_head()
    sequence = store.next_bundle_sequence()
    assert [(i.kind, i.key) for i in store.feed_since(after_save, 10)] == [
        (FEED_KEY_SLOT, FEED_BUNDLE_SEQUENCE)
    ]
    assert store.bundle_sequence() == sequence


def test_key_slots_are_deleted_together(store: DataStore) -> None:
    """An operator's forget of lost keys (server/cli_ca.py) drops several slots in one
    transaction; the change feed names each one that was there."""
    for slot_id, kind in (("a", "x509"), ("b", "x509"), ("c", "jwt")):
        store.save_key_slot(KeySlot(slot_id, kind, "active", b"der", slot_id, NOW, NOW + 10, NOW))
    after_saves = store.feed_head()
    store.delete_key_slots(["a", "c", "absent"])
    assert [s.slot_id for s in store.list_key_slots("x509")] == ["b"]
    assert store.list_key_slots("jwt") == []
    assert [i.key for i in store.feed_since(after_saves, 100)] == ["a", "c"]


def test_an_x509_serial_keeps_the_ca_that_issued_it(open_store: Opener) -> None:
    """Recorded with the credential and with its revocation, across a restart: the CRLs list
    a serial only under its issuer (server.tasks.crl)."""
    store = admit(open_store())
    issued = Credential("x509_serial", "7b", AGENT, RUNTIME, "", NOW + 300, "5ca1ab1e")
    store.write_ledger([issued, cred("j1")], [])
    store.add_revocations(
        [
            Revocation("x509_serial", "7b", RUNTIME, NOW + 300, "r", NOW, "5ca1ab1e"),
            Revocation("jwt_id", "j1", RUNTIME, NOW + 300, "r", NOW),
        ]
    )
    again = open_store()
    assert {(c.value, c.issuer) for c in again.agent_credentials(AGENT, NOW)} == {
        ("7b", "5ca1ab1e"),
        ("j1", ""),
    }
    assert [(r.value, r.issuer) for r in again.list_revocations()] == [
        ("j1", ""),
        ("7b", "5ca1ab1e"),
    ]


def test_a_key_slot_keeps_its_sealed_key(open_store: Opener) -> None:
    store = open_store()
    plain = KeySlot("p", "x509", "active", b"cert", "kid-p", NOW, NOW + 10, NOW)
    sealed = KeySlot("s", "x509", "prepared", b"cert2", "kid-s", NOW + 1, NOW + 11, NOW, b"\0sk")
    store.save_key_slot(plain)
    store.save_key_slot(sealed)
    assert store.list_key_slots("x509") == [plain, sealed]
    store.save_key_slot(KeySlot("s", "x509", "active", b"cert2", "kid-s", NOW + 1, NOW + 11, NOW))
    store.save_key_slot(replace(plain, sealed_key=b"later"))  # an existing key gets sealed
    store.close()
    again = open_store()
    assert [(s.slot_id, s.sealed_key) for s in again.list_key_slots("x509")] == [
        ("p", b"later"),
        ("s", b""),
    ]


def test_a_lease_has_one_holder_until_it_expires(store: DataStore) -> None:
    assert store.acquire_lease("ca-rotation", "a", NOW, 30)
    assert not store.acquire_lease("ca-rotation", "b", NOW + 29, 30)
    assert store.acquire_lease("ca-rotation", "a", NOW + 29, 30)  # renewed: until NOW + 59
    assert not store.acquire_lease("ca-rotation", "b", NOW + 58, 30)
    assert store.acquire_lease("other-job", "b", NOW + 58, 30)  # names are independent
    assert store.acquire_lease("ca-rotation", "b", NOW + 59, 30)  # expired: taken over
    assert not store.acquire_lease("ca-rotation", "a", NOW + 60, 30)
    with pytest.raises(ValueError, match="ttl"):
        store.acquire_lease("ca-rotation", "b", NOW, 0)


def test_a_key_slot_write_by_a_holder_that_lost_its_lease_is_refused(open_store: Opener) -> None:
    """Two servers on one datastore. The ca-rotation holder paused past the lease's life
    between taking it and journaling its rotation: the other took the lease over and journaled
    its own, and the first one's slot landed beside it (a second prepared key, a drop of the
    new holder's). Each key-slot write checks the lease in its own transaction."""
    a, b = open_store(), open_store()

    def slot(slot_id: str) -> KeySlot:
        return KeySlot(slot_id, "x509", "prepared", b"der", slot_id, NOW, NOW + 600, NOW)

    def fence(holder: str, now: int) -> LeaseFence:
        return LeaseFence("ca-rotation", holder, now)

    assert a.acquire_lease("ca-rotation", "a", NOW, 30)
    a.save_key_slot(slot("a1"), fence=fence("a", NOW + 28))  # held: written
    # a pauses; its lease lapses and b takes it over and journals.
    assert b.acquire_lease("ca-rotation", "b", NOW + 32, 30)
    b.save_key_slot(slot("b1"), fence=fence("b", NOW + 32))
    head = b.feed_head()
    with pytest.raises(LeaseLostError, match="ca-rotation"):
        a.save_key_slot(slot("a2"), fence=fence("a", NOW + 32))
    with pytest.raises(LeaseLostError):
        a.delete_key_slot("b1", fence=fence("a", NOW + 32))
    with pytest.raises(LeaseLostError):
        a.delete_key_slots(["a1", "b1"], fence=fence("a", NOW + 32))
    sequence = b.bundle_sequence()
    with pytest.raises(LeaseLostError):  # numbering its stale slots above b's bundle
        a.next_bundle_sequence(fence=fence("a", NOW + 32))
    assert [s.slot_id for s in b.list_key_slots("x509")] == ["a1", "b1"]
    assert b.bundle_sequence() == sequence
    assert b.feed_head() == head  # nothing written, nothing fed
    assert b.next_bundle_sequence(fence=fence("b", NOW + 32)) == sequence + 1
    # Lapsed with no one else holding it: refused too (the holder renews first).
    with pytest.raises(LeaseLostError):
        b.save_key_slot(slot("b2"), fence=fence("b", NOW + 64))
    b.delete_key_slot("a1")  # unfenced writes (a lone server, an operator's forget) go on
    assert [s.slot_id for s in a.list_key_slots("x509")] == ["b1"]


def test_releasing_a_lease_frees_it_only_for_its_holder(store: DataStore) -> None:
    assert store.acquire_lease("ca-rotation", "a", NOW, 30)
    store.release_lease("ca-rotation", "b")  # not b's: nothing happens
    assert not store.acquire_lease("ca-rotation", "b", NOW, 30)
    store.release_lease("ca-rotation", "a")
    store.release_lease("ca-rotation", "a")
    assert store.acquire_lease("ca-rotation", "b", NOW, 30)


def test_concurrent_callers_for_a_free_lease_get_one_grant(open_store: Opener) -> None:
    # One store object per caller: separate connections, as separate servers have.
    stores = [open_store() for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    granted: list[str] = []

    def take(k: int) -> None:
        barrier.wait()
        if stores[k].acquire_lease("ca-rotation", f"server-{k}", NOW, 30):
            granted.append(f"server-{k}")

    threads = [threading.Thread(target=take, args=(k,)) for k in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 1
    assert all(not s.acquire_lease("ca-rotation", "late", NOW + 1, 30) for s in stores)


# -- OAuth assertion replay ---------------------------------------------------------------------


def test_a_jti_is_claimed_once_until_it_expires(store: DataStore) -> None:
    """Held through its expiry plus MAX_CLOCK_SKEW by the clock of the server asking: another
    server whose clock runs behind may still take the assertion."""
    iss = "spiffe://example.org"
    skew = int(MAX_CLOCK_SKEW)
    claims = [JtiClaim(iss, "a", NOW + 60), JtiClaim(iss, "b", NOW + 5), JtiClaim(iss, "a", NOW)]
    assert store.claim_jtis(claims, NOW) == [True, True, False]  # a repeat in the batch too
    assert store.claim_jtis([JtiClaim("other-issuer", "a", NOW + 60)], NOW) == [True]
    assert store.claim_jtis([JtiClaim(iss, "b", NOW + 60)], NOW + 4 + skew) == [False]
    assert store.claim_jtis([JtiClaim(iss, "b", NOW + 60)], NOW + 5 + skew) == [True]  # gone
    assert store.prune_jtis(NOW + 59 + skew) == 0
    assert store.prune_jtis(NOW + 60 + skew) == 3
    assert store.claim_jtis([JtiClaim(iss, "a", NOW + 90)], NOW + 61) == [True]


def test_a_ledger_write_claims_its_jtis_with_the_rest_or_nothing(open_store: Opener) -> None:
    """The token endpoint's one commit: a token's record, its event and the claim of the
    assertion it was issued for. A held jti (here: held through another store on the same
    database, as another server would) keeps the whole write out."""
    store, other = admit(open_store()), open_store()
    iss = "spiffe://example.org"
    store.write_ledger([cred("t1")], audit_rows(1, 1), [JtiClaim(iss, "a", NOW + 60)], NOW)
    assert store.claim_jtis([JtiClaim(iss, "a", NOW + 60)], NOW) == [False]
    with pytest.raises(JtiHeldError) as held:
        other.write_ledger(
            [cred("t2")],
            audit_rows(2, 1, prev=f"{1:064x}"),
            [JtiClaim(iss, "b", NOW + 60), JtiClaim(iss, "a", NOW + 60)],
            NOW,
        )
    assert held.value.held == {(iss, "a")}
    assert "'a'" in str(held.value)
    assert [c.value for c in store.agent_credentials(AGENT, NOW)] == ["t1"]
    assert store.audit_head() == Head(1, f"{1:064x}")
    assert other.claim_jtis([JtiClaim(iss, "b", NOW + 60)], NOW) == [True]  # b was not kept
    with pytest.raises(JtiHeldError):  # a repeat within one write is a replay too
        store.write_ledger([], [], [JtiClaim(iss, "c", NOW + 9)] * 2, NOW)
    # Past its expiry (and the skew) a jti may be claimed again; without jtis nothing changes.
    gone = NOW + 60 + int(MAX_CLOCK_SKEW)
    store.write_ledger([cred("t3")], [], [JtiClaim(iss, "a", NOW + 90)], gone)
    store.write_ledger([cred("t4")], [])
    assert len(store.agent_credentials(AGENT, NOW)) == 3


def _remove(store: DataStore, how: str) -> None:
    """AGENT no longer admitted, in one of the ways a removal leaves it."""
    if how == "evicted":
        store.delete_agent(AGENT, Removal(AGENT, REMOVAL_EVICTED, NOW))
    elif how == "banned":
        store.set_agent_banned(AGENT, True, Removal(AGENT, REMOVAL_BANNED, NOW))
    elif how == "deleted, its removal finished":
        store.delete_agent(AGENT)
    else:  # unbanned, its removal (revocations of what it held) not finished yet
        store.set_agent_banned(AGENT, True, Removal(AGENT, REMOVAL_BANNED, NOW))
        store.set_agent_banned(AGENT, False)


@pytest.mark.parametrize(
    "how", ["evicted", "banned", "deleted, its removal finished", "removal under way"]
)
def test_a_removed_agents_credentials_are_refused_with_the_whole_ledger_write(
    store: DataStore, how: str
) -> None:
    """A grant decided before the agent's removal committed, written after: the removal's
    revocations read the agent's credentials already, so the write must keep nothing."""
    admit(store, AGENT, OTHER_AGENT)
    store.write_ledger([cred("before")], audit_rows(1, 1))
    head = store.audit_head()
    _remove(store, how)
    iss = "spiffe://example.org"
    with pytest.raises(AgentRemovedError) as refused:
        store.write_ledger(
            [cred("other", agent=OTHER_AGENT), cred("late"), cred("foreign", agent="")],
            audit_rows(2, 3, prev=f"{1:064x}"),
            [JtiClaim(iss, "a", NOW + 60)],
            NOW,
        )
    assert refused.value.agents == {AGENT}  # the neighbour's agent is not named
    assert AGENT in str(refused.value)
    assert isinstance(refused.value, StorageError)
    # Nothing of it: no credential, no event, the head and the jti as they were.
    assert [c.value for c in store.agent_credentials(AGENT, NOW)] == ["before"]
    assert store.agent_credentials(OTHER_AGENT, NOW) == []
    assert store.audit_head() == head
    assert [r["seq"] for r in store.audit_rows()] == [1]
    assert store.claim_jtis([JtiClaim(iss, "a", NOW + 60)], NOW) == [True]
    # Without the removed agent's credential the rest goes in; events alone are of no agent.
    store.write_ledger(
        [cred("other", agent=OTHER_AGENT), cred("foreign", agent="")],
        audit_rows(2, 3, prev=f"{1:064x}"),
    )
    assert [c.value for c in store.agent_credentials(OTHER_AGENT, NOW)] == ["other"]
    assert store.audit_head() == Head(4, f"{4:064x}")


def test_a_delegated_token_of_a_removed_acting_agent_is_refused(store: DataStore) -> None:
    """A delegated token is revoked with its acting workload's agent too (its second holder):
    once that agent is removed, a write of one is refused as its own agent's would be."""
    admit(store, AGENT, OTHER_AGENT)
    delegated = cred("delegated")._replace(actor_agent_id=OTHER_AGENT)
    store.write_ledger([delegated], [])
    store.delete_agent(OTHER_AGENT, Removal(OTHER_AGENT, REMOVAL_EVICTED, NOW))
    with pytest.raises(AgentRemovedError) as refused:
        store.write_ledger([cred("late")._replace(actor_agent_id=OTHER_AGENT)], [])
    assert refused.value.agents == {OTHER_AGENT}
    assert [c.value for c in store.agent_credentials(AGENT, NOW)] == ["delegated"]
    store.write_ledger([cred("own")], [])  # the task's agent still admitted for its own
    assert [c.value for c in store.agent_credentials(AGENT, NOW)] == ["delegated", "own"]


def test_credentials_of_an_agent_never_admitted_are_refused(store: DataStore) -> None:
    with pytest.raises(AgentRemovedError) as refused:
        store.write_ledger([cred("j1"), cred("j2", agent=OTHER_AGENT)], [])
    assert refused.value.agents == {AGENT, OTHER_AGENT}
    assert store.agent_credentials(AGENT, NOW) == []


@pytest.mark.parametrize("how", ["ending", "ended", "revoked", "expired", "never stored"])
def test_an_ended_tasks_credentials_are_refused_with_the_whole_ledger_write(
    store: DataStore, how: str
) -> None:
    """A task credential decided before the task's end was claimed (its row out of 'active',
    through any server), written after: the end reads the task's credentials to revoke them
    once its claim committed, so the write must keep nothing; others' writes go on."""
    admit(store, AGENT, OTHER_AGENT, tasks=["t1", "t2"])
    store.write_ledger([cred("before", task_id="t1")], audit_rows(1, 1))
    head = store.audit_head()
    if how != "never stored":
        # The end's claim (TaskStore.finish), or the row as an end settled it.
        assert store.swap_task(task("t1", state=how), "active")
    iss = "spiffe://example.org"
    late = cred("late", task_id="t1")
    others = [cred("t2-own", task_id="t2"), cred("workload"), cred("x", agent=OTHER_AGENT)]
    with pytest.raises(TaskEndedMeanwhileError) as refused:
        store.write_ledger(
            [*others, late] if how != "never stored" else [*others, late._replace(task_id="t9")],
            audit_rows(2, 3, prev=f"{1:064x}"),
            [JtiClaim(iss, "a", NOW + 60)],
            NOW,
        )
    assert refused.value.tasks == ({"t1"} if how != "never stored" else {"t9"})
    assert isinstance(refused.value, StorageError)
    # Nothing of it: no credential, no event, the head and the jti as they were.
    assert [c.value for c in store.agent_credentials(AGENT, NOW)] == ["before"]
    assert store.agent_credentials(OTHER_AGENT, NOW) == []
    assert store.audit_head() == head
    assert store.claim_jtis([JtiClaim(iss, "a", NOW + 60)], NOW) == [True]
    # Without the ended task's credential the rest goes in: another task's, workloads'.
    store.write_ledger(others, audit_rows(2, 3, prev=f"{1:064x}"))
    assert [c.value for c in store.task_credentials("t2", NOW)] == ["t2-own"]
    assert [c.value for c in store.task_credentials("t1", NOW)] == ["before"]
    assert store.audit_head() == Head(4, f"{4:064x}")


def test_a_ledger_write_refused_for_an_agent_and_a_task_names_the_agent_first(
    store: DataStore,
) -> None:
    """Agents are checked (and on PostgreSQL locked) before tasks: one refusal at a time, the
    writer drops its holders and writes again (AuditLog), so both are refused in turn."""
    admit(store, AGENT, OTHER_AGENT, tasks=["t1"])
    store.swap_task(task("t1", state="ended"), "active")
    store.delete_agent(OTHER_AGENT, Removal(OTHER_AGENT, REMOVAL_EVICTED, NOW))
    both = [cred("late", task_id="t1"), cred("x", agent=OTHER_AGENT)]
    with pytest.raises(AgentRemovedError) as first:
        store.write_ledger(both, [])
    assert first.value.agents == {OTHER_AGENT}
    assert first.value.among([both[0]]) is None
    with pytest.raises(TaskEndedMeanwhileError) as second:
        store.write_ledger(both[:1], [])
    assert second.value.among(both[1:]) is None
    assert store.agent_credentials(AGENT, NOW) == []


# -- tasks and violations -----------------------------------------------------------------------


def test_tasks_put_replace_and_filter(store: DataStore) -> None:
    store.put_task(task("b", created_at=NOW + 1))
    store.put_task(task("a", agent=OTHER_AGENT, runtime="spiffe://example.org/agents/other"))
    store.put_task(task("b", created_at=NOW + 1, state="ended", body='{"v": 2}'))
    assert store.get_task("b") == task("b", created_at=NOW + 1, state="ended", body='{"v": 2}')
    assert store.get_task("none") is None
    assert [t.task_id for t in store.list_tasks()] == ["a", "b"]  # oldest first
    assert [t.task_id for t in store.list_tasks(agent_id=AGENT)] == ["b"]
    assert [t.task_id for t in store.list_tasks(state="active")] == ["a"]
    assert [t.task_id for t in store.list_tasks(runtime_ids=[RUNTIME])] == ["b"]
    assert store.list_tasks(runtime_ids=[]) == []


def test_tasks_page_after_a_cursor_in_created_then_id_order(store: DataStore) -> None:
    """Keyset pages: (created_at, task_id) order, ties at one created_at broken by task_id;
    every filter set, several runtimes merged in order, a repeated runtime listed once."""
    runtimes = [f"{RUNTIME}/{n}" for n in range(3)]
    for n in range(24):
        store.put_task(
            task(
                f"t{(n * 7) % 24:02d}",  # ids out of creation order
                agent=(AGENT, OTHER_AGENT)[n % 2],
                runtime=runtimes[n % 3],
                state=("active", "ended")[n // 4 % 2],
                created_at=NOW + n // 3,  # three tasks a second
            )
        )
    for filters in (
        {},
        {"state": "active"},
        {"agent_id": AGENT},
        {"agent_id": AGENT, "state": "ended"},
        {"runtime_ids": [runtimes[1]]},
        {"runtime_ids": [runtimes[2], runtimes[0], runtimes[2]], "state": "active"},
        {"runtime_ids": runtimes[:2], "agent_id": OTHER_AGENT},
    ):
        whole = store.list_tasks(**filters)  # type: ignore[arg-type]
        assert [(t.created_at, t.task_id) for t in whole] == sorted(
            (t.created_at, t.task_id) for t in whole
        )
        assert whole, filters
        paged: list[TaskRecord] = []
        after = None
        while True:
            page = store.list_tasks(after=after, limit=2, **filters)  # type: ignore[arg-type]
            assert len(page) <= 2
            paged += page
            if len(page) < 2:
                break
            after = TaskCursor(page[-1].created_at, page[-1].task_id)
        assert paged == whole, filters
    assert store.list_tasks(limit=5) == store.list_tasks()[:5]
    assert store.list_tasks(after=TaskCursor(NOW + 7, "")) == store.list_tasks()[-3:]
    assert store.list_tasks(after=TaskCursor(NOW + 99, "")) == []


def test_due_tasks_are_the_expired_ones_in_a_state(store: DataStore) -> None:
    store.put_task(task("late", expires_at=NOW + 5))
    store.put_task(task("early", expires_at=NOW + 1))
    store.put_task(task("done", expires_at=NOW, state="ended"))
    store.put_task(task("later", expires_at=NOW + 100))
    assert [t.task_id for t in store.due_tasks("active", NOW + 5)] == ["early", "late"]


def test_swap_task_moves_a_task_out_of_a_state_once(store: DataStore) -> None:
    store.put_task(task("t"))
    head = store.feed_head()
    expired = task("t", state="expired", body='{"v": "expired"}')
    assert store.swap_task(expired, "active")
    assert store.get_task("t") == expired
    # A second end (the other server's sweep, an EndTask that read the row before) loses and
    # changes nothing, not even the feed.
    assert not store.swap_task(task("t", state="ended", body='{"v": "ended"}'), "active")
    assert store.get_task("t") == expired
    assert [item.key for item in store.feed_since(head, 10)] == ["t"]
    assert not store.swap_task(task("none", state="ended"), "active")  # no row: not created
    assert store.get_task("none") is None
    assert store.feed_head() == head + 1


def test_concurrent_swaps_of_a_task_have_one_winner(open_store: Opener) -> None:
    """Several stores (separate connections, as separate servers have) end the same tasks at
    once: each task is moved by exactly one of them."""
    stores = [open_store() for _ in range(4)]
    tasks = [f"t{i}" for i in range(20)]
    for task_id in tasks:
        stores[0].put_task(task(task_id))
    barrier = threading.Barrier(len(stores))
    won: dict[str, list[int]] = {t: [] for t in tasks}

    def end_all(k: int) -> None:
        barrier.wait()
        for task_id in tasks:
            ended = task(task_id, state="expired", body=f'{{"by": {k}}}')
            if stores[k].swap_task(ended, "active"):
                won[task_id].append(k)

    threads = [threading.Thread(target=end_all, args=(k,)) for k in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(len(winners) == 1 for winners in won.values()), won
    for task_id, (winner,) in won.items():
        assert stores[1].get_task(task_id) == task(
            task_id, state="expired", body=f'{{"by": {winner}}}'
        )


def test_violations_count_within_a_window_by_node_and_prune(store: DataStore) -> None:
    for at in (NOW - 100, NOW - 10, NOW):
        store.add_violation(RUNTIME, AGENT, at)
    store.add_violation("other", AGENT, NOW)
    # The same runtime through another node: counted against that node alone.
    store.add_violation(RUNTIME, OTHER_AGENT, NOW)
    assert store.count_violations(RUNTIME, AGENT, NOW - 50) == 2
    assert store.count_violations(RUNTIME, OTHER_AGENT, NOW - 50) == 1
    assert store.prune_violations(NOW - 10) == 2
    assert store.count_violations(RUNTIME, AGENT, 0) == 1


# -- the credential ledger ----------------------------------------------------------------------


def test_credentials_of_many_tasks_are_counted_together(store: DataStore) -> None:
    # More tasks than one grouped query names, so the batches add up too.
    ids = [f"t{i:04d}" for i in range(lq.COUNT_CREDENTIALS_BATCH + 3)]
    admit(store, tasks=ids)
    store.write_ledger(
        [cred(f"j{i}-{n}", task_id=t) for i, t in enumerate(ids) for n in range(i % 3)], []
    )
    counts = store.count_credentials_of([*ids, "never-begun", ids[4]])
    assert counts == {t: i % 3 for i, t in enumerate(ids) if i % 3}
    assert all(counts.get(t, 0) == store.count_credentials(t) for t in ids[:10])
    assert store.count_credentials_of([]) == {}


def test_credentials_are_read_back_while_a_verifier_may_accept_them(store: DataStore) -> None:
    admit(store, tasks=["t1"])
    creds = [cred(f"j{i}", task_id="t1" if i % 2 else "", expires_at=NOW + i) for i in range(6)]
    store.write_ledger([*creds, cred("x", agent=OTHER_AGENT)], [])
    assert store.count_credentials("t1") == 3
    assert store.agent_credentials(AGENT, NOW) == sorted(creds)
    assert [c.value for c in store.task_credentials("t1", NOW)] == ["j1", "j3", "j5"]
    # Through exp + the widest leeway and clock skew, then gone.
    late = NOW + 3 + int(MAX_VERIFIER_LEEWAY + MAX_CLOCK_SKEW)
    assert [c.value for c in store.task_credentials("t1", late)] == ["j3", "j5"]
    assert store.prune_credentials(late) == 3
    assert len(store.agent_credentials(AGENT, NOW)) == 3


def test_a_workload_jwt_is_found_by_its_jti_exp_and_subject(store: DataStore) -> None:
    """The token endpoint finds the agent a workload's JWT-SVID came through by its jti, exp
    and sub: only a workload's JWT, not a task's nor an X.509 serial of the same value, and
    among several of the same workload and second, the one with that jti."""
    admit(store, tasks=["t"])
    exp = NOW + 300
    serial = Credential("x509_serial", "s1", OTHER_AGENT, RUNTIME, "", exp, "ca")
    others = [cred(f"k{i}") for i in range(20)]  # the same workload's, in the same second
    store.write_ledger([*others[:10], cred("j1"), *others[10:]], [])
    store.write_ledger([cred("j2", agent=OTHER_AGENT), cred("t1", task_id="t")], [])
    store.write_ledger([serial], [])
    assert store.workload_jwt("j1", exp, RUNTIME) == cred("j1")
    assert store.workload_jwt("k13", exp, RUNTIME) == cred("k13")
    assert store.workload_jwt("j2", exp, RUNTIME) == cred("j2", agent=OTHER_AGENT)
    assert store.workload_jwt("j1", exp + 1, RUNTIME) is None
    assert store.workload_jwt("j1", exp, RUNTIME + "/other") is None
    assert store.workload_jwt("t1", exp, RUNTIME) is None
    assert store.workload_jwt("s1", exp, RUNTIME) is None
    assert store.workload_jwt("unknown", exp, RUNTIME) is None


def test_a_delegated_token_is_listed_with_the_acting_workloads_agent_too(
    store: DataStore,
) -> None:
    """A delegated token is held by its task (of AGENT) and by the workload acting for it (of
    OTHER_AGENT): each agent's credentials list it once, its task's once."""
    admit(store, AGENT, OTHER_AGENT, tasks=["t1"])
    delegated = cred("d1", task_id="t1")._replace(actor_agent_id=OTHER_AGENT)
    gone = cred("d0", task_id="t1", expires_at=NOW - 10_000)._replace(actor_agent_id=OTHER_AGENT)
    store.write_ledger([cred("j1"), delegated, gone, cred("x", agent=OTHER_AGENT)], [])
    assert store.agent_credentials(AGENT, NOW) == [delegated, cred("j1")]
    assert store.agent_credentials(OTHER_AGENT, NOW) == [delegated, cred("x", agent=OTHER_AGENT)]
    assert store.task_credentials("t1", NOW) == [delegated]
    assert store.count_credentials("t1") == 2  # the expired one is still on record
    assert store.agent_credentials("spiffe://example.org/agent/third", NOW) == []
    assert cred("j1").actor_agent_id is None


THIRD_AGENT = "spiffe://example.org/svid/agent/join_token/t3"


def delegated(
    value: str, actor: str, derived_from: str | None, *, expires_at: int = NOW + 300
) -> Credential:
    """A token of task t1 (of AGENT) acted with by a workload of `actor`, exchanged for the
    token `derived_from`."""
    return cred(value, task_id="t1", expires_at=expires_at)._replace(
        actor_agent_id=actor, derived_from=derived_from
    )


def test_the_tokens_derived_from_a_delegated_one_are_listed_with_its_acting_agent(
    store: DataStore,
) -> None:
    """d2 was exchanged for d1 (acted with through OTHER_AGENT), d3 for d2: removing
    OTHER_AGENT is to revoke all three, each listed once, though d3's own actor is another
    agent; one expired beyond every verifier's leeway is not listed, nor what derives from a
    token of another agent."""
    admit(store, AGENT, OTHER_AGENT, THIRD_AGENT, tasks=["t1"])
    t0 = cred("t0", task_id="t1")
    d1 = delegated("d1", OTHER_AGENT, "t0")
    d2 = delegated("d2", OTHER_AGENT, "d1")
    d3 = delegated("d3", THIRD_AGENT, "d2")
    old = delegated("d4", THIRD_AGENT, "d1", expires_at=NOW - 10_000)
    store.write_ledger([t0, d1, d2, d3, old, cred("x", agent=THIRD_AGENT)], [])
    assert store.agent_credentials(OTHER_AGENT, NOW) == [d1, d2, d3]
    assert store.agent_credentials(THIRD_AGENT, NOW) == [d3, cred("x", agent=THIRD_AGENT)]
    assert store.agent_credentials(AGENT, NOW) == [d1, d2, d3, t0]
    assert store.task_credentials("t1", NOW) == [d1, d2, d3, t0]


def test_a_token_derived_from_one_a_removed_agent_holds_is_refused(store: DataStore) -> None:
    """d1 was acted with through OTHER_AGENT: once that agent is removed, a token exchanged
    for d1, or for one exchanged for it in turn, is refused for it as d1 would be, though
    neither names it; its refusal is of the credentials derived from it only."""
    admit(store, AGENT, OTHER_AGENT, THIRD_AGENT, tasks=["t1"])
    d1, d2 = delegated("d1", OTHER_AGENT, "t0"), delegated("d2", THIRD_AGENT, "d1")
    store.write_ledger([cred("t0", task_id="t1"), d1, d2], [])
    store.delete_agent(OTHER_AGENT, Removal(OTHER_AGENT, REMOVAL_EVICTED, NOW))
    for late in (delegated("d3", THIRD_AGENT, "d1"), delegated("d3", THIRD_AGENT, "d2")):
        mine = cred("mine", agent=THIRD_AGENT)
        with pytest.raises(AgentRemovedError) as refused:
            store.write_ledger([late, mine], [])
        assert refused.value.agents == {OTHER_AGENT}
        assert refused.value.among([mine]) is None  # written again without `late`
        own = refused.value.among([late])
        assert own is not None
        assert own.agents == {OTHER_AGENT}
    store.write_ledger([delegated("d5", THIRD_AGENT, "t0")], [])  # of admitted agents only
    assert [c.value for c in store.task_credentials("t1", NOW)] == ["d1", "d2", "d5", "t0"]


def test_a_ledger_write_is_credentials_events_and_head_together(store: DataStore) -> None:
    admit(store)
    assert store.audit_head() is None
    rows = audit_rows(1, 3)
    store.write_ledger([cred("j1"), cred("j2")], rows)
    assert store.audit_head() == Head(3, rows[-1][-1])  # type: ignore[arg-type]
    assert [tuple(r.values()) for r in store.audit_rows()] == rows
    assert len(store.agent_credentials(AGENT, NOW)) == 2


def test_a_failed_ledger_write_keeps_nothing(store: DataStore) -> None:
    admit(store)
    store.write_ledger([cred("j1")], audit_rows(1, 2))
    head = store.audit_head()
    # seq 2 again: the events' key refuses it, and the credentials of the batch go too.
    with pytest.raises(StorageError):
        store.write_ledger([cred("j2"), cred("j3")], audit_rows(2, 2))
    assert store.audit_head() == head
    assert [r["seq"] for r in store.audit_rows()] == [1, 2]
    assert [c.value for c in store.agent_credentials(AGENT, NOW)] == ["j1"]
    store.write_ledger([cred("j4")], audit_rows(3, 1, prev=f"{2:064x}"))  # still usable
    assert [r["seq"] for r in store.audit_rows()] == [1, 2, 3]


@pytest.mark.parametrize(
    ("first_seq", "prev", "why"),
    [
        (3, f"{1:064x}", "a seq the chain already has (a second writer's stale head)"),
        (4, f"{2:064x}", "a gap"),
        (3, f"{9:064x}", "the right seq on another hash (a fork)"),
        (1, "0" * 64, "seq 1 on a chain that is not empty"),
    ],
)
def test_a_batch_sealed_on_another_head_is_refused_and_writes_nothing(
    store: DataStore, first_seq: int, prev: str, why: str
) -> None:
    admit(store)
    store.write_ledger([cred("j1")], audit_rows(1, 2))
    head = store.audit_head()
    with pytest.raises(ChainMovedError) as refused:
        store.write_ledger([cred("j2")], audit_rows(first_seq, 2, prev=prev))
    assert refused.value.head == head, why  # what to seal on instead
    assert isinstance(refused.value, StorageError)
    assert store.audit_head() == head
    assert [r["seq"] for r in store.audit_rows()] == [1, 2]
    assert [c.value for c in store.agent_credentials(AGENT, NOW)] == ["j1"]
    # Sealed again on the head it was given, the batch goes in.
    store.write_ledger([cred("j2")], audit_rows(3, 2, prev=head.hash))  # type: ignore[union-attr]
    assert [r["seq"] for r in store.audit_rows()] == [1, 2, 3, 4]


def test_an_empty_chain_takes_only_seq_1(store: DataStore) -> None:
    admit(store)
    with pytest.raises(ChainMovedError) as refused:
        store.write_ledger([cred("j1")], audit_rows(2, 1))
    assert refused.value.head is None
    assert store.audit_head() is None
    assert store.agent_credentials(AGENT, NOW) == []


def test_credentials_alone_do_not_need_the_head(store: DataStore) -> None:
    admit(store)
    store.write_ledger([], audit_rows(1, 2))
    store.write_ledger([cred("j1")], [])
    assert store.audit_head() == Head(2, f"{2:064x}")


def test_two_writers_on_one_head_one_wins_the_other_is_refused(open_store: Opener) -> None:
    """Two stores on the same data (two servers): both seal on the same head, in threads; the
    head check and the write are one step, so exactly one batch lands."""
    first, second = admit(open_store()), open_store()
    first.write_ledger([], audit_rows(1, 1))
    go = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def write(name: str, store: DataStore) -> None:
        rows = audit_rows(2, 50, prev=f"{1:064x}")
        go.wait()
        try:
            store.write_ledger([cred(name)], rows)
            outcomes[name] = "written"
        except ChainMovedError as e:
            outcomes[name] = f"refused at {e.head}"

    pairs = (("a", first), ("b", second))
    threads = [threading.Thread(target=write, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()) == [f"refused at {Head(51, f'{51:064x}')}", "written"]
    assert [r["seq"] for r in first.audit_rows()] == list(range(1, 52))
    assert len(first.agent_credentials(AGENT, NOW)) == 1


def test_audit_rows_filter_and_page(store: DataStore) -> None:
    rows = audit_rows(1, 2100)  # more than two pages
    store.write_ledger([], rows)
    assert [r["seq"] for r in store.audit_rows()] == list(range(1, 2101))
    mine = list(store.audit_rows(EventFilter(agent_id=AGENT, task_id="task-1")))
    assert [r["seq"] for r in mine] == [s for s in range(1, 2101) if s % 2 and s % 3 == 1]
    timed = store.audit_rows(EventFilter(since=NOW + 10, until=NOW + 13))
    assert [r["seq"] for r in timed] == [10, 11, 12]


def test_audit_rows_filter_by_node(store: DataStore) -> None:
    """An agent's removal finds the revocation events of its credentials by node."""
    rows = []
    for row in audit_rows(1, 6):
        values = dict(zip(AUDIT_COLUMNS, row, strict=True))
        seq = int(values["seq"])  # type: ignore[call-overload]
        values.update(
            kind="revocation" if seq % 2 else "jwt_minted",
            node_id=AGENT if seq <= 3 else OTHER_AGENT,
        )
        rows.append(tuple(values[c] for c in AUDIT_COLUMNS))
    store.write_ledger([], rows)
    mine = store.audit_rows(EventFilter(kind="revocation", node_id=AGENT))
    assert [r["credential_id"] for r in mine] == ["jti-1", "jti-3"]
    theirs = store.audit_rows(EventFilter(node_id=OTHER_AGENT))
    assert [r["seq"] for r in theirs] == [4, 5, 6]


def test_an_audit_snapshot_is_one_instant(store: DataStore) -> None:
    store.write_ledger([], audit_rows(1, 3))
    with store.audit_snapshot() as snap:
        store.write_ledger([], audit_rows(4, 2, prev=f"{3:064x}"))  # lands meanwhile
        assert snap.missing_tables == ()
        assert snap.head is not None
        assert snap.head.seq == 3
        assert [r["seq"] for r in snap.rows()] == [1, 2, 3]
    assert store.audit_head() == Head(5, f"{5:064x}")


def test_concurrent_ledger_writes_all_land(store: DataStore) -> None:
    admit(store)

    def write(k: int) -> None:
        store.write_ledger([cred(f"{k}-{i}") for i in range(20)], [])

    threads = [threading.Thread(target=write, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.agent_credentials(AGENT, NOW)) == 160


# -- one store, all of it durable ---------------------------------------------------------------


def test_every_role_survives_a_restart(open_store: Opener) -> None:
    store = open_store()
    entry = store.create_entry(Entry("", RUNTIME, AGENT, (Selector("unix", "uid:1"),)))
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
    store.put_task(task("t"))
    store.add_violation(RUNTIME, AGENT, NOW)
    rows = audit_rows(1, 2)
    store.write_ledger([cred("j", task_id="t")], rows)
    store.close()

    again = open_store()
    assert again.get_entry(entry.id) == entry
    assert again.get_agent(AGENT).serial == "1"
    assert again.get_task("t") == task("t")
    assert again.count_violations(RUNTIME, AGENT, 0) == 1
    assert [c.value for c in again.task_credentials("t", NOW)] == ["j"]
    assert again.audit_head() == Head(2, f"{2:064x}")
    assert [tuple(r.values()) for r in again.audit_rows()] == rows


# -- change feed --------------------------------------------------------------------------------


def _feed(store: DataStore, after: int = 0) -> list[tuple[str, str]]:
    return [(item.kind, item.key) for item in store.feed_since(after, 1000)]


def test_feed_names_every_row_each_write_touched(store: DataStore) -> None:
    assert store.feed_head() == 0
    sels = (Selector("unix", "uid:1000"),)
    made = store.create_entry(Entry("", "spiffe://example.org/a", AGENT, sels))
    store.update_entry(replace(made, hint="x"))
    results = store.create_entries(
        [
            Entry("", "spiffe://example.org/b", AGENT, sels),
            Entry("", "spiffe://example.org/a", AGENT, sels),  # clashes: refused, not named
            Entry("", "spiffe://example.org/c", AGENT, sels),
        ]
    )
    b, clash, c = results
    assert isinstance(b, Entry)
    assert isinstance(c, Entry)
    assert isinstance(clash, AlreadyExistsError)
    store.update_entries([replace(b, hint="y"), replace(made, id="missing")])
    store.delete_entries([c.id, "missing"])
    store.delete_entry(made.id)
    store.upsert_agent(AttestedAgent(AGENT, "join_token", "1", NOW + 3600))
    store.create_join_token(JoinToken("t", b"h" * 32, NOW + 60))  # not in any server's view
    store.admit_agent(
        AttestedAgent(OTHER_AGENT, "join_token", "1", NOW + 3600), TokenUse("t", b"h" * 32), NOW
    )
    store.set_agent_banned(AGENT, True)
    store.delete_agent(OTHER_AGENT)
    store.add_revocations([Revocation("jwt_id", "j1", RUNTIME, NOW, "r", NOW)])
    store.add_revocations(
        [
            Revocation("jwt_id", "j1", RUNTIME, NOW, "r", NOW),  # already revoked: no row
            Revocation("x509_serial", "7", RUNTIME, NOW, "r", NOW),
        ]
    )
    store.save_key_slot(KeySlot("s1", "jwt", "active", b"der", "kid", NOW, NOW + 10, NOW))
    store.delete_key_slot("s1")
    store.delete_key_slot("absent")  # nothing deleted: no row
    store.put_task(task("t1"))
    assert _feed(store) == [
        ("entry", made.id),
        ("entry", made.id),
        ("entry", b.id),
        ("entry", c.id),
        ("entry", b.id),
        ("entry", c.id),
        ("entry", made.id),
        ("agent", AGENT),
        ("agent", OTHER_AGENT),
        ("agent", AGENT),
        ("agent", OTHER_AGENT),
        ("revocation", "jwt_id:j1"),
        ("revocation", "x509_serial:7"),
        ("key_slot", "s1"),
        ("key_slot", "s1"),
        ("task", "t1"),
    ]
    items = store.feed_since(0, 1000)
    assert [i.revision for i in items] == list(range(1, len(items) + 1))
    assert {i.at for i in items} == {NOW}
    assert store.feed_head() == len(items)


def test_feed_failed_writes_name_nothing(store: DataStore) -> None:
    sels = (Selector("unix", "uid:1000"),)
    made = store.create_entry(Entry("", "spiffe://example.org/a", AGENT, sels))
    head = store.feed_head()
    with pytest.raises(AlreadyExistsError):
        store.create_entry(Entry("", "spiffe://example.org/a", AGENT, sels))
    with pytest.raises(ConflictError):
        store.update_entry(replace(made, revision=7))
    with pytest.raises(NotFoundError):
        store.delete_entry("missing")
    with pytest.raises(NotFoundError):
        store.delete_agent(AGENT)
    assert store.create_entries([Entry("", "spiffe://example.org/a", AGENT, sels)])
    assert not store.admit_agent(
        AttestedAgent(AGENT, "join_token", "1", NOW + 3600), TokenUse("t", b"h" * 32), NOW
    )
    assert store.feed_head() == head
    assert store.feed_since(head, 10) == []


def test_feed_since_pages_in_revision_order(store: DataStore) -> None:
    for i in range(5):
        store.put_task(task(f"t{i}"))
    first = store.feed_since(0, 2)
    assert [(i.revision, i.key) for i in first] == [(1, "t0"), (2, "t1")]
    rest = store.feed_since(first[-1].revision, 10)
    assert [(i.revision, i.key) for i in rest] == [(3, "t2"), (4, "t3"), (5, "t4")]
    assert store.feed_since(5, 10) == []


def test_a_policy_announcement_is_a_feed_row_and_the_newest_is_read_back(
    store: DataStore,
) -> None:
    assert store.announced_policy() is None
    store.announce_policy("h1")
    store.put_task(task("t0"))  # a newer row of another kind hides nothing
    store.announce_policy("h2")
    assert [(i.kind, i.key) for i in store.feed_since(0, 10)] == [
        ("policy", "h1"),
        ("task", "t0"),
        ("policy", "h2"),
    ]
    # With its revision: one hash may be announced again, and the rows told apart.
    assert store.announced_policy() == PolicyAnnouncement(3, "h2", NOW)


def test_prune_feed_by_age_keeps_the_head(open_store: Opener) -> None:
    store = open_store()
    store.put_task(task("t0"))
    store.put_task(task("t1"))
    assert store.prune_feed(NOW) == 0  # written at NOW: not before it
    assert store.prune_feed(NOW + 1) == 2
    assert store.feed_since(0, 10) == []
    assert store.feed_head() == 2
    store.put_task(task("t2"))
    assert [(i.revision, i.key) for i in store.feed_since(0, 10)] == [(3, "t2")]
    store.close()
    assert open_store().feed_head() == 3  # the head outlives a restart


def test_prune_feed_keeps_the_newest_policy_announcement(store: DataStore) -> None:
    """Pruned with the rest, a fleet reload was forgotten after feed_retention: a server
    started later with another policy_dir said nothing."""
    store.announce_policy("h1")
    store.announce_policy("h2")
    store.put_task(task("t0"))
    assert store.prune_feed(NOW + 1) == 2
    assert [(i.kind, i.key) for i in store.feed_since(0, 10)] == [("policy", "h2")]
    assert store.announced_policy() == PolicyAnnouncement(2, "h2", NOW)
    store.announce_policy("h3")
    assert store.prune_feed(NOW + 1) == 1  # h2: no longer the newest
    assert [(i.kind, i.key) for i in store.feed_since(0, 10)] == [("policy", "h3")]


def test_wait_feed_sees_a_write_of_another_connection(open_store: Opener) -> None:
    reader, writer = open_store(), open_store()
    head = reader.feed_head()
    started = time.monotonic()
    assert not reader.wait_feed(head, 0.1)
    assert time.monotonic() - started >= 0.09
    woke: list[bool] = []
    waiting = threading.Thread(target=lambda: woke.append(reader.wait_feed(head, 10)))
    waiting.start()
    time.sleep(0.05)
    wrote = time.monotonic()
    writer.put_task(task("t0"))
    waiting.join(10)
    assert woke == [True]
    # Woken by the write, not by the 10 s timeout (bound loose enough for a loaded machine).
    assert time.monotonic() - wrote < 5
    assert reader.wait_feed(head, 0)  # already past: no wait at all


def test_wait_feed_returns_when_the_store_closes(store: DataStore) -> None:
    woke: list[bool] = []
    waiting = threading.Thread(target=lambda: woke.append(store.wait_feed(store.feed_head(), 30)))
    waiting.start()
    time.sleep(0.05)
    started = time.monotonic()
    store.close()
    waiting.join(10)
    assert woke == [False]
    assert time.monotonic() - started < 5  # woken by the close, not the 30 s timeout


def test_feed_revisions_commit_in_order_across_connections(open_store: Opener) -> None:
    stores = [open_store(), open_store()]
    seen: list[list[int]] = []
    done = threading.Event()

    def write(store: DataStore, prefix: str) -> None:
        for i in range(40):
            store.put_task(task(f"{prefix}{i}"))

    def read(store: DataStore) -> None:
        # Whatever a reader sees is a prefix with no holes: nothing commits out of order.
        while not done.is_set():
            seen.append([i.revision for i in store.feed_since(0, 1000)])

    reader = open_store()
    writers = [
        threading.Thread(target=write, args=(s, p)) for s, p in zip(stores, "ab", strict=True)
    ]
    checking = threading.Thread(target=read, args=(reader,))
    checking.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    done.set()
    checking.join(10)
    assert reader.feed_head() == 80
    assert [i.revision for i in reader.feed_since(0, 1000)] == list(range(1, 81))
    assert len(seen) > 1
    assert all(revisions == list(range(1, len(revisions) + 1)) for revisions in seen)


# -- shared audit checkpoints -------------------------------------------------------------------


def test_the_newest_audit_record_of_each_kind_stands_and_is_fed(open_store: Opener) -> None:
    store = open_store()
    first = AuditRecord("checkpoint", 5, NOW + 1.5, "line-5")
    assert store.save_audit_record(first)
    assert not store.save_audit_record(AuditRecord("checkpoint", 4, NOW + 9.0, "line-4"))
    assert not store.save_audit_record(first)  # the same one again: nothing new
    same_later = AuditRecord("checkpoint", 5, NOW + 2.5, "line-5-later")
    assert store.save_audit_record(same_later)
    prune = AuditRecord("prune", 3, NOW + 3.0, "prune-3")
    assert store.save_audit_record(prune)
    assert store.audit_records() == [same_later, prune]  # oldest signed first
    # A feed row for each one kept, none for those refused.
    assert _feed(store) == [("audit_record", "checkpoint")] * 2 + [("audit_record", "prune")]
    newer = AuditRecord("checkpoint", 9, NOW + 4.0, "line-9")
    assert store.save_audit_record(newer)
    assert open_store().audit_records() == [prune, newer]  # after a restart too


def test_the_first_audit_key_offered_stands(open_store: Opener) -> None:
    store = open_store()
    first = SealedAuditKey("k1", b"public-1", b"sealed-1", NOW)
    assert store.offer_audit_key(first) == first
    assert store.offer_audit_key(SealedAuditKey("k2", b"public-2", b"sealed-2", NOW + 1)) == first
    assert open_store().offer_audit_key(SealedAuditKey("k3", b"p", b"s", NOW)) == first


def test_concurrent_audit_key_offers_agree_on_one(open_store: Opener) -> None:
    stores = [open_store() for _ in range(4)]
    got: list[SealedAuditKey] = []
    barrier = threading.Barrier(len(stores))

    def offer(n: int) -> None:
        barrier.wait()
        got.append(stores[n].offer_audit_key(SealedAuditKey(f"k{n}", b"p", b"s", NOW)))

    threads = [threading.Thread(target=offer, args=(n,)) for n in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == len(stores)
    assert len(set(got)) == 1


def test_audit_rows_after_a_seq_page_in_seq_order(store: DataStore) -> None:
    rows = audit_rows(1, 7)
    store.write_ledger([], rows)
    assert [tuple(r.values()) for r in store.audit_rows_after(2, 3)] == rows[2:5]
    assert [r["seq"] for r in store.audit_rows_after(5, 100)] == [6, 7]
    assert store.audit_rows_after(7, 100) == []


def test_federation_relationships_round_trip(store: DataStore) -> None:
    rel = FederationRelationship(
        "other.org", "https://other.example:8443/", HTTPS_SPIFFE, "spiffe://other.org/svid/server"
    )
    made = store.create_relationship(rel)
    assert made.created_at == NOW
    assert made.updated_at == NOW
    assert store.get_relationship("other.org") == made
    with pytest.raises(AlreadyExistsError, match=r"other\.org"):
        store.create_relationship(rel)
    changed = store.update_relationship(
        replace(rel, profile=HTTPS_WEB, endpoint_spiffe_id="", ca_file="/etc/ca.pem")
    )
    assert changed.created_at == made.created_at
    assert changed.profile == HTTPS_WEB
    assert store.list_relationships() == [changed]
    with pytest.raises(NotFoundError, match=r"third\.org"):
        store.update_relationship(replace(rel, trust_domain="third.org"))
    store.delete_relationship("other.org")
    assert store.list_relationships() == []
    with pytest.raises(NotFoundError, match=r"other\.org"):
        store.get_relationship("other.org")
    with pytest.raises(NotFoundError):
        store.delete_relationship("other.org")


def test_foreign_bundles_are_replaced_and_survive_a_reopen(open_store: Opener) -> None:
    store = open_store()
    store.put_foreign_bundle(ForeignBundle("other.org", b'{"keys":[]}', NOW))
    store.put_foreign_bundle(ForeignBundle("other.org", b'{"keys":[],"spiffe_sequence":2}', NOW))
    store.put_foreign_bundle(ForeignBundle("a.org", b'{"keys":[]}', NOW + 1))
    assert [b.trust_domain for b in store.list_foreign_bundles()] == ["a.org", "other.org"]
    assert open_store().list_foreign_bundles()[1].bundle == b'{"keys":[],"spiffe_sequence":2}'
    store.delete_foreign_bundle("a.org")
    with pytest.raises(NotFoundError, match=r"a\.org"):
        store.delete_foreign_bundle("a.org")


def test_a_foreign_bundle_is_not_stored_over_one_of_a_higher_sequence(store: DataStore) -> None:
    """A server whose copy lags the change feed fetched an older bundle from a lagging endpoint
    replica: the store keeps the newer one (every other server adopts what is stored)."""

    def put(sequence: int, hint: int = 0, *, over_newer: bool = False) -> bool:
        body = b'{"keys":[],"spiffe_sequence":%d,"spiffe_refresh_hint":%d}' % (sequence, hint)
        bundle = ForeignBundle("other.org", body, NOW, sequence)
        return store.put_foreign_bundle(bundle, over_newer=over_newer)

    def stored() -> tuple[int, bytes]:
        (row,) = store.list_foreign_bundles()
        return row.sequence, row.bundle

    assert put(2)
    head = store.feed_head()
    assert not put(1)
    assert stored() == (2, b'{"keys":[],"spiffe_sequence":2,"spiffe_refresh_hint":0}')
    assert store.feed_head() == head  # nothing written, nothing for the others to adopt
    assert put(2, hint=7)  # the same sequence (a new refresh hint, say) replaces it
    assert stored()[1].endswith(b"7}")
    # A bundle without a sequence cannot be ordered: taken as it comes, as before.
    assert put(0)
    assert put(1)
    # Set by hand: it stands whatever the stored sequence.
    assert put(5)
    assert put(3, over_newer=True)
    assert stored()[0] == 3
    assert _feed(store, head) == [("foreign_bundle", "other.org")] * 5


def test_a_foreign_bundle_is_stored_with_the_events_recording_it_or_neither(
    store: DataStore,
) -> None:
    """A bundle written with the audit event recording its change (write_ledger's `bundles`)
    is stored, feed row and all, in the event's transaction; one the store refuses (a higher
    sequence stored) takes the event, and everything else of the write, back with it."""

    def bundle(sequence: int) -> ForeignBundle:
        body = b'{"keys":[],"spiffe_sequence":%d}' % sequence
        return ForeignBundle("other.org", body, NOW, sequence)

    admit(store, AGENT)
    feed = store.feed_head()
    store.write_ledger([], audit_rows(1, 1), bundles=[BundleWrite(bundle(2))])
    assert [b.sequence for b in store.list_foreign_bundles()] == [2]
    assert _feed(store, feed) == [("foreign_bundle", "other.org")]
    head, feed = store.audit_head(), store.feed_head()
    with pytest.raises(BundleRefusedError) as refused:
        store.write_ledger(
            [cred("late")], audit_rows(2, 1, prev=f"{1:064x}"), bundles=[BundleWrite(bundle(1))]
        )
    assert refused.value.trust_domains == {"other.org"}
    assert isinstance(refused.value, StorageError)
    assert [b.sequence for b in store.list_foreign_bundles()] == [2]
    assert store.audit_head() == head
    assert store.agent_credentials(AGENT, NOW) == []
    assert store.feed_head() == feed
    # Set by hand, it stands whatever the stored sequence.
    write = BundleWrite(bundle(1), over_newer=True)
    store.write_ledger([], audit_rows(2, 1, prev=f"{1:064x}"), bundles=[write])
    assert [b.sequence for b in store.list_foreign_bundles()] == [1]
    assert store.audit_head() == Head(2, f"{2:064x}")


def test_a_foreign_bundle_is_removed_with_the_event_recording_it_or_neither(
    store: DataStore,
) -> None:
    """A removal written with the audit event recording it (BundleWrite.removal) deletes the
    bundle, feed row and all, in the event's transaction; one of a bundle not stored is
    refused, the event and everything else of the write with it."""
    body = b'{"keys":[],"spiffe_sequence":2}'
    store.write_ledger(
        [], audit_rows(1, 1), bundles=[BundleWrite(ForeignBundle("other.org", body, NOW, 2))]
    )
    feed = store.feed_head()
    store.write_ledger(
        [], audit_rows(2, 1, prev=f"{1:064x}"), bundles=[BundleWrite.removal("other.org")]
    )
    assert store.list_foreign_bundles() == []
    assert store.audit_head() == Head(2, f"{2:064x}")
    assert _feed(store, feed) == [("foreign_bundle", "other.org")]
    admit(store, AGENT)
    head, feed = store.audit_head(), store.feed_head()
    with pytest.raises(BundleRefusedError) as refused:
        store.write_ledger(
            [cred("late")],
            audit_rows(3, 1, prev=f"{2:064x}"),
            bundles=[BundleWrite.removal("other.org")],
        )
    assert refused.value.missing == refused.value.trust_domains == {"other.org"}
    assert refused.value.older == set()
    assert store.audit_head() == head
    assert store.agent_credentials(AGENT, NOW) == []
    assert store.feed_head() == feed


def test_a_refusal_names_which_of_a_trust_domains_writes_it_refused(store: DataStore) -> None:
    """One trust domain written twice in a group commit (its removal sent twice, a store of it
    beside one of another): the refusal says which write (by its place in `bundles`) the store
    refused, so the ledger fails that caller only, not every write of the trust domain."""
    body = b'{"keys":[],"spiffe_sequence":2}'
    store.write_ledger(
        [], audit_rows(1, 1), bundles=[BundleWrite(ForeignBundle("other.org", body, NOW, 2))]
    )
    with pytest.raises(BundleRefusedError) as refused:
        store.write_ledger(
            [],
            audit_rows(2, 1, prev=f"{1:064x}"),
            bundles=[
                BundleWrite(ForeignBundle("z.org", body, NOW, 2)),
                BundleWrite.removal("other.org"),
                BundleWrite.removal("other.org"),
            ],
        )
    assert refused.value.missing == {"other.org"}
    assert refused.value.positions == {2}
    assert [b.trust_domain for b in store.list_foreign_bundles()] == ["other.org"]


def test_a_foreign_bundle_sequence_orders_across_the_whole_uint64_range(store: DataStore) -> None:
    """spiffe_sequence is a uint64 (SPIFFE bundle format): one past int64 is stored, read back
    as it was, and ordered against those below it in the conditional write."""
    top = 2**64 - 1

    def put(sequence: int) -> bool:
        body = b'{"keys":[],"spiffe_sequence":%d}' % sequence
        bundle = SpiffeBundle.parse(TrustDomain.parse("other.org"), body)
        assert bundle.sequence == sequence
        return store.put_foreign_bundle(ForeignBundle("other.org", body, NOW, bundle.sequence))

    def stored() -> int:
        (row,) = store.list_foreign_bundles()
        return row.sequence

    assert put(2**63)
    assert stored() == 2**63
    assert not put(2**63 - 1)  # below it: refused
    assert stored() == 2**63
    assert put(top)
    assert stored() == top
    assert not put(1)
    assert put(0)  # no sequence: taken as it comes, as before
    assert stored() == 0
    assert put(1)


def test_feed_names_federation_writes_and_not_failed_ones(store: DataStore) -> None:
    rel = FederationRelationship("other.org", "https://other.example:8443/", HTTPS_WEB)
    store.create_relationship(rel)
    store.update_relationship(replace(rel, endpoint_url="https://other.example:9443/"))
    store.put_foreign_bundle(ForeignBundle("other.org", b'{"keys":[]}', NOW))
    store.delete_foreign_bundle("other.org")
    store.delete_relationship("other.org")
    head = store.feed_head()
    with pytest.raises(NotFoundError):
        store.delete_relationship("other.org")
    with pytest.raises(NotFoundError):
        store.update_relationship(rel)
    with pytest.raises(NotFoundError):
        store.delete_foreign_bundle("other.org")
    assert store.feed_head() == head
    assert _feed(store) == [
        ("federation_relationship", "other.org"),
        ("federation_relationship", "other.org"),
        ("foreign_bundle", "other.org"),
        ("foreign_bundle", "other.org"),
        ("federation_relationship", "other.org"),
    ]


def test_entries_keep_the_trust_domains_they_federate_with(store: DataStore) -> None:
    made = store.create_entry(
        Entry(
            "",
            "spiffe://example.org/web",
            AGENT,
            (Selector("unix", "uid:1"),),
            federates_with=("other.org", "third.org"),
        )
    )
    assert store.get_entry(made.id).federates_with == ("other.org", "third.org")
    store.update_entry(replace(made, federates_with=()))
    assert store.get_entry(made.id).federates_with == ()


def test_each_prune_batch_starts_past_the_last_id_the_one_before_deleted() -> None:
    """Without the bound every batch scanned again, in ID order, the rows the ones before
    kept (and on PostgreSQL those they deleted, until a vacuum): quadratic on a large fleet."""
    asked: list[str] = []
    batches = [["a1", "a2"], ["b1", "b2"], ["c1"]]

    def prune(before: int, limit: int, after: str) -> list[str]:
        assert (before, limit) == (7, 2)
        asked.append(after)
        return batches[len(asked) - 1]

    assert prune_in_batches(prune, 7, 2) == ["a1", "a2", "b1", "b2", "c1"]
    assert asked == ["", "a2", "b2"]
