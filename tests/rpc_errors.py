"""The gRPC failures a fake of a server's client raises: what the real grpc.aio client raises
when the server refuses, or cannot be reached."""

from __future__ import annotations

import grpc


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
