"""Adopting an agent's newer certificate a restored datastore lost (server/restore_adoption.py):
the decision, case by case, and its write through AgentAuthority on a real SQLite datastore
with a real audit log."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.agent_authority import AgentAuthority, datastore_reader
from server.audit.log import AuditLog
from server.datastore.errors import CommitUnknownError, StorageError
from server.datastore.records import AttestedAgent
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from server.errors import PermissionDeniedError, UnavailableError
from server.events import ChangeNotifier
from server.peer import AgentPeer
from server.restore_adoption import (
    NOT_ADOPTED_LOG_INTERVAL,
    CertificateAdoption,
    RestoredWindow,
    adoption_refusal,
    restored_window,
)
from server.state import ServerState
from svid._clock import FakeClock
from tests.log_lines import log_lines

AGENT = "spiffe://example.org/svid/agent/join_token/back1"
# The backup's newest write at 1000; the restored start at 2000.
WINDOW = RestoredWindow(written_until=1000, restored_at=2000, serials={AGENT: "a1"})
RESTORED = AttestedAgent(AGENT, "join_token", "a1", 1300, attested_at=500)
NOW = 2100.0


def _lost(**fields: object) -> AgentPeer:
    """The certificate the agent renewed to after the backup: NotBefore 1500, an hour's life."""
    values: dict[str, object] = {
        "spiffe_id": AGENT,
        "serial": "b2",
        "not_before": 1500,
        "not_after": 5100,
    } | fields
    return AgentPeer(**values)  # type: ignore[arg-type]


def test_a_newer_certificate_of_the_restored_record_is_adopted() -> None:
    assert adoption_refusal(RESTORED, _lost(), WINDOW, NOW) is None


def test_a_newer_certificate_expiring_before_the_record_is_adopted() -> None:
    # agent_svid_ttl shortened since: the newer certificate expires first; NotBefore decides.
    record = AttestedAgent(AGENT, "join_token", "a1", 9000, attested_at=500)
    assert adoption_refusal(record, _lost(not_after=2200), WINDOW, NOW) is None


@pytest.mark.parametrize(
    ("record", "peer", "window", "why"),
    [
        (RESTORED, _lost(), None, "did not start on a restored datastore"),
        (None, _lost(), WINDOW, "no record"),
        (AttestedAgent(AGENT, "join_token", "a1", 1300, banned=True), _lost(), WINDOW, "banned"),
        (RESTORED, _lost(serial="a1"), WINDOW, "names this certificate"),
        (
            AttestedAgent(AGENT, "join_token", "c3", 1300, previous_serial="b2"),
            _lost(),
            WINDOW,
            "names this certificate",
        ),
        # Renewed (or adopted) since the restore: it names a certificate newer than any lost.
        (
            AttestedAgent(AGENT, "join_token", "c3", 5500, attested_at=500),
            _lost(),
            WINDOW,
            "written since the restore",
        ),
        # Evicted and attested again since, or attested only after the restore.
        (
            AttestedAgent("spiffe://example.org/svid/agent/join_token/new", "join_token", "n1", 0),
            _lost(spiffe_id="spiffe://example.org/svid/agent/join_token/new"),
            WINDOW,
            "written since the restore",
        ),
        (RESTORED, _lost(not_after=int(NOW)), WINDOW, "expired"),
        # Superseded before the backup: issued before its newest write, though it expires
        # after the record's certificate (a longer agent_svid_ttl then).
        (RESTORED, _lost(not_before=990, not_after=9000), WINDOW, "before the restored"),
        (RESTORED, _lost(not_before=1000), WINDOW, "before the restored"),
        (RESTORED, _lost(not_before=0), WINDOW, "before the restored"),  # not known
        # Signed by a server on the restored datastore (back-dated 10 s): never lost by it.
        (RESTORED, _lost(not_before=1990), WINDOW, "issued since the restore"),
        (
            AttestedAgent("spiffe://example.org/x", "join_token", "a1", 1300),
            _lost(),
            WINDOW,
            "another agent's",
        ),
    ],
)
def test_what_the_server_superseded_is_never_adopted(
    record: AttestedAgent | None, peer: AgentPeer, window: RestoredWindow | None, why: str
) -> None:
    refusal = adoption_refusal(record, peer, window, NOW)
    assert refusal is not None
    assert why in refusal


