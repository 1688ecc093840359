"""FetchJWTSVID answers already built, handed out again while nothing they came from has changed.

A JWT cache hit still paid, on every call, for the request's checks, the caller's entries and a
new response message (upb builds nested messages slowly): about 45 µs of agent CPU per call over
a no-op call through the same socket, where a served answer costs 10-20 µs (measured with the
agent under bench/test_bench_agent.py's load). An answer is keyed by the caller's selectors and
the request as sent, and is served again only while

- the agent's cache is at the same version: any change of entries, SVIDs, bundles,
  revocations, or a refusal, moves it on (Cache._changed) and drops every answer, so an answer
  never outlives the entitlement it was checked against (a number, not the Snapshot itself:
  that would keep a replaced entry set alive);
- the JWT cache still holds each of its tokens, that very token (a task's end or an entry's
  removal forgets tokens, the LRU evicts, a refresh replaces): checked per answer served
  (`JwtCache.still_held`), not by the cache's `generation`, which any drop moves on. Ending
  every answer at any drop let one uid minting new audiences into a full JWT cache (each mint
  dropping one of its own tokens) end every other uid's answers, at its minting rate;
- every token in it is before its refresh point, the JWT cache's own rule (`refresh_point`),
  on the agent's monotonic clock as the cache keeps it (`JwtCache.refresh_at`, on
  `JwtCache.clock`, which answers are timed by too).

A served answer marks its tokens used in the JWT cache, so its LRU order stays true.

A protobuf message owns copies of its strings, so answers cost memory of their own: they have a
byte budget carved out of the JWT cache's (`split_budget`) and a count cap, least recently used
out first, with each uid's share of both kept as the JWT cache keeps it (uid_shares): without
one, a uid sending ever-new requests (audiences reordered, unknown fields: new bytes, new keys)
pushed every other uid's answers out, and each of their repeat calls took the slow path. An
answer belongs to the uid whose call built it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from agent_attestor.cache import Snapshot
from agent_attestor.jwt_cache import JwtCache, Key
from agent_attestor.model import Selector
from agent_attestor.signer import MintedJwt
from agent_attestor.uid_shares import UidShares, uid_share
from svid._proto import workload_pb2

AnswerKey = tuple[frozenset[Selector], bytes]
MAX_ANSWERS = 1024
# What one answer holds besides its reply's and request's bytes: the message objects and their
# arena, the dict slot, the record, its token keys. Measured by RSS growth over 20,000 answers
# with a 675-byte reply and request on CPython 3.11 with protobuf 7 (upb): 2,088 bytes each.
ANSWER_OVERHEAD = 1_400
# The share of jwt_cache_max_bytes answers may use; the JWT cache keeps the rest.
ANSWER_SHARE = 16


def split_budget(max_bytes: int) -> tuple[int, int]:
    """(JWT cache bytes, answer bytes) out of one jwt_cache_max_bytes: together never more."""
    answers = max_bytes // ANSWER_SHARE
    return max_bytes - answers, answers


def answer_key(selectors: frozenset[Selector], request: workload_pb2.JWTSVIDRequest) -> AnswerKey:
    """The caller and the request as sent. Equal bytes parse to equal fields, and the handler
    reads nothing else of the request, so one key is one answer."""
    return selectors, request.SerializeToString()


@dataclass(frozen=True, slots=True)
class _Answer:
    reply: workload_pb2.JWTSVIDResponse
    tokens: tuple[tuple[Key, MintedJwt], ...]
    until: float
    size: int
    uid: int


class JwtAnswers:
    def __init__(
        self,
        jwts: JwtCache,
        max_bytes: int,
        max_answers: int = MAX_ANSWERS,
        share: tuple[int, int] | None = None,
    ) -> None:
        """`share`: (answers, bytes) of each uid, uid_share's unless given (tests)."""
        self._jwts = jwts
        self._clock = jwts.clock  # the refresh points' clock: an answer ends at one of them
        self._max_bytes = max_bytes
        self._max_answers = max_answers
        self._answers: OrderedDict[AnswerKey, _Answer] = OrderedDict()
        self._shares: UidShares[AnswerKey] = UidShares(share or uid_share(max_answers, max_bytes))
        self._bytes = 0
        self._version = -1  # the cache's

    def get(self, key: AnswerKey, snap: Snapshot) -> workload_pb2.JWTSVIDResponse | None:
        """The answer built for `key` if it still holds for `snap` (the cache's current one)."""
        if snap.version != self._version:
            self._start(snap)
            return None
        answer = self._answers.get(key)
        if answer is None or self._clock.monotonic() >= answer.until:
            return None
        if not self._jwts.still_held(answer.tokens):
            self._drop(key)  # a token of it left the JWT cache: never served again
            return None
        self._answers.move_to_end(key)
        return answer.reply

    def put(
        self,
        key: AnswerKey,
        snap: Snapshot,
        generation: int,
        reply: workload_pb2.JWTSVIDResponse,
        tokens: Sequence[tuple[Key, MintedJwt, float]],
        *,
        uid: int,
    ) -> None:
        """Keep `reply`, built for a caller of `uid` from `snap` and these (token key, token,
        refresh point) while the JWT cache was at `generation`. Built across a mint, it may be
        stale: kept only if the JWT cache dropped nothing meanwhile (and `get` checks its
        tokens are still held), and the agent's cache has not moved on since."""
        if not tokens or snap.version != self._version or generation != self._jwts.generation:
            return
        size = ANSWER_OVERHEAD + reply.ByteSize() + len(key[1])
        if size > self._max_bytes:
            return
        self._drop(key)
        answers = self._answers
        until = min(u for _, _, u in tokens)
        answers[key] = _Answer(reply, tuple((k, j) for k, j, _ in tokens), until, size, uid)
        self._bytes += size
        self._shares.add(uid, key, size)
        while len(answers) > self._max_answers or self._bytes > self._max_bytes:
            lru = next(iter(answers))
            self._drop(self._shares.victim(uid, lru, answers[lru].uid))

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._answers)

    def _start(self, snap: Snapshot) -> None:
        self._answers.clear()
        self._shares.clear()
        self._bytes = 0
        self._version = snap.version

    def _drop(self, key: AnswerKey) -> None:
        gone = self._answers.pop(key, None)
        if gone is not None:
            self._bytes -= gone.size
            self._shares.remove(gone.uid, key, gone.size)
