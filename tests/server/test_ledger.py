"""The ledger on a real datastore file: credential records and their audit events commit in one
transaction, concurrent callers share commits, each returns only once its own rows are on disk,
and a failed commit fails every caller waiting on it and keeps nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from server.audit import AuditLog, EventDraft, LedgerError
from server.datastore import Credential, StorageError
from server.datastore.base import JtiClaim, RemovalClaim
from server.datastore.errors import (
    AgentRemovedError,
    BundleRefusedError,
    JtiHeldError,
    RemovalClaimLostError,
    TaskEndedMeanwhileError,
)
from server.datastore.records import (
    REMOVAL_EVICTED,
    AuditRow,
    BundleWrite,
    ForeignBundle,
    Removal,
    TaskRecord,
)
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from server.issuance.datastore_ledger import DatastoreLedger
from server.issuance.records import workload_jwt_record
from server.ledger import Ledger
from svid._clock import FakeClock
from tests.server.fixtures import admit_agents, sqlite_with_agents
from tests.server.held_ledger import GroupCommit

REPO = Path(__file__).resolve().parents[2]
AGENT = "spiffe://example.org/svid/agent/join_token/n1"
OTHER = "spiffe://example.org/svid/agent/join_token/n2"
WORKLOAD = "spiffe://example.org/w"
EXPIRES = 2_000_000_000
E = TypeVar("E", bound=BaseException)


def cred(jti: str, agent: str = AGENT, task_id: str = "") -> Credential:
    return Credential("jwt_id", jti, agent, WORKLOAD, task_id, EXPIRES)


def event(jti: str) -> EventDraft:
    return EventDraft("jwt_minted", agent_id=WORKLOAD, node_id=AGENT, credential_id=jti)


def on_disk(db: Path, jtis: list[str]) -> tuple[int, int]:
    """(credential rows, audit events) for `jtis`, read by a connection of its own."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        marks = ", ".join("?" * len(jtis))
        creds = conn.execute(f"SELECT COUNT(*) FROM credentials WHERE value IN ({marks})", jtis)
        events = conn.execute(
            f"SELECT COUNT(*) FROM audit_events WHERE credential_id IN ({marks})", jtis
        )
        return int(creds.fetchone()[0]), int(events.fetchone()[0])
    finally:
        conn.close()


def refusal(outcomes: dict[str, BaseException | None], name: str, cause: type[E]) -> E:
    """Why `name`'s caller was refused, taken out of `outcomes`: a LedgerError, caused by the
    store's typed refusal `cause`."""
    failed = outcomes.pop(name)
    assert isinstance(failed, LedgerError), (name, failed)
    assert isinstance(failed.__cause__, cause), (name, failed.__cause__)
    return failed.__cause__


@pytest.fixture
def db(tmp_path: Path) -> Path:
    # "a": the agent of the kill -9 child's credentials.
    return sqlite_with_agents(tmp_path / "datastore.sqlite3", AGENT, "a")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


def test_records_and_events_commit_together(db: Path, clock: FakeClock) -> None:
    store = SqliteDataStore(db, clock)
    log = AuditLog(store, clock)
    Ledger(log).record([cred("a"), cred("b")], [event("a"), event("b")])
    assert on_disk(db, ["a", "b"]) == (2, 2)
    assert log.committed_head() == store.audit_head()
    assert log.verify().ok
    store.close()


def test_concurrent_batches_share_commits_and_each_returns_once_durable(
    db: Path, clock: FakeClock
) -> None:
    counting = FaultInjectingDataStore(SqliteDataStore(db, clock))
    log = AuditLog(counting, clock)
    ledger = Ledger(log)
    threads, rounds, per = 16, 10, 3
    start = threading.Barrier(threads)
    problems: list[str] = []

    def work(k: int) -> None:
        start.wait()
        for r in range(rounds):
            jtis = [f"{k}-{r}-{i}" for i in range(per)]
            ledger.record([cred(j) for j in jtis], [event(j) for j in jtis])
            # Returned: another connection must find every row of this batch already.
            found = on_disk(db, jtis)
            if found != (per, per):
                problems.append(f"batch {k}-{r} returned before its commit: {found}")

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert problems == []
    commits = counting.calls.count("write_ledger")
    assert commits < threads * rounds, "no two batches shared a commit"
    counting.close()

    reopened = SqliteDataStore(db, clock)
    assert len(reopened.agent_credentials(AGENT, 0)) == threads * rounds * per
    result = AuditLog(reopened, clock).verify()
    assert result.ok, str(result)
    assert result.checked == threads * rounds * per
    reopened.close()


