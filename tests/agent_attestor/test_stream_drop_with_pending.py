"""SPIFFE Workload API: an SVID whose entry is removed (or which is revoked) must be dropped
from the stream's next message. Here the caller has a second entry whose SVID is not minted yet
(the server refuses it, or it is still being minted): the stream must not go silent and leave
the workload holding the one it may no longer use."""

from __future__ import annotations

import grpc
import pytest

from svid._proto import workload_pb2
from tests.agent_attestor.harness import HEADER, Harness


@pytest.mark.parametrize("how", ["removed", "revoked"])
def test_a_dropped_svid_is_taken_back_while_another_entry_awaits_its_svid(
    agent: Harness, how: str
) -> None:
    served = agent.add_entry("/served")
    agent.add_entry("/awaiting", issue=False)  # its SVID never comes (not minted here)
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=3)
    first = next(stream)
    assert [s.spiffe_id for s in first.svids] == [served.spiffe_id]

    if how == "removed":
        del agent.entries[served.id]
    else:
        agent.revoked = frozenset(
            {agent.lt.call(lambda: agent.cache.svids()[served.id].serial_hex)}
        )
    agent.sync(issue=False)

    try:
        still_served = served.spiffe_id in [s.spiffe_id for s in next(stream).svids]
    except grpc.RpcError as exc:
        # Ending the stream makes the client drop what it holds; only a deadline is silence.
        still_served = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert not still_served, f"the stream said nothing after the SVID was {how}"


def test_a_dropped_svid_ends_the_stream_as_no_identity(agent: Harness) -> None:
    served = agent.add_entry("/served")
    agent.add_entry("/awaiting", issue=False)
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=3)
    next(stream)
    agent.remove_entry(served.id)
    with pytest.raises(grpc.RpcError) as exc:
        next(stream)
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert exc.value.details() == "no identity issued any more"  # type: ignore[attr-defined]


def test_an_svid_expired_before_its_renewal_keeps_the_stream_for_the_renewal(
    agent: Harness,
) -> None:
    # Not dropped, only late: the entry is still the caller's, its next SVID is the next message.
    agent.add_entry("/w")
    agent.add_entry("/awaiting", issue=False)
    stream = agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=3)
    first = next(stream).svids[0].x509_svid
    agent.clock.advance(agent.ca.ttl + 1)
    agent.crl = (b"a new crl",)  # wakes the stream while the SVID is expired and not renewed
    agent.sync(issue=False)
    agent.lt.run(agent.rotator.tick())
    assert next(stream).svids[0].x509_svid != first
