"""`svid-server <admin command>` when the server is not where the CLI looks, or hangs: one line on
stderr naming the admin socket, where that path came from and what to try; exit 1; no hang."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tmpdirs import removed_after
from tests.users import as_another_user

ENV = "SVID_SERVER_ADMIN_SOCKET"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    yield from removed_after("sce")


def _server_cli(
    *argv: str,
    env: str | None = None,
    limit: float = 30.0,
    prefix: list[str] | None = None,
    home: Path | None = None,
) -> tuple[int, str, float]:
    environ = {k: v for k, v in os.environ.items() if k != ENV}
    if env is not None:
        environ[ENV] = env
    if home is not None:
        environ["HOME"] = str(home)
    started = time.monotonic()
    done = subprocess.run(
        [*(prefix or []), sys.executable, "-m", "server.cli", *argv],
        capture_output=True,
        text=True,
        env=environ,
        timeout=limit,
        check=False,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    err = done.stderr
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith("svid-server: error: ")
    assert "failed to connect to all addresses" not in err  # not gRPC's raw text
    return done.returncode, err, time.monotonic() - started


def test_missing_socket_names_the_path_its_origin_and_what_to_try(sock_dir: Path) -> None:
    path = sock_dir / "admin.sock"
    _, err, _ = _server_cli("entry", "show", "--admin-socket", str(path))
    assert f"admin socket {path} (from --admin-socket) does not exist" in err
    assert "is svid-server running?" in err
    _, err, _ = _server_cli("task", "list", env=str(path))
    assert f"{path} (from ${ENV})" in err
    config = sock_dir / "server.toml"
    config.write_text(f'admin_socket = "{path}"\n')
    _, err, _ = _server_cli("healthcheck", "--config", str(config))
    assert f"{path} (from admin_socket in {config})" in err


def test_an_admin_socket_under_home_in_the_config_is_dialled_where_the_server_binds_it(
    sock_dir: Path,
) -> None:
    # The server expands a leading ~ in admin_socket (server/config.py), but admin commands
    # took the config's value literally: they dialled ./~/admin.sock, never the server's socket.
    (sock_dir / "admin.sock").write_text("")  # not a socket: the error says where it looked
    config = sock_dir / "server.toml"
    config.write_text('admin_socket = "~/admin.sock"\n')
    _, err, _ = _server_cli("agent", "list", "--config", str(config), home=sock_dir)
    expected = f"admin socket {sock_dir / 'admin.sock'} (from admin_socket in {config})"
    assert f"{expected} is not a socket" in err


def test_a_file_that_is_not_a_socket(sock_dir: Path) -> None:
    path = sock_dir / "admin.sock"
    path.write_text("")
    _, err, _ = _server_cli("agent", "list", "--admin-socket", str(path))
    assert f"admin socket {path} (from --admin-socket) is not a socket" in err


@pytest.mark.parametrize("private", ["directory", "socket"])
def test_another_users_admin_socket(sock_dir: Path, private: str) -> None:
    sock_dir.chmod(0o755)
    (sock_dir / "private").mkdir(mode=0o700 if private == "directory" else 0o755)
    path = sock_dir / "private" / "admin.sock"  # the server's layout: 0600 socket, 0700 dir
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    path.chmod(0o600 if private == "socket" else 0o777)
    try:
        _, err, _ = _server_cli(
            "agent", "list", "--admin-socket", str(path), prefix=as_another_user()
        )
    finally:
        server.close()
    assert f"cannot open admin socket {path} (from --admin-socket): permission denied" in err
    assert "run the command as" in err


def test_a_socket_nobody_listens_on(sock_dir: Path) -> None:
    path = sock_dir / "admin.sock"
    stale = socket.socket(socket.AF_UNIX)  # what a crashed server leaves behind
    stale.bind(str(path))
    try:
        _, err, _ = _server_cli("entry", "show", "--admin-socket", str(path))
    finally:
        stale.close()
    assert f"{path} (from --admin-socket) (Connection refused)" in err
    assert "is svid-server running?" in err


@pytest.mark.parametrize(
    "argv",
    [("entry", "show"), ("task", "list"), ("policy", "reload"), ("healthcheck",)],
)
def test_a_hung_server_ends_at_the_timeout(sock_dir: Path, argv: tuple[str, ...]) -> None:
    path = sock_dir / "admin.sock"
    hung = socket.socket(socket.AF_UNIX)  # connections queue in the backlog; nobody answers
    hung.bind(str(path))
    hung.listen(16)
    try:
        _, err, took = _server_cli(*argv, "--admin-socket", str(path), "--timeout", "0.5")
    finally:
        hung.close()
    assert str(path) in err
    assert "hung" in err
    assert took < 15


def test_a_bad_timeout_is_refused(sock_dir: Path) -> None:
    _, err, _ = _server_cli("entry", "show", "--timeout", "0", "--admin-socket", str(sock_dir))
    assert "--timeout" in err


@pytest.mark.parametrize("timeout", ["inf", "nan", "1e10"])
def test_a_timeout_grpc_cannot_wait_is_refused(sock_dir: Path, timeout: str) -> None:
    # gRPC ends a call with a deadline this far off at once: the CLI said the server was hung.
    code, err, _ = _server_cli(
        "entry", "show", "--timeout", timeout, "--admin-socket", str(sock_dir)
    )
    assert code == 1
    assert err.startswith(f"svid-server: error: --timeout: {float(timeout):g} must be")
