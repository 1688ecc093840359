"""The one mapping from errors to gRPC status codes."""

from __future__ import annotations

import asyncio
import errno
import importlib
import logging
import pkgutil
import sqlite3
from pathlib import Path

import grpc
import pytest

from server import errors, status
from server.audit import AuditError
from server.ca.errors import CaUnavailableError, CsrError, KeyStoreError
from server.datastore import AlreadyExistsError, NotFoundError
from server.datastore.errors import (
    AgentRemovedError,
    CommitUnknownError,
    RemovalClaimLostError,
    StorageError,
)
from server.policy.errors import PolicyError, Problem, RequestError
from server.status import RULES, status_for, unary
from svid._clock import SystemClock
from svid._errors import SpiffeIdError, SvidError, SvidParseError
from svid._log_throttle import KeyedThrottles
from svid._task_errors import TaskDeniedError


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidRequestError("csr: bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFoundError("entry x not found"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExistsError("dup"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.PermissionDeniedError("no"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.UnauthenticatedError("who"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.RateLimitedError("slow"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.UnavailableError("bye"), grpc.StatusCode.UNAVAILABLE),
        (NotFoundError("entry gone"), grpc.StatusCode.NOT_FOUND),
        (AlreadyExistsError("entry exists"), grpc.StatusCode.ALREADY_EXISTS),
        (SpiffeIdError("path has a dot segment"), grpc.StatusCode.INVALID_ARGUMENT),
        (SvidParseError("garbage at offset 3"), grpc.StatusCode.INVALID_ARGUMENT),
        (CsrError("csr signature does not verify"), grpc.StatusCode.INVALID_ARGUMENT),
        (CaUnavailableError("the active CA certificate has expired"), grpc.StatusCode.UNAVAILABLE),
        # Not a storage outage: the caller's own agent was removed while it asked.
        (AgentRemovedError(["spiffe://example.org/a"]), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_domain_errors_map_to_codes_with_their_message(
    exc: Exception, code: grpc.StatusCode
) -> None:
    assert status_for(exc) == (code, str(exc))


def test_unexpected_errors_reveal_nothing() -> None:
    secret = "private key material"
    assert status_for(RuntimeError(secret)) == (grpc.StatusCode.INTERNAL, "internal error")
    assert status_for(KeyError(secret))[1] == "internal error"
    assert status_for(KeyStoreError(f"cannot read {secret}")) == (
        grpc.StatusCode.INTERNAL,
        "internal error",
    )


# -- every error type mapped on purpose ------------------------------------------------------

CALLER_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION,
}
SECRET_PATH = "/var/lib/svid-server/data/audit.db"


def project_errors() -> list[type[BaseException]]:
    """Every exception class the server's processes can raise: all of server/ and svid/
    imported, then every subclass of svidd's root, recursively."""
    import server
    import svid

    for package in (server, svid):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(module.name)
    found: list[type[BaseException]] = []
    todo: list[type[BaseException]] = [SvidError]
    while todo:
        cls = todo.pop()
        # agent_attestor's errors belong to the agent (its own process and mapping).
        if cls not in found and cls.__module__.split(".")[0] in ("server", "svid"):
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def instance(cls: type[BaseException], message: str) -> BaseException:
    if issubclass(cls, PolicyError):
        return cls([Problem(f"{SECRET_PATH}/../policies/tasks.cedar", message)])
    if issubclass(cls, TaskDeniedError):
        return cls(message, reason=message)
    if issubclass(cls, CommitUnknownError):
        return cls(SECRET_PATH, message)
    if issubclass(cls, RemovalClaimLostError):
        return cls([(f"spiffe://example.org/{SECRET_PATH}", message)])
    return cls(message)


def test_every_error_class_has_its_own_rule() -> None:
    classes = project_errors()
    assert len(classes) > 30  # the walk found the tree, not just its root
    missing = sorted(f"{c.__module__}.{c.__qualname__}" for c in classes if c not in RULES)
    assert missing == [], "map these in server/status.py RULES"


@pytest.mark.parametrize("cls", project_errors(), ids=lambda c: c.__qualname__)
def test_no_server_side_message_reaches_the_client(cls: type[BaseException]) -> None:
    exc = instance(cls, f"cannot write {SECRET_PATH}: disk I/O error")
    code, message = status_for(exc)
    rule = RULES[cls]
    if rule.fixed is None:
        # Only errors about the caller's own input pass their message on.
        assert code in CALLER_CODES
        assert message == str(exc)
    else:
        assert SECRET_PATH not in message
        assert "/var/lib" not in message


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (
            AuditError(f"cannot append to audit database {SECRET_PATH}: disk I/O error"),
            grpc.StatusCode.UNAVAILABLE,
            "the server cannot record: audit log unavailable",
        ),
        (
            sqlite3.OperationalError("database is locked"),
            grpc.StatusCode.UNAVAILABLE,
            "the server cannot record: storage unavailable",
        ),
        (
            PermissionError(13, "Permission denied", SECRET_PATH),
            grpc.StatusCode.UNAVAILABLE,
            "the server cannot record: storage unavailable",
        ),
        (
            PolicyError([Problem("/etc/svid/policies/tasks.cedar", "syntax error", 3)]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "policy set refused: tasks.cedar:3: syntax error",
        ),
        (
            PolicyError([Problem("tasks.cedar", "unknown principal spiffe://example.org/a/b")]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "policy set refused: tasks.cedar: unknown principal spiffe://example.org/a/b",
        ),
        (
            RequestError("requested_ttl: -1 is negative"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "requested_ttl: -1 is negative",
        ),
    ],
)
def test_audit_policy_and_storage_errors_are_mapped_on_purpose(
    exc: Exception, code: grpc.StatusCode, message: str
) -> None:
    assert status_for(exc) == (code, message)


# -- outage tracebacks: once per interval for the same failure, every new one at once --------


def _sqlite_errors(tmp: Path) -> tuple[sqlite3.Error, sqlite3.Error]:
    """Two real sqlite3.OperationalErrors: a locked database (an outage: another process holds
    the write lock) and a missing table (a bug: a query the schema does not answer)."""
    path = tmp / "state.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError) as locked:
            other.execute("INSERT INTO t VALUES (1)")
        holder.execute("ROLLBACK")
        with pytest.raises(sqlite3.OperationalError) as missing:
            other.execute("SELECT * FROM entries")
    finally:
        other.close()
        holder.close()
    return locked.value, missing.value


def test_a_new_storage_error_is_logged_at_once_during_an_outage_of_the_same_type(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outage tracebacks are logged once an interval (a full disk refuses every call alike),
    but a different failure of the same exception type is news: a missing table (a bug, which
    sqlite3 raises as the OperationalError a locked database is) was hidden for 30 s behind
    the lock's line. Real calls through a real gRPC server on a Unix socket."""
    locked, missing = _sqlite_errors(tmp_path)
    assert type(locked) is type(missing)
    monkeypatch.setattr(status, "_outages", KeyedThrottles(30.0, SystemClock()))
    raised: list[BaseException] = []

    class Failing:
        @unary
        async def call(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            raise raised.pop(0)

    async def calls() -> list[grpc.StatusCode]:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(Failing().call)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("t.Failing", {"Call": handler}),)
        )
        address = f"unix:{tmp_path / 's.sock'}"
        server.add_insecure_port(address)
        await server.start()
        codes = []
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                call = channel.unary_unary("/t.Failing/Call")
                for exc in (locked, locked, missing):
                    raised.append(exc)
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(b"")
                    codes.append(err.value.code())
        finally:
            await server.stop(None)
        return codes

    with caplog.at_level(logging.ERROR, logger="svid.server.status"):
        codes = asyncio.run(calls())
    assert codes == [grpc.StatusCode.UNAVAILABLE] * 3
    logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
    assert logged == [locked, missing]  # the lock once, the missing table at once


# -- a full disk is named as such -----------------------------------------------------------


def _disk_full(tmp: Path) -> sqlite3.Error:
    """A real SQLITE_FULL: the file may grow no further (max_page_count), as on a full disk."""
    db = sqlite3.connect(tmp / "full.db", isolation_level=None)
    try:
        db.execute("CREATE TABLE t (x)")
        db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
        with pytest.raises(sqlite3.Error) as full:
            db.execute("INSERT INTO t VALUES (zeroblob(100000))")
    finally:
        db.close()
    assert full.value.sqlite_errorcode == sqlite3.SQLITE_FULL
    return full.value


def _raised_from(exc: BaseException, cause: BaseException) -> BaseException:
    """`exc` as `raise exc from cause` leaves it."""
    exc.__cause__ = cause
    return exc


def test_a_full_disk_is_named_in_the_storage_message_without_a_path(tmp_path: Path) -> None:
    """An operator told only "storage unavailable" looks everywhere: the answer says the disk
    is full when SQLite (SQLITE_FULL) or the file system (ENOSPC) said so, however wrapped."""
    full = _disk_full(tmp_path)
    no_space = OSError(errno.ENOSPC, "No space left on device", SECRET_PATH)
    for exc in (
        full,
        no_space,
        _raised_from(StorageError(f"cannot record the task: {full}"), full),
        _raised_from(AuditError(f"cannot append to {SECRET_PATH}"), no_space),
    ):
        code, message = status_for(exc)
        assert code is grpc.StatusCode.UNAVAILABLE
        assert "disk is full" in message, message
        assert SECRET_PATH not in message
    # Any other storage fault says what it said.
    assert "disk is full" not in status_for(sqlite3.OperationalError("database is locked"))[1]
