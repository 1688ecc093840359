"""Workload JWT-SVIDs minted in child processes.

Why: per token, the Python around an ES256 signature (claims, jti, base64, the DER-to-JOSE
conversion) costs about as much as the signature, and all of it holds the GIL. In the server
process that GIL is also what the event loop and the ledger writer need, so they took turns
with the minting thread and the machine sat half idle (bench: a JWT batch thread was busy 70%
of the time, the CPUs 55%). A worker process has a GIL of its own: the server keeps the checks,
the records and the reply, and a worker does the rest for a whole batch per round trip.

A worker gets a signing key the first time it is asked to use it (PKCS#8 over its private
pipe; the server's keys never touch a worker's disk or logs) and forgets keys it has not used
lately. A worker that dies is replaced; its batch is minted in the server instead, so a broken
worker costs speed, never an answer.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_der_private_key

from server.ca.signer import IssuedJwt, JwtSigner
from svid._clock import Clock
from svid._errors import SvidError

_log = logging.getLogger("svid.server.ca")
_KEYS_KEPT = 4  # active, next and a couple just retired: rotation never needs more
REPLY_TIMEOUT = 30.0  # seconds; a batch takes milliseconds, so this is a wedged worker
MIN_BATCH = 8  # fewer workload JWTs than this are minted in the server: not worth a round trip

# One request: (SPIFFE ID text, audiences, TTL), as check_jwt_request returns them.
MintRequest = tuple[str, list[str], int]


class _NoClock:
    """A worker's signers mint at the `now` the server sends; they never read a clock."""

    def now(self) -> float:
        raise RuntimeError("a JWT mint worker has no clock of its own")

    def monotonic(self) -> float:
        raise RuntimeError("a JWT mint worker has no clock of its own")


def _serve(conn: Connection) -> None:
    """The worker's loop: ("key", kid, der, not_after) and ("mint", kid, now, requests)."""
    clock = _NoClock()
    signers: OrderedDict[str, JwtSigner] = OrderedDict()
    conn.send("ready")  # imports done: the server sends batches from now on
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "key":
            _, kid, der, not_after = message
            key = load_der_private_key(der, None)
            if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                raise TypeError(f"a JWT signing key cannot be a {type(key).__name__}")
            signers[kid] = JwtSigner(key, kid, clock, not_after)
            while len(signers) > _KEYS_KEPT:
                signers.popitem(last=False)
            continue
        _, kid, now, requests = message
        signer = signers[kid]
        signers.move_to_end(kid)
        mint = signer.mint
        out: list[Any] = []
        for sub, audiences, ttl in requests:
            try:
                jwt = mint(sub, audiences, ttl, now)
            except SvidError as exc:  # sent back: that item's answer
                out.append(exc)
            else:
                out.append((jwt.token, jwt.jti, jwt.issued_at, jwt.expires_at))
        conn.send(out)


