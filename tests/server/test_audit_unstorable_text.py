"""Event text the log cannot store on every backend: a NUL (PostgreSQL text takes none) and a
lone surrogate (JSON's "\\ud800" escape; no UTF-8 holds one). Refused for its caller alone, as
the caller's error, before the event joins a commit its neighbours share."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.audit import AuditLog, EventDraft, LedgerError
from server.audit.errors import UnstorableTextError
from server.datastore import DataStore
from server.datastore.sqlite import SqliteDataStore
from server.issuance.records import attestation_event
from server.status import RULES
from svid._clock import FakeClock
from tests.server.held_ledger import GroupCommit

AGENT = "spiffe://example.org/agents/research-bot"
# A draft tuple (DRAFT_FIELDS order) as issuance records one, its reason to be filled in.
ISSUED: tuple[object, ...] = ("jwt_minted", AGENT, None, None, "aud", None, "allow")
REST: tuple[object, ...] = (None, None, "jti-1", (), None, 300, None, {})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Iterator[DataStore]:
    if request.param == "sqlite":
        made: DataStore = SqliteDataStore(tmp_path / "datastore.sqlite3", clock)
    else:
        from server.datastore.postgres import PostgresDataStore

        made = PostgresDataStore(request.getfixturevalue("postgres_dsn"), clock)
    yield made
    made.close()


def test_a_nul_fails_its_caller_alone_not_the_shared_commit(
    store: DataStore, clock: FakeClock
) -> None:
    """On PostgreSQL the NUL failed the whole commit at COMMIT: every caller sharing it got
    LedgerError (and the ledger read as down). On SQLite it was stored, on PostgreSQL not:
    the same event recorded on one backend only."""
    group = GroupCommit(store, clock)
    group.lead("lead", lambda: group.log.append("task_begin", agent_id=AGENT, reason="ok"))
    group.queue({"neighbour": lambda: group.log.record([], [(*ISSUED, "fine", *REST)])})
    group.wait_queued(1)
    nul = ("jwt_minted", AGENT, None, None, "a\x00b", None, "allow", "fine")
    group.queue({"nul": lambda: group.log.record([], [(*nul, *REST)])})
    deadline = time.monotonic() + 10
    # Refused at once (fixed), or queued behind the lead with the neighbour (not fixed).
    while "nul" not in group.outcomes and len(group.log._tickets) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    outcomes = group.release()
    assert outcomes["lead"] is None
    assert outcomes["neighbour"] is None, outcomes
    assert isinstance(outcomes["nul"], UnstorableTextError), outcomes
    assert not isinstance(outcomes["nul"], LedgerError)
    assert "resource" in str(outcomes["nul"])
    result = group.log.verify()
    assert (result.ok, result.checked) == (True, 2), result


@pytest.mark.parametrize(
    "record",
    [
        lambda log: log.append("probe", resource="tool\x00"),
        lambda log: log.append_many([EventDraft("probe", agent_id="a\x00")]),
        lambda log: log.append_tuples([(*ISSUED[:-1], "\ud800", "r", *REST)]),
        lambda log: log.append("probe", extra={"aud": "\udcff"}),
        lambda log: log.record_later([], [(*ISSUED[:-1], "\ud83d", None, *REST)]).result(5),
    ],
    ids=["nul-append", "nul-draft", "surrogate-tuple", "surrogate-extra", "surrogate-later"],
)
def test_unstorable_text_is_the_callers_error(
    tmp_path: Path, clock: FakeClock, record: object
) -> None:
    """A lone surrogate raised UnicodeEncodeError, no SvidError: no status rule, an INTERNAL
    to the client. Now the caller's (INVALID_ARGUMENT), and the log goes on."""
    log = AuditLog(SqliteDataStore(tmp_path / "datastore.sqlite3", clock), clock)
    with pytest.raises(UnstorableTextError):
        record(log)  # type: ignore[operator]
    assert log.head() is None
    log.append("probe", reason="after")
    assert log.verify().ok
    assert RULES[UnstorableTextError].code.name == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    "record",
    [
        lambda log, reason: log.append("attestation_refused", decision="deny", reason=reason),
        lambda log, reason: log.append_many([EventDraft("oauth_refused", reason=reason)]),
        lambda log, reason: log.record([], [(*ISSUED, reason, *REST)]),
        lambda log, reason: log.append_tuples([(*ISSUED, reason, *REST)]),
        lambda log, reason: log.record_later([], [(*ISSUED, reason, *REST)]).result(5),
        # An attestor's refusal quoting the payload (server/node_api.py): refused as
        # unstorable, the error replaced the refusal the agent was to get.
        lambda log, reason: log.record(
            [], [attestation_event("", "join_token", "", ok=False, reason=reason)]
        ),
    ],
    ids=["append", "draft", "record", "tuple", "later", "attestation"],
)
def test_a_reason_quoting_a_nul_or_a_lone_surrogate_is_recorded_escaped(
    store: DataStore, clock: FakeClock, record: object
) -> None:
    """A reason quotes what others said (a peer's OAuth error, an attestor's refusal, a
    foreign issuer's message): refused as unstorable, one NUL there kept the refusal off the
    log and failed its caller. Escaped instead, as the text log shows such text."""
    log = AuditLog(store, clock)
    record(log, "peer said: a\x00b \ud800 caf\u00e9")  # type: ignore[operator]
    (event,) = list(store.audit_rows())
    assert event["reason"] == "peer said: a\\x00b \\ud800 caf\u00e9"
    assert log.verify().ok
