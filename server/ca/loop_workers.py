"""Workload JWT batches signed in worker processes that the event loop drives itself.

Why not a thread per batch (SigningWorkers): under BatchNewJWTSVID load the server's main
process spent a third of its CPU in the kernel switching between the threads that handed
batches to workers and waited for them (perf: finish_task_switch and futex wake-ups), while each
worker sat idle 60% of the time, its last reply waiting for a thread and the GIL before the next
batch was sent. Here the loop writes a batch to a worker's socket and awaits the reply as it
awaits any socket, and a worker holds up to `depth` batches: it signs the next while the loop
reads the last. Measured on the bench: 28k to 34k JWT-SVIDs per second on two cores.

The worker program is server.ca.workers's: the same messages, framed as
multiprocessing.connection frames them (a 4-byte big-endian length, or -1 then an 8-byte
length, then a pickle). A worker that is still starting, dies or wedges costs speed, never an
answer: `mint` returns None and the caller signs that batch another way; a new worker takes a
lost one's place, at most once per RESTART_BACKOFF seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import socket
import struct
import subprocess
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

from server.ca.signer import IssuedJwt, JwtSigner
from server.ca.workers import (
    _JWT,
    MIN_BATCH,
    REPLY_TIMEOUT,
    Drafting,
    KeysHeld,
    MintRequest,
    spawn,
)
from svid._clock import Clock
from svid._errors import SvidError

_log = logging.getLogger("svid.server.ca")
# Batches a worker holds at once. The JWT bench, 3 callers per agent: 2 -> 33.4k/s,
# 3 -> 34.2k/s, 4 -> 34.1k/s.
DEPTH = 3
RESTART_BACKOFF = 1.0  # seconds: a worker that cannot start must not cost a process per batch
_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")


class _LostError(Exception):
    """The worker holding a batch is gone; the batch is signed elsewhere."""


def frame(message: Any) -> bytes:
    body = pickle.dumps(message)
    if len(body) > 0x7FFFFFFF:
        return _SHORT.pack(-1) + _LONG.pack(len(body)) + body
    return _SHORT.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _SHORT.unpack(await reader.readexactly(_SHORT.size))
    if size == -1:
        (size,) = _LONG.unpack(await reader.readexactly(_LONG.size))
    elif size < 0:
        raise EOFError(f"a signing worker sent a frame of length {size}")
    # Our own child, over a private socketpair: what Connection.recv trusts too.
    return pickle.loads(await reader.readexactly(size))  # noqa: S301


class _LoopWorker:
    def __init__(
        self, proc: subprocess.Popen[bytes], reader: asyncio.StreamReader, writer: Any
    ) -> None:
        self.proc = proc
        self.reader = reader
        self.writer: asyncio.StreamWriter = writer
        self.ready = False
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.keys = KeysHeld()
        self.task: asyncio.Task[None] | None = None

    def send(
        self,
        signer: JwtSigner,
        now: int,
        requests: Sequence[MintRequest],
        drafting: Drafting,
    ) -> None:
        name = signer.worker_name
        if self.keys.missing(name):
            self.writer.write(frame(("key", name, _JWT, signer.worker_copy())))
        self.writer.write(frame((_JWT, name, now, list(requests), drafting)))

    def close(self, grace: float) -> None:
        """EOF to the worker, which returns; killed if it has not within `grace` s."""
        # Now, not when the loop next runs the transport's close (this blocks the loop).
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.writer.close()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(1)


class LoopSigningWorkers:
    """Up to `size` worker processes for workload JWT batches, driven from one event loop (every
    method but `pids` on that loop's thread). Workers start on first use."""

    def __init__(
        self,
        size: int,
        clock: Clock,
        *,
        depth: int = DEPTH,
        reply_timeout: float = REPLY_TIMEOUT,
    ) -> None:
        if size < 0 or depth < 1:
            raise ValueError("size must not be negative and depth must be at least 1")
        self._size = size
        self._clock = clock
        self._depth = depth
        self._reply_timeout = reply_timeout
        self._workers: list[_LoopWorker] = []
        self._starting = 0
        self._turn = 0
        self._closed = False
        self._next_start = float("-inf")
        self._changed: asyncio.Event | None = None  # a worker ready, lost, or with room again

    async def mint(
        self,
        signer: JwtSigner,
        requests: Sequence[MintRequest],
        agent_id: str,
        owners: Sequence[tuple[str, str]],
    ) -> tuple[list[IssuedJwt | SvidError], list[str | None]] | None:
        """Workload JWT-SVIDs at the clock's now: signer.mint, or its error, per request, and
        the audit body of each one's event (for `agent_id` and the request's SPIFFE ID and
        joined audience in `owners`) drafted by the worker, None where the log must check it
        itself; None when no worker can take the batch (none, too small, starting, lost
        meanwhile)."""
        reply = await self._batch(signer, requests, (agent_id, list(owners)))
        if reply is None:
            return None
        outcomes: list[IssuedJwt | SvidError] = []
        bodies: list[str | None] = []
        for item in reply:
            if type(item) is tuple:
                token, jti, issued_at, expires_at, body = item
                outcomes.append(IssuedJwt(token, jti, issued_at, expires_at))
                bodies.append(body)
            else:
                outcomes.append(item)
                bodies.append(None)
        return outcomes, bodies

    async def _batch(
        self,
        signer: JwtSigner,
        requests: Sequence[MintRequest],
        drafting: Drafting,
    ) -> list[Any] | None:
        if self._size == 0 or self._closed or len(requests) < MIN_BATCH:
            return None
        await self._start_missing()
        await self._until(lambda: self._free() is not None or not self._ready())
        worker = self._free()
        if worker is None:
            return None  # none ready: still starting, or all lost
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        worker.pending.append(future)
        try:
            worker.send(signer, int(self._clock.now()), requests, drafting)
        except (OSError, RuntimeError) as exc:  # its socket is gone: so is the worker
            self._lose(worker, type(exc).__name__)
            return None
        try:
            async with asyncio.timeout(self._reply_timeout):
                reply = await future
        except TimeoutError:
            self._lose(worker, f"no reply in {self._reply_timeout:g} s")
            return None
        except _LostError:
            return None
        if len(reply) != len(requests):
            self._lose(worker, "it answered another batch")
            return None
        return cast(list[Any], reply)

    async def warm_up(self, timeout: float) -> bool:
        """Start every worker now and wait up to `timeout` s for all to be ready."""
        await self._start_missing(force=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._until(lambda: self._closed or self._ready() == self._size)
        return self._ready() == self._size

    def pids(self) -> list[int]:
        """The live worker processes (for tests and operators)."""
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        self._closed = True
        self._notify()
        workers, self._workers = self._workers, []
        for worker in workers:
            self._fail_pending(worker)
            if worker.task is not None:
                worker.task.cancel()
            worker.close(grace=5.0)

    # -- plumbing -------------------------------------------------------------------------------

    async def _until(self, done: Callable[[], bool]) -> None:
        if self._changed is None:  # made on the loop that uses it
            self._changed = asyncio.Event()
        while not done():
            # One set() wakes every waiter; each looks again, and those still held wait on.
            self._changed.clear()
            await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _ready(self) -> int:
        return sum(1 for w in self._workers if w.ready)

    def _free(self) -> _LoopWorker | None:
        """The ready worker holding the fewest batches, if it has room for one more; ties go
        round the pool (always the first one loaded it a third more than the next)."""
        best: _LoopWorker | None = None
        count = len(self._workers)
        for i in range(count):
            worker = self._workers[(self._turn + i) % count]
            if worker.ready and (best is None or len(worker.pending) < len(best.pending)):
                best = worker
        if best is None or len(best.pending) >= self._depth:
            return None
        self._turn += 1
        return best

    async def _start_missing(self, *, force: bool = False) -> None:
        if self._closed or len(self._workers) + self._starting >= self._size:
            return
        if not force and self._clock.monotonic() < self._next_start:
            return
        self._starting += 1
        try:
            proc, sock = spawn()
            try:
                reader, writer = await asyncio.open_unix_connection(sock=sock)
            except BaseException:
                sock.close()
                proc.kill()
                raise
        except OSError as exc:  # no fd or process left, or no interpreter: sign elsewhere
            self._next_start = self._clock.monotonic() + RESTART_BACKOFF
            _log.warning("cannot start a signing worker (%s); retrying later", exc)
            return
        finally:
            self._starting -= 1
        worker = _LoopWorker(proc, reader, writer)
        if self._closed:
            worker.close(grace=0)
            return
        self._workers.append(worker)
        worker.task = asyncio.get_running_loop().create_task(self._read(worker))
        await self._start_missing(force=force)

    async def _read(self, worker: _LoopWorker) -> None:
        """A worker's replies, in the order its batches were sent."""
        try:
            if await read_frame(worker.reader) != "ready":
                raise EOFError("it spoke before it was ready")
            worker.ready = True
            self._notify()
            while True:
                reply = await read_frame(worker.reader)
                if not worker.pending:
                    raise EOFError("it answered a batch nobody sent")
                future = worker.pending.popleft()
                if not future.done():  # a timed-out caller's is cancelled already
                    future.set_result(reply)
                self._notify()
        except asyncio.CancelledError:
            raise
        except (EOFError, OSError, asyncio.IncompleteReadError, pickle.UnpicklingError) as exc:
            if worker in self._workers:
                self._lose(worker, type(exc).__name__)
            self._notify()

    def _lose(self, worker: _LoopWorker, why: str) -> None:
        if worker not in self._workers:
            return
        _log.warning("signing worker failed (%s); starting another", why)
        self._workers.remove(worker)
        self._next_start = self._clock.monotonic() + RESTART_BACKOFF
        self._fail_pending(worker)
        self._notify()
        if worker.task is not None and worker.task is not asyncio.current_task():
            worker.task.cancel()
        worker.close(grace=0)  # no grace: a wedged worker would hold up the loop

    @staticmethod
    def _fail_pending(worker: _LoopWorker) -> None:
        while worker.pending:
            future = worker.pending.popleft()
            if not future.done():
                future.set_exception(_LostError())
