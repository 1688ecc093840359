"""FederationService on a real SQLite datastore and audit log, with the fetch injected: what is
kept, served, recorded and scheduled; and the configuration's federation keys."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from server import https_get
from server.audit.errors import LedgerError
from server.audit.log import AuditLog
from server.config import build_config
from server.datastore.errors import StorageError
from server.datastore.postgres import PostgresDataStore
from server.datastore.records import EventFilter, FederationRelationship
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from server.errors import (
    ConfigError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from server.federation.errors import BundleNotStoredError, FederationError
from server.federation.fetch import fetch_bundle
from server.federation.service import (
    BUNDLE_CHANGED,
    BUNDLE_REFUSED,
    DEFAULT_REFRESH,
    FETCHES_AT_ONCE,
    FOLLOWED_DELAY,
    MAX_REFRESH,
    MAX_RETRY,
    MIN_REFRESH,
    RETRY,
    FederationService,
    Stored,
    lease_ttl,
    next_refresh,
    parse_static,
)
from server.status import status_for
from svid._bundle import SpiffeBundle
from svid._clock import Clock, FakeClock
from svid._spiffe_id import TrustDomain
from tests.clocks import SleptClock, SteppedClock
from tests.server.fixtures import SilentEndpoint, serving_https

OWN = TrustDomain("other.org")
HOME = TrustDomain("example.org")
STATIC = "example.org https_spiffe https://127.0.0.1:1/ spiffe://example.org/svid/server"


def _bundle(sequence: int, hint: int = 90) -> SpiffeBundle:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return SpiffeBundle(HOME, (), {f"k{sequence}": key}, sequence=sequence, refresh_hint=hint)


class World:
    def __init__(self, tmp_path: Path, clock: Clock | None = None) -> None:
        self.clock = clock or FakeClock(1_700_000_000)
        self.db = SqliteDataStore(tmp_path / "db", self.clock)
        self.store = FaultInjectingDataStore(self.db)
        self.published: list[Mapping[str, SpiffeBundle]] = []
        self.answers: list[Any] = []
        self.service = FederationService(
            own=OWN,
            datastore=self.store,
            audit=AuditLog(self.store, self.clock),
            clock=self.clock,
            publish=self.published.append,
            static=(parse_static(STATIC, OWN),),
            fetch=self._fetch,
        )
        self.service.load()

    def _fetch(self, rel: FederationRelationship, known: SpiffeBundle | None) -> SpiffeBundle:
        answer = self.answers.pop(0)
        if isinstance(answer, FederationError):
            raise answer
        if callable(answer):  # what happens while the fetch is out, then its answer
            return answer()  # type: ignore[no-any-return]
        return answer

    def run(self, coro: object) -> object:
        return asyncio.run(coro)  # type: ignore[arg-type]

    def changes(self) -> int:
        return len(list(self.store.inner.audit_rows(EventFilter(kind=BUNDLE_CHANGED))))


@contextmanager
def world_on(tmp_path: Path, clock: Clock | None = None) -> Iterator[World]:
    made = World(tmp_path, clock)
    try:
        yield made
    finally:
        made.store.inner.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with world_on(tmp_path) as made:
        yield made


def test_a_refresh_installs_records_and_publishes_a_changed_bundle(world: World) -> None:
    world.answers = [_bundle(1), _bundle(1)]
    first = world.run(world.service.refresh("example.org"))
    assert first.changed  # type: ignore[attr-defined]
    assert world.published[-1]["example.org"].sequence == 1
    assert world.changes() == 1
    # The same bundle again: nothing recorded, nothing published.
    world.answers = [world.service.bundle("example.org")]
    again = world.run(world.service.refresh("example.org"))
    assert not again.changed  # type: ignore[attr-defined]
    assert world.changes() == 1
    assert len(world.published) == 2  # load() and the change


def test_a_bundle_set_by_hand_while_a_fetch_fails_is_fetched_at_once_after_it(
    world: World,
) -> None:
    # https_spiffe's first fetch fails (no bundle yet to authenticate the endpoint) while the
    # operator sets one: the fetch asked for then must not be lost to the failed one's retry,
    # though the clock reads the same as when the failed one was due.
    async def scenario() -> float:
        loop = asyncio.get_running_loop()

        def set_meanwhile() -> SpiffeBundle:
            body = _bundle(1).to_json()
            done = asyncio.run_coroutine_threadsafe(
                world.service.set_bundle("example.org", body), loop
            )
            done.result(10)
            raise FederationError("example.org: no bundle to authenticate the endpoint yet")

        world.answers = [set_meanwhile]
        with pytest.raises(FederationError):
            await world.service.refresh("example.org")
        return world.service.next_fetch("example.org") - world.clock.now()

    assert world.run(scenario()) == 0


def test_an_endpoint_that_keeps_failing_is_fetched_less_and_less_often(world: World) -> None:
    # Each failed fetch is also a ledger event: at a fixed 5 s, a day's outage wrote 17,000.
    world.answers = [_bundle(1, hint=3600)]
    world.run(world.service.refresh("example.org"))
    waits = []
    for _ in range(8):
        world.answers = [FederationError("example.org: unreachable")]
        with pytest.raises(FederationError):
            world.run(world.service.refresh("example.org"))
        waits.append(world.service.next_fetch("example.org") - world.clock.now())
    assert waits == [RETRY, 10, 20, 40, 80, 160, MAX_RETRY, MAX_RETRY]
    world.answers = [_bundle(2, hint=3600)]
    world.run(world.service.refresh("example.org"))  # back: the hint again, and a fresh start
    world.answers = [FederationError("example.org: unreachable")]
    with pytest.raises(FederationError):
        world.run(world.service.refresh("example.org"))
    assert world.service.next_fetch("example.org") == world.clock.now() + RETRY


def test_a_fetch_that_fails_unexpectedly_is_retried_less_and_less_often(world: World) -> None:
    # An error no refusal names (an endpoint found a bug) was retried every 5 s for ever, a
    # traceback each time, whatever the endpoint kept serving.
    def broken() -> SpiffeBundle:
        raise RuntimeError("what the endpoint served broke the fetch")

    waits = []
    for _ in range(4):
        world.answers = [broken]
        world.run(world.service.refresh_due())
        waits.append(world.service.next_fetch("example.org") - world.clock.now())
        world.clock.advance(waits[-1])  # type: ignore[attr-defined]
    assert waits == [RETRY, 10, 20, 40]
    world.answers = [_bundle(1, hint=3600)]
    world.run(world.service.refresh_due())
    assert world.service.next_fetch("example.org") == world.clock.now() + 3600


def test_a_failed_fetch_keeps_the_last_good_bundle(world: World) -> None:
    world.answers = [_bundle(1), FederationError("example.org: unreachable")]
    world.run(world.service.refresh("example.org"))
    with pytest.raises(FederationError, match="unreachable"):
        world.run(world.service.refresh("example.org"))
    assert world.service.bundle("example.org").sequence == 1


def test_a_bundle_not_stored_is_not_served_and_its_retries_back_off(world: World) -> None:
    """A store refusing the write (of any error: a driver's own, a value out of range) is a
    refused refresh: backed off like a failed fetch, and on the ledger as a refusal only, not
    as a change (it changed nothing), let alone one every 5 s."""
    waits = []
    for _ in range(3):
        world.answers = [_bundle(1)]
        world.store.inject(OverflowError("int too big"), method="write_ledger")
        with pytest.raises(BundleNotStoredError):
            world.run(world.service.refresh("example.org"))
        waits.append(world.service.next_fetch("example.org") - world.clock.now())
    assert waits == [RETRY, 10, 20]
    assert world.service.bundles() == {}
    assert [dict(p) for p in world.published] == [{}]
    kinds = [e["kind"] for e in world.store.inner.audit_rows(EventFilter())]
    assert kinds[-3:] == [BUNDLE_REFUSED] * 3
    assert world.changes() == 0
    # Set by hand: refused as unavailable (not the caller's fault), and on the ledger too.
    world.store.inject(StorageError("store the foreign bundle"), method="write_ledger")
    with pytest.raises(BundleNotStoredError) as raised:
        world.run(world.service.set_bundle("example.org", _bundle(1).to_json()))
    assert status_for(raised.value)[0] == grpc.StatusCode.UNAVAILABLE
    kinds = [e["kind"] for e in world.store.inner.audit_rows(EventFilter())]
    assert kinds[-1] == BUNDLE_REFUSED
    assert world.changes() == 0
    assert world.service.bundles() == {}


def test_a_bundle_not_on_the_ledger_is_not_stored_or_served(world: World) -> None:
    """The bundle is stored with the event recording its change, in one transaction, before
    it is served: when the event cannot be recorded, the bundle is not stored either."""
    world.answers = [_bundle(1)]
    _fail_recording(world.db, 1, lambda _held: None)
    with pytest.raises(BundleNotStoredError):
        world.run(world.service.refresh("example.org"))
    assert world.store.inner.list_foreign_bundles() == []
    assert world.service.bundles() == {}
    world.answers = [_bundle(1), _bundle(2)]
    world.run(world.service.refresh("example.org"))
    world.store.inject(sqlite3.OperationalError("disk full"), method="write_ledger")
    with pytest.raises(BundleNotStoredError):
        world.run(world.service.refresh("example.org"))
    assert [b.sequence for b in world.store.inner.list_foreign_bundles()] == [1]
    assert world.service.bundle("example.org").sequence == 1
    assert world.changes() == 1


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[SqliteDataStore | PostgresDataStore, Callable[[], None]]]:
    """A store of either backend and a way to make its next insert of a removal's event
    (BUNDLE_CHANGED without a sequence) fail inside its transaction, as a full disk would."""
    clock = FakeClock(1_700_000_000)
    store: SqliteDataStore | PostgresDataStore
    if request.param == "sqlite":
        sqlite_store = store = SqliteDataStore(tmp_path / "db", clock)

        def fail_removal() -> None:
            with sqlite_store.transaction() as conn:
                conn.execute(
                    "CREATE TEMP TRIGGER fail_removal BEFORE INSERT ON main.audit_events "
                    f"WHEN NEW.kind = '{BUNDLE_CHANGED}' "
                    "AND json_extract(NEW.extra, '$.sequence') IS NULL BEGIN "
                    "SELECT RAISE(ABORT, 'database or disk is full'); END"
                )

    else:
        dsn: str = request.getfixturevalue("postgres_dsn")
        store = PostgresDataStore(dsn, clock)

        def fail_removal() -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    "CREATE FUNCTION fail_removal() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    f"BEGIN IF NEW.kind = '{BUNDLE_CHANGED}' "
                    "AND NEW.extra::jsonb ->> 'sequence' IS NULL THEN "
                    "RAISE EXCEPTION 'could not extend file: No space left on device' "
                    "USING ERRCODE = 'disk_full'; END IF; RETURN NEW; END $$"
                )
                conn.execute(
                    "CREATE TRIGGER fail_removal BEFORE INSERT ON audit_events "
                    "FOR EACH ROW EXECUTE FUNCTION fail_removal()"
                )

    yield store, fail_removal
    store.close()


def test_a_bundle_is_deleted_with_the_event_recording_it_or_neither(
    backend: tuple[SqliteDataStore | PostgresDataStore, Callable[[], None]],
) -> None:
    """The removal of a foreign bundle is stored with the event recording it, in one
    transaction: when the event cannot be recorded, the bundle stays stored and served (a
    server dying between a delete and its record left a removal no ledger holds)."""
    store, fail_removal = backend
    clock = FakeClock(1_700_000_000)
    published: list[Mapping[str, SpiffeBundle]] = []
    service = FederationService(
        own=OWN,
        datastore=store,
        audit=AuditLog(store, clock),
        clock=clock,
        publish=published.append,
        static=(parse_static(STATIC, OWN),),
        fetch=lambda rel, known: _bundle(1),
    )
    service.load()
    try:
        asyncio.run(service.refresh("example.org"))

        def changes() -> list[dict[str, Any]]:
            return [
                json.loads(e["extra"]) for e in store.audit_rows(EventFilter(kind=BUNDLE_CHANGED))
            ]

        assert len(changes()) == 1
        fail_removal()
        with pytest.raises(LedgerError) as failed:
            asyncio.run(service.delete_bundle("example.org"))
        assert status_for(failed.value)[0] == grpc.StatusCode.UNAVAILABLE
        assert [b.sequence for b in store.list_foreign_bundles()] == [1], (
            "the bundle was deleted though its removal is not on the ledger"
        )
        assert len(changes()) == 1
        assert service.bundle("example.org").sequence == 1
        assert published[-1]["example.org"].sequence == 1
    finally:
        service.close()


def test_a_deleted_bundle_is_recorded_and_one_not_stored_is_not_found(world: World) -> None:
    world.answers = [_bundle(1)]
    world.run(world.service.refresh("example.org"))
    feed = world.store.inner.feed_head()
    world.run(world.service.delete_bundle("example.org"))
    assert world.store.inner.list_foreign_bundles() == []
    assert world.service.bundles() == {}
    assert "example.org" not in world.published[-1]
    last = list(world.store.inner.audit_rows(EventFilter(kind=BUNDLE_CHANGED)))[-1]
    assert json.loads(last["extra"]) == {"trust_domain": "example.org"}
    assert [i.key for i in world.store.inner.feed_since(feed, 10)] == ["example.org"]
    assert world.changes() == 2
    with pytest.raises(NotFoundError, match=r"no bundle for foreign trust domain example\.org"):
        world.run(world.service.delete_bundle("example.org"))
    assert world.changes() == 2


def test_static_relationships_stay_and_bundles_of_our_own_domain_are_refused(
    world: World,
) -> None:
    with pytest.raises(PermissionDeniedError, match="configuration file"):
        world.run(world.service.delete("example.org"))
    with pytest.raises(InvalidRequestError, match="own trust domain"):
        world.run(world.service.set_bundle("other.org", _bundle(1).to_json()))


def test_the_next_fetch_follows_the_refresh_hint_and_retries_sooner() -> None:
    assert next_refresh(_bundle(1, hint=90), ok=True) == 90
    assert next_refresh(_bundle(1, hint=90), ok=False) == RETRY
    assert next_refresh(_bundle(1, hint=2), ok=True) == MIN_REFRESH
    assert next_refresh(_bundle(1, hint=2), ok=True, floor=1) == 2
    assert next_refresh(_bundle(1, hint=2), ok=False, floor=1) == 2
    assert next_refresh(_bundle(1, hint=0), ok=True) == DEFAULT_REFRESH
    assert next_refresh(None, ok=True) == DEFAULT_REFRESH


def test_an_endpoint_announcing_a_tiny_hint_changes_its_bundle_at_most_once_a_floor(
    world: World,
) -> None:
    """An endpoint announcing a refresh hint of 1 s and a new bundle at every fetch wrote a
    federated_bundle_changed audit row a second, for as long as the relationship lasted."""
    served = iter(range(1, 10_000))
    world.answers = []

    def fetch(rel: FederationRelationship, known: SpiffeBundle | None) -> SpiffeBundle:
        return _bundle(next(served), hint=1)

    world.service._fetch = fetch
    minutes = 10
    for _ in range(minutes * 60):
        world.run(world.service.refresh_due())
        # The newest bundle is in force, and the next one never waits more than the floor.
        assert world.service.next_fetch("example.org") <= world.clock.now() + MIN_REFRESH
        world.clock.advance(1)
    assert world.changes() <= minutes + 1
    assert world.service.bundle("example.org").sequence == world.service.fetches


def _first_of_two_fetched(world: World) -> None:
    """The endpoint has two bundles, each with a refresh hint of 90 s: the first is fetched."""
    world.answers = [_bundle(1, hint=90), _bundle(2, hint=90)]
    world.run(world.service.refresh_due())


def test_a_step_back_of_the_clock_does_not_postpone_the_next_fetch(tmp_path: Path) -> None:
    # The next fetch is a refresh hint from the last: an interval. Due on the wall clock, a
    # step back of an hour postponed it by the hour, and keys the foreign domain dropped (or
    # added) meanwhile stayed trusted (or were refused) here that long.
    clock = SteppedClock(FakeClock(1_700_000_000))
    with world_on(tmp_path, clock) as world:
        _first_of_two_fetched(world)
        assert world.service.fetches == 1
        clock.offset = -3600.0  # the step back
        clock.base.advance(91)
        world.run(world.service.refresh_due())
        assert world.service.fetches == 2
        assert world.service.bundle("example.org").sequence == 2


def test_a_sleep_of_the_host_counts_towards_the_next_fetch(tmp_path: Path) -> None:
    # CLOCK_MONOTONIC stands still while the host is suspended: on it alone, the fetch due 90 s
    # after the last came 90 s after waking from a sleep of an hour, late by the whole interval.
    clock = SleptClock(FakeClock(1_700_000_000))
    with world_on(tmp_path, clock) as world:
        _first_of_two_fetched(world)
        assert world.service.next_fetch("example.org") == clock.now() + 90
        clock.sleep(3600.0)
        assert world.service.next_fetch("example.org") <= clock.now()
        world.run(world.service.refresh_due())
        assert world.service.fetches == 2
        assert world.service.bundle("example.org").sequence == 2


@pytest.mark.parametrize("hint", [10 * 365 * 86400, 2**63 - 1])
def test_a_refresh_hint_of_years_is_not_waited_out(world: World, hint: int) -> None:
    """One answer with a hint of years would stop the fetches (and hold the fetch lease) that
    long: keys the foreign domain drops meanwhile would stay trusted here."""
    assert next_refresh(_bundle(1, hint=hint), ok=True) == MAX_REFRESH
    assert lease_ttl(_bundle(1, hint=hint)) == 2 * MAX_REFRESH + 5
    world.answers = [_bundle(1, hint=hint)]
    world.run(world.service.refresh("example.org"))
    assert world.service.next_fetch("example.org") == world.clock.now() + MAX_REFRESH


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"federation_relationships": ["example.org https_spiffe"]}, "want"),
        ({"federation_relationships": ["example.org ftp https://x/"]}, "profile"),
        ({"federation_relationships": ["example.org https_spiffe https://x/ nope"]}, "endpoint"),
        ({"federation_relationships": ["other.org https_web https://x/"]}, "own trust domain"),
        # SPIFFE Federation 5.2.1.1 / 5.2.2.1: no userinfo (it went to the log and the ledger).
        (
            {"federation_relationships": ["example.org https_web https://u:secret@x/"]},
            "userinfo",
        ),
        ({"federation_relationships": ["example.org https_web https:///bundle"]}, "host"),
        ({"federation_min_refresh": 0}, "federation_min_refresh"),
        ({"federation_min_refresh": MAX_REFRESH + 1}, "federation_min_refresh: at most"),
        (
            {"bundle_endpoint_address": "127.0.0.1:1", "bundle_endpoint_profile": "https_web"},
            "bundle_endpoint_cert",
        ),
    ],
)
def test_federation_settings_are_checked_by_name(values: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build_config({"trust_domain": "other.org", **values})


def test_a_fetched_bundle_older_than_the_one_held_is_refused(world: World) -> None:
    world.answers = [_bundle(2), _bundle(1)]
    world.run(world.service.refresh("example.org"))
    with pytest.raises(FederationError, match="spiffe_sequence 1, older than the 2 held"):
        world.run(world.service.refresh("example.org"))
    assert world.service.bundle("example.org").sequence == 2
    refused = list(world.store.inner.audit_rows(EventFilter(kind=BUNDLE_REFUSED)))
    assert len(refused) == 1
    # A bundle without a sequence cannot be ordered: it is taken as it comes.
    world.answers = [_bundle(0)]
    assert world.run(world.service.refresh("example.org")).changed  # type: ignore[attr-defined]


def test_what_another_server_stored_is_adopted_but_not_over_a_newer_local_write(
    world: World,
) -> None:
    service = world.service
    before = service.read_stored()
    mark = service.follow_mark()
    world.run(service.set_bundle("example.org", _bundle(1).to_json()))
    # Read before the local write: adopting it would drop the bundle; it is left, and the
    # follower is asked to read again.
    assert service.apply_stored(before, mark)
    assert service.bundle("example.org").sequence == 1
    assert not service.apply_stored(service.read_stored(), service.follow_mark())
    # Rows written by another server (straight into the store here) are adopted and published.
    world.store.inner.create_relationship(
        FederationRelationship("third.org", "https://127.0.0.1:1/", "https_web")
    )
    world.store.inner.delete_foreign_bundle("example.org")
    assert not service.apply_stored(service.read_stored(), service.follow_mark())
    assert [r.trust_domain for r, _ in service.relationships()] == ["example.org", "third.org"]
    assert service.next_fetch("third.org") == world.clock.now() + FOLLOWED_DELAY
    assert service.bundles() == {}
    assert dict(world.published[-1]) == {}
    world.store.inner.delete_relationship("third.org")
    service.apply_stored(service.read_stored(), service.follow_mark())
    assert [r.trust_domain for r, _ in service.relationships()] == ["example.org"]
    assert service.next_fetch("third.org") is None


def test_one_server_makes_each_scheduled_fetch_and_another_takes_over(tmp_path: Path) -> None:
    """Two services on one datastore file, both with the relationship due: the fetch lease
    lets one fetch; the other adopts its bundle, and fetches once the holder stops renewing
    (or at once when it hands the lease over)."""
    clock = FakeClock(1_700_000_000)
    counts = {"a": 0, "b": 0}
    services = {}
    stores = []
    for name in ("a", "b"):
        store = SqliteDataStore(tmp_path / "db", clock)
        stores.append(store)

        def fetch(
            rel: FederationRelationship, known: SpiffeBundle | None, name: str = name
        ) -> SpiffeBundle:
            counts[name] += 1
            return _bundle(sum(counts.values()), hint=90)

        services[name] = FederationService(
            own=OWN,
            datastore=store,
            audit=AuditLog(store, clock),
            clock=clock,
            publish=lambda _bundles: None,
            static=(parse_static(STATIC, OWN),),
            fetch=fetch,
            holder=name,
        )
        services[name].load()
    a, b = services["a"], services["b"]

    def tick(service: FederationService) -> None:
        asyncio.run(service.refresh_due())
        service.apply_stored(service.read_stored(), service.follow_mark())

    try:
        tick(a)
        tick(b)
        assert counts == {"a": 1, "b": 0}
        assert b.bundle("example.org").sequence == 1  # adopted from the store
        assert b.next_fetch("example.org") == clock.now() + 90
        clock.advance(91)
        tick(a)  # the holder fetches again and keeps the lease
        tick(b)
        assert counts == {"a": 2, "b": 0}
        clock.advance(200)  # A has died: its lease (185 s) lapses, B takes the fetch over
        tick(b)
        assert counts == {"a": 2, "b": 1}
        assert a.bundle("example.org").sequence == 2
        tick(a)
        assert a.bundle("example.org").sequence == 3  # B's, adopted
        b.release_leases()
        clock.advance(91)
        tick(a)  # handed over at once, not when the lease would lapse
        assert counts == {"a": 3, "b": 1}
    finally:
        for store in stores:
            store.close()


def test_a_server_lagging_the_feed_does_not_store_an_older_bundle_over_a_newer_one(
    tmp_path: Path,
) -> None:
    """B has not yet followed A's write of sequence 3 when its own fetch, from a lagging
    endpoint replica, brings sequence 2: newer than B's copy, older than what is stored. The
    store keeps 3; without that every server would adopt 2 (stored rows are the truth)."""
    clock = FakeClock(1_700_000_000)
    answers: dict[str, list[SpiffeBundle]] = {"a": [], "b": []}
    services: dict[str, FederationService] = {}
    stores = []
    for name in ("a", "b"):
        store = SqliteDataStore(tmp_path / "db", clock)
        stores.append(store)

        def fetch(
            rel: FederationRelationship, known: SpiffeBundle | None, name: str = name
        ) -> SpiffeBundle:
            return answers[name].pop(0)

        services[name] = FederationService(
            own=OWN,
            datastore=store,
            audit=AuditLog(store, clock),
            clock=clock,
            publish=lambda _bundles: None,
            static=(parse_static(STATIC, OWN),),
            fetch=fetch,
        )
        services[name].load()
    a, b = services["a"], services["b"]
    try:
        answers["a"] = [_bundle(1), _bundle(3)]
        asyncio.run(a.refresh("example.org"))
        b.apply_stored(b.read_stored(), b.follow_mark())
        assert b.bundle("example.org").sequence == 1
        asyncio.run(a.refresh("example.org"))  # 3, stored; B has not followed it yet
        answers["b"] = [_bundle(2)]
        changes = len(list(stores[0].audit_rows(EventFilter(kind=BUNDLE_CHANGED))))
        with pytest.raises(FederationError, match="older than the one another server stored"):
            asyncio.run(b.refresh("example.org"))
        # Refused by the store: on the ledger as a refusal, not as a change that did not happen.
        assert len(list(stores[0].audit_rows(EventFilter(kind=BUNDLE_CHANGED)))) == changes
        assert [e["kind"] for e in stores[0].audit_rows(EventFilter())][-1] == BUNDLE_REFUSED
        for service in (a, b):
            service.apply_stored(service.read_stored(), service.follow_mark())
            assert service.bundle("example.org").sequence == 3
        # Set by hand, a lower sequence stands (an operator undoing a bad bundle).
        asyncio.run(b.set_bundle("example.org", _bundle(1).to_json()))
        a.apply_stored(a.read_stored(), a.follow_mark())
        assert a.bundle("example.org").sequence == 1
    finally:
        for store in stores:
            store.close()


def _static_service(
    store: SqliteDataStore,
    clock: FakeClock,
    domains: list[str],
    fetch: Callable[[FederationRelationship, SpiffeBundle | None], SpiffeBundle],
    holder: str = "",
) -> FederationService:
    """A loaded service with a static https_web relationship to each of `domains`, its fetch
    leases claimed as `holder` (none without)."""
    service = FederationService(
        own=OWN,
        datastore=store,
        audit=AuditLog(store, clock),
        clock=clock,
        publish=lambda _bundles: None,
        static=tuple(parse_static(f"{d} https_web https://127.0.0.1:1/", OWN) for d in domains),
        fetch=fetch,
        holder=holder,
    )
    service.load()
    return service


def test_due_relationships_are_fetched_side_by_side_a_few_at_a_time(tmp_path: Path) -> None:
    """Six relationships due, each fetch held: FETCHES_AT_ONCE run together (not one after the
    other, which let one slow endpoint hold every other up), the rest as slots free."""
    clock = FakeClock(1_700_000_000)
    store = SqliteDataStore(tmp_path / "db", clock)
    lock = threading.Lock()
    running: list[str] = []
    most = 0
    release = threading.Event()

    def fetch(rel: FederationRelationship, known: SpiffeBundle | None) -> SpiffeBundle:
        nonlocal most
        with lock:
            running.append(rel.trust_domain)
            most = max(most, len(running))
        release.wait(10)
        with lock:
            running.remove(rel.trust_domain)
        raise FederationError(f"{rel.trust_domain}: held, then down")

    domains = [f"d{i}.org" for i in range(6)]
    service = _static_service(store, clock, domains, fetch)

    async def scenario() -> None:
        refreshing = asyncio.create_task(service.refresh_due())
        for _ in range(200):
            if len(running) == FETCHES_AT_ONCE:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # a fifth would have started by now
        assert len(running) == FETCHES_AT_ONCE
        release.set()
        await asyncio.wait_for(refreshing, 10)

    try:
        asyncio.run(scenario())
        assert most == FETCHES_AT_ONCE
        assert service.fetches == len(domains)
        assert all(service.next_fetch(d) == clock.now() + RETRY for d in domains)
    finally:
        release.set()
        store.close()


def test_hanging_fetches_leave_the_default_thread_pool_to_the_rest_of_the_server(
    tmp_path: Path,
) -> None:
    """FETCHES_AT_ONCE endpoints hanging hold threads of the service's own pool: a call the
    rest of the server makes through asyncio.to_thread (entry writes, admission, the admin
    API) still runs at once, even were the default pool no bigger than FETCHES_AT_ONCE."""
    clock = FakeClock(1_700_000_000)
    store = SqliteDataStore(tmp_path / "db", clock)
    lock = threading.Lock()
    running: list[str] = []
    release = threading.Event()

    def fetch(rel: FederationRelationship, known: SpiffeBundle | None) -> SpiffeBundle:
        with lock:
            running.append(rel.trust_domain)
        release.wait(10)
        raise FederationError(f"{rel.trust_domain}: hung, then down")

    domains = [f"d{i}.org" for i in range(FETCHES_AT_ONCE)]
    service = _static_service(store, clock, domains, fetch)

    async def scenario() -> None:
        default = concurrent.futures.ThreadPoolExecutor(FETCHES_AT_ONCE)
        asyncio.get_running_loop().set_default_executor(default)
        refreshing = asyncio.create_task(service.refresh_due())
        for _ in range(200):
            if len(running) == FETCHES_AT_ONCE:
                break
            await asyncio.sleep(0.01)
        assert len(running) == FETCHES_AT_ONCE
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "ran"), 2) == "ran"
        release.set()
        await asyncio.wait_for(refreshing, 10)

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        service.close()
        store.close()


def test_an_operators_refresh_answers_at_once_while_the_scheduled_fetches_hang(
    tmp_path: Path,
) -> None:
    """FETCHES_AT_ONCE endpoints that never answer hold every thread of the scheduled fetches
    up to their deadline: an operator's refresh of a healthy endpoint waited behind them (10 s
    in service). It has a lane of its own and answers at once."""
    timeout = 2.0
    clock = FakeClock(1_700_000_000)
    store = SqliteDataStore(tmp_path / "db", clock)
    silent = [SilentEndpoint() for _ in range(FETCHES_AT_ONCE)]
    served = _bundle(1).to_json()
    with serving_https(lambda _path: (200, served, {}), "fla") as (url, ca_file):
        service = FederationService(
            own=OWN,
            datastore=store,
            audit=AuditLog(store, clock),
            clock=clock,
            publish=lambda _bundles: None,
            static=(
                *(
                    parse_static(f"hang{i}.org https_web {s.url}", OWN)
                    for i, s in enumerate(silent)
                ),
                parse_static(f"example.org https_web {url}/ {ca_file}", OWN),
            ),
            fetch=functools.partial(fetch_bundle, timeout=timeout),
        )
        service.load()

        async def scenario() -> float:
            scheduled = asyncio.create_task(service.refresh_due())
            for endpoint in silent:
                assert await asyncio.to_thread(endpoint.held.wait, timeout)
            asked = time.monotonic()
            done = await asyncio.wait_for(service.refresh("example.org"), timeout)
            took = time.monotonic() - asked
            assert done.changed
            await asyncio.wait_for(scheduled, 3 * timeout)
            return took

        try:
            took = asyncio.run(scenario())
            assert took < timeout / 2, f"the operator's refresh took {took:.1f} s"
            assert service.bundle("example.org").sequence == 1
        finally:
            service.close()
            for endpoint in silent:
                endpoint.close()
            store.close()


def test_a_partner_whose_names_never_resolve_does_not_fail_another_partners_fetch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A partner's nameservers that never answer hold a lookup thread per name of theirs
    (each fetch gives up at its deadline; the resolver cannot be cut). Those counted against
    one cap for the process: one partner's names (its endpoint moved from name to name) filled
    it, and every other relationship's fetch failed at once while they hung. Counted against
    the relationship, they fill its own few lookups, and the other's fetch goes through; the
    threads they hold stay that few."""
    # Only the resolver is stood in for (no name hangs here); localhost is looked up for real.
    real = socket.getaddrinfo
    release = threading.Event()

    def hung(host: str, *args: object, **kwargs: object) -> list[tuple]:  # type: ignore[type-arg]
        if host.endswith(".hung.test"):
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "temporary failure in name resolution")
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    _no_lookup_pending()  # another test's, released, may still be ending
    before = _lookup_threads()
    monkeypatch.setattr(socket, "getaddrinfo", hung)
    served = _bundle(1).to_json()
    refusals: list[str] = []
    with serving_https(lambda _path: (200, served, {}), "fpl") as (url, ca_file):
        other = parse_static(
            f"example.org https_web https://localhost:{urlsplit(url).port}/ {ca_file}", OWN
        )
        try:
            # As many names as the process may look up at once, and more than it once could.
            for i in range(https_get.LOOKUPS_AT_ONCE):
                partner = parse_static(f"hung.org https_web https://n{i}.hung.test/", OWN)
                # The party's own lookups hang until their fetches give up; the rest must be
                # refused at once, before a deadline a loaded machine could pass first.
                hangs = i < https_get.PARTY_LOOKUPS_AT_ONCE
                with pytest.raises(FederationError) as failed:
                    fetch_bundle(partner, None, timeout=0.05 if hangs else 1.0)
                if "under way" in str(failed.value):
                    refusals.append(str(failed.value))
            held = _lookup_threads() - before
            fetched = fetch_bundle(other, None, timeout=5)
        finally:
            release.set()
    _no_lookup_pending()
    assert fetched.sequence == 1
    assert held <= https_get.PARTY_LOOKUPS_AT_ONCE
    assert len(refusals) == https_get.LOOKUPS_AT_ONCE - https_get.PARTY_LOOKUPS_AT_ONCE
    assert "name lookups for hung.org are under way" in refusals[0]


