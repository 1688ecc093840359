"""Size limits on JWT-SVID audiences, one set for the agent's Workload API and the server's
node API, so a request the agent lets through is never refused by the server for its size.

Why these numbers: a JWT travels in an HTTP header, and common servers refuse headers over 8 KB
(nginx's default buffer, Apache's LimitRequestFieldSize). 4,096 bytes of audiences grow to about
5.5 KB in base64url, leaving room for the other claims, the header and the signature. 1,024 bytes
holds any realistic URL or service name; 32 values is more than any relying party checks. The
cap also bounds every audit record and cached token that carries the audiences.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_AUDIENCES = 32
MAX_AUDIENCE_BYTES = 1024  # each, UTF-8
MAX_AUDIENCE_TOTAL_BYTES = 4096  # all of one request together, UTF-8


def utf8_size(text: str) -> int:
    # An ASCII str answers isascii() from a flag, without a scan: the common case costs nothing.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def audience_problem(audience: Sequence[str]) -> str:
    """What makes `audience` too big ("" when nothing): names the limit, never echoes a value."""
    if len(audience) > MAX_AUDIENCES:
        return f"audience: {len(audience)} values, at most {MAX_AUDIENCES} allowed"
    total = 0
    for index, value in enumerate(audience):
        size = utf8_size(value)
        if size > MAX_AUDIENCE_BYTES:
            return (
                f"audience[{index}]: {size} bytes, at most {MAX_AUDIENCE_BYTES} bytes "
                "(UTF-8) allowed per audience"
            )
        total += size
    if total > MAX_AUDIENCE_TOTAL_BYTES:
        return (
            f"audience: {total} bytes in all, at most {MAX_AUDIENCE_TOTAL_BYTES} bytes (UTF-8) "
            "allowed per request"
        )
    return ""
