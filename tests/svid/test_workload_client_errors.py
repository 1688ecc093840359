"""WorkloadApiClient names the address and what to check when the agent is not there."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from svid._workload_address import ENV_SOCKET, WorkloadApiAddressError
from svid.workloadapi import WorkloadApiClient, WorkloadApiUnavailableError


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="wce", dir="/tmp"))  # Unix socket paths must be short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _failure(address: str, timeout: float = 2.0) -> WorkloadApiUnavailableError:
    with WorkloadApiClient(address, timeout=timeout) as client:
        try:
            client.fetch_jwt_svid("svc")
        except WorkloadApiUnavailableError as exc:
            message = str(exc)
            assert address in message
            assert "failed to connect to all addresses" not in message  # not gRPC's raw text
            assert "\n" not in message
            return exc
    raise AssertionError(f"fetching from {address} did not fail")


def test_missing_socket_names_address_and_what_to_check(sock_dir: Path) -> None:
    address = f"unix://{sock_dir}/nobody.sock"
    exc = _failure(address)
    assert "No such file or directory" in str(exc)
    assert ENV_SOCKET in str(exc)
    assert exc.code == "UNAVAILABLE"
    client = WorkloadApiClient(address, timeout=2.0)  # a stream fails the same way
    with client, pytest.raises(WorkloadApiUnavailableError, match=f"agent at {address} "):
        client.fetch_x509_svids()


def test_nothing_listening_is_connection_refused(sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)  # bound, never listening: a crashed agent's socket
    stale.bind(str(path))
    try:
        assert "Connection refused" in str(_failure(f"unix://{path}"))
    finally:
        stale.close()


def test_a_hung_agent_fails_in_time_naming_the_address(sock_dir: Path) -> None:
    path = sock_dir / "hung.sock"
    hung = socket.socket(socket.AF_UNIX)  # accepts connections (backlog), never answers
    hung.bind(str(path))
    hung.listen(8)
    try:
        message = str(_failure(f"unix://{path}", timeout=0.5))
    finally:
        hung.close()
    assert "does not answer" in message or "no answer" in message
    assert "hung" in message


def test_address_from_the_environment_is_named(sock_dir: Path) -> None:
    address = f"unix://{sock_dir}/env.sock"
    client = WorkloadApiClient(environ={ENV_SOCKET: address}, timeout=2.0)
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