def _lookup_threads() -> int:
    return sum(t.name == "https-get-resolve" and t.is_alive() for t in threading.enumerate())


def _no_lookup_pending() -> None:
    """Wait for the lookups under way, and their threads, to end (an earlier test's)."""
    deadline = time.monotonic() + 5
    while (https_get._LOOKUPS._pending or _lookup_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not https_get._LOOKUPS._pending


def _fail_recording(
    store: SqliteDataStore, sequence: int, meanwhile: Callable[[bytes | None], None]
) -> None:
    """Make this server's (`store`'s connection's) next insert of the event recording a change
    to `sequence` fail inside its transaction, as a full disk would, once `meanwhile` ran
    there with the example.org bundle its own transaction holds at that point (another
    server's look at the store goes in it)."""
    fired: list[bool] = []

    def fail(bundle: bytes | None) -> bool:
        if fired:
            return False
        fired.append(True)
        meanwhile(bundle)
        return True

    with store.transaction() as conn:
        conn.create_function("fail_recording", 1, fail)
        conn.execute(
            "CREATE TEMP TRIGGER fail_recording BEFORE INSERT ON main.audit_events "
            f"WHEN NEW.kind = '{BUNDLE_CHANGED}' "
            f"AND json_extract(NEW.extra, '$.sequence') = {sequence} BEGIN "
            "SELECT RAISE(ABORT, 'database or disk is full') WHERE fail_recording(("
            "SELECT bundle FROM main.foreign_bundles WHERE trust_domain = 'example.org')); END"
        )


def _sequence_of(bundle: bytes | None) -> int | None:
    return None if bundle is None else int(json.loads(bundle)["spiffe_sequence"])


def _recorded(store: SqliteDataStore | PostgresDataStore) -> list[int]:
    """The sequences of the bundle changes on the ledger, in order."""
    changes = store.audit_rows(EventFilter(kind=BUNDLE_CHANGED))
    return [json.loads(e["extra"])["sequence"] for e in changes]


Answer = SpiffeBundle | Callable[[], SpiffeBundle]


def _two_servers(
    tmp_path: Path,
    clock: FakeClock,
    answers: dict[str, list[Answer]],
    published: list[Mapping[str, SpiffeBundle]],
) -> tuple[list[SqliteDataStore], FederationService, FederationService]:
    """Servers A and B on one SQLite file, each fetching the next of its `answers` (a
    callable: what it returns, once it ran); what A publishes goes to `published`."""
    stores = []
    services = []
    for name in ("a", "b"):
        store = SqliteDataStore(tmp_path / "db", clock)
        stores.append(store)

        def fetch(
            rel: FederationRelationship, known: SpiffeBundle | None, name: str = name
        ) -> SpiffeBundle:
            answer = answers[name].pop(0)
            return answer if isinstance(answer, SpiffeBundle) else answer()

        service = FederationService(
            own=OWN,
            datastore=store,
            audit=AuditLog(store, clock),
            clock=clock,
            publish=published.append if name == "a" else lambda _bundles: None,
            static=(parse_static(STATIC, OWN),),
            fetch=fetch,
        )
        service.load()
        services.append(service)
    return stores, services[0], services[1]


def test_a_change_not_recorded_does_not_set_back_a_newer_bundle_another_server_stored(
    tmp_path: Path,
) -> None:
    """A's write of sequence 2 fails with the event recording it (one transaction); B then
    stores and records sequence 3. Nothing of A's failure may undo B's acknowledged write
    (setting the store back to the 1 A served did): every server would serve 1 while the
    ledger's last change says 3. And B storing 3 between A's fetch of 2 and A's write has
    A's write refused whole, recorded as a refusal only."""
    clock = FakeClock(1_700_000_000)
    answers: dict[str, list[Answer]] = {"a": [_bundle(1), _bundle(2)], "b": [_bundle(3)]}
    stores, a, b = _two_servers(tmp_path, clock, answers, [])
    try:
        asyncio.run(a.refresh("example.org"))
        b.apply_stored(b.read_stored(), b.follow_mark())
        _fail_recording(stores[0], 2, lambda _held: None)
        with pytest.raises(BundleNotStoredError):
            asyncio.run(a.refresh("example.org"))
        assert [r.sequence for r in stores[1].list_foreign_bundles()] == [1]
        asyncio.run(b.refresh("example.org"))
        assert [r.sequence for r in stores[1].list_foreign_bundles()] == [3]
        assert _recorded(stores[1]) == [1, 3]
        for service in (a, b):
            service.apply_stored(service.read_stored(), service.follow_mark())
            assert service.bundle("example.org").sequence == 3
        # B stores 4 between A's fetch of 3 (from a lagging endpoint replica) and A's write.
        answers["b"] = [_bundle(4)]

        def fetched_while_b_stores() -> SpiffeBundle:
            asyncio.run(b.refresh("example.org"))
            return _bundle(3)

        answers["a"] = [fetched_while_b_stores]
        with pytest.raises(FederationError, match="older than the one another server stored"):
            asyncio.run(a.refresh("example.org"))
        assert [r.sequence for r in stores[0].list_foreign_bundles()] == [4]
        assert _recorded(stores[0]) == [1, 3, 4]
        assert [e["kind"] for e in stores[0].audit_rows(EventFilter())][-1] == BUNDLE_REFUSED
    finally:
        for service in (a, b):
            service.close()
        for store in stores:
            store.close()


def test_a_bundle_whose_change_was_not_recorded_is_not_served_through_the_feed(
    tmp_path: Path,
) -> None:
    """The bundle and the event recording its change are stored in one transaction: another
    server reading the store while this one writes finds the bundle before (what the ledger
    holds), never the new one; when the event cannot be recorded, the bundle is gone with it,
    so no follower installs and serves a bundle the ledger never recorded."""
    clock = FakeClock(1_700_000_000)
    answers: dict[str, list[Answer]] = {"a": [_bundle(1), _bundle(2)], "b": []}
    published: list[Mapping[str, SpiffeBundle]] = []
    stores, a, b = _two_servers(tmp_path, clock, answers, published)
    try:
        asyncio.run(a.refresh("example.org"))
        mark, other_mark = a.follow_mark(), b.follow_mark()
        held: list[int | None] = []
        read: list[Stored] = []

        def meanwhile(bundle: bytes | None) -> None:
            held.append(_sequence_of(bundle))
            read.append(b.read_stored())  # another server's look, mid-transaction

        _fail_recording(stores[0], 2, meanwhile)
        with pytest.raises(BundleNotStoredError):
            asyncio.run(a.refresh("example.org"))
        assert held == [2], "the bundle is written in the transaction that fails"
        (seen,) = read
        assert seen.bundles["example.org"].sequence == 1
        b.apply_stored(seen, other_mark)
        a.apply_stored(a.read_stored(), mark)
        assert _recorded(stores[0]) == [1]
        assert [r.sequence for r in stores[0].list_foreign_bundles()] == [1]
        for service in (a, b):
            assert service.bundle("example.org").sequence == 1, "serves a bundle never recorded"
        assert [p["example.org"].sequence for p in published if "example.org" in p] == [1]
        assert [e["kind"] for e in stores[0].audit_rows(EventFilter())][-1] == BUNDLE_REFUSED
    finally:
        for service in (a, b):
            service.close()
        for store in stores:
            store.close()


def _blocked_by(conn: psycopg.Connection[tuple[object, ...]], key: tuple[int, int]) -> list[int]:
    """The backends (pids) waiting, directly or not, on the one waiting for advisory lock
    `key`, that one first; [] while none waits for it."""
    row = conn.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND classid = %s AND objid = %s AND objsubid = 2",
        key,
    ).fetchone()
    if row is None:
        return []
    waiting = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", (row[0],)
    ).fetchall()
    return [int(str(row[0])), *(int(str(r[0])) for r in waiting)]


