"""Turn a generated `add_XServicer_to_server` into generic handlers for WorkloadEndpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class _Collector:
    """Stands in for a grpc server: keeps the handlers a generated add_*_to_server registers."""

    def __init__(self) -> None:
        self.handlers: list[Any] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.handlers.extend(handlers)

    def add_registered_method_handlers(self, *_args: Any) -> None:
        # Only an optimisation of method lookup; the generic handler serves the same methods.
        pass


def generic_handlers(add: Callable[[Any, Any], None], servicer: Any) -> list[Any]:
    collector = _Collector()
    add(servicer, collector)
    return collector.handlers
