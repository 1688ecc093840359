"""An immutable sorted set of string keys whose updates cost what they touch.

The admin listing pages through every entry id in order. Sorting all ids again for each entry
snapshot (one per write) took 0.4 s at 200k entries, and a sort holds the GIL however it is
run: the server's event loop stood still meanwhile. Kept in chunks, a change re-sorts only the
chunks its keys fall in and shares the rest with the previous version.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator

# Keys per chunk when built; a chunk grown past twice this is split.
CHUNK = 64


class SortedKeys:
    __slots__ = ("_chunks", "_len", "_maxes")

    def __init__(
        self,
        chunks: tuple[tuple[str, ...], ...] = (),
        maxes: tuple[str, ...] | None = None,
        length: int | None = None,
    ) -> None:
        self._chunks = chunks
        self._maxes = maxes if maxes is not None else tuple(c[-1] for c in chunks)
        self._len = length if length is not None else sum(len(c) for c in chunks)

    @classmethod
    def of(cls, keys: Iterable[str]) -> SortedKeys:
        ordered = sorted(set(keys))
        return cls(tuple(tuple(ordered[n : n + CHUNK]) for n in range(0, len(ordered), CHUNK)))

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self._chunks)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        n = bisect.bisect_left(self._maxes, key)
        return n < len(self._chunks) and key in self._chunks[n]

    def after(self, key: str) -> Iterator[str]:
        """The keys greater than `key` ("": all of them), in order."""
        if not key:
            yield from self
            return
        n = bisect.bisect_right(self._maxes, key)
        if n == len(self._chunks):
            return
        chunk = self._chunks[n]
        yield from chunk[bisect.bisect_right(chunk, key) :]
        yield from itertools.chain.from_iterable(self._chunks[n + 1 :])

    def evolve(self, added: Iterable[str] = (), removed: Iterable[str] = ()) -> SortedKeys:
        """A new set with `added` in and `removed` out (a key in both ends up in)."""
        if not self._chunks:
            return SortedKeys.of(added)
        last = len(self._chunks) - 1
        ins: dict[int, set[str]] = {}
        outs: dict[int, set[str]] = {}
        for key in removed:
            n = bisect.bisect_left(self._maxes, key)
            if n <= last:  # past the greatest key: not in the set
                outs.setdefault(n, set()).add(key)
        for key in added:
            ins.setdefault(min(bisect.bisect_left(self._maxes, key), last), set()).add(key)
        chunks = list(self._chunks)
        length = self._len
        split = False
        for n in ins.keys() | outs.keys():
            chunk = chunks[n]
            if n in outs:
                gone = outs[n]
                chunk = tuple(k for k in chunk if k not in gone)
            if n in ins:
                new = tuple(k for k in ins[n] if not _holds(chunk, k))
                # A sorted run and a few keys: the sort is a near-linear merge.
                chunk = tuple(sorted(chunk + new)) if new else chunk
            length += len(chunk) - len(chunks[n])
            split = split or not chunk or len(chunk) > 2 * CHUNK
            chunks[n] = chunk
        if split:  # rare: only then is every chunk looked at
            fresh: list[tuple[str, ...]] = []
            for chunk in chunks:
                if len(chunk) > 2 * CHUNK:
                    fresh.extend(chunk[i : i + CHUNK] for i in range(0, len(chunk), CHUNK))
                elif chunk:
                    fresh.append(chunk)
            return SortedKeys(tuple(fresh))
        maxes = list(self._maxes)
        for n in ins.keys() | outs.keys():
            maxes[n] = chunks[n][-1]
        return SortedKeys(tuple(chunks), tuple(maxes), length)


def _holds(chunk: tuple[str, ...], key: str) -> bool:
    n = bisect.bisect_left(chunk, key)
    return n < len(chunk) and chunk[n] == key
