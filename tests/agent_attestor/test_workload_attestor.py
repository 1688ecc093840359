"""Unix workload attestation and the pid-reuse guard."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_attestor import proc
from agent_attestor.errors import ProcessGoneError
from agent_attestor.model import Selector
from agent_attestor.userns import MAX_USER_NAMESPACES
from agent_attestor.workload_attestor import ExeHashCache, ExeTooLargeError, UnixAttestor
from svid._clock import FakeClock
from tests.agent_attestor.exe_mask import built_exe_mask
from tests.users import as_another_user


def test_selectors_for_this_process() -> None:
    sels = set(UnixAttestor(exe_selectors="always").attest(os.getpid(), os.getuid(), os.getgid()))
    exe = os.path.realpath(sys.executable)
    digest = hashlib.sha256(Path(exe).read_bytes()).hexdigest()
    assert {
        Selector("unix", f"uid:{os.getuid()}"),
        Selector("unix", f"gid:{os.getgid()}"),
        Selector("unix", f"user:{pwd.getpwuid(os.getuid()).pw_name}"),
        Selector("unix", f"group:{grp.getgrgid(os.getgid()).gr_name}"),
        Selector("unix", f"path:{exe}"),
        Selector("unix", f"sha256:{digest}"),
    } == sels


class _Sysctls:
    """Sysctls as a kernel might have them, whatever this machine's are."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def read(self, name: str) -> str | None:
        return self.values.get(name)


USERNS_OPEN = _Sysctls({MAX_USER_NAMESPACES: "63000"})
USERNS_OFF = _Sysctls({MAX_USER_NAMESPACES: "0"})


def _exe_selectors(sels: list[Selector]) -> list[Selector]:
    return [s for s in sels if s.value.startswith(("path:", "sha256:"))]


def test_by_default_none_are_given_where_any_user_may_make_a_user_namespace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """There a caller's CLONE_VM child, in a namespace of its own, points their shared exe at
    any program (test_exe_mask_shared_mm.py); nothing left in /proc tells."""
    caplog.set_level(logging.INFO, logger="agent_attestor")
    attestor = UnixAttestor(sysctls=USERNS_OPEN)
    assert attestor.exe_risk is not None
    assert not attestor.gives_exe
    attestor.announce()
    for _ in range(3):
        sels = attestor.attest(os.getpid(), os.getuid(), os.getgid())
        assert _exe_selectors(sels) == []
        assert Selector("unix", f"uid:{os.getuid()}") in sels
    # Said once, at start, with why and what would give them; each caller gets no line.
    [line] = [r for r in caplog.records if r.name == "agent_attestor.workload_attestor"]
    assert line.levelno == logging.WARNING
    assert 'exe_selectors = "always"' in line.getMessage()
    reason = f"any user may make user namespaces ({MAX_USER_NAMESPACES} = 63000)"
    assert getattr(line, "reason", "") == reason


def test_by_default_they_are_given_where_no_user_may_make_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agent_attestor")
    attestor = UnixAttestor(sysctls=USERNS_OFF)
    attestor.announce()
    sels = attestor.attest(os.getpid(), os.getuid(), os.getgid())
    exe = os.path.realpath(sys.executable)
    assert Selector("unix", f"path:{exe}") in sels
    assert Selector("unix", f"sha256:{hashlib.sha256(Path(exe).read_bytes()).hexdigest()}") in sels
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_always_gives_them_anyway_and_never_gives_none() -> None:
    pid, uid, gid = os.getpid(), os.getuid(), os.getgid()
    always = UnixAttestor(exe_selectors="always", sysctls=USERNS_OPEN).attest(pid, uid, gid)
    assert len(_exe_selectors(always)) == 2
    never = UnixAttestor(exe_selectors="never", sysctls=USERNS_OFF).attest(pid, uid, gid)
    assert _exe_selectors(never) == []
    assert Selector("unix", f"uid:{uid}") in never


def test_an_unknown_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="exe_selectors"):
        UnixAttestor(exe_selectors="sometimes")


def test_unknown_uid_and_gid_get_numeric_selectors_only() -> None:
    sels = UnixAttestor().attest(0, 4_000_000, 4_000_001)
    assert sels == [Selector("unix", "uid:4000000"), Selector("unix", "gid:4000001")]


