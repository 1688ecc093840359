"""The Workload API client for asyncio programs (grpc.aio): the same calls, answers and errors as
``WorkloadApiClient``, awaited. Create and use it inside one running event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import grpc

from svid._bundle import BundleSet, JwtBundle, X509Bundle
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

T = TypeVar("T")


class AsyncWatch(Generic[T]):
    """An open server stream: ``async for`` its updates; ``cancel()`` ends it quietly."""

    def __init__(self, call: Any, spec: StreamCall[T], address: str = "") -> None:
        self._call = call
        self._spec = spec
        self._address = address
        self._cancelled = False

    @property
    def name(self) -> str:
        return self._spec.name

    async def __aiter__(self) -> AsyncIterator[T]:
        name, convert = self._spec.name, self._spec.convert
        try:
            async for msg in self._call:
                yield converted(name, convert, msg)
        except grpc.RpcError as exc:
            if self._cancelled:
                return
            raise translate(exc, name, self._address) from exc
        except asyncio.CancelledError:
            # grpc.aio ends a cancelled call's iteration this way; only our own cancel() is
            # swallowed, never the cancellation of the task that iterates.
            if not self._cancelled:
                raise

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    async def __aenter__(self) -> AsyncWatch[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class AsyncWorkloadApiClient:
    """asyncio client of the Workload API at ``socket`` (or SPIFFE_ENDPOINT_SOCKET).

    ``async with AsyncWorkloadApiClient() as client: svids = await client.fetch_x509_svids()``
    """

    def __init__(
        self,
        socket: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.target = grpc_target(socket, environ)
        self.address = address_of(socket, environ)
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self._workload = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)
        self._stubs = {
            "workload": self._workload,
            "revocations": revocation_pb2_grpc.RevocationsStub(self._channel),
        }

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncWorkloadApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- one-shot calls ---------------------------------------------------------------------------

    async def _first(self, spec: StreamCall[T]) -> T:
        async with self.watch(spec, self.timeout) as watch:
            async for update in watch:
                return update
        raise no_message(spec.name)

    async def fetch_x509_svids(self) -> list[X509Svid]:
        """This workload's X.509-SVIDs (the first one is the default)."""
        return await self._first(X509_SVIDS)

    async def fetch_x509_bundles(self) -> BundleSet[X509Bundle]:
        return (await self._first(X509_BUNDLES)).bundles

    async def fetch_x509_bundles_and_crls(self) -> X509BundlesUpdate:
        return await self._first(X509_BUNDLES)

    async def fetch_jwt_bundles(self) -> BundleSet[JwtBundle]:
        return await self._first(JWT_BUNDLES)

    async def fetch_jwt_svid(
        self, audience: str | Sequence[str], spiffe_id: SpiffeId | str | None = None
    ) -> JwtSvid:
        """A fresh JWT-SVID for ``audience`` (for ``spiffe_id`` if the workload has several)."""
        request = jwt_svid_request(audience, spiffe_id)
        try:
            response = await self._workload.FetchJWTSVID(
                request, metadata=METADATA, timeout=self.timeout
            )
        except grpc.RpcError as exc:
            raise translate(exc, "FetchJWTSVID", self.address) from exc
        return jwt_svid_from(response)

    async def validate_jwt_svid(self, token: str, audience: str) -> JwtSvid:
        """Ask the agent to validate ``token``; JwtSvidValidationError when it refuses."""
        try:
            await self._workload.ValidateJWTSVID(
                validate_request(token, audience), metadata=METADATA, timeout=self.timeout
            )
        except grpc.RpcError as exc:
            raise translate(exc, "ValidateJWTSVID", self.address) from exc
        return validated(token)

    # --- watchers ---

    def watch(self, spec: StreamCall[T], timeout: float | None = None) -> AsyncWatch[T]:
        method = getattr(self._stubs[spec.service], spec.method)
        call = method(spec.request(), metadata=METADATA, timeout=timeout)
        return AsyncWatch(call, spec, self.address)

    def watch_x509_svids(self) -> AsyncWatch[list[X509Svid]]:
        return self.watch(X509_SVIDS)

    def watch_x509_bundles(self) -> AsyncWatch[X509BundlesUpdate]:
        return self.watch(X509_BUNDLES)

    def watch_jwt_bundles(self) -> AsyncWatch[BundleSet[JwtBundle]]:
        return self.watch(JWT_BUNDLES)

    def watch_revocations(self) -> AsyncWatch[RevocationsUpdate]:
        return self.watch(REVOCATIONS)
