"""The one place where errors become gRPC status codes.

Handlers raise domain errors (server.errors, the datastore's, the CA's, svid's) and never pick a
status code themselves; this module decides the code and the client-visible message.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from server import errors
from server.ca.errors import CaError, CaUnavailableError, CsrError, SigningRequestError
from server.datastore import AlreadyExistsError as DsAlreadyExistsError
from server.datastore import ConflictError as DsConflictError
from server.datastore import NotFoundError as DsNotFoundError
from svid._errors import SvidError

_log = logging.getLogger("svid.server.status")

_BY_TYPE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.RateLimitedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (CsrError, grpc.StatusCode.INVALID_ARGUMENT),
    (SigningRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (CaUnavailableError, grpc.StatusCode.UNAVAILABLE),
    # Key store or CA configuration trouble is the server's, not the caller's.
    (CaError, grpc.StatusCode.INTERNAL),
    (DsNotFoundError, grpc.StatusCode.NOT_FOUND),
    (DsAlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (DsConflictError, grpc.StatusCode.ABORTED),
    # Any other svid error (bad SPIFFE ID, unparsable certificate or CSR) is the caller's input.
    (SvidError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for `exc`. Unknown errors say only 'internal'."""
    for kind, code in _BY_TYPE:
        if isinstance(exc, kind):
            if code is grpc.StatusCode.INTERNAL:
                break
            return code, str(exc) or kind.__name__
    return grpc.StatusCode.INTERNAL, "internal error"


ErrorHook = Callable[[grpc.StatusCode], None]

_R = TypeVar("_R")


def _report(exc: BaseException, hook: ErrorHook | None) -> tuple[grpc.StatusCode, str]:
    code, message = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        _log.error("unexpected error in handler", exc_info=exc)
    if hook is not None:
        hook(code)
    return code, message


def unary(
    method: Callable[..., Awaitable[_R]],
) -> Callable[..., Awaitable[_R]]:
    """Wrap an async unary handler so domain errors abort the call with the mapped status."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> _R:
        try:
            return await method(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            code, message = _report(exc, getattr(self, "on_error", None))
            await context.abort(code, message)
            raise  # pragma: no cover - abort() always raises

    return wrapper


def stream(
    method: Callable[..., AsyncIterator[_R]],
) -> Callable[..., AsyncIterator[_R]]:
    """Like `unary`, for async-generator (server-streaming or bidi) handlers."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[_R]:
        try:
            async for item in method(self, request, context):
                yield item
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            code, message = _report(exc, getattr(self, "on_error", None))
            await context.abort(code, message)

    return wrapper
