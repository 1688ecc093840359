"""When to prepare, activate and drop signing keys: pure functions of `now` and slot times.

SPIRE's schedule: the next key is prepared (and published) at 1/2 of the active key's life,
activated at 5/6, and a retired key stays published until it expires.

A key whose life begins more than MAX_CLOCK_SKEW after `now` was made while a clock ran
ahead (an RTC in local time, a start before NTP synced; or, sharing keys, another server's
clock minutes ahead of this one's): nothing it signs is valid yet. Signed on with, every SVID
chained to a CA not valid yet for as long as the clock had been ahead: an active one is
retired (a new key made, or the waiting one activated), a waiting one dropped (it signed
nothing). Retired, not dropped: the SVIDs already signed with it (by every server sharing it)
verify once its time comes, and dropped, it left the bundle and they never did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.datastore.records import ACTIVE, PREPARED, RETIRED
from svid import MAX_CLOCK_SKEW

PREPARE_FRACTION = 1 / 2
ACTIVATE_FRACTION = 5 / 6


@dataclass(frozen=True, slots=True)
class SlotTimes:
    slot_id: str
    status: str
    not_before: int
    not_after: int


def prepare_at(not_before: float, not_after: float) -> float:
    return not_before + (not_after - not_before) * PREPARE_FRACTION


def activate_at(not_before: float, not_after: float) -> float:
    return not_before + (not_after - not_before) * ACTIVATE_FRACTION


@dataclass(frozen=True, slots=True)
class RotationPlan:
    """What one tick must do, in this order: drop, retire, activate, create active, prepare."""

    drop: tuple[str, ...] = ()
    retire: tuple[str, ...] = ()
    activate: str | None = None
    create_active: bool = False
    prepare: bool = False

    @property
    def empty(self) -> bool:
        return not (self.drop or self.retire or self.activate or self.create_active or self.prepare)


def plan_rotation(now: float, slots: Sequence[SlotTimes]) -> RotationPlan:
    """The changes that bring one key kind's slots in line with the schedule at `now`.

    Handles a server that was down for a while: expired keys are dropped, a waiting prepared
    key is activated when the active one is gone, and a new active key is made when nothing
    usable is left.
    """
    live = [s for s in slots if now < s.not_after and not _ahead(now, s)]
    ahead = [s for s in slots if now < s.not_after and _ahead(now, s)]
    drop = [s.slot_id for s in slots if now >= s.not_after]
    drop.extend(s.slot_id for s in ahead if s.status == PREPARED)
    retire = [s.slot_id for s in ahead if s.status == ACTIVE]
    by_start = sorted(live, key=lambda s: (s.not_before, s.slot_id))
    actives = [s for s in by_start if s.status == ACTIVE]
    prepared = [s for s in by_start if s.status == PREPARED]
    retire.extend(s.slot_id for s in actives[:-1])  # at most one active: keep the newest
    drop.extend(s.slot_id for s in prepared[:-1])  # at most one waiting: keep the newest
    active = actives[-1] if actives else None
    waiting = prepared[-1] if prepared else None

    activate: str | None = None
    create_active = False
    if active is None:
        if waiting is not None:
            activate, active, waiting = waiting.slot_id, waiting, None
        else:
            create_active = True
    elif waiting is not None and now >= activate_at(active.not_before, active.not_after):
        retire.append(active.slot_id)
        activate, active, waiting = waiting.slot_id, waiting, None

    prepare = (
        active is not None
        and waiting is None
        and now >= prepare_at(active.not_before, active.not_after)
    )
    return RotationPlan(
        drop=tuple(drop),
        retire=tuple(retire),
        activate=activate,
        create_active=create_active,
        prepare=prepare,
    )


def next_event(now: float, slots: Sequence[SlotTimes]) -> float:
    """When `plan_rotation` has something to do next: the earliest pending event, which is
    `now` or earlier when a tick is overdue (a pending event stays pending until applied)."""
    active = [s for s in slots if s.status == ACTIVE]
    if not active or any(_ahead(now, s) and s.status != RETIRED for s in slots):
        return now
    waiting = any(s.status == PREPARED for s in slots)
    times = [
        activate_at(s.not_before, s.not_after) if waiting else prepare_at(s.not_before, s.not_after)
        for s in active
    ]
    times.extend(s.not_after for s in slots)
    return min(times)


def _ahead(now: float, slot: SlotTimes) -> bool:
    """Whether `slot` was made while the clock ran ahead of `now` (see the module docstring)."""
    return slot.not_before > now + MAX_CLOCK_SKEW
