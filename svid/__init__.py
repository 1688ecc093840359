"""svid: SPIFFE identities for services and AI agents — IDs, SVIDs, bundles, verification.

Verify an incoming JWT-SVID in a web handler::

    source = svid.MemoryBundleSource.of(svid.load_bundle_file(td, "bundle.json"))
    jwt_verifier = svid.JwtVerifier(source.jwt_bundle_for, revocations=svid.RevocationSet())

    def handler(request):
        token = request.headers["Authorization"].removeprefix("Bearer ")
        try:
            caller = jwt_verifier.verify(token, audience="orders-api")
        except svid.VerificationError as exc:  # ExpiredError, RevokedError are subclasses
            return 401, str(exc)  # messages never contain the token
        return 200, f"hello {caller.spiffe_id}"

Mutual TLS with this workload's own rotating SVID, the peer authorised in the handshake
(``svid.tls``; stdlib ``ssl`` contexts for wrap_socket, http.server, asyncio, httpx)::

    with svid.X509Source() as source:
        ctx = svid.tls.server_context(source, authorize="spiffe://example.org/billing")

Or check the peer of a connection you set up yourself (the verifier pins the chain to the peer's
own trust domain and applies the SPIFFE leaf rules, validity times and revocations)::

    peer = x509_verifier.verify_ssl_peer(tls)  # SSLSocket or SSLObject; raises VerificationError

Keep bundles and revocations current from the local agent (SPIFFE_ENDPOINT_SOCKET)::

    with svid.WorkloadApiSource() as source:
        source.wait_ready(timeout=10)
        jwt_verifier = source.jwt_verifier()
        x509_verifier = source.x509_verifier()

A task token (an AI agent's task, see ``svid.tasks``) carries typed claims::

    task = caller.task                    # svid.TaskClaims, or None for a non-task token
    if task is None or not task.grants_tool("read_ticket", audience="mcp-tickets"):
        return 403, svid.tool_scope("read_ticket")  # the scope to ask for

An OAuth access token from svidd's authorization server (RFC 9068 ``at+jwt``, e.g. exchanged
for a task; refused once the task ends)::

    tokens = source.access_token_verifier("https://svidd.example", audience="https://tickets/mcp")
    token = tokens.verify(bearer)           # svid.VerifiedAccessToken: subject, act_chain, scopes
    if not token.allows("read"):            # a tool: token.grants_tool("read_ticket"); not by
        return 403, "read"                  # membership in token.scopes

Results are cached by the exact credential bytes until the earliest of expiry, a bundle change for
the trust domain, or a revocation; a cached answer is never more permissive than a fresh one.
"""

from svid._audit_checkpoint import AuditCheckpoint, AuditCheckpointError
from svid._bundle import BundleSet, JwtBundle, SpiffeBundle, X509Bundle
from svid._clock import Clock, FakeClock, SystemClock
from svid._der import certs_to_pem, der_concat, load_pem_certs, parse_der_certs
from svid._errors import (
    AudienceError,
    BundleError,
    ExpiredError,
    JwtSvidError,
    RevokedError,
    SpiffeIdError,
    StaleRevocationsError,
    SvidError,
    SvidParseError,
    VerificationError,
    X509SvidError,
)
from svid._jose import (
    ALLOWED_ALGS,
    alg_for_key,
    b64url_decode,
    b64url_encode,
    public_key_thumbprint_kid,
    sign_jws,
    verify_jws_signature,
)
from svid._jwt import JwtSvid
from svid._revocation import (
    MAX_CLOCK_SKEW,
    MAX_VERIFIER_LEEWAY,
    RevocationSet,
    Revoked,
    normalize_serial,
)
from svid._source import BundleSource, MemoryBundleSource, load_bundle_file
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._task_claims import TaskClaims, TaskClaimsError, task_claims, tool_scope
from svid._verify_access import AccessTokenVerifier, VerifiedAccessToken
from svid._verify_jwt import JwtVerifier, VerifiedJwt
from svid._verify_x509 import VerifiedX509, X509Verifier
from svid._x509 import X509Svid, check_leaf_profile, check_signing_profile, spiffe_id_from_cert
from svid.workloadapi import (
    AsyncWorkloadApiClient,
    AsyncWorkloadApiSource,
    AsyncX509Source,
    RevocationEvent,
    WorkloadApiClient,
    WorkloadApiError,
    WorkloadApiSource,
    X509Source,
    revoked_from_crls,
)

__all__ = [
    "ALLOWED_ALGS",
    "MAX_CLOCK_SKEW",
    "MAX_VERIFIER_LEEWAY",
    "AccessTokenVerifier",
    "AsyncWorkloadApiClient",
    "AsyncWorkloadApiSource",
    "AsyncX509Source",
    "AudienceError",
    "AuditCheckpoint",
    "AuditCheckpointError",
    "BundleError",
    "BundleSet",
    "BundleSource",
    "Clock",
    "ExpiredError",
    "FakeClock",
    "JwtBundle",
    "JwtSvid",
    "JwtSvidError",
    "JwtVerifier",
    "MemoryBundleSource",
    "RevocationEvent",
    "RevocationSet",
    "Revoked",
    "RevokedError",
    "SpiffeBundle",
    "SpiffeId",
    "SpiffeIdError",
    "StaleRevocationsError",
    "SvidError",
    "SvidParseError",
    "SystemClock",
    "TaskClaims",
    "TaskClaimsError",
    "TrustDomain",
    "VerificationError",
    "VerifiedAccessToken",
    "VerifiedJwt",
    "VerifiedX509",
    "WorkloadApiClient",
    "WorkloadApiError",
    "WorkloadApiSource",
    "X509Bundle",
    "X509Source",
    "X509Svid",
    "X509SvidError",
    "X509Verifier",
    "alg_for_key",
    "b64url_decode",
    "b64url_encode",
    "certs_to_pem",
    "check_leaf_profile",
    "check_signing_profile",
    "der_concat",
    "load_bundle_file",
    "load_pem_certs",
    "normalize_serial",
    "parse_der_certs",
    "public_key_thumbprint_kid",
    "revoked_from_crls",
    "sign_jws",
    "spiffe_id_from_cert",
    "task_claims",
    "tool_scope",
    "verify_jws_signature",
]
