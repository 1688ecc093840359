"""A small Workload API client for the CLI's `api` commands (synchronous grpc)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from agent_attestor.config import DEFAULT_SOCKET
from agent_attestor.errors import AgentError, ConfigError
from svid._proto import task_pb2, task_pb2_grpc, workload_pb2, workload_pb2_grpc
from svid._workload_address import ENV_SOCKET, WorkloadApiAddressError, grpc_target

HEADER = (("workload.spiffe.io", "true"),)
M = TypeVar("M")


class WorkloadApiError(AgentError):
    """The agent answered with an error status; the message carries code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


def endpoint_address(socket_path: Path | None) -> str:
    """A grpc target from --socket-path, else SPIFFE_ENDPOINT_SOCKET, else the default path."""
    if socket_path is not None:
        return f"unix:{socket_path.resolve()}"
    value = os.environ.get(ENV_SOCKET, "")
    if not value:
        return f"unix:{DEFAULT_SOCKET}"
    try:
        return grpc_target(value)
    except WorkloadApiAddressError as exc:
        raise ConfigError(f"{ENV_SOCKET}: {exc}") from None


def socket_uri(path: Path) -> str:
    return f"unix://{path.resolve()}"


class WorkloadClient:
    def __init__(self, target: str, timeout: float = 10.0) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)
        self._tasks = task_pb2_grpc.TasksStub(self._channel)
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> WorkloadClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _error(exc: grpc.RpcError) -> WorkloadApiError:
        return WorkloadApiError(exc.code(), exc.details())  # type: ignore[attr-defined]

    def _first(self, stream: Any, kind: type[M]) -> M:
        """The first message of a full-state stream (it is the whole state), then hang up."""
        try:
            msg: M = next(stream)
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        finally:
            stream.cancel()
        return msg

    def fetch_x509(self) -> workload_pb2.X509SVIDResponse:
        return self._first(
            self._stub.FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=self._timeout
            ),
            workload_pb2.X509SVIDResponse,
        )

    def fetch_x509_bundles(self) -> workload_pb2.X509BundlesResponse:
        return self._first(
            self._stub.FetchX509Bundles(
                workload_pb2.X509BundlesRequest(), metadata=HEADER, timeout=self._timeout
            ),
            workload_pb2.X509BundlesResponse,
        )

    def watch_x509(self) -> Iterator[workload_pb2.X509SVIDResponse]:
        stream = self._stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
        try:
            yield from stream
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        finally:
            stream.cancel()

    def fetch_jwt(self, audience: list[str], spiffe_id: str = "") -> workload_pb2.JWTSVIDResponse:
        try:
            resp: workload_pb2.JWTSVIDResponse = self._stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(audience=audience, spiffe_id=spiffe_id),
                metadata=HEADER,
                timeout=self._timeout,
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return resp

    def validate_jwt(self, audience: str, token: str) -> workload_pb2.ValidateJWTSVIDResponse:
        try:
            valid: workload_pb2.ValidateJWTSVIDResponse = self._stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token),
                metadata=HEADER,
                timeout=self._timeout,
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return valid

    def begin_task(self, request: task_pb2.BeginTaskRequest) -> task_pb2.Task:
        try:
            resp: task_pb2.BeginTaskResponse = self._tasks.BeginTask(
                request, metadata=HEADER, timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return resp.task

    def end_task(self, task_id: str) -> task_pb2.Task:
        try:
            resp: task_pb2.EndTaskResponse = self._tasks.EndTask(
                task_pb2.EndTaskRequest(task_id=task_id), metadata=HEADER, timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return resp.task

    def list_tasks(self) -> list[task_pb2.Task]:
        try:
            resp: task_pb2.ListTasksResponse = self._tasks.ListTasks(
                task_pb2.ListTasksRequest(), metadata=HEADER, timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return list(resp.tasks)
