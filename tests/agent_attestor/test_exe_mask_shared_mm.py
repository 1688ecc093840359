"""The user-namespace guard on unix:path and unix:sha256, against a caller that stays in the
agent's user namespace and has a child that shares its memory do the masking from another.

UnixAttestor withholds the executable selectors from a caller in another user namespace than
the agent's, because there any user holds CAP_CHECKPOINT_RESTORE, which PR_SET_MM_MAP asks to
point /proc/<pid>/exe at any file it can open. But the exe link belongs to the memory map, not
to the process: a child cloned with CLONE_VM | CLONE_NEWUSER shares its parent's map from a
namespace of its own, and setting the exe there sets the parent's. The parent never left the
agent's namespace, so it passes the guard, and `nobody` gets the path and hash of a program it
does not run (here /usr/bin/sleep). An entry that selects a program by path or hash (and not
the caller's uid) is then any local user's.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_attestor.model import Selector
from tests.agent_attestor.exe_mask import built_exe_mask
from tests.agent_attestor.harness import Harness, fetch_ids
from tests.users import as_another_user

SYS_PIDFD_GETFD = 438


@pytest.fixture(scope="module")
def exe_mask_shared() -> Iterator[Path]:
    """tests/agent_attestor/exe_mask.c, in its mode that masks from a child sharing the memory."""
    with built_exe_mask() as binary:
        yield binary


def _take_fd(pid: int, fd: int) -> int:
    """A duplicate of descriptor `fd` of process `pid` (pidfd_getfd; the test runs as root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        dup = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return int(dup)
    finally:
        os.close(pidfd)


def _forward(listen_path: Path, conn_fd: int) -> None:
    """Serve one connection on `listen_path` by piping it to the connection `conn_fd`: the
    bytes of a gRPC client here go over the masked process's own connection to the agent."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(listen_path))
    listener.listen(1)
    upstream = socket.socket(fileno=conn_fd)

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        client, _ = listener.accept()
        listener.close()
        threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
        pipe(upstream, client)

    threading.Thread(target=serve, daemon=True).start()


def test_a_child_sharing_the_callers_memory_cannot_mask_its_exe(
    agent: Harness, exe_mask_shared: Path
) -> None:
    """`nobody`, running exe_mask in its shared mode, was served the identity of entries that select
    /usr/bin/sleep by hash or path. Under the default exe_selectors ("auto"), a machine where
    the trick takes is one where no caller gets executable selectors at all."""
    target = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    digest = hashlib.sha256(Path(target).read_bytes()).hexdigest()
    agent.add_entry("/sleep-by-hash", frozenset({Selector("unix", f"sha256:{digest}")}))
    agent.add_entry("/sleep-by-path", frozenset({Selector("unix", f"path:{target}")}))
    os.chmod(agent.root, 0o755)
    os.chmod(agent.socket_path.parent, 0o755)
    child = subprocess.Popen(
        [*as_another_user(), str(exe_mask_shared), target, str(agent.socket_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        answer = child.stdout.read(2)
        if answer[:1] != b"y":
            child.kill()
            assert child.stderr is not None
            pytest.skip(f"the mask did not take here ({answer!r}): {child.stderr.read()!r}")
        assert os.readlink(f"/proc/{child.pid}/exe") == target  # the trick worked
        # ... from the agent's own user namespace
        assert os.stat(f"/proc/{child.pid}/ns/user").st_ino == os.stat("/proc/self/ns/user").st_ino
        forwarder = agent.root / "fwd.sock"
        _forward(forwarder, _take_fd(child.pid, answer[1]))
        got = fetch_ids(f"unix:{forwarder}")
    finally:
        child.kill()
        child.wait()
    assert got == [] or not isinstance(got, list), (
        f"a process that does not run {target} was served {got}"
    )
