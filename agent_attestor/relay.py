"""The public Workload API socket: accept, identify the caller, relay bytes to the internal server.

Each accepted connection is identified at once (SO_PEERCRED + attestors), recorded in the
CallerRegistry under a fresh path in the private directory, and forwarded to the internal gRPC
server from a socket bound to that path, so the server sees that path as the peer. Forwarding uses
asyncio protocols with back-pressure (pause the reader while the other side's buffer is full).

Reads go into one buffer the relay owns (`asyncio.BufferedProtocol`): a plain `Protocol` makes
the transport allocate a fresh 256 KiB object for every chunk, which cost more than the rest of
the hop for the small frames of a unary call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import stat
from collections.abc import Sequence
from pathlib import Path

from agent_attestor.errors import ConfigError
from agent_attestor.identify import identify
from agent_attestor.peer import CallerRegistry
from agent_attestor.workload_attestor import WorkloadAttestor

log = logging.getLogger(__name__)

MAX_UNIX_PATH = 107  # sun_path holds 108 bytes including the terminating NUL
_ID_BYTES = 12
READ_BUFFER = 256 * 1024  # asyncio's own read size


class _Pipe(asyncio.BufferedProtocol):
    """One direction's reader; writes into its partner's transport."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.partner: _Pipe | None = None
        self._buffer = link.relay.read_buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        # Shared by every pipe of the relay: the transport fills it and calls buffer_updated
        # before the loop runs anything else, and buffer_updated copies out what it read.
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        partner = self.partner
        if partner is not None and partner.transport is not None:
            # A copy, because a transport may keep (not copy) what it could not send at once.
            partner.transport.write(self._buffer[:nbytes].tobytes())

    def eof_received(self) -> bool:
        partner = self.partner.transport if self.partner is not None else None
        if partner is None or not partner.can_write_eof():
            return False
        partner.write_eof()
        self.link.eofs += 1
        if self.link.eofs >= 2:  # both directions finished: nothing more can flow
            partner.close()
            return False
        return True

    def pause_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.close()
        self.link.side_closed()


class _Link:
    """A relayed connection: the workload side, the internal side, and the registry entry."""

    def __init__(self, relay: WorkloadRelay) -> None:
        self.relay = relay
        self.outer: _Pipe = _Outer(self)
        self.inner = _Pipe(self)
        self.outer.partner = self.inner
        self.inner.partner = self.outer
        self.binding: str | None = None
        self.eofs = 0

    def side_closed(self) -> None:
        self.release()

    def release(self) -> None:
        # The bound file stays while the connection lives: nobody (not even a process of the
        # agent's own user) can bind the same name and be taken for this caller.
        if self.binding is not None:
            self.relay.registry.remove(self.binding)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.binding)
            self.binding = None
        self.relay.links.discard(self)


class WorkloadRelay:
    """Owns the public socket; everything behind it is the internal gRPC server."""

    def __init__(
        self,
        public_path: Path,
        internal_path: Path,
        bind_dir: Path,
        registry: CallerRegistry,
        attestors: Sequence[WorkloadAttestor],
    ) -> None:
        self.public_path = public_path
        self.internal_path = internal_path
        self.bind_dir = bind_dir
        self.registry = registry
        self.attestors = list(attestors)
        self.links: set[_Link] = set()
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        for key, path in (("socket_path", public_path), ("private_dir", internal_path)):
            if len(str(path).encode()) > MAX_UNIX_PATH:
                raise ConfigError(f"{key}: {path} is longer than {MAX_UNIX_PATH} bytes")
        longest = len(str(bind_dir / ("x" * 2 * _ID_BYTES)).encode())
        if longest > MAX_UNIX_PATH:
            raise ConfigError(f"private_dir: {bind_dir} leaves no room for connection sockets")

    async def start(self) -> None:
        self.bind_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.bind_dir, 0o700)
        for stale in self.bind_dir.iterdir():  # left by an agent that did not stop cleanly
            with contextlib.suppress(OSError):
                stale.unlink()
        self.public_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.public_path).st_mode):
                self.public_path.unlink()
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.public_path))
        os.chmod(self.public_path, 0o777)  # noqa: S103 - any local process may ask; the kernel says who it is
        sock.listen(1024)
        sock.setblocking(False)
        self._server = await loop.create_unix_server(self._accepted, sock=sock)

    def _accepted(self) -> asyncio.BaseProtocol:
        link = _Link(self)
        self.links.add(link)
        task = asyncio.get_running_loop().create_task(self._connect_inner(link))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return link.outer

    async def _connect_inner(self, link: _Link) -> None:
        # The outer transport exists once connection_made ran, which precedes this task's start.
        await asyncio.sleep(0)
        outer = link.outer.transport
        if outer is None:
            link.release()
            return
        sock = outer.get_extra_info("socket")
        conn_id = secrets.token_hex(_ID_BYTES)
        binding = str(self.bind_dir / conn_id)
        try:
            caller = await asyncio.to_thread(identify, sock, conn_id, self.attestors)
            inner_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                inner_sock.bind(binding)
                inner_sock.setblocking(False)
                self.registry.add(binding, caller)
                link.binding = binding
                await asyncio.get_running_loop().sock_connect(inner_sock, str(self.internal_path))
            except BaseException:
                inner_sock.close()
                raise
            await asyncio.get_running_loop().create_unix_connection(
                lambda: link.inner, sock=inner_sock
            )
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):
                log.warning("relay could not serve a connection", extra={"error": str(exc)})
            if link.outer.transport is not None:
                link.outer.transport.close()
            link.release()
            if not isinstance(exc, Exception):
                raise
            return
        if link.outer.transport is None:  # the workload hung up while we were attesting
            if link.inner.transport is not None:
                link.inner.transport.close()
            return
        link.outer.transport.resume_reading()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for link in list(self.links):
            for side in (link.outer, link.inner):
                if side.transport is not None:
                    side.transport.abort()
            link.release()
        with contextlib.suppress(FileNotFoundError):
            self.public_path.unlink()


class _Outer(_Pipe):
    """The workload side: reading stays paused until the inner side is connected."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
