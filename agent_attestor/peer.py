"""Who is calling: the Caller record the relay writes and the Workload API reads.

grpcio does not give handlers the peer's kernel credentials. The relay accepts each workload
connection itself and forwards it to the internal gRPC server from a socket bound to a fresh path
inside the agent's private directory; grpcio reports that path as `context.peer()`. Only the relay
writes this registry, and only the agent's user can bind in (or connect to) the private directory,
so a peer string maps back to exactly one accepted connection.
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


def peer_path(peer: str) -> str | None:
    """The socket path in a grpc peer string (`unix:/p`, `unix:///p`), or None for other forms."""
    if not peer.startswith("unix:"):
        return None
    path = peer[len("unix:") :]
    if path.startswith("//"):
        path = path[2:]
    return path if path.startswith("/") else None


class CallerRegistry:
    """Binding path -> Caller. Thread-safe: read from grpc handlers, written by the relay."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callers: dict[str, Caller] = {}

    def add(self, path: str, caller: Caller) -> None:
        with self._lock:
            if path in self._callers:
                raise ValueError(f"binding path {path!r} is already registered")
            self._callers[path] = caller

    def remove(self, path: str) -> None:
        with self._lock:
            self._callers.pop(path, None)

    def lookup(self, peer: str) -> Caller | None:
        path = peer_path(peer)
        if path is None:
            return None
        with self._lock:
            return self._callers.get(path)

    def __len__(self) -> int:
        with self._lock:
            return len(self._callers)
