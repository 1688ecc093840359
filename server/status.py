"""The one place where errors become gRPC status codes.

Handlers raise domain errors (server.errors, the datastore's, the CA's, the audit log's, the
policy engine's, svid's) and never pick a status code themselves; this module decides the code
and the client-visible message, explicitly per error type (RULES).
"""

from __future__ import annotations

import errno
import functools
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any, TypeVar

import grpc

from server import errors
from server.audit.checkpoint import CheckpointError
from server.audit.errors import AuditError, LedgerError, SecretInAuditError, UnstorableTextError
from server.audit.rollback import DatastoreRolledBackError, RestoredFlagError
from server.ca.errors import (
    CaConfigError,
    CaError,
    CaUnavailableError,
    CsrError,
    KeyStoreError,
    SealedKeyError,
    SigningRequestError,
)
from server.datastore.errors import (
    AgentRemovedError,
    AgentReplacedError,
    BundleRefusedError,
    ChainMovedError,
    CommitUnknownError,
    DataStoreError,
    DatastoreMovedError,
    HolderGoneError,
    JtiHeldError,
    LeaseLostError,
    RemovalClaimLostError,
    RemovalUnderWayError,
    StorageError,
    TaskEndedMeanwhileError,
    UnreachableError,
)
from server.datastore.errors import AlreadyExistsError as DsAlreadyExistsError
from server.datastore.errors import ConflictError as DsConflictError
from server.datastore.errors import NotFoundError as DsNotFoundError
from server.datastore.legacy_import import LegacyImportError
from server.datastore.lost import DatastoreLostError, NewFlagError
from server.federation.errors import BundleNotStoredError, FederationError
from server.issuance.ledger import LedgerUnavailableError
from server.policy.errors import PolicyError, RequestError
from svid import _errors as svid_errors
from svid._audit_checkpoint import AuditCheckpointError
from svid._cert_der import NonUriSanError
from svid._clock import SystemClock
from svid._log_throttle import KeyedThrottles
from svid._task_claims import TaskClaimsError
from svid._task_errors import (
    TaskDeniedError,
    TaskEndedError,
    TaskError,
    TaskNotFoundError,
    TaskRequestError,
)
from svid._tls_gate import PeerRefusedError
from svid._workload_address import WorkloadApiAddressError
from svid._workload_errors import (
    JwtSvidValidationError,
    WorkloadApiError,
    WorkloadApiPermissionError,
    WorkloadApiUnavailableError,
)

_log = logging.getLogger("svid.server.status")

Code = grpc.StatusCode
INTERNAL_MESSAGE = "internal error"
STORAGE_MESSAGE = "the server cannot record: storage unavailable"
AUDIT_MESSAGE = "the server cannot record: audit log unavailable"
OUTCOME_UNKNOWN_MESSAGE = (
    "the outcome of this call is unknown: the server's storage failed while committing it, and"
    " the server is stopping; once it is back, check whether the change took effect before"
    " repeating it"
)
# The same, where the server serves on (PostgreSQL: the connection was lost at COMMIT).
OUTCOME_UNKNOWN_SERVING_MESSAGE = (
    "the outcome of this call is unknown: the server lost its storage while committing it;"
    " check whether the change took effect before repeating it"
)
LEDGER_MESSAGE = (
    "the server cannot record issued credentials (storage unavailable); nothing was issued,"
    " retry later"
)


@dataclass(frozen=True)
class Rule:
    """How one error type reaches a client: its code, and either its own message (written for
    the caller: it names the caller's bad input) or a fixed one (the fault is the server's, and
    its message may name files, keys or backends)."""

    code: grpc.StatusCode
    fixed: str | Callable[[BaseException], str] | None = None

    def message(self, exc: BaseException) -> str:
        if self.fixed is None:
            return bounded_message(str(exc) or type(exc).__name__)
        return self.fixed if isinstance(self.fixed, str) else self.fixed(exc)