class Restored:
    """A server started on a restored SQLite datastore holding RESTORED."""

    def __init__(self, tmp_path: Path) -> None:
        self.clock = FakeClock(900)
        self.store = FaultInjectingDataStore(SqliteDataStore(tmp_path / "ds.sqlite3", self.clock))
        self.store.upsert_agent(RESTORED)  # its feed row at 900: the backup's newest write
        self.clock.set(NOW)
        window = restored_window(self.store, self.clock.now())
        assert window == RestoredWindow(900, int(NOW), {AGENT: "a1"})
        self.state = ServerState(self.store, self.clock, ChangeNotifier())
        self.state.load()
        self.audit = AuditLog(self.store, self.clock)
        self.adoption = CertificateAdoption(self.state, self.audit, window, self.clock)
        self.authority = AgentAuthority(
            self.state, datastore_reader(self.store), self.clock, adoption=self.adoption
        )

    def authorize(self, peer: AgentPeer) -> AttestedAgent:
        return asyncio.run(self.authority.authorize(peer))

    def events(self) -> list[dict[str, object]]:
        return [r for r in self.store.audit_rows() if r["kind"] == "agent_certificate_adopted"]


def test_the_restored_server_adopts_the_newer_certificate_once(tmp_path: Path) -> None:
    site = Restored(tmp_path)
    agent = site.authorize(_lost())
    adopted = AttestedAgent(AGENT, "join_token", "b2", 5100, attested_at=500)
    assert agent == adopted == site.store.get_agent(AGENT) == site.state.agents[AGENT]
    (event,) = site.events()
    assert (event["agent_id"], event["credential_id"], event["decision"]) == (
        AGENT,
        "b2",
        "adopted",
    )
    with log_lines("svid.server.restore") as lines:
        # The certificate the restored record named was superseded by the renewal it lost.
        with pytest.raises(PermissionDeniedError, match="superseded"):
            site.authorize(_lost(serial="a1"))
        # Nor is a second lost certificate adopted over the first: the record moved since.
        with pytest.raises(PermissionDeniedError, match="superseded"):
            site.authorize(_lost(serial="b3", not_before=1600))
    # Why is said, for the operator asking why an agent did not come back: once a while for
    # one reason (the second refusal is counted in the next line).
    (said,) = lines.records
    assert "written since the restore" in said.getMessage()
    assert said.serial == "a1"  # type: ignore[attr-defined]
    assert site.authorize(_lost()) == adopted
    assert len(site.events()) == 1


def test_a_record_moved_since_it_was_read_is_left_as_it_stands(tmp_path: Path) -> None:
    site = Restored(tmp_path)
    # Another server on the datastore renewed it; this one's memory has not seen it.
    site.store.upsert_agent(RESTORED.renewed("c3", 6000, "a1"), RESTORED)
    with pytest.raises(PermissionDeniedError, match="superseded"):
        site.authorize(_lost())  # the record read afresh names what was issued since
    assert site.events() == []
    # Read before that renewal: the conditional write finds the serial moved on.
    with pytest.raises(UnavailableError, match="written while"):
        asyncio.run(site.adoption.adopt(_lost(), RESTORED))
    assert site.store.get_agent(AGENT).serial == "c3"
    assert [e["decision"] for e in site.events()] == ["adopted", "not_adopted"]


def test_no_restore_no_adoption(tmp_path: Path) -> None:
    clock = FakeClock(900)
    store = SqliteDataStore(tmp_path / "ds.sqlite3", clock)
    store.upsert_agent(RESTORED)
    state = ServerState(store, clock, ChangeNotifier())
    state.load()
    authority = AgentAuthority(state, datastore_reader(store), clock)
    clock.set(NOW)
    with pytest.raises(PermissionDeniedError, match="superseded"):
        asyncio.run(authority.authorize(_lost()))
    assert store.get_agent(AGENT) == RESTORED


def test_an_empty_feed_bounds_nothing_and_adopts_nothing(tmp_path: Path) -> None:
    clock = FakeClock(900)
    store = SqliteDataStore(tmp_path / "ds.sqlite3", clock)
    store.upsert_agent(RESTORED)
    store.prune_feed(901)
    assert restored_window(store, NOW) is None


