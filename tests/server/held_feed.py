"""Two servers, A and B, on one PostgreSQL, B's change feed held on demand: a feed that is
behind, as when its notifications are lost and the next poll is a minute away."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

from server.ca.sealing import KeyEncryptionKey
from tests.server.fixtures import RunningServer, short_tmpdir, start_server


class FeedGate:
    """Holds B's change feed reads: a feed that is behind, as when its notifications are lost
    and the next poll is a minute away (feed_poll_interval 60 s)."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.reading = 0  # reads past the gate, not finished yet

    async def close(self) -> None:
        self.open.clear()
        while self.reading:  # a read that began before is let finish: nothing after it
            await asyncio.sleep(0.01)

    async def release(self) -> None:
        self.open.set()

    def wrap(
        self, catch_up: Callable[[], Coroutine[Any, Any, int]]
    ) -> Callable[[], Coroutine[Any, Any, int]]:
        async def held() -> int:
            await self.open.wait()
            self.reading += 1
            try:
                return await catch_up()
            finally:
                self.reading -= 1

        return held


async def _new_gate() -> FeedGate:
    return FeedGate()  # its Event made on B's loop


@dataclass
class Behind:
    """A and B on one PostgreSQL, B's change feed held between `hold` and `release`."""

    a: RunningServer
    b: RunningServer
    gate: FeedGate
    reads: list[str] = field(default_factory=list)  # agent IDs B read, when a test counts them

    def hold(self) -> None:
        self.b.call(self.gate.close())

    def release(self) -> None:
        self.b.call(self.gate.release())


@contextlib.contextmanager
def held_feed(postgres_dsn: str, x509pop_ca_pem: bytes | None = None) -> Iterator[Behind]:
    """A and B started on `postgres_dsn` with one key encryption key (and x509pop node CA, if
    given); B polls its feed only each minute, so a held gate keeps it behind. Both are
    stopped, the gate released first, on the way out."""
    root = short_tmpdir()
    KeyEncryptionKey.generate().write_new(root / "kek")
    shared: dict[str, Any] = {
        "datastore": postgres_dsn,
        "key_encryption_key_file": str(root / "kek"),
    }
    if x509pop_ca_pem is not None:
        (root / "node-ca.pem").write_bytes(x509pop_ca_pem)
        shared["x509pop_ca_bundle"] = str(root / "node-ca.pem")
    a = start_server(root, admin_socket=str(root / "a" / "admin.sock"), **shared)
    b = start_server(
        root, admin_socket=str(root / "b" / "admin.sock"), feed_poll_interval=60.0, **shared
    )
    follower = b.server.follower
    assert follower is not None
    gate: FeedGate = b.call(_new_gate())
    follower.catch_up = gate.wrap(follower.catch_up)  # type: ignore[method-assign]
    try:
        yield Behind(a, b, gate)
    finally:
        b.call(gate.release())
        b.stop()
        a.stop()
        shutil.rmtree(root, ignore_errors=True)