def test_async_commits_share_commits_too(db: Path, clock: FakeClock) -> None:
    counting = FaultInjectingDataStore(SqliteDataStore(db, clock))
    ledger = Ledger(AuditLog(counting, clock))

    async def main() -> None:
        await asyncio.gather(*(ledger.commit([cred(f"j{i}")], [event(f"j{i}")]) for i in range(40)))

    asyncio.run(main())
    assert on_disk(db, [f"j{i}" for i in range(40)]) == (40, 40)
    assert counting.calls.count("write_ledger") <= 40
    counting.close()


def test_a_failed_commit_fails_every_waiting_caller_and_keeps_nothing(
    db: Path, clock: FakeClock
) -> None:
    commit = GroupCommit(SqliteDataStore(db, clock), clock, fails=True)
    gated, log = commit.held, commit.log
    ledger = Ledger(log)
    ledger.record([cred("before")], [event("before")])
    head = gated.audit_head()

    def record(jti: str) -> Callable[[], object]:
        return lambda: ledger.record([cred(jti)], [event(jti)])

    commit.lead("lead", record("lead"))  # its commit under way; the rest queue behind it
    commit.queue({f"w{i}": record(f"w{i}") for i in range(7)})
    commit.wait_queued(7)
    errors = list(commit.release().values())
    assert len(errors) == 8
    assert all(isinstance(e, LedgerError) and isinstance(e, StorageError) for e in errors), errors
    assert "disk I/O error" in str(errors[0])
    # Nothing of any of them: no credential, no event, the head as it was.
    jtis = ["lead", *(f"w{i}" for i in range(7))]
    assert on_disk(db, jtis) == (0, 0)
    assert gated.audit_head() == head
    # The chain goes on from the last committed event, without a hole.
    ledger.record([cred("after")], [event("after")])
    result = log.verify()
    assert result.ok, str(result)
    assert result.checked == 2
    gated.close()


def test_a_removed_agents_callers_are_refused_and_their_neighbours_written_again(
    db: Path, clock: FakeClock
) -> None:
    """An agent evicted while its credentials wait for a group commit with other agents': the
    store refuses the whole write, only that agent's callers fail (with the typed error), and
    the rest are written in the next commit, the chain without a hole."""
    store = SqliteDataStore(db, clock)
    admit_agents(store, OTHER)
    commit = GroupCommit(store, clock)
    held, log = commit.held, commit.log
    ledger = Ledger(log)
    port = DatastoreLedger(ledger)
    ledger.record([cred("before")], [event("before")])

    def record(name: str, *credentials: Credential) -> Callable[[], object]:
        events = [event(c.value) for c in credentials] or [event(name)]
        return lambda: ledger.record(list(credentials), events)

    commit.lead("lead", record("lead", cred("lead", OTHER)))
    calls = {f"w{i}": record(f"w{i}", cred(f"w{i}", OTHER)) for i in range(4)}
    calls["late"] = record("late", cred("late"), cred("late2"))
    calls["events-only"] = record("events-only")
    commit.queue(calls)

    def jwt(jti: str, agent: str) -> tuple[Credential, tuple[object, ...]]:
        return workload_jwt_record(
            agent, WORKLOAD, jti=jti, issued_at=EXPIRES - 60, expires_at=EXPIRES, audience="a"
        )

    kept, refused = jwt("p-kept", OTHER), jwt("p-late", AGENT)
    port_kept = port.record_later([kept[0]], [kept[1]])
    port_refused = port.record_later([refused[0]], [refused[1]])
    commit.wait_queued(len(calls) + 2)
    store.delete_agent(AGENT, Removal(AGENT, REMOVAL_EVICTED, 0))  # committed meanwhile
    outcomes = commit.release()
    assert refusal(outcomes, "late", AgentRemovedError).agents == {AGENT}
    assert outcomes == dict.fromkeys(["lead", *(f"w{i}" for i in range(4)), "events-only"])
    assert port_kept.result(10) is None
    with pytest.raises(AgentRemovedError):  # the port's own error, not "unavailable"
        port_refused.result(10)
    # One refused commit, then one with everyone else: no caller of another agent failed.
    assert held.calls.count("write_ledger") == 4
    assert on_disk(db, ["late", "late2", "p-late"]) == (0, 0)
    written = ["lead", *(f"w{i}" for i in range(4)), "p-kept"]
    assert on_disk(db, written) == (len(written), len(written))
    assert [c.value for c in store.agent_credentials(AGENT, 0)] == ["before"]
    result = log.verify()
    assert result.ok, str(result)
    assert result.checked == 1 + len(written) + 1  # "before", the written, the events-only
    held.close()


