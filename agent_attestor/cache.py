"""The agent's in-memory state with change fan-out to open Workload API streams.

Mutated only on the event loop (sync and rotation apply their results there); read through
immutable snapshots, so a stream computes its full-state message without locks and without ever
asking the server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from agent_attestor.model import Entry, IssuedSvid, Selector, TrustBundle, entries_for


@dataclass(frozen=True, slots=True)
class SyncState:
    """Everything one Sync message from the server says (full state, never a delta)."""

    entries: tuple[Entry, ...]
    bundle: TrustBundle
    federated: Mapping[str, TrustBundle] = field(default_factory=dict)
    revoked_serials: frozenset[str] = frozenset()
    revoked_jtis: frozenset[str] = frozenset()
    crl: tuple[bytes, ...] = ()
    revision: int = 0
    # (kind, value) -> the revoked credential's expiry, for the Revocations service.
    revocation_expiry: Mapping[tuple[str, str], int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Identity:
    entry: Entry
    svid: IssuedSvid


@dataclass(frozen=True, slots=True)
class Snapshot:
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
    # Why the agent serves nothing at all ("" normally): the server refused it (evicted, banned).
    refused: str = ""
    # Per-snapshot memo: callers with the same selectors (every call of one process) share it.
    _matches: dict[frozenset[Selector], tuple[Entry, ...]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def entries_for(self, selectors: frozenset[Selector]) -> list[Entry]:
        found = self._matches.get(selectors)
        if found is None:
            found = tuple(entries_for(self.entries, selectors))
            if len(self._matches) < 4096:
                self._matches[selectors] = found
        return list(found)

    def identities_for(self, selectors: frozenset[Selector], now: float) -> list[Identity]:
        """The caller's usable X.509 identities, default first, with unique non-empty hints.

        A later entry repeating an earlier one's hint is dropped, as SPIRE does: a hint is how a
        workload picks an SVID, so two answers for one hint would make the choice arbitrary.
        """
        out: list[Identity] = []
        hints: set[str] = set()
        for entry in self.entries_for(selectors):
            svid = self.svids.get(entry.id)
            if svid is None or svid.not_after <= now or svid.serial_hex in self.revoked_serials:
                continue
            if entry.hint:
                if entry.hint in hints:
                    continue
                hints.add(entry.hint)
            out.append(Identity(entry, svid))
        return out

    def awaiting(self, selectors: frozenset[Selector], now: float) -> bool:
        """Whether some entry of the caller is waiting for a (new) SVID: none yet, or expired
        before renewal. A revoked SVID is not awaited: revocation is final."""
        for entry in self.entries_for(selectors):
            svid = self.svids.get(entry.id)
            if svid is None or (
                svid.not_after <= now and svid.serial_hex not in self.revoked_serials
            ):
                return True
        return False

    def all_bundles(self) -> dict[str, TrustBundle]:
        """Trust domain name -> bundle: ours plus federated ones."""
        out = dict(self.federated)
        if self.bundle is not None:
            out[self.bundle.trust_domain] = self.bundle
        return out


class Cache:
    def __init__(self) -> None:
        self._version = 0
        self._synced = False
        self._entries: dict[str, Entry] = {}
        self._svids: dict[str, IssuedSvid] = {}
        self._bundle: TrustBundle | None = None
        self._federated: dict[str, TrustBundle] = {}
        self._revoked_serials: frozenset[str] = frozenset()
        self._revoked_jtis: frozenset[str] = frozenset()
        self._crl: tuple[bytes, ...] = ()
        self._revocation_expiry: Mapping[tuple[str, str], int] = {}
        self._refused = ""
        self._waiters: set[asyncio.Future[int]] = set()
        self._snapshot: Snapshot | None = None

    @property
    def version(self) -> int:
        return self._version

    def snapshot(self) -> Snapshot:
        snap = self._snapshot
        if snap is None:
            snap = Snapshot(
                version=self._version,
                synced=self._synced,
                entries=tuple(self._entries.values()),
                svids=MappingProxyType(dict(self._svids)),
                bundle=self._bundle,
                federated=MappingProxyType(dict(self._federated)),
                revoked_serials=self._revoked_serials,
                revoked_jtis=self._revoked_jtis,
                crl=self._crl,
                revocation_expiry=self._revocation_expiry,
                refused=self._refused,
            )
            self._snapshot = snap
        return snap

    def _changed(self) -> None:
        self._version += 1
        self._snapshot = None
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(self._version)

    async def wait_change(self, seen: int) -> int:
        """Return the version once it differs from `seen` (at once if it already does)."""
        if self._version != seen:
            return self._version
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            return await fut
        finally:
            self._waiters.discard(fut)

    def apply_sync(self, state: SyncState) -> None:
        """Install a full-state update; SVIDs of removed or changed entries are dropped."""
        entries = {e.id: e for e in state.entries}
        svids = {
            eid: s
            for eid, s in self._svids.items()
            if eid in entries and s.issuance_key == entries[eid].issuance_key
        }
        federated = dict(state.federated)
        if (
            self._synced
            and not self._refused
            and entries == self._entries
            and svids.keys() == self._svids.keys()
            and state.bundle == self._bundle
            and federated == self._federated
            and state.revoked_serials == self._revoked_serials
            and state.revoked_jtis == self._revoked_jtis
            and state.crl == self._crl
            and state.revocation_expiry == self._revocation_expiry
        ):
            return
        self._synced = True
        self._refused = ""
        self._entries = entries
        self._svids = svids
        self._bundle = state.bundle
        self._federated = federated
        self._revoked_serials = state.revoked_serials
        self._revoked_jtis = state.revoked_jtis
        self._crl = state.crl
        self._revocation_expiry = dict(state.revocation_expiry)
        self._changed()

    def refuse(self, reason: str) -> None:
        """The server no longer recognises this agent: drop every entry, SVID, bundle and
        revocation it sent, and say `reason` to every caller until a Sync message comes again.
        What it sent is no longer backed by it (an evicted agent's SVIDs may be revoked)."""
        self._synced = False
        self._refused = reason
        self._entries = {}
        self._svids = {}
        self._bundle = None
        self._federated = {}
        self._revoked_serials = frozenset()
        self._revoked_jtis = frozenset()
        self._crl = ()
        self._revocation_expiry = {}
        self._changed()

    def put_svids(self, svids: Iterable[IssuedSvid]) -> int:
        """Install freshly issued SVIDs whose entry still exists unchanged; returns how many."""
        count = 0
        for svid in svids:
            entry = self._entries.get(svid.entry_id)
            if entry is None or entry.issuance_key != svid.issuance_key:
                continue
            self._svids[svid.entry_id] = svid
            count += 1
        if count:
            self._changed()
        return count

    def drop_expired(self, now: float) -> list[str]:
        gone = [eid for eid, s in self._svids.items() if s.not_after <= now]
        for eid in gone:
            del self._svids[eid]
        if gone:
            self._changed()
        return gone

    def entries(self) -> dict[str, Entry]:
        return dict(self._entries)

    def svids(self) -> dict[str, IssuedSvid]:
        return dict(self._svids)

    def set_bundle(self, bundle: TrustBundle) -> None:
        """The bundle alone (from attestation, before the first Sync message)."""
        if bundle != self._bundle:
            self._bundle = bundle
            self._changed()


def with_entry(state: SyncState, entry: Entry) -> SyncState:
    """A copy of `state` with one more (or a replaced) entry: a test and tooling convenience."""
    kept = tuple(e for e in state.entries if e.id != entry.id)
    return replace(state, entries=(*kept, entry))
