"""Threads for caller identification, shared fairly between uids.

Identification reads /proc and may hash a large executable; a user that opens many connections
from big binaries must not occupy every thread while other users' callers wait. Each uid gets at
most `per_uid` jobs in the pool at once; the rest of its jobs wait on the event loop, not in the
pool's queue, so another uid's job finds a free thread. A uid's slot is given back only when its
job has really finished in its thread (not when the waiting coroutine was cancelled), so a
timed-out caller cannot let its uid start more work than its share.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class _Share:
    __slots__ = ("running", "semaphore", "users")

    def __init__(self, size: int) -> None:
        self.semaphore = asyncio.Semaphore(size)
        self.running = 0  # jobs submitted and not finished
        self.users = 0  # waiters plus running jobs; the share is dropped at zero


class IdentifyPool:
    """A thread pool of its own (not asyncio's default executor) with a share per uid."""

    def __init__(self, threads: int, per_uid: int) -> None:
        if threads < 1 or per_uid < 1:
            raise ValueError("threads and per_uid must be positive")
        self.per_uid = per_uid
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="identify"
        )
        self._shares: dict[int, _Share] = {}

    def busy(self, uid: int) -> int:
        """Jobs of `uid` in the pool now (for tests and metrics)."""
        share = self._shares.get(uid)
        return 0 if share is None else share.running

    async def run(self, uid: int, fn: Callable[[], T]) -> T:
        share = self._shares.get(uid)
        if share is None:
            share = self._shares[uid] = _Share(self.per_uid)
        share.users += 1
        try:
            await share.semaphore.acquire()
            loop = asyncio.get_running_loop()
            try:
                job = self._executor.submit(fn)
            except BaseException:
                share.semaphore.release()
                raise
            share.running += 1
            share.users += 1  # held by the job until it finishes

            def finished(_: object) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to free
                    loop.call_soon_threadsafe(self._finished, uid, share)

            job.add_done_callback(finished)
            return await asyncio.wrap_future(job)
        finally:
            self._drop(uid, share)

    def _finished(self, uid: int, share: _Share) -> None:
        share.running -= 1
        share.semaphore.release()
        self._drop(uid, share)

    def _drop(self, uid: int, share: _Share) -> None:
        share.users -= 1
        if share.users == 0 and self._shares.get(uid) is share:
            del self._shares[uid]

    def shutdown(self) -> None:
        """Start no more jobs; those not yet running are dropped. Does not wait."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def join(self) -> None:
        """Block until the jobs already running have finished (after shutdown)."""
        self._executor.shutdown(wait=True)
