"""The node API client: attestation, agent SVID renewal, the Sync stream and SVID signing.

gRPC errors are translated here, at the edge; callers see AgentError subclasses.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from agent_attestor import _crypto
from agent_attestor.agent_store import AgentSvid
from agent_attestor.cache import SyncDelta, SyncState
from agent_attestor.checkpoint_store import PushedCheckpoint
from agent_attestor.errors import (
    AttestationError,
    AttestationLimitedError,
    AttestationNotAcceptedError,
    BadRequestError,
    ChannelNotVerifiedError,
    ConfigError,
    JoinTokenRefusedError,
    NoIdentityError,
    NotReadyError,
    ServerNotOursError,
    ServerNotVerifiedError,
    X509PopAnswerRefusedError,
    X509PopRefusedError,
)
from agent_attestor.model import Entry, TrustBundle
from agent_attestor.server_identity import (
    SERVER_NAME,
    SERVER_PATH,
    CheckContexts,
    expected_server_id,
    kept_pin,
    server_anchors,
)
from agent_attestor.signer import MintedJwt, X509Result
from svid._clock import Clock, SystemClock
from svid._der import der_concat, parse_der_certs
from svid._proto import common_pb2, node_pb2, node_pb2_grpc
from svid._revocation import KIND_JWT_ID, KIND_TASK, KIND_X509_SERIAL
from svid._secret_file import SecretFile, read_owner_only
from svid._spiffe_id import SpiffeId
from svid._x509pop import sign_challenge as sign_x509pop_challenge

_OPTIONS = (
    ("grpc.ssl_target_name_override", SERVER_NAME),
    ("grpc.default_authority", SERVER_NAME),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    # A server that hangs or drops off the network without closing the connection leaves a
    # quiet Sync stream waiting forever: a ping unanswered for 5 s ends it (and the agent
    # fails over) ~20 s in. The server accepts agent pings 10 s apart and more (server/app.py).
    ("grpc.keepalive_time_ms", 15_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.ping_timeout_ms", 5_000),  # grpcio >= 1.6x times pings out by this one (60 s)
    ("grpc.http2.max_pings_without_data", 0),  # a quiet stream is still worth checking
)
_X509_SERIAL = common_pb2.Revocation.X509_SERIAL
_JWT_ID = common_pb2.Revocation.JWT_ID
# The kinds relayed, by their names in the cache and to verifiers (tasks.revocations); a task's
# end (TASK) is no credential, but verifiers and task clients close what the task held on it.
_KINDS = {
    _X509_SERIAL: KIND_X509_SERIAL,
    _JWT_ID: KIND_JWT_ID,
    common_pb2.Revocation.TASK: KIND_TASK,
}


# The SyncUpdate kinds that carry state; any other but HEARTBEAT is skipped.
_STATE_KINDS = frozenset((node_pb2.SyncUpdate.SNAPSHOT, node_pb2.SyncUpdate.DELTA))


@dataclass(frozen=True)
class Heartbeat:
    """The server is there, with nothing to send: another comes within `interval` seconds."""

    interval: float


def sync_state(update: node_pb2.SyncUpdate) -> SyncState:
    return SyncState(
        entries=tuple(Entry.from_proto(e) for e in update.entries),
        bundle=TrustBundle.from_proto(update.bundle),
        federated={
            td.removeprefix("spiffe://"): TrustBundle.from_proto(b)
            for td, b in update.federated_bundles.items()
        },
        revoked_serials=frozenset(
            r.value.lower() for r in update.revocations if r.kind == _X509_SERIAL
        ),
        revoked_jtis=frozenset(r.value for r in update.revocations if r.kind == _JWT_ID),
        crl=tuple(update.crl),
        revocation_expiry=_revocation_expiry(update.revocations),
        revocation_spiffe_ids=_revocation_spiffe_ids(update.revocations),
        revision=update.revision,
        more=update.more,
        epoch=update.epoch,
    )


def sync_delta(update: node_pb2.SyncUpdate) -> SyncDelta:
    expiry = _revocation_expiry(update.revocations)
    return SyncDelta(
        upserts=tuple(Entry.from_proto(e) for e in update.entries),
        removed_ids=tuple(update.removed_entry_ids),
        bundle=TrustBundle.from_proto(update.bundle) if update.HasField("bundle") else None,
        federated={
            td.removeprefix("spiffe://"): TrustBundle.from_proto(b)
            for td, b in update.federated_bundles.items()
        },
        revocations_added=expiry,
        revocations_removed=frozenset(_revocation_expiry(update.removed_revocations)),
        revocation_spiffe_ids=_revocation_spiffe_ids(update.revocations),
        crl=tuple(update.crl) if update.crl_changed else None,
        revision=update.revision,
        more=update.more,
        epoch=update.epoch,
    )


def _key(r: common_pb2.Revocation) -> tuple[str, str]:
    if r.kind == _X509_SERIAL:
        return KIND_X509_SERIAL, r.value.lower()
    return _KINDS[r.kind], r.value


def _revocation_expiry(
    items: Iterable[common_pb2.Revocation],
) -> dict[tuple[str, str], int]:
    return {_key(r): int(r.expires_at) for r in items if r.kind in _KINDS}


def _revocation_spiffe_ids(
    items: Iterable[common_pb2.Revocation],
) -> dict[tuple[str, str], str]:
    """Whose credential each revocation is, where the server named it (relayed to verifiers)."""
    return {_key(r): r.spiffe_id for r in items if r.kind in _KINDS and r.spiffe_id}


def server_not_verified(exc: grpc.RpcError) -> bool:
    """Whether the call failed because the TLS handshake refused the server's certificate (no
    root of ours issued it). gRPC reports that only in words: UNAVAILABLE, with the TLS
    library's reason, which names the verification failure."""
    code = exc.code()  # type: ignore[attr-defined]
    return code == grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in (
        exc.details() or ""  # type: ignore[attr-defined]
    )