# A caller's own message quotes its input, and gRPC carries it in a trailer, percent-encoded (a
# byte up to 3): past the client's 8 KiB metadata limit, a 70 KB DNS name quoted back reached
# the caller as "Stream removed (received metadata size exceeds hard limit)", never its error.
MAX_MESSAGE_BYTES = 2048


def bounded_message(text: str) -> str:
    """`text` cut to MAX_MESSAGE_BYTES of UTF-8 (never inside a character), saying so."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= MAX_MESSAGE_BYTES:
        return text
    head = data[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore")
    return f"{head}... ({len(data) - len(head.encode())} bytes more)"


# An absolute path in free text (not the "//" or "/path" of a URI: those follow ":", "/" or a
# word character).
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/[^\s'\"]+")


def _policy_message(exc: BaseException) -> str:
    """A refused policy set, each problem named by file name only (never the directory)."""
    assert isinstance(exc, PolicyError)
    problems = [
        replace(
            p,
            file=PurePath(p.file).name,
            message=_ABSOLUTE_PATH.sub(lambda m: PurePath(m.group()).name, p.message),
        )
        for p in exc.problems
    ]
    return str(PolicyError(problems))


def _outcome_unknown_message(exc: BaseException) -> str:
    """Whether the client is told the server is stopping too (SQLite's fail-stop) or not."""
    assert isinstance(exc, CommitUnknownError)
    return OUTCOME_UNKNOWN_MESSAGE if exc.server_stops else OUTCOME_UNKNOWN_SERVING_MESSAGE


# What an outage's answer adds when its cause is a full disk: the operator reading it through
# the admin CLI knows what to free, and no path or detail of the backend is given.
DISK_FULL_NOTE = " (the datastore's disk is full)"
# PostgreSQL's disk_full.
_SQLSTATE_DISK_FULL = "53100"


def causes(exc: BaseException, limit: int = 8) -> Iterator[BaseException]:
    """`exc` and the errors it was raised from (its cause, else its unsuppressed context)."""
    cause: BaseException | None = exc
    while cause is not None and limit > 0:
        yield cause
        limit -= 1
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` comes of a full disk: ENOSPC from the file system, SQLITE_FULL from
    SQLite (its extended codes keep the primary one in the low byte), or PostgreSQL's
    disk_full, however the datastore wrapped it."""
    return any(
        getattr(c, "errno", None) == errno.ENOSPC
        or (getattr(c, "sqlite_errorcode", None) or 0) & 0xFF == sqlite3.SQLITE_FULL
        or getattr(c, "sqlstate", None) == _SQLSTATE_DISK_FULL
        for c in causes(exc)
    )


def _outage(message: str) -> Callable[[BaseException], str]:
    """The fixed answer of an outage, the full disk named when that is its cause."""
    return lambda exc: message + DISK_FULL_NOTE if disk_full(exc) else message


_SERVER_FAULT = Rule(Code.INTERNAL, INTERNAL_MESSAGE)
_STORAGE = Rule(Code.UNAVAILABLE, _outage(STORAGE_MESSAGE))

# Every error class of svidd, each by name: `status_for` looks up the first class of an
# exception's MRO found here, and tests/server/test_status.py fails for a class left out, so a
# new error type is mapped on purpose, never by falling into a parent's entry.
RULES: Mapping[type[BaseException], Rule] = {
    # server.errors: raised by handlers on purpose, with messages written for the caller.
    errors.InvalidRequestError: Rule(Code.INVALID_ARGUMENT),
    errors.NotFoundError: Rule(Code.NOT_FOUND),
    errors.AlreadyExistsError: Rule(Code.ALREADY_EXISTS),
    errors.PermissionDeniedError: Rule(Code.PERMISSION_DENIED),
    errors.UnauthenticatedError: Rule(Code.UNAUTHENTICATED),
    errors.RateLimitedError: Rule(Code.RESOURCE_EXHAUSTED),
    errors.UnavailableError: Rule(Code.UNAVAILABLE),
    errors.ConfigError: _SERVER_FAULT,
    errors.CliError: _SERVER_FAULT,
    errors.ServerError: _SERVER_FAULT,
    # Federation: a foreign bundle endpoint that is down or serves what we must refuse.
    FederationError: Rule(Code.FAILED_PRECONDITION),
    BundleNotStoredError: _STORAGE,
    # The CA: a bad CSR or request is the caller's; keys and configuration are the server's.
    CsrError: Rule(Code.INVALID_ARGUMENT),
    SigningRequestError: Rule(Code.INVALID_ARGUMENT),
    CaUnavailableError: Rule(Code.UNAVAILABLE),
    CaConfigError: _SERVER_FAULT,
    KeyStoreError: _SERVER_FAULT,
    SealedKeyError: _SERVER_FAULT,
    CaError: _SERVER_FAULT,
    # The datastore: what was missing or clashing is the caller's to know; anything else is
    # the backend's and says nothing about it.
    DsNotFoundError: Rule(Code.NOT_FOUND),
    DsAlreadyExistsError: Rule(Code.ALREADY_EXISTS),
    DsConflictError: Rule(Code.ABORTED),
    # The agent's earlier removal is still being finished (a server died midway): a retry
    # soon gets through, and the message says so.
    RemovalUnderWayError: Rule(Code.UNAVAILABLE),
    # The agent's record changed (evicted, banned, attested again) while its renewal or
    # re-attestation was signed: nothing was saved or returned; the agent attests again.
    AgentReplacedError: Rule(Code.PERMISSION_DENIED),
    DataStoreError: _STORAGE,
    StorageError: _STORAGE,
    # A commit whose fsync failed may yet be replayed from the WAL, one whose connection was
    # lost may have landed: neither done nor not done.
    CommitUnknownError: Rule(Code.UNAVAILABLE, _outcome_unknown_message),
    UnreachableError: _STORAGE,
    # The datastore's file gone from its path under the server: no write is taken.
    DatastoreMovedError: _STORAGE,
    # A replayed OAuth assertion lost its ledger write (server/oauth answers it; never gRPC).
    JtiHeldError: _STORAGE,
    # A credential's holder left while it was being issued (the two below): nothing was issued.
    HolderGoneError: Rule(Code.PERMISSION_DENIED),
    # The agent was evicted or banned while its credentials were being issued: nothing was
    # issued, and the message (naming the caller's own agent) says why.
    AgentRemovedError: Rule(Code.PERMISSION_DENIED),
    # The task ended (through any server) while its credential was being issued: nothing was
    # issued. The issuer answers its own callers as for a task it knows ended; this is the rule
    # for any other caller the error reaches.
    TaskEndedMeanwhileError: Rule(Code.PERMISSION_DENIED),
    # A fetched foreign bundle lost to a newer one another server stored with its change's
    # event (server/federation answers it as a refused bundle; this is for any other caller).
    BundleRefusedError: Rule(Code.ABORTED),
    # A removal's finisher lost its claim to another server's (removals.py answers it by
    # leaving the rest to that one; this is for any other caller): nothing was logged.
    RemovalClaimLostError: Rule(Code.ABORTED),
    # The ca-rotation lease's holder paused past its life and another server took it over:
    # its key-slot write was refused (the manager answers it; this is for any other caller).
    LeaseLostError: Rule(Code.ABORTED),
    # Another server moved the audit chain; the audit log reseals and retries, so one reaching
    # here is a storage failure like any other.
    ChainMovedError: _STORAGE,
    LegacyImportError: _SERVER_FAULT,
    # Raised at start only (a datastore missing beside its key files); never a client's.
    DatastoreLostError: _SERVER_FAULT,
    # Raised at start only (a datastore behind the audit checkpoints signed of it).
    DatastoreRolledBackError: _SERVER_FAULT,
    # Raised at start only (--restored-datastore where nothing was restored).
    RestoredFlagError: _SERVER_FAULT,
    # Raised at start only (--new-datastore where the datastore holds what a server wrote).
    NewFlagError: _SERVER_FAULT,
    # Policy: a refused reload names the files (not their directory); a bad decision request
    # is the caller's.
    PolicyError: Rule(Code.FAILED_PRECONDITION, _policy_message),
    RequestError: Rule(Code.INVALID_ARGUMENT),
    # Audit: nothing is issued that cannot be recorded (fail closed), and the client learns
    # only that; a caller's field that looks like a token is refused as input.
    AuditError: Rule(Code.UNAVAILABLE, _outage(AUDIT_MESSAGE)),
    CheckpointError: Rule(Code.UNAVAILABLE, "the server cannot record: audit checkpoint failed"),
    SecretInAuditError: Rule(Code.INVALID_ARGUMENT),
    UnstorableTextError: Rule(Code.INVALID_ARGUMENT),
    # A checkpoint line the server itself wrote or holds does not read or verify: its fault.
    AuditCheckpointError: _SERVER_FAULT,
    # The ledger (server.issuance.ledger): a credential that cannot be recorded is not sent.
    LedgerUnavailableError: Rule(Code.UNAVAILABLE, _outage(LEDGER_MESSAGE)),
    LedgerError: _STORAGE,
    # svid: unreadable IDs, certificates, tokens and bundles come from the caller.
    svid_errors.SpiffeIdError: Rule(Code.INVALID_ARGUMENT),
    svid_errors.SvidParseError: Rule(Code.INVALID_ARGUMENT),
    NonUriSanError: Rule(Code.INVALID_ARGUMENT),
    svid_errors.X509SvidError: Rule(Code.INVALID_ARGUMENT),
    svid_errors.JwtSvidError: Rule(Code.INVALID_ARGUMENT),
    svid_errors.BundleError: Rule(Code.INVALID_ARGUMENT),
    svid_errors.VerificationError: Rule(Code.PERMISSION_DENIED),
    svid_errors.RevokedError: Rule(Code.PERMISSION_DENIED),
    svid_errors.ExpiredError: Rule(Code.PERMISSION_DENIED),
    svid_errors.AudienceError: Rule(Code.PERMISSION_DENIED),
    # The Workload API client side of the library: a handler of this server never calls it,
    # so one reaching here is the server's fault.
    WorkloadApiError: _SERVER_FAULT,
    WorkloadApiUnavailableError: _SERVER_FAULT,
    WorkloadApiPermissionError: _SERVER_FAULT,
    JwtSvidValidationError: _SERVER_FAULT,
    WorkloadApiAddressError: _SERVER_FAULT,
    TaskError: _SERVER_FAULT,
    TaskDeniedError: _SERVER_FAULT,
    TaskRequestError: _SERVER_FAULT,
    TaskNotFoundError: _SERVER_FAULT,
    TaskEndedError: _SERVER_FAULT,
    # The OAuth client side (svid.httpx): no handler of this server exchanges tokens.
    svid_errors.TokenExchangeError: _SERVER_FAULT,
    # Task claims that do not read are a refused credential, like any failed verification.
    TaskClaimsError: Rule(Code.PERMISSION_DENIED),
    PeerRefusedError: Rule(Code.PERMISSION_DENIED),
    # Not the caller's doing: revocation data went stale, so verification fails closed.
    svid_errors.StaleRevocationsError: Rule(
        Code.UNAVAILABLE, "revocation data is stale: verification refused until it is fresh"
    ),
    svid_errors.SvidError: _SERVER_FAULT,
    # Storage below the domain (SQLite, the file system): the client learns no path.
    sqlite3.Error: _STORAGE,
    TimeoutError: Rule(Code.UNAVAILABLE, "the server is busy; retry"),
    OSError: _STORAGE,
}


def rule_for(exc: BaseException) -> Rule | None:
    """The rule of the nearest class of `exc` that has one; None for anything else (a bug)."""
    for kind in type(exc).__mro__:
        rule = RULES.get(kind)
        if rule is not None:
            return rule
    return None


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client sees for `exc`. Unknown errors say only 'internal'.
    A commit whose outcome is unknown says so however its error was wrapped on the way (a
    ledger's "nothing was issued" would be a lie)."""
    unknown = next((c for c in causes(exc) if isinstance(c, CommitUnknownError)), None)
    if unknown is not None:
        return Code.UNAVAILABLE, _outcome_unknown_message(unknown)
    rule = rule_for(exc)
    if rule is None:
        return Code.INTERNAL, INTERNAL_MESSAGE
    return rule.code, rule.message(exc)


ErrorHook = Callable[[grpc.StatusCode], None]

_R = TypeVar("_R")


# How often the traceback of an outage (a server-side error answered UNAVAILABLE: storage,
# the audit log) is logged, at most, for each failure (_failure).
OUTAGE_LOG_INTERVAL = 30.0


# An outage (a full disk, a datastore gone) refuses every call the same way until it ends:
# logged per call, its traceback (~3.6 KB) was written as fast as agents retried, onto the disk
# that was full, burying the one line the ledger writes when the outage begins and ends.
_outages = KeyedThrottles(OUTAGE_LOG_INTERVAL, SystemClock())


def _failure(exc: BaseException) -> Hashable:
    """What makes two outage errors the same failure: the type, errno, SQLite error code and
    PostgreSQL SQLSTATE of the error and of each error it was raised from. By type alone, a
    bug of the same type (SQLite's "no such table" is the OperationalError a locked database
    is; every psycopg error is a StorageError) went unlogged behind an outage's line."""
    return tuple(
        (
            type(cause),
            getattr(cause, "errno", None),
            getattr(cause, "sqlite_errorcode", None),
            getattr(cause, "sqlstate", None),
        )
        for cause in causes(exc)
    )


def outage_lines_due(exc: BaseException, where: str) -> int:
    """For an outage met outside a gRPC handler (the OAuth listener's requests): how many
    failures the line to log now for `where` stands for (0: none now), once per interval for
    each failure, as a handler's are."""
    return _outages.due((where, _failure(exc)))


def _report(exc: BaseException, hook: ErrorHook | None) -> tuple[grpc.StatusCode, str]:
    code, message = status_for(exc)
    rule = rule_for(exc)
    if rule is None or rule.fixed is not None:
        # The client got a fixed message: the details are for the operator only. A bug
        # (INTERNAL) is logged every time; an outage once per interval, with its count.
        times = _outages.due(_failure(exc)) if code is Code.UNAVAILABLE else 1
        if times:
            _log.error("server-side error in handler", exc_info=exc, extra={"times": times})
    if hook is not None:
        hook(code)
    return code, message


def unary(
    method: Callable[..., Awaitable[_R]],
) -> Callable[..., Awaitable[_R]]:
    """Wrap an async unary handler so domain errors abort the call with the mapped status."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> _R:
        try:
            return await method(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            code, message = _report(exc, getattr(self, "on_error", None))
            await context.abort(code, message)
            raise  # pragma: no cover - abort() always raises

    return wrapper


def stream(
    method: Callable[..., AsyncIterator[_R]],
) -> Callable[..., AsyncIterator[_R]]:
    """Like `unary`, for async-generator (server-streaming or bidi) handlers."""

    @functools.wraps(method)
    async def wrapper(
        self: Any, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[_R]:
        try:
            async for item in method(self, request, context):
                yield item
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            code, message = _report(exc, getattr(self, "on_error", None))
            await context.abort(code, message)

    return wrapper
