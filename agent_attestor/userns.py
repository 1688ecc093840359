"""Whether a process without privilege may make a user namespace on this machine.

In a user namespace of its own, any process holds CAP_CHECKPOINT_RESTORE, which is all that
prctl(PR_SET_MM_MAP) asks to point its memory map's exe at any file it can open. The map may be
shared (clone CLONE_VM | CLONE_NEWUSER), so a caller that never left the agent's namespace can
show another program in /proc/<pid>/exe, and nothing in /proc tells afterwards. Where such
namespaces are available, what a caller's exe link names proves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

MAX_USER_NAMESPACES = "user.max_user_namespaces"
# Debian's and Ubuntu's switch (older kernels): 0 leaves user namespaces to CAP_SYS_ADMIN.
UNPRIVILEGED_CLONE = "kernel.unprivileged_userns_clone"
# Ubuntu 23.10 on: 1 confines an unprivileged process's new namespace to a profile without
# capabilities, unless an AppArmor profile grants `userns` to the program that made it. Not
# taken as a proof: stock profiles grant it to programs a user can run code of its own in (a
# shell such as busybox, aa-exec into such a profile), which lifts it for that user. Named in
# the reason only, so an operator who has closed those ways knows to say `always`.
APPARMOR_RESTRICT = "kernel.apparmor_restrict_unprivileged_userns"


class Sysctls(Protocol):
    def read(self, name: str) -> str | None:
        """The value of sysctl `name` (dotted), stripped; None where this kernel has none.
        OSError if it exists but cannot be read."""
        ...


@dataclass(frozen=True, slots=True)
class ProcSysctls:
    """Sysctls as <proc_root>/sys shows them to this process."""

    proc_root: str = "/proc"

    def read(self, name: str) -> str | None:
        try:
            with open(f"{self.proc_root}/sys/{name.replace('.', '/')}") as f:
                return f.read().strip()
        except FileNotFoundError:
            return None


def _read(sysctls: Sysctls, name: str) -> str | None:
    """A switch that cannot be read is taken as not set: it cannot be shown to forbid."""
    try:
        return sysctls.read(name)
    except OSError:
        return None


def unprivileged_userns(sysctls: Sysctls) -> str | None:
    """Why a process without privilege may be able to make a user namespace here, or None when
    the kernel is known to refuse it. What cannot be read counts as allowed (fail closed)."""
    if _read(sysctls, UNPRIVILEGED_CLONE) == "0":
        return None
    try:
        limit = sysctls.read(MAX_USER_NAMESPACES)
    except OSError as exc:
        return f"{MAX_USER_NAMESPACES} cannot be read ({exc.strerror})"
    if limit is None:
        return f"{MAX_USER_NAMESPACES} is not there to read"
    if limit == "0":
        return None
    if not limit.isdigit():
        return f"{MAX_USER_NAMESPACES} reads {limit[:20]!r}"
    why = f"any user may make user namespaces ({MAX_USER_NAMESPACES} = {limit})"
    if _read(sysctls, APPARMOR_RESTRICT) == "1":
        why += (
            f"; {APPARMOR_RESTRICT} = 1 is not taken as a proof (profiles granting userns to "
            "programs a user runs code in lift it)"
        )
    return why
