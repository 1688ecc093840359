"""Signing in child processes: workload JWT-SVID batches and X.509-SVID batches.

Why: cryptography (50.x) holds the GIL while it signs and verifies, and the Python around each
signature (CSR parsing and checks, the DER template, claims and base64) holds it too. Signing
threads therefore took turns on one GIL: X.509 issuance levelled off at ~1.15 cores (py-spy:
the signing threads held the GIL for the CSR verify, the leaf encoding and the CA signature),
and a JWT batch thread was busy 70% of the time while the CPUs sat at 55%. A worker process
has a GIL of its own: the server keeps entitlement, task decisions, the records and the reply,
and a worker does the per-item crypto for a whole batch per round trip.

A worker gets a signing key the first time it is asked to use it (PKCS#8 over its private
socketpair; the server's keys never touch a worker's disk or logs) and forgets keys it has not
used lately. It has no clock: the server sends `now` with every batch. A worker that is still
starting, dies or wedges costs speed, never an answer: the server signs that batch itself and
a new worker takes the dead one's place.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import socket
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_der_private_key

from server.ca.signer import IssuedJwt, IssuedSvid, JwtSigner, X509Request, X509Signer
from svid._clock import Clock
from svid._errors import SvidError

_log = logging.getLogger("svid.server.ca")
# Active, next and a couple just retired, of each kind (JWT, X.509): rotation needs no more.
_KEYS_KEPT = 8
REPLY_TIMEOUT = 30.0  # seconds; a batch takes milliseconds, so this is a wedged worker
MIN_BATCH = 8  # smaller batches are signed in the server: not worth a round trip

# One workload JWT request: (SPIFFE ID text, audiences, TTL), as check_jwt_request returns them.
MintRequest = tuple[str, list[str], int]
# What a worker needs to draft the audit body of each JWT of a batch: the agent, and per
# request its SPIFFE ID and joined audience (server.issuance.records.workload_jwt_body).
Drafting = tuple[str, Sequence[tuple[str, str]]]
_JWT = "jwt"
_X509 = "x509"


class _NoClock:
    """A worker's signers sign at the `now` the server sends; they never read a clock."""

    def now(self) -> float:
        raise RuntimeError("a signing worker has no clock of its own")

    def monotonic(self) -> float:
        raise RuntimeError("a signing worker has no clock of its own")


def _load_signer(kind: str, payload: Any) -> JwtSigner | X509Signer:
    """The signer a key message describes (JwtSigner.worker_copy / X509Signer.worker_copy)."""
    if kind == _JWT:
        kid, der, not_after, issuer = payload
        key = load_der_private_key(der, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise TypeError(f"a JWT signing key cannot be a {type(key).__name__}")
        return JwtSigner(key, kid, _NoClock(), not_after, issuer)
    cert_der, key_der, above = payload
    key = load_der_private_key(key_der, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"a CA key cannot be a {type(key).__name__}")
    return X509Signer(
        x509.load_der_x509_certificate(cert_der),
        key,
        tuple(x509.load_der_x509_certificate(c) for c in above),
        _NoClock(),
    )


def _mint_one(
    signer: JwtSigner, now: int, request: MintRequest
) -> tuple[str, str, int, int] | SvidError:
    sub, audiences, ttl = request
    try:
        return signer.mint_values(sub, audiences, ttl, now)
    except SvidError as exc:  # that item's answer
        return exc


def _issue_one(signer: X509Signer, now: int, request: X509Request) -> IssuedSvid | SvidError:
    try:
        return signer.issue_csr(request, now)
    except SvidError as exc:  # that item's answer
        return exc


def _shares(requests: list[Any], count: int) -> list[list[Any]]:
    """`requests` cut into `count` runs of nearly equal length, in order."""
    size, extra = divmod(len(requests), count)
    out, at = [], 0
    for i in range(count):
        end = at + size + (1 if i < extra else 0)
        out.append(requests[at:end])
        at = end
    return out


def _serve(conn: Connection) -> None:
    """The worker's loop: ("key", name, kind, payload), and (kind, name, now, requests) with a
    Drafting after a JWT batch's requests when its audit bodies are wanted."""
    signers: OrderedDict[str, Any] = OrderedDict()
    conn.send("ready")  # imports done: the server sends batches from now on
    while True:
        try:
            message = conn.recv()
        except (EOFError, ConnectionResetError):  # the server closed its end: done
            return
        if message[0] == "key":
            _, name, kind, payload = message
            signers[name] = _load_signer(kind, payload)
            while len(signers) > _KEYS_KEPT:
                signers.popitem(last=False)
            continue
        kind, name, now, requests, *drafting = message
        signer = signers[name]
        signers.move_to_end(name)
        out: list[Any] = []
        if kind == _JWT:
            drafts = _Drafts(*drafting[0]) if drafting else None
            for index, request in enumerate(requests):
                # (token, jti, issued_at, expires_at): four plain values pickle faster than a
                # dataclass.
                minted = _mint_one(signer, now, request)
                if type(minted) is not tuple:
                    out.append(minted)  # that item's error, as it is
                    continue
                out.append(minted if drafts is None else (*minted, drafts.body(index, minted)))
        else:
            for request in requests:
                svid = _issue_one(signer, now, request)
                # The chain the server adds itself: only the leaf travels back.
                out.append(
                    (svid.leaf_der, svid.serial, svid.expires_at)
                    if isinstance(svid, IssuedSvid)
                    else svid
                )
        conn.send(out)


class _Drafts:
    """The audit bodies of a batch's JWTs, as the server's log would check and encode them on
    its event loop, drafted here instead (AuditLog.record_later takes them); None for one the
    log must check itself."""

    def __init__(self, agent_id: str, owners: Sequence[tuple[str, str]]) -> None:
        # Imported here: only worker processes draft, and the issuance package imports us.
        from server.issuance import records  # noqa: PLC0415

        self._records = records
        self._agent_id = agent_id
        self._owners = owners
        self._prefixes: dict[str, str | None] = {}  # by SPIFFE ID: a batch names few

    def body(self, index: int, minted: tuple[str, str, int, int]) -> str | None:
        """The audit body of request `index`'s JWT, from its (token, jti, issued_at,
        expires_at)."""
        spiffe_id, audience = self._owners[index]
        if spiffe_id not in self._prefixes:
            prefix = self._records.workload_jwt_prefix(self._agent_id, spiffe_id)
            self._prefixes[spiffe_id] = prefix
        _, jti, issued_at, expires_at = minted
        ttl = expires_at - issued_at
        return self._records.workload_jwt_body(self._prefixes[spiffe_id], jti, audience, ttl)


def spawn() -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A new worker process and the server's end of its private socketpair."""
    parent, child = socket.socketpair()
    try:
        # Our own module on the server's own interpreter: no shell, no outside input.
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.ca.workers", str(child.fileno())],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
            close_fds=True,
        )
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return proc, parent


