"""The HTTP face: metadata and JWKS documents, and the token endpoint (RFC 6749 §3.2, §5).

The one place where OAuthErrors become responses: `{"error", "error_description"}` with the
error's status, `Cache-Control: no-store` on everything the token endpoint answers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from urllib.parse import parse_qs

from server.oauth.discovery import JWT_BEARER, METADATA_MAX_AGE, TOKEN_EXCHANGE
from server.oauth.errors import (
    InvalidRequestError,
    OAuthError,
    UnsupportedGrantTypeError,
    UnsupportedResponseTypeError,
)
from server.oauth.grants import Grants, TokenResponse
from server.oauth.http import Handler, Request, Response, json_response
from server.oauth.workers import Workers
from server.peer import address_key

_log = logging.getLogger("svid.server.oauth")
_NO_STORE = (("cache-control", "no-store"), ("pragma", "no-cache"))
FORM = "application/x-www-form-urlencoded"


def document(body: Callable[[], tuple[bytes, int]]) -> Handler:
    """A GET handler for a JSON document and its cache lifetime, read at each request (the
    JWKS changes with rotation)."""

    async def handle(request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return json_response(405, b'{"error":"invalid_request"}', ("allow", "GET"))
        data, max_age = body()
        return json_response(200, data, ("cache-control", f"public, max-age={max_age}"))

    return handle


def static_document(data: bytes) -> Handler:
    return document(lambda: (data, METADATA_MAX_AGE))


def error_response(exc: OAuthError) -> Response:
    body = json.dumps(
        {"error": exc.error, "error_description": exc.description}, separators=(",", ":")
    ).encode()
    return json_response(exc.status, body, *_NO_STORE)


def parse_form(request: Request) -> dict[str, list[str]]:
    if request.method != "POST":
        raise InvalidRequestError("the token endpoint takes POST only")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM:
        raise InvalidRequestError(f"the body must be {FORM}")
    try:
        text = request.body.decode("utf-8")
        return parse_qs(text, keep_blank_values=False, strict_parsing=bool(text), max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequestError("the body is not a valid form") from None


async def authorize(request: Request) -> Response:
    """The authorization endpoint svidd has none of (see discovery.AUTHORIZE_PATH)."""
    del request
    return error_response(
        UnsupportedResponseTypeError("no response type is served: use the token endpoint")
    )


def token_endpoint(grants: Grants, workers: Workers) -> Handler:
    async def handle(request: Request) -> Response:
        try:
            params = parse_form(request)
            grant_type = params.get("grant_type", [""])
            if len(grant_type) != 1 or not grant_type[0]:
                raise InvalidRequestError("grant_type: exactly one value is required")
            if grant_type[0] == JWT_BEARER:
                grant = grants.jwt_bearer
            elif grant_type[0] == TOKEN_EXCHANGE:
                grant = grants.token_exchange
            else:
                raise UnsupportedGrantTypeError(
                    f"grant_type {grant_type[0][:100]!r} is not supported"
                )
            # Verifying, signing and the ledger commit block: off the event loop. The client
            # is known by its address: all else in the request is its own to choose.
            client = address_key(request.client_host)
            answer: TokenResponse = await workers.run(lambda p: grant(p, client), params)
        except OAuthError as exc:
            return error_response(exc)
        body = json.dumps(answer.body(), separators=(",", ":")).encode()
        return json_response(200, body, *_NO_STORE)

    return handle
