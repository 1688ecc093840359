"""A burst of entry writes in the server's memory layer: they take turns on the loop, one on a
thread at a time, so the loop's default executor stays free for the server's other calls."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

from server.datastore.errors import DataStoreError
from server.datastore.records import Entry
from server.datastore.sqlite import SqliteDataStore
from server.datastore.testing import FaultInjectingDataStore
from server.events import ChangeNotifier
from server.state import ServerState
from svid._clock import FakeClock

TD = "spiffe://example.org"
AGENT = f"{TD}/svid/agent/join_token/burst1"
# More writes than any default executor has threads (min(32, CPUs + 4)).
BURST = 40


class _TurnTakingStore(FaultInjectingDataStore):
    """Entry batches that wait until `go`, as behind another server's write on PostgreSQL,
    counting how many wait at once."""

    def __init__(self, inner: SqliteDataStore) -> None:
        super().__init__(inner)  # type: ignore[arg-type]
        self.go = threading.Event()
        self.waiting = 0
        self.most = 0
        self._counting = threading.Lock()

    def create_entries(self, entries: Sequence[Entry]) -> list[Entry | DataStoreError]:
        with self._counting:
            self.waiting += 1
            self.most = max(self.most, self.waiting)
        try:
            self.go.wait(30)
            return super().create_entries(entries)
        finally:
            with self._counting:
                self.waiting -= 1


def test_a_burst_of_entry_writes_leaves_the_loops_threads_to_the_servers_other_calls(
    tmp_path: Path,
) -> None:
    # Each write waited for its turn on a thread of the default executor: a burst held every
    # one, and what else the server runs there (the revision read answering each write, an
    # agent's record) waited behind the whole burst, its client's deadline running out.
    clock = FakeClock(1000)
    store = _TurnTakingStore(SqliteDataStore(tmp_path / "ds.sqlite3", clock))
    state = ServerState(store, clock, ChangeNotifier())  # type: ignore[arg-type]
    state.load()

    async def burst() -> list[list[Entry | DataStoreError]]:
        writes = [
            asyncio.create_task(state.create_entries([Entry("", f"{TD}/b{n}", AGENT, ())]))
            for n in range(BURST)
        ]
        try:
            for _ in range(500):
                if store.waiting:
                    break
                await asyncio.sleep(0.01)
            assert store.waiting, "no entry write reached the datastore"
            served = await asyncio.wait_for(asyncio.to_thread(lambda: "served"), 10)
            assert served == "served"
            assert store.most == 1
        finally:
            store.go.set()
        return await asyncio.gather(*writes)

    results = asyncio.run(burst())
    assert all(isinstance(r, Entry) for batch in results for r in batch)
    assert len(state.entries.by_id) == BURST
    assert store.most == 1
