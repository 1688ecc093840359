"""The Workload API endpoint: the internal gRPC server in a private directory, behind the relay."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc

from agent_attestor.errors import ConfigError
from agent_attestor.h2_settings import STREAMS_ADVERTISED, STREAMS_ALLOWED
from agent_attestor.peer import CallerRegistry
from agent_attestor.relay import RelaySettings, WorkloadRelay, refuse_live_socket
from agent_attestor.safe_dir import secure_dir
from agent_attestor.workload_attestor import WorkloadAttestor
from svid._clock import Clock
from svid._proto import workload_pb2_grpc
from svid._workload_calls import KEEPALIVE_MS

# The largest request any service on the socket takes, with room to spare: a ValidateJWTSVID
# of a 64 KiB token (svid._jwt.MAX_TOKEN_BYTES) and a 1 KiB audience, or a BeginTask of a 64 KiB
# goal (tasks/api.py MAX_GOAL) and its intent's few KiB. grpcio buffers a request whole before
# any handler (or check of header or caller) runs, on each stream of a connection of anyone:
# this bound times STREAMS_ALLOWED (+1) is what one connection can make the agent hold.
MAX_MESSAGE = 80 * 1024
# Each open stream holds memory and a subscription here, and each may hold a request of up to
# MAX_MESSAGE before any check. A workload is told it may open MAX_STREAMS_PER_CONNECTION at
# once; the server holds up to STREAMS_ALLOWED (h2_settings.py: room for streams closed that
# grpc.aio has not let go of yet, which it refused otherwise, spurious UNAVAILABLEs). With a
# uid's 128 connections (max_connections_per_uid), 49 streams a connection bound what any local
# user can make the agent buffer to 490 MiB (25 on 256 connections held 500 MiB; 100, 2 GiB).
# Past the advertised count, HTTP/2 makes its client wait for one of its streams to close.
# grpcio shares one connection among a process's channels to the socket: svid's clients each
# take their own, and py-spiffe's sources, which share one, hold a stream each, so twenty fit
# beside a call.
MAX_STREAMS_PER_CONNECTION = STREAMS_ADVERTISED
# The internal server's gRPC options (bench/test_bench_agent.py gives its no-op baseline the same).
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.so_reuseport", 0),
    ("grpc.max_concurrent_streams", STREAMS_ALLOWED),
    # svid's clients ping every KEEPALIVE_MS on a quiet stream, to find a hung agent: at gRPC's
    # default (pings 5 min apart) each such connection got GOAWAY too_many_pings in 15 s.
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
)


def prepare_private_dir(path: Path) -> None:
    """Create (or check) a directory only the agent's user can enter, in directories no other
    user may change: one who could rename it would put its own internal socket in its place,
    and the relay, connecting by path, would hand that user every identified workload."""
    # Parents made 0755, not 0700: the socket's directory may be among them.
    secure_dir(path.parent, "private_dir", 0o755)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"private_dir: {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"private_dir: {path} is owned by uid {st.st_uid}, not the agent's")
    os.chmod(path, 0o700)


class WorkloadEndpoint:
    def __init__(
        self,
        *,
        socket_path: Path,
        private_dir: Path,
        servicer: workload_pb2_grpc.SpiffeWorkloadAPIServicer,
        registry: CallerRegistry,
        attestors: Sequence[WorkloadAttestor],
        extra_servicers: Sequence[Callable[[grpc.aio.Server], None]] = (),
        relay_settings: RelaySettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.private_dir = private_dir
        self.internal_path = private_dir / "api.sock"
        self._servicer = servicer
        self._extra = list(extra_servicers)
        self.registry = registry
        self.relay = WorkloadRelay(
            socket_path,
            self.internal_path,
            registry,
            attestors,
            settings=relay_settings,
            clock=clock,
        )
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        # Before anything is made: a running agent's socket at our path is a refusal.
        refuse_live_socket(self.socket_path)
        prepare_private_dir(self.private_dir)
        with contextlib.suppress(FileNotFoundError):
            self.internal_path.unlink()
        server = grpc.aio.server(options=list(SERVER_OPTIONS))
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(self._servicer, server)
        for add in self._extra:  # other services on the same socket (health, tasks, ...)
            add(server)
        server.add_insecure_port(f"unix:{self.internal_path}")
        await server.start()
        self._server = server
        os.chmod(self.internal_path, 0o600)
        try:
            await self.relay.start()
        except BaseException:
            # Refused (the socket's path taken, unsafe, unbindable): the internal server goes
            # too, not left to grpc's finaliser, which prints a traceback under the refusal.
            await self.stop(0)
            raise

    async def stop(self, grace: float = 1.0) -> None:
        await self.relay.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
