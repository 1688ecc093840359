"""Sources fed by a running agent: background threads watch the Workload API streams (bundles,
the agent's revocation stream and, for an X509Source, this workload's own SVIDs), so verifiers
and TLS contexts stay current without ever waiting on the network.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from svid._backoff import Backoff
from svid._clock import Clock, SystemClock
from svid._revocation import RevocationSet
from svid._source_state import SourceState
from svid._source_views import SourceViews
from svid._workload_calls import JWT_BUNDLES, REVOCATIONS, X509_BUNDLES, X509_SVIDS, StreamCall
from svid._workload_client import Watch, WorkloadApiClient
from svid._workload_errors import WorkloadApiUnavailableError


def streams_for(
    *, x509_svids: bool, jwt_bundles: bool, watch_revocations: bool
) -> tuple[StreamCall[Any], ...]:
    calls: list[StreamCall[Any]] = [X509_SVIDS] if x509_svids else []
    calls.append(X509_BUNDLES)
    if jwt_bundles:
        calls.append(JWT_BUNDLES)
    if watch_revocations:
        calls.append(REVOCATIONS)
    return tuple(calls)


class WorkloadApiSource(SourceViews):
    """Bundles and revocations from the Workload API, kept current by background threads.

    ``x509_bundle_for`` / ``jwt_bundle_for`` never block; until the first message, and once the
    agent says this workload has no identity (PERMISSION_DENIED), they return None (so
    verification fails closed). Unchanged bundles keep their identity across messages,
    so verifier caches survive updates. CRLs are trusted only after their signature verifies
    against the X.509 bundle of the issuer's trust domain. With ``x509_svids=True`` it also
    keeps this workload's own SVIDs (``svid``, ``svids``): see X509Source.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        client: WorkloadApiClient | None = None,
        revocations: RevocationSet | None = None,
        watch_revocations: bool = True,
        x509_svids: bool = False,
        jwt_bundles: bool = True,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._owns_client = client is None
        self._client = client if client is not None else WorkloadApiClient(socket)
        self._calls = streams_for(
            x509_svids=x509_svids, jwt_bundles=jwt_bundles, watch_revocations=watch_revocations
        )
        self._state = SourceState(
            (c.name for c in self._calls),
            revocations if revocations is not None else RevocationSet(),
            clock or SystemClock(),
        )
        self._backoff = backoff or Backoff()
        self._rand = random.Random()  # noqa: S311 - jitter, not a secret
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._watches: dict[str, Watch[Any]] = {}
        self._threads: list[threading.Thread] = []

    # --- lifecycle ---

    def start(self) -> WorkloadApiSource:
        if self._threads:
            return self
        for call in self._calls:
            thread = threading.Thread(
                target=self._run, args=(call,), name=f"svid-{call.name}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until every stream but the revocation stream has delivered; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._state.ready, timeout)

    def require_ready(self, timeout: float | None = None) -> None:
        """``wait_ready``, raising WorkloadApiUnavailableError (with what went wrong) on timeout."""
        if not self.wait_ready(timeout):
            raise WorkloadApiUnavailableError(
                f"Workload API at {self._client.address}: {self._state.not_ready_reason()}",
                "UNAVAILABLE",
            )

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        with self._lock:
            watches = list(self._watches.values())
        for watch in watches:
            watch.cancel()
        for thread in self._threads:
            thread.join(timeout)
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> WorkloadApiSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- stream loops ---

    def _run(self, call: StreamCall[Any]) -> None:
        attempt = 0  # failed connections since the last message
        state = self._state
        while not self._stop.is_set():
            error: Exception | None = None
            try:
                watch = self._client.watch(call)
                with self._lock:
                    self._watches[call.name] = watch
                if self._stop.is_set():
                    watch.cancel()
                for update in watch:
                    state.delivered(call.name, update)
                    attempt = 0  # a message arrived: the connection is good again
                    with self._changed:
                        self._changed.notify_all()
                if self._stop.is_set():
                    return
            except Exception as exc:  # any: a dead loop would leave its data frozen yet live
                error = exc
            finally:
                with self._lock:
                    self._watches.pop(call.name, None)
            if state.failed(call.name, error):
                return
            self._stop.wait(self._backoff.delay(attempt, self._rand))
            attempt += 1


class X509Source(WorkloadApiSource):
    """This workload's own X.509-SVIDs, the X.509 bundles and the revocations, kept current.

    What mutual TLS needs (``svid.tls.server_context(source, ...)``): ``svid`` is always the
    newest default SVID, rotated by the agent before it expires.

        with svid.X509Source() as source:   # $SPIFFE_ENDPOINT_SOCKET; waits for the first SVID
            ...

    ``start()`` returns at once; ``with`` (and ``require_ready``) wait up to ``ready_timeout``
    seconds for the first SVID and bundles, and raise WorkloadApiUnavailableError without them.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        client: WorkloadApiClient | None = None,
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

    def __enter__(self) -> X509Source:
        self.start()
        try:
            self.require_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self