def _task_row(task_id: str, state: str = "active") -> TaskRecord:
    return TaskRecord(task_id, AGENT, WORKLOAD, state, EXPIRES, 0, "{}")


def test_an_ended_tasks_callers_are_refused_and_their_neighbours_written_again(
    db: Path, clock: FakeClock
) -> None:
    """A task ended (on another server, say) while its credentials wait for a group commit
    with others, of the same agent too: the store refuses the whole write, only the callers
    holding that task's credentials fail (with the typed error), and the rest are written in
    the next commit, the chain without a hole."""
    store = SqliteDataStore(db, clock)
    for task_id in ("ending", "going-on"):
        store.put_task(_task_row(task_id))
    commit = GroupCommit(store, clock)
    held, log = commit.held, commit.log
    ledger = Ledger(log)
    port = DatastoreLedger(ledger)
    ledger.record([cred("before", task_id="ending")], [event("before")])

    def record(*credentials: Credential) -> Callable[[], object]:
        return lambda: ledger.record(list(credentials), [event(c.value) for c in credentials])

    commit.lead("lead", record(cred("lead", task_id="ending")))
    calls = {f"w{i}": record(cred(f"w{i}")) for i in range(3)}  # the same agent's workloads
    calls["other-task"] = record(cred("other-task", task_id="going-on"))
    calls["late"] = record(cred("late", task_id="going-on"), cred("late2", task_id="ending"))
    commit.queue(calls)

    def jwt(jti: str, task_id: str) -> tuple[Credential, tuple[object, ...]]:
        credential, record = workload_jwt_record(
            AGENT, WORKLOAD, jti=jti, issued_at=EXPIRES - 60, expires_at=EXPIRES, audience="a"
        )
        return credential._replace(task_id=task_id), record

    p_kept, p_late = jwt("p-kept", "going-on"), jwt("p-late", "ending")
    kept = port.record_later([p_kept[0]], [p_kept[1]])
    refused = port.record_later([p_late[0]], [p_late[1]])
    commit.wait_queued(len(calls) + 2)
    # The end's claim (TaskStore.finish), committed meanwhile: it reads what to revoke next.
    assert store.swap_task(_task_row("ending", "ending"), "active")
    outcomes = commit.release()
    for name in ("lead", "late"):
        ended = refusal(outcomes, name, TaskEndedMeanwhileError)
        assert ended.tasks == {"ending"}  # never its neighbour's "going-on"
    assert outcomes == dict.fromkeys([*(f"w{i}" for i in range(3)), "other-task"])
    assert kept.result(10) is None
    with pytest.raises(TaskEndedMeanwhileError):  # the port's own error, not "unavailable"
        refused.result(10)
    # The lead's commit refused (and the lead with it), then one with everyone else's.
    assert held.calls.count("write_ledger") == 4
    assert on_disk(db, ["lead", "late", "late2", "p-late"]) == (0, 0)
    written = [*(f"w{i}" for i in range(3)), "other-task", "p-kept"]
    assert on_disk(db, written) == (len(written), len(written))
    assert [c.value for c in store.task_credentials("ending", 0)] == ["before"]
    result = log.verify()
    assert result.ok, str(result)
    assert result.checked == 1 + len(written)
    held.close()


GONE = "spiffe://example.org/svid/agent/join_token/gone"


def removal_claimed(db: Path, clock: FakeClock, holder: str) -> SqliteDataStore:
    """A store on `db` with GONE's removal under way, claimed by `holder`."""
    store = SqliteDataStore(db, clock)
    store.resume_removal(Removal(GONE, REMOVAL_EVICTED, 0))
    assert store.claim_removal(GONE, holder, 0, 30)
    return store


def finish(log: AuditLog, name: str, holder: str) -> Callable[[], object]:
    """A finisher of GONE's removal: its event, written only while `holder` holds the claim."""
    return lambda: log.append_many([event(name)], claim=RemovalClaim(GONE, holder))


