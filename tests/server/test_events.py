"""The change notifier wakes every subscriber, from the loop or from another thread."""

from __future__ import annotations

import asyncio
import threading

from server.events import ChangeNotifier


def test_wakes_all_subscribers() -> None:
    async def main() -> list[int]:
        notifier = ChangeNotifier()
        waiters = [asyncio.create_task(notifier.wait_beyond(0)) for _ in range(3)]
        await asyncio.sleep(0)
        assert notifier.subscriber_count == 3
        notifier.notify()
        return await asyncio.wait_for(asyncio.gather(*waiters), 5)

    assert asyncio.run(main()) == [1, 1, 1]


def test_missed_changes_return_at_once() -> None:
    async def main() -> int:
        notifier = ChangeNotifier()
        notifier.notify()
        notifier.notify()
        return await asyncio.wait_for(notifier.wait_beyond(0), 1)

    assert asyncio.run(main()) == 2


def test_notify_from_another_thread() -> None:
    async def main() -> int:
        notifier = ChangeNotifier()
        waiter = asyncio.create_task(notifier.wait_beyond(0))
        await asyncio.sleep(0)
        thread = threading.Thread(target=notifier.notify)
        thread.start()
        result = await asyncio.wait_for(waiter, 5)
        thread.join()
        assert notifier.subscriber_count == 0
        return result

    assert asyncio.run(main()) == 1


def test_waiter_stays_blocked_without_a_change() -> None:
    async def main() -> bool:
        notifier = ChangeNotifier()
        waiter = asyncio.create_task(notifier.wait_beyond(0))
        done, _ = await asyncio.wait({waiter}, timeout=0.05)
        waiter.cancel()
        return bool(done)

    assert asyncio.run(main()) is False
