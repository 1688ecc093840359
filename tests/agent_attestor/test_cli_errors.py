"""`svid-agent api|task|healthcheck` when the agent is not where the CLI looks: one line on stderr
naming the address, where it came from and what to try; non-zero exit; no traceback; no hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_attestor.config import DEFAULT_SOCKET
from tests.tmpdirs import removed_after
from tests.users import as_another_user

ENV = "SPIFFE_ENDPOINT_SOCKET"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    yield from removed_after("ace")


def _agent_cli(
    *argv: str, env: str | None, limit: float = 20.0, prefix: list[str] | None = None
) -> tuple[int, str, str, float]:
    environ = {k: v for k, v in os.environ.items() if k != ENV}
    if env is not None:
        environ[ENV] = env
    started = time.monotonic()
    done = subprocess.run(
        [*(prefix or []), sys.executable, "-m", "agent_attestor.cli", *argv],
        capture_output=True,
        text=True,
        env=environ,
        timeout=limit,
        check=False,
    )
    return done.returncode, done.stdout, done.stderr, time.monotonic() - started


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith("svid-agent: ")
    assert "failed to connect to all addresses" not in err  # not gRPC's raw text
    return err


FETCH = ("api", "fetch", "jwt", "--audience", "a", "--timeout", "0.5")


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("/tmp/x.sock", "write unix:///tmp/x.sock"),
        ("unix://relative", "unix:///absolute/path"),
        ("http://127.0.0.1:1", "use unix:///absolute/path or tcp://IP:port"),
    ],
)
def test_a_malformed_endpoint_says_how_to_write_it(value: str, hint: str) -> None:
    code, out, err, _ = _agent_cli(*FETCH, env=value)
    assert (code, out) == (2, "")
    assert ENV in _one_line(err)
    assert hint in err


def test_unset_endpoint_names_the_default_and_the_variable() -> None:
    if DEFAULT_SOCKET.exists():
        pytest.skip(f"an agent socket exists at the default {DEFAULT_SOCKET}")
    code, out, err, _ = _agent_cli(*FETCH, env=None)
    assert (code, out) == (1, "")
    assert f"no socket at {DEFAULT_SOCKET}" in _one_line(err)
    assert f"{ENV} is not set" in err
    assert "is svid-agent running?" in err


def test_a_missing_socket_names_it_and_what_to_try(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    code, out, err, _ = _agent_cli(*FETCH, env=f"unix://{path}")
    assert (code, out) == (1, "")
    assert f"no socket at {path} (from {ENV})" in _one_line(err)
    assert "--socket-path" in err
    code, _, err, _ = _agent_cli("task", "list", "--socket-path", str(path), env=None)
    assert code == 1
    assert f"no socket at {path} (from --socket-path)" in _one_line(err)


def test_a_file_that_is_not_a_socket(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    path.write_text("")
    code, out, err, _ = _agent_cli(*FETCH, env=f"unix://{path}")
    assert (code, out) == (1, "")
    assert f"{path} (from {ENV}) is not a socket" in _one_line(err)


@pytest.mark.parametrize("private", ["directory", "socket"])
def test_a_socket_this_user_may_not_open(sock_dir: Path, private: str) -> None:
    sock_dir.chmod(0o755)
    (sock_dir / "private").mkdir(mode=0o700 if private == "directory" else 0o755)
    path = sock_dir / "private" / "api.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    path.chmod(0o600 if private == "socket" else 0o777)
    try:
        code, out, err, _ = _agent_cli(*FETCH, env=f"unix://{path}", prefix=as_another_user())
    finally:
        server.close()
    assert (code, out) == (1, "")
    assert f"{path} (from {ENV})" in _one_line(err)
    assert "permission denied" in err
    assert "run as a user the agent serves" in err


def test_a_socket_nobody_listens_on(sock_dir: Path) -> None:
    path = sock_dir / "api.sock"
    stale = socket.socket(socket.AF_UNIX)  # what a crashed agent leaves behind
    stale.bind(str(path))
    try:
        code, out, err, _ = _agent_cli(*FETCH, env=f"unix://{path}")
    finally:
        stale.close()
    assert (code, out) == (1, "")
    assert f"cannot connect to {path} (from {ENV}) (Connection refused)" in _one_line(err)
    assert "is svid-agent running?" in err


@pytest.mark.parametrize(
    "argv",
    [
        FETCH,
        ("api", "watch", "--timeout", "0.5"),  # a stream: no deadline of its own
        ("healthcheck", "--timeout", "0.5"),
        ("task", "list", "--timeout", "0.5"),
    ],
)
def test_a_hung_agent_does_not_hang_the_cli(sock_dir: Path, argv: tuple[str, ...]) -> None:
    path = sock_dir / "api.sock"
    hung = socket.socket(socket.AF_UNIX)  # connections queue in the backlog; nobody answers
    hung.bind(str(path))
    hung.listen(16)
    try:
        code, out, err, took = _agent_cli(*argv, env=f"unix://{path}", limit=30)
    finally:
        hung.close()
    assert (code, out) == (1, "")
    assert str(path) in _one_line(err)
    assert "hung" in err
    assert took < 15
