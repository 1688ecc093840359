"""Sync messages: a snapshot or a delta, split so that no message comes near gRPC's 4 MiB limit.

Each message holds at most MAX_ITEMS entries and revocations and about MAX_BYTES; all but the
last of a run have `more` set (see proto/node.proto for what the agent does with them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from server.convert import entry_to_proto, revocation_to_proto
from server.datastore.records import Entry, Revocation
from svid._proto import common_pb2, node_pb2

MAX_BYTES = 1024 * 1024
MAX_ITEMS = 2000
# A repeated field's tag and length prefix, over the item's own size.
_OVERHEAD = 6

SNAPSHOT = node_pb2.SyncUpdate.SNAPSHOT
DELTA = node_pb2.SyncUpdate.DELTA


@dataclass(frozen=True)
class Shared:
    """What every agent gets alike. In a delta, None means unchanged."""

    bundle: common_pb2.Bundle | None = None
    crl: Sequence[bytes] | None = None


class _Packer:
    def __init__(
        self,
        kind: node_pb2.SyncUpdate.Kind,
        revision: int,
        epoch: str,
        max_bytes: int,
        max_items: int,
    ):
        self._kind = kind
        self._revision = revision
        self._epoch = epoch
        self._max_bytes = max_bytes
        self._max_items = max_items
        self.done: list[node_pb2.SyncUpdate] = []
        self._start()

    def _start(self) -> None:
        self.current = node_pb2.SyncUpdate(kind=self._kind, revision=self._revision)
        self.current.epoch = self._epoch
        self._bytes = 0
        self._items = 0

    def room(self, size: int) -> None:
        """Close the current message first if `size` more bytes would not fit in it."""
        if self._items and (self._bytes + size > self._max_bytes or self._items >= self._max_items):
            self.current.more = True
            self.done.append(self.current)
            self._start()
        self._bytes += size
        self._items += 1

    def finish(self) -> list[node_pb2.SyncUpdate]:
        self.done.append(self.current)
        return self.done


def _pack(
    packer: _Packer,
    entries: Iterable[Entry],
    revocations: Iterable[Revocation],
    removed_ids: Iterable[str] = (),
    removed_revocations: Iterable[Revocation] = (),
) -> None:
    for entry in entries:
        encoded = entry_to_proto(entry)
        packer.room(encoded.ByteSize() + _OVERHEAD)
        packer.current.entries.append(encoded)
    for entry_id in removed_ids:
        packer.room(len(entry_id) + _OVERHEAD)
        packer.current.removed_entry_ids.append(entry_id)
    for item in revocations:
        message = revocation_to_proto(item)
        packer.room(message.ByteSize() + _OVERHEAD)
        packer.current.revocations.append(message)
    for item in removed_revocations:
        message = revocation_to_proto(item)
        packer.room(message.ByteSize() + _OVERHEAD)
        packer.current.removed_revocations.append(message)


def _finish(packer: _Packer, shared: Shared) -> list[node_pb2.SyncUpdate]:
    size = 0
    if shared.bundle is not None:
        size += shared.bundle.ByteSize() + _OVERHEAD
    if shared.crl is not None:
        size += sum(len(c) + _OVERHEAD for c in shared.crl)
    if size:
        packer.room(size)
    if shared.bundle is not None:
        packer.current.bundle.CopyFrom(shared.bundle)
    if shared.crl is not None:
        packer.current.crl.extend(shared.crl)
        packer.current.crl_changed = True
    return packer.finish()


def snapshot_messages(
    entries: Iterable[Entry],
    revocations: Iterable[Revocation],
    shared: Shared,
    *,
    revision: int,
    epoch: str,
    max_bytes: int = MAX_BYTES,
    max_items: int = MAX_ITEMS,
) -> list[node_pb2.SyncUpdate]:
    """Everything for one agent; the bundle and CRL ride in the last message."""
    packer = _Packer(SNAPSHOT, revision, epoch, max_bytes, max_items)
    _pack(packer, entries, revocations)
    return _finish(packer, shared)


def delta_messages(
    upserts: Iterable[Entry],
    removed_ids: Iterable[str],
    revocations_added: Iterable[Revocation],
    revocations_removed: Iterable[Revocation],
    shared: Shared,
    *,
    revision: int,
    epoch: str,
    max_bytes: int = MAX_BYTES,
    max_items: int = MAX_ITEMS,
) -> list[node_pb2.SyncUpdate]:
    packer = _Packer(DELTA, revision, epoch, max_bytes, max_items)
    _pack(packer, upserts, revocations_added, removed_ids, revocations_removed)
    return _finish(packer, shared)
