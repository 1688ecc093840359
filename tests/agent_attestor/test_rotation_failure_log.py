"""What the agent's log says while X.509-SVID issuance keeps failing (the server away): the
rotator retries every retry_max seconds at most, for as long as it fails."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent_attestor.rotation import FAILURE_LOG_INTERVAL
from tests.agent_attestor.harness import Harness
from tests.log_lines import LogLines, log_lines

MESSAGE = "SVID issuance failed; will retry"
RETRIES = 8


@pytest.fixture
def said() -> Iterator[LogLines]:
    with log_lines("agent_attestor.rotation", MESSAGE) as lines:
        yield lines


def test_failed_issuance_is_said_at_once_then_once_an_interval(said: LogLines) -> None:
    """Fails on main: each retry wrote its own line, ~360 an hour of the server's absence."""
    harness = Harness()
    try:
        harness.signer.fail = True
        harness.add_entry("/w", issue=False)

        def retry() -> None:
            delay = harness.lt.run(harness.rotator.tick())
            assert delay is not None
            harness.clock.advance(delay)

        for _ in range(RETRIES):
            retry()
        assert [getattr(r, "times", None) for r in said.records] == [1]
        harness.clock.advance(FAILURE_LOG_INTERVAL)
        retry()
        assert [getattr(r, "times", None) for r in said.records] == [1, RETRIES]
        harness.signer.fail = False
        retry()  # issued: the next failure is news, said at once
        assert harness.rotator.issued_total == 1
        harness.signer.fail = True
        harness.add_entry("/v", issue=False)
        retry()
        assert [getattr(r, "times", None) for r in said.records] == [1, RETRIES, 1]
    finally:
        harness.close()


def test_another_kind_of_failure_is_said_at_once(said: LogLines) -> None:
    """Fails on main: one throttle for every failure, so a new one (the server refusing the
    CSRs, after it was unreachable) went unsaid for up to 5 minutes behind the first."""
    harness = Harness()
    try:
        harness.signer.fail = True
        harness.add_entry("/w", issue=False)
        delay = harness.lt.run(harness.rotator.tick())
        assert delay is not None
        harness.clock.advance(delay)

        async def refuse(params: object) -> object:
            raise PermissionError("the server refused the CSR")

        harness.signer.batch_new_x509 = refuse  # type: ignore[method-assign]
        harness.lt.run(harness.rotator.tick())
        assert [r.error for r in said.records] == [  # type: ignore[attr-defined]
            "server unreachable",
            "the server refused the CSR",
        ]
    finally:
        harness.close()