def test_a_finisher_that_lost_its_removal_claim_is_refused_and_its_neighbours_written_again(
    db: Path, clock: FakeClock
) -> None:
    """A removal's finisher whose claim was taken over while its log write waited for a group
    commit with others (an issuance, a task's begin): the store refuses the whole write, only
    the finisher fails (RemovalClaimLostError), and the rest are written in the next commit."""
    store = removal_claimed(db, clock, "a")
    commit = GroupCommit(store, clock)
    held, log = commit.held, commit.log
    commit.lead("lead", lambda: log.append_many([event("lead")]))
    calls: dict[str, Callable[[], object]] = {
        "finisher": finish(log, "finisher", "a"),
        "begin": lambda: log.append_many([event("begin")], tasks=[_task_row("begun")]),
        "other": lambda: log.append_many([event("other")]),
    }
    commit.queue(calls)
    commit.wait_queued(len(calls))
    assert store.claim_removal(GONE, "b", 30, 30)  # a's lapsed: b took the removal over
    outcomes = commit.release()
    assert refusal(outcomes, "finisher", RemovalClaimLostError).agents == {GONE}
    assert outcomes == dict.fromkeys(["lead", "begin", "other"])
    assert on_disk(db, ["finisher"]) == (0, 0)
    assert on_disk(db, ["lead", "begin", "other"]) == (0, 3)
    assert store.get_task("begun") == _task_row("begun")
    result = log.verify()
    assert result.ok, str(result)
    held.close()


def test_a_lost_removal_claim_refuses_only_its_holder_not_a_newer_claim_on_the_same_agent(
    db: Path, clock: FakeClock
) -> None:
    """Two finishes of one removal on this server in one group commit: a stalled one whose
    claim was lost (it gave up; its write still in flight) and the one that claimed the
    removal since. The store refuses the stalled one's claim; the newer holder's write is
    not refused with it (it would take itself for the loser and stop), and is written."""
    store = removal_claimed(db, clock, "a#2")  # a#1's claim came before: lost
    commit = GroupCommit(store, clock)
    held, log = commit.held, commit.log
    commit.lead("lead", lambda: log.append_many([event("lead")]))
    calls = {
        "stalled": finish(log, "stalled", "a#1"),
        "holder": finish(log, "holder", "a#2"),
    }
    outcomes = commit.share(calls)
    refusal(outcomes, "stalled", RemovalClaimLostError)
    assert outcomes == {"lead": None, "holder": None}
    assert on_disk(db, ["stalled"]) == (0, 0)
    assert on_disk(db, ["lead", "holder"]) == (0, 2)
    assert log.verify().ok
    held.close()


def test_a_replayed_assertion_is_refused_alone_and_its_neighbours_written_again(
    db: Path, clock: FakeClock
) -> None:
    """An OAuth token whose assertion was used already (a replay, on another server say)
    shares a group commit with others: an issuance, a task's begin, a removal finisher's
    events. The store refuses the whole write (JtiHeldError); only the replay's caller
    fails, told of its own jti, and the rest are written in the next commit. They were all
    refused with it: a begin, a finisher or an agent's SVID failed for anyone's replay."""
    store = removal_claimed(db, clock, "a")
    now = int(clock.now())
    assert store.claim_jtis([JtiClaim("iss", "used", EXPIRES)], now) == [True]
    commit = GroupCommit(store, clock)
    held, log = commit.held, commit.log

    def token(jti: str) -> Callable[[], object]:
        return lambda: log.record([cred(jti)], [event(jti)], [JtiClaim("iss", jti, EXPIRES)])

    commit.lead("lead", lambda: log.append_many([event("lead")]))
    calls: dict[str, Callable[[], object]] = {
        "used": token("used"),
        "fresh": token("fresh"),
        "issued": lambda: log.record([cred("issued")], [event("issued")]),
        "begin": lambda: log.append_many([event("begin")], tasks=[_task_row("begun")]),
        "finisher": finish(log, "finisher", "a"),
    }
    outcomes = commit.share(calls)
    assert refusal(outcomes, "used", JtiHeldError).held == {("iss", "used")}
    assert outcomes == dict.fromkeys(["lead", "fresh", "issued", "begin", "finisher"])
    assert on_disk(db, ["used"]) == (0, 0)
    assert on_disk(db, ["fresh", "issued"]) == (2, 2)
    assert on_disk(db, ["lead", "begin", "finisher"]) == (0, 3)
    assert store.get_task("begun") == _task_row("begun")
    assert store.claim_jtis([JtiClaim("iss", "fresh", EXPIRES)], now) == [False]  # spent
    result = log.verify()
    assert result.ok, str(result)
    held.close()


