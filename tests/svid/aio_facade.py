"""The asyncio Workload API client and sources behind the sync interface, so one test body holds
both to the same semantics: each call runs on an event loop in a thread of its own.

``flavor`` is "sync" (the thread-driven classes, as they are) or "asyncio" (these facades).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from svid.workloadapi import (
    AsyncWatch,
    AsyncWorkloadApiClient,
    AsyncWorkloadApiSource,
    AsyncX509Source,
    WorkloadApiClient,
    WorkloadApiSource,
    X509Source,
)

T = TypeVar("T")
FLAVORS = ("sync", "asyncio")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class SyncWatch:
    def __init__(self, loop: LoopThread, watch: AsyncWatch[Any]) -> None:
        self._loop = loop
        self._watch = watch
        self._iter = watch.__aiter__()

    def __iter__(self) -> Iterator[Any]:
        async def step() -> tuple[bool, Any]:
            try:
                return True, await self._iter.__anext__()
            except StopAsyncIteration:
                return False, None

        while True:
            more, value = self._loop.run(step())
            if not more:
                return
            yield value

    def cancel(self) -> None:
        self._loop.loop.call_soon_threadsafe(self._watch.cancel)


class SyncClient:
    """AsyncWorkloadApiClient with WorkloadApiClient's interface."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = LoopThread()

        async def make() -> AsyncWorkloadApiClient:
            return AsyncWorkloadApiClient(*args, **kwargs)

        self.aio = self._loop.run(make())

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.aio, name)
        if name.startswith("watch"):

            async def open_watch(*a: Any, **k: Any) -> AsyncWatch[Any]:
                return attr(*a, **k)  # a grpc.aio call belongs to the loop it starts on

            return lambda *a, **k: SyncWatch(self._loop, self._loop.run(open_watch(*a, **k)))
        if name.startswith(("fetch", "validate")):
            return lambda *a, **k: self._loop.run(attr(*a, **k))
        return attr

    def close(self) -> None:
        self._loop.run(self.aio.close())
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncSource:
    """An asyncio source with the thread-driven source's interface."""

    def __init__(self, cls: type[AsyncWorkloadApiSource], *args: Any, **kwargs: Any) -> None:
        self._loop = LoopThread()

        async def make() -> AsyncWorkloadApiSource:
            return cls(*args, **kwargs)

        self.aio = self._loop.run(make())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.aio, name)

    def start(self) -> SyncSource:
        self._loop.run(self.aio.start())
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._loop.run(self.aio.wait_ready(timeout))

    def require_ready(self, timeout: float | None = None) -> None:
        self._loop.run(self.aio.require_ready(timeout))

    def stop(self) -> None:
        self._loop.run(self.aio.stop())
        self._loop.close()

    def stopped(self) -> bool:
        return not self.aio._tasks

    def __enter__(self) -> SyncSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def new_client(flavor: str, *args: Any, **kwargs: Any) -> Any:
    if flavor == "sync":
        return WorkloadApiClient(*args, **kwargs)
    return SyncClient(*args, **kwargs)


def new_source(flavor: str, *args: Any, x509: bool = False, **kwargs: Any) -> Any:
    """A WorkloadApiSource (or X509Source with ``x509``) of ``flavor``."""
    if flavor == "sync":
        return (X509Source if x509 else WorkloadApiSource)(*args, **kwargs)
    return SyncSource(AsyncX509Source if x509 else AsyncWorkloadApiSource, *args, **kwargs)


def stopped(source: Any) -> bool:
    """Whether every loop of the source has ended."""
    if isinstance(source, SyncSource):
        return source.stopped()
    return all(not t.is_alive() for t in source._threads)
