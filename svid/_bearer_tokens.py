"""Where an outgoing request's JWT-SVID comes from, for the HTTP client adapters: a task
(``task.jwt(audience)``, cached and refreshed by the task), the workload's own identity over the
Workload API (cached here, fetched again at a quarter of its lifetime: the agent may have served
it with half its life gone, `fresh`), or a callable of your own.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any

from svid._clock import Clock, ElapsedClock, SystemClock
from svid._jwt import JwtSvid
from svid._spiffe_id import SpiffeId
from svid._task_model import Fetched, fresh_token


class BearerTokens:
    """Tokens for one audience. ``token()`` for sync clients, ``atoken()`` for asyncio ones."""

    def __init__(
        self,
        provider: Any,
        audience: str,
        *,
        spiffe_id: SpiffeId | str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not audience:
            raise ValueError("an audience is required")
        self.audience = audience
        # Counts a sleep of the host too (ElapsedClock): on CLOCK_MONOTONIC alone, a token's
        # quarter life had not passed on waking, and it went out that long late.
        self._clock = ElapsedClock(clock or SystemClock())
        self._lock = threading.Lock()
        self._cached: Fetched | None = None
        self._get: Callable[[], Any]
        if hasattr(provider, "jwt") and callable(provider.jwt):  # Task / AsyncTask: they cache
            self._get = lambda: provider.jwt(audience)
            method = provider.jwt
        elif hasattr(provider, "fetch_jwt_svid"):  # (Async)WorkloadApiClient: cache here
            self._get = lambda: provider.fetch_jwt_svid(audience, spiffe_id)
            method = provider.fetch_jwt_svid
        elif callable(provider):
            self._get = lambda: provider(audience)
            method = provider
        else:
            raise TypeError(
                "provider must be a task (svid.tasks), a Workload API client or a callable "
                f"taking the audience, not {type(provider).__name__}"
            )
        self.is_async = inspect.iscoroutinefunction(method)

    def _fresh(self) -> str | None:
        token = fresh_token(self._cached, self._clock)
        return None if token is None else token.token

    def _keep(self, value: Any, fetched_at: tuple[float, float]) -> str:
        """``fetched_at``: when it was asked for, on the wall and on the monotonic clock."""
        if isinstance(value, JwtSvid):
            self._cached = (value, *fetched_at)
            return value.token
        if isinstance(value, str) and value:
            return value
        raise TypeError(f"the token provider returned {type(value).__name__}, not a token")

    def token(self) -> str:
        with self._lock:
            token = self._fresh()
            if token is not None:
                return token
            now = (self._clock.now(), self._clock.monotonic())
            value = self._get()
            if inspect.isawaitable(value):
                if inspect.iscoroutine(value):
                    value.close()
                raise TypeError("an asyncio token provider needs an asyncio client")
            return self._keep(value, now)

    async def atoken(self) -> str:
        token = self._fresh()
        if token is not None:
            return token
        if not self.is_async:  # a sync provider may block on a fetch: not on the loop
            return await asyncio.to_thread(self.token)
        now = (self._clock.now(), self._clock.monotonic())
        value = self._get()
        if inspect.isawaitable(value):
            value = await value
        return self._keep(value, now)
