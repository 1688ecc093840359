"""ValidateJWTSVID answers, reported to the server's audit log in batches.

Why forward rather than keep a local log: the server's hash-chained log is the one an operator
verifies and exports (`svid-server audit export --task ID` must show who validated a task's
tokens), and one place is what makes the chain meaningful. Validation is a hot path, so the
Workload API only enqueues; a background task sends what gathered every FLUSH_INTERVAL. Best
effort: if the server is unreachable the batch is kept (bounded) and retried; an agent crash
loses at most one interval of validation events, never a credential decision.

A successful validation is reported once per token, caller and audience while the token can be
validated (tasks/reported.py): repeats are only counted (`repeated`), so a workload checking the
same token on every request does not write an audit row a request.

Refusals wait in a queue of their own. Any local process may have made-up tokens refused as fast
as it can send them, where an acceptance needs a token the server signed: one queue for both let
a flood of refusals, while the server was away, push out the acceptances waiting to be sent. So a
refusal takes only room no acceptance needs, and an acceptance that needs room takes it from the
oldest refusal first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable

import grpc

from agent_attestor.tasks.reported import ReportedValidations, report_key
from svid._clock import Clock
from svid._log_throttle import KeyedThrottles
from svid._proto import task_pb2

log = logging.getLogger(__name__)
FLUSH_INTERVAL = 0.5
# Seconds between "cannot report" lines of one kind of failure: a batch waiting for a server
# that is away is tried again every FLUSH_INTERVAL, and each try wrote a line (7,200 an hour
# after any local process had one token validated).
FAILURE_LOG_INTERVAL = 60.0
MAX_QUEUED = 10_000
MAX_BATCH = 1000
# Reports of refused tokens carry up to 2,048 characters of several claims each: 1,000 of them
# are over the server's default 4 MiB message limit, a batch it could never take.
MAX_BATCH_BYTES = 1024 * 1024
_FRAMING = 4  # a report's field tag and length inside the request, at most

Send = Callable[[task_pb2.ReportValidationsRequest], Awaitable[object]]


class ValidationReporter:
    def __init__(self, send: Send, clock: Clock) -> None:
        self._send = send
        self._clock = clock
        # Together at most MAX_QUEUED reports, each queue oldest first.
        self._accepted: deque[task_pb2.Validation] = deque()
        self._refused: deque[task_pb2.Validation] = deque()
        self._reported = ReportedValidations(clock)
        self._failures = KeyedThrottles(FAILURE_LOG_INTERVAL, clock)
        self.dropped = 0
        self.sent = 0
        self.repeated = 0
        # A batch out when the loop sending it was cancelled (the agent stopping): its send
        # goes on, and the next flush learns how it ended before sending anything else.
        self._in_flight: tuple[asyncio.Future[object], list[task_pb2.Validation]] | None = None

    def report(
        self,
        *,
        subject: str,
        audience: list[str],
        ok: bool,
        reason: str = "",
        jti: str = "",
        txn: str = "",
        caller_id: str = "",
        until: float = 0.0,
        claims_verified: bool = False,
    ) -> None:
        """`until`: for a successful validation, when its token can no longer be validated;
        a report like one made before then is counted, not sent. 0: always sent.
        `claims_verified`: the token's signature held (see task_pb2.Validation)."""
        if ok and until:
            key = report_key(subject, audience, jti, txn, caller_id)
            if not self._reported.first(key, until):
                self.repeated += 1
                return
        if self.pending >= MAX_QUEUED:
            self.dropped += 1
            if not ok:
                return  # the queued ones are as good a sample of a flood as this one
            (self._refused or self._accepted).popleft()
        (self._accepted if ok else self._refused).append(
            task_pb2.Validation(
                subject=subject,
                audience=audience,
                ok=ok,
                reason=reason,
                jti=jti,
                txn=txn,
                at=int(self._clock.now()),
                caller_id=caller_id,
                claims_verified=claims_verified,
            )
        )

    @property
    def pending(self) -> int:
        """How many reports wait to be sent."""
        return len(self._accepted) + len(self._refused)

    def queued(self) -> list[task_pb2.Validation]:
        """What waits to be sent, in the order it will be: acceptances, then refusals."""
        return [*self._accepted, *self._refused]

    async def flush(self) -> None:
        if self._in_flight is not None:
            send, batch = self._in_flight
            self._in_flight = None
            if not await self._landed(send, batch):
                return
        while self.pending:
            batch = self._next_batch()
            send = asyncio.ensure_future(
                self._send(task_pb2.ReportValidationsRequest(validations=batch))
            )
            # Shielded: cancelled meanwhile (the agent stopping), the batch is neither lost
            # (taken from the queues, its send cut) nor sent twice (put back after it landed).
            self._in_flight = (send, batch)
            await asyncio.wait({send})
            self._in_flight = None
            if not await self._landed(send, batch):
                return

    async def _landed(self, send: asyncio.Future[object], batch: list[task_pb2.Validation]) -> bool:
        """How `batch`'s send ended: counted sent, dropped, or put back for the next round
        (False: stop this round)."""
        try:
            await send
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                # The server will never take this batch: retrying would block the queue.
                self.dropped += len(batch)
                log.warning("server refused a validation report; dropped it")
                return True
            self._put_back(batch)
            self._failed(exc.code(), exc.code().name)
            return False
        except Exception as exc:
            self._put_back(batch)
            self._failed(type(exc), str(exc))
            return False
        self.sent += len(batch)
        return True

    def _failed(self, kind: object, error: str) -> None:
        times = self._failures.due(kind)
        if times:
            log.warning(
                "cannot report validations to the server",
                extra={"error": error, "times": times, "pending": self.pending},
            )

    def _put_back(self, batch: list[task_pb2.Validation]) -> None:
        """Return a batch that was not sent to the front of its queues (oldest first), for the
        next round. Reports made while it was out may have filled them: the newest ones it then
        pushes out, refusals first, are counted as dropped, as a report into a full queue is."""
        self._accepted.extendleft(reversed([v for v in batch if v.ok]))
        self._refused.extendleft(reversed([v for v in batch if not v.ok]))
        while self.pending > MAX_QUEUED:
            (self._refused or self._accepted).pop()
            self.dropped += 1

    def _next_batch(self) -> list[task_pb2.Validation]:
        """The oldest reports, acceptances first: at most MAX_BATCH, and MAX_BATCH_BYTES
        together (one at least)."""
        batch: list[task_pb2.Validation] = []
        size = 0
        for queue in (self._accepted, self._refused):
            while queue and len(batch) < MAX_BATCH:
                item = queue[0].ByteSize() + _FRAMING
                if batch and size + item > MAX_BATCH_BYTES:
                    return batch
                batch.append(queue.popleft())
                size += item
        return batch

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            with contextlib.suppress(Exception):
                await self.flush()
