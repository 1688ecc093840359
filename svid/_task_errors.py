"""Failures of the task API as svid errors, translated at the edge from sync and asyncio gRPC
errors alike, so callers never see ``grpc.RpcError``."""

from __future__ import annotations

import grpc

from svid._workload_errors import (
    REFUSED,
    SILENT,
    STOPPED,
    TOO_MANY,
    WorkloadApiError,
    WorkloadApiUnavailableError,
    connect_failure,
    stopped_answering,
)


class TaskError(WorkloadApiError):
    """A task call failed; ``code`` is the gRPC status name."""


class TaskDeniedError(TaskError):
    """Policy (or an intent rule) refused: a task begin, a sub-task, an elevated step or a mint.

    ``reason`` is the decision's reason as the server gave it (which policies, which pairs):
    never a credential.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, "PERMISSION_DENIED")
        self.reason = reason


class TaskRequestError(TaskError, ValueError):
    """The request itself is malformed (an empty intent, a bad tool name, ...)."""


class TaskNotFoundError(TaskError):
    """The agent or server knows no such task (or it belongs to another workload)."""


class TaskEndedError(TaskError):
    """The task has ended: it mints nothing more."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "FAILED_PRECONDITION")


def closed_client(name: str) -> TaskError:
    """A call through a client that was closed: gRPC's own error for it (a ValueError or a
    UsageError) is neither an svid error nor says what to do, and replaced the error a task's
    block raised when leaving it tried to end the task."""
    return TaskError(
        f"this {name} was closed, so its tasks can make no more calls: close the client only "
        "after the tasks it began have ended (use the task's block inside the client's)",
        "CANCELLED",
    )


def no_answer(call: str, address: str) -> WorkloadApiUnavailableError:
    """``call`` to the agent at ``address`` got no answer before its deadline."""
    at = f" at {address}" if address else ""
    return WorkloadApiUnavailableError(
        f"{call}: no answer from the agent{at} before the deadline: is the agent hung or "
        "overloaded? Retry, or allow a longer timeout",
        "DEADLINE_EXCEEDED",
    )


_DENIED = "denied: "


def _code_and_details(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    # grpc.RpcError from a sync stub is also a grpc.Call; grpc.aio.AioRpcError has the same
    # two methods without being one.
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    status = code() if callable(code) else grpc.StatusCode.UNKNOWN
    text = details() if callable(details) else None
    return (status if isinstance(status, grpc.StatusCode) else grpc.StatusCode.UNKNOWN), (
        text or "no details"
    )


def translate(exc: BaseException, call: str, address: str) -> TaskError | WorkloadApiError:
    """The svid error for a failed task ``call`` to the agent at ``address``; raise it from exc."""
    code, details = _code_and_details(exc)
    at = f" at {address}" if address else ""
    if code is grpc.StatusCode.PERMISSION_DENIED:
        # A policy decision's reason says "denied: ..." itself; other refusals do not.
        said = details if details.startswith(_DENIED) else _DENIED + details
        return TaskDeniedError(f"{call} {said}", details)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return TaskRequestError(f"{call}: bad request: {details}", code.name)
    if code is grpc.StatusCode.NOT_FOUND:
        return TaskNotFoundError(f"{call}: {details}", code.name)
    if code is grpc.StatusCode.UNAVAILABLE:
        why = connect_failure(details)
        if why == REFUSED:
            return WorkloadApiUnavailableError(
                f"{call}: the agent{at} refused the connection: {TOO_MANY}", code.name
            )
        if why is not None:
            check = (
                "is the agent hung, or is something else listening there?"
                if why == SILENT
                else "is the SPIFFE agent running, and does SPIFFE_ENDPOINT_SOCKET name its socket?"
            )
            return WorkloadApiUnavailableError(
                f"{call}: cannot connect to the agent{at} ({why}): {check}", code.name
            )
        if stopped_answering(details):
            return WorkloadApiUnavailableError(
                f"{call}: no answer from the agent{at} ({STOPPED}): is the agent hung? Retry",
                code.name,
            )
        return WorkloadApiUnavailableError(f"{call}{at}: {details}", code.name)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return no_answer(call, address)
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return TaskError(
            f"{call}: the agent{at} does not serve the task API (is it an svid agent?)", code.name
        )
    return TaskError(f"{call}{at} failed: {code.name}: {details}", code.name)
