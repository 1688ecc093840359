"""A PostgreSQL connection lost while its COMMIT was in flight: the database may have committed
it (the COMMIT reached it; its answer did not come back), so the caller is told the outcome is
unknown, not that nothing was written. A connection lost before the COMMIT is a write that was
not made (PostgreSQL rolls back a transaction whose session ended): storage unavailable, as it
is. Either way the store goes on: PostgreSQL's own server decides what is committed, and the
server's view follows what it holds through the change feed (no fail-stop here)."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from server.datastore.errors import CommitUnknownError, StorageError, UnreachableError
from server.datastore.postgres import PostgresDataStore
from server.status import (
    OUTCOME_UNKNOWN_MESSAGE,
    OUTCOME_UNKNOWN_SERVING_MESSAGE,
    STORAGE_MESSAGE,
    status_for,
)
from svid._clock import FakeClock
from svid._proto import admin_pb2, common_pb2
from tests.server.fixtures import TRUST_DOMAIN, managed_server
from tests.server.tcp_cut import COMMIT_MESSAGE, CuttableRelay, upstream_of
from tests.server.test_datastore import entry
from tests.server.test_replication_servers import wait_until
from tests.server.test_server_postgres import kek_file, with_password

pytest.importorskip("psycopg")

# Long enough for a loaded machine; the events awaited come in milliseconds.
WAIT = 15.0


@pytest.fixture
def relay(postgres_dsn: str) -> Iterator[CuttableRelay]:
    relay = CuttableRelay(upstream_of(postgres_dsn))
    yield relay
    relay.cut()


def _spiffe_ids(store: PostgresDataStore) -> list[str]:
    return sorted(e.spiffe_id for e in store.list_entries())


def test_a_connection_lost_at_commit_leaves_the_outcome_unknown_and_the_store_goes_on(
    postgres_dsn: str, relay: CuttableRelay
) -> None:
    clock = FakeClock(1000.0)
    dsn = with_password(relay.dsn_through(postgres_dsn))
    store = PostgresDataStore(dsn, clock)
    direct = PostgresDataStore(postgres_dsn, clock)
    try:
        answered = relay.cut_on(b"/lost-at-commit", then=COMMIT_MESSAGE)
        with pytest.raises(CommitUnknownError) as unknown:
            store.create_entry(entry("/lost-at-commit"))
        assert answered.wait(WAIT), "the database never answered the COMMIT"
        # It was committed after all: this write's caller must not take it for failed.
        assert _spiffe_ids(direct) == ["spiffe://example.org/lost-at-commit"]
        said = str(unknown.value)
        assert "unknown" in said
        assert "postgresql://postgres:***@" in said  # which datastore, without its password
        assert "not-logged-pw" not in said
        assert "server stops" not in said  # PostgreSQL's own server decides, not a restart
        code, message = status_for(unknown.value)
        assert code is grpc.StatusCode.UNAVAILABLE
        assert "the outcome of this call is unknown" in message
        assert message != OUTCOME_UNKNOWN_MESSAGE  # which says the server is stopping
        assert "stopping" not in message
        # No fail-stop: the next write, on a fresh connection, is taken.
        store.create_entry(entry("/after"))
        assert _spiffe_ids(store) == [
            "spiffe://example.org/after",
            "spiffe://example.org/lost-at-commit",
        ]
    finally:
        store.close()
        direct.close()


def test_a_session_terminated_while_its_commit_waits_is_an_outcome_unknown(
    postgres_dsn: str,
) -> None:
    """pg_terminate_backend (an operator's, a failover's) while the COMMIT waits on a lock (a
    deferred trigger's here; a synchronous standby's acknowledgement in production, after the
    local commit): PostgreSQL's FATAL is the only answer, and says nothing of the outcome."""
    import psycopg

    from tests import postgres

    clock = FakeClock(1000.0)
    app = f"svidd-test-commit-{secrets.token_hex(4)}"
    store = PostgresDataStore(f"{postgres_dsn}&application_name={app}", clock)
    try:
        with psycopg.connect(postgres_dsn, autocommit=True) as setup:
            setup.execute(
                "CREATE FUNCTION wait_at_commit() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$"
            )
            setup.execute(
                "CREATE CONSTRAINT TRIGGER wait_at_commit AFTER INSERT ON entries "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_at_commit()"
            )
        with (
            psycopg.connect(postgres.server_dsn(), autocommit=True) as holder,
            psycopg.connect(postgres.server_dsn(), autocommit=True) as admin,
        ):
            holder.execute("BEGIN")
            holder.execute("SELECT pg_advisory_xact_lock(4242)")  # held: the COMMIT waits
            failed: list[BaseException] = []

            def write() -> None:
                try:
                    store.create_entry(entry("/terminated"))
                except Exception as e:  # the test looks at it
                    failed.append(e)

            writer = threading.Thread(target=write)
            writer.start()
            waiting = (
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                "AND wait_event_type = 'Lock' AND query = 'COMMIT'"
            )
            (pid,) = wait_until(
                lambda: admin.execute(waiting, (app,)).fetchone(), WAIT, "the COMMIT to wait"
            )
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            writer.join(WAIT)
            holder.execute("ROLLBACK")
        assert len(failed) == 1
        assert isinstance(failed[0], CommitUnknownError), failed[0]
        assert store.list_entries() == []  # this time it was not committed: unknown it is
    finally:
        store.close()


