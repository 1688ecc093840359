"""The inode of the other end of a connected Unix socket, from the kernel's sock_diag netlink.

Nothing in /proc or getsockopt names a Unix socket's peer; `ss -x` asks NETLINK_SOCK_DIAG, and
so do we: one SOCK_DIAG_BY_FAMILY request for our socket's inode with UDIAG_SHOW_PEER, whose
UNIX_DIAG_PEER attribute is the peer's inode (the `socket:[N]` a process's fd links to).
"""

from __future__ import annotations

import os
import socket
import struct

from agent_attestor.errors import AgentError

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 0x2
UDIAG_SHOW_PEER = 0x4
UNIX_DIAG_PEER = 2
_NO_COOKIE = 0xFFFFFFFF  # INET_DIAG_NOCOOKIE: look the socket up by inode alone

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie[2]
_MSG = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie[2]
_RTA = struct.Struct("=HH")  # len, type
_ERRNO = struct.Struct("=i")


class UnixDiagError(AgentError):
    """The kernel could not say who the peer of a Unix socket is."""


def _request(ino: int, seq: int) -> bytes:
    body = _REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, UDIAG_SHOW_PEER, _NO_COOKIE, _NO_COOKIE)
    return (
        _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0)
        + body
    )


def parse_peer(reply: bytes, ino: int) -> int:
    """The UNIX_DIAG_PEER inode in a sock_diag reply about socket `ino`."""
    if len(reply) < _NLMSGHDR.size:
        raise UnixDiagError(f"sock_diag reply for socket {ino} is truncated")
    length, kind, _, _, _ = _NLMSGHDR.unpack_from(reply)
    if kind == NLMSG_ERROR:
        (err,) = _ERRNO.unpack_from(reply, _NLMSGHDR.size)
        raise UnixDiagError(f"sock_diag about socket {ino}: {os.strerror(-err)}")
    if kind != SOCK_DIAG_BY_FAMILY or length > len(reply):
        raise UnixDiagError(f"sock_diag reply for socket {ino} has type {kind}")
    _, _, _, _, got, _, _ = _MSG.unpack_from(reply, _NLMSGHDR.size)
    if got != ino:
        raise UnixDiagError(f"sock_diag answered about socket {got}, not {ino}")
    offset = _NLMSGHDR.size + _MSG.size
    while offset + _RTA.size <= length:
        rta_len, rta_type = _RTA.unpack_from(reply, offset)
        if rta_len < _RTA.size:
            break
        if rta_type == UNIX_DIAG_PEER and rta_len >= _RTA.size + 4:
            (peer,) = struct.unpack_from("=I", reply, offset + _RTA.size)
            return int(peer)
        offset += (rta_len + 3) & ~3
    raise UnixDiagError(f"socket {ino} has no peer")


def peer_inode(sock: socket.socket) -> int:
    """The inode of the socket at the other end of the connected Unix socket `sock`."""
    ino = os.fstat(sock.fileno()).st_ino
    try:
        with socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
        ) as nl:
            nl.sendto(_request(ino, 1), (0, 0))
            reply = nl.recv(8192)
    except OSError as exc:
        raise UnixDiagError(f"sock_diag is not available: {exc.strerror}") from exc
    return parse_peer(reply, ino)
