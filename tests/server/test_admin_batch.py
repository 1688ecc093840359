"""Batch create/update/delete over the admin Unix socket: per-item results in request order,
one transaction and one change notification per batch, the single-entry validation rules."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import grpc
import pytest

from server.datastore.testing import FaultInjectingDataStore
from svid._proto import admin_pb2, common_pb2, node_pb2
from tests.server.fixtures import TRUST_DOMAIN, RunningServer, managed_server, running_server

TD = f"spiffe://{TRUST_DOMAIN}"
SERVER = f"{TD}/svid/server"
OK = grpc.StatusCode.OK.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
EXISTS = grpc.StatusCode.ALREADY_EXISTS.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
ABORTED = grpc.StatusCode.ABORTED.value[0]


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    yield from running_server()


def _agent(name: str) -> str:
    return f"{TD}/svid/agent/join_token/{name}"


def _entry(path: str, parent: str, uid: str = "1000", **kwargs: object) -> common_pb2.Entry:
    values: dict[str, object] = {
        "spiffe_id": f"{TD}{path}",
        "parent_id": parent,
        "selectors": [common_pb2.Selector(type="unix", value=f"uid:{uid}")],
    }
    values.update(kwargs)
    return common_pb2.Entry(**values)  # type: ignore[arg-type]


def _listed(srv: RunningServer, parent: str) -> list[common_pb2.Entry]:
    return list(
        srv.admin()
        .ListEntries(admin_pb2.ListEntriesRequest(parent_id=parent, page_size=5000))
        .entries
    )


def _codes(results: object) -> list[int]:
    return [r.status.code for r in results]  # type: ignore[attr-defined]


def test_batch_create_answers_every_item_in_order(srv: RunningServer) -> None:
    parent = _agent("bc1")
    admin = srv.admin()
    admin.CreateEntry(admin_pb2.CreateEntryRequest(entry=_entry("/bc1/old", parent)))
    batch = [
        _entry("/bc1/a", parent),
        _entry("/bc1/old", parent),  # stored already
        _entry("/bc1/bad", parent, selectors=[]),
        _entry("/bc1/node", SERVER, uid="7"),  # a node entry ...
        _entry("/bc1/child", f"{TD}/bc1/node"),  # ... parenting an item later in the batch
        _entry("/bc1/a", parent),  # a repeat of the first item
        _entry("/bc1/named", parent, id="bc1-named"),
        _entry("/bc1/bad-id", parent, id="bad id!"),
    ]
    results = admin.BatchCreateEntry(admin_pb2.BatchCreateEntryRequest(entries=batch)).results
    assert _codes(results) == [OK, EXISTS, INVALID, OK, OK, EXISTS, OK, INVALID]
    assert "selectors: at least one selector is required" in results[2].status.message
    assert "id: 'bad id!' is not an entry ID" in results[7].status.message
    assert results[1].status.message.startswith(f"an entry for {TD}/bc1/old under {parent}")
    assert results[5].status.message.endswith(f"(id {results[0].id})")
    assert results[6].id == "bc1-named"
    for result in (results[0], results[3], results[4], results[6]):
        assert result.revision == 1
        assert result.created_at > 0
        fetched = admin.GetEntry(admin_pb2.GetEntryRequest(id=result.id))
        assert fetched.spiffe_id == result.spiffe_id
    assert {e.spiffe_id for e in _listed(srv, parent)} == {
        f"{TD}/bc1/old",
        f"{TD}/bc1/a",
        f"{TD}/bc1/named",
    }


def test_a_batch_is_one_notification_and_reaches_a_sync_stream_whole(
    srv: RunningServer,
) -> None:
    agent = srv.attest()
    stream = srv.node_stub(agent).Sync(node_pb2.SyncRequest(), timeout=30)
    try:
        assert list(next(stream).entries) == []
        notifier = srv.server.state.notifier
        before = notifier.version
        batch = [_entry(f"/sync/{n}", agent.spiffe_id, uid=str(n)) for n in range(300)]
        results = (
            srv.admin()
            .BatchCreateEntry(admin_pb2.BatchCreateEntryRequest(entries=batch), timeout=30)
            .results
        )
        assert set(_codes(results)) == {OK}
        assert notifier.version == before + 1
        # One change per batch: the first update after it carries all of it, never a part.
        delta = next(stream)
        assert len(delta.entries) == 300
        assert not delta.more
    finally:
        stream.cancel()


def test_batch_update_answers_every_item(srv: RunningServer) -> None:
    parent = _agent("bu1")
    admin = srv.admin()
    created = admin.BatchCreateEntry(
        admin_pb2.BatchCreateEntryRequest(
            entries=[_entry("/bu1/a", parent), _entry("/bu1/b", parent)]
        )
    ).results
    a = admin.GetEntry(admin_pb2.GetEntryRequest(id=created[0].id))
    b = admin.GetEntry(admin_pb2.GetEntryRequest(id=created[1].id))

    def changed(entry: common_pb2.Entry, **fields: object) -> common_pb2.Entry:
        copy = common_pb2.Entry()
        copy.CopyFrom(entry)
        for name, value in fields.items():
            setattr(copy, name, value)
        return copy

    results = admin.BatchUpdateEntry(
        admin_pb2.BatchUpdateEntryRequest(
            entries=[
                changed(a, hint="new"),  # revision 1 is the stored one
                changed(b, hint="stale", revision=5),
                changed(b, spiffe_id=a.spiffe_id),  # a's identity exactly
                changed(a, id="bu1-missing"),
                changed(a, x509_svid_ttl=-1, revision=0),
                changed(a, hint="newer", revision=0),  # 0: whatever is stored
            ]
        )
    ).results
    assert _codes(results) == [OK, ABORTED, EXISTS, NOT_FOUND, INVALID, OK]
    assert "revision 1, update was based on 5" in results[1].status.message
    assert "entry bu1-missing not found" in results[3].status.message
    assert "x509_svid_ttl" in results[4].status.message
    assert [results[0].revision, results[5].revision] == [2, 3]
    assert admin.GetEntry(admin_pb2.GetEntryRequest(id=a.id)).hint == "newer"
    assert admin.GetEntry(admin_pb2.GetEntryRequest(id=b.id)) == b


def test_batch_delete_answers_every_item(srv: RunningServer) -> None:
    parent = _agent("bd1")
    admin = srv.admin()
    created = admin.BatchCreateEntry(
        admin_pb2.BatchCreateEntryRequest(
            entries=[_entry("/bd1/a", parent), _entry("/bd1/b", parent)]
        )
    ).results
    a, b = created[0].id, created[1].id
    results = admin.BatchDeleteEntry(
        admin_pb2.BatchDeleteEntryRequest(ids=[a, a, "bd1-missing", "bad id"])
    ).results
    assert _codes(results) == [OK, NOT_FOUND, NOT_FOUND, INVALID]
    assert [r.id for r in results] == [a, a, "bd1-missing", "bad id"]
    assert [e.id for e in _listed(srv, parent)] == [b]


@pytest.mark.parametrize(
    ("call", "request_", "field"),
    [
        ("BatchCreateEntry", admin_pb2.BatchCreateEntryRequest, "entries"),
        ("BatchUpdateEntry", admin_pb2.BatchUpdateEntryRequest, "entries"),
        ("BatchDeleteEntry", admin_pb2.BatchDeleteEntryRequest, "ids"),
    ],
)
def test_more_than_1000_items_is_refused_whole(
    srv: RunningServer, call: str, request_: type, field: str
) -> None:
    parent = _agent(f"big{call}")
    if field == "ids":
        items: list[object] = [f"id{n}" for n in range(1001)]
    else:
        items = [_entry(f"/big/{n}", parent, uid=str(n)) for n in range(1001)]
    with pytest.raises(grpc.RpcError) as exc:
        getattr(srv.admin(), call)(request_(**{field: items}), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert f"{field}: 1001 items; at most 1000 per call" in exc.value.details()  # type: ignore[attr-defined]
    assert _listed(srv, parent) == []


def test_an_empty_batch_is_an_empty_answer(srv: RunningServer) -> None:
    reply = srv.admin().BatchCreateEntry(admin_pb2.BatchCreateEntryRequest())
    assert list(reply.results) == []


def test_a_storage_failure_fails_the_batch_whole_and_changes_nothing() -> None:
    with managed_server() as srv:
        state = srv.server.state
        # The real store, wrapped to fail on demand (the server builds its own, so the test
        # wraps the one it built).
        faulty = FaultInjectingDataStore(state._datastore)
        state._datastore = faulty
        faulty.inject(sqlite3.OperationalError("disk I/O error at /secret/path"), "create_entries")
        parent = _agent("fail1")
        before = srv.server.state.notifier.version
        with pytest.raises(grpc.RpcError) as exc:
            srv.admin().BatchCreateEntry(
                admin_pb2.BatchCreateEntryRequest(
                    entries=[_entry(f"/fail/{n}", parent, uid=str(n)) for n in range(5)]
                )
            )
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert "/secret/path" not in exc.value.details()  # type: ignore[attr-defined]
        assert _listed(srv, parent) == []
        assert faulty.inner.list_entries(parent_id=parent) == []
        assert srv.server.state.notifier.version == before
        # The next batch goes through.
        results = (
            srv.admin()
            .BatchCreateEntry(admin_pb2.BatchCreateEntryRequest(entries=[_entry("/ok", parent)]))
            .results
        )
        assert _codes(results) == [OK]
