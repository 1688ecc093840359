"""SVIDs minted when a workload first asks (a capped agent, or one still minting after a restart),
over a real Workload API socket: the first message carries them, no UNAVAILABLE round trip."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from svid._proto import workload_pb2
from tests.agent_attestor.harness import HEADER, Harness


@pytest.fixture
def lazy() -> Iterator[Harness]:
    h = Harness(max_prefetched=1, on_demand=True)
    try:
        yield h
    finally:
        h.close()


def test_an_entry_beyond_the_cap_is_minted_for_the_first_message(lazy: Harness) -> None:
    lazy.add_entry("/a")
    lazy.add_entry("/b")  # over the cap of 1: not minted in advance
    assert sorted(lazy.cache.svids()) == ["e-1"]
    lazy.run_rotator()
    stream = lazy.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    first = next(stream)
    assert [s.spiffe_id for s in first.svids] == [
        "spiffe://example.org/a",
        "spiffe://example.org/b",
    ]
    # Both are served an open stream: the cap does not evict them from under it.
    assert lazy.lt.call(lambda: sorted(lazy.cache.svids())) == ["e-1", "e-2"]
    stream.cancel()


def test_an_entry_still_being_minted_after_a_restart_waits_instead_of_unavailable() -> None:
    h = Harness(on_demand=True)
    try:
        h.add_entry("/w", issue=False)  # as after a restart: the entry is known, no SVID yet
        h.run_rotator()
        msg = next(h.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
        assert [s.spiffe_id for s in msg.svids] == ["spiffe://example.org/w"]
    finally:
        h.close()


def test_with_the_server_down_a_missing_svid_is_unavailable_after_the_wait() -> None:
    h = Harness(on_demand=True, first_wait=0.3)  # the 5 s default is a client's retry time
    try:
        h.signer.fail = True
        h.add_entry("/w", issue=False)
        h.run_rotator()
        with pytest.raises(grpc.RpcError) as exc:
            next(h.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
        assert exc.value.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    finally:
        h.close()
