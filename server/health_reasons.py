"""Why a serving server should be sent no agents now, each cause with a short reason.

One record for every probe: /healthz answers 503 naming the reasons, and the node service's
gRPC health says NOT_SERVING, while any stands. Causes so far: a view of a shared datastore
gone stale (server/view_freshness.py) and an audit ledger that cannot commit
(server/audit/outage.py), on either backend. A reason is read by anyone who can reach the
metrics port: short, and never a path or a secret.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# The causes: one reason each at a time.
DATASTORE_VIEW = "datastore_view"
LEDGER = "ledger"


class HealthReasons:
    """Thread-safe: the ledger's commits end on worker threads, the view's turns on the loop.
    `on_turn(healthy)` is called, on the thread making the change, each time the set of
    reasons becomes empty or stops being empty."""

    def __init__(self, on_turn: Callable[[bool], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._reasons: dict[str, str] = {}
        self._on_turn = on_turn

    def set(self, cause: str, reason: str) -> None:
        with self._lock:
            turned = not self._reasons
            self._reasons[cause] = reason
        if turned and self._on_turn is not None:
            self._on_turn(False)

    def clear(self, cause: str) -> None:
        with self._lock:
            turned = self._reasons.pop(cause, None) is not None and not self._reasons
        if turned and self._on_turn is not None:
            self._on_turn(True)

    def reasons(self) -> list[str]:
        """Every standing reason, in a stable order."""
        with self._lock:
            return [self._reasons[cause] for cause in sorted(self._reasons)]

    def healthy(self) -> bool:
        return not self._reasons
