"""The public Workload API socket: accept, identify the caller, relay bytes to the internal server.

Each accepted connection is admitted or refused by its uid (admission.py), identified on a pool
of its own with a share per uid and a deadline (SO_PEERCRED + attestors), recorded in the
CallerRegistry under a fresh Linux abstract socket name, and forwarded to the internal gRPC
server from a socket bound to that name, so the server sees that name as the peer (peer.py says
why an abstract name cannot be taken over). Forwarding uses asyncio protocols with back-pressure
(pause the reader while the other side's buffer is full).

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
import select
import socket
import stat
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent_attestor.admission import Admission, capacity_for
from agent_attestor.errors import ConfigError
from agent_attestor.h2_meter import FrameMeter
from agent_attestor.h2_settings import SettingsRewriter
from agent_attestor.identify import caller_log, identify, peer_credentials
from agent_attestor.identify_pool import IdentifyPool
from agent_attestor.peer import Caller, CallerRegistry, abstract_peer
from agent_attestor.safe_dir import secure_dir
from agent_attestor.unix_diag import UnixDiagError, peer_inode
from agent_attestor.workload_attestor import WorkloadAttestor
from svid._clock import Clock, SystemClock
from svid._descriptors import raise_descriptor_limit
from svid._log_throttle import ThrottledLines
from svid._unix_socket import MAX_UNIX_PATH, is_listening, unix_path_size

log = logging.getLogger(__name__)

_ID_BYTES = 12
READ_BUFFER = 256 * 1024  # asyncio's own read size
ACCEPT_BATCH = 64
ACCEPT_RETRY_DELAY = 0.1  # seconds; asyncio's server waits 1 s
PUBLIC_DIR_MODE = 0o755  # for directories the relay makes: any local process may connect
REFUSAL_LINGER = 1.0  # seconds a refused connection is held for its workload to read why
REFUSALS_HELD = 32  # refused connections held at once: descriptors out of FD_HEADROOM
OVERSPENT = (
    "closed: more HTTP/2 control frames (pings, resets, settings), or frames in all, than a "
    "gRPC client sends"
)
# HTTP/2 GOAWAY (RFC 9113 6.8), error ENHANCE_YOUR_CALM, on stream 0 with last stream 0.
_GOAWAY = 0x7
_ENHANCE_YOUR_CALM = 0xB
# A workload that closed its end (or shut down its writing): nothing it sends can come any more.
_PEER_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR
# Seconds between two looks of one uid at its connections for ones its workloads closed: a look
# polls each of them (~70 us for 256), and a uid at its maximum may connect in a loop.
REAP_INTERVAL = 0.01


@dataclass(frozen=True, slots=True)
class RelaySettings:
    # Each connection holds up to h2_settings.STREAMS_ALLOWED streams (endpoint.py).
    max_connections_per_uid: int = 128
    max_connections: int = 0  # 0: as many as the descriptor limit carries (admission.py)
    identify_timeout: float = 10.0  # seconds a connection may wait to be identified
    identify_threads: int = 6
    identify_per_uid: int = 2  # identifications of one uid running at once
    socket_dir_shared: bool = False  # the socket's own directory may have other writers


def _check_peer_lookup() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        try:
            peer_inode(a)
        except UnixDiagError as exc:
            log.warning(
                "callers will get no unix:path or unix:sha256 selectors: the kernel cannot "
                "name a connection's client end (sock_diag, CONFIG_UNIX_DIAG)",
                extra={"error": str(exc)},
            )


class _Descriptor:
    """A duplicate of a connection's descriptor that exactly one side closes: the identify
    thread if it started, else the relay.

    Identification reads its own duplicate because the relay may close the original (deadline,
    hang-up) while a thread still reads, and a number the kernel reuses for another connection
    must never be read as this one."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            fd, self._fd = self._fd, None
        return fd

    def close(self) -> None:
        fd = self.take()
        if fd is not None:
            os.close(fd)


