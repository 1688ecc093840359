"""Each uid's share of a bounded LRU (agent_attestor/jwt_cache.py says why): the books of who
holds what, and which entry makes room when the LRU is full.

When room is needed, an entry of a uid past its share goes first: the inserting uid's own oldest
if it is past, else the oldest of another uid past its share (its least recently used when that
is the least recently used of all, as when it is alone); only when no uid is past its share does
the least recently used entry go. So a flooding uid recycles its own slots, while a lone busy uid
may still use the whole LRU. The books are kept on insert and drop only: a hit does no more.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

_K = TypeVar("_K", bound=Hashable)

# A uid's share: an eighth of each bound, so that at least eight uids fill the LRU before any is
# pushed out by another, but never fewer than 64 entries (a workload's usual handful of
# audiences, many times over) when the LRU is small.
SHARE_DIVISOR = 8
SHARE_FLOOR = 64


def uid_share(max_entries: int, max_bytes: int) -> tuple[int, int]:
    """(entries, bytes) one uid may hold before its entries are the first to make room. The
    byte share is the same fraction of max_bytes as the entries' share is of max_entries."""
    entries = max(SHARE_FLOOR, max_entries // SHARE_DIVISOR)
    if entries >= max_entries:
        return max_entries, max_bytes
    return entries, max_bytes * entries // max_entries


@dataclass(slots=True)
class _Books(Generic[_K]):
    """One uid's entries, oldest inserted first (a hit does not reorder them), and their bytes."""

    keys: dict[_K, None] = field(default_factory=dict)
    bytes: int = 0


class UidShares(Generic[_K]):
    def __init__(self, share: tuple[int, int]) -> None:
        """`share`: (entries, bytes) one uid may hold (uid_share's, or a test's)."""
        self._share_entries, self._share_bytes = share
        self._books: dict[int, _Books[_K]] = {}
        # The uids past their share, in the order they went past it: who makes room first.
        self._over: dict[int, None] = {}

    def add(self, uid: int, key: _K, size: int) -> None:
        books = self._books.get(uid)
        if books is None:
            books = self._books[uid] = _Books()
        books.keys[key] = None
        books.bytes += size
        self._weigh(uid, books)

    def remove(self, uid: int, key: _K, size: int) -> None:
        books = self._books[uid]
        del books.keys[key]
        books.bytes -= size
        if books.keys:
            self._weigh(uid, books)
        else:
            del self._books[uid]
            self._over.pop(uid, None)

    def victim(self, uid: int, lru: _K, lru_uid: int) -> _K:
        """The entry that makes room for one of `uid`'s; `lru` is the least recently used of
        all, `lru_uid` its owner's."""
        over = self._over
        heavy = uid if uid in over else next(iter(over), None)
        if heavy is None or lru_uid == heavy:
            return lru  # the least recently used of all, or of that uid (as when it is alone)
        # Its oldest inserted, not its least recently used: a hit does not reorder the books.
        return next(iter(self._books[heavy].keys))

    def clear(self) -> None:
        self._books.clear()
        self._over.clear()

    def _weigh(self, uid: int, books: _Books[_K]) -> None:
        if len(books.keys) > self._share_entries or books.bytes > self._share_bytes:
            self._over.setdefault(uid)
        else:
            self._over.pop(uid, None)
