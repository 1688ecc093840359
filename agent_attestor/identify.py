"""Identify a connected workload: SO_PEERCRED, then every attestor, safe against pid reuse."""

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
from agent_attestor.workload_attestor import WorkloadAttestor

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected, as the kernel recorded them."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def identify(sock: socket.socket, conn_id: str, attestors: Sequence[WorkloadAttestor]) -> Caller:
    """Attest the peer of `sock`. A process that is gone (or whose pid was reused) gets no
    selectors at all: an identity must never come from a process other than the caller."""
    pid, uid, gid = peer_credentials(sock)
    pidfd = proc.peer_pidfd(sock, pid) if pid > 0 else None
    try:

        def read() -> frozenset[Selector]:
            found: set[Selector] = set()
            for attestor in attestors:
                found.update(attestor.attest(pid, uid, gid))
            return frozenset(found)

        try:
            selectors = proc.read_stable(pid, pidfd, read)
        except ProcessGoneError as exc:
            log.info("caller has no identity", extra={"pid": pid, "reason": str(exc)})
            selectors = frozenset()
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return Caller(conn_id=conn_id, pid=pid, uid=uid, gid=gid, selectors=selectors)
