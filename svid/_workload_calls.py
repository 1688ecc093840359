"""What the sync and asyncio Workload API clients share: the calls, their requests, and how an
answer becomes svid values. No I/O here: the clients only differ in how they wait.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from svid._bundle import BundleSet, JwtBundle, X509Bundle
from svid._errors import SvidError
from svid._jwt import JwtSvid
from svid._proto import revocation_pb2, workload_pb2
from svid._revocation import Revoked
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._workload_errors import WorkloadApiError
from svid._x509 import X509Svid

METADATA = (("workload.spiffe.io", "true"),)
DEFAULT_TIMEOUT = 10.0
# How often a client pings the agent while a call is open, and how long it waits for the answer.
KEEPALIVE_MS = 5_000
# Reconnect quickly after an agent restart; the caller's own backoff paces retries beyond that.
CHANNEL_OPTIONS = (
    # A connection of its own: grpcio otherwise shares one among every channel of the process
    # to the socket, and the agent serves a connection 16 streams at once (a source holds 3 or
    # 4 for its life), so a process's sixth source would wait for ever for a stream to close.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Not grpc.min_reconnect_backoff_ms: gRPC takes it for how long a connection may take to
    # the agent's first HTTP/2 frame (default 20 s). At 100 ms a loaded host's agent, slower
    # than that to answer, failed the first call UNAVAILABLE, its own deadline seconds away.
    # A hung agent (stopped, its loop stuck) keeps the connection open: a source's quiet
    # streams never broke, its revocation data never counted as stale, and
    # max_revocation_staleness admitted tokens revoked meanwhile for as long as the hang
    # lasted. An unanswered ping now breaks them. The agent permits pings this often
    # (agent_attestor/endpoint.py); an older one answers "too many pings", which makes gRPC
    # ping that connection half as often each time.
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
    ("grpc.http2.ping_timeout_ms", KEEPALIVE_MS),  # grpcio >= 1.6x times pings out by this one
    ("grpc.http2.max_pings_without_data", 0),  # a quiet stream is what must be checked
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class X509BundlesUpdate:
    """One FetchX509Bundles message: every trust domain's authorities, and the DER CRLs."""

    bundles: BundleSet[X509Bundle]
    crls: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class RevocationsUpdate:
    """One message of the agent's revocation stream (full state)."""

    items: tuple[Revoked, ...]
    crls: tuple[bytes, ...]
    version: int
    # Seconds the agent had been out of sync with its server when it sent this (0: in sync,
    # or an agent that does not say): the list is at least that old.
    behind: float = 0.0


def bad_response(call: str, exc: SvidError) -> WorkloadApiError:
    return WorkloadApiError(f"Workload API {call} sent an unusable answer: {exc}", "BAD_RESPONSE")


def _trust_domain(key: str) -> TrustDomain:
    # The spec keys bundle maps by trust domain ID (spiffe://td); accept a bare name too.
    if key.startswith("spiffe://"):
        return SpiffeId.parse(key).trust_domain
    return TrustDomain.parse(key)


def x509_svids_from(msg: workload_pb2.X509SVIDResponse) -> list[X509Svid]:
    svids = []
    for item in msg.svids:
        svid = X509Svid.parse(item.x509_svid, item.x509_svid_key, hint=item.hint)
        if item.spiffe_id and str(svid.spiffe_id) != item.spiffe_id:
            raise SvidError(
                f"X.509-SVID is for {svid.spiffe_id} but the message says {item.spiffe_id}"
            )
        svids.append(svid)
    return svids


def x509_bundles_from(msg: workload_pb2.X509BundlesResponse) -> X509BundlesUpdate:
    bundles = {}
    for key, der in msg.bundles.items():
        td = _trust_domain(key)
        bundles[td] = X509Bundle.parse_der(td, der)
    return X509BundlesUpdate(BundleSet(bundles), tuple(msg.crl))


def jwt_bundles_from(msg: workload_pb2.JWTBundlesResponse) -> BundleSet[JwtBundle]:
    bundles = {}
    for key, jwks in msg.bundles.items():
        td = _trust_domain(key)
        bundles[td] = JwtBundle.parse_jwks(td, jwks)
    return BundleSet(bundles)


def revocations_from(msg: revocation_pb2.RevocationList) -> RevocationsUpdate:
    # expires_at 0: the agent does not know the credential's expiry, so keep the entry listed.
    items = tuple(
        Revoked(r.kind, r.value, float(r.expires_at) if r.expires_at else float("inf"), r.spiffe_id)
        for r in msg.items
    )
    behind = max(0, msg.out_of_sync_ms) / 1000.0
    return RevocationsUpdate(items, tuple(msg.crl), msg.version, behind)


def converted(call: str, convert: Callable[[Any], T], msg: Any) -> T:
    """``convert(msg)``, with a message this library cannot use reported as the agent's fault."""
    try:
        return convert(msg)
    except WorkloadApiError:
        raise
    except SvidError as exc:
        raise bad_response(call, exc) from exc


@dataclass(frozen=True, slots=True)
class StreamCall(Generic[T]):
    """A server-streaming call: its name in errors, the stub and method, and its converter."""

    name: str
    service: str  # "workload" (SpiffeWorkloadAPI) or "revocations"
    method: str
    request: Callable[[], Any]
    convert: Callable[[Any], T]


X509_SVIDS: StreamCall[list[X509Svid]] = StreamCall(
    "FetchX509SVID", "workload", "FetchX509SVID", workload_pb2.X509SVIDRequest, x509_svids_from
)
X509_BUNDLES: StreamCall[X509BundlesUpdate] = StreamCall(
    "FetchX509Bundles",
    "workload",
    "FetchX509Bundles",
    workload_pb2.X509BundlesRequest,
    x509_bundles_from,
)
JWT_BUNDLES: StreamCall[BundleSet[JwtBundle]] = StreamCall(
    "FetchJWTBundles",
    "workload",
    "FetchJWTBundles",
    workload_pb2.JWTBundlesRequest,
    jwt_bundles_from,
)
REVOCATIONS: StreamCall[RevocationsUpdate] = StreamCall(
    "Revocations/Watch", "revocations", "Watch", revocation_pb2.WatchRequest, revocations_from
)


def no_message(call: str) -> WorkloadApiError:
    return WorkloadApiError(f"Workload API {call} ended without a message", "NO_MESSAGE")


def jwt_svid_request(
    audience: str | Sequence[str], spiffe_id: SpiffeId | str | None
) -> workload_pb2.JWTSVIDRequest:
    audiences = [audience] if isinstance(audience, str) else list(audience)
    return workload_pb2.JWTSVIDRequest(
        audience=audiences, spiffe_id=str(spiffe_id) if spiffe_id else ""
    )


def jwt_svid_from(response: workload_pb2.JWTSVIDResponse) -> JwtSvid:
    if not response.svids:
        raise WorkloadApiError("Workload API FetchJWTSVID returned no SVID", "NO_MESSAGE")
    # From the agent: trusted, not verified.
    return converted("FetchJWTSVID", JwtSvid.parse_insecure, response.svids[0].svid)


def validate_request(token: str, audience: str) -> workload_pb2.ValidateJWTSVIDRequest:
    return workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token)


def validated(token: str) -> JwtSvid:
    """The token the agent has just accepted in ValidateJWTSVID, as a JwtSvid."""
    return converted("ValidateJWTSVID", JwtSvid.parse_insecure, token)
