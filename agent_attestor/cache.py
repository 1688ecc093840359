"""The agent's in-memory state with change fan-out to open Workload API streams.

Mutated only on the event loop (sync and rotation apply their results there), so a stream
computes its full-state message without locks and without ever asking the server. Every change
costs what changed, not what is held: entries are indexed by selector (selector_index), and a
new SVID wakes only the streams served its entry (watchers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from agent_attestor._crypto import unverifiable
from agent_attestor.model import Entry, IssuedSvid, Selector, TrustBundle
from agent_attestor.selector_index import SelectorIndex
from agent_attestor.watchers import Signal, Watchers
from svid import Clock, SystemClock

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SyncState:
    """A Sync snapshot (or a part of one, `more` set): everything the server says this agent
    serves; deltas come as SyncDelta."""

    entries: tuple[Entry, ...]
    bundle: TrustBundle
    federated: Mapping[str, TrustBundle] = field(default_factory=dict)
    revoked_serials: frozenset[str] = frozenset()
    revoked_jtis: frozenset[str] = frozenset()
    crl: tuple[bytes, ...] = ()
    revision: int = 0
    # (kind, value) -> the revoked credential's expiry, for the Revocations service.
    revocation_expiry: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # (kind, value) -> whose credential it is, when the server said (for verifiers' callbacks).
    revocation_spiffe_ids: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # A part of a snapshot split over several messages: more parts follow.
    more: bool = False
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class SyncDelta:
    """One Sync delta: what changed since the last message (None / empty: unchanged)."""

    upserts: tuple[Entry, ...] = ()
    removed_ids: tuple[str, ...] = ()
    bundle: TrustBundle | None = None
    federated: Mapping[str, TrustBundle] = field(default_factory=dict)
    # (kind, value) -> expiry of each revocation added; keys of those gone (expired).
    revocations_added: Mapping[tuple[str, str], int] = field(default_factory=dict)
    revocations_removed: frozenset[tuple[str, str]] = frozenset()
    # (kind, value) -> SPIFFE ID, for those of the added revocations the server named one.
    revocation_spiffe_ids: Mapping[tuple[str, str], str] = field(default_factory=dict)
    crl: tuple[bytes, ...] | None = None
    revision: int = 0
    more: bool = False
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class SyncPosition:
    """How far an agent ID's Sync stream got: what a reconnect (or a restart) asks to go on from."""

    agent_id: str = ""
    revision: int = 0
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Identity:
    entry: Entry
    svid: IssuedSvid


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The cache as it stands, for one synchronous read on the event loop.

    Built in O(1): `entries` is shared until the entry set changes, and `svids` and `index` are
    live views (copying 100k SVIDs on every renewal batch made rotation quadratic). Read what you
    need before the next `await`; keep only `version` across it.
    """

    version: int
    synced: bool
    entries: tuple[Entry, ...]
    svids: Mapping[str, IssuedSvid]
    bundle: TrustBundle | None
    federated: Mapping[str, TrustBundle]
    revoked_serials: frozenset[str]
    revoked_jtis: frozenset[str]
    crl: tuple[bytes, ...]
    revocation_expiry: Mapping[tuple[str, str], int] = field(default_factory=dict)
    revocation_spiffe_ids: Mapping[tuple[str, str], str] = field(default_factory=dict)
    # Why the agent serves nothing at all ("" normally): the server refused it (evicted, banned).
    refused: str = ""
    index: SelectorIndex = field(default_factory=SelectorIndex, compare=False, repr=False)

    def entries_for(self, selectors: frozenset[Selector]) -> list[Entry]:
        return list(self.index.match(selectors))

    def identities_for(self, selectors: frozenset[Selector], now: float) -> list[Identity]:
        """The caller's usable X.509 identities, default first, with unique non-empty hints.

        A later entry repeating an earlier one's hint is dropped, as SPIRE does: a hint is how a
        workload picks an SVID, so two answers for one hint would make the choice arbitrary.
        """
        out: list[Identity] = []
        hints: set[str] = set()
        for entry in self.index.match(selectors):
            svid = self.svids.get(entry.id)
            if svid is None or svid.not_after <= now or svid.serial_hex in self.revoked_serials:
                continue
            if entry.hint:
                if entry.hint in hints:
                    continue
                hints.add(entry.hint)
            out.append(Identity(entry, svid))
        return out

    def awaiting(self, selectors: frozenset[Selector], now: float) -> list[str]:
        """The caller's entries waiting for a (new) SVID: none yet, or expired before renewal.
        A revoked SVID is not awaited: revocation is final."""
        out: list[str] = []
        for entry in self.index.match(selectors):
            svid = self.svids.get(entry.id)
            if svid is None or (
                svid.not_after <= now and svid.serial_hex not in self.revoked_serials
            ):
                out.append(entry.id)
        return out

    def all_bundles(self) -> dict[str, TrustBundle]:
        """Trust domain name -> bundle: ours plus federated ones."""
        out = dict(self.federated)
        if self.bundle is not None:
            out[self.bundle.trust_domain] = self.bundle
        return out

    def federated_for(self, entries: Iterable[Entry]) -> dict[str, TrustBundle]:
        """The foreign bundles `entries` federate with (those the agent has): a workload sees
        no other."""
        wanted = {td for entry in entries for td in entry.federates_with}
        return {td: b for td, b in self.federated.items() if td in wanted}

    def bundles_for(self, entries: Iterable[Entry]) -> dict[str, TrustBundle]:
        """Ours plus the foreign bundles `entries` federate with."""
        out = self.federated_for(entries)
        if self.bundle is not None:
            out[self.bundle.trust_domain] = self.bundle
        return out


EntryListener = Callable[[Sequence[Entry], Sequence[str]], None]
SvidListener = Callable[[Sequence[str]], None]
# Past this share of the entries changing at once, re-index and re-match everything instead.
_REBUILD_SHARE = 0.25


class Cache:
    def __init__(self, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or SystemClock()
        self._synced = False
        self._entries: dict[str, Entry] = {}
        self._entry_tuple: tuple[Entry, ...] | None = ()
        self._index = SelectorIndex()
        self._svids: dict[str, IssuedSvid] = {}
        self._svid_view: Mapping[str, IssuedSvid] = MappingProxyType(self._svids)
        self._bundle: TrustBundle | None = None
        self._federated: dict[str, TrustBundle] = {}
        self._revoked_serials: frozenset[str] = frozenset()
        self._revoked_jtis: frozenset[str] = frozenset()
        self._crl: tuple[bytes, ...] = ()
        self._revocation_expiry: Mapping[tuple[str, str], int] = {}
        self._revocation_ids: Mapping[tuple[str, str], str] = {}
        self._refused = ""
        self._snapshot: Snapshot | None = None
        # Three things to wait for: anything, the entry set, what every caller shares.
        self._any = Signal()
        self._entry_signal = Signal()
        self._shared = Signal()
        self.watchers = Watchers(self._index.match)
        self._listeners: list[EntryListener] = []
        self._svid_listeners: list[SvidListener] = []
        self._distrust_listeners: list[SvidListener] = []
        self._jwt_key_listeners: list[Callable[[frozenset[str]], None]] = []

    @property
    def version(self) -> int:
        return self._any.version

    @property
    def entries_version(self) -> int:
        return self._entry_signal.version

    @property
    def shared_version(self) -> int:
        return self._shared.version

    def on_entries(self, listener: EntryListener) -> None:
        """Call `listener(changed_or_added, removed_ids)` after each change of the entry set."""
        self._listeners.append(listener)

    def on_svids(self, listener: SvidListener) -> None:
        """Call `listener(entry_ids)` after SVIDs were installed or dropped for these entries
        (those dropped with their entry are told through `on_entries`)."""
        self._svid_listeners.append(listener)

    def on_distrusted(self, listener: SvidListener) -> None:
        """Call `listener(entry_ids)` after these entries' SVIDs were dropped because the bundle
        no longer verifies them: they need new ones now (after `on_svids` is told)."""
        self._distrust_listeners.append(listener)

    def on_jwt_keys_lost(self, listener: Callable[[frozenset[str]], None]) -> None:
        """Call `listener(kids)` after the bundle lost these JWT keys (the server removed or
        forgot them): a JWT-SVID they signed verifies nowhere that reads the bundle now."""
        self._jwt_key_listeners.append(listener)

    def snapshot(self) -> Snapshot:
        snap = self._snapshot
        if snap is None:
            entries = self._entry_tuple
            if entries is None:
                entries = self._entry_tuple = tuple(self._entries.values())
            snap = Snapshot(
                version=self._any.version,
                synced=self._synced,
                entries=entries,
                svids=self._svid_view,
                bundle=self._bundle,
                federated=MappingProxyType(self._federated),
                revoked_serials=self._revoked_serials,
                revoked_jtis=self._revoked_jtis,
                crl=self._crl,
                revocation_expiry=self._revocation_expiry,
                revocation_spiffe_ids=self._revocation_ids,
                refused=self._refused,
                index=self._index,
            )
            self._snapshot = snap
        return snap

    def _changed(self, *, entries: bool = False, shared: bool = False) -> None:
        self._snapshot = None
        if entries:
            self._entry_tuple = None
            self._entry_signal.bump()
        if shared:
            self._shared.bump()
            self.watchers.everyone()
        self._any.bump()

    async def wait_change(self, seen: int) -> int:
        """Return the version once it differs from `seen` (at once if it already does)."""
        return await self._any.wait(seen)

    async def wait_entries_change(self, seen: int) -> int:
        """Like wait_change, for changes of the entry set only."""
        return await self._entry_signal.wait(seen)

    async def wait_shared_change(self, seen: int) -> int:
        """Like wait_change, for bundles, CRL, revocations and refusal only."""
        return await self._shared.wait(seen)

    def apply_sync(self, state: SyncState) -> None:
        """Install a whole snapshot; SVIDs of removed or changed entries are dropped."""
        federated = dict(state.federated)
        shared = not (
            self._synced
            and not self._refused
            and state.bundle == self._bundle
            and federated == self._federated
            and state.revoked_serials == self._revoked_serials
            and state.revoked_jtis == self._revoked_jtis
            and state.crl == self._crl
            and state.revocation_expiry == self._revocation_expiry
            and state.revocation_spiffe_ids == self._revocation_ids
        )
        entries = {e.id: e for e in state.entries}
        old = self._entries
        changed = [e for eid, e in entries.items() if old.get(eid) != e]
        removed = [old[eid] for eid in old.keys() - entries.keys()]
        bundle_before = self._bundle
        if shared:
            self._synced = True
            self._refused = ""
            self._bundle = state.bundle
            self._federated = federated
            self._revoked_serials = state.revoked_serials
            self._revoked_jtis = state.revoked_jtis
            self._crl = state.crl
            self._revocation_expiry = dict(state.revocation_expiry)
            self._revocation_ids = dict(state.revocation_spiffe_ids)
        if changed or removed:
            self._update_entries(entries, changed, removed, shared=shared)
        elif shared:
            self._changed(shared=True)
        self._bundle_moved(bundle_before)

    def restore(self, state: SyncState, svids: Iterable[IssuedSvid]) -> None:
        """Install what an earlier run saved, held but not served: the cache stays unsynced
        until the server's first Sync message (a delta from the saved revision, all its parts,
        or a snapshot) has removed what was deleted or revoked meanwhile."""
        self.apply_sync(state)
        self._synced = False
        self._changed(shared=True)
        self.put_svids(svids)

    def apply_delta(self, delta: SyncDelta) -> None:
        """Install a Sync delta: its cost follows what changed, not what is held."""
        # The first message after a restore may be a delta (caught up from the saved revision),
        # split in parts (upserts first, removals and revocations after): the restored state is
        # the server's word only once its last part is in. A stream cut before that leaves it
        # unsynced, serving nothing, rather than serving what the later parts would remove.
        shared = not self._synced and not delta.more
        if shared:
            self._synced = True
        bundle_before = self._bundle
        if delta.bundle is not None and delta.bundle != self._bundle:
            self._bundle = delta.bundle
            shared = True
        # Foreign bundles come whole with every bundle change: the set replaces ours.
        if delta.bundle is not None and dict(delta.federated) != self._federated:
            self._federated = dict(delta.federated)
            shared = True
        if delta.revocations_added or delta.revocations_removed:
            expiry = dict(self._revocation_expiry)
            for key in delta.revocations_removed:
                expiry.pop(key, None)
            expiry.update(delta.revocations_added)
            self._revocation_expiry = expiry
            if self._revocation_ids or delta.revocation_spiffe_ids:
                ids = {k: v for k, v in self._revocation_ids.items() if k in expiry}
                ids.update(delta.revocation_spiffe_ids)
                self._revocation_ids = ids
            self._revoked_serials = frozenset(v for k, v in expiry if k == "x509_serial")
            self._revoked_jtis = frozenset(v for k, v in expiry if k == "jwt_id")
            shared = True
        if delta.crl is not None and delta.crl != self._crl:
            self._crl = delta.crl
            shared = True
        if shared:
            # Revoked serials may hide SVIDs from callers: every stream recomputes.
            self._changed(shared=True)
        self.update_entries(delta.upserts, delta.removed_ids)
        self._bundle_moved(bundle_before)

    def _bundle_moved(self, before: TrustBundle | None) -> None:
        """What a bundle change may condemn: SVIDs it no longer verifies, and JWT keys it lost."""
        self._drop_unverifiable(before)
        bundle = self._bundle
        if before is None or bundle is None or before.jwt_keys == bundle.jwt_keys:
            return  # a refusal (no bundle) drops every token by itself
        lost = frozenset(k.kid for k in before.jwt_keys) - {k.kid for k in bundle.jwt_keys}
        if lost:
            for listener in self._jwt_key_listeners:
                listener(lost)

    def _drop_unverifiable(self, before: TrustBundle | None) -> None:
        """Drop the SVIDs the bundle no longer verifies, once it has lost an X.509 authority, and
        have them minted again (on_distrusted).

        A CA replaced outright while the agent was away leaves its restored SVIDs signed by a
        root the new bundle lacks: served beside it they verify nowhere. A rotation adds its
        new root first and keeps the old one while the old CA's SVIDs live, so those still
        verify and stay; only a bundle losing an authority can condemn any, so nothing is
        checked (a signature per SVID) otherwise.
        """
        bundle = self._bundle
        if before is None or bundle is None or not self._svids:
            return
        removed = set(before.x509_authorities) - set(bundle.x509_authorities)
        if not removed:
            return
        gone = self.drop_svids(unverifiable(self._svids.values(), bundle, removed, self._clock))
        if not gone:
            return
        log.warning(
            "X.509-SVIDs no longer verify with the trust bundle (their CA left it); minting "
            "them again",
            extra={"svids": len(gone)},
        )
        for listener in self._distrust_listeners:
            listener(gone)

    def update_entries(self, upserts: Sequence[Entry], removed_ids: Iterable[str]) -> None:
        """Apply a change of some entries (a delta): what it costs follows what changed."""
        entries = self._entries  # changed in place: a copy would cost what the delta saves
        changed = [e for e in upserts if entries.get(e.id) != e]
        for entry in changed:
            entries[entry.id] = entry
        removed = [entries.pop(eid) for eid in dict.fromkeys(removed_ids) if eid in entries]
        if changed or removed:
            self._update_entries(entries, changed, removed)

    def _update_entries(
        self,
        entries: dict[str, Entry],
        changed: list[Entry],
        removed: list[Entry],
        *,
        shared: bool = False,
    ) -> None:
        for entry in removed:
            self._svids.pop(entry.id, None)
        for entry in changed:
            svid = self._svids.get(entry.id)
            if svid is not None and svid.issuance_key != entry.issuance_key:
                del self._svids[entry.id]
        self._entries = entries
        if len(changed) + len(removed) > max(64, len(entries) * _REBUILD_SHARE):
            self._index.rebuild(entries.values())
            self.watchers.everyone(rematch=True)
        else:
            for entry in removed:
                self._index.remove(entry.id)
            for entry in changed:
                self._index.add(entry)
            # Old versions of changed entries are found through the watches serving them.
            self.watchers.entries_changed([*changed, *removed])
        self._changed(entries=True, shared=shared)
        removed_ids = [e.id for e in removed]
        for listener in self._listeners:
            listener(changed, removed_ids)

    def refuse(self, reason: str) -> None:
        """The server no longer recognises this agent: drop every entry, SVID, bundle and
        revocation it sent, and say `reason` to every caller until a Sync message comes again.
        What it sent is no longer backed by it (an evicted agent's SVIDs may be revoked)."""
        removed_ids = list(self._entries)
        self._synced = False
        self._refused = reason
        self._entries = {}
        self._index.rebuild(())
        self._svids.clear()
        self._bundle = None
        self._federated = {}
        self._revoked_serials = frozenset()
        self._revoked_jtis = frozenset()
        self._crl = ()
        self._revocation_expiry = {}
        self._revocation_ids = {}
        self.watchers.everyone(rematch=True)
        self._changed(entries=True, shared=True)
        for listener in self._listeners:
            listener((), removed_ids)

    def put_svids(self, svids: Iterable[IssuedSvid]) -> list[IssuedSvid]:
        """Install freshly issued SVIDs whose entry still exists unchanged; returns those."""
        installed: list[IssuedSvid] = []
        for svid in svids:
            entry = self._entries.get(svid.entry_id)
            if entry is None or entry.issuance_key != svid.issuance_key:
                continue
            self._svids[svid.entry_id] = svid
            installed.append(svid)
        if installed:
            ids = [s.entry_id for s in installed]
            self.watchers.svids_changed(ids)
            self._changed()
            for listener in self._svid_listeners:
                listener(ids)
        return installed

    def drop_svids(self, entry_ids: Iterable[str]) -> list[str]:
        """Forget these entries' SVIDs (expired, or evicted from a capped cache)."""
        gone = [eid for eid in entry_ids if self._svids.pop(eid, None) is not None]
        if gone:
            self.watchers.svids_changed(gone)
            self._changed()
            for listener in self._svid_listeners:
                listener(gone)
        return gone

    def svid(self, entry_id: str) -> IssuedSvid | None:
        return self._svids.get(entry_id)

    def entry(self, entry_id: str) -> Entry | None:
        return self._entries.get(entry_id)

    def entries(self) -> dict[str, Entry]:
        """A copy of every entry (O(n): tests and tools; hot paths use entry / snapshot)."""
        return dict(self._entries)

    def svids(self) -> dict[str, IssuedSvid]:
        """A copy of every SVID (O(n): tests and tools; hot paths use svid / snapshot)."""
        return dict(self._svids)

    def counts(self) -> tuple[int, int]:
        """(entries, SVIDs) held."""
        return len(self._entries), len(self._svids)

    def set_bundle(self, bundle: TrustBundle) -> None:
        """The bundle alone (from attestation, before the first Sync message)."""
        if bundle != self._bundle:
            before, self._bundle = self._bundle, bundle
            self._changed(shared=True)
            self._bundle_moved(before)


def join_parts(parts: Sequence[SyncState]) -> SyncState:
    """One snapshot from its parts: entries, revocations and CRLs of all, the rest from the
    last."""
    last = parts[-1]
    if len(parts) == 1:
        return last
    expiry: dict[tuple[str, str], int] = {}
    ids: dict[tuple[str, str], str] = {}
    for part in parts:
        expiry.update(part.revocation_expiry)
        ids.update(part.revocation_spiffe_ids)
    return replace(
        last,
        entries=tuple(e for part in parts for e in part.entries),
        revoked_serials=frozenset(s for part in parts for s in part.revoked_serials),
        revoked_jtis=frozenset(j for part in parts for j in part.revoked_jtis),
        revocation_expiry=expiry,
        revocation_spiffe_ids=ids,
        crl=tuple(c for part in parts for c in part.crl),
    )


def join_deltas(parts: Sequence[SyncDelta]) -> SyncDelta:
    """One delta from a run's parts, doing what applying them in turn would.

    A run is applied whole, with its last part: workloads never see a run half applied (an
    entry's replacement added but the entry not yet removed, a bundle without the entries that
    came with it), and a stream cut before its end leaves nothing of it behind. Its CRLs may be
    spread over its parts and replace the agent's together.
    """
    last = parts[-1]
    if len(parts) == 1:
        return last
    upserts: dict[str, Entry] = {}
    removed: dict[str, None] = {}
    added: dict[tuple[str, str], int] = {}
    gone: set[tuple[str, str]] = set()
    ids: dict[tuple[str, str], str] = {}
    bundle: TrustBundle | None = None
    federated: Mapping[str, TrustBundle] = {}
    crl: tuple[bytes, ...] | None = None
    for part in parts:
        # In each part's order of application (Cache.apply_delta): a later part undoes an
        # earlier one's upsert or revocation as applying it after would.
        for entry in part.upserts:
            upserts[entry.id] = entry
            removed.pop(entry.id, None)
        for entry_id in part.removed_ids:
            upserts.pop(entry_id, None)
            removed[entry_id] = None
        for key in part.revocations_removed:
            added.pop(key, None)
            ids.pop(key, None)
            gone.add(key)
        added.update(part.revocations_added)
        ids.update(part.revocation_spiffe_ids)
        if part.bundle is not None:
            bundle, federated = part.bundle, part.federated
        if part.crl is not None:
            crl = (*(crl or ()), *part.crl)
    return replace(
        last,
        upserts=tuple(upserts.values()),
        removed_ids=tuple(removed),
        bundle=bundle,
        federated=federated,
        revocations_added=added,
        revocations_removed=frozenset(gone),
        revocation_spiffe_ids=ids,
        crl=crl,
    )


def with_entry(state: SyncState, entry: Entry) -> SyncState:
    """A copy of `state` with one more (or a replaced) entry: a test and tooling convenience."""
    kept = tuple(e for e in state.entries if e.id != entry.id)
    return replace(state, entries=(*kept, entry))
