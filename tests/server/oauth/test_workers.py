"""The token endpoint's worker threads: results and errors come back on the loop, threads
start only as needed and never beyond the limit, blocked jobs run side by side."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.oauth.workers import Workers


def test_results_and_errors_come_back_to_the_caller() -> None:
    workers = Workers(4, "t")

    def fail(_: object) -> None:
        raise ValueError("boom")

    async def main() -> None:
        assert await workers.run(lambda x: x * 2, 21) == 42
        name = await workers.run(lambda _: threading.current_thread().name, None)
        assert name.startswith("t-")
        with pytest.raises(ValueError, match="boom"):
            await workers.run(fail, None)

    try:
        asyncio.run(main())
    finally:
        workers.close()


def test_blocked_jobs_run_side_by_side_up_to_the_limit() -> None:
    workers = Workers(3, "t")
    gate = threading.Barrier(3, timeout=5)  # passes only with three jobs blocked at once
    names: set[str] = set()

    def blocked(_: object) -> None:
        gate.wait()
        names.add(threading.current_thread().name)

    async def main() -> None:
        await asyncio.gather(*(workers.run(blocked, None) for _ in range(9)))

    try:
        asyncio.run(main())
        assert names == {"t-0", "t-1", "t-2"}
    finally:
        workers.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(workers.run(lambda x: x, 1))
