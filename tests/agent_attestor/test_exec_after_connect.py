"""Issue 11 item 2: a caller that execs after connecting must not lend the new image's identity
to a sibling that kept the connection.

Real processes throughout: a Python child connects to the agent's public socket, forks a sibling
that keeps the socket, and execs a copy of /bin/sleep whose path an entry names. The sibling then
carries gRPC over the kept socket (by offering it on a path of its own). Identification is held
at a gate until the exec has happened, as a busy identify pool would hold it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_attestor.model import Selector
from agent_attestor.workload_attestor import UnixAttestor
from svid._proto import workload_pb2
from tests.agent_attestor.harness import HEADER, Harness, fetch_ids
from tests.waits import wait_for

_CHILD = textwrap.dedent(
    """
    import os, socket, sys, threading
    agent_sock, proxy, target, inheritable = sys.argv[1:5]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(agent_sock)
    if inheritable == "1":
        s.set_inheritable(True)  # the exec'd image inherits it without close-on-exec
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(proxy)
    lst.listen(1)
    if os.fork() == 0:
        c, _ = lst.accept()
        def pump(a, b):
            try:
                while d := a.recv(65536):
                    b.sendall(d)
            except OSError:
                pass
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        threading.Thread(target=pump, args=(c, s), daemon=True).start()
        pump(s, c)
        os._exit(0)
    os.execv(target, [target, "60"])
    """
)


class _Gate:
    """An attestor that holds identification until the test opens it."""

    reads_process = True

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def attest(self, pid: int, uid: int, gid: int) -> list[Selector]:
        self.entered.set()
        self.open.wait(30)
        return []


def _exe_is(pid: int, target: Path) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe") == str(target)
    except OSError:
        return False


@pytest.fixture
def gated() -> Iterator[tuple[Harness, _Gate]]:
    gate = _Gate()
    h = Harness(attestors=[gate, UnixAttestor(exe_selectors="always")])
    try:
        yield h, gate
    finally:
        gate.open.set()
        h.close()


@pytest.mark.parametrize("inheritable", [False, True], ids=["cloexec", "inherited"])
def test_a_sibling_of_a_caller_that_execs_does_not_get_the_new_images_identity(
    gated: tuple[Harness, _Gate], inheritable: bool
) -> None:
    agent, gate = gated
    target = agent.root / "trusted-tool"
    shutil.copy("/bin/sleep", target)
    agent.add_entry("/anyone")  # unix:uid only: what the kernel recorded at connect still counts
    agent.add_entry(
        "/trusted",
        frozenset({Selector("unix", f"uid:{os.getuid()}"), Selector("unix", f"path:{target}")}),
    )
    proxy = agent.root / "sibling.sock"
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            str(agent.socket_path),
            str(proxy),
            str(target),
            "1" if inheritable else "0",
        ],
        start_new_session=True,
    )
    try:
        wait_for(gate.entered.is_set, 20, "identification to start")
        wait_for(lambda: _exe_is(child.pid, target) and proxy.exists(), 20, "the exec")
        gate.open.set()
        assert fetch_ids(f"unix:{proxy}") == ["spiffe://example.org/anyone"]
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(10)


def test_a_caller_that_did_not_exec_keeps_its_path_identity(
    gated: tuple[Harness, _Gate],
) -> None:
    agent, gate = gated
    gate.open.set()
    exe = os.path.realpath(sys.executable)
    agent.add_entry(
        "/me",
        frozenset({Selector("unix", f"uid:{os.getuid()}"), Selector("unix", f"path:{exe}")}),
    )
    msg = next(agent.stub().FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER))
    assert [s.spiffe_id for s in msg.svids] == ["spiffe://example.org/me"]
