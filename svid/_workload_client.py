"""A small synchronous client of the SPIFFE Workload API (and the agent's revocation stream).

Every call sends the ``workload.spiffe.io: true`` header the spec requires. Answers are svid
values (X509Svid, JwtSvid, BundleSet); failures are svid errors, chained from the gRPC error.
The calls and their decoding live in svid._workload_calls, shared with the asyncio client.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

import grpc

from svid._bundle import BundleSet, JwtBundle, X509Bundle
from svid._call_setup import CallSetup
from svid._jwt import JwtSvid
from svid._proto import revocation_pb2_grpc, workload_pb2_grpc
from svid._spiffe_id import SpiffeId
from svid._workload_address import address_of, grpc_target
from svid._workload_calls import (
    CHANNEL_OPTIONS,
    DEFAULT_TIMEOUT,
    JWT_BUNDLES,
    METADATA,
    REVOCATIONS,
    X509_BUNDLES,
    X509_SVIDS,
    RevocationsUpdate,
    StreamCall,
    X509BundlesUpdate,
    converted,
    jwt_svid_from,
    jwt_svid_request,
    no_message,
    validate_request,
    validated,
)
from svid._workload_errors import translate
from svid._x509 import X509Svid

__all__ = [
    "DEFAULT_TIMEOUT",
    "METADATA",
    "RevocationsUpdate",
    "Watch",
    "WorkloadApiClient",
    "X509BundlesUpdate",
]

T = TypeVar("T")


class Watch(Generic[T]):
    """An open server stream. Iterate it for updates; ``cancel()`` from any thread ends it."""

    def __init__(self, call: Any, spec: StreamCall[T], address: str = "") -> None:
        self._call = call
        self._spec = spec
        self._address = address
        self._cancelled = threading.Event()

    @property
    def name(self) -> str:
        return self._spec.name

    def __iter__(self) -> Iterator[T]:
        name, convert = self._spec.name, self._spec.convert
        try:
            for msg in self._call:
                yield converted(name, convert, msg)
        except grpc.RpcError as exc:
            if self._cancelled.is_set():
                return
            raise translate(exc, name, self._address) from exc

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
        self._channel = grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self._workload = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)
        self._stubs = {
            "workload": self._workload,
            "revocations": revocation_pb2_grpc.RevocationsStub(self._channel),
        }
        self._setup = CallSetup("svid-workload")

    def close(self) -> None:
        self._setup.close()
        self._channel.close()

    def __enter__(self) -> WorkloadApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- one-shot calls ---------------------------------------------------------------------------

    def _first(self, spec: StreamCall[T]) -> T:
        with self.watch(spec, self.timeout) as watch:
            for update in watch:
                return update
        raise no_message(spec.name)

    def fetch_x509_svids(self) -> list[X509Svid]:
        """This workload's X.509-SVIDs (the first one is the default)."""
        return self._first(X509_SVIDS)

    def fetch_x509_bundles(self) -> BundleSet[X509Bundle]:
        """The X.509 bundles of every trust domain this workload trusts."""
        return self._first(X509_BUNDLES).bundles

    def fetch_x509_bundles_and_crls(self) -> X509BundlesUpdate:
        """The X.509 bundles with the agent's DER CRLs (verify them with ``revoked_from_crls``)."""
        return self._first(X509_BUNDLES)

    def fetch_jwt_bundles(self) -> BundleSet[JwtBundle]:
        """The JWT bundles (JWKS) of every trust domain this workload trusts."""
        return self._first(JWT_BUNDLES)

    def fetch_jwt_svid(
        self, audience: str | Sequence[str], spiffe_id: SpiffeId | str | None = None
    ) -> JwtSvid:
        """A fresh JWT-SVID for ``audience`` (for ``spiffe_id`` if the workload has several)."""
        request = jwt_svid_request(audience, spiffe_id)
        try:
            response = self._workload.FetchJWTSVID(request, metadata=METADATA, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise translate(exc, "FetchJWTSVID", self.address) from exc
        return jwt_svid_from(response)

    def validate_jwt_svid(self, token: str, audience: str) -> JwtSvid:
        """Ask the agent to validate ``token`` for ``audience``.

        Raises JwtSvidValidationError (a VerificationError) when the agent refuses it.
        """
        try:
            self._workload.ValidateJWTSVID(
                validate_request(token, audience), metadata=METADATA, timeout=self.timeout
            )
        except grpc.RpcError as exc:
            raise translate(exc, "ValidateJWTSVID", self.address) from exc
        return validated(token)

    # --- watchers ---

    def watch(self, spec: StreamCall[T], timeout: float | None = None) -> Watch[T]:
        """Open the stream ``spec`` (one of svid._workload_calls' calls)."""
        method = getattr(self._stubs[spec.service], spec.method)
        opening = self._setup.start(method, spec.request(), metadata=METADATA, timeout=timeout)
        try:
            call = opening.result()
        except BaseException:
            # Interrupted while it opens: the stream, once open, is no one's to read.
            opening.add_done_callback(_cancel_opened)
            raise
        return Watch(call, spec, self.address)

    def watch_x509_svids(self) -> Watch[list[X509Svid]]:
        """Every update of this workload's X.509-SVIDs, first the current ones."""
        return self.watch(X509_SVIDS)

    def watch_x509_bundles(self) -> Watch[X509BundlesUpdate]:
        return self.watch(X509_BUNDLES)

    def watch_jwt_bundles(self) -> Watch[BundleSet[JwtBundle]]:
        return self.watch(JWT_BUNDLES)

    def watch_revocations(self) -> Watch[RevocationsUpdate]:
        """The agent's revocation list (svid.revocation.v1.Revocations/Watch), full state each."""
        return self.watch(REVOCATIONS)


def _cancel_opened(opening: Future[Any]) -> None:
    if opening.exception() is None:
        opening.result().cancel()
