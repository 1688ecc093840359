"""Workload API failures as svid errors. gRPC errors are translated here, at the edge, so callers
of the client never see ``grpc.RpcError``."""

from __future__ import annotations

import grpc

from svid._errors import SvidError, VerificationError
from svid._workload_address import ENV_SOCKET


class WorkloadApiError(SvidError):
    """A Workload API call failed; ``code`` is the gRPC status name (e.g. ``"UNAVAILABLE"``)."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class WorkloadApiUnavailableError(WorkloadApiError):
    """The agent could not be reached or is not ready; retrying later may succeed."""


class WorkloadApiPermissionError(WorkloadApiError):
    """The agent knows no identity for this workload (not registered, or no longer)."""


class JwtSvidValidationError(WorkloadApiError, VerificationError):
    """The agent refused a JWT-SVID in ValidateJWTSVID."""


_BY_CODE: dict[grpc.StatusCode, type[WorkloadApiError]] = {
    grpc.StatusCode.UNAVAILABLE: WorkloadApiUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: WorkloadApiUnavailableError,
    grpc.StatusCode.PERMISSION_DENIED: WorkloadApiPermissionError,
}


# gRPC core's details for a failed connection: "failed to connect to all addresses; last error:
# ...: <why>", <why> being the OS error or its own (a peer that never sends HTTP/2 SETTINGS).
_CONNECT_FAILED = "failed to connect to all addresses"
_SILENT_PEER = "before receiving SETTINGS"
SILENT = "it accepts connections but does not answer"
# The agent's refusal of a connection past its maximum (agent_attestor/relay.py): an HTTP/2
# GOAWAY as the first frame, which gRPC reports as its parse error.
_REFUSED_FRAME = "got frame type 7"
REFUSED = "refused"
TOO_MANY = (
    "it holds its maximum of connections for this user (or in all); do this user's processes "
    "hold many open? Retry later, or raise the agent's max_connections_per_uid"
)


# gRPC's details when the connection's keepalive ping went unanswered (CHANNEL_OPTIONS).
_PING_TIMEOUT = "ping timeout"
STOPPED = "it stopped answering: a keepalive ping went unanswered"


def stopped_answering(details: str | None) -> bool:
    """Whether an UNAVAILABLE's ``details`` say the agent went silent on an open connection
    (hung, or stopped), rather than gRPC's raw "Stream removed (ping timeout)"."""
    return details is not None and _PING_TIMEOUT in details


def connect_failure(details: str | None) -> str | None:
    """Why gRPC could not connect (e.g. "Connection refused"), or None if it did connect.

    An UNAVAILABLE the agent sent itself (it is up but not ready) carries its own words instead.
    """
    if not details or _CONNECT_FAILED not in details:
        return None
    if _SILENT_PEER in details:
        return SILENT
    if _REFUSED_FRAME in details:
        return REFUSED
    return details.rsplit(": ", 1)[-1].strip() or "cannot connect"


def unreachable(
    code: grpc.StatusCode,
    details: str | None,
    where: str,
    *,
    daemon: str,
    check: str,
    timeout: float,
) -> str | None:
    """The one line a CLI prints when `daemon` at `where` could not be reached or did not answer
    within `timeout` seconds (`check` says what to look at), or None when it did answer."""
    why = connect_failure(details) if code is grpc.StatusCode.UNAVAILABLE else None
    if why == SILENT:
        return (
            f"the socket {where} accepts connections but does not answer: is {daemon} hung, "
            "or is something else listening there?"
        )
    if why == REFUSED:
        return f"{daemon} at {where} refused the connection: {TOO_MANY}"
    if why is not None:
        return f"cannot connect to {where} ({why}): {check}"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"no answer from {daemon} at {where} within {timeout:g}s: is it hung or overloaded? "
            "Retry, or raise --timeout"
        )
    return None


def translate(exc: grpc.RpcError, call: str, address: str = "") -> WorkloadApiError:
    """The svid error for a failed ``call`` to the Workload API at ``address``; raise it from exc.

    A connection failure or a deadline names the address and what to check, never gRPC's raw
    connection text.
    """
    # grpc.Call for the sync stack; grpc.aio's AioRpcError has the same methods but is no Call.
    has_status = isinstance(exc, grpc.Call | grpc.aio.AioRpcError)
    code = exc.code() if has_status else grpc.StatusCode.UNKNOWN
    details = (exc.details() if has_status else None) or "no details"
    cls = _BY_CODE.get(code, WorkloadApiError)
    if call == "ValidateJWTSVID" and code == grpc.StatusCode.INVALID_ARGUMENT:
        cls = JwtSvidValidationError
    at = f" at {address}" if address else ""
    why = connect_failure(details) if code == grpc.StatusCode.UNAVAILABLE else None
    if why is not None:
        if why == REFUSED:
            return cls(
                f"Workload API {call}: the agent{at} refused the connection: {TOO_MANY}",
                code.name,
            )
        check = (
            "is the agent hung, or is something else listening there?"
            if why == SILENT
            else f"is the SPIFFE agent running, and does {ENV_SOCKET} name its socket?"
        )
        return cls(
            f"Workload API {call}: cannot connect to the agent{at} ({why}): {check}", code.name
        )
    if code == grpc.StatusCode.UNAVAILABLE and stopped_answering(details):
        return cls(
            f"Workload API {call}: no answer from the agent{at} ({STOPPED}): is the agent "
            "hung? Retry",
            code.name,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return cls(
            f"Workload API {call}: no answer from the agent{at} before the deadline: is the "
            "agent hung or overloaded? Retry, or allow a longer timeout",
            code.name,
        )
    return cls(f"Workload API {call}{at} failed: {code.name}: {details}", code.name)
