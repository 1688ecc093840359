"""join_token attestation: a single-use, expiring secret handed to the agent out of band.

Token format ``<token_id>.<secret>``. Only sha256(secret) is stored. The attestor only checks
the token (`check_join_token`, constant-time, a read); the admission spends it
(`admit_agent`) in the transaction that saves the agent, after the attestation's audit event is
committed, deleting the row only when id, hash and expiry all still match, in one conditional
statement: a token works once even when two agents race with it, a wrong guess never takes the
row away from its owner, and an attestation that cannot be recorded leaves the token usable.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets

from server.attestation.base import AttestationResult, Challenge
from server.datastore.base import DataStore
from server.datastore.records import JoinToken, TokenUse
from server.errors import InvalidRequestError, PermissionDeniedError
from server.ids import ServerIds
from svid._clock import Clock

TYPE_NAME = "join_token"
REFUSED = "join token is invalid, expired or already used"
# The longest a join token lives: `token generate --ttl` and join_token_ttl stop here.
MAX_TOKEN_TTL = 30 * 86400
# Matched whole (fullmatch): with match, "$" let "node-7\n" through, stored as a token whose
# agent ID cannot exist (refused only after the row was written).
_TOKEN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_join_token(now: int, ttl: int, token_id: str = "") -> tuple[str, JoinToken]:
    """A fresh token: the string for the operator and the record to store (hash only)."""
    if token_id and not _TOKEN_ID.fullmatch(token_id):
        raise InvalidRequestError(
            f"agent_id: {token_id!r} must be 1-64 characters of A-Z a-z 0-9 _ -"
        )
    token_id = token_id or secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return f"{token_id}.{secret}", JoinToken(token_id, _hash(secret), now + ttl)


class JoinTokenAttestor:
    type_name = TYPE_NAME
    # One hash and one indexed read refuse a guess, which writes nothing.
    checks_cheaply = True

    def __init__(self, datastore: DataStore, ids: ServerIds, clock: Clock) -> None:
        self._datastore = datastore
        self._ids = ids
        self._clock = clock

    async def attest(self, payload: bytes, challenge: Challenge) -> AttestationResult:
        try:
            token_id, dot, secret = payload.decode().partition(".")
        except UnicodeDecodeError:
            raise PermissionDeniedError(REFUSED) from None
        if not dot or not secret or not _TOKEN_ID.fullmatch(token_id):
            raise PermissionDeniedError(REFUSED)
        token = TokenUse(token_id, _hash(secret))
        valid = await asyncio.to_thread(
            self._datastore.check_join_token, token_id, token.secret_hash, int(self._clock.now())
        )
        if not valid:
            raise PermissionDeniedError(REFUSED)
        return AttestationResult(
            agent_id=self._ids.agent(TYPE_NAME, token_id),
            attestation_type=TYPE_NAME,
            token=token,
        )