def test_exe_hash_is_cached_by_inode_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "bin"
    f.write_bytes(b"one")
    cache = ExeHashCache()
    first = cache.sha256(str(f))
    assert cache.sha256(str(f)) == first
    assert cache.misses == 1
    f.write_bytes(b"two!")  # size and mtime change
    assert cache.sha256(str(f)) == hashlib.sha256(b"two!").hexdigest()
    assert cache.misses == 2


def test_a_copied_binary_has_another_path_but_the_same_sha256(tmp_path: Path) -> None:
    exe = tmp_path / "sleeper"
    shutil.copy("/bin/sleep", exe)
    child = subprocess.Popen([str(exe), "30"])
    try:
        sels = UnixAttestor(exe_selectors="always").attest(child.pid, os.getuid(), os.getgid())
    finally:
        child.kill()
        child.wait()
    assert Selector("unix", f"path:{exe}") in sels
    assert Selector("unix", f"sha256:{hashlib.sha256(exe.read_bytes()).hexdigest()}") in sels


def test_read_stable_refuses_a_process_that_exits_while_read() -> None:
    child = subprocess.Popen(["/bin/sleep", "30"])
    pidfd = os.pidfd_open(child.pid)
    try:

        def read() -> str:
            child.kill()
            child.wait()
            return "read from a process that is gone"

        with pytest.raises(ProcessGoneError):
            proc.read_stable(child.pid, pidfd, read)
    finally:
        os.close(pidfd)


def test_read_stable_passes_for_a_live_process_and_start_time_parses_odd_names(
    tmp_path: Path,
) -> None:
    exe = tmp_path / "a b) (c"
    shutil.copy("/bin/sleep", exe)
    child = subprocess.Popen([str(exe), "30"])
    pidfd = os.pidfd_open(child.pid)
    try:
        assert proc.read_stable(child.pid, pidfd, lambda: 42) == 42
        assert proc.start_time(child.pid) > 0
    finally:
        child.kill()
        child.wait()
        os.close(pidfd)
    with pytest.raises(ProcessGoneError):
        proc.start_time(child.pid)


def test_a_huge_sparse_executable_gets_a_path_but_is_not_hashed(tmp_path: Path) -> None:
    """Issue 11 item 6: reading 2 GiB of holes costs as much as 2 GiB of code."""
    exe = tmp_path / "huge"
    shutil.copy("/bin/sleep", exe)
    os.truncate(exe, 2 << 30)  # the ELF loader ignores the trailing zeros
    hashes = ExeHashCache()
    child = subprocess.Popen([str(exe), "30"])
    try:
        sels = UnixAttestor(hashes=hashes, exe_selectors="always").attest(
            child.pid, os.getuid(), os.getgid()
        )
    finally:
        child.kill()
        child.wait()
    assert Selector("unix", f"path:{exe}") in sels
    assert not [s for s in sels if s.value.startswith("sha256:")]
    assert hashes.misses == 0


def test_the_hash_limit_is_a_setting(tmp_path: Path) -> None:
    f = tmp_path / "bin"
    f.write_bytes(b"x" * 100)
    assert ExeHashCache(max_size=100).sha256(str(f)) == hashlib.sha256(b"x" * 100).hexdigest()
    with pytest.raises(ExeTooLargeError, match="100 bytes is over the 99-byte hash limit"):
        ExeHashCache(max_size=99).sha256(str(f))


def test_rewritten_bytes_with_the_old_mtime_are_hashed_again(tmp_path: Path) -> None:
    """The file's owner can rewrite it in place and set mtime back; ctime still moves."""
    f = tmp_path / "bin"
    f.write_bytes(b"good")
    st = f.stat()
    cache = ExeHashCache()
    assert cache.sha256(str(f)) == hashlib.sha256(b"good").hexdigest()
    with open(f, "r+b") as out:
        out.write(b"evil")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size
    assert f.stat().st_mtime_ns == st.st_mtime_ns
    assert cache.sha256(str(f)) == hashlib.sha256(b"evil").hexdigest()


@pytest.fixture(scope="module")
def exe_mask() -> Iterator[Path]:
    """tests/agent_attestor/exe_mask.c, in its mode that masks from a namespace of its own."""
    with built_exe_mask() as binary:
        yield binary


