"""A real Workload API endpoint on a temp socket, run on an event loop in a background thread,
fed by a test cache and a FakeSigner over a real test CA."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

from agent_attestor.cache import Cache, SyncState
from agent_attestor.endpoint import WorkloadEndpoint
from agent_attestor.jwt_cache import JwtCache
from agent_attestor.model import Entry, Selector, TrustBundle
from agent_attestor.peer import CallerRegistry
from agent_attestor.relay import RelaySettings
from agent_attestor.rotation import Rotator
from agent_attestor.workload_api import FIRST_MESSAGE_WAIT, WorkloadApi
from agent_attestor.workload_attestor import UnixAttestor, WorkloadAttestor
from svid._clock import FakeClock
from svid._proto import workload_pb2, workload_pb2_grpc
from tests.agent_attestor.pki import FakeSigner, LocalCa
from tests.tmpdirs import short_tmpdir

T = TypeVar("T")
HEADER = (("workload.spiffe.io", "true"),)


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def fetch_ids(target: str) -> list[str] | grpc.StatusCode:
    """The SPIFFE IDs a first FetchX509SVID message over `target` carries, or its error code."""
    channel = grpc.insecure_channel(target)
    try:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        msg = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=20))
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[attr-defined,no-any-return]
    finally:
        channel.close()
    return [s.spiffe_id for s in msg.svids]


def me() -> frozenset[Selector]:
    return frozenset({Selector("unix", f"uid:{os.getuid()}")})


class Harness:
    def __init__(
        self,
        attestors: Sequence[WorkloadAttestor] | None = None,
        relay_settings: RelaySettings | None = None,
        *,
        max_prefetched: int = 0,
        on_demand: bool = False,
        first_wait: float = FIRST_MESSAGE_WAIT,
        jwt_cache_size: int = 4096,
    ) -> None:
        self.root = short_tmpdir()
        self.socket_path = self.root / "public" / "agent.sock"
        self.clock = FakeClock(start=time.time())
        self.ca = LocalCa(self.clock)
        self.signer = FakeSigner(self.ca)
        self.cache = Cache()
        self.registry = CallerRegistry()
        self.jwts = JwtCache(self.signer, self.clock, max_entries=jwt_cache_size)
        self.rotator = Rotator(self.cache, self.signer, self.clock, max_prefetched=max_prefetched)
        # on_demand: the API asks the rotator for missing SVIDs and waits for them, as the
        # agent does; run_rotator() then mints them.
        self.api = WorkloadApi(
            self.cache,
            self.registry,
            self.jwts,
            self.clock,
            demand=self.rotator if on_demand else None,
            first_wait=first_wait,
        )
        self.endpoint = WorkloadEndpoint(
            socket_path=self.socket_path,
            private_dir=self.root / "private",
            servicer=self.api,
            registry=self.registry,
            attestors=list(attestors) if attestors is not None else [UnixAttestor()],
            relay_settings=relay_settings,
        )
        self.entries: dict[str, Entry] = {}
        self.revoked: frozenset[str] = frozenset()
        self.revoked_jtis: frozenset[str] = frozenset()
        self.crl: tuple[bytes, ...] = ()
        self.federated: dict[str, TrustBundle] = {}
        self.lt = LoopThread()
        self.lt.run(self.endpoint.start())
        self.channels: list[grpc.Channel] = []

    def run_rotator(self) -> None:
        """Run the rotation loop on the harness's event loop until close()."""
        self.rotation_task = self.lt.submit(self.rotator.run())

    # ---- feeding the cache ----------------------------------------------------------------

    def sync(self, issue: bool = True) -> None:
        state = SyncState(
            entries=tuple(self.entries.values()),
            bundle=self.ca.bundle(),
            revoked_serials=self.revoked,
            revoked_jtis=self.revoked_jtis,
            crl=self.crl,
            federated=dict(self.federated),
        )
        self.lt.call(lambda: self.cache.apply_sync(state))
        if issue:
            self.lt.run(self.rotator.tick())

    def add_entry(
        self,
        path: str,
        selectors: frozenset[Selector] | None = None,
        hint: str = "",
        created_at: int | None = None,
        issue: bool = True,
        *,
        federates_with: tuple[str, ...] = (),
    ) -> Entry:
        entry_id = f"e-{len(self.entries) + 1}"
        sid = f"spiffe://{self.ca.trust_domain}{path}"
        entry = Entry(
            id=entry_id,
            spiffe_id=sid,
            selectors=selectors if selectors is not None else me(),
            hint=hint,
            created_at=created_at if created_at is not None else len(self.entries) + 1,
            federates_with=federates_with,
        )
        self.entries[entry_id] = entry
        self.signer.spiffe_ids[entry_id] = sid
        self.sync(issue)
        return entry

    def remove_entry(self, entry_id: str) -> None:
        del self.entries[entry_id]
        self.sync()

    # ---- clients --------------------------------------------------------------------------

    def channel(self) -> grpc.Channel:
        ch = grpc.insecure_channel(f"unix:{self.socket_path}")
        self.channels.append(ch)
        return ch

    def stub(self) -> workload_pb2_grpc.SpiffeWorkloadAPIStub:
        return workload_pb2_grpc.SpiffeWorkloadAPIStub(self.channel())

    def close(self) -> None:
        task = getattr(self, "rotation_task", None)
        if task is not None:
            task.cancel()
        for ch in self.channels:
            ch.close()
        self.lt.run(self.endpoint.stop(0))
        self.lt.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def x509_request() -> workload_pb2.X509SVIDRequest:
    return workload_pb2.X509SVIDRequest()
