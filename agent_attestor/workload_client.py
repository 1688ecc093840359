"""A small Workload API client for the CLI's `api`, `task` and `healthcheck` commands (sync grpc).

Every failure is an AgentError whose one-line message names the socket, where that address came
from (--socket-path, SPIFFE_ENDPOINT_SOCKET or the default) and what to try.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc  # type: ignore[import-untyped]

from agent_attestor.config import DEFAULT_SOCKET
from agent_attestor.errors import AgentError, ConfigError
from svid._proto import task_pb2, task_pb2_grpc, workload_pb2, workload_pb2_grpc
from svid._unix_socket import (
    SocketProblem,
    grpc_unix_target,
    socket_problem,
    unix_uri,
    unix_uri_path,
)
from svid._workload_address import ENV_SOCKET, WorkloadApiAddressError, grpc_target
from svid._workload_errors import unreachable

HEADER = (("workload.spiffe.io", "true"),)
M = TypeVar("M")
_CHECK = f"is svid-agent running? Check --socket-path or {ENV_SOCKET} (unix:///path/to/api.sock)"


class WorkloadApiError(AgentError):
    """The agent answered with an error status; the message carries code and details."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class AgentUnreachableError(AgentError):
    """No agent answered at the endpoint; the message says where and what to try."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where the CLI looks for the agent, and why there (for messages)."""

    target: str  # the gRPC target
    origin: str  # "--socket-path", "SPIFFE_ENDPOINT_SOCKET" or "the default ..."
    path: Path | None  # the Unix socket, None for tcp://

    def __str__(self) -> str:
        return f"{self.path if self.path is not None else self.target} (from {self.origin})"


def endpoint(socket_path: Path | None) -> Endpoint:
    """--socket-path, else SPIFFE_ENDPOINT_SOCKET, else the default path."""
    if socket_path is not None:
        path = socket_path.resolve()
        return Endpoint(grpc_unix_target(path), "--socket-path", path)
    value = os.environ.get(ENV_SOCKET, "")
    if not value:
        return Endpoint(
            grpc_unix_target(DEFAULT_SOCKET),
            f"the default; {ENV_SOCKET} is not set",
            DEFAULT_SOCKET,
        )
    try:
        target = grpc_target(value)
    except WorkloadApiAddressError as exc:
        raise ConfigError(f"{ENV_SOCKET}: {exc}") from None
    # The socket checked is the one gRPC will open: the URI's path decoded (a space is "%20").
    unix = unix_uri_path(target.removeprefix("unix://")) if target.startswith("unix://") else None
    return Endpoint(target, ENV_SOCKET, unix)


def check_socket(where: Endpoint) -> None:
    """Fail fast, naming the problem, when a Unix endpoint cannot be an agent's socket.

    gRPC would only say "failed to connect", or for some of these keep retrying until the
    deadline; the file system can say exactly what is wrong.
    """
    problem = socket_problem(where.path) if where.path is not None else None
    if problem is SocketProblem.MISSING:
        raise AgentUnreachableError(f"no socket at {where}: {_CHECK}")
    if problem is SocketProblem.NOT_A_SOCKET:
        raise AgentUnreachableError(f"{where} {problem.value}: {_CHECK}")
    if problem is not None:
        raise AgentUnreachableError(
            f"cannot open {where}: {problem.value}; run as a user the agent serves"
        )


def socket_uri(path: Path) -> str:
    return unix_uri(path.resolve())


class WorkloadClient:
    def __init__(self, where: Endpoint, timeout: float = 10.0) -> None:
        check_socket(where)
        self._where = where
        self._channel = grpc.insecure_channel(where.target)
        self._stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(self._channel)
        self._tasks = task_pb2_grpc.TasksStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> WorkloadClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, exc: grpc.RpcError) -> AgentError:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        details: str = exc.details() or ""  # type: ignore[attr-defined]
        message = unreachable(
            code,
            details,
            str(self._where),
            daemon="svid-agent",
            check=_CHECK,
            timeout=self._timeout,
        )
        if message is not None:
            return AgentUnreachableError(message)
        return WorkloadApiError(code, details)

    def health(self) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        try:
            reply = self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._timeout
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return reply.status  # type: ignore[no-any-return]

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
        # The stream itself has no deadline (it is meant to stay open), so first make sure,
        # within the timeout, that an agent answers at all: a hung one must not hang the CLI.
        # Any status is an answer (an agent without the health service says UNIMPLEMENTED).
        with contextlib.suppress(WorkloadApiError):
            self.health()
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

    def end_task(self, task_id: str, reason: str = "") -> task_pb2.Task:
        try:
            resp: task_pb2.EndTaskResponse = self._tasks.EndTask(
                task_pb2.EndTaskRequest(task_id=task_id, reason=reason),
                metadata=HEADER,
                timeout=self._timeout,
            )
        except grpc.RpcError as exc:
            raise self._error(exc) from exc
        return resp.task

    def list_tasks(
        self, *, state: str = "", spiffe_id: str = "", page_size: int = 0
    ) -> list[task_pb2.Task]:
        """Every task of the caller's (or of its identity `spiffe_id`), page after page."""
        request = task_pb2.ListTasksRequest(state=state, spiffe_id=spiffe_id, page_size=page_size)
        tasks: list[task_pb2.Task] = []
        while True:
            try:
                resp: task_pb2.ListTasksResponse = self._tasks.ListTasks(
                    request, metadata=HEADER, timeout=self._timeout
                )
            except grpc.RpcError as exc:
                raise self._error(exc) from exc
            tasks.extend(resp.tasks)
            if not resp.next_page_token:
                return tasks
            request.page_token = resp.next_page_token
