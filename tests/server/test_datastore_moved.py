"""A SQLite datastore file moved away under a running server: the server serves on from what it
holds, refuses every write (each lost with the file it went to) naming the path in its log and
nothing of it to clients, and writes again once the file is back."""

from __future__ import annotations

import grpc
import pytest

from server.datastore.errors import DatastoreMovedError
from server.status import STORAGE_MESSAGE
from svid._proto import node_pb2
from tests.server.fixtures import managed_server


def test_a_server_whose_datastore_file_was_moved_away_serves_on_and_takes_no_write() -> None:
    with managed_server() as server:
        agent = server.attest()
        entry = server.create_entry("/before", agent.spiffe_id)
        path = server.config.datastore_path
        aside = path.with_name("moved-away")
        path.rename(aside)
        try:
            # The housekeeping's credential prune: the operator's log names the file.
            with pytest.raises(DatastoreMovedError, match=f"the datastore file at {path} is gone"):
                server.call(server.server.tasks.service.housekeeping())
            with pytest.raises(grpc.RpcError) as refused:
                server.create_entry("/lost", agent.spiffe_id)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert refused.value.details() == STORAGE_MESSAGE  # no path to a client
            # Served on from memory: the agent's snapshot, its entry in it.
            stream = server.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=10)
            snapshot = next(stream)
            stream.cancel()
            assert [e.id for e in snapshot.entries] == [entry.id]
        finally:
            aside.replace(path)
        after = server.create_entry("/after", agent.spiffe_id)
        server.call(server.server.tasks.service.housekeeping())
    assert after.id
