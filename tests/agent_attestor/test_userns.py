"""Which sysctls say that no unprivileged user namespace can be made, read as /proc shows them."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agent_attestor.userns import (
    APPARMOR_RESTRICT,
    MAX_USER_NAMESPACES,
    UNPRIVILEGED_CLONE,
    ProcSysctls,
    unprivileged_userns,
)


def _proc(tmp_path: Path, values: dict[str, str]) -> ProcSysctls:
    """A proc root whose sys/ holds `values`, as files named the way the kernel names them."""
    for name, value in values.items():
        path = tmp_path / "sys" / name.replace(".", "/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return ProcSysctls(str(tmp_path))


@pytest.mark.parametrize(
    "values",
    [
        {MAX_USER_NAMESPACES: "0"},
        {MAX_USER_NAMESPACES: "63000", UNPRIVILEGED_CLONE: "0"},
        # Each switch is enough alone, even with the others unreadable or missing.
        {UNPRIVILEGED_CLONE: "0"},
        {MAX_USER_NAMESPACES: "0", APPARMOR_RESTRICT: "0"},
    ],
    ids=["max-zero", "debian-clone-off", "clone-alone", "max-zero-apparmor-off"],
)
def test_a_switch_that_forbids_them_says_none_can_be_made(
    tmp_path: Path, values: dict[str, str]
) -> None:
    assert unprivileged_userns(_proc(tmp_path, values)) is None


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({MAX_USER_NAMESPACES: "63000"}, r"any user may make user namespaces .*= 63000\)$"),
        # AppArmor's restriction is lifted by stock profiles granting userns to programs a
        # user runs code in (busybox, aa-exec into such a profile): named, not trusted.
        (
            {MAX_USER_NAMESPACES: "63000", UNPRIVILEGED_CLONE: "1", APPARMOR_RESTRICT: "1"},
            r"= 63000\); kernel\.apparmor_restrict_unprivileged_userns = 1 is not taken",
        ),
        ({APPARMOR_RESTRICT: "1"}, r"user\.max_user_namespaces is not there to read"),
        (
            {MAX_USER_NAMESPACES: "63000", UNPRIVILEGED_CLONE: "1", APPARMOR_RESTRICT: "0"},
            r"any user may make user namespaces",
        ),
        # What cannot be read is no proof that they are off.
        ({}, r"user\.max_user_namespaces is not there to read"),
        ({MAX_USER_NAMESPACES: "lots"}, r"user\.max_user_namespaces reads 'lots'"),
        ({MAX_USER_NAMESPACES: ""}, r"user\.max_user_namespaces reads ''"),
    ],
    ids=[
        "limit",
        "apparmor-restricts",
        "apparmor-alone",
        "switches-off",
        "no-sys",
        "garbage",
        "empty",
    ],
)
def test_otherwise_the_reason_says_why_they_may(
    tmp_path: Path, values: dict[str, str], reason: str
) -> None:
    got = unprivileged_userns(_proc(tmp_path, values))
    assert got is not None
    assert re.search(reason, got), got


def test_a_limit_that_cannot_be_read_counts_as_no_limit(tmp_path: Path) -> None:
    sysctls = _proc(tmp_path, {})
    # A directory where the file should be: open() fails with something else than ENOENT.
    (tmp_path / "sys" / "user" / "max_user_namespaces").mkdir(parents=True)
    got = unprivileged_userns(sysctls)
    assert got is not None
    assert "cannot be read" in got


def test_this_machines_own_proc_is_read() -> None:
    """The reader finds the real file: a wrong path would read every kernel as 'not there'."""
    if not os.path.exists(f"/proc/sys/{MAX_USER_NAMESPACES.replace('.', '/')}"):
        pytest.skip("no /proc/sys/user here")
    value = ProcSysctls().read(MAX_USER_NAMESPACES)
    assert value is not None
    assert value.isdigit()