def test_a_change_not_recorded_on_postgresql_keeps_a_bundle_another_server_stored_meanwhile(
    postgres_dsn: str,
) -> None:
    """On PostgreSQL servers write at once: A's write of sequence 2 fails (a full disk) at the
    event recording it, while B stores and records sequence 3. A's write goes whole: B's
    acknowledged bundle stays stored, and no server serves A's 2 or falls back to 1."""
    clock = FakeClock(1_700_000_000)
    stores = [PostgresDataStore(postgres_dsn, clock) for _ in range(2)]
    answers = {"a": [_bundle(1), _bundle(2)], "b": [_bundle(3)]}
    services = []
    for name, store in zip("ab", stores, strict=True):
        service = FederationService(
            own=OWN,
            datastore=store,
            audit=AuditLog(store, clock),
            clock=clock,
            publish=lambda _bundles: None,
            static=(parse_static(STATIC, OWN),),
            fetch=lambda rel, known, name=name: answers[name].pop(0),
        )
        service.load()
        services.append(service)
    a, b = services
    key = (secrets.randbits(31), secrets.randbits(31))
    outcome: dict[str, BaseException | None] = {}

    def refresh(name: str, service: FederationService) -> threading.Thread:
        def run() -> None:
            try:
                asyncio.run(service.refresh("example.org"))
                outcome[name] = None
            except BaseException as exc:
                outcome[name] = exc

        thread = threading.Thread(target=run)
        thread.start()
        return thread

    def wait_for(blocked: int, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        deadline = time.monotonic() + 10
        while len(_blocked_by(conn, key)) < blocked:
            assert time.monotonic() < deadline, "the writes did not meet"
            time.sleep(0.02)

    try:
        asyncio.run(a.refresh("example.org"))
        with psycopg.connect(postgres_dsn, autocommit=True) as watch:
            with psycopg.connect(postgres_dsn) as disk:
                disk.execute("SELECT pg_advisory_xact_lock(%s, %s)", key)
                # The full disk: A's event for 2 waits for the lock this test holds, then fails.
                watch.execute(
                    "CREATE FUNCTION fail_recording() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    f"BEGIN IF NEW.kind = '{BUNDLE_CHANGED}' "
                    "AND NEW.extra::jsonb ->> 'sequence' = '2' THEN "
                    f"PERFORM pg_advisory_xact_lock({key[0]}, {key[1]}); "
                    "RAISE EXCEPTION 'could not extend file: No space left on device' "
                    "USING ERRCODE = 'disk_full'; END IF; RETURN NEW; END $$"
                )
                watch.execute(
                    "CREATE TRIGGER fail_recording BEFORE INSERT ON audit_events "
                    "FOR EACH ROW EXECUTE FUNCTION fail_recording()"
                )
                threads = [refresh("a", a)]
                wait_for(1, watch)  # A is recording 2
                threads.append(refresh("b", b))
                wait_for(2, watch)  # B's write waits on A's
            for thread in threads:
                thread.join(timeout=30)
        assert isinstance(outcome["a"], BundleNotStoredError)
        assert outcome["b"] is None
        assert [r.sequence for r in stores[0].list_foreign_bundles()] == [3], (
            "A's failure set the store back over B's newer, recorded bundle"
        )
        assert _recorded(stores[0]) == [1, 3]
        for service in (a, b):
            service.apply_stored(service.read_stored(), service.follow_mark())
            assert service.bundle("example.org").sequence == 3
    finally:
        for service in (a, b):
            service.close()
        for store in stores:
            store.close()


def test_a_deleted_relationship_leaves_nothing_of_its_fetches_behind(tmp_path: Path) -> None:
    """Relationships created, fetched (failing) and deleted: each name left its fetch lock,
    schedule count, retry backoff and a claimed fetch lease (a row in the datastore until a
    clean stop) behind, for every trust domain ever federated with."""
    clock = FakeClock(1_700_000_000)
    store = SqliteDataStore(tmp_path / "db", clock)
    fetching, answer = threading.Event(), threading.Event()

    def unreachable(rel: FederationRelationship, known: SpiffeBundle | None) -> SpiffeBundle:
        if rel.trust_domain.startswith("held"):  # out while the relationship is deleted
            fetching.set()
            answer.wait(10)
        raise FederationError(f"{rel.trust_domain}: unreachable")

    service = _static_service(store, clock, [], unreachable, holder="a")
    names = [f"gone{n}.org" for n in range(20)]
    try:
        for name in names:
            rel = FederationRelationship(name, "https://127.0.0.1:1/", "https_web")
            asyncio.run(service.create(rel))
            asyncio.run(service.refresh_due())  # claims the fetch lease, fails, backs off
            asyncio.run(service.delete(name))

        async def deleted_while_fetched(name: str) -> None:
            fetching.clear()
            answer.clear()
            await service.create(FederationRelationship(name, "https://127.0.0.1:1/", "https_web"))
            fetch = asyncio.create_task(service.refresh_due())
            assert await asyncio.to_thread(fetching.wait, 10)
            await service.delete(name)
            answer.set()
            await fetch

        held = [f"held{n}.org" for n in range(3)]
        for name in held:
            asyncio.run(deleted_while_fetched(name))
        names += held
        for kept in (service._locks, service._schedules, service._retries, service._claimed):
            assert not set(kept) & set(names)
        with sqlite3.connect(tmp_path / "db") as db:
            assert db.execute("SELECT count(*) FROM leases").fetchone() == (0,)
    finally:
        store.close()


def test_the_write_count_of_a_deleted_relationship_goes_once_the_follower_reads_past_it(
    world: World,
) -> None:
    """Each trust domain written here kept a count of its last write for good: relationships
    an admin makes and deletes under new names grew the service without bound."""
    service = world.service
    names = [f"churned{n}.org" for n in range(20)]
    for name in names:
        before, mark = service.read_stored(), service.follow_mark()
        rel = FederationRelationship(name, "https://127.0.0.1:1/", "https_web")
        world.run(service.create(rel))
        world.run(service.delete(name))
        service.apply_stored(before, mark)  # a read from before the writes keeps the count
        assert name in service._written
        assert not service.apply_stored(service.read_stored(), service.follow_mark())
    assert not set(service._written) & set(names)
