"""A small synchronous client of the SPIFFE Workload API (and the agent's revocation stream).

Every call sends the ``workload.spiffe.io: true`` header the spec requires. Answers are svid
values (X509Svid, JwtSvid, BundleSet); failures are svid errors, chained from the gRPC error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from svid._bundle import BundleSet, JwtBundle, X509Bundle
from svid._errors import SvidError
from svid._jwt import JwtSvid
from svid._proto import revocation_pb2, revocation_pb2_grpc, workload_pb2, workload_pb2_grpc
from svid._revocation import Revoked
from svid._spiffe_id import SpiffeId, TrustDomain
from svid._workload_address import address_of, grpc_target
from svid._workload_errors import WorkloadApiError, translate
from svid._x509 import X509Svid

METADATA = (("workload.spiffe.io", "true"),)
DEFAULT_TIMEOUT = 10.0
# Reconnect quickly after an agent restart; the caller's own backoff paces retries beyond that.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
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


def _bad_response(call: str, exc: SvidError) -> WorkloadApiError:
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
        Revoked(r.kind, r.value, float(r.expires_at) if r.expires_at else float("inf"))
        for r in msg.items
    )
    return RevocationsUpdate(items, tuple(msg.crl), msg.version)


class Watch(Generic[T]):
    """An open server stream. Iterate it for updates; ``cancel()`` from any thread ends it."""

    def __init__(
        self, call: Any, convert: Callable[[Any], T], name: str, address: str = ""
    ) -> None:
        self._call = call
        self._convert = convert
        self._name = name
        self._address = address
        self._cancelled = threading.Event()

    def __iter__(self) -> Iterator[T]:
        try:
            for msg in self._call:
                try:
                    yield self._convert(msg)
                except WorkloadApiError:
                    raise
                except SvidError as exc:
                    raise _bad_response(self._name, exc) from exc
        except grpc.RpcError as exc:
            if self._cancelled.is_set():
                return
            raise translate(exc, self._name, self._address) from exc

    def cancel(self) -> None:
        self._cancelled.set()
        self._call.cancel()

    def __enter__(self) -> Watch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class WorkloadApiClient:
    """Client of the Workload API at ``socket`` (``unix:///path`` or ``tcp://IP:port``).

    Without ``socket`` the address comes from SPIFFE_ENDPOINT_SOCKET. Thread-safe; close() it (or
    use it as a context manager) when done.
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.target = grpc_target(socket, environ)
        # Named in every error, as the operator wrote it (or as SPIFFE_ENDPOINT_SOCKET says).
        self.address = address_of(socket, environ)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self._workload = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)
        self._revocations = revocation_pb2_grpc.RevocationsStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> WorkloadApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one-shot calls ---------------------------------------------------------------------------

    def _first(self, watch: Watch[T]) -> T:
        with watch:
            for update in watch:
                return update
        raise WorkloadApiError(f"Workload API {watch._name} ended without a message", "NO_MESSAGE")

    def fetch_x509_svids(self) -> list[X509Svid]:
        """This workload's X.509-SVIDs (the first one is the default)."""
        return self._first(self._stream_x509_svids(self.timeout))

    def fetch_x509_bundles(self) -> BundleSet[X509Bundle]:
        """The X.509 bundles of every trust domain this workload trusts."""
        return self._first(self._stream_x509_bundles(self.timeout)).bundles

    def fetch_x509_bundles_and_crls(self) -> X509BundlesUpdate:
        """The X.509 bundles with the agent's DER CRLs (verify them with ``revoked_from_crls``)."""
        return self._first(self._stream_x509_bundles(self.timeout))

    def fetch_jwt_bundles(self) -> BundleSet[JwtBundle]:
        """The JWT bundles (JWKS) of every trust domain this workload trusts."""
        return self._first(self._stream_jwt_bundles(self.timeout))

    def fetch_jwt_svid(
        self, audience: str | Sequence[str], spiffe_id: SpiffeId | str | None = None
    ) -> JwtSvid:
        """A fresh JWT-SVID for ``audience`` (for ``spiffe_id`` if the workload has several)."""
        audiences = [audience] if isinstance(audience, str) else list(audience)
        request = workload_pb2.JWTSVIDRequest(
            audience=audiences, spiffe_id=str(spiffe_id) if spiffe_id else ""
        )
        try:
            response = self._workload.FetchJWTSVID(request, metadata=METADATA, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise translate(exc, "FetchJWTSVID", self.address) from exc
        if not response.svids:
            raise WorkloadApiError("Workload API FetchJWTSVID returned no SVID", "NO_MESSAGE")
        try:
            return JwtSvid.parse_insecure(response.svids[0].svid)  # from the agent: trusted
        except SvidError as exc:
            raise _bad_response("FetchJWTSVID", exc) from exc

    def validate_jwt_svid(self, token: str, audience: str) -> JwtSvid:
        """Ask the agent to validate ``token`` for ``audience``.

        Raises JwtSvidValidationError (a VerificationError) when the agent refuses it.
        """
        request = workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token)
        try:
            self._workload.ValidateJWTSVID(request, metadata=METADATA, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise translate(exc, "ValidateJWTSVID", self.address) from exc
        try:
            return JwtSvid.parse_insecure(token)
        except SvidError as exc:
            raise _bad_response("ValidateJWTSVID", exc) from exc

    # --- watchers ---

    def _stream_x509_svids(self, timeout: float | None) -> Watch[list[X509Svid]]:
        call = self._workload.FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=METADATA, timeout=timeout
        )
        return Watch(call, x509_svids_from, "FetchX509SVID", self.address)

    def _stream_x509_bundles(self, timeout: float | None) -> Watch[X509BundlesUpdate]:
        call = self._workload.FetchX509Bundles(
            workload_pb2.X509BundlesRequest(), metadata=METADATA, timeout=timeout
        )
        return Watch(call, x509_bundles_from, "FetchX509Bundles", self.address)

    def _stream_jwt_bundles(self, timeout: float | None) -> Watch[BundleSet[JwtBundle]]:
        call = self._workload.FetchJWTBundles(
            workload_pb2.JWTBundlesRequest(), metadata=METADATA, timeout=timeout
        )
        return Watch(call, jwt_bundles_from, "FetchJWTBundles", self.address)

    def watch_x509_svids(self) -> Watch[list[X509Svid]]:
        """Every update of this workload's X.509-SVIDs, first the current ones."""
        return self._stream_x509_svids(None)

    def watch_x509_bundles(self) -> Watch[X509BundlesUpdate]:
        return self._stream_x509_bundles(None)

    def watch_jwt_bundles(self) -> Watch[BundleSet[JwtBundle]]:
        return self._stream_jwt_bundles(None)

    def watch_revocations(self) -> Watch[RevocationsUpdate]:
        """The agent's revocation list (svid.revocation.v1.Revocations/Watch), full state each."""
        call = self._revocations.Watch(revocation_pb2.WatchRequest(), metadata=METADATA)
        return Watch(call, revocations_from, "Revocations/Watch", self.address)
