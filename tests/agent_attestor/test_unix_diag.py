"""The peer-inode lookup and the close-on-exec check that item 2 of issue 11 rests on."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from agent_attestor import proc
from agent_attestor.unix_diag import NLMSG_ERROR, UnixDiagError, parse_peer, peer_inode


def test_the_peer_inode_is_the_other_ends_inode() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_inode(a) == os.fstat(b.fileno()).st_ino
        assert peer_inode(b) == os.fstat(a.fileno()).st_ino


def test_a_kernel_error_reply_names_the_socket_and_the_error() -> None:
    reply = struct.pack("=IHHIIi", 20, NLMSG_ERROR, 0, 1, 0, -2)
    with pytest.raises(UnixDiagError, match="socket 42: No such file"):
        parse_peer(reply, 42)


def test_close_on_exec_is_seen_only_when_set() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        ino = os.fstat(b.fileno()).st_ino
        assert proc.holds_close_on_exec(os.getpid(), ino)  # Python's default (PEP 446)
        b.set_inheritable(True)
        assert not proc.holds_close_on_exec(os.getpid(), ino)
        dup = os.dup(b.fileno())  # a close-on-exec copy the current image made itself
        try:
            assert proc.holds_close_on_exec(os.getpid(), ino)
        finally:
            os.close(dup)
    assert not proc.holds_close_on_exec(os.getpid(), ino)  # no longer held at all
