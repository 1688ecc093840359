"""WorkloadApiClient names the address and what to check when the agent is not there."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from svid._task_errors import translate as translate_task_error
from svid._workload_address import ENV_SOCKET, WorkloadApiAddressError
from svid.tasks import AsyncTaskClient, TaskClient
from svid.workloadapi import WorkloadApiClient, WorkloadApiUnavailableError
from tests.svid.aio_facade import FLAVORS, new_client
from tests.tmpdirs import short_tmpdir


@pytest.fixture(params=FLAVORS)
def flavor(request: pytest.FixtureRequest) -> str:
    """The asyncio client says the same as the sync one."""
    return str(request.param)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = short_tmpdir("wce")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _failure(address: str, flavor: str, timeout: float = 2.0) -> WorkloadApiUnavailableError:
    with new_client(flavor, address, timeout=timeout) as client:
        try:
            client.fetch_jwt_svid("svc")
        except WorkloadApiUnavailableError as exc:
            message = str(exc)
            assert address in message
            assert "failed to connect to all addresses" not in message  # not gRPC's raw text
            assert "\n" not in message
            return exc
    raise AssertionError(f"fetching from {address} did not fail")


def test_missing_socket_names_address_and_what_to_check(sock_dir: Path, flavor: str) -> None:
    address = f"unix://{sock_dir}/nobody.sock"
    exc = _failure(address, flavor)
    assert "No such file or directory" in str(exc)
    assert ENV_SOCKET in str(exc)
    assert exc.code == "UNAVAILABLE"
    client = new_client(flavor, address, timeout=2.0)  # a stream fails the same way
    with client, pytest.raises(WorkloadApiUnavailableError, match=f"agent at {address} "):
        client.fetch_x509_svids()


def test_nothing_listening_is_connection_refused(sock_dir: Path, flavor: str) -> None:
    path = sock_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)  # bound, never listening: a crashed agent's socket
    stale.bind(str(path))
    try:
        assert "Connection refused" in str(_failure(f"unix://{path}", flavor))
    finally:
        stale.close()


def test_a_hung_agent_fails_in_time_naming_the_address(sock_dir: Path, flavor: str) -> None:
    path = sock_dir / "hung.sock"
    hung = socket.socket(socket.AF_UNIX)  # accepts connections (backlog), never answers
    hung.bind(str(path))
    hung.listen(8)
    try:
        message = str(_failure(f"unix://{path}", flavor, timeout=0.5))
    finally:
        hung.close()
    assert "does not answer" in message or "no answer" in message
    assert "hung" in message


def test_a_hung_agent_s_task_call_asks_whether_it_is_hung(sock_dir: Path, flavor: str) -> None:
    # The task clients asked whether the agent was running, as for a missing socket, where
    # the Workload API client asks whether it is hung.
    path = sock_dir / "agent.sock"
    hung = socket.socket(socket.AF_UNIX)  # accepts connections (backlog), never answers
    hung.bind(str(path))
    hung.listen(8)
    address = f"unix://{path}"

    def begin() -> None:
        with TaskClient(address, timeout=0.5) as client:
            client.begin(actions=["read"], resources=["docs"])

    async def abegin() -> None:
        async with AsyncTaskClient(address, timeout=0.5) as client:
            await client.begin(actions=["read"], resources=["docs"])

    try:
        with pytest.raises(WorkloadApiUnavailableError) as raised:
            begin() if flavor == "sync" else asyncio.run(abegin())
    finally:
        hung.close()
    message = str(raised.value)
    assert address in message
    assert "hung" in message
    assert "is the SPIFFE agent running" not in message, message


class _SilentPeer(grpc.RpcError):
    """What gRPC raises when the socket accepted the connection and sent no HTTP/2 SETTINGS
    within its connect timeout (20 s, past this test's patience)."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return (
            "failed to connect to all addresses; last error: UNAVAILABLE: unix:/run/a.sock: "
            "Connection to the peer was closed before receiving SETTINGS"
        )


def test_a_task_call_to_a_silent_socket_asks_whether_the_agent_is_hung() -> None:
    message = str(translate_task_error(_SilentPeer(), "BeginTask", "unix:///run/a.sock"))
    assert "accepts connections but does not answer" in message
    assert "is the agent hung" in message
    assert "is the SPIFFE agent running" not in message


def test_address_from_the_environment_is_named(sock_dir: Path, flavor: str) -> None:
    address = f"unix://{sock_dir}/env.sock"
    client = new_client(flavor, environ={ENV_SOCKET: address}, timeout=2.0)
    with client, pytest.raises(WorkloadApiUnavailableError, match=f"agent at {address} "):
        client.fetch_jwt_svid("svc")


@pytest.mark.parametrize(
    ("address", "hint"),
    [("/tmp/x.sock", "write unix:///tmp/x.sock"), ("unix://relative", "unix:///absolute/path")],
)
def test_malformed_addresses_say_how_to_write_them(address: str, hint: str) -> None:
    with pytest.raises(WorkloadApiAddressError, match=hint):
        WorkloadApiClient(address)


def test_unset_environment_says_what_to_set() -> None:
    with pytest.raises(WorkloadApiAddressError, match=f"{ENV_SOCKET} is not set; set it"):
        WorkloadApiClient(environ={})