def test_a_process_in_a_user_namespace_of_its_own_gets_no_executable_selectors(
    exe_mask: Path,
) -> None:
    """Inside a user namespace of its own any user may point its /proc/<pid>/exe at a file it
    can read (prctl PR_SET_MM_MAP): path and hash would then be another program's."""
    target = os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    child = subprocess.Popen(
        [*as_another_user(), str(exe_mask), target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        answer = child.stdout.read(1)
        if answer != b"y":
            child.kill()
            pytest.skip(f"this kernel lets no user namespace set its exe: {child.stderr.read()!r}")
        assert os.readlink(f"/proc/{child.pid}/exe") == target  # the trick worked
        st = os.stat(f"/proc/{child.pid}/status")
        sels = UnixAttestor(exe_selectors="always").attest(child.pid, st.st_uid, st.st_gid)
    finally:
        child.kill()
        child.wait()
    digest = hashlib.sha256(Path(target).read_bytes()).hexdigest()
    assert Selector("unix", f"path:{target}") not in sels
    assert Selector("unix", f"sha256:{digest}") not in sels
    assert Selector("unix", f"uid:{st.st_uid}") in sels  # what the kernel recorded still counts


def test_a_path_that_names_another_file_here_is_no_unix_path(tmp_path: Path) -> None:
    """/proc/<pid>/exe names the file as the process's own mount namespace has it (a
    container's image, a bind mount): that path here may be another program."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to make a mount namespace")
    trusted = tmp_path / "trusted-tool"
    shutil.copy("/bin/sleep", trusted)
    other = tmp_path / "other-tool"
    shutil.copy("/bin/sleep", other)
    with open(other, "ab") as f:
        f.write(b"another program")  # the ELF loader ignores trailing bytes
    child = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation=private",
            "sh",
            "-c",
            'mount --bind "$1" "$2" && exec "$2" 30',
            "sh",
            str(other),
            str(trusted),
        ]
    )
    try:
        for _ in range(500):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{child.pid}/exe") == str(trusted):
                    break
            time.sleep(0.01)
        else:
            raise AssertionError("the child did not exec the bound path")
        sels = UnixAttestor(exe_selectors="always").attest(child.pid, os.getuid(), os.getgid())
    finally:
        child.kill()
        child.wait()
    assert Selector("unix", f"path:{trusted}") not in sels
    # The hash is of the very file it runs, whatever its namespace calls it.
    assert Selector("unix", f"sha256:{hashlib.sha256(other.read_bytes()).hexdigest()}") in sels


def test_without_user_namespaces_in_the_kernel_every_process_is_in_the_agents(
    tmp_path: Path,
) -> None:
    """A kernel built without CONFIG_USER_NS has no ns/user link: the agent still starts, and
    its callers keep their executable selectors."""
    proc_root = tmp_path / "proc"
    (proc_root / "self").mkdir(parents=True)
    (proc_root / "42").mkdir()
    (proc_root / "42" / "exe").symlink_to(os.path.realpath(sys.executable))
    sels = UnixAttestor(proc_root=str(proc_root)).attest(42, os.getuid(), os.getgid())
    assert Selector("unix", f"path:{os.path.realpath(sys.executable)}") in sels


def test_what_is_said_about_callers_is_said_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Any local process can connect as often as it likes: a line each would flood the log."""
    exe = tmp_path / "huge"
    shutil.copy("/bin/sleep", exe)
    os.truncate(exe, 2 << 30)
    clock = FakeClock()
    attestor = UnixAttestor(hashes=ExeHashCache(), clock=clock, exe_selectors="always")
    caplog.set_level(logging.INFO, logger="agent_attestor")
    child = subprocess.Popen([str(exe), "30"])
    try:
        for _ in range(5):
            attestor.attest(child.pid, os.getuid(), os.getgid())
        clock.advance(60)
        attestor.attest(child.pid, os.getuid(), os.getgid())
    finally:
        child.kill()
        child.wait()
    lines = [r for r in caplog.records if r.getMessage() == "no unix:sha256 selector"]
    assert [getattr(r, "times", 1) for r in lines] == [1, 5]
