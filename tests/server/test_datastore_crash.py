"""kill -9 in the middle of a write stream: every write the datastore acknowledged survives, on
SQLite (a file) and on PostgreSQL (a server the killed process was a client of)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from server.datastore import DataStore
from server.datastore.sqlite import SqliteDataStore
from svid._clock import FakeClock

REPO = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from server.datastore.records import AttestedAgent, Entry, Selector
    from server.datastore.sqlite import SqliteDataStore
    from svid._clock import SystemClock

    if sys.argv[1].startswith("postgresql://"):
        from server.datastore.postgres import PostgresDataStore

        store = PostgresDataStore(sys.argv[1], SystemClock())
    else:
        store = SqliteDataStore(Path(sys.argv[1]), SystemClock())
    i = 0
    while True:
        i += 1
        e = store.create_entry(
            Entry("", f"spiffe://example.org/w/{i}", "spiffe://example.org/agent",
                  (Selector("unix", f"uid:{i}"),))
        )
        print("entry", e.id, flush=True)
        agent = f"spiffe://example.org/svid/agent/join_token/{i}"
        store.upsert_agent(AttestedAgent(agent, "join_token", str(i), 2_000_000_000))
        print("agent", agent, flush=True)
    """
)


def _reopen(place: str) -> DataStore:
    if place.startswith("postgresql://"):
        from server.datastore.postgres import PostgresDataStore

        return PostgresDataStore(place, FakeClock())
    return SqliteDataStore(Path(place), FakeClock())


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_acknowledged_writes_survive_kill_9(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    place = (
        str(tmp_path / "crash.sqlite3")
        if backend == "sqlite"
        else request.getfixturevalue("postgres_dsn")
    )
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, place],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert child.stdout is not None
    acknowledged: list[tuple[str, str]] = []
    try:
        for line in child.stdout:
            kind, value = line.split()
            acknowledged.append((kind, value))
            if len(acknowledged) >= 300:
                break
        assert acknowledged, child.stderr.read() if child.stderr else "no output"
        child.send_signal(signal.SIGKILL)
        # Lines printed before the kill landed are acknowledged writes too; one the kill cut
        # short (unbuffered, print writes a line in pieces) was never said whole: not one.
        rest, _ = child.communicate(timeout=30)
        whole = rest.split("\n")[:-1]
        acknowledged.extend(tuple(line.split()) for line in whole if line.strip())  # type: ignore[misc]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    store = _reopen(place)
    entry_ids = {e.id for e in store.list_entries()}
    agent_ids = {a.spiffe_id for a in store.list_agents()}
    store.close()
    missing = [v for k, v in acknowledged if v not in (entry_ids if k == "entry" else agent_ids)]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
    assert len(entry_ids) >= sum(k == "entry" for k, _ in acknowledged)
