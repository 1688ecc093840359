"""The asyncio sources: the same state and semantics as WorkloadApiSource / X509Source, fed by
tasks on the running event loop over grpc.aio instead of threads.

    async with svid.AsyncX509Source() as source:
        ctx = svid.tls.server_context(source, authorize=...)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any

from svid._backoff import Backoff
from svid._clock import Clock, SystemClock
from svid._revocation import RevocationSet
from svid._source_state import SourceState
from svid._source_views import SourceViews
from svid._workload_calls import StreamCall
from svid._workload_client_aio import AsyncWorkloadApiClient
from svid._workload_errors import WorkloadApiUnavailableError
from svid._workload_source import streams_for


class AsyncWorkloadApiSource(SourceViews):
    """Bundles and revocations from the Workload API, kept current by tasks on the event loop.

    Reads (``x509_bundle_for``, verifiers, ``svid``) never await and may come from any thread.
    ``on_revoked`` callbacks may be coroutine functions: they run as tasks on the loop.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        client: AsyncWorkloadApiClient | None = None,
        revocations: RevocationSet | None = None,
        watch_revocations: bool = True,
        x509_svids: bool = False,
        jwt_bundles: bool = True,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._socket = socket
        self._client = client
        self._owns_client = client is None
        self._calls = streams_for(
            x509_svids=x509_svids, jwt_bundles=jwt_bundles, watch_revocations=watch_revocations
        )
        self._state = SourceState(
            (c.name for c in self._calls),
            revocations if revocations is not None else RevocationSet(),
            clock or SystemClock(),
            schedule=self._spawn,
        )
        self._backoff = backoff or Backoff()
        self._rand = random.Random()  # noqa: S311 - jitter, not a secret
        self._tasks: list[asyncio.Task[None]] = []
        self._callbacks: set[asyncio.Task[Any]] = set()
        self._changed: asyncio.Condition | None = None
        self._stopping = False

    # --- lifecycle ---

    async def start(self) -> AsyncWorkloadApiSource:
        if self._tasks:
            return self
        if self._client is None:
            self._client = AsyncWorkloadApiClient(self._socket)  # on the running loop
        self._changed = asyncio.Condition()
        for call in self._calls:
            self._tasks.append(asyncio.create_task(self._run(call), name=f"svid-{call.name}"))
        return self

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every stream but the revocation stream has delivered; False on timeout."""
        if self._changed is None:
            raise RuntimeError("start() the source first")
        changed = self._changed
        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(lambda: self._state.ready), timeout)
            except TimeoutError:
                return False
        return True

    async def require_ready(self, timeout: float | None = None) -> None:
        """``wait_ready``, raising WorkloadApiUnavailableError (with what went wrong) on timeout."""
        if not await self.wait_ready(timeout):
            address = self._client.address if self._client is not None else self._socket
            raise WorkloadApiUnavailableError(
                f"Workload API at {address}: {self._state.not_ready_reason()}", "UNAVAILABLE"
            )

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._owns_client and self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> AsyncWorkloadApiSource:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- stream loops ---

    def _spawn(self, awaitable: Any) -> None:
        task = asyncio.ensure_future(awaitable)
        self._callbacks.add(task)  # a reference, or the loop may drop the task half way
        task.add_done_callback(self._callbacks.discard)

    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _run(self, call: StreamCall[Any]) -> None:
        assert self._client is not None
        attempt = 0  # failed connections since the last message
        state = self._state
        while not self._stopping:
            error: Exception | None = None
            try:
                async with self._client.watch(call) as watch:
                    async for update in watch:
                        state.delivered(call.name, update)
                        attempt = 0
                        await self._notify()
            except Exception as exc:  # any: a dead loop would leave its data frozen yet live
                error = exc
            if self._stopping:
                return
            if state.failed(call.name, error):
                return
            await asyncio.sleep(self._backoff.delay(attempt, self._rand))
            attempt += 1


class AsyncX509Source(AsyncWorkloadApiSource):
    """This workload's own X.509-SVIDs, the X.509 bundles and the revocations (see X509Source).

    ``async with`` starts it and waits up to ``ready_timeout`` seconds for the first SVID and
    bundles, raising WorkloadApiUnavailableError without them.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        client: AsyncWorkloadApiClient | None = None,
        revocations: RevocationSet | None = None,
        watch_revocations: bool = True,
        jwt_bundles: bool = False,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            socket,
            client=client,
            revocations=revocations,
            watch_revocations=watch_revocations,
            x509_svids=True,
            jwt_bundles=jwt_bundles,
            backoff=backoff,
            clock=clock,
        )
        self.ready_timeout = ready_timeout

    async def __aenter__(self) -> AsyncX509Source:
        await self.start()
        try:
            await self.require_ready(self.ready_timeout)
        except BaseException:
            await self.stop()
            raise
        return self
