"""An agent upgraded in place starts from the state file the previous release (b395c82) wrote.

That release saved its revocations without whose credential each is (spiffe_id, kept since
420f8b4), in the same file schema. The upgraded agent restores the file and catches up from
its revision with a delta, which repeats no revocation already held: so every revocation made
before the upgrade stays ownerless until it expires, and the Revocations Watch names no owner
for it (a verifier's on_revoked callback then knows no task (txn) for a revoked task token),
exactly what 420f8b4 fixed for a restart, left unfixed for the upgrade.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from agent_attestor.state_store import StateStore
from svid._clock import FakeClock
from tests.agent_attestor.pki import LocalCa
from tests.agent_attestor.test_restore_revocation_owners import (
    AGENT,
    TASK,
    listed_after_an_empty_delta,
    write_one_revocation,
)


def _write_as_the_previous_release(path: Path, ca: LocalCa) -> None:
    """The file b395c82's agent left: its revocations as the server sent them, but saved
    without their owner (its state_store never wrote Revocation.spiffe_id), schema 1."""
    write_one_revocation(path, ca, owner=None)
    # This release's store wrote it: stamp it with the schema b395c82 wrote (1).
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 1 WHERE key = 'schema'")


def test_an_agent_upgraded_in_place_still_names_the_owner_of_a_revocation_made_before(
    tmp_path: Path,
) -> None:
    ca = LocalCa(FakeClock(start=time.time()))
    _write_as_the_previous_release(tmp_path / "state.db", ca)

    # The upgraded agent's first start on that file.
    saved = StateStore(tmp_path / "state.db").load(AGENT, "example.org", ca.clock.now())
    if saved is None or saved.position.revision == 0:
        return  # not restored as is: the server's snapshot brings every owner again
    # Restored, so the agent asks for a delta from revision 5; nothing changed meanwhile, and
    # the server (which knows the owner: it sends it with every revocation) sends no owner.
    listed = listed_after_an_empty_delta(saved)
    assert [i.value for i in listed] == ["jti-1"]
    assert [i.spiffe_id for i in listed] == [TASK], (
        "a revocation saved by the previous release lists no owner after the upgrade, and the "
        "delta the restored revision asks for never brings it"
    )
