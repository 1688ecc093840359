"""What the agent's log says when JWT-SVID mints fail (the server away), however many a local
workload asks for: over the real Workload API socket, with the signer failing as an unreachable
server does."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from agent_attestor.mint_calls import MINT_FAILURE_LOG_INTERVAL
from svid._proto import workload_pb2
from tests.agent_attestor.harness import HEADER, Harness
from tests.log_lines import LogLines, log_lines

MISSES = 40  # within the uid's mint burst: each is a mint that fails, not a refusal


@pytest.fixture
def mint_log() -> Iterator[LogLines]:
    with log_lines("agent_attestor.workload_api") as lines:
        yield lines


def test_failed_mints_are_logged_once_an_interval_with_how_many(mint_log: LogLines) -> None:
    """Fails on main: each failed mint wrote its own warning (~600 bytes), 100 a second per uid
    (its mint budget) for as long as a workload asked, each audience a miss."""
    harness = Harness()
    try:
        harness.add_entry("/w")
        harness.signer.fail = True
        stub = harness.stub()

        def mint(audience: str) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as refused:
                stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=[audience]), metadata=HEADER)
            return refused.value.code()  # type: ignore[attr-defined, no-any-return]

        codes = {mint(f"aud-{i}") for i in range(MISSES)}
        assert codes == {grpc.StatusCode.UNAVAILABLE}
        said = [r for r in mint_log.records if r.getMessage() == "could not mint a JWT-SVID"]
        assert [getattr(r, "times", None) for r in said] == [1]
        harness.clock.advance(MINT_FAILURE_LOG_INTERVAL)
        assert mint("after") is grpc.StatusCode.UNAVAILABLE
        said = [r for r in mint_log.records if r.getMessage() == "could not mint a JWT-SVID"]
        assert [getattr(r, "times", None) for r in said] == [1, MISSES]
        assert "server unreachable" in str(getattr(said[-1], "error", ""))
    finally:
        harness.close()
