"""Who is calling: the Caller record the relay writes and the Workload API reads.

grpcio does not give handlers the peer's kernel credentials. The relay accepts each workload
connection itself and forwards it to the internal gRPC server from a socket bound to a fresh
Linux abstract-namespace name; grpcio reports that name as `context.peer()`
(`unix-abstract:<name>`). An abstract name is no file: nobody can unlink it, and nobody can bind
it while the relay's socket holds it, so for as long as a registry entry exists its name belongs
to the one connection the relay accepted (the relay removes the entry before it lets the name go).
Any user may bind *other* abstract names, but only the agent's user can reach the internal
socket (it sits in a 0700 directory), and a name the relay did not register maps to nobody.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from agent_attestor.model import Selector


@dataclass(frozen=True, slots=True)
class Caller:
    """A connected workload: kernel credentials at connect time and the selectors derived."""

    conn_id: str
    pid: int
    uid: int
    gid: int
    selectors: frozenset[Selector]


ABSTRACT_PEER = "unix-abstract:"


def abstract_peer(name: str) -> str:
    """The peer string grpcio reports for a client bound to abstract name `name`."""
    return ABSTRACT_PEER + name


class CallerRegistry:
    """Peer string -> Caller. Thread-safe: read from grpc handlers, written by the relay."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callers: dict[str, Caller] = {}

    def add(self, peer: str, caller: Caller) -> None:
        if not peer.startswith(ABSTRACT_PEER):
            # A path-bound name is a file its owner can unlink and bind again: never a key.
            raise ValueError(f"peer {peer!r} is not an abstract socket name")
        with self._lock:
            if peer in self._callers:
                raise ValueError(f"peer {peer!r} is already registered")
            self._callers[peer] = caller

    def remove(self, peer: str) -> None:
        with self._lock:
            self._callers.pop(peer, None)

    def lookup(self, peer: str) -> Caller | None:
        with self._lock:
            return self._callers.get(peer)

    def __len__(self) -> int:
        with self._lock:
            return len(self._callers)
