"""Verify the audit chain, alone or against anchors kept outside the database.

What a verify proves, from one consistent snapshot of the database:

- Without an anchor: every row hashes to its stored hash and stores policy_ids and extra as
  the canonical text of what was hashed (the hash covers them decoded), rows are consecutive
  from seq 1 and each names the hash of the one before, and the head row names the last row.
  An edit, a deleted or reordered row, or a deleted tail whose head row was left alone is found.
- With anchors (signed checkpoints, or a `seq:hash` an operator noted): also that the log
  still holds, at each anchor's seq, the event with the anchor's hash. That finds a deleted
  tail with a rewritten head (TRUNCATED), an emptied log (WIPED), dropped tables
  (MISSING_TABLES), and an edit followed by re-hashing every later event (RECHAINED: the
  chain has no key, a checkpoint has). Seq 0 is no event but the genesis before the first,
  hash 0…0 in every chain: a checkpoint signed before the first event names it (and must name
  that hash, else it is a BAD_ANCHOR); a `seq:hash` noted at seq 0 is refused, as it would pass
  any log.

After retention pruned the oldest events (server/audit/retention.py), the chain starts at the
`audit_base` row: the (seq, hash) of the last pruned event, which the first kept event links to.
Without a checkpoint file the base is taken as it is (the output says so). With one, the base
must be vouched for by a prune record signed with the trusted key: one at the base's seq with
its hash, or a later one the chain from the base reaches with that record's hash (a prune whose
batches were cut short). A base no signed record reaches is FORGED_BASE: events were removed
without a prune. Anchors at or before a base a signed record vouches for name pruned events and
are not looked for; every check above holds for the events kept. A `seq:hash` noted by hand at or
before a base no signed record vouches for is FORGED_BASE too: nothing shows those events were
pruned rather than deleted.

What it does not prove: anything about events after the newest anchor (someone who can write
the database can still rewrite or drop those); that an anchor file was not replaced wholesale
by someone who also holds a signing key you trust (pin the public key you shipped elsewhere);
or that the server recorded every event it should have (only that what it recorded is intact).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from server.audit.errors import AuditError
from server.audit.event import GENESIS_HASH, AuditEvent, canonical_json, event_from_row
from server.datastore.base import AuditStore
from server.datastore.records import AuditSnapshot, Head


class Break(StrEnum):
    """How a chain is broken, as far as the evidence tells."""

    EDITED = "edited"  # a row's content no longer matches its own hash
    DELETED = "deleted"  # a gap in seq: rows removed from the middle
    RELINKED = "relinked"  # prev_hash does not match: a row before was rewritten or reordered
    TRUNCATED = "truncated"  # the recorded head (or the anchor) is past the last row
    HEAD_MISMATCH = "head_mismatch"  # the head row disagrees with the last row
    UNREADABLE = "unreadable"  # a row cannot even be decoded into an event
    WIPED = "wiped"  # no events at all, but an anchor names some
    MISSING_TABLES = "missing_tables"  # the audit tables were dropped
    RECHAINED = "rechained"  # a self-consistent chain whose hash at an anchor's seq differs
    FORGED_BASE = "forged_base"  # the chain starts after a base no signed prune record names
    BAD_ANCHOR = "bad_anchor"  # the anchor itself is unreadable, unsigned or contradictory
    YOUNG_PRUNE = "young_prune"  # a prune removed events younger than the retention (prune_age)


# What decoding a row, or encoding it again to hash it, raises on a value no event holds (text
# that is not hex or JSON, a blob, JSON that is not an object, a float out of JSON's range, JSON
# nested past the parser's depth): the row is reported, never a crash of the walk.
UNREADABLE = (AuditError, ValueError, TypeError, RecursionError)


def unreadable(error: BaseException) -> str:
    """Why a row is UNREADABLE, for the finding: text that is not UTF-8 reaches the walk as
    lone surrogates (server/datastore/sqlite_audit.py LENIENT_TEXT), whose encoding error
    would name a character no one wrote."""
    if isinstance(error, UnicodeEncodeError) and "surrogates" in str(error.reason):
        return "a text column holds bytes that are not UTF-8"
    return str(error)


@dataclass(frozen=True)
class Anchor:
    """A head recorded outside the database: the event at `seq` must still have `hash`."""

    seq: int
    hash: str
    count: int | None = None
    # Names the anchor in findings, e.g. "checkpoint of 2026-12-05T07:00:00Z".
    source: str = "the anchor"
    # Signed with the checkpoint key (from a checkpoint file), not a SEQ:HASH someone noted.
    signed: bool = False
    # A prune record: events through `seq` were removed by retention, and the remaining
    # chain links to `hash`.
    pruned: bool = False

    @classmethod
    def parse(cls, text: str) -> Anchor:
        """`SEQ:HASH`, as printed by a verify or a checkpoint."""
        seq, _, digest = text.partition(":")
        # ASCII digits only: str.isdigit also takes "²" (which int() refuses) and "٣" (which
        # int() reads as 3, an anchor the operator never noted).
        if (
            not (seq.isascii() and seq.isdigit())
            or len(digest) != 64
            or set(digest) - set("0123456789abcdef")
        ):
            raise AuditError(f"anchor {text[:100]!r} is not SEQ:HASH (a number, 64 hex digits)")
        if int(seq) == 0:
            # Seq 0 is no event but the genesis before the first, the same in every chain:
            # an anchor there would pass any log, emptied or rewritten, and protect nothing.
            raise AuditError(
                f"anchor {text[:100]!r} names seq 0, which is no event: events start at seq 1 "
                "and seq 0 is the chain's genesis (hash 0…0 in every log), so it checks "
                "nothing; give the head a verify printed (SEQ:HASH, seq 1 or more)"
            )
        return cls(int(seq), digest, source=f"the anchor seq {int(seq)}")


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    head: Head | None
    broken_seq: int | None = None
    broken_event_id: str | None = None
    problem: Break | None = None
    detail: str = ""
    # The newest anchor the log was checked against (None: no anchor given).
    anchor: Anchor | None = None
    # Where the chain starts after retention pruned older events (None: from genesis), the
    # prune record that vouches for it, and how many anchors named events pruned since.
    base: Head | None = None
    base_anchor: Anchor | None = None
    pruned_anchors: int = 0

    def __str__(self) -> str:
        if self.ok:
            head = f"seq {self.head.seq} hash {self.head.hash}" if self.head else "empty"
            if self.anchor is None and self.base_anchor is None:
                against = " (no anchor: a cut tail with a rewritten head would pass; see --anchor)"
            elif self.anchor is None:
                against = ""
            else:
                against = f"; matches {self.anchor.source}"
            return f"audit chain OK: {self.checked} events, head {head}{self._pruned()}{against}"
        where = "" if self.broken_seq is None else f" at seq {self.broken_seq}"
        event = "" if self.broken_event_id is None else f" (event {self.broken_event_id})"
        return f"audit chain BROKEN{where}{event}: {self.problem}: {self.detail}"

    def _pruned(self) -> str:
        if self.base is None:
            return ""
        text = f"; {self.base.seq} events pruned through seq {self.base.seq}"
        if self.base_anchor is None:
            text += " (the prune base is unchecked without a checkpoint file: see --anchor)"
        elif self.base_anchor.seq == self.base.seq:
            text += f" (signed by {self.base_anchor.source})"
        else:
            cover = self.base_anchor
            text += f" (a prune through seq {cover.seq} cut short, {cover.source})"
        if self.pruned_anchors:
            text += f"; {self.pruned_anchors} older checkpoint(s) name pruned events"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "head": None if self.head is None else {"seq": self.head.seq, "hash": self.head.hash},
            "broken_seq": self.broken_seq,
            "broken_event_id": self.broken_event_id,
            "problem": str(self.problem) if self.problem else None,
            "detail": self.detail,
            "anchor": None if self.anchor is None else self.anchor.source,
            "pruned_through": None if self.base is None else self.base.seq,
            "base": None if self.base is None else {"seq": self.base.seq, "hash": self.base.hash},
            "base_signed_by": None if self.base_anchor is None else self.base_anchor.source,
        }


def verify_store(store: AuditStore, anchors: Sequence[Anchor] = ()) -> VerifyResult:
    """Verify one consistent snapshot of `store`.

    Read anchors before calling: the log only grows, so an anchor read first is never ahead
    of the snapshot taken after it.
    """
    with store.audit_snapshot() as snapshot:
        return verify_snapshot(snapshot, anchors)


def verify_snapshot(snapshot: AuditSnapshot, anchors: Sequence[Anchor] = ()) -> VerifyResult:
    """Walk the whole chain; the first break found is reported with its seq and event id."""
    genesis = next((a for a in anchors if a.seq == 0 and a.hash != GENESIS_HASH), None)
    if genesis is not None:
        # Seq 0 is the genesis every chain starts from: an anchor there (a checkpoint of an
        # empty log) must name its hash, else it is contradictory rather than merely unmet.
        return _broken(
            0,
            None,
            None,
            Break.BAD_ANCHOR,
            f"{genesis.source} names seq 0 with hash {genesis.hash[:16]}…, but seq 0 is "
            f"no event: it is the chain's genesis, whose hash is {GENESIS_HASH[:16]}… in "
            "every log",
        )
    newest = max(anchors, key=lambda a: a.seq, default=None)
    if snapshot.missing_tables:
        names = " and ".join(snapshot.missing_tables)
        expected = "" if newest is None else f"; {newest.source} names {_events(newest)}"
        return _broken(0, None, None, Break.MISSING_TABLES, f"table {names} dropped{expected}")
    base = snapshot.base
    base_seq, base_hash = (0, GENESIS_HASH) if base is None else (base.seq, base.hash)
    cover = _base_cover(base_seq, base_hash, anchors)
    if isinstance(cover, VerifyResult):
        return cover
    if cover is None and base_seq:
        # An anchor noted by hand behind a base nothing signed: a base row and a DELETE are
        # all it takes to make it name "pruned" events, so it is not dropped unseen.
        behind = next((a for a in anchors if not a.signed and a.seq <= base_seq), None)
        if behind is not None:
            return _broken(
                0,
                base_seq,
                None,
                Break.FORGED_BASE,
                f"{behind.source} names seq {behind.seq}, at or before the log's base row "
                f"(seq {base_seq}), and no signed prune record vouches for that base: events "
                f"1..{base_seq} may have been removed without a prune; verify against the "
                "checkpoint file, which holds the prune records",
            )
    # Anchors at or before the base name events retention removed: the prune record that
    # covers the base vouches for that removal, so they are not looked for.
    by_seq = {a.seq: a for a in anchors if a.seq > base_seq}
    matched: Anchor | None = None
    prev_hash = base_hash
    expected_seq = base_seq + 1
    checked = 0
    last: AuditEvent | None = None
    for row in snapshot.rows():
        seq, event_id = row.get("seq"), row.get("event_id")
        try:
            event = event_from_row(row)
            digest = event.compute_hash()
        except UNREADABLE as e:
            return _broken(checked, seq, event_id, Break.UNREADABLE, unreadable(e))
        if digest != event.hash:
            return _broken(
                checked, seq, event_id, Break.EDITED, "content does not match the stored hash"
            )
        uncanonical = _uncanonical(row, event)
        if uncanonical:
            return _broken(checked, seq, event_id, Break.EDITED, uncanonical)
        if event.seq != expected_seq:
            if event.seq <= base_seq:
                return _broken(
                    checked,
                    seq,
                    event_id,
                    Break.RELINKED,
                    f"seq {event.seq} is at or before the prune base (seq {base_seq})",
                )
            if event.seq < expected_seq:
                return _broken(
                    checked, seq, event_id, Break.RELINKED, f"seq {event.seq} out of order"
                )
            return _broken(
                checked,
                seq,
                event_id,
                Break.DELETED,
                f"events {expected_seq}..{event.seq - 1} are missing",
            )
        if event.prev_hash != prev_hash:
            before = "the prune base" if expected_seq == base_seq + 1 and base_seq else "event"
            return _broken(
                checked,
                seq,
                event_id,
                Break.RELINKED,
                f"prev_hash does not match {before} {expected_seq - 1}: it was rewritten or "
                "reordered",
            )
        anchor = by_seq.get(event.seq)
        if anchor is not None:
            if event.hash != anchor.hash:
                since = "" if matched is None else f" after seq {matched.seq} (which matches)"
                return _broken(
                    checked,
                    seq,
                    event_id,
                    Break.RECHAINED,
                    f"the chain is whole but its hash here differs from {anchor.source}: an "
                    f"event at or before seq {event.seq}{since} was rewritten and the chain "
                    "re-hashed",
                )
            matched = anchor
        prev_hash = event.hash
        expected_seq += 1
        checked += 1
        last = event
    last_seq = base_seq if last is None else last.seq
    # Seqs run from 1 without gaps, so the events ever written are the pruned ones plus these.
    if newest is not None and (
        newest.seq > last_seq or (newest.count is not None and newest.count > base_seq + checked)
    ):
        if checked == 0 and base_seq == 0:
            return _broken(
                0,
                None,
                None,
                Break.WIPED,
                f"the log is empty but {newest.source} names {_events(newest)}",
            )
        return _broken(
            checked,
            last_seq + 1,
            None,
            Break.TRUNCATED,
            f"{newest.source} names {_events(newest)} but the log ends at seq {last_seq}",
        )
    head = snapshot.head
    if head is not None and head.seq > last_seq:
        return _broken(
            checked,
            last_seq + 1,
            None,
            Break.TRUNCATED,
            f"the head records seq {head.seq} but the log ends at seq {last_seq}",
        )
    # Everything pruned: the base is then the last event the log ever wrote.
    tail = Head(last.seq, last.hash) if last is not None else base
    if tail is not None and head != tail:
        return _broken(
            checked,
            tail.seq,
            None if last is None else last.event_id,
            Break.HEAD_MISMATCH,
            "the head row does not name the last event",
        )
    return VerifyResult(
        ok=True,
        checked=checked,
        head=head,
        anchor=newest if newest is not None and newest.seq > base_seq else None,
        base=base,
        base_anchor=cover,
        pruned_anchors=sum(1 for a in anchors if a.seq <= base_seq and not a.pruned),
    )


def verify_segment(start: Head, rows: Iterable[dict[str, Any]], head: Head) -> VerifyResult:
    """Whether the stored chain runs from `start` (a (seq, hash) signed earlier) to `head`:
    `rows` are the events after start.seq through head.seq, in seq order; each must hash to
    its stored hash, follow the one before without a gap and name its hash, the first naming
    `start`'s; the last must be `head`. What a checkpointer checks before it signs a head other
    writers moved: a history rewritten at or before `start` no longer chains from it.
    """
    if head.seq < start.seq:
        return _broken(
            0,
            head.seq,
            None,
            Break.TRUNCATED,
            f"the stored head is seq {head.seq}, behind the last signed seq {start.seq}",
        )
    prev_hash, expected_seq, checked = start.hash, start.seq + 1, 0
    for row in rows:
        seq, event_id = row.get("seq"), row.get("event_id")
        try:
            event = event_from_row(row)
            digest = event.compute_hash()
        except UNREADABLE as e:
            return _broken(checked, seq, event_id, Break.UNREADABLE, unreadable(e))
        if digest != event.hash:
            return _broken(
                checked, seq, event_id, Break.EDITED, "content does not match the stored hash"
            )
        uncanonical = _uncanonical(row, event)
        if uncanonical:
            return _broken(checked, seq, event_id, Break.EDITED, uncanonical)
        if event.seq != expected_seq:
            return _broken(
                checked,
                seq,
                event_id,
                Break.DELETED if event.seq > expected_seq else Break.RELINKED,
                f"seq {event.seq} where seq {expected_seq} should follow",
            )
        if event.prev_hash != prev_hash:
            return _broken(
                checked,
                seq,
                event_id,
                Break.RELINKED,
                f"prev_hash does not name event {expected_seq - 1}"
                + (" as signed" if expected_seq == start.seq + 1 else "")
                + ": the chain was rewritten",
            )
        prev_hash = event.hash
        expected_seq += 1
        checked += 1
        if event.seq == head.seq:
            break
    if expected_seq - 1 != head.seq:
        return _broken(
            checked,
            expected_seq,
            None,
            Break.TRUNCATED,
            f"the stored head is seq {head.seq} but the events end at seq {expected_seq - 1}",
        )
    if prev_hash != head.hash:
        return _broken(
            checked,
            head.seq,
            None,
            Break.HEAD_MISMATCH,
            "the head row does not name the last event"
            if checked
            else f"the stored head gives seq {head.seq} another hash than the one signed",
        )
    return VerifyResult(ok=True, checked=checked, head=head)


def _uncanonical(row: dict[str, Any], event: AuditEvent) -> str:
    """Why the row's stored policy_ids or extra is not the text the log writes for what was
    hashed, or "" when both are. The hash covers the decoded values, not the stored text: an
    object of the attacker's text as policy_ids (whose keys decode as the same ids), or an
    extra with a duplicate key (SQLite's JSON functions read the first, Python the last),
    would hash as the event did while a reader of the row sees something else."""
    policy_text, extra_text = row.get("policy_ids"), row.get("extra")
    # Nearly every row: nothing to decode again.
    if policy_text != "[]" and (
        any(type(p) is not str for p in event.policy_ids)
        or policy_text != canonical_json(list(event.policy_ids)).decode()
    ):
        return "policy_ids is stored as other text than the array of strings that was hashed"
    if extra_text != "{}" and (
        type(event.extra) is not dict or extra_text != canonical_json(event.extra).decode()
    ):
        return "extra is stored as other text than the object that was hashed"
    return ""


def _base_cover(
    base_seq: int, base_hash: str, anchors: Sequence[Anchor]
) -> Anchor | VerifyResult | None:
    """The signed prune record that vouches for the base, a FORGED_BASE break, or None (no
    base, or no signed anchors to check it against).

    A base at a prune record's seq must have its hash. A base before the newest prune record
    is a prune cut short (batches commit one by one): the chain from it must reach that
    record's seq with that record's hash, which the walk checks as for any anchor.
    """
    if not base_seq or not any(a.signed for a in anchors):
        return None
    prunes = sorted((a for a in anchors if a.pruned and a.seq >= base_seq), key=lambda a: a.seq)
    if not prunes:
        return _broken(
            0,
            base_seq,
            None,
            Break.FORGED_BASE,
            f"the log starts after seq {base_seq} (its base row) but no signed prune record "
            "reaches that far: events were removed without a prune, or the anchor file is "
            "older than the last prune",
        )
    first = prunes[0]
    if first.seq == base_seq and first.hash != base_hash:
        return _broken(
            0,
            base_seq,
            None,
            Break.FORGED_BASE,
            f"the base row names seq {base_seq} with hash {base_hash[:16]}… but "
            f"{first.source} signed hash {first.hash[:16]}…",
        )
    return first


def _events(anchor: Anchor) -> str:
    count = anchor.seq if anchor.count is None else anchor.count
    return f"seq {anchor.seq} ({count} events)"


def _broken(checked: int, seq: Any, event_id: Any, problem: Break, detail: str) -> VerifyResult:
    return VerifyResult(
        ok=False,
        checked=checked,
        head=None,
        broken_seq=seq if isinstance(seq, int) else None,
        broken_event_id=event_id if isinstance(event_id, str) else None,
        problem=problem,
        detail=detail,
    )
