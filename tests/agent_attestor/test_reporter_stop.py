"""A stop cancels the reporter's loop: a batch it had out then is neither lost nor sent twice."""

from __future__ import annotations

import asyncio

from agent_attestor.tasks.reporter import ValidationReporter
from svid._clock import FakeClock
from svid._proto import task_pb2


def test_a_batch_out_when_its_loop_is_cancelled_is_reported_once_by_the_next_flush() -> None:
    async def scenario() -> tuple[list[int], int, int]:
        received: list[int] = []
        answer = asyncio.Event()

        async def send(request: task_pb2.ReportValidationsRequest) -> object:
            await answer.wait()  # the server's answer is slow to come (a loaded machine)
            received.append(len(request.validations))
            return None

        reporter = ValidationReporter(send, FakeClock())
        for audience in ("db1", "db2", "db3"):
            reporter.report(subject="spiffe://example.org/w", audience=[audience], ok=True)
        loop = asyncio.create_task(reporter.flush())
        await asyncio.sleep(0.01)  # the batch is out
        loop.cancel()  # the agent stops
        await asyncio.gather(loop, return_exceptions=True)
        answer.set()
        await reporter.flush()  # the stop's own flush
        return received, reporter.sent, reporter.pending

    received, sent, pending = asyncio.run(scenario())
    assert received == [3]
    assert (sent, pending) == (3, 0)
