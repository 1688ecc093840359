"""`make run` (agent_attestor.demo) names the demo workload after the user running it: any user
name, and a uid with no name at all, gives a SPIFFE ID the server accepts; and its sockets fit
sun_path wherever the checkout is."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from agent_attestor.demo import (
    LOCK,
    TRUST_DOMAIN,
    Demo,
    _segment,
    fresh_root,
    server_runtime,
    workload_user,
)
from svid._spiffe_id import SpiffeId
from svid._unix_socket import MAX_UNIX_PATH, unix_path_size
from tests.fifo import raised_without_blocking


def _unnamed_uid() -> int:
    """A uid the passwd database has no entry for (a container's arbitrary uid)."""
    for uid in range(54321, 54421):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    pytest.skip("no uid without a passwd entry near 54321")


def test_a_uid_with_no_passwd_entry_is_named_by_its_number() -> None:
    uid = _unnamed_uid()
    user, segment = workload_user(uid)
    assert (user, segment) == (f"uid {uid}", f"uid-{uid}")
    SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/demo/{segment}")


def test_the_running_user_is_named_as_the_passwd_database_says() -> None:
    user, segment = workload_user(os.getuid())
    assert user == pwd.getpwuid(os.getuid()).pw_name
    SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/demo/{segment}")


@pytest.mark.parametrize(
    ("name", "segment"),
    [("jöhn", "j-hn"), ("名前", "--"), ("a b", "a-b"), ("..", "user"), ("j.doe_1", "j.doe_1")],
)
def test_any_user_name_makes_a_valid_path_segment(name: str, segment: str) -> None:
    assert _segment(name) == segment
    SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/demo/{segment}")


def test_sockets_fit_sun_path_under_a_checkout_with_a_non_ascii_path() -> None:
    # 72 characters to the agent's socket, 112 bytes: counted in characters, the demo kept its
    # sockets under the checkout, and the server refused an admin socket past 107 bytes.
    root = Path("/tmp") / ("д" * 40) / ".run"
    demo = Demo(root)
    try:
        assert unix_path_size(demo.socket) <= MAX_UNIX_PATH
        assert unix_path_size(demo.admin) <= MAX_UNIX_PATH
    finally:
        demo.stop()


def test_the_demo_waits_for_the_servers_runtime_file_without_blocking_on_a_fifo(
    tmp_path: Path,
) -> None:
    # Read by name (exists, read_text), a FIFO at server.json's name hung `make run` for good.
    runtime = tmp_path / "server.json"
    os.mkfifo(runtime)
    seen: list[object] = []

    def read() -> None:
        seen.append(server_runtime(runtime, 42))

    assert raised_without_blocking(read, runtime) is None
    assert seen == [None]
    runtime.unlink()
    runtime.write_text('{"pid": 41}')
    assert server_runtime(runtime, 42) is None  # an earlier run's
    runtime.write_text('{"pid": 42, "node_address": "127.0.0.1:1"}')
    assert server_runtime(runtime, 42) == {"pid": 42, "node_address": "127.0.0.1:1"}


def test_a_fifo_at_the_demo_lock_is_wiped_not_waited_on(tmp_path: Path) -> None:
    # Opened by name to see whether a demo held it, a FIFO there hung `make run` for good.
    root = tmp_path / "run"
    root.mkdir()
    fifo = root / LOCK
    os.mkfifo(fifo)
    made: list[Path] = []
    assert raised_without_blocking(lambda: made.append(fresh_root(root)), fifo) is None
    assert made == [root]
    assert (root / LOCK).is_file()
