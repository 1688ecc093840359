"""A fake SPIFFE agent for tests: a real gRPC SpiffeWorkloadAPI (and revocation stream) server on a
temp Unix socket, serving whatever its State holds; every change wakes its streams."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from svid import X509Svid, sign_jws
from svid._proto import (
    revocation_pb2,
    revocation_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
    workload_pb2,
    workload_pb2_grpc,
)
from svid._workload_calls import KEEPALIVE_MS
from tests.svid.certs import Issued
from tests.waits import wait_for

WAIT = 10.0


def eventually(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Bounded polling for background threads (real sockets, real threads)."""
    return wait_for(predicate, timeout, what, interval=0.01)


def signed_crl(issuer: Issued, serials: list[int], next_update: float | None = None) -> bytes:
    """A CRL of ``issuer`` listing ``serials``, promising the next by ``next_update`` (a
    timestamp; default: in an hour)."""
    now = dt.datetime.now(dt.UTC)
    until = (
        now + dt.timedelta(hours=1)
        if next_update is None
        else dt.datetime.fromtimestamp(next_update, tz=dt.UTC)
    )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(min(now, until))
        .next_update(until)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    crl = builder.sign(issuer.key, hashes.SHA256())  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.DER)


# The runtime identity FakeTasks begins every task under.
TASK_RUNTIME = "spiffe://example.org/agents/bot"


@dataclass
class State:
    """What the fake agent serves; every change wakes the streams (full state each message)."""

    x509: dict[str, bytes] = field(default_factory=dict)
    crls: list[bytes] = field(default_factory=list)
    jwt: dict[str, bytes] = field(default_factory=dict)
    revoked: list[revocation_pb2.Revoked] = field(default_factory=list)
    # What the Tasks service lists (the server's word on them, as the agent forwards it).
    tasks: list[task_pb2.Task] = field(default_factory=list)
    svid_chain: bytes = b""
    svid_key: bytes = b""
    svids: list[X509Svid] | None = None  # when set, served instead of svid_chain / svid_key
    jwt_key: ec.EllipticCurvePrivateKey | None = None
    deny: bool = False
    headers: list[tuple[str, str]] = field(default_factory=list)
    version: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)

    def change(self, **values: Any) -> None:
        with self.cond:
            for k, v in values.items():
                setattr(self, k, v)
            self.version += 1
            self.cond.notify_all()


class FakeAgent(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    def __init__(self, state: State) -> None:
        self.s = state

    def _check(self, context: grpc.ServicerContext) -> None:
        md = tuple(context.invocation_metadata() or ())
        self.s.headers.extend((k, v) for k, v in md if k == "workload.spiffe.io")
        if ("workload.spiffe.io", "true") not in md:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing")
        if self.s.deny:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")

    def _stream(self, context: grpc.ServicerContext, make: Callable[[], Any]) -> Iterator[Any]:
        self._check(context)
        seen = -1
        while context.is_active():
            with self.s.cond:
                if self.s.version == seen:
                    self.s.cond.wait(0.05)
                    continue
                seen = self.s.version
                deny = self.s.deny
                msg = None if deny else make()
            if deny:  # as the agent does once a caller has no identity left
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            yield msg

    def FetchX509SVID(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        return self._stream(context, self._x509_svids)

    def _x509_svids(self) -> Any:
        if self.s.svids is None:
            svids = [
                workload_pb2.X509SVID(
                    spiffe_id="spiffe://example.org/workload",
                    x509_svid=self.s.svid_chain,
                    x509_svid_key=self.s.svid_key,
                    bundle=self.s.x509.get("spiffe://example.org", b""),
                    hint="internal",
                )
            ]
        else:
            svids = [
                workload_pb2.X509SVID(
                    spiffe_id=str(s.spiffe_id),
                    x509_svid=s.chain_der(),
                    x509_svid_key=s.key_der(),
                    bundle=self.s.x509.get(s.spiffe_id.trust_domain.id.__str__(), b""),
                )
                for s in self.s.svids
            ]
        return workload_pb2.X509SVIDResponse(svids=svids)

    def FetchX509Bundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        return self._stream(
            context,
            lambda: workload_pb2.X509BundlesResponse(bundles=self.s.x509, crl=self.s.crls),
        )

    def FetchJWTBundles(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        return self._stream(context, lambda: workload_pb2.JWTBundlesResponse(bundles=self.s.jwt))

    def FetchJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check(context)
        if not request.audience:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        assert self.s.jwt_key is not None
        token = sign_jws(
            {"kid": "k1", "typ": "JWT"},
            {
                "sub": request.spiffe_id or "spiffe://example.org/workload",
                "aud": list(request.audience),
                "exp": int(time.time()) + 300,
            },
            self.s.jwt_key,
        )
        return workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id="spiffe://example.org/workload", svid=token)]
        )

    def ValidateJWTSVID(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check(context)
        if request.audience != "svc":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token is invalid: wrong audience")
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id="spiffe://example.org/workload")


class FakeRevocations(revocation_pb2_grpc.RevocationsServicer):  # type: ignore[misc]
    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent

    def Watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        s = self.agent.s
        return self.agent._stream(
            context,
            lambda: revocation_pb2.RevocationList(items=s.revoked, version=s.version),
        )


class FakeTasks(task_pb2_grpc.TasksServicer):  # type: ignore[misc]
    """Grants every begin (under TASK_RUNTIME), ends what it is asked to, and lists one page
    of the tasks the state holds, by state and runtime."""

    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent

    def BeginTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.agent._check(context)
        s = self.agent.s
        with s.cond:
            task_id = f"{len(s.tasks):016x}"
            parent = next((t for t in s.tasks if t.task_id == request.parent_task_id), None)
            task = task_pb2.Task(
                task_id=task_id,
                spiffe_id=f"{TASK_RUNTIME}/task/{task_id}",
                runtime_id=TASK_RUNTIME,
                actions=request.intent.actions,
                resources=request.intent.resources,
                parent_task_id=request.parent_task_id,
                depth=parent.depth + 1 if parent is not None else 0,
                state="active",
                decision="allow",
                ttl=300,
                expires_at=int(time.time()) + 300,
            )
            s.tasks.append(task)
        return task_pb2.BeginTaskResponse(task=task)

    def EndTask(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.agent._check(context)
        s = self.agent.s
        with s.cond:
            task = next((t for t in s.tasks if t.task_id == request.task_id), None)
            if task is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id!r} not found")
            if task.state == "active":
                task.state = "ended"
                task.end_reason = "ended by its runtime"
        return task_pb2.EndTaskResponse(task=task)

    def ListTasks(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.agent._check(context)
        listed = [
            t
            for t in self.agent.s.tasks
            if (not request.state or t.state == request.state)
            and (not request.spiffe_id or t.runtime_id == request.spiffe_id)
        ]
        return task_pb2.ListTasksResponse(tasks=listed)


@dataclass
class Server:
    state: State
    path: Path
    revocations: bool = True
    server: grpc.Server | None = None

    @property
    def address(self) -> str:
        return f"unix://{self.path}"

    def start(self) -> Server:
        # svid's clients ping every KEEPALIVE_MS: at gRPC's default ping policy a fake that
        # served a source longer than three pings would close its connection, as an agent did.
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            options=[("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2)],
        )
        agent = FakeAgent(self.state)
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(agent, server)
        if self.revocations:
            revocation_pb2_grpc.add_RevocationsServicer_to_server(FakeRevocations(agent), server)
        task_pb2_grpc.add_TasksServicer_to_server(FakeTasks(agent), server)
        server.add_insecure_port(self.address)
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait()
            self.server = None