def test_a_batch_that_fails_inside_the_transaction_leaves_nothing(
    db: Path, clock: FakeClock
) -> None:
    store = SqliteDataStore(db, clock)
    log = AuditLog(store, clock)
    ledger = Ledger(log)
    ledger.record([cred("ok")], [event("ok")])
    # A credential row of the wrong shape fails after the other rows went in.
    bad = (*cred("bad"), "extra column")
    with pytest.raises(LedgerError):
        ledger.record([cred("half"), bad], [event("half")])  # type: ignore[list-item]
    assert on_disk(db, ["half", "bad"]) == (0, 0)
    ledger.record([cred("next")], [event("next")])
    assert log.verify().ok
    store.close()


def test_a_row_a_constraint_refuses_midway_leaves_nothing_and_the_next_write_commits(
    db: Path, clock: FakeClock
) -> None:
    # SQLite itself ends the transaction here (OR ROLLBACK): the store must not trip over it.
    store = SqliteDataStore(db, clock)
    log = AuditLog(store, clock)
    ledger = Ledger(log)
    no_subject = Credential("jwt_id", "bad", AGENT, None, "", EXPIRES)  # type: ignore[arg-type]
    with pytest.raises(LedgerError, match="NOT NULL"):
        ledger.record(
            [cred("before"), no_subject, cred("after")],
            [event("before"), event("bad"), event("after")],
        )
    assert on_disk(db, ["before", "bad", "after"]) == (0, 0)
    ledger.record([cred("next")], [event("next")])
    assert on_disk(db, ["next"]) == (1, 1)
    assert log.verify().ok
    store.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_a_group_commit_writes_no_statement_journal(db: Path, clock: FakeClock) -> None:
    """A multi-row INSERT that may abort midway had SQLite copy each page it touched into a
    statement journal, a temp file past 64 KiB: more pages written per commit than the WAL's."""
    store = SqliteDataStore(db, clock)
    ledger = Ledger(AuditLog(store, clock))

    def batch(n: int) -> tuple[list[Credential], list[EventDraft]]:
        # Subjects at random places in the by-subject index: one statement touches many pages.
        jtis = [os.urandom(12).hex() for _ in range(n)]
        creds = [Credential("jwt_id", j, AGENT, f"{WORKLOAD}/{j}", "", EXPIRES) for j in jtis]
        return creds, [event(j) for j in jtis]

    for _ in range(10):
        ledger.record(*batch(300))
    temp_files: set[str] = set()

    def look() -> int:
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if "etilqs" in target:  # SQLite's temp file names
                    temp_files.add(target)
        return 0  # go on

    store._db.conn.set_progress_handler(look, 200)
    ledger.record(*batch(300))
    store._db.conn.set_progress_handler(None, 0)
    assert temp_files == set()
    store.close()


def test_the_audit_rows_a_failed_write_sealed_are_not_reused(db: Path, clock: FakeClock) -> None:
    faulty = FaultInjectingDataStore(SqliteDataStore(db, clock))
    log = AuditLog(faulty, clock)
    faulty.inject(StorageError("disk full"), method="write_ledger")
    with pytest.raises(LedgerError, match="disk full"):
        log.record([cred("x")], [event("x")])
    log.record([cred("y")], [event("y")])
    rows: list[AuditRow] = [tuple(r.values()) for r in faulty.audit_rows()]
    assert [r[0] for r in rows] == [1]
    assert log.verify().ok
    faulty.close()


WRITER = textwrap.dedent(
    """
    import sys, threading
    from pathlib import Path
    from server.audit import AuditLog, EventDraft
    from server.datastore import Credential
    from server.datastore.sqlite import SqliteDataStore
    from server.ledger import Ledger
    from svid._clock import SystemClock

    clock = SystemClock()
    ledger = Ledger(AuditLog(SqliteDataStore(Path(sys.argv[1]), clock), clock))
    out = threading.Lock()

    def work(k):
        i = 0
        while True:
            i += 1
            jti = f"{k}-{i}"
            ledger.record(
                [Credential("jwt_id", jti, "a", "w", "", 2_000_000_000)],
                [EventDraft("jwt_minted", credential_id=jti)],
            )
            with out:
                print(jti, flush=True)

    for k in range(4):
        threading.Thread(target=work, args=(k,), daemon=True).start()
    threading.Event().wait()
    """
)