def _identify_copy(
    copy: _Descriptor,
    conn_id: str,
    attestors: Sequence[WorkloadAttestor],
    lines: ThrottledLines,
) -> Caller:
    fd = copy.take()
    if fd is None:
        raise ConnectionAbortedError("the connection was given up before identification")
    with socket.socket(fileno=fd) as sock:
        return identify(sock, conn_id, attestors, lines)


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

    def __init__(self, relay: WorkloadRelay, uid: int, conn: socket.socket) -> None:
        self.relay = relay
        self.conn = conn  # the workload's end; its transport closes this very object
        self.outer = _Outer(self)
        self.inner = _Inner(self)
        self.outer.partner = self.inner
        self.inner.partner = self.outer
        self.peer: str | None = None
        self.uid: int | None = uid  # admitted; counted until released
        self.eofs = 0

    def side_closed(self) -> None:
        self.release()

    def evict(self) -> None:
        """Close both sides now and stop counting the connection, without waiting for the
        internal server to answer the workload's hang-up."""
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)
        for side in (self.outer, self.inner):
            if side.transport is not None:
                side.transport.abort()
        self.release()

    def forget(self) -> None:
        """Remove the registry entry. Always before the inner socket (and so its abstract name)
        is closed: a name that is free again must already map to nobody."""
        if self.peer is not None:
            self.relay.registry.remove(self.peer)
            self.peer = None

    def release(self) -> None:
        self.forget()
        if self.uid is not None:
            self.relay.admission.release(self.uid)
            held = self.relay.links_of.get(self.uid)
            if held is not None:
                held.discard(self)
                if not held:
                    del self.relay.links_of[self.uid]
                    self.relay.reaped_at.pop(self.uid, None)
            self.uid = None
        self.relay.links.discard(self)


