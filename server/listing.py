"""Paged listing for the admin API: page sizes, opaque page tokens, filters. Pure functions.

Pages are keyset-based: items sort by a unique key (an entry's id, an agent's SPIFFE ID) and a
page token carries the last key served, so a listing that runs while others write never
repeats an item and never skips one that existed throughout; an item created meanwhile shows
up when its key sorts after the cursor. A token is bound to the filters it was issued for.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from server.datastore.records import Selector
from server.errors import InvalidRequestError
from server.sorted_keys import SortedKeys
from svid._errors import SpiffeIdError
from svid._proto import admin_pb2
from svid._spiffe_id import SpiffeId

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 5000
# A page ends early once its items reach this many bytes: far enough below gRPC's default
# 4 MiB message limit that the reply's framing and one more large entry still fit.
MAX_PAGE_BYTES = 2 * 1024 * 1024
_TOKEN_VERSION = 1

_T = TypeVar("_T")
_M = TypeVar("_M", bound=Message)


def page_size(requested: int) -> int:
    if requested < 0 or requested > MAX_PAGE_SIZE:
        raise InvalidRequestError(
            f"page_size: {requested} is out of range (0 for the default {DEFAULT_PAGE_SIZE}, "
            f"at most {MAX_PAGE_SIZE})"
        )
    return requested or DEFAULT_PAGE_SIZE


def _query_digest(query: Sequence[object]) -> str:
    return hashlib.sha256(json.dumps(list(query)).encode()).hexdigest()[:16]


def encode_token(after: str, query: Sequence[object]) -> str:
    raw = json.dumps([_TOKEN_VERSION, after, _query_digest(query)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, query: Sequence[object]) -> str:
    """The key a page starts after ("" for the first page)."""
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, after, digest = json.loads(raw)
    # RecursionError: JSON nested deeper than the parser goes (a forged token, not our fault).
    except (binascii.Error, ValueError, TypeError, RecursionError):
        raise InvalidRequestError(
            "page_token: not a token this server issued (pass next_page_token as it came)"
        ) from None
    if version != _TOKEN_VERSION or not isinstance(after, str):
        raise InvalidRequestError("page_token: not a token this server issued")
    if digest != _query_digest(query):
        raise InvalidRequestError(
            "page_token: issued for a listing with different filters; repeat the same filters "
            "to page on, or start again without a token"
        )
    return after


def spiffe_id_prefix(text: str) -> str:
    """The checked prefix ("" for none), without a trailing slash."""
    if not text:
        return ""
    trimmed = text.rstrip("/") if text.count("/") > 2 else text
    try:
        return str(SpiffeId.parse(trimmed))
    except SpiffeIdError as exc:
        raise InvalidRequestError(f"spiffe_id_prefix: {exc}") from None


def under_prefix(spiffe_id: str, prefix: str) -> bool:
    """Path-segment aware: spiffe://td/a covers spiffe://td/a and spiffe://td/a/b, not .../ab."""
    return not prefix or spiffe_id == prefix or spiffe_id.startswith(prefix + "/")


@dataclass(frozen=True)
class SelectorFilter:
    """Matches a selector set against the filter's selectors (each compared exactly)."""

    selectors: frozenset[Selector]
    match: int  # an admin_pb2.SelectorMatch value

    @classmethod
    def of(cls, selectors: Iterable[Selector], match: int) -> SelectorFilter:
        wanted = frozenset(selectors)
        for s in wanted:
            if not s.type or not s.value:
                raise InvalidRequestError(
                    f"selectors: {s.type}:{s.value!r} needs a type and a value (e.g. unix:uid:1000)"
                )
        if match not in admin_pb2.SelectorMatch.values():
            raise InvalidRequestError(f"selector_match: unknown value {match}")
        return cls(wanted, match)

    def key(self) -> list[object]:
        return [sorted(str(s) for s in self.selectors), self.match]

    def matches(self, have: Iterable[Selector]) -> bool:
        if not self.selectors:
            return True
        present = frozenset(have)
        if self.match == admin_pb2.SELECTOR_MATCH_EXACT:
            return present == self.selectors
        if self.match == admin_pb2.SELECTOR_MATCH_ANY:
            return not present.isdisjoint(self.selectors)
        return self.selectors <= present


def keys_after(keys: Sequence[str] | SortedKeys, after: str) -> Iterator[str]:
    """The keys of `keys` (sorted) greater than `after` ("": all), in order."""
    if isinstance(keys, SortedKeys):
        return keys.after(after)
    start = bisect.bisect_right(keys, after) if after else 0
    return (keys[position] for position in range(start, len(keys)))


def paginate(
    keys: Sequence[str] | SortedKeys,
    after: str,
    limit: int,
    *,
    load: Callable[[str], _T | None],
    keep: Callable[[_T], bool],
    encode: Callable[[_T], _M],
) -> tuple[list[_M], str]:
    """One page: the encoded items after `after` in `keys` (sorted) that `keep` accepts, and
    the key to continue after ("" when no later item is kept). As `take_page`."""

    def kept() -> Iterator[tuple[str, _T]]:
        for key in keys_after(keys, after):
            item = load(key)
            if item is not None and keep(item):
                yield key, item

    return take_page(kept(), limit, encode)


def take_page(
    items: Iterable[tuple[str, _T]], limit: int, encode: Callable[[_T], _M]
) -> tuple[list[_M], str]:
    """One page of `items` (key, item), in key order from the cursor on, encoded; and the key
    to continue after ("" when `items` ran out, so the last page is never an empty one).

    Stops at `limit` items or MAX_PAGE_BYTES, whichever comes first; a page always holds at
    least one item when any is left, however large. A source that reads a page from a store
    hands over limit + 1 items: the one past the limit says a later page exists.
    """
    page: list[_M] = []
    size = 0
    last = ""
    for key, item in items:
        if len(page) >= limit:
            return page, last  # a later item exists: the token continues after this page
        message = encode(item)
        size += message.ByteSize()
        if page and size > MAX_PAGE_BYTES:
            return page, last
        page.append(message)
        last = key
    return page, ""