def test_acknowledged_ledger_writes_survive_kill_9(db: Path, clock: FakeClock) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.stdout is not None
    acknowledged: list[str] = []
    try:
        for line in child.stdout:
            acknowledged.append(line.strip())
            if len(acknowledged) >= 300:
                break
        assert acknowledged, child.stderr.read() if child.stderr else "no output"
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
        acknowledged.extend(line.strip() for line in rest.splitlines() if line.strip())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    store = SqliteDataStore(db, clock)
    stored = {c.value for c in store.agent_credentials("a", 0)}
    missing = [j for j in acknowledged if j not in stored]
    assert not missing, f"{len(missing)} acknowledged credentials lost, e.g. {missing[:3]}"
    result = AuditLog(store, clock).verify()
    assert result.ok, str(result)
    assert result.checked == len(stored)  # one event per credential, both or neither
    store.close()


def bundle_event(
    log: AuditLog, name: str, write: BundleWrite | None = None
) -> Callable[[], object]:
    """A caller's federated_bundle_changed event named `name`, storing `write` with it."""
    if write is None:
        return lambda: log.append("federated_bundle_changed", extra={"name": name})
    return lambda: log.append_storing(write, "federated_bundle_changed", extra={"name": name})


def test_a_refused_foreign_bundles_caller_fails_and_its_neighbours_are_written_again(
    db: Path, clock: FakeClock
) -> None:
    """A foreign bundle older than the one stored, and a removal of one not stored, wait for a
    group commit with other callers' events and bundles: the store refuses the whole write,
    only their callers fail (each with the typed error naming its own, its event not on the
    chain), and the rest are written in the next commit."""
    store = SqliteDataStore(db, clock)
    commit = GroupCommit(store, clock)
    held, log = commit.held, commit.log

    def bundle(td: str, sequence: int) -> BundleWrite:
        body = b'{"keys":[],"spiffe_sequence":%d}' % sequence
        return BundleWrite(ForeignBundle(td, body, 1, sequence))

    log.append_storing(bundle("a.org", 2), "federated_bundle_changed", extra={"s": 2})
    commit.lead("lead", bundle_event(log, "lead"))
    calls = {
        "older": bundle_event(log, "older", bundle("a.org", 1)),
        "other": bundle_event(log, "other", bundle("b.org", 5)),
        "plain": bundle_event(log, "plain"),
        "gone": bundle_event(log, "gone", BundleWrite.removal("c.org")),  # none stored to remove
    }
    outcomes = commit.share(calls)
    older = refusal(outcomes, "older", BundleRefusedError)
    assert older.trust_domains == older.older == {"a.org"}
    gone = refusal(outcomes, "gone", BundleRefusedError)
    assert gone.trust_domains == gone.missing == {"c.org"}
    assert outcomes == dict.fromkeys(["lead", "other", "plain"])
    # The first bundle, the lead, one refused group, then the group without the older bundle.
    assert held.calls.count("write_ledger") == 4
    assert {b.trust_domain: b.sequence for b in store.list_foreign_bundles()} == {
        "a.org": 2,
        "b.org": 5,
    }
    names = [json.loads(e["extra"]).get("name") for e in store.audit_rows()]
    assert sorted(n for n in names if n) == ["lead", "other", "plain"]
    assert log.verify().ok
    store.close()


def test_two_removals_of_one_bundle_in_a_group_commit_remove_it_once(
    db: Path, clock: FakeClock
) -> None:
    """Two removals of the same foreign bundle (an operator's delete sent twice, say) share a
    group commit: the first removes it, the second finds none and is refused. The refusal
    names only the trust domain, so both callers were failed by it: neither removal was
    written, the bundle stayed stored and served, and both callers were told there was none."""
    store = SqliteDataStore(db, clock)
    commit = GroupCommit(store, clock)
    log = commit.log
    body = b'{"keys":[],"spiffe_sequence":3}'
    log.append_storing(
        BundleWrite(ForeignBundle("d.org", body, 1, 3)), "federated_bundle_changed", extra={}
    )
    commit.lead("lead", bundle_event(log, "lead"))
    calls = {n: bundle_event(log, n, BundleWrite.removal("d.org")) for n in ("first", "second")}
    outcomes = commit.share(calls)
    assert outcomes.pop("lead") is None
    failed = [e for e in outcomes.values() if e is not None]
    assert len(failed) == 1, f"one removal must go through, the other be refused: {outcomes}"
    assert isinstance(failed[0], LedgerError)
    assert isinstance(failed[0].__cause__, BundleRefusedError)
    assert failed[0].__cause__.missing == {"d.org"}
    assert store.list_foreign_bundles() == []
    names = [json.loads(e["extra"]).get("name") for e in store.audit_rows()]
    assert len([n for n in names if n in calls]) == 1
    assert log.verify().ok
    store.close()