def _redacted(text: str, join_token: str) -> str:
    """`text` (what a server said, logged) without the join token or its secret: ours never
    echoes it, but a credential in a log is one every reader of the log holds."""
    for secret in (join_token, join_token.partition(".")[2]):
        if secret:
            text = text.replace(secret, "<join token>")
    return text


# What x509pop servers of every release say when the challenge's answer does not verify; an
# earlier release's says it to every agent of this one (another form of answer).
_ANSWER_REFUSED = "x509pop: challenge signature does not match the certificate key"


def attest_error(exc: grpc.RpcError, join_token: str, address: str) -> AttestationError:
    """What a failed Attest call means to the agent, in the server's words (never the join
    token, whichever error carries it: ours never echoes it)."""
    code = exc.code()  # type: ignore[attr-defined]
    details = exc.details() or ""  # type: ignore[attr-defined]
    said = _redacted(f"{code.name}: {details}", join_token)
    if server_not_verified(exc):
        # The probe verified a server at this address against the bundle; the channel's
        # connection reached one whose certificate that server's CA did not sign.
        return ServerNotOursError(
            f"the server the attestation channel reached at {address} is not the one checked "
            "there: its certificate is not signed by the CA of the server whose ID was checked "
            "(another trust domain's server behind the same address?); nothing was sent to it: "
            f"{said}"
        )
    if join_token and code == grpc.StatusCode.PERMISSION_DENIED:
        return JoinTokenRefusedError(f"the server refused the join token: {said}")
    if code == grpc.StatusCode.PERMISSION_DENIED and _ANSWER_REFUSED in details:
        return X509PopAnswerRefusedError(
            f"the server refused the answer to its x509pop challenge: {said}"
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return X509PopRefusedError(f"the server refused the x509pop certificate: {said}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return AttestationNotAcceptedError(f"the server cannot take this attestation: {said}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return AttestationLimitedError(f"attestation over this host's budget: {said}")
    return AttestationError(f"attestation refused: {said}")


def insecure_fetch_server_root(address: str) -> bytes:
    """Demo only: the PEM of whatever certificate the server presents (no verification)."""
    host, _, port = address.rpartition(":")
    try:
        pem = ssl.get_server_certificate((host.strip("[]"), int(port)))
    except OSError as exc:  # the server not up yet: a traceback from `run`
        raise AttestationError(
            f"insecure_bootstrap: cannot fetch the server's certificate from {address}: "
            f"{exc.strerror or exc}"
        ) from None
    return pem.encode()


def sign_challenge(key: PrivateKeyTypes, challenge: bytes) -> bytes:
    """x509pop proof of possession, in the form the server checks (svid._x509pop): a nonce
    signed behind x509pop's own context, never whatever bytes a server sends."""
    try:
        return sign_x509pop_challenge(key, challenge)
    except TypeError:
        raise ConfigError(f"x509pop_key: unsupported key type {type(key).__name__}") from None
    except ValueError as exc:
        raise AttestationError(f"refused to sign the server's x509pop challenge: {exc}") from None


async def wait_connected(channel: grpc.aio.Channel, address: str, timeout: float) -> None:
    """Return once `channel` has connected or failed to (refused, handshake failed: the call
    that follows fails at once, with gRPC's own reason); raise ConnectionError when it is still
    trying after `timeout` s (a silent host), where a call would wait out gRPC's 20 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    settled = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
    state = channel.get_state(try_to_connect=True)
    while state not in settled and state != grpc.ChannelConnectivity.SHUTDOWN:
        try:
            async with asyncio.timeout_at(deadline):  # not wait_for: see cancel.py
                await channel.wait_for_state_change(state)
        except TimeoutError:
            raise ConnectionError(f"no connection to {address} within {timeout:g} s") from None
        state = channel.get_state()


class NodeClient:
    """One connection set to the server; rebuilt when the agent SVID or the bundle changes.

    The mTLS channel (Sync, renewals, minting) trusts what the Attest channel does
    (server_identity): the CA of the agent's trust domain that signed the certificate of a
    server checked to carry that trust domain's server ID, not every certificate under the
    bundle's roots, which under an upstream root other trust domains' servers chain to as well.
    connect() checks the server again each time, so a reconnect meets the server's CA of now
    (under an upstream root the bundle does not name the CA a rotation brings)."""

    def __init__(
        self,
        server_address: str,
        attest_address: str,
        root_pem: bytes,
        svid: AgentSvid | None = None,
        connect_timeout: float = 5.0,
        *,
        trust_domain: str = "",
        pinned: bytes = b"",
        pinned_under: bytes = b"",
        clock: Clock | None = None,
        contexts: CheckContexts | None = None,
    ) -> None:
        """`trust_domain`: the agent's, whose server alone it attests to (empty: the one the
        roots name, see server_identity.expected_server_id); the mTLS channel's server is the
        one of the SVID's trust domain. `pinned`: what the mTLS channel trusts until connect()
        checks the server, from the client before this one at the same address (empty: nothing,
        and calls wait for the check); `pinned_under`: the roots that client checked it under
        (while they are this client's too, its CAs of the trust domain stay beside those a new
        check finds, until they expire by `clock`: server_identity.kept_pin). `contexts`: the
        server check's TLS contexts, shared by the clients that replace this one (the same
        roots and SVID take the same context)."""
        self._connect_timeout = connect_timeout
        self._trust_domain = trust_domain
        self._server_address = server_address
        self._attest_address = attest_address
        self._root_pem = root_pem
        self._svid = svid
        self._pinned = pinned
        self._pinned_under = pinned_under
        self._clock: Clock = clock or SystemClock()
        self._contexts = contexts or CheckContexts()
        self._pinning = asyncio.Lock()
        self._channel: grpc.aio.Channel | None = None
        self._stub: node_pb2_grpc.NodeStub | None = None
        # Channels of an earlier pin: calls still on them finish there, closed with this client.
        self._retired: list[grpc.aio.Channel] = []
        # Once closed (replaced), no channel opens: nothing would close it.
        self._closed = False

    @property
    def root_pem(self) -> bytes:
        return self._root_pem

    @property
    def server_address(self) -> str:
        return self._server_address

    @property
    def pinned(self) -> bytes:
        """The PEM of what the mTLS channel trusts (empty: the server is not checked yet)."""
        return self._pinned

    @property
    def pinned_under(self) -> bytes:
        """The roots under which the server was checked for `pinned`."""
        return self._pinned_under

    def _mtls(self) -> node_pb2_grpc.NodeStub:
        if self._svid is None:
            raise AttestationError("the agent has no SVID yet: attest first")
        if self._stub is None:
            if self._closed:
                # A call that waited out its check of the server on a client replaced meanwhile.
                raise NotReadyError("the connection to the server was replaced: retry")
            if not self._pinned:
                # Never the bundle's roots alone: another trust domain's server may chain there.
                raise NotReadyError("not connected to the server yet: its identity is unchecked")
            creds = grpc.ssl_channel_credentials(
                self._pinned, self._svid.key_pem, self._svid.chain_pem
            )
            self._channel = grpc.aio.secure_channel(self._server_address, creds, _OPTIONS)
            self._stub = node_pb2_grpc.NodeStub(self._channel)
        return self._stub

    async def _ready(self) -> node_pb2_grpc.NodeStub:
        """The mTLS stub, once the server is checked (at once if it was)."""
        if not self._pinned:
            async with self._pinning:
                if not self._pinned:
                    await self._check()
        return self._mtls()

    async def _check(self, timeout: float | None = None) -> None:
        """Check the server at the node address (see the class) and pin the channel to what
        the check found; a pin unlike the one in use takes a new channel. Called holding
        _pinning. ChannelNotVerifiedError: the roots do not verify the server;
        ServerNotOursError: they do, but it is another trust domain's. `timeout`: the check's
        deadline (None: connect_timeout)."""
        svid = self._svid
        if svid is None:
            raise AttestationError("the agent has no SVID yet: attest first")
        expected = SpiffeId.from_segments(SpiffeId.parse(svid.spiffe_id).trust_domain, *SERVER_PATH)
        try:
            pinned = await server_anchors(
                self._server_address,
                self._root_pem,
                expected,
                self._connect_timeout if timeout is None else timeout,
                client=(svid.chain_pem, svid.key_pem),
                contexts=self._contexts,
            )
        except ServerNotOursError:
            raise
        except ServerNotVerifiedError as exc:
            raise ChannelNotVerifiedError(str(exc)) from exc
        if self._pinned_under == self._root_pem:
            # Mid-rotation the servers behind the address present either CA: both are ours.
            pinned = kept_pin(pinned, self._pinned, expected.trust_domain.name, self._clock.now())
        self._pinned_under = self._root_pem
        if pinned == self._pinned:
            return
        if self._channel is not None:
            self._retired.append(self._channel)
        self._pinned, self._channel, self._stub = pinned, None, None

    async def connect(self, within: float | None = None) -> None:
        """Check the server and pin the mTLS channel (see the class), then wait for the channel
        to connect or fail (see wait_connected). A channel that fails is pinned once more: its
        connection may have met a certificate of a CA activated since the check, or another
        server behind the address; then the call that follows says what failed.

        `within`: seconds for all of it (each step still at most connect_timeout); a hung
        server otherwise held it up to four connect_timeouts, past the life of a short-lived
        agent SVID that another server would have renewed (Syncer._connect_within)."""
        loop = asyncio.get_running_loop()
        end = None if within is None else loop.time() + within

        def step() -> float:
            if end is None:
                return self._connect_timeout
            return max(0.0, min(self._connect_timeout, end - loop.time()))

        try:
            for again in (True, False):
                async with self._pinning:
                    await self._check(step())
                channel = self.channel()
                await wait_connected(channel, self._server_address, step())
                if not again or channel.get_state() != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                    return
        except ConnectionError as exc:
            if end is None or loop.time() < end:
                raise
            # The step's own message names the part of `within` it had left.
            raise ConnectionError(
                f"no connection to {self._server_address} within {within:.3g} s"
            ) from exc

    def channel(self) -> grpc.aio.Channel:
        """The mTLS channel (with the agent SVID), for other node-side services; NotReadyError
        until the server is checked."""
        self._mtls()
        assert self._channel is not None
        return self._channel

    async def close(self) -> None:
        self._closed = True
        channels, self._retired = self._retired, []
        if self._channel is not None:
            channels.append(self._channel)
            self._channel = None
            self._stub = None
        for channel in channels:
            await channel.close()

    # ---- attestation ------------------------------------------------------------------------

    async def attest(
        self,
        *,
        join_token: str = "",
        x509pop: tuple[Sequence[x509.Certificate], PrivateKeyTypes] | None = None,
        timeout: float = 30.0,
    ) -> tuple[AgentSvid, TrustBundle]:
        key = _crypto.new_key()
        csr = _crypto.make_csr(key)
        if join_token:
            data = node_pb2.AttestationData(type="join_token", payload=join_token.encode())
        elif x509pop is not None:
            data = node_pb2.AttestationData(type="x509pop", payload=der_concat(x509pop[0]))
        else:
            raise AttestationError(
                "no way to attest: give a join token (--join-token) or x509pop_cert/x509pop_key"
            )
        first = node_pb2.AttestRequest(params=node_pb2.AttestParams(data=data, csr=csr))
        try:
            result = await self._attest_checked(first, x509pop, timeout)
        except grpc.RpcError as exc:
            raise attest_error(exc, join_token, self._attest_address) from exc
        return self._agent_svid(result, key), TrustBundle.from_proto(result.bundle)

    async def _attest_checked(
        self,
        first: node_pb2.AttestRequest,
        x509pop: tuple[Sequence[x509.Certificate], PrivateKeyTypes] | None,
        timeout: float,
    ) -> node_pb2.AgentSVID:
        """The attestation, sent only to a server of the trust domain whose ID the probe checked
        (pinned by the CA that signed it). A pinned handshake that fails sent nothing: the probe
        runs once more, as the server the channel reached may hold a certificate of a CA
        activated since, before the failure is reported."""
        expected = expected_server_id(self._trust_domain, self._root_pem)
        for retry in (True, False):
            pinned = await server_anchors(
                self._attest_address,
                self._root_pem,
                expected,
                self._connect_timeout,
                contexts=self._contexts,
            )
            try:
                return await self._attest_pinned(pinned, first, x509pop, timeout)
            except grpc.RpcError as exc:
                if not (retry and server_not_verified(exc)):
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _attest_pinned(
        self,
        pinned: bytes,
        first: node_pb2.AttestRequest,
        x509pop: tuple[Sequence[x509.Certificate], PrivateKeyTypes] | None,
        timeout: float,
    ) -> node_pb2.AgentSVID:
        creds = grpc.ssl_channel_credentials(pinned)
        async with grpc.aio.secure_channel(self._attest_address, creds, _OPTIONS) as channel:
            await wait_connected(channel, self._attest_address, self._connect_timeout)
            call = node_pb2_grpc.NodeStub(channel).Attest(timeout=timeout)
            await call.write(first)
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise AttestationError("server closed attestation without a result")
                if reply.WhichOneof("step") == "challenge":
                    if x509pop is None:
                        raise AttestationError("server sent a challenge to a join token")
                    proof = sign_challenge(x509pop[1], reply.challenge)
                    await call.write(node_pb2.AttestRequest(challenge_response=proof))
                    continue
                await call.done_writing()
                result: node_pb2.AgentSVID = reply.result
                return result

    @staticmethod
    def _agent_svid(result: node_pb2.AgentSVID, key: ec.EllipticCurvePrivateKey) -> AgentSvid:
        issued = _crypto.issued_svid("agent", result.cert_chain, key)
        chain = tuple(parse_der_certs(result.cert_chain))
        return AgentSvid(spiffe_id=issued.spiffe_id, chain=chain, key=key)

    async def renew(self, timeout: float = 30.0) -> tuple[AgentSvid, TrustBundle]:
        key = _crypto.new_key()
        stub = await self._ready()
        reply = await stub.RenewAgent(
            node_pb2.RenewAgentRequest(csr=_crypto.make_csr(key)), timeout=timeout
        )
        return self._agent_svid(reply.svid, key), TrustBundle.from_proto(reply.svid.bundle)

    # ---- sync and signing -------------------------------------------------------------------

    async def sync(
        self, since_revision: int = 0, epoch: str = ""
    ) -> AsyncIterator[SyncState | SyncDelta | PushedCheckpoint | Heartbeat]:
        """The Sync stream from `since_revision` of `epoch` (0: from a snapshot). An audit
        checkpoints a message carries come first, then the message's state or delta."""
        request = node_pb2.SyncRequest(since_revision=since_revision, epoch=epoch, heartbeats=True)
        stub = await self._ready()
        async for update in stub.Sync(request):
            if update.kind == node_pb2.SyncUpdate.HEARTBEAT:
                yield Heartbeat(update.heartbeat_interval_ms / 1000.0)
                continue
            if update.kind not in _STATE_KINDS:
                # A newer server's kind, sent though not asked for: read as a snapshot, as every
                # kind but DELTA was, its empty lists took every entry from the agent.
                continue
            for pushed in update.audit_checkpoints:
                yield PushedCheckpoint(pushed.line, bytes(pushed.public_key))
            if update.kind == node_pb2.SyncUpdate.DELTA:
                yield sync_delta(update)
            else:
                yield sync_state(update)

    async def batch_new_x509(self, params: list[tuple[str, bytes]]) -> list[X509Result]:
        request = node_pb2.BatchNewX509SVIDRequest(
            params=[node_pb2.X509SVIDParams(entry_id=e, csr=c) for e, c in params]
        )
        stub = await self._ready()
        reply = await stub.BatchNewX509SVID(request, timeout=30)
        results = [
            X509Result(
                entry_id=r.entry_id,
                chain_der=r.cert_chain,
                error=f"{r.error.code}: {r.error.message}" if r.HasField("error") else "",
            )
            for r in reply.results
        ]
        # The server answers the first params and leaves the last `deferred` for another call.
        left = max(0, min(reply.deferred, len(params) - len(results)))
        results.extend(
            X509Result(entry_id=e, deferred=True) for e, _ in params[len(params) - left :]
        )
        return results

    async def new_jwt(self, spiffe_id: str, audience: list[str], entry_id: str) -> MintedJwt:
        stub = await self._ready()
        try:
            reply = await stub.NewJWTSVID(
                node_pb2.NewJWTSVIDRequest(
                    spiffe_id=spiffe_id, audience=audience, entry_id=entry_id
                ),
                timeout=10,
            )
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
            # A decision of the server (policy, entitlement) reaches the workload as such;
            # anything else means "not now".
            if code == grpc.StatusCode.PERMISSION_DENIED:
                raise NoIdentityError(details) from exc
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise BadRequestError(details) from exc
            raise
        return MintedJwt(
            token=reply.token, issued_at=float(reply.issued_at), expires_at=float(reply.expires_at)
        )


# The node key attests this node as often as its holder likes (a join token, once): read as
# the join token file is, refused when another local user could read it.
_X509POP_KEY_FILE = SecretFile(
    setting="x509pop_key",
    owner="the agent's user",
    max_bytes=64 * 1024,  # an RSA-8192 PEM key is under 7 KiB
)


def load_x509pop(cert_path: Path, key_path: Path) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
    key_pem = read_owner_only(key_path, _X509POP_KEY_FILE, ConfigError)
    try:
        certs = x509.load_pem_x509_certificates(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_pem, None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"x509pop_cert: cannot load node certificate or key: {exc}") from exc
    return certs, key
