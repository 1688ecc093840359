"""Workload attestation: from a caller's kernel credentials to selectors."""

from __future__ import annotations

import contextlib
import grp
import hashlib
import logging
import os
import pwd
import threading
from dataclasses import dataclass
from typing import Protocol

from agent_attestor.model import Selector
from agent_attestor.userns import ProcSysctls, Sysctls, unprivileged_userns
from svid._clock import Clock, SystemClock
from svid._log_throttle import ThrottledLines

log = logging.getLogger(__name__)
# What is said about a caller is said once, then once per this many seconds (any local process
# can connect as often as it likes).
SELECTOR_LOG_INTERVAL = 60.0

# When the executable selectors are given: "auto" where no unprivileged user namespace can be
# made (detected at start), "always" (the operator accepts the risk), "never".
EXE_SELECTOR_CHOICES = ("auto", "always", "never")

_HASH_CHUNK = 1 << 20
DEFAULT_MAX_HASH_SIZE = 256 * 1024 * 1024


class WorkloadAttestor(Protocol):
    """Derives selectors for a process; may read /proc/<pid> (the caller brackets it)."""

    @property
    def reads_process(self) -> bool:
        """Whether attest() may read the process at all (False: kernel credentials only), so
        that identification checks the caller's image only when a selector can depend on it."""
        ...

    def attest(self, pid: int, uid: int, gid: int) -> list[Selector]: ...


@dataclass(frozen=True, slots=True)
class _FileId:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    # A file's owner can write new bytes and set mtime back (utimensat); ctime moves on every
    # change and nobody can set it. So `touch` costs a rehash: nothing cheaper proves the bytes
    # unchanged. What bounds that cost is max_size and the per-uid share of the identify pool.
    ctime_ns: int


class ExeTooLargeError(OSError):
    """The executable is larger than the hash limit."""


