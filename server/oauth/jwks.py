"""The published JWKS: the trust domain's JWT keys as OIDC relying parties want them.

`use: sig` (clouds' STS check it), `alg` and `kid` on every key, only keys still within their
validity, at most MAX_KEYS. How long a client may cache the set follows from the rotation
schedule (server/ca/rotation.py): a new key is published at 1/2 of the active key's life and
signs from 5/6, so anything cached for half that lead time has seen the key before its first
token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from server.ca import rotation
from svid._jose import PublicKey, alg_for_key
from svid._jwk import public_key_members

MAX_KEYS = 8
MAX_CACHE_SECONDS = 3600


def cache_max_age(jwt_key_ttl: int) -> int:
    """Seconds a client may cache the JWKS: half the lead between a key's publication and its
    first signature, at most an hour, at least one second."""
    lead = jwt_key_ttl * (rotation.ACTIVATE_FRACTION - rotation.PREPARE_FRACTION)
    return max(1, min(MAX_CACHE_SECONDS, int(lead / 2)))


@dataclass(frozen=True, slots=True)
class PublishedKey:
    kid: str
    key: PublicKey
    not_after: int


def jwks_document(keys: Iterable[PublishedKey], now: float) -> bytes:
    """The keys valid at `now`, newest expiry first, at most MAX_KEYS."""
    live = sorted((k for k in keys if k.not_after > now), key=lambda k: -k.not_after)
    doc = {
        "keys": [
            {**public_key_members(k.key), "use": "sig", "alg": alg_for_key(k.key), "kid": k.kid}
            for k in live[:MAX_KEYS]
        ]
    }
    return json.dumps(doc, separators=(",", ":")).encode()
