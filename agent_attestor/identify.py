"""Identify a connected workload: SO_PEERCRED, then every attestor, safe against pid reuse and
against an exec after connect.

What /proc/<pid> shows is the image the process runs *now*, which need not be the one that
connected: a process may connect, fork a sibling that keeps the socket, and exec a binary it may
run but whose identity it must not have. There is no exec counter to compare, so we ask whether
the connecting pid still holds the client end of *this* connection in a close-on-exec
descriptor (see proc.holds_close_on_exec): such a descriptor does not survive an exec, so the
image that holds it opened it or took it in itself. The attestors run before that check and
again after it, and must agree, so an exec during identification is caught as well. When the
check fails the caller keeps what the kernel recorded at connect (uid, gid and their names) and
loses everything read from the process.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Sequence

from agent_attestor import proc
from agent_attestor.errors import ProcessGoneError
from agent_attestor.model import Selector
from agent_attestor.peer import Caller
from agent_attestor.unix_diag import UnixDiagError, peer_inode
from agent_attestor.workload_attestor import WorkloadAttestor
from svid._clock import Clock
from svid._log_throttle import ThrottledLines

log = logging.getLogger(__name__)
# Any local process can connect as often as it likes: what is said about each caller is said
# once, then once per this many seconds with how many callers it stands for.
CALLER_LOG_INTERVAL = 60.0

_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, as the kernel recorded them."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def caller_log(clock: Clock) -> ThrottledLines:
    """The throttled lines `identify` writes about callers; one for all its calls."""
    return ThrottledLines(log, CALLER_LOG_INTERVAL, clock)


def _attest(
    attestors: Sequence[WorkloadAttestor], pid: int, uid: int, gid: int
) -> frozenset[Selector]:
    found: set[Selector] = set()
    for attestor in attestors:
        found.update(attestor.attest(pid, uid, gid))
    return frozenset(found)


def identify(
    sock: socket.socket,
    conn_id: str,
    attestors: Sequence[WorkloadAttestor],
    lines: ThrottledLines,
) -> Caller:
    """Attest the peer of `sock`. A process that is gone (or whose pid was reused) gets no
    selectors at all: an identity must never come from a process other than the caller. One
    that may have exec'd since it connected gets only its connect-time credentials."""
    pid, uid, gid = peer_credentials(sock)
    pidfd = proc.peer_pidfd(sock, pid) if pid > 0 else None
    try:
        client_end: int | None = None
        if any(attestor.reads_process for attestor in attestors):
            try:
                client_end = peer_inode(sock)
            except UnixDiagError as exc:
                # The relay warned once at start if sock_diag is missing altogether.
                log.debug("cannot check the caller's image", extra={"pid": pid, "reason": str(exc)})

            def read() -> frozenset[Selector] | None:
                first = _attest(attestors, pid, uid, gid)
                if client_end is None or not proc.holds_close_on_exec(pid, client_end):
                    return None
                if _attest(attestors, pid, uid, gid) != first:
                    return None  # it exec'd (or changed) while we read
                return first
        else:
            # Nothing read from the process can change what it gets (exe selectors off, the
            # default wherever a user may make a user namespace): only whether it still lives.
            # Its descriptors were listed anyway, ~10 us each, and any user may hold hundreds of
            # thousands and connect in a loop: seconds of the agent's CPU (and GIL) a connection.
            def read() -> frozenset[Selector] | None:
                return _attest(attestors, 0, uid, gid)

        try:
            selectors = proc.read_stable(pid, pidfd, read)
        except ProcessGoneError as exc:
            lines.info("caller has no identity", {"pid": pid, "reason": str(exc)})
            selectors = frozenset()
        if selectors is None:
            lines.info(
                "caller does not hold its connection close-on-exec: no executable selectors",
                {"pid": pid, "uid": uid},
            )
            # pid 0 tells attestors there is no process to read: kernel credentials only.
            selectors = _attest(attestors, 0, uid, gid)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return Caller(conn_id=conn_id, pid=pid, uid=uid, gid=gid, selectors=selectors)
