"""Sync messages: a snapshot or a delta, split so that no message comes near gRPC's 4 MiB limit.

Each message holds at most MAX_ITEMS entries and revocations and about MAX_BYTES; all but the
last of a run have `more` set (see proto/node.proto for what the agent does with them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
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
    # Foreign bundles, by "spiffe://<td>": always the full set, and only along with `bundle`.
    federated: Mapping[str, common_pb2.Bundle] | None = None
    crl: Sequence[bytes] | None = None
    audit_checkpoints: Sequence[node_pb2.AuditCheckpoint] | None = None


class _Packer:
    """Fills messages in turn; `room` hands back the message it closed, if any."""

    def __init__(
        self, kind: node_pb2.SyncUpdate.Kind, revision: int, epoch: str, limits: tuple[int, int]
    ) -> None:
        self._kind = kind
        self._revision = revision
        self._epoch = epoch
        self._max_bytes, self._max_items = limits
        self._start()

    def _start(self) -> None:
        self.current = node_pb2.SyncUpdate(kind=self._kind, revision=self._revision)
        self.current.epoch = self._epoch
        self._bytes = 0
        self._items = 0

    def room(self, size: int) -> node_pb2.SyncUpdate | None:
        """Make room for `size` more bytes: close the current message first if they would not
        fit in it, and return it."""
        closed = None
        if self._items and (self._bytes + size > self._max_bytes or self._items >= self._max_items):
            closed = self.current
            closed.more = True
            self._start()
        self._bytes += size
        self._items += 1
        return closed


def _pack(
    packer: _Packer,
    entries: Iterable[Entry],
    revocations: Iterable[Revocation],
    *,
    removed_ids: Iterable[str],
    removed_revocations: Iterable[Revocation],
    shared: Shared,
) -> Iterator[node_pb2.SyncUpdate]:
    """The messages, each built only when the previous one was taken: a stream sending a big
    snapshot lets the event loop serve others between messages."""
    for entry in entries:
        encoded = entry_to_proto(entry)
        if closed := packer.room(encoded.ByteSize() + _OVERHEAD):
            yield closed
        packer.current.entries.append(encoded)
    for entry_id in removed_ids:
        if closed := packer.room(len(entry_id) + _OVERHEAD):
            yield closed
        packer.current.removed_entry_ids.append(entry_id)
    for item in revocations:
        message = revocation_to_proto(item)
        if closed := packer.room(message.ByteSize() + _OVERHEAD):
            yield closed
        packer.current.revocations.append(message)
    for item in removed_revocations:
        message = revocation_to_proto(item)
        if closed := packer.room(message.ByteSize() + _OVERHEAD):
            yield closed
        packer.current.removed_revocations.append(message)
    crls = list(shared.crl or ())
    # Several CRLs together may not fit one message (server.tasks.crl splits a big one): all but
    # the last take a room each, and the agent joins the crl fields of a run's parts. The last
    # rides with the bundle in the last message, as a lone CRL always did.
    for der in crls[:-1]:
        if closed := packer.room(len(der) + _OVERHEAD):
            yield closed
        packer.current.crl.append(der)
        packer.current.crl_changed = True
    size = 0
    if shared.bundle is not None:
        size += shared.bundle.ByteSize() + _OVERHEAD
    for key, foreign in (shared.federated or {}).items():
        size += foreign.ByteSize() + len(key) + 2 * _OVERHEAD
    if crls:
        size += len(crls[-1]) + _OVERHEAD
    if shared.audit_checkpoints is not None:
        size += sum(c.ByteSize() + _OVERHEAD for c in shared.audit_checkpoints)
    if size and (closed := packer.room(size)):
        yield closed
    if shared.bundle is not None:
        packer.current.bundle.CopyFrom(shared.bundle)
    for key, foreign in (shared.federated or {}).items():
        packer.current.federated_bundles[key].CopyFrom(foreign)
    if shared.crl is not None:
        packer.current.crl.extend(crls[-1:])
        packer.current.crl_changed = True
    if shared.audit_checkpoints is not None:
        packer.current.audit_checkpoints.extend(shared.audit_checkpoints)
    yield packer.current


def snapshot_messages(
    entries: Iterable[Entry],
    revocations: Iterable[Revocation],
    shared: Shared,
    *,
    revision: int,
    epoch: str,
    max_bytes: int = MAX_BYTES,
    max_items: int = MAX_ITEMS,
) -> Iterator[node_pb2.SyncUpdate]:
    """Everything for one agent; the bundle and audit checkpoints ride in the last message, and
    so do the CRLs unless there are too many for one."""
    packer = _Packer(SNAPSHOT, revision, epoch, (max_bytes, max_items))
    return _pack(
        packer, entries, revocations, removed_ids=(), removed_revocations=(), shared=shared
    )


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
) -> Iterator[node_pb2.SyncUpdate]:
    packer = _Packer(DELTA, revision, epoch, (max_bytes, max_items))
    return _pack(
        packer,
        upserts,
        revocations_added,
        removed_ids=removed_ids,
        removed_revocations=revocations_removed,
        shared=shared,
    )
