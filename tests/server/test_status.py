"""The one mapping from errors to gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from server import errors
from server.ca.errors import CaUnavailableError, CsrError, KeyStoreError
from server.datastore import AlreadyExistsError, NotFoundError
from server.status import status_for
from svid._errors import SpiffeIdError, SvidParseError


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
