"""The checks every service on the Workload API socket shares: security header, then caller."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agent_attestor.caller_check import checked_caller
from agent_attestor.model import Selector
from agent_attestor.peer import Caller, CallerRegistry

CALLER = Caller("c1", 10, 1000, 1000, frozenset({Selector("unix", "uid:1000")}))


class AbortError(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class FakeContext:
    """The part of grpc.aio.ServicerContext the check reads; abort raises, as grpc's does."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], peer: str) -> None:
        self._metadata = metadata
        self._peer = peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AbortError(code, details)


DENIED = grpc.StatusCode.PERMISSION_DENIED
BAD = grpc.StatusCode.INVALID_ARGUMENT


def _check(metadata: tuple[tuple[str, str], ...], peer: str) -> Caller:
    registry = CallerRegistry()
    registry.add("unix-abstract:svid-agent/1/a", CALLER)
    return asyncio.run(checked_caller(FakeContext(metadata, peer), registry))  # type: ignore[arg-type]


def test_a_relayed_caller_with_the_header_is_identified() -> None:
    assert _check((("workload.spiffe.io", "true"),), "unix-abstract:svid-agent/1/a") == CALLER


@pytest.mark.parametrize(
    ("metadata", "peer", "code"),
    [
        ((), "unix-abstract:svid-agent/1/a", BAD),
        ((("workload.spiffe.io", "false"),), "unix-abstract:svid-agent/1/a", BAD),
        (
            (("workload.spiffe.io", "false"), ("workload.spiffe.io", "true")),
            "unix-abstract:svid-agent/1/a",
            BAD,
        ),
        ((("workload.spiffe.io", "true"),), "unix-abstract:svid-agent/1/b", DENIED),
        # The same name as a path is a file its owner could rebind: never the registered caller.
        ((("workload.spiffe.io", "true"),), "unix:svid-agent/1/a", DENIED),
        ((("workload.spiffe.io", "true"),), "unix:/svid-agent/1/a", DENIED),
        ((("workload.spiffe.io", "true"),), "ipv4:127.0.0.1:5", DENIED),
    ],
)
def test_missing_header_or_unknown_connection_is_refused(
    metadata: tuple[tuple[str, str], ...], peer: str, code: grpc.StatusCode
) -> None:
    with pytest.raises(AbortError) as err:
        _check(metadata, peer)
    assert err.value.code is code
