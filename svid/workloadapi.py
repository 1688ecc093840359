"""The SPIFFE Workload API from a service: fetch this workload's SVIDs and bundles, and keep
verifiers current from a running agent.

    with WorkloadApiSource() as source:          # address from SPIFFE_ENDPOINT_SOCKET
        source.wait_ready(timeout=10)
        jwt_verifier = source.jwt_verifier()
        caller = jwt_verifier.verify(token, audience="orders-api")
"""

from svid._crl import CrlResult, revoked_from_crls
from svid._workload_address import ENV_SOCKET, WorkloadApiAddressError, grpc_target
from svid._workload_client import (
    METADATA,
    RevocationsUpdate,
    Watch,
    WorkloadApiClient,
    X509BundlesUpdate,
)
from svid._workload_errors import (
    JwtSvidValidationError,
    WorkloadApiError,
    WorkloadApiPermissionError,
    WorkloadApiUnavailableError,
)
from svid._workload_source import Backoff, WorkloadApiSource

__all__ = [
    "ENV_SOCKET",
    "METADATA",
    "Backoff",
    "CrlResult",
    "JwtSvidValidationError",
    "RevocationsUpdate",
    "Watch",
    "WorkloadApiAddressError",
    "WorkloadApiClient",
    "WorkloadApiError",
    "WorkloadApiPermissionError",
    "WorkloadApiSource",
    "WorkloadApiUnavailableError",
    "X509BundlesUpdate",
    "grpc_target",
    "revoked_from_crls",
]
