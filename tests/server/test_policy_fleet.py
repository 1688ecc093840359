"""PolicyFleet on one host: a real policy directory, engine, and audit log on a real SQLite
file; what another server announces is handed in as the follower would."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from server.audit import AuditLog
from server.datastore.sqlite import SqliteDataStore
from server.policy import PolicyEngine
from server.policy.fleet import PolicyFleet
from svid._clock import FakeClock
from tests.e2e.test_tasks_server import POLICY

TD = "example.org"


def test_an_announcement_read_during_a_local_reload_is_not_cleared_by_it(
    tmp_path: Path,
) -> None:
    """Another server announced its set just after this one's: the follower reported the
    difference, and the local reload, finishing last, cleared the report (diverged None while
    the fleet's newest set was another)."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "work.cedar").write_text(POLICY)
    clock = FakeClock(1_800_000_000.0)
    store = SqliteDataStore(tmp_path / "db", clock)
    engine = PolicyEngine(tmp_path / "policies", clock, trust_domain=TD)
    follower: list[threading.Thread] = []

    def announce(policy_set_hash: str) -> None:
        store.announce_policy(policy_set_hash)
        # The other server's announcement, read by this one's follower meanwhile.
        store.announce_policy("other")
        thread = threading.Thread(target=fleet.on_announced, args=("other",))
        thread.start()
        follower.append(thread)
        thread.join(1)  # done at once unless the reload holds it back

    fleet = PolicyFleet(engine, AuditLog(store, clock), announce)
    try:
        info = fleet.reload_here()
        follower[0].join()
        assert fleet.announced == store.announced_policy() == "other"
        assert fleet.diverged is not None
        assert "other" in fleet.diverged
        assert info.hash in fleet.diverged
    finally:
        store.close()


def test_a_reload_the_fleet_asked_for_says_so_in_the_audit_log(tmp_path: Path) -> None:
    """The record of a reload an announcement ran was an operator's, word for word: the log
    said neither why it ran nor which set the fleet asked for (its own directory's loaded)."""
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "work.cedar").write_text(POLICY)
    clock = FakeClock(1_800_000_000.0)
    store = SqliteDataStore(tmp_path / "db", clock)
    engine = PolicyEngine(tmp_path / "policies", clock, trust_domain=TD)
    fleet = PolicyFleet(engine, AuditLog(store, clock), store.announce_policy)
    try:
        (tmp_path / "policies" / "work.cedar").write_text(POLICY + "\n")
        fleet.on_announced("other")
        fleet.reload_here()
        rows = [r for r in store.audit_rows() if r["kind"] == "policy_reload"]
        assert [json.loads(r["extra"]).get("announced_hash") for r in rows] == ["other", None]
        assert rows[0]["policy_set_hash"] == engine.policy_set_hash
    finally:
        store.close()