def test_what_cannot_be_written_moves_nothing_and_refuses_nothing(tmp_path: Path) -> None:
    site = Restored(tmp_path)
    site.store.inject(StorageError("disk I/O error"), "write_ledger")  # the audit event
    with pytest.raises(UnavailableError, match="cannot be adopted now"):
        site.authorize(_lost())
    assert (site.store.get_agent(AGENT), site.events()) == (RESTORED, [])
    site.store.inject(StorageError("disk I/O error"), "adopt_agent_certificate")
    with pytest.raises(UnavailableError, match="cannot be adopted now"):
        site.authorize(_lost())
    assert site.store.get_agent(AGENT) == RESTORED
    assert [e["decision"] for e in site.events()] == ["adopted", "not_adopted"]
    assert site.authorize(_lost()).serial == "b2"  # not remembered as refused: tried again


def test_why_not_adopted_is_said_once_a_while_per_agent_however_many_certificates(
    tmp_path: Path,
) -> None:
    # An agent renewing again and again (its held certificate stays its previous one) holds as
    # many as the signing rate lets it, and AgentAuthority remembers a refusal per certificate.
    site = Restored(tmp_path)
    superseded = [_lost(serial=f"c{k}", not_before=800) for k in range(50)]
    with log_lines("svid.server.restore") as lines:
        for peer in superseded:
            with pytest.raises(PermissionDeniedError, match="superseded"):
                site.authorize(peer)
    (said,) = lines.records
    assert "before the restored datastore's last write" in said.getMessage()
    assert (said.serial, said.times) == ("c0", 1)  # type: ignore[attr-defined]
    site.clock.advance(NOT_ADOPTED_LOG_INTERVAL)
    with (
        log_lines("svid.server.restore") as lines,
        pytest.raises(PermissionDeniedError, match="superseded"),
    ):
        site.authorize(_lost(serial="d1", not_before=800))
    (said,) = lines.records
    assert said.times == 50  # type: ignore[attr-defined]  # this one and the 49 unsaid


def test_an_adoption_whose_commit_is_unknown_is_not_said_not_adopted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL: the connection lost with the COMMIT sent; the database committed it.
    site = Restored(tmp_path)
    inner = site.store.inner

    def committed_unknown(agent: AttestedAgent, replacing: AttestedAgent) -> bool:
        inner.adopt_agent_certificate(agent, replacing)
        raise CommitUnknownError("db", "connection lost", server_stops=False)

    monkeypatch.setattr(site.store, "adopt_agent_certificate", committed_unknown)
    with pytest.raises(UnavailableError, match="cannot be adopted now"):
        site.authorize(_lost())
    assert site.store.get_agent(AGENT).serial == "b2"
    # The log must not say the record was left as it stood: it names the certificate adopted.
    assert [e["decision"] for e in site.events()] == ["adopted"]


def test_a_certificate_superseded_through_a_server_with_a_clock_behind_is_not_adopted(
    tmp_path: Path,
) -> None:
    # Servers sharing a datastore, one 120 s ahead of the other. A certificate's record is saved
    # by its issuer, on its issuer's clock (at or after its NotBefore + 10), and the feed is
    # pruned lowest stamps first: the newest row left bounds it, whoever superseded it.
    ahead, on_time = FakeClock(1120), FakeClock(1000)
    server_a = SqliteDataStore(tmp_path / "ds.sqlite3", ahead)
    server_b = SqliteDataStore(tmp_path / "ds.sqlite3", on_time)
    first = AttestedAgent(AGENT, "join_token", "a1", 4720, attested_at=900)
    server_a.upsert_agent(first)  # a1 signed by server A: NotBefore 1110
    on_time.advance(5)
    second = first.renewed("a2", 4605, "a1")
    server_b.upsert_agent(second, first)
    on_time.advance(5)
    third = second.renewed("a3", 4610, "a2")
    server_b.upsert_agent(third, second)  # the newest row written: stamped 1010
    server_b.prune_feed(1006)  # server B's older row goes, server A's (1120) stays
    window = restored_window(server_b, 2000)
    assert window is not None
    superseded = _lost(serial="a1", not_before=1110, not_after=4720)
    refusal = adoption_refusal(server_b.get_agent(AGENT), superseded, window, 2000)
    assert refusal is not None
    assert "before the restored datastore's last write" in refusal
