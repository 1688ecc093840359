"""The peer check inside every TLS connection a ``svid.tls`` context makes.

OpenSSL's own verification only gates the handshake on the union of the trusted CAs; the SPIFFE
check (chain pinned to the peer's own trust domain, leaf rules, revocation) and the ID
authorisation run in ``do_handshake`` of the ``ssl.SSLSocket`` / ``ssl.SSLObject`` subclasses the
contexts create, before either side can read or write application data:

* a handshake that completes is judged before ``do_handshake`` returns (asyncio, anyio and
  ``wrap_socket`` all call it, and only hand the connection on when it succeeds);
* a read or write before that (``do_handshake_on_connect=False``, where OpenSSL would run the
  handshake implicitly and return the peer's early data) first runs the handshake and the check;
* a refused connection stays refused: every later read or write raises the refusal again, so
  the peer's buffered request is never delivered, whatever the caller does with the error;
* a peer revoked after the handshake is refused on its next read or write, and blocking sockets
  are shut down at once so a thread waiting on them wakes up;
* with a verifier that fails closed on stale revocation data (``max_revocation_staleness``), a
  connection is refused on its first read or write once the data is too old, as a new peer
  would be: it was admitted on data that can no longer vouch for it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

from svid._cache import LruCache
from svid._errors import StaleRevocationsError, VerificationError
from svid._revocation import KIND_TASK, KIND_X509_SERIAL, CertKey, RevocationSet, cert_key
from svid._source_state import RevocationEvent, named_task, task_id_of
from svid._spiffe_id import SpiffeId
from svid._ssl_peer import peer_chain_der
from svid._tls_authorize import Authorizer, refusal
from svid._verify_x509 import VerifiedX509, X509Verifier

log = logging.getLogger("svid.tls")

_CHAINS_KEPT = 4096  # peers' chains remembered for session resumption


class PeerRefusedError(ssl.SSLCertVerificationError, VerificationError):
    """The TLS peer failed svid's verification or authorisation, or has been revoked since.

    An ``ssl.SSLError`` (so servers and clients treat it as the failed handshake it is) and a
    ``svid.VerificationError``. The message never holds key material.
    """

    def __str__(self) -> str:
        # ssl.SSLError's own str() shows a one-argument error as a tuple: "('TLS peer ...',)".
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class PeerPolicy:
    """What a TLS helper admits: its verifier, its authorizer, and the connections it admitted
    (weakly held), to refuse them when their peer is revoked."""

    def __init__(
        self, verifier: X509Verifier, authorizer: Authorizer, revocations: RevocationSet
    ) -> None:
        self.verifier = verifier
        self.authorizer = authorizer
        self.revocations = revocations
        # Read per read or write of every open connection: None unless the verifier can refuse.
        self.check_fresh: Callable[[tuple[CertKey, ...]], None] | None = (
            verifier.check_fresh if verifier.revocations_fresh_for() is not None else None
        )
        self._lock = threading.Lock()
        # Each open connection's peer chain, as what revokes it (svid._revocation.CertKey),
        # and its peer's SPIFFE ID when that is a task's (the task's end closes it).
        self._open: weakref.WeakKeyDictionary[Any, tuple[tuple[CertKey, ...], SpiffeId | None]] = (
            weakref.WeakKeyDictionary()
        )
        # Leaf DER -> the chain it came with. A resumed session carries the peer's leaf but not
        # its intermediates; the chain it was first verified with is verified again instead.
        self._chains: LruCache[bytes, bytes] = LruCache(_CHAINS_KEPT)

    def admit(self, conn: Any) -> tuple[VerifiedX509, tuple[CertKey, ...]]:
        """Verify and authorise the peer of ``conn`` (handshake done); PeerRefusedError if not."""
        try:
            ders = peer_chain_der(conn)
            chain = b"".join(ders)
            if len(ders) == 1:
                chain = self._chains.get(chain) or chain
            peer = self.verifier.verify_der(chain)
        except VerificationError as exc:
            raise PeerRefusedError(f"TLS peer refused: {exc}") from exc
        if len(ders) > 1:
            # Only chains that verified, and only their path (leaf first, as sent): what the
            # peer sent beyond it is its choice of bytes, kept per peer leaf otherwise.
            self._chains.put(ders[0], b"".join(ders[: len(peer.chain)]))
        try:
            why = refusal(self.authorizer, peer)
        except VerificationError as exc:
            raise PeerRefusedError(f"TLS peer {peer.spiffe_id} refused: {exc}") from exc
        except Exception as exc:
            # Refused like any other peer, so that servers, which handle ssl.SSLError, and the
            # connection's later reads see the refusal; the authorizer's failure is logged.
            log.error("TLS peer %s refused: its authorizer raised", peer.spiffe_id, exc_info=True)
            raise PeerRefusedError(
                f"TLS peer {peer.spiffe_id} refused: its authorizer raised {type(exc).__name__}"
            ) from exc
        if why is not None:
            raise PeerRefusedError(f"TLS peer {peer.spiffe_id} {why}")
        td = peer.spiffe_id.trust_domain.name
        keys = tuple(cert_key(td, c) for c in peer.chain)
        with self._lock:
            task = peer.spiffe_id if task_id_of(peer.spiffe_id) is not None else None
            self._open[conn] = (keys, task)
        return peer, keys

    def revoked(self, keys: tuple[CertKey, ...]) -> bool:
        is_revoked = self.revocations.is_revoked
        return any(is_revoked(k) for k in keys)

    def on_revoked(self, event: RevocationEvent) -> None:
        """Refuse the open connections whose peer chain holds the revoked certificate, or whose
        peer is the task that ended (KIND_TASK): a task's certificate cut to its CA's notAfter
        (a CA rotation within the task) expired before the end and is not revoked then."""
        if event.kind == KIND_TASK:
            what = f"task {event.value} has ended"
        elif event.kind == KIND_X509_SERIAL:
            what = f"certificate serial {event.value} has been revoked"
        else:
            return
        with self._lock:
            hit = [
                conn
                for conn, (keys, task) in self._open.items()
                if (
                    ended_task(event, task)
                    if event.kind == KIND_TASK
                    else any(event.revokes(k) for k in keys)
                )
            ]
            for conn in hit:  # refused for good: another revocation of it has nothing to end
                del self._open[conn]
        for conn in hit:
            conn._svid_refuse(PeerRefusedError(f"TLS peer {what}"))
            log.info("closed a TLS connection: peer %s", what)


def ended_task(event: RevocationEvent, peer: SpiffeId | None) -> bool:
    """Whether a task's end (KIND_TASK) is that of the task `peer` is: on its whole identity
    when the end names one (named_task), else on the task ID alone (closing a connection too
    many beats leaving an ended task's open)."""
    if peer is None or task_id_of(peer) != event.value:
        return False
    said = named_task(event.spiffe_id, event.value)
    return said is None or said == peer


class _Gate:
    """The per-connection state and checks both classes share (a mixin: the two stdlib classes
    have no common base that does I/O)."""

    _svid_policy: ClassVar[PeerPolicy]
    _svid_peer: VerifiedX509 | None = None
    _svid_keys: tuple[CertKey, ...] = ()
    _svid_refused: PeerRefusedError | None = None

    do_handshake: Callable[..., None]

    def _svid_admit(self) -> None:
        if self._svid_refused is not None:
            raise self._svid_refused
        if self._svid_peer is not None:
            return
        try:
            self._svid_peer, self._svid_keys = self._svid_policy.admit(self)
        except PeerRefusedError as exc:
            self._svid_refuse(exc)
            raise

    def _svid_ready(self) -> None:
        """Before any application data: the handshake and the check, or the standing refusal."""
        if self._svid_peer is None and self._svid_refused is None:
            self.do_handshake()
        if self._svid_refused is not None:
            raise self._svid_refused
        policy = self._svid_policy
        if policy.revoked(self._svid_keys):
            self._svid_refuse(PeerRefusedError("TLS peer certificate has been revoked"))
            raise self._svid_refused  # type: ignore[misc]
        check_fresh = policy.check_fresh
        if check_fresh is not None:
            try:
                check_fresh(self._svid_keys)
            except StaleRevocationsError as exc:
                self._svid_refuse(PeerRefusedError(f"TLS peer refused: {exc}"))
                raise self._svid_refused from None  # type: ignore[misc]

    def _svid_refuse(self, exc: PeerRefusedError) -> None:
        self._svid_refused = exc
        self._svid_wake()

    def _svid_wake(self) -> None:
        """Make a thread blocked on this connection return (sockets only)."""


class VerifyingSSLSocket(_Gate, ssl.SSLSocket):
    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        self._svid_admit()

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        self._svid_ready()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        self._svid_ready()
        return super().write(data)

    def send(self, data: Any, flags: int = 0) -> int:
        self._svid_ready()
        return super().send(data, flags)

    def _svid_wake(self) -> None:
        # The OS-level shutdown: SSLSocket.shutdown would drop _sslobj under a reading thread.
        with contextlib.suppress(OSError):  # already closed, or never connected
            socket.socket.shutdown(self, socket.SHUT_RDWR)


class VerifyingSSLObject(_Gate, ssl.SSLObject):
    def do_handshake(self) -> None:
        super().do_handshake()
        self._svid_admit()

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        self._svid_ready()
        return super().read(len, buffer)

    def write(self, data: Any) -> int:
        self._svid_ready()
        return super().write(data)


def classes_for(policy: PeerPolicy) -> tuple[type[ssl.SSLSocket], type[ssl.SSLObject]]:
    """The SSLSocket and SSLObject classes a helper's contexts create, bound to ``policy``."""
    sock = type("SvidSSLSocket", (VerifyingSSLSocket,), {"_svid_policy": policy})
    obj = type("SvidSSLObject", (VerifyingSSLObject,), {"_svid_policy": policy})
    return sock, obj


def peer_of(conn: Any) -> VerifiedX509:
    """The verified peer of a connection made by a ``svid.tls`` context: an ``ssl.SSLSocket``,
    an ``ssl.SSLObject``, or anything with ``get_extra_info("ssl_object")`` (asyncio transports
    and stream writers). Raises VerificationError when there is none (not one of ours, refused,
    or no handshake yet)."""
    get_extra = getattr(conn, "get_extra_info", None)
    if get_extra is not None:
        conn = get_extra("ssl_object")
    peer = getattr(conn, "_svid_peer", None)
    if not isinstance(peer, VerifiedX509) or getattr(conn, "_svid_refused", None) is not None:
        raise VerificationError("this connection has no peer verified by svid.tls")
    return peer
