"""Sync messages stay under their bounds whatever they carry, and say which part is the last."""

from __future__ import annotations

from server.datastore.records import Entry, Revocation, Selector
from server.sync_messages import DELTA, SNAPSHOT, Shared, delta_messages, snapshot_messages
from svid._proto import common_pb2

TD = "spiffe://example.org"
BUNDLE = common_pb2.Bundle(trust_domain="example.org", x509_authorities=[b"x" * 3000])


def _entries(count: int) -> list[Entry]:
    return [
        Entry(f"id{n:06d}", f"{TD}/w/{n}", f"{TD}/agent", (Selector("unix", f"uid:{n}"),))
        for n in range(count)
    ]


def test_a_big_snapshot_is_split_below_the_bounds_with_the_bundle_last() -> None:
    entries = _entries(5000)
    revocations = [Revocation("jwt_id", f"j{n}", f"{TD}/w", 9, "r", 1) for n in range(700)]
    shared = Shared(bundle=BUNDLE, crl=[b"c" * 5000])
    parts = list(
        snapshot_messages(
            entries, revocations, shared, revision=7, epoch="e", max_bytes=64 * 1024, max_items=500
        )
    )
    assert len(parts) > 10
    assert all(p.ByteSize() <= 64 * 1024 + 200 for p in parts)
    assert all(len(p.entries) + len(p.revocations) <= 500 for p in parts)
    assert [p.more for p in parts] == [True] * (len(parts) - 1) + [False]
    assert {(p.kind, p.revision, p.epoch) for p in parts} == {(SNAPSHOT, 7, "e")}
    assert [e.id for p in parts for e in p.entries] == [e.id for e in entries]
    assert sum(len(p.revocations) for p in parts) == 700
    assert [p.HasField("bundle") for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].crl_changed
    assert list(parts[-1].crl) == [b"c" * 5000]


def test_a_small_delta_is_one_message_and_says_only_what_changed() -> None:
    (only,) = delta_messages(_entries(2), ["gone"], [], [], Shared(), revision=3, epoch="e")
    assert (only.kind, only.more, only.revision) == (DELTA, False, 3)
    assert [e.id for e in only.entries] == ["id000000", "id000001"]
    assert list(only.removed_entry_ids) == ["gone"]
    assert not only.HasField("bundle")
    assert not only.crl_changed


def test_crls_too_big_for_one_message_are_spread_over_the_run() -> None:
    crls = [bytes([n]) * 40_000 for n in range(6)]
    for make in (
        lambda: snapshot_messages(
            _entries(300),
            [],
            Shared(bundle=BUNDLE, crl=crls),
            revision=1,
            epoch="e",
            max_bytes=64 * 1024,
        ),
        lambda: delta_messages(
            _entries(300),
            [],
            [],
            [],
            Shared(bundle=BUNDLE, crl=crls),
            revision=1,
            epoch="e",
            max_bytes=64 * 1024,
        ),
    ):
        parts = list(make())
        assert all(p.ByteSize() <= 64 * 1024 + 200 for p in parts)
        # The run's parts together carry every CRL once, in order; each part carrying one says
        # so, and so does the last (the agent installs them together then).
        assert [c for p in parts for c in p.crl] == crls
        assert all(p.crl_changed for p in parts if p.crl)
        assert parts[-1].crl_changed
        assert [p.HasField("bundle") for p in parts] == [False] * (len(parts) - 1) + [True]


def test_an_emptied_crl_list_is_still_news() -> None:
    (only,) = delta_messages([], [], [], [], Shared(crl=[]), revision=3, epoch="e")
    assert only.crl_changed
    assert list(only.crl) == []
