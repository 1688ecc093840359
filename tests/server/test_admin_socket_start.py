"""The admin socket is private from the moment it exists: another local user cannot connect to
it while the server starts (and keep that connection after the socket is locked down), whatever
the umask the server was started with."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import textwrap
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from server import admin_socket
from server.errors import ConfigError
from tests.backlog import fill_backlog
from tests.server.fixtures import short_tmpdir, start_server
from tests.users import system_python

NOBODY = 65534
HANG = 30.0  # seconds: a probe still waiting by then is taken as hung

# Runs as another user: connects to the socket, and only if that is let through asks for a join
# token over gRPC (a node enrolled by someone with no admin rights).
_CHILD = textwrap.dedent(
    """
    import socket, sys
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(sys.argv[1])
    except PermissionError:
        print("refused at connect", flush=True)
        sys.exit(0)
    print("connected", flush=True)
    import grpc
    from svid._proto import admin_pb2, admin_pb2_grpc
    channel = grpc.insecure_channel("unix:" + sys.argv[1])
    try:
        answer = admin_pb2_grpc.AdminStub(channel).CreateJoinToken(
            admin_pb2.CreateJoinTokenRequest(ttl=60), timeout=20
        )
        print("GOT", answer.agent_spiffe_id, flush=True)
    except grpc.RpcError as exc:
        print("REFUSED", exc.code(), flush=True)
    """
)


def test_another_user_cannot_connect_to_the_admin_socket_while_the_server_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A shared directory (left open, with a warning) and a umask of 0: the socket's mode then
    # comes from the bind alone. The stranger tries in the window between the server serving
    # and the lock-down, the window a umask-made 0777 socket used to leave open.
    assert os.geteuid() == 0, "runs as root to start a process of another user (as CI does)"
    root = short_tmpdir()
    os.chmod(root, 0o755)
    shared = root / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    (shared / "other-file").write_text("not the socket's own directory\n")
    sock = shared / "admin.sock"
    tests_root = Path(__file__).resolve().parents[2]
    site = Path(grpc.__file__).parents[1]
    seen: dict[str, Any] = {}
    real_lock_down = admin_socket.lock_down

    def lock_down_after_a_stranger_tried(path: Path) -> None:
        seen["mode"] = stat.S_IMODE(path.stat().st_mode)
        seen["umask"] = os.umask(0)  # the process's, after the bind: as it was (0) before it
        os.umask(seen["umask"])
        proc = subprocess.Popen(
            [system_python(), "-c", _CHILD, str(path)],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            env={"PYTHONPATH": f"{tests_root}:{site}", "PATH": "/usr/bin:/bin"},
            cwd="/",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        seen["first"] = proc.stdout.readline().strip()
        seen["proc"] = proc
        real_lock_down(path)

    monkeypatch.setattr(admin_socket, "lock_down", lock_down_after_a_stranger_tried)
    old_umask = os.umask(0)
    try:
        srv = start_server(root, admin_socket=str(sock))
    finally:
        os.umask(old_umask)
    try:
        proc: subprocess.Popen[str] = seen["proc"]
        out, err = proc.communicate(timeout=60)
        assert seen["mode"] == 0o600, oct(seen["mode"])
        assert seen["first"] == "refused at connect", (seen["first"], out, err[-300:])
        assert seen["umask"] == 0  # the private umask was held around the bind alone
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_running_server_whose_backlog_is_full_is_refused_at_once() -> None:
    """The probe of a socket already at admin_socket does not wait: a blocking connect to a
    listener whose backlog is full waited for it to accept, holding the second start for as
    long as the first server's loop stalled (for ever here). Refused, as a listener."""
    path = short_tmpdir() / "admin.sock"
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(str(path))
    busy.listen(0)  # never accepts: its backlog fills
    callers = fill_backlog(path)
    outcome: list[BaseException | None] = []

    def start() -> None:
        try:
            admin_socket.prepare(path)
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    prober = threading.Thread(target=start, daemon=True)
    try:
        prober.start()
        prober.join(HANG)  # a bound on a hang, not on speed: the fixed probe does not wait
        assert outcome, "the probe waited on the full backlog"
        assert isinstance(outcome[0], ConfigError)
        assert str(outcome[0]) == f"admin_socket: another server is listening on {path}"
        assert path.exists()
    finally:
        for caller in callers:
            caller.close()
        busy.close()  # a waiting probe is refused now, and its thread ends
        prober.join()