class ExeHashCache:
    """sha256 of executables keyed by (dev, inode, size, mtime, ctime): a binary is hashed once.
    Files above `max_size` bytes are not hashed at all (sparse gigabytes cost the same to read)."""

    def __init__(self, max_entries: int = 1024, max_size: int = DEFAULT_MAX_HASH_SIZE) -> None:
        self._lock = threading.Lock()
        self._hashes: dict[_FileId, str] = {}
        self._max = max_entries
        self.max_size = max_size
        self.misses = 0

    def sha256(self, path: str) -> str:
        """The file's sha256; ExeTooLargeError above max_size."""
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_size > self.max_size:
                raise ExeTooLargeError(
                    f"{st.st_size} bytes is over the {self.max_size}-byte hash limit"
                )
            key = _FileId(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            with self._lock:
                cached = self._hashes.get(key)
            if cached is not None:
                return cached
            digest = hashlib.sha256()
            left = st.st_size  # a file that grows while read is hashed as it was when stat'd
            while left > 0 and (chunk := f.read(min(_HASH_CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
        value = digest.hexdigest()
        with self._lock:
            self.misses += 1
            if len(self._hashes) >= self._max:
                self._hashes.pop(next(iter(self._hashes)))
            self._hashes[key] = value
        return value


def _namespace(link: str) -> tuple[int, int]:
    """What names a namespace (/proc/<pid>/ns/<kind>): its nsfs device and inode."""
    st = os.stat(link)
    return st.st_dev, st.st_ino


def _names(path: str, runs: os.stat_result) -> bool:
    """Whether `path`, looked up by the agent, is the file `runs` describes. The exe link names
    the file as the process's own mount namespace has it: in a container, or under a bind
    mount, that path here may be another program (or none, for a file since deleted)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL, which no path here holds
        return False
    return (st.st_dev, st.st_ino) == (runs.st_dev, runs.st_ino)


class UnixAttestor:
    """`unix:uid`, `unix:user`, `unix:gid`, `unix:group`, `unix:path`, `unix:sha256`.

    The executable selectors (path and hash) say nothing where a caller can point its own
    /proc/<pid>/exe at any file it can open. prctl(PR_SET_MM_MAP) does that for whoever holds
    CAP_CHECKPOINT_RESTORE in the process's user namespace, which any user has in one of its
    own. The exe belongs to the memory map, not to the process: a child cloned with
    CLONE_VM | CLONE_NEWUSER shares its parent's map from a namespace of its own and sets the
    parent's exe, then exits, and the parent, never having left the agent's namespace, shows
    another program with no trace left. So with `exe_selectors` "auto" they are given only
    where no unprivileged user namespace can be made (userns.py, read once at start); "always"
    gives them anyway (the operator accepts that risk), "never" never. Either way a caller seen
    in another user namespace than the agent's gets none."""

    def __init__(
        self,
        proc_root: str = "/proc",
        hashes: ExeHashCache | None = None,
        clock: Clock | None = None,
        exe_selectors: str = "auto",
        sysctls: Sysctls | None = None,
    ) -> None:
        if exe_selectors not in EXE_SELECTOR_CHOICES:
            raise ValueError(f"exe_selectors must be one of {EXE_SELECTOR_CHOICES}")
        self._proc_root = proc_root
        self._hashes = hashes or ExeHashCache()
        self._lines = ThrottledLines(log, SELECTOR_LOG_INTERVAL, clock or SystemClock())
        # None: a kernel without user namespaces (no ns/user link), so every process is in ours.
        self._user_ns: tuple[int, int] | None = None
        with contextlib.suppress(FileNotFoundError):
            self._user_ns = _namespace(f"{proc_root}/self/ns/user")
        self._exe_selectors = exe_selectors
        # Why a caller may make its exe name another program; None where none can.
        self.exe_risk = (
            None
            if self._user_ns is None
            else unprivileged_userns(sysctls or ProcSysctls(proc_root))
        )
        self.gives_exe = exe_selectors == "always" or (
            exe_selectors == "auto" and self.exe_risk is None
        )

    @property
    def reads_process(self) -> bool:
        return self.gives_exe  # uid and gid come from the kernel's record

    def announce(self) -> None:
        """Say once, at the agent's start, whether callers get the executable selectors and why
        not: attest() withholds them without a word."""
        if self._exe_selectors == "never":
            log.info("no unix:path or unix:sha256 selectors: exe_selectors is never")
        elif not self.gives_exe:
            log.warning(
                "no unix:path or unix:sha256 selectors for any caller: here a caller could make "
                'them name any program it can read; exe_selectors = "always" gives them anyway, '
                "accepting that",
                extra={"reason": self.exe_risk},
            )
        elif self.exe_risk is not None:
            log.info(
                "unix:path and unix:sha256 given though a caller could make them name any "
                "program it can read (exe_selectors is always)",
                extra={"reason": self.exe_risk},
            )

    def attest(self, pid: int, uid: int, gid: int) -> list[Selector]:
        out = [Selector("unix", f"uid:{uid}"), Selector("unix", f"gid:{gid}")]
        with contextlib.suppress(KeyError):
            out.append(Selector("unix", f"user:{pwd.getpwuid(uid).pw_name}"))
        with contextlib.suppress(KeyError):
            out.append(Selector("unix", f"group:{grp.getgrgid(gid).gr_name}"))
        if pid > 0 and self.gives_exe:
            # Before the exe is read: a process that enters a namespace and then changes its
            # exe is seen in that namespace by this check, or by identify's second reading.
            try:
                own_namespace = (
                    self._user_ns is None
                    or _namespace(f"{self._proc_root}/{pid}/ns/user") == self._user_ns
                )
            except OSError as exc:
                log.debug("no executable selectors", extra={"pid": pid, "reason": exc.strerror})
                return out
            if not own_namespace:
                self._lines.info(
                    "no executable selectors: the caller is in another user namespace",
                    {"pid": pid},
                )
                return out
            exe_link = f"{self._proc_root}/{pid}/exe"
            try:
                path = os.readlink(exe_link)
                runs = os.stat(exe_link)
            except OSError as exc:
                log.debug("no executable selectors", extra={"pid": pid, "reason": exc.strerror})
                return out
            exe: list[Selector] = []
            if _names(path, runs):
                exe.append(Selector("unix", f"path:{path}"))
            else:
                self._lines.info(
                    "no unix:path selector: the path the caller runs names another file here",
                    {"pid": pid},
                )
            try:
                # Opening the /proc link reads the very file the process runs, even if replaced.
                digest = self._hashes.sha256(exe_link)
            except ExeTooLargeError as exc:
                self._lines.info("no unix:sha256 selector", {"pid": pid, "reason": str(exc)})
            except OSError as exc:
                # Path and hash go together, as before: the process is going away.
                log.debug("no executable selectors", extra={"pid": pid, "reason": exc.strerror})
                return out
            else:
                exe.append(Selector("unix", f"sha256:{digest}"))
            out.extend(exe)
        return out