class _Worker:
    def __init__(self) -> None:
        parent, child = socket.socketpair()
        try:
            # Our own module on the server's own interpreter: no shell, no outside input.
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "server.ca.jwt_workers", str(child.fileno())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        self._ready = False
        # The kids this worker holds, least recently used first: kept as the worker keeps its own.
        self._kids: OrderedDict[str, None] = OrderedDict()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def ready(self, wait: float = 0.0) -> bool:
        """Whether the worker has started (it says so once, when its imports are done)."""
        if not self._ready and self._conn.poll(wait):
            if self._conn.recv() != "ready":
                raise EOFError("a JWT mint worker spoke before it was ready")
            self._ready = True
        return self._ready

    def mint(self, signer: JwtSigner, now: int, requests: Sequence[MintRequest]) -> list[Any]:
        kid = signer.kid
        if kid in self._kids:
            self._kids.move_to_end(kid)
        else:
            self._conn.send(("key", *signer.worker_copy()))
            self._kids[kid] = None
            while len(self._kids) > _KEYS_KEPT:
                self._kids.popitem(last=False)
        self._conn.send(("mint", kid, now, list(requests)))
        if not self._conn.poll(REPLY_TIMEOUT):
            raise TimeoutError(f"no reply from JWT mint worker in {REPLY_TIMEOUT:g} s")
        reply: list[Any] = self._conn.recv()
        return reply

    def close(self) -> None:
        self._conn.close()  # the worker sees EOF and returns
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class JwtWorkers:
    """A pool of `size` worker processes; `mint` runs one batch on whichever is free.
    With size 0 every batch is minted in the calling process."""

    def __init__(self, size: int, clock: Clock) -> None:
        if size < 0:
            raise ValueError("size must not be negative")
        self._clock = clock
        self._size = size
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._all: list[_Worker] = []
        self._closed = False
        for _ in range(size):
            self._idle.put(None)  # started on first use: a server that mints none starts none

    def mint(
        self, signer: JwtSigner, requests: Sequence[MintRequest]
    ) -> list[IssuedJwt | SvidError]:
        """One outcome per request, in order: the token, or the error signer.mint raised.

        Small batches, and any batch while no worker has finished starting, are minted here:
        a round trip costs more than a few signatures, and nobody waits for a worker to start.
        """
        now = int(self._clock.now())
        big = self._size > 0 and len(requests) >= MIN_BATCH
        reply = self._in_worker(signer, now, requests) if big else None
        if reply is None:
            return [_mint_or_error(signer, now, r) for r in requests]
        # A worker sends a (token, jti, issued_at, expires_at) tuple or the item's SvidError.
        return [
            IssuedJwt(token=r[0], jti=r[1], issued_at=r[2], expires_at=r[3])
            if type(r) is tuple
            else cast(SvidError, r)
            for r in reply
        ]

    def _in_worker(
        self, signer: JwtSigner, now: int, requests: Sequence[MintRequest]
    ) -> list[Any] | None:
        """A free worker's reply; None when none is ready (still starting, dead or wedged)."""
        worker = self._idle.get()
        try:
            if worker is None:
                worker = self._start()
            if not worker.ready():
                return None
            return worker.mint(signer, now, requests)
        except (OSError, EOFError) as exc:
            _log.warning("JWT mint worker failed (%s); starting another", type(exc).__name__)
            self._discard(worker)
            worker = None
            return None
        finally:
            self._idle.put(worker)

    def warm_up(self, timeout: float) -> bool:
        """Start every worker now and wait up to `timeout` s for each to be ready."""
        taken = [self._idle.get() for _ in range(self._size)]
        try:
            started = [w if w is not None else self._start() for w in taken]
            taken = list(started)
            return all(w.ready(timeout) for w in started)
        finally:
            for worker in taken:
                self._idle.put(worker)

    def pids(self) -> list[int]:
        """The worker processes started so far (for tests and operators)."""
        with self._lock:
            return [w.pid for w in self._all]

    def _start(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise OSError("JWT mint workers are closed")
            worker = _Worker()
            self._all.append(worker)
            return worker

    def _discard(self, worker: _Worker | None) -> None:
        if worker is None:
            return
        with self._lock:
            if worker in self._all:
                self._all.remove(worker)
        with contextlib.suppress(OSError):
            worker.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.close()


def _mint_or_error(signer: JwtSigner, now: int, request: MintRequest) -> IssuedJwt | SvidError:
    sub, audiences, ttl = request
    try:
        return signer.mint(sub, audiences, ttl, now)
    except SvidError as exc:  # as the worker would have sent it
        return exc


def main(argv: Sequence[str]) -> int:
    fd = int(argv[0])
    sock = socket.socket(fileno=fd)
    _serve(Connection(sock.detach()))
    return 0


if __name__ == "__main__":
    # A worker must not outlive the server's pipe; SIGINT aimed at the server's process group
    # (Ctrl-C on `make run`) is the server's to handle, not a traceback here.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(main(sys.argv[1:]))
