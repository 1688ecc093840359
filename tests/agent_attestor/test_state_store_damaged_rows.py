"""A state file whose rows SQLite finds sound but which hold values out of range is dropped
with a log line and the agent starts afresh, as a damaged file is: never a crash at every
start."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from agent_attestor.cache import SyncPosition, SyncState
from agent_attestor.model import Entry, Selector
from agent_attestor.state_store import StateChange, StateStore
from svid._clock import FakeClock
from tests.agent_attestor.pki import LocalCa
from tests.agent_attestor.test_state_store import svid_for

AGENT = "spiffe://example.org/svid/agent/join_token/me"


@pytest.mark.parametrize(
    ("table", "column", "value"),
    [
        ("svids", "issuance_key", '["spiffe://example.org/w/1", [], 1e400]'),
        ("entries", "selectors", "[" * 100_000 + "]" * 100_000),
    ],
)
def test_a_row_out_of_range_drops_the_file_instead_of_failing_the_start(
    tmp_path: Path, table: str, column: str, value: str
) -> None:
    ca = LocalCa(FakeClock(start=time.time()))
    entry = Entry("e1", "spiffe://example.org/w/1", frozenset({Selector("unix", "uid:1")}))
    path = tmp_path / "state.db"
    store = StateStore(path)
    store.write(
        StateChange(
            SyncPosition(AGENT, 9, "ep"),
            (entry,),
            svids=(svid_for(ca, entry),),
            shared=SyncState((), ca.bundle()),
        )
    )
    store.close()
    with sqlite3.connect(path) as db:
        db.execute(f"UPDATE {table} SET {column} = ?", (value,))
    db.close()

    assert StateStore(path).load(AGENT, "example.org", ca.clock.now()) is None
    assert not path.exists()
