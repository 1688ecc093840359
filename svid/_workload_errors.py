"""Workload API failures as svid errors. gRPC errors are translated here, at the edge, so callers
of the client never see ``grpc.RpcError``."""

from __future__ import annotations

import grpc

from svid._errors import SvidError, VerificationError


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


def translate(exc: grpc.RpcError, call: str) -> WorkloadApiError:
    """The svid error for a failed ``call``; raise it ``from exc``."""
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or "no details"
    cls = _BY_CODE.get(code, WorkloadApiError)
    if call == "ValidateJWTSVID" and code == grpc.StatusCode.INVALID_ARGUMENT:
        cls = JwtSvidValidationError
    return cls(f"Workload API {call} failed: {code.name}: {details}", code.name)
