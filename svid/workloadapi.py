"""The SPIFFE Workload API from a service: fetch this workload's SVIDs and bundles, and keep
verifiers and TLS contexts current from a running agent — with threads or with asyncio.

    with WorkloadApiSource() as source:          # address from SPIFFE_ENDPOINT_SOCKET
        source.wait_ready(timeout=10)
        jwt_verifier = source.jwt_verifier()
        caller = jwt_verifier.verify(token, audience="orders-api")

    async with AsyncX509Source() as source:      # this workload's own rotating SVIDs too
        ctx = svid.tls.server_context(source, authorize="spiffe://example.org/billing")
"""

from svid._backoff import Backoff
from svid._crl import CrlResult, revoked_from_crls
from svid._source_state import RevocationEvent
from svid._workload_address import ENV_SOCKET, WorkloadApiAddressError, grpc_target
from svid._workload_client import (
    METADATA,
    RevocationsUpdate,
    Watch,
    WorkloadApiClient,
    X509BundlesUpdate,
)
from svid._workload_client_aio import AsyncWatch, AsyncWorkloadApiClient
from svid._workload_errors import (
    JwtSvidValidationError,
    WorkloadApiError,
    WorkloadApiPermissionError,
    WorkloadApiUnavailableError,
)
from svid._workload_source import WorkloadApiSource, X509Source
from svid._workload_source_aio import AsyncWorkloadApiSource, AsyncX509Source

__all__ = [
    "ENV_SOCKET",
    "METADATA",
    "AsyncWatch",
    "AsyncWorkloadApiClient",
    "AsyncWorkloadApiSource",
    "AsyncX509Source",
    "Backoff",
    "CrlResult",
    "JwtSvidValidationError",
    "RevocationEvent",
    "RevocationsUpdate",
    "Watch",
    "WorkloadApiAddressError",
    "WorkloadApiClient",
    "WorkloadApiError",
    "WorkloadApiPermissionError",
    "WorkloadApiSource",
    "WorkloadApiUnavailableError",
    "X509BundlesUpdate",
    "X509Source",
    "grpc_target",
    "revoked_from_crls",
]