def test_a_connection_lost_before_commit_is_a_write_not_made(
    postgres_dsn: str, relay: CuttableRelay
) -> None:
    clock = FakeClock(1000.0)
    store = PostgresDataStore(relay.dsn_through(postgres_dsn), clock)
    try:
        answered = relay.cut_on(b"/lost-before-commit")  # the INSERT's own message
        with pytest.raises(UnreachableError) as refused:
            store.create_entry(entry("/lost-before-commit"))
        assert not isinstance(refused.value, CommitUnknownError)
        assert status_for(refused.value) == (grpc.StatusCode.UNAVAILABLE, STORAGE_MESSAGE)
        answered.wait(WAIT)
        assert _spiffe_ids(store) == []  # PostgreSQL rolled it back with the session
    finally:
        store.close()


def test_a_commit_sent_after_the_session_was_ended_idle_is_a_write_not_made(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer paused inside its transaction (its host suspended, its VM paused) past the
    idle-in-transaction bound: PostgreSQL ended the session before the COMMIT came, and its
    FATAL (25P03) is what the COMMIT reads. The transaction was rolled back with the session:
    storage unavailable (a retry is safe), not an outcome unknown."""
    import psycopg

    from server.datastore import postgres as postgres_module
    from tests import postgres

    monkeypatch.setattr(postgres_module, "IDLE_IN_TRANSACTION_TIMEOUT", 0.2)
    clock = FakeClock(1000.0)
    store = PostgresDataStore(postgres_dsn, clock)

    def paused(cur: Any) -> None:
        cur.execute("INSERT INTO counters (name, value) VALUES ('paused', 1)")
        cur.execute("SELECT pg_backend_pid()")
        (pid,) = cur.fetchone()
        with psycopg.connect(postgres.server_dsn(), autocommit=True) as admin:
            alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
            wait_until(
                lambda: admin.execute(alive, (pid,)).fetchone() == (0,),
                WAIT,
                "the idle session to be ended",
            )
        # Returns: the COMMIT goes out on the ended session.

    try:
        with pytest.raises(StorageError) as refused:
            store._write("pause in a transaction", paused)
        assert not isinstance(refused.value, CommitUnknownError), refused.value
        assert "idle-in-transaction" in str(refused.value)
        assert status_for(refused.value) == (grpc.StatusCode.UNAVAILABLE, STORAGE_MESSAGE)
        with psycopg.connect(postgres_dsn, autocommit=True) as direct:
            kept = direct.execute("SELECT count(*) FROM counters WHERE name = 'paused'")
            assert kept.fetchone() == (0,)  # rolled back with the session
    finally:
        store.close()


def test_a_connection_lost_just_after_a_commit_was_answered_is_a_write_made(
    postgres_dsn: str, relay: CuttableRelay
) -> None:
    """An entry write is bulk work: after its COMMIT, its connection's timeouts are reset. A
    connection lost there failed a write PostgreSQL had said was committed."""
    clock = FakeClock(1000.0)
    store = PostgresDataStore(relay.dsn_through(postgres_dsn), clock)
    try:
        answered = relay.cut_on(b"/lost-after-commit", then=b"RESET statement_timeout")
        stored = store.create_entry(entry("/lost-after-commit"))
        assert answered.wait(WAIT)
        assert [e.id for e in store.list_entries()] == [stored.id]
        store.create_entry(entry("/after"))  # on a fresh connection
    finally:
        store.close()


def test_an_audit_write_lost_at_commit_is_unknown_and_the_log_goes_on_from_the_database(
    postgres_dsn: str, relay: CuttableRelay
) -> None:
    """The event was committed: its caller hears the outcome is unknown (through the log's
    LedgerError), and the log goes on after it from the database's head, the chain whole."""
    from server.audit.log import AuditLog

    clock = FakeClock(1000.0)
    store = PostgresDataStore(relay.dsn_through(postgres_dsn), clock)
    try:
        log = AuditLog(store, clock)
        log.append("probe", resource="before")
        answered = relay.cut_on(b"lost-at-commit", then=COMMIT_MESSAGE)
        with pytest.raises(Exception) as lost:  # noqa: PT011 - the log's wrapper of it
            log.append("probe", resource="lost-at-commit")
        assert answered.wait(WAIT)
        assert status_for(lost.value)[1] == OUTCOME_UNKNOWN_SERVING_MESSAGE
        log.append("probe", resource="after")  # chained after the committed one
        result = log.verify()
        assert (result.ok, result.checked) == (True, 3), result
    finally:
        store.close()


def test_an_audit_write_whose_commit_went_unanswered_does_not_ask_the_silent_database_again(
    postgres_dsn: str, relay: CuttableRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database went silent with the batch's COMMIT sent (its host frozen, the network
    to it gone): the outcome is unknown after a whole answer timeout. The log does not ask the
    silent database for its head on top of it, holding every caller as long again under its
    chain lock: it goes on after the last batch it saw committed, and the next write, once
    the database answers, seals again on the head it finds (the batch did land)."""
    from server.audit.log import AuditLog
    from server.datastore.postgres import AnsweredConnection

    monkeypatch.setattr(AnsweredConnection, "answer_timeout", 1.0)
    clock = FakeClock(1000.0)
    store = PostgresDataStore(relay.dsn_through(postgres_dsn), clock)
    try:
        log = AuditLog(store, clock)
        log.append("probe", resource="before")
        heads: list[object] = []
        read_head = store.audit_head

        def audit_head() -> object:
            heads.append(None)
            return read_head()

        monkeypatch.setattr(store, "audit_head", audit_head)
        answered = relay.freeze_on(b"silent-at-commit", then=COMMIT_MESSAGE)
        with pytest.raises(Exception) as lost:  # noqa: PT011 - the log's wrapper of it
            log.append("probe", resource="silent-at-commit")
        assert answered.wait(WAIT), "the database never answered the COMMIT"
        assert status_for(lost.value)[1] == OUTCOME_UNKNOWN_SERVING_MESSAGE
        assert heads == []  # the silent database was not asked again
        relay.thaw()
        log.append("probe", resource="after")  # sealed again after the one that landed
        result = log.verify()
        assert (result.ok, result.checked) == (True, 3), result
    finally:
        relay.thaw()
        store.close()


def test_a_server_whose_commit_was_cut_answers_unknown_and_its_view_has_the_write(
    postgres_dsn: str, relay: CuttableRelay, tmp_path: object
) -> None:
    """The admin's CreateEntry is committed though its connection was lost at COMMIT: the
    caller hears the outcome is unknown (repeating it blindly would make a second entry or
    fail on the first), and the server's view, PostgreSQL's, has the entry: the change feed
    brings it in, and the server goes on serving."""
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    shared = {
        "datastore": relay.dsn_through(postgres_dsn),
        "key_encryption_key_file": str(kek_file(tmp_path)),
    }
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/lost-at-commit"
    with managed_server(**shared) as server:
        agent = server.attest()
        answered = relay.cut_on(spiffe_id.encode(), then=COMMIT_MESSAGE)
        with pytest.raises(grpc.RpcError) as failed:
            server.create_entry("/lost-at-commit", agent.spiffe_id)
        assert answered.wait(WAIT)
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert failed.value.details().startswith("the outcome of this call is unknown")
        assert "stopping" not in failed.value.details()

        def listed() -> list[common_pb2.Entry]:
            got = server.admin().ListEntries(admin_pb2.ListEntriesRequest(), timeout=10)
            return [e for e in got.entries if e.spiffe_id == spiffe_id]

        (stored,) = wait_until(listed, WAIT, "the committed entry in the server's view")
        assert stored.parent_id == agent.spiffe_id
        server.create_entry("/after", agent.spiffe_id)  # it serves on
