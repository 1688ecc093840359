"""gRPC calls set up where a Ctrl-C cannot land half-way through them."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class CallSetup:
    """Sets gRPC future and streaming calls up on a thread of its own.

    gRPC sets such a call up partly in Python, then starts the thread that completes it. A
    Ctrl-C is raised in the main thread, between any two Python steps: landing in that setup it
    can leave the call with no thread to complete it, so that its answer never comes and the
    channel's close() waits forever, holding the program open. Set up on this thread the call
    is whole whatever the main thread is doing, and the interrupt lands in the wait for it.
    """

    def __init__(self, name: str) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def start(self, setup: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        """``setup(*args, **kwargs)`` on the setup thread."""
        return self._thread.submit(setup, *args, **kwargs)

    def close(self) -> None:
        self._thread.shutdown(wait=False)