class WorkloadRelay:
    """Owns the public socket; everything behind it is the internal gRPC server."""

    def __init__(
        self,
        public_path: Path,
        internal_path: Path,
        registry: CallerRegistry,
        attestors: Sequence[WorkloadAttestor],
        *,
        settings: RelaySettings | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.public_path = public_path
        self.internal_path = internal_path
        self.registry = registry
        self.attestors = list(attestors)
        self.settings = settings or RelaySettings()
        self.clock = clock or SystemClock()
        self.links: set[_Link] = set()
        self.links_of: dict[int, set[_Link]] = {}  # the admitted links, by uid
        self.reaped_at: dict[int, float] = {}  # when _reap_gone last looked, by uid with links
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        self.pool = IdentifyPool(self.settings.identify_threads, self.settings.identify_per_uid)
        self._caller_log = caller_log(self.clock)
        # Replaced in start(), once the descriptor limit is known.
        self.admission = Admission(self.settings.max_connections_per_uid, 1, self.clock)
        # Names differ between agents on one host; conn ids are unguessable within one.
        self._name_prefix = f"svid-agent/{os.getpid()}/"
        self._listener: socket.socket | None = None
        self._bound: tuple[int, int] | None = None  # the socket file bound: (st_dev, st_ino)
        self._tasks: set[asyncio.Task[None]] = set()
        self._refused: dict[int, socket.socket] = {}  # refused connections told why, by fd
        for key, path in (("socket_path", public_path), ("private_dir", internal_path)):
            if unix_path_size(path) > MAX_UNIX_PATH:
                raise ConfigError(f"{key}: {path} is longer than {MAX_UNIX_PATH} bytes")

    async def start(self) -> None:
        _check_peer_lookup()
        limit = raise_descriptor_limit()
        capacity = self.settings.max_connections or capacity_for(limit)
        if capacity > capacity_for(limit):
            log.warning(
                "max_connections is more than the descriptor limit carries",
                extra={"max_connections": capacity, "descriptor_limit": limit},
            )
        elif capacity < self.settings.max_connections_per_uid:
            # Said at start: under a small LimitNOFILE (or container ulimit) the agent took a
            # capacity of a few connections, or one, and said so only as it refused callers.
            log.warning(
                "the descriptor limit leaves room for fewer Workload API connections than one "
                "uid may hold: raise the hard RLIMIT_NOFILE (LimitNOFILE) or lower "
                "max_connections_per_uid",
                extra={
                    "max_connections": capacity,
                    "max_connections_per_uid": self.settings.max_connections_per_uid,
                    "descriptor_limit": limit,
                },
            )
        self.admission = Admission(self.settings.max_connections_per_uid, capacity, self.clock)
        # Checked before binding: a directory on the way that another user may write is one
        # where that user can put its own socket in place of ours (safe_dir.py).
        shared = self.settings.socket_dir_shared
        where = secure_dir(self.public_path.parent, "socket_path", PUBLIC_DIR_MODE, shared=shared)
        mode = stat.S_IMODE(os.stat(where).st_mode)
        if shared and mode & 0o022:
            log.warning(
                "socket_dir_shared: the Workload API socket's directory may be written by "
                "others; whoever can write it can put a socket of its own in the agent's place",
                extra={"directory": str(where), "mode": f"{mode:04o}"},
            )
        _clear_stale_socket(self.public_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.public_path))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"socket_path: cannot listen on {self.public_path} ({exc.strerror or exc})"
            ) from None
        self._bound = _file_identity(self.public_path)
        os.chmod(self.public_path, 0o777)  # noqa: S103 - any local process may ask; the kernel says who it is
        sock.listen(1024)
        sock.setblocking(False)
        self._listener = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_ready)

    def _accept_ready(self) -> None:
        """Accept one connection at a time and refuse it at once if its uid may not have it.

        Our own accept loop rather than asyncio's server: that one accepts a whole batch before
        any protocol runs, so a flood would hold a batch of descriptors before the first refusal
        closed one; here a refused connection is closed before the next is accepted."""
        listener = self._listener
        if listener is None:
            return
        for _ in range(ACCEPT_BATCH):  # then let the loop run other work
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors or memory despite the capacity: wait instead of spinning.
                self.admission.log_refusal(-1, f"accept failed: {exc.strerror}")  # -1: no caller
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener.fileno())
                loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)
                return
            try:
                _, uid, _ = peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            if self.admission.decide(uid) is not None:
                self._reap_gone(uid)
            if not self.admission.admit(uid):
                refusal = self.admission.decide(uid)
                self._refuse(conn, refusal.reason if refusal else "refused")
                continue
            conn.setblocking(False)
            link = _Link(self, uid, conn)
            self.links.add(link)
            self.links_of.setdefault(uid, set()).add(link)
            task = asyncio.get_running_loop().create_task(self._serve(link, conn, uid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        """Tell the workload why (refusal_frame) and close the connection.

        Closed at once, the workload's write of its HTTP/2 preface could fail (EPIPE) before it
        read the frame, and it said "Broken pipe" instead: the descriptor is held until the
        workload hangs up, for at most REFUSAL_LINGER seconds and for REFUSALS_HELD
        connections at once, past which one is closed at once, the reason maybe unread."""
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(refusal_frame(reason))  # a few bytes: a fresh socket's buffer takes them
            conn.shutdown(socket.SHUT_WR)
            if len(self._refused) < REFUSALS_HELD:
                loop = asyncio.get_running_loop()
                fd = conn.fileno()
                self._refused[fd] = conn
                loop.add_reader(fd, self._drain_refused, fd)
                loop.call_later(REFUSAL_LINGER, self._drop_refused, fd, conn)
                return
        conn.close()

    def _drain_refused(self, fd: int) -> None:
        conn = self._refused.get(fd)
        if conn is None:
            return
        try:
            if conn.recv(4096):
                return  # its preface; the frame it reads next says why
        except BlockingIOError:
            return
        except OSError:
            pass
        self._drop_refused(fd, conn)

    def _drop_refused(self, fd: int, conn: socket.socket) -> None:
        if self._refused.get(fd) is not conn:  # gone already, its number maybe reused
            return
        del self._refused[fd]
        asyncio.get_running_loop().remove_reader(fd)
        conn.close()

    def _reap_gone(self, uid: int) -> None:
        """Stop counting `uid`'s connections whose workload end is already closed.

        The relay counts a connection until both its sides have closed, and the internal
        server's side closes only after it has read the workload's hang-up. After a pause of
        the agent (SIGSTOP, a stalled host) each workload whose keepalive ping went unanswered
        closed its connection and opened a new one, and the new ones sat in the listen backlog
        next to the hang-ups of the old: accepted first, they were refused at the uid's
        maximum for connections that were already dead. Only `uid`'s own connections are
        looked at, so no caller can push out another uid's; and only ones its workload closed
        or shut down for writing, so a uid still holds no more than its maximum of live ones,
        and only ones relayed already (see below).

        At most once per REAP_INTERVAL for a uid: what was closed before the first refusal is
        found at once, what closes later is read by the loop as ever, and a uid's loop of
        connections refused one by one costs no more than their refusals."""
        links = list(self.links_of.get(uid, ()))
        now = self.clock.monotonic()
        last = self.reaped_at.get(uid)
        if not links or (last is not None and now - last < REAP_INTERVAL):
            return
        self.reaped_at[uid] = now
        poller = select.poll()
        by_fd: dict[int, _Link] = {}
        for link in links:
            if link.inner.transport is None:
                # Still identified: its duplicate descriptor is held until identification
                # ends, so it stays counted until then, closed or not.
                continue
            fd = link.conn.fileno()
            if fd < 0:  # closed already; its connection_lost is on its way
                link.evict()
                continue
            by_fd[fd] = link
            poller.register(fd, _PEER_GONE)
        for fd, events in poller.poll(0):
            if events & _PEER_GONE:
                by_fd[fd].evict()

    def _resume_accepting(self) -> None:
        if self._listener is not None:
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept_ready)

    async def _serve(self, link: _Link, conn: socket.socket, uid: int) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: link.outer, conn)
        except BaseException:
            conn.close()
            link.release()
            raise
        await self._connect_inner(link, uid)

    async def _connect_inner(self, link: _Link, uid: int) -> None:
        outer = link.outer.transport
        if outer is None:
            link.release()
            return
        loop = asyncio.get_running_loop()
        conn_id = secrets.token_hex(_ID_BYTES)
        name = self._name_prefix + conn_id
        try:
            copy = _Descriptor(os.dup(outer.get_extra_info("socket").fileno()))
            try:
                caller = await asyncio.wait_for(
                    self.pool.run(
                        uid,
                        lambda: _identify_copy(copy, conn_id, self.attestors, self._caller_log),
                    ),
                    self.settings.identify_timeout,
                )
            except TimeoutError:
                self.admission.log_refusal(uid, "identification did not finish in time")
                raise
            finally:
                copy.close()
            inner_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                inner_sock.bind(b"\0" + name.encode())
                inner_sock.setblocking(False)
                self.registry.add(abstract_peer(name), caller)
                link.peer = abstract_peer(name)
                await loop.sock_connect(inner_sock, str(self.internal_path))
                await loop.create_unix_connection(lambda: link.inner, sock=inner_sock)
            except BaseException:
                link.forget()
                inner_sock.close()
                raise
        except BaseException as exc:
            if isinstance(exc, Exception) and not isinstance(exc, TimeoutError):
                log.warning("relay could not serve a connection", extra={"error": str(exc)})
            if link.outer.transport is not None:
                # Shut the socket itself down: an identify thread may still hold a duplicate,
                # and closing our descriptor alone would leave the workload connected.
                with contextlib.suppress(OSError):
                    link.outer.transport.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
                link.outer.transport.abort()
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
        if self._listener is not None:
            asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        for task in list(self._tasks):
            task.cancel()
        for fd, conn in list(self._refused.items()):
            self._drop_refused(fd, conn)
        for link in list(self.links):
            for side in (link.outer, link.inner):
                if side.transport is not None:
                    side.transport.abort()
            link.release()
        self.pool.shutdown()
        # An identification already running ends by itself: wait for it, as long as a caller
        # would, so that nothing of the relay works (or logs) once it is closed. A hung one
        # does not hold the close up longer than that.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.to_thread(self.pool.join), self.settings.identify_timeout
            )
        # Only the socket this relay bound: one at its path now is another agent's, started
        # on the path after this one's was removed.
        if self._bound is not None and _file_identity(self.public_path) == self._bound:
            with contextlib.suppress(FileNotFoundError):
                self.public_path.unlink()
        self._bound = None