class KeysHeld:
    """The signing keys a worker holds, by name, as it keeps them itself (least recently used
    dropped past _KEYS_KEPT): what the server must send before a batch."""

    def __init__(self) -> None:
        self._names: OrderedDict[str, None] = OrderedDict()

    def missing(self, name: str) -> bool:
        """Whether the worker lacks `name`; either way it holds it after the next send."""
        if name in self._names:
            self._names.move_to_end(name)
            return False
        self._names[name] = None
        while len(self._names) > _KEYS_KEPT:
            self._names.popitem(last=False)
        return True


def issued_jwts(reply: Sequence[Any]) -> list[IssuedJwt | SvidError]:
    """A JWT batch's outcomes: a worker's (token, jti, issued_at, expires_at) tuples, in
    IssuedJwt's field order (positional: a third cheaper than by keyword), or the outcomes as
    they are."""
    return [IssuedJwt(*r) if type(r) is tuple else cast(IssuedJwt | SvidError, r) for r in reply]


class _Worker:
    def __init__(self) -> None:
        self._proc, parent = spawn()
        self._conn = Connection(parent.detach())
        self._ready = False
        # The keys this worker holds, least recently used first: kept as the worker keeps its own.
        self._keys = KeysHeld()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def ready(self, wait: float = 0.0) -> bool:
        """Whether the worker has started (it says so once, when its imports are done)."""
        if not self._ready and self._conn.poll(wait):
            if self._conn.recv() != "ready":
                raise EOFError("a signing worker spoke before it was ready")
            self._ready = True
        return self._ready

    def send(
        self, kind: str, name: str, copy: Callable[[], Any], now: int, requests: list[Any]
    ) -> None:
        """Hand the worker a batch (and the key first, if it does not hold it); `receive` the
        reply. Workers given their batches before any reply is awaited sign at the same time."""
        if self._keys.missing(name):
            self._conn.send(("key", name, kind, copy()))
        self._conn.send((kind, name, now, requests))

    def receive(self, count: int) -> list[Any]:
        if not self._conn.poll(REPLY_TIMEOUT):
            raise TimeoutError(f"no reply from signing worker in {REPLY_TIMEOUT:g} s")
        reply: list[Any] = self._conn.recv()
        if len(reply) != count:
            raise EOFError("a signing worker answered another batch")
        return reply

    def close(self, grace: float = 5.0) -> None:
        self._conn.close()  # the worker sees EOF and returns
        try:
            self._proc.wait(grace)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class SigningWorkers:
    """A pool of `size` signing processes; each batch runs on whichever is free.
    With size 0 every batch is signed in the calling process.

    The entry points (`mint`, `issue_x509`) give one outcome per request, in order: what the
    signer gives in this process, or the SvidError it raised for that item.
    """

    def __init__(self, size: int, clock: Clock) -> None:
        if size < 0:
            raise ValueError("size must not be negative")
        self._clock = clock
        self._size = size
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._all: list[_Worker] = []
        self._closed = False
        self._batches = 0  # in _batch now, waiting for a worker or signing
        for _ in range(size):
            self._idle.put(None)  # started on first use: a server that signs none starts none

    def mint(
        self, signer: JwtSigner, requests: Sequence[MintRequest]
    ) -> list[IssuedJwt | SvidError]:
        """Workload JWT-SVIDs at the clock's now: signer.mint, or its error, per request."""
        now = int(self._clock.now())
        reply = self._batch(
            _JWT,
            signer.worker_name,
            signer.worker_copy,
            now,
            requests,
            here=functools.partial(_mint_one, signer, now),
        )
        return issued_jwts(reply)

    def issue_x509(
        self, signer: X509Signer, requests: Sequence[X509Request]
    ) -> list[IssuedSvid | SvidError]:
        """X.509-SVIDs from unchecked CSRs at the clock's now: signer.issue_csr, or its error,
        per request."""
        now = int(self._clock.now())
        reply = self._batch(
            _X509,
            signer.worker_name,
            signer.worker_copy,
            now,
            requests,
            here=functools.partial(_issue_one, signer, now),
        )
        # From a worker: a (leaf DER, serial, expires_at) tuple. From here: the outcome.
        issued = signer.issued
        return [issued(*r) if type(r) is tuple else cast(IssuedSvid | SvidError, r) for r in reply]

    def _batch(
        self,
        kind: str,
        name: str,
        copy: Callable[[], Any],
        now: int,
        requests: Sequence[Any],
        *,
        here: Callable[[Any], Any],
    ) -> list[Any]:
        """A reply per request: from the free workers, a share each, or `here` (in this
        process) for a small batch and for any share no worker could sign (none ready: still
        starting, dead or wedged). Small batches stay here because a round trip costs more
        than a few signatures, and nobody waits for a worker to start."""
        if self._size == 0 or len(requests) < MIN_BATCH:
            return [here(r) for r in requests]
        with self._lock:
            self._batches += 1
            alone = self._batches == 1
        # Wait for one worker. A batch alone lets the other idle workers take a share too (of at
        # least MIN_BATCH items); with batches in flight side by side, each keeps to one worker:
        # sharing then cost throughput (the bench: 1.1x instead of 1.3x over no workers).
        taken = [self._idle.get()]
        while alone and len(taken) < len(requests) // MIN_BATCH:
            try:
                taken.append(self._idle.get_nowait())
            except queue.Empty:
                break
        try:
            ready = self._ready_workers(taken)
            if not ready:
                return [here(r) for r in requests]
            shares = _shares(list(requests), len(ready))
            # Every share is handed over before any reply is awaited: the workers sign at once.
            pending: list[_Worker | None] = []
            for worker, share in zip(ready, shares, strict=True):
                try:
                    worker.send(kind, name, copy, now, share)
                    pending.append(worker)
                except (OSError, EOFError) as exc:
                    self._failed(worker, taken, exc)
                    pending.append(None)
            out: list[Any] = []
            for maybe, share in zip(pending, shares, strict=True):
                reply = None
                if maybe is not None:
                    try:
                        reply = maybe.receive(len(share))
                    except (OSError, EOFError) as exc:
                        self._failed(maybe, taken, exc)
                out.extend(reply if reply is not None else [here(r) for r in share])
            return out
        finally:
            for slot in taken:
                self._idle.put(slot)
            with self._lock:
                self._batches -= 1

    def _ready_workers(self, taken: list[_Worker | None]) -> list[_Worker]:
        """The workers of `taken` ready to sign, starting any place still empty. One that died
        before it was ready (its pipe reads EOF) is discarded like any failed worker; none at
        all once the pool is closed (this process signs)."""
        ready: list[_Worker] = []
        for i, slot in enumerate(taken):
            try:
                worker = slot if slot is not None else self._start()
            except OSError:
                return []
            taken[i] = worker
            try:
                if worker.ready():
                    ready.append(worker)
            except (OSError, EOFError) as exc:
                self._failed(worker, taken, exc)
        return ready

    def _failed(self, worker: _Worker, taken: list[_Worker | None], exc: BaseException) -> None:
        """Discard a worker that failed; its slot in `taken` empties, so a later batch starts
        another in its place."""
        _log.warning("signing worker failed (%s); starting another", type(exc).__name__)
        self._discard(worker)
        taken[taken.index(worker)] = None

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
                raise OSError("signing workers are closed")
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
            # No grace: a wedged worker would hold up the batch the server now signs itself.
            worker.close(grace=0)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for worker in workers:
            with contextlib.suppress(OSError):
                worker.close()


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