def refusal_frame(reason: str) -> bytes:
    """A GOAWAY frame saying why, as the first (and only) frame the workload gets.

    gRPC clients name a first frame that is no SETTINGS in their error (svid/_workload_errors.py
    maps it to "refused"), where a connection closed at once read as "Connection reset by peer"
    and the hint "is the SPIFFE agent running". A SETTINGS frame first would make the refusal a
    GOAWAY of an open connection, which gRPC retries silently until the call's deadline."""
    debug = reason.encode()[:512]
    payload = struct.pack(">II", 0, _ENHANCE_YOUR_CALM) + debug
    return (
        struct.pack(">I", len(payload))[1:] + bytes((_GOAWAY, 0)) + struct.pack(">I", 0) + payload
    )


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def refuse_live_socket(path: Path) -> None:
    """A socket at `path` that still takes a connection is a running agent's, and refused:
    replaced, its workloads found this agent's socket instead, and this agent's stop removed it,
    leaving that one serving no one. Anything else at `path` is refused too."""
    if _is_live_socket(path):
        raise ConfigError(
            f"socket_path: another agent is listening on {path}: stop it first, or give this "
            "agent a socket_path of its own"
        )


def _clear_stale_socket(path: Path) -> None:
    """Remove the socket a stopped agent left at `path` (one killed could not), refusing a
    running one's, or anything at `path` that is no socket."""
    refuse_live_socket(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _is_live_socket(path: Path) -> bool:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        # bind() said only "Address already in use", as if an agent listened there.
        what = "a directory" if stat.S_ISDIR(mode) else "not a socket"
        raise ConfigError(f"socket_path: {path} exists and is {what}")
    # Its backlog full is a running agent, however busy (read as "no one listens", the running
    # agent's socket was taken over).
    return is_listening(path)


class _Outer(_Pipe):
    """The workload side: reading stays paused until the inner side is connected, and what the
    workload sends is metered (h2_meter.py) before the internal server parses it."""

    def __init__(self, link: _Link) -> None:
        super().__init__(link)
        self.meter = FrameMeter(link.relay.clock)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()

    def buffer_updated(self, nbytes: int) -> None:
        if self.meter.feed(self._buffer[:nbytes]):
            super().buffer_updated(nbytes)
            return
        link = self.link
        if link.uid is not None:
            link.relay.admission.log_refusal(link.uid, OVERSPENT)
        # Nothing more reaches the internal server: a GOAWAY cannot be slipped in among its
        # frames, half written, so the workload sees the connection closed.
        link.evict()


class _Inner(_Pipe):
    """The internal server's side: what it sends tells the meter which of the workload's
    control frames answer it (a PING after its DATA, ACKs of its PINGs and SETTINGS), and its
    SETTINGS tell the workload fewer streams than the server allows (h2_settings.py)."""

    def __init__(self, link: _Link) -> None:
        super().__init__(link)
        self.settings = SettingsRewriter()

    def buffer_updated(self, nbytes: int) -> None:
        # One reading of the agent's frames serves both (h2_frames.py).
        self.link.outer.meter.answers(self.settings.rewrite(self._buffer[:nbytes]))
        super().buffer_updated(nbytes)
